"""Stage II recipe on a tiny random LLM: held-out CE falls, DA changes target features, the
LLM, tokenizer and encoder base stay frozen, DA sees only adapt trials."""

import json

import pytest
import torch

from fmri2text.config import load_config
from fmri2text.data.datasets import synthetic_experiment
from fmri2text.models import zoo
from fmri2text.training.stage1 import load_student, train_stage1
from fmri2text.training.stage2 import freeze_for_stage2, train_stage2

CFG = ["encoder.preset=tiny", "encoder.projector_dim=32", "encoder.projector_heads=2",
       "stage1.steps=30", "stage1.batch_size=8", "stage1.lr=3e-3",
       "stage1.val_patience=0",  # Stage I runs all 30 steps (validation at 0, 25, 30)
       "stage2.steps=30", "stage2.batch_size=8", "stage2.lr=3e-3", "stage2.log_every=5",
       "stage2.compare_da=true", "stage2.val_every=0"]  # 30 steps kept: CE falls (checked)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    windows, targets = synthetic_experiment(grid=(10, 10, 8), d_llm=32)
    cfg = load_config(None, CFG)
    train_stage1(None, run, cfg, windows=windows, targets=targets, progress=False, log=lambda s: None)
    llm, tok = zoo.tiny_llm(hidden=32, layers=2)
    llm_before = {k: v.clone() for k, v in llm.state_dict().items()}
    m = train_stage2(None, run, cfg, windows=windows, targets=targets, llm=llm, tokenizer=tok,
                     progress=False, log=lambda s: None)
    return run, m, llm, llm_before


def test_heldout_ce_falls_and_metrics_are_written(trained):
    run, m, _, _ = trained
    w = m["with_da"]
    assert m["without_da"]["heldout_ce_after"] < m["without_da"]["heldout_ce_before"] - 0.02
    # with DANCE the tiny world's 30 steps hold the CE where the linear path put it (the
    # DA terms pull the other way here); it must not get worse
    assert w["heldout_ce_after"] < w["heldout_ce_before"] + 0.01
    saved = json.loads((run / "stage2" / "metrics.json").read_text())
    assert saved["main"] == "with_da" and "da_effect" in saved
    rows = [json.loads(x) for x in (run / "stage2" / "log.jsonl").read_text().splitlines()]
    assert {"ce", "source_ce", "nc", "es", "da", "total", "lr"} <= set(rows[0])
    assert saved["loss_config"]["dance_tau"] == 0.5  # the temperature used is recorded


def test_linear_gain_and_step_are_chosen_on_validation(trained):
    run, m, _, _ = trained
    w = m["with_da"]
    gain = w["linear_gain"]  # candidates scored on the validation trials until the CE rose
    tried, ces = list(gain["validation_ce"]), list(gain["validation_ce"].values())
    assert tried == [1.0, 1.25, 1.5, 1.75, 2.0][:len(tried)] and len(tried) >= 2
    rises = [b > a for a, b in zip(ces, ces[1:])]
    assert not any(rises[:-1]) and (len(tried) == 5 or rises[-1])
    assert gain["chosen"] == min(gain["validation_ce"], key=gain["validation_ce"].get)
    s2, _ = load_student(run / "stage2" / "student.safetensors")
    assert float(s2.linear.gain) == gain["chosen"]
    assert w["n_val_trials"] > 0 and w["validation"] is None  # stage2.val_every=0: last step
    s1 = json.loads((run / "stage1" / "metrics.json").read_text())["validation"]
    assert [step for step, _ in s1["scores"]] == [0, 25, 30]  # before training, every 25, last
    assert s1["best_score"] == min(v for _, v in s1["scores"])


def test_domain_adaptation_changes_target_features(trained):
    run, m, _, _ = trained
    with_da, _ = load_student(run / "stage2" / "student.safetensors")
    without, _ = load_student(run / "stage2" / "without_da" / "student.safetensors")
    diff = [not torch.equal(a, b) for a, b in zip(with_da.projector.parameters(),
                                                 without.projector.parameters())]
    assert any(diff)
    eff = m["da_effect"]["adapt"]
    assert abs(eff["probe_entropy"]) > 1e-3 or abs(eff["a_distance"]) > 1e-3


def test_only_the_bridge_trains(trained):
    run, _, llm, llm_before = trained
    assert all(torch.equal(v, llm_before[k]) for k, v in llm.state_dict().items())
    s1, _ = load_student(run / "stage1" / "student.safetensors")
    s2, _ = load_student(run / "stage2" / "student.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(s1.tokenizer.parameters(), s2.tokenizer.parameters()))
    base = {n: p for n, p in s1.encoder.named_parameters() if ".adapter." not in f".{n}"}
    after = dict(s2.encoder.named_parameters())
    assert all(torch.equal(p, after[n]) for n, p in base.items())
    freeze_for_stage2(s2)
    names = {n for n, p in s2.named_parameters() if p.requires_grad}
    assert names and all(".adapter." in f".{n}" or n.startswith("projector.") for n in names)
    assert all(torch.equal(getattr(s1.linear, k), getattr(s2.linear, k))
               for k in ("index", "mean", "scale", "basis", "weight", "bias"))  # the ridge map stays
    freeze_for_stage2(s2, train_linear=True)  # stage2.train_linear: its weights join the bridge
    assert {"linear.weight", "linear.bias"} <= {n for n, p in s2.named_parameters() if p.requires_grad}


def test_memory_bank_holds_only_adapt_trials(trained):
    _, m, _, _ = trained
    from safetensors.torch import load_file

    run = trained[0]
    ck = sorted((run / "stage2" / "checkpoints").iterdir())[-1]
    state = load_file(str(ck / "model.safetensors"))
    bank = state["loss.dance.memory.features"]
    # synthetic_experiment: 2 held-out subjects x 8 adapt clips
    assert bank.shape[0] == 16 and bool(state["loss.dance.memory.filled"].all())


def test_heldout_ce_on_a_subset_takes_trials_spread_over_the_table():
    """max_trials picks evenly spaced trials (first and last included: every subject of a
    subject-ordered table); 0 takes all. The CE is the mean over the answer tokens scored."""
    import numpy as np

    from fmri2text.training.stage2 import heldout_ce

    asked = []

    class Data:
        clips = np.array([f"c{i}" for i in range(10)])

        def __len__(self):
            return 10

        def fmri(self, pos):
            asked.extend(int(p) for p in pos)
            return torch.as_tensor(pos, dtype=torch.float32)

    class Targets:
        def text_of(self, clips):
            return ["q"] * len(clips), ["a"] * len(clips)

    class Model:
        student = torch.nn.Identity()

        def answer_logits(self, z, instr, ans):  # uniform over 4 tokens: CE = log 4
            return torch.zeros(len(z), 3, 4), torch.tensor([[-100, 1, 2]] * len(z))

    ce = heldout_ce(Model(), Data(), Targets(), batch_size=3, max_trials=4)
    assert asked == [0, 3, 6, 9] and ce == pytest.approx(float(np.log(4)))
    asked.clear()
    heldout_ce(Model(), Data(), Targets(), batch_size=3, max_trials=0)
    assert asked == list(range(10))


def test_gains_are_tried_in_increasing_order_until_the_validation_ce_rises(monkeypatch):
    from types import SimpleNamespace

    from fmri2text.training import stage2

    path = SimpleNamespace(gain=torch.zeros(()))
    model = SimpleNamespace(student=SimpleNamespace(linear=path))
    tried = []

    def ce(model, val, targets, batch_size, offsets=None):
        g = float(path.gain)
        tried.append(g)
        return (g - 1.4) ** 2  # lowest between 1.25 and 1.5

    monkeypatch.setattr(stage2, "heldout_ce", ce)
    val = [0, 1, 2]
    out = stage2.choose_gain(model, val, None, 8, None, [2.0, 1.0, 1.5, 1.25, 1.75], lambda _: None)
    assert tried == [1.0, 1.25, 1.5, 1.75]  # 1.75 rose above 1.5: 2.0 is not tried
    assert out["chosen"] == 1.5 and float(path.gain) == 1.5
    tried.clear()  # a CE that falls all the way: every gain is tried, the last kept
    monkeypatch.setattr(stage2, "heldout_ce", lambda *a, **k: tried.append(1) or -float(path.gain))
    assert stage2.choose_gain(model, val, None, 8, None, [1.0, 2.0, 3.0], lambda _: None)["chosen"] == 3.0
    assert len(tried) == 3
