"""The Python API: ``Decoder.from_pretrained(RUN/model)`` decodes a held-out run exactly as the
run did, a saved decoder reloads to the same text, and a bad folder is refused clearly.

The tiny run (every real component, ``configs/tiny.yaml``, an LLM whose answers depend on the
fMRI) is the one ``examples/train_on_your_bids.py`` trains for the session (``example_run``);
this module exports its decoder again with ``export_run_model``.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fmri2text.api import Decoder
from fmri2text.export import export_run_model
from fmri2text.config import load_config
from fmri2text.errors import UserError
from fmri2text.evaluation.evaluate import shuffle_within_subject

from .example_run import ROOT, example_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    ex = example_run(tmp_path_factory)
    run = ex.out / "run"
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"teacher.llm={ex.llm}"])
    model = export_run_model(run, cfg)
    predictions = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    return run, cfg, model, predictions


@pytest.fixture
def model_copy(tiny_run, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_run[2], tmp_path / "model"))


def _test_run(decoder: Decoder) -> tuple[str, str]:
    (test_run,) = decoder.training["test_runs"]  # tiny: one held-out subject, one run
    return test_run["bold"], test_run["events"]


def test_from_pretrained_reproduces_the_runs_predictions(tiny_run):
    run, _, model, predictions = tiny_run
    assert len({p["fmri2text"] for p in predictions}) > 1, "answers must depend on the fMRI"
    decoder = Decoder.from_pretrained(model)
    bold, events = _test_run(decoder)
    trials = decoder.windows(bold, events=events)
    onsets = [p["onset"] for p in predictions]
    # the held-out subject is aligned by its unlabelled trials: the run's other trials
    adapt = decoder.windows(bold, onsets=[o for o in trials.table["onset"] if o not in onsets]).data
    assert len(adapt) >= 10  # enough to align (models/alignment.MIN_TRIALS)
    texts = decoder.decode(bold, events=events, adapt=adapt)
    assert len(texts) == len(trials.table) == len(trials.data) > len(predictions)
    ours = {(o, s): t for o, s, t in zip(trials.table["onset"], trials.table["stim_file"], texts)}
    assert [ours[(p["onset"], p["stim"])] for p in predictions] == [p["fmri2text"] for p in predictions]
    # the test trials alone, by onset, in the run's order and batches: the same again
    assert decoder.decode(bold, onsets=onsets, adapt=adapt) == [p["fmri2text"] for p in predictions]
    # the shuffled control, the decoder's answers permuted within subject, is what decoding
    # each trial with another trial's fMRI gives
    shuffled = [json.loads(line)["fmri2text"]
                for line in (run / "controls" / "shuffled.jsonl").read_text().splitlines()]
    source = shuffle_within_subject(np.arange(len(onsets)), [p["subject"] for p in predictions],
                                    load_config(run / "config.yaml", []).evaluation.seed)
    assert (source != np.arange(len(onsets))).all()
    assert decoder.decode(bold, onsets=[onsets[j] for j in source], adapt=adapt) == shuffled
    # MBR answers too are the same whichever trials are decoded together
    decoder.generation.update(samples=8, mbr_beta=1.5, rerank=2.0)
    every = dict(zip(zip(trials.table["onset"], trials.table["stim_file"]),
                     decoder.decode(bold, events=events, adapt=adapt)))
    assert [every[(p["onset"], p["stim"])] for p in predictions] == \
        decoder.decode(bold, onsets=onsets, batch_size=16, adapt=adapt)
    # the fMRI embeddings the run scored retrieval with; unaligned, others
    with np.load(run / "retrieval.npz") as f:
        pooled = f["pred"]
    np.testing.assert_allclose(decoder.embed(bold, onsets=onsets, adapt=adapt), pooled, rtol=0,
                               atol=1e-6)
    assert np.abs(decoder.embed(bold, onsets=onsets) - pooled).max() > 1e-3
    assert decoder.embed(bold, onsets=onsets, pooled=False).shape == (len(onsets), 4, 64)


def test_round_trip_decodes_identical_text(tiny_run, tmp_path):
    _, _, model, predictions = tiny_run
    decoder = Decoder.from_pretrained(model)
    bold, _ = _test_run(decoder)
    onsets = [p["onset"] for p in predictions]
    texts = decoder.decode(bold, onsets=onsets)
    tokens = decoder.embed(bold, onsets=onsets, pooled=False)
    saved = decoder.save_pretrained(tmp_path / "copy")
    again = Decoder.from_pretrained(saved)
    assert again.decode(bold, onsets=onsets) == texts and len(set(texts)) > 1
    assert np.array_equal(again.embed(bold, onsets=onsets, pooled=False), tokens)
    assert json.loads((saved / "config.json").read_text()) == json.loads((model / "config.json").read_text())
    assert (saved / "README.md").read_text() == (model / "README.md").read_text()
    # the comparison can fail: other weights give other tokens and other answers
    with torch.no_grad():  # the linear path feeds the tokens whether or not the deep path does
        again.student.linear.bias.add_(0.5)
    assert not np.allclose(again.embed(bold, onsets=onsets, pooled=False), tokens)
    assert again.decode(bold, onsets=onsets) != texts


def test_candidates_meet_the_semantic_head_away_from_the_training_answers_mean(tiny_run):
    """MBR's rerank compares a candidate with the head's prediction as directions from the
    head's intercept (the training answers' mean): the typical answer gets no credit for the
    part every answer shares."""
    decoder = Decoder.from_pretrained(tiny_run[2])
    centre = decoder.student.linear.semantic_centre.numpy()
    texts = ["a red ball moving left", "a blue star spinning"]
    raw, got = decoder.embed_texts(texts), decoder.embed_answers(texts)
    want = (raw - centre) / np.linalg.norm(raw - centre, axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.linalg.norm(centre) > 0.1 and not np.allclose(got, raw, atol=1e-2)
    bold, events = _test_run(decoder)
    data = decoder.windows(bold, events=events).data
    pred = decoder.semantic(data)  # (n, d_s) unit directions from the same centre
    lin = decoder.student.linear
    _, x = next(decoder._inputs(data, [0, 1], None))  # the student's input of two windows
    with torch.no_grad():
        full = lin.components(x) @ lin.sem_weight + lin.sem_bias  # the head's whole prediction
    np.testing.assert_allclose(pred[:2].numpy(), torch.nn.functional.normalize(
        full - lin.sem_bias, dim=-1).numpy(), atol=1e-5)


def test_export_writes_the_model_card_and_is_repeatable(tiny_run):
    run, cfg, model, predictions = tiny_run
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    assert sorted(before) == ["README.md", "config.json", "mask.npy", "student.safetensors"]
    config = json.loads(before["config.json"])
    assert config["format"] == "fmri2text-decoder" and config["format_version"] == 1
    assert config["llm"]["name"] == cfg.teacher.llm and len(config["llm"]["sha256"]) == 64
    assert config["teacher"]["checkpoint_hash"] and config["preprocessing"]["data"]["window"] == 2
    card = before["README.md"].decode()
    metrics = json.loads((run / "metrics.json").read_text())
    for text in ("from fmri2text import Decoder", "sub-03", "| held out |", "shuffled", "prompt_only",
                 "ridge", metrics["scorer"]["bertscore"]["model"], "Permutation p-values",
                 f"{metrics['subjects']['sub-03']['bertscore_f1']:.2f}"):
        assert text in card, text
    assert export_run_model(run, cfg) == model
    after = {p.name: p.read_bytes() for p in model.iterdir()}
    # config.json records the student's content hash; the safetensors header order may vary
    assert {k: v for k, v in after.items() if k != "student.safetensors"} == \
        {k: v for k, v in before.items() if k != "student.safetensors"}


def test_in_memory_images_decode_like_their_files(tiny_run):
    decoder = Decoder.from_pretrained(tiny_run[2])
    bold, _ = _test_run(decoder)
    onsets = [p["onset"] for p in tiny_run[3][:4]]
    ref = decoder.embed(bold, onsets=onsets, pooled=False)
    img = nib.load(bold)
    assert np.array_equal(decoder.embed(img, onsets=onsets, pooled=False), ref)
    copy = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header)  # not file-backed
    assert np.array_equal(decoder.embed(copy, onsets=onsets, pooled=False), ref)
    assert decoder.windows(copy, onsets=onsets).table["bold_path"].iat[0] == "<nibabel image>"


def _rewrite_student(path: Path, edit) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata=meta)


def _set(path: Path, **changes) -> None:
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _flip_one_voxel(path: Path) -> None:
    mask = np.load(path)
    mask[np.flatnonzero(mask)[0]] = False
    np.save(path, mask)


CORRUPTIONS = {
    "config missing": ("config.json", lambda m: (m / "config.json").unlink(), "config.json is missing"),
    "student missing": ("student.safetensors", lambda m: (m / "student.safetensors").unlink(),
                        "missing"),
    "mask missing": ("mask.npy", lambda m: (m / "mask.npy").unlink(), "missing"),
    "config not json": ("config.json", lambda m: (m / "config.json").write_text("{"), "not valid JSON"),
    "newer format": ("config.json", lambda m: _set(m / "config.json", format_version=2),
                     "newer fmri2text"),
    "student shape": ("student.safetensors", lambda m: _rewrite_student(
        m / "student.safetensors", lambda t: t.update({"projector.out.weight": t["projector.out.weight"][:-1]})),
        "'projector.out.weight' has shape (63, 32)"),
    "student altered": ("student.safetensors", lambda m: _rewrite_student(
        m / "student.safetensors", lambda t: t["projector.out.bias"].add_(1.0)), "sha256"),
    "mask mismatch": ("mask.npy", lambda m: _flip_one_voxel(m / "mask.npy"), "voxels"),
    "pickled mask": ("mask.npy", lambda m: np.save(m / "mask.npy", np.array([{"a": 1}], dtype=object),
                                                   allow_pickle=True), "not a plain .npy"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_bad_folder_is_refused_naming_the_file(model_copy, case):
    name, corrupt, expected = CORRUPTIONS[case]
    corrupt(model_copy)
    with pytest.raises(UserError) as err:
        Decoder.from_pretrained(model_copy)
    message = str(err.value)
    assert str(model_copy / name) in message and expected in message and "fix:" in message


class _Payload:
    """Unpickling this creates ``path``: proof that a file was (not) unpickled."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickles_in_the_folder_are_never_loaded(model_copy, tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Payload(marker))
    pickle.loads(payload).close()  # the payload is live ...
    assert marker.exists()
    marker.unlink()
    for name in ("decoder.pkl", "pytorch_model.bin", "student.pt"):
        (model_copy / name).write_bytes(payload)
    with pytest.warns(UserWarning, match="never loaded"):
        decoder = Decoder.from_pretrained(model_copy)
    bold, _ = _test_run(decoder)
    assert len(decoder.decode(bold, onsets=[40.0, 44.0])) == 2
    assert not marker.exists()  # ... and was never run


def test_another_llm_is_refused(tiny_run, tmp_path):
    from fmri2text.models.zoo import tiny_llm

    other = tmp_path / "other-llm"
    model, tok = tiny_llm(hidden=64, layers=2, seed=1)
    model.save_pretrained(other)
    tok.save_pretrained(other)
    decoder = Decoder.from_pretrained(tiny_run[2], llm=other)
    bold, _ = _test_run(decoder)
    with pytest.raises(UserError, match="not the one the decoder was trained with"):
        decoder.decode(bold, onsets=[40.0])
    unchecked = Decoder.from_pretrained(tiny_run[2], llm=other, check_llm=False)
    assert len(unchecked.decode(bold, onsets=[40.0])) == 1


def test_bad_inputs_are_refused(tiny_run, tmp_path):
    decoder = Decoder.from_pretrained(tiny_run[2])
    bold, events = _test_run(decoder)
    with pytest.raises(UserError, match="events= .* or onsets="):
        decoder.decode(bold)
    with pytest.raises(UserError, match="events= .* or onsets="):
        decoder.decode(bold, events=events, onsets=[40.0])
    with pytest.raises(UserError, match="needs volumes") as err:
        decoder.decode(bold, onsets=[40.0, 10_000.0])
    assert bold in str(err.value)
    img = nib.load(bold)
    smaller = nib.Nifti1Image(np.asanyarray(img.dataobj)[:-1], img.affine, img.header)
    with pytest.raises(UserError, match="another grid"):
        decoder.decode(smaller, onsets=[40.0])
    with pytest.raises(UserError, match="TR mismatch"):
        decoder.decode(bold, onsets=[40.0], tr=1.5)
    with pytest.raises(UserError, match="not found"):
        Decoder.from_pretrained(tmp_path / "nowhere")


def test_import_stays_cheap_and_exports_decoder():
    code = ("import sys, fmri2text; assert 'torch' not in sys.modules, 'torch imported'; "
            "from fmri2text import Decoder; from fmri2text.api import Decoder as D; "
            "assert Decoder is D")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
