"""``fmri2text demo`` / ``run`` end to end on a tiny config, step skipping, and the leakage guard.

The end-to-end run uses every real component (simulator, teacher with its frozen
EfficientNet backbone and MiniLM-initialised Q-Formers, MBM, Stage I, Stage II with DANCE,
batched greedy decoding, ridge baseline, scorer, report) with a tiny random LLaMA in place
of SmolLM2, whose 135 M parameters alone would take minutes per step on 2 shared cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from fmri2text import machine
from fmri2text.config import PipelineConfig, load_config
from fmri2text.errors import UserError
from fmri2text.pipeline import STEP_SECTIONS, Step, StepRunner
from fmri2text.steps import check_annotation_store, check_training_inputs

#: the tiny config of tests, CI and the examples (every real component at toy sizes)
TINY = ["--config", str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")]
METRIC_KEYS = {"bertscore_p", "bertscore_r", "bertscore_f1", "bleu1", "bleu2", "rougeL_p",
               "rougeL_r", "rougeL_f"}
FIELDS = {"subject", "run", "onset", "stim", "instruction", "video2text", "fmri2text", "truth"}
STEP_NAMES = list(STEP_SECTIONS)


def cli(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "fmri2text.cli", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_llm_dir(tmp_path_factory) -> Path:
    """A random 2-layer LLaMA with a chat template, saved as a local transformers folder."""
    from fmri2text.models.zoo import tiny_llm

    folder = tmp_path_factory.mktemp("tiny-llm")
    model, tok = tiny_llm(hidden=64, layers=2)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_llm_dir):
    """``fmri2text demo`` on the tiny config; ``args`` is the same run as ``run --simulate``."""
    out = tmp_path_factory.mktemp("run")
    first = cli("demo", "--out", out, *TINY, f"teacher.llm={tiny_llm_dir}")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    args = ["run", "--simulate", "--out", out, *TINY, f"teacher.llm={tiny_llm_dir}"]
    return out, args, first


def test_run_writes_the_contract(finished_run):
    out, _, r = finished_run
    for i, name in enumerate(STEP_NAMES, 1):
        assert f"[{i}/{len(STEP_NAMES)}] {name}: done in" in r.stdout, name
    m = json.loads((out / "metrics.json").read_text())
    assert {"scorer", "subjects", "total", "controls", "p_values", "n_test_trials",
            "vs_truth"} <= set(m)
    assert m["reference"] == "video2text" and m["decoder"] == "fmri2text"
    assert list(m["subjects"]) == ["sub-03"]
    assert METRIC_KEYS | {"top1", "top5", "twoway"} <= set(m["total"])
    assert set(m["controls"]) == {"shuffled", "prompt_only", "ridge", "ridge_tokens"}
    for ctl in m["controls"].values():
        assert METRIC_KEYS <= set(ctl)
    for peer in ("ridge", "ridge_tokens"):  # identification scored for both linear peers
        assert {"top1", "top5", "twoway"} <= set(m["controls"][peer])
        assert {"top1", "twoway"} <= set(m["controls_subjects"][peer]["sub-03"])
    p_sub = m["permutation"]["subjects"]["sub-03"]  # per-subject p, printed in the table
    assert f"{p_sub['bertscore_f1']:.4f}" in r.stdout
    assert {"bertscore_f1", "bleu1"} <= set(m["p_values"])
    assert METRIC_KEYS <= set(m["vs_truth"]["total"])
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == m["n_test_trials"] > 0
    rows = [json.loads(line) for line in lines]
    assert all(FIELDS <= set(row) for row in rows)
    assert all(isinstance(row["video2text"], str) and row["video2text"] for row in rows)
    assert all(row["truth"] for row in rows)
    for name in ("shuffled", "prompt_only", "ridge", "ridge_tokens"):
        ctl = (out / "controls" / f"{name}.jsonl").read_text().splitlines()
        assert [json.loads(c)["stim"] for c in ctl] == [row["stim"] for row in rows]
    html = (out / "report.html").read_text()
    assert "sub-03" in html and "<script>alert" not in html
    assert (out / "brain_map.nii.gz").is_file() and (out / "mbm" / "mbm.safetensors").is_file()
    steps = json.loads((out / "steps.json").read_text())
    assert set(steps) == set(STEP_NAMES)
    assert all(s["machine"] == machine.describe() for s in steps.values())  # where each ran
    # what demo prints: the table, then where the metrics, report and decoder are
    table = r.stdout[r.stdout.index("fMRI2Text vs video2text"):]
    assert "sub-03" in table and "Total" in table and "shuffled" in table
    flat = r.stdout.replace("\n", "")
    for line in (f"metrics: {out / 'metrics.json'}", f"report: {out / 'report.html'}",
                 f"decoder: {out / 'model'}"):
        assert line in flat, line
    assert (out / "model" / "config.json").is_file()
    # the tiny config's random LLM makes a degenerate teacher: flagged everywhere, not hidden
    health = m["teacher_health"]
    assert health["degenerate"] and health["overridden"] and health["problems"]
    assert json.loads((out / "steps.json").read_text())["annotate"]["health"] == health
    assert "Degenerate teacher" in html and "distinct answer" in html
    assert m["truth_source"] == "captions" and "Truth" in html
    # how the test trials were decoded, and that the choice was made on validation trials
    assert m["decoding"]["chosen_on_validation"] and m["decoding"]["text"] in html
    assert "validation trials" in m["decoding"]["text"]
    out_health = m["output_health"]["fmri2text"]["subjects"]["sub-03"]
    assert out_health["n"] == len(rows) and 0 <= out_health["prior_share"] <= 1
    assert set(m["output_health"]) == {"fmri2text", "shuffled", "ridge", "ridge_tokens"}


def test_degenerate_teacher_stops_the_run_without_the_override(finished_run):
    """Without pipeline.allow_degenerate_teacher the run stops at annotate (exit 2) with a
    message naming the distinct-answer count; the stored annotations are kept for a rerun."""
    out, args, _ = finished_run
    stored = sorted(p.name for p in (out / "annotations").iterdir())
    try:
        r = cli(*args, "pipeline.allow_degenerate_teacher=false")
        assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
        assert "distinct answer(s) for" in r.stderr and "teacher_health.json" in r.stderr
        assert "allow_degenerate_teacher=true" in r.stderr
        assert sorted(p.name for p in (out / "annotations").iterdir()) == stored
    finally:  # the module's run as it was (annotate reruns from its store, the rest is skipped)
        r = cli(*args)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "stage1: unchanged, skipped" in r.stdout


def test_test_clips_never_in_training_annotations(finished_run):
    out, _, _ = finished_run
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    test_stims = {row["stim"] for row in rows}
    (train_index,) = (out / "annotations").glob("annotations-*.json")
    train_clips = {r["clip"] for r in json.loads(train_index.read_text())["rows"]}
    (eval_index,) = (out / "eval_annotations").glob("annotations-*.json")
    eval_clips = {r["clip"] for r in json.loads(eval_index.read_text())["rows"]}
    assert eval_clips == test_stims and not train_clips & test_stims


def test_second_run_skips_every_step(finished_run):
    """demo is ``run --simulate``: run on the demo's folder finds every step up to date."""
    out, args, _ = finished_run
    before = {p: p.stat().st_mtime_ns for p in (out / "metrics.json", out / "report.html",
                                                 out / "stage2" / "student.safetensors")}
    r = cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "nothing to do: every step is up to date" in r.stdout
    assert r.stdout.count("unchanged, skipped") == len(STEP_NAMES)
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_decoding_is_chosen_on_validation_trials_and_applied(tmp_path, finished_run):
    """By default decode chooses one answer or MBR (each beta) on the training subjects'
    validation trials; the choice decodes the test trials and goes into the exported model.
    A rerun with the choice off and the chosen setting fixed gives the same predictions and
    redecodes only (decode settings keep the student); a beta of 0 is refused before writing."""
    import shutil

    out, args, _ = finished_run
    decode = json.loads((out / "decode.json").read_text())
    choice = decode["decoding_choice"]
    assert choice["n_validation_trials"] >= 2
    settings = [(s["deep_gain"], s["samples"], s["mbr_beta"], s["rerank"])
                for s in choice["settings"]]
    # the grid is the config defaults (the tiny student has a linear path and a semantic head),
    # with configs/tiny.yaml's deep gains: the whole student and the linear path alone
    d = PipelineConfig()
    assert settings == [x for g in [1.0, 0.0] for x in
                        [(g, 0, 1.0, 0.0)] + [(g, 32, b, r) for b in d.decode_choose_betas
                                              for r in d.decode_choose_reranks]]
    assert 0.0 not in d.decode_choose_reranks and d.decode_choose_deep_gains == [1.0]
    best = max(choice["settings"], key=lambda s: s["mean"])
    for s in choice["settings"]:
        assert s["mean"] == pytest.approx((s["bertscore_f1"] + s["bleu1"]) / 2)
    want = {k: best[k] for k in ("samples", "mbr_beta", "rerank", "deep_gain")}
    assert choice["chosen"] == want
    assert {k: ({**decode["generation"], "deep_gain": decode["deep_gain"]})[k] for k in want} == want
    model = json.loads((out / "model" / "config.json").read_text())["generation"]
    assert {k: model[k] for k in want} == want

    run = tmp_path / "run"
    shutil.copytree(out, run)
    args = [str(run) if a == str(out) or a == out else a for a in args]
    student = (run / "stage2" / "student.safetensors").read_bytes()
    before = (run / "predictions.jsonl").read_bytes()
    bad = cli(*args, "pipeline.decode_samples=4", "pipeline.decode_mbr_beta=0")
    assert bad.returncode == 2 and "pipeline.decode_mbr_beta=0" in bad.stderr
    bad = cli(*args, "pipeline.decode_choose_betas=[]")
    assert bad.returncode == 2 and "pipeline.decode_choose_betas" in bad.stderr
    bad = cli(*args, "pipeline.decode_choose_deep_gains=[-1.0]")
    assert bad.returncode == 2 and "pipeline.decode_choose_deep_gains" in bad.stderr
    assert (run / "predictions.jsonl").read_bytes() == before
    fixed = ["pipeline.decode_choose=false", f"pipeline.decode_samples={best['samples']}",
             f"pipeline.decode_mbr_beta={best['mbr_beta']}", f"pipeline.decode_rerank={best['rerank']}",
             f"pipeline.decode_deep_gain={best['deep_gain']}"]
    r = cli(*args, *fixed)
    assert r.returncode == 0, r.stderr[-3000:]
    for step in ("prepare", "teacher", "annotate", "stage1", "stage2"):
        assert f"{step}: unchanged, skipped" in r.stdout, step
    assert "decode: done in" in r.stdout
    assert (run / "stage2" / "student.safetensors").read_bytes() == student
    assert json.loads((run / "decode.json").read_text())["decoding_choice"] is None
    assert (run / "predictions.jsonl").read_bytes() == before
    r = cli(*args, "pipeline.decode_choose=false", "pipeline.decode_samples=4",
            "pipeline.decode_mbr_beta=1.5")
    assert r.returncode == 0, r.stderr[-3000:]
    generation = json.loads((run / "decode.json").read_text())["generation"]
    assert (generation["samples"], generation["mbr_beta"]) == (4, 1.5)
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert rows and all(isinstance(r["fmri2text"], str) for r in rows)


def test_held_out_subjects_are_aligned_by_their_adapt_trials(finished_run):
    """Each held-out subject's linear-path components are aligned to the training subjects by
    its unlabelled adapt trials (models/alignment.py); decode.json and the report say so, and
    a shrinkage outside [0, 1] is refused before anything is written."""
    from fmri2text.config import EncoderConfig

    out, args, _ = finished_run
    decode = json.loads((out / "decode.json").read_text())
    trials = pd.read_csv(out / "prepared" / "trials.tsv", sep="\t", dtype={"subject": str})
    adapt = trials.loc[trials["split"] == "adapt", "subject"].value_counts()
    assert len(adapt) and decode["subject_alignment"] == {
        "method": "coral", "shrinkage": EncoderConfig().align_shrinkage,
        "unlabelled_trials": {s: int(n) for s, n in sorted(adapt.items())}}
    assert "aligned to the training subjects by its unlabelled adapt" in (out / "report.html").read_text()
    before = (out / "predictions.jsonl").read_bytes()
    bad = cli(*args, "encoder.align_shrinkage=1.5")
    assert bad.returncode == 2 and "encoder.align_shrinkage" in bad.stderr
    assert (out / "predictions.jsonl").read_bytes() == before


def test_decode_records_what_the_deep_path_adds(finished_run):
    """decode.json says how much of the test trials' tokens the deep path makes and how much of
    that varies from trial to trial (models/student.deep_path_share), and the report says it;
    with the deep path off there is nothing to say."""
    out, _, _ = finished_run
    decode = json.loads((out / "decode.json").read_text())
    share = decode["deep_path"]
    if decode["deep_gain"] == 0:
        assert share is None
        return
    assert share["trials"] == decode["n_test_trials"] and share["tokens_rms"] > 0
    assert share["deep_rms"] ** 2 == pytest.approx(share["deep_shared_rms"] ** 2
                                                   + share["deep_trial_rms"] ** 2, rel=1e-6)
    assert share["trial_ratio"] == pytest.approx(share["deep_trial_rms"] / share["linear_trial_rms"])
    report = (out / "report.html").read_text()
    assert f"{100 * share['trial_ratio']:.0f} % as large as that of the linear path" in report


def test_decode_with_a_student_of_another_config(finished_run, tiny_llm_dir):
    out, _, _ = finished_run
    before = (out / "predictions.jsonl").read_bytes()
    r = cli("decode", "--bids", out / "bids", "--run", out, *TINY, f"teacher.llm={tiny_llm_dir}",
            "encoder.projector_dim=64")
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout
    assert r.stderr.count("error:") == 1 and "fix:" in r.stderr
    assert str(out / "stage2" / "student.safetensors") in r.stderr
    assert "encoder.projector_dim" in r.stderr
    assert (out / "predictions.jsonl").read_bytes() == before


def test_evaluate_predictions_missing_fields(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "predictions.jsonl").write_text(json.dumps({"subject": "sub-01", "fmri2text": "x"}) + "\n")
    r = cli("evaluate", "--run", run)
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout
    assert str(run / "predictions.jsonl") in r.stderr and "video2text" in r.stderr
    assert sorted(p.name for p in run.iterdir()) == ["predictions.jsonl"]


# ----------------------------------------------------------------------------- step skipping


def _fake_plan(run: Path, calls: list[str]) -> list[Step]:
    """The real step names and order, each writing one new file per call, each reading the
    previous step's output."""
    plan = []
    for k, name in enumerate(STEP_NAMES):
        def fn(name=name):
            calls.append(name)
            n = len(list(run.glob(f"{name}.*.log")))
            (run / f"{name}.{n}.log").write_text("")
            (run / f"{name}.out").write_text(f"{name} call {n}")
        plan.append(Step(name, fn, [f"{name}.out"], STEP_NAMES[k - 1:k]))
    return plan


def _run_plan(run: Path, overrides: list[str], dataset: str = "d1") -> list[str]:
    calls: list[str] = []
    runner = StepRunner(run, load_config(None, overrides), dataset)
    for i, step in enumerate(_fake_plan(run, calls), 1):
        runner.run_step(step, i, len(STEP_NAMES))
    return calls


def test_runner_skips_unchanged_and_reruns_downstream(tmp_path):
    assert _run_plan(tmp_path, []) == STEP_NAMES
    assert _run_plan(tmp_path, []) == []
    after_stage2 = STEP_NAMES[STEP_NAMES.index("stage2"):]
    assert _run_plan(tmp_path, ["stage2.steps=7"]) == after_stage2
    assert _run_plan(tmp_path, ["stage2.steps=7"]) == []
    # an evaluation key reruns evaluate and what reads its output only
    assert _run_plan(tmp_path, ["stage2.steps=7", "evaluation.n_permutations=10"]) == \
        ["evaluate", "report", "export"]
    # a deleted output reruns its step (and, its new output, those after it); a changed
    # dataset reruns every step reading it
    (tmp_path / "decode.out").unlink()
    assert _run_plan(tmp_path, ["stage2.steps=7", "evaluation.n_permutations=10"]) == \
        ["decode", "evaluate", "report", "export"]
    assert _run_plan(tmp_path, ["stage2.steps=7", "evaluation.n_permutations=10"],
                     dataset="d2")[0] == "prepare"


# ----------------------------------------------------------------------------- leakage guard


def _trials() -> pd.DataFrame:
    return pd.DataFrame({
        "stim_file": ["a/v_a_id_AAAAAAAAAAA_start_1.0_label_1.mp4",
                      "a/v_a_id_BBBBBBBBBBB_start_2.0_label_1.mp4",
                      "a/v_a_id_CCCCCCCCCCC_start_3.0_label_1.mp4"],
        "group": ["AAAAAAAAAAA", "BBBBBBBBBBB", "CCCCCCCCCCC"],
        "split": ["train", "adapt", "test"], "subject": ["01", "02", "02"]})


def test_leakage_guard_refuses_test_stimuli_and_groups(tmp_path):
    trials = _trials()
    check_training_inputs(trials, ["AAAAAAAAAAA.mp4", "ZZZZZZZZZZZ.mp4"], "teacher web clips")
    with pytest.raises(UserError, match="teacher web clips.*CCCCCCCCCCC"):
        check_training_inputs(trials, ["CCCCCCCCCCC.mp4"], "teacher web clips", path=tmp_path)
    with pytest.raises(UserError, match="test stimulus"):
        check_training_inputs(trials, [trials["stim_file"].iat[2]], "training clips")
    store = tmp_path / "annotations"
    store.mkdir()
    (store / "annotations-abc.json").write_text(json.dumps(
        {"rows": [{"clip": trials["stim_file"].iat[2], "instruction": "x", "answer": "y", "row": 0}]}))
    with pytest.raises(UserError, match="training annotations") as err:
        check_annotation_store(tmp_path, load_config(None, []), trials)
    assert "annotations-abc.json" in str(err.value)
    with pytest.raises(UserError, match="evaluation-only"):
        check_annotation_store(tmp_path, load_config(None, ["stage1.annotations=eval_annotations"]),
                               trials)


def test_external_teacher_keeps_its_evaluation_in_the_run(tmp_path, monkeypatch):
    import json as _json

    from fmri2text import steps
    from fmri2text.config import load_config

    teacher = tmp_path / "teachers" / "t1"
    teacher.mkdir(parents=True)
    (teacher / "teacher.safetensors").write_bytes(b"weights")
    (teacher / "teacher_eval.json").write_text(_json.dumps({"video2text": {"bleu1": 50.0}}))
    monkeypatch.setattr(steps, "experiment_trials", lambda bids, cfg: None)
    cfg = load_config(None, [f"pipeline.teacher_checkpoint={teacher / 'teacher.safetensors'}"])
    run = tmp_path / "run"
    record = steps.run_teacher_fit(tmp_path / "bids", run, cfg, log=lambda m: None)
    assert record["external"] is True
    copied = list(run.rglob("teacher_eval.json"))
    assert len(copied) == 1 and _json.loads(copied[0].read_text())["video2text"]["bleu1"] == 50.0


def _annotation_store(folder: Path) -> tuple[dict, dict]:
    """(the JSON index, {tensor name: tensor}) of a run's training annotation store."""
    from safetensors.torch import load_file

    (index,) = folder.glob("annotations-*.json")
    return json.loads(index.read_text()), load_file(index.with_suffix(".safetensors"))


def test_sigkill_during_annotate_then_rerun(tmp_path, finished_run, tiny_llm_dir):
    """Killed at random points, ``annotate`` reruns to the store an uninterrupted run wrote."""
    import random
    import shutil
    import signal
    import time

    out, _, _ = finished_run
    args = [*TINY, f"teacher.llm={tiny_llm_dir}"]
    ref_index, ref_tensors = _annotation_store(out / "annotations")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t = time.monotonic()
    assert cli("--version").returncode == 0
    startup = time.monotonic() - t
    for seed in range(2):
        run = tmp_path / f"run{seed}"
        shutil.copytree(out / "teacher", run / "teacher")
        cmd = [sys.executable, "-m", "fmri2text.cli", "annotate", "--bids", str(out / "bids"),
               "--run", str(run), *map(str, args)]
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        time.sleep(startup + random.Random(seed).uniform(0.5, 4.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert not list(run.rglob("*.tmp")), "a half-written file was left behind"
        r = cli("annotate", "--bids", out / "bids", "--run", run, *args)
        assert r.returncode == 0, r.stderr[-2000:]
        index, tensors = _annotation_store(run / "annotations")
        assert index["rows"] == ref_index["rows"]
        assert tensors.keys() == ref_tensors.keys()
        # the answers are identical; video tokens match up to float summation order (a rerun
        # batches only the clips the killed run had not stored)
        # (observed up to 1.04e-3 of the largest value: the tiny Q-Former's layer norm amplifies
        # batch-order noise; a token stored in the wrong row would differ by O(1))
        diffs = {k: float((tensors[k].float() - ref_tensors[k].float()).abs().max()
                          / ref_tensors[k].float().abs().max().clamp(min=1e-6)) for k in tensors}
        assert max(diffs.values()) < 1e-2, diffs


def test_annotate_refuses_a_corrupt_clip(tmp_path, finished_run, tiny_llm_dir):
    """A training clip that is not a video: exit 2, one message naming the file."""
    import shutil

    out, _, _ = finished_run
    bids = tmp_path / "bids"
    shutil.copytree(out / "bids", bids)
    trials = pd.read_csv(out / "prepared" / "trials.tsv", sep="\t") \
        if (out / "prepared" / "trials.tsv").is_file() else None
    clips = sorted((bids / "stimuli").rglob("*.mp4"))
    if trials is not None:
        train = set(trials.loc[trials["split"] == "train", "stim_file"])
        clips = [c for c in clips if str(c.relative_to(bids / "stimuli")) in train]
    broken = clips[0]
    broken.write_bytes(b"not an mp4 at all")
    run = tmp_path / "run"
    shutil.copytree(out / "teacher", run / "teacher")
    r = cli("annotate", "--bids", bids, "--run", run, *TINY, f"teacher.llm={tiny_llm_dir}")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr and broken.name in r.stderr.replace("\n", "")
    assert "fix:" in r.stderr


# ----------------------------------------------------------------------------- HAD's real layout


def _had_tree(src: Path, root: Path, uniform: bool) -> int:
    """HAD's real top-level files and the run-01 events and sidecars of its four subjects
    (../shared/data/had-metadata), with tiny NIfTIs and a 2 s mp4 for every clip they show:
    flat grey (``uniform``) or a colour pattern moving its own way. Returns the clip count."""
    import numpy as np

    from fmri2text.simulate.stimuli import encode_mp4

    from .data.conftest import write_bold

    root.mkdir(parents=True)
    for f in src.glob("*.json"):
        (root / f.name).write_bytes(f.read_bytes())
    clips: set[str] = set()
    for k, events in enumerate(sorted(src.glob("sub-*/ses-*/func/*_run-01_events.tsv"))):
        func = root / events.relative_to(src).parent
        # 156 volumes of 2 s, as HAD's runs; then HAD's own sidecar replaces the written one
        write_bold(func / events.name.replace("_events.tsv", "_bold.nii.gz"), 156, 2.0,
                   shape=(8, 8, 6), seed=k)
        for f in (events, events.with_name(events.name.replace("_events.tsv", "_bold.json"))):
            (func / f.name).write_bytes(f.read_bytes())
        clips |= set(pd.read_csv(events, sep="\t")["stim_file"].astype(str))
    for i, name in enumerate(sorted(clips)):
        frames = np.full((8, 32, 32, 3), 128, np.uint8)
        if not uniform:  # a random 8 x 8 colour pattern of its own, rolling its own way
            r = np.random.default_rng(i)
            pattern = r.integers(0, 256, (8, 8, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
            (dy, dx) = r.integers(-2, 3, 2)
            frames[:] = [np.roll(pattern, (dy * t, dx * t), (0, 1)) for t in range(8)]
        path = root / "stimuli" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_mp4(frames, 4))
    return len(clips)


def test_had_layout_end_to_end(shared_data, tmp_path, finished_run, tiny_llm_dir):
    """HAD's real events and sidecars (optional reference data), tiny images, the tiny
    world's teacher checkpoint: uniform clips stop the run at annotate (exit 2, the
    distinct-answer count named, nothing trained); clips that differ run to the end, with
    the class name as the truth (HAD has no captions)."""
    import yaml

    out, _, _ = finished_run
    teacher = tmp_path / "teacher.safetensors"  # a copy: the module's run stays as it is
    for name in (teacher.name, "teacher_eval.json"):  # the checkpoint and its own scores
        (tmp_path / name).write_bytes((out / "teacher" / name).read_bytes())
    tiny = yaml.safe_load(Path(TINY[1]).read_text())
    tiny.pop("simulate")
    had = yaml.safe_load((Path(TINY[1]).parent / "had.yaml").read_text())
    for section, values in had.items():
        tiny[section] = {**tiny.get(section, {}), **values}
    tiny["split"]["n_heldout"] = 1
    tiny["pipeline"]["allow_degenerate_teacher"] = False
    config = tmp_path / "had-tiny.yaml"
    config.write_text(yaml.safe_dump(tiny))
    args = ["--config", config, f"teacher.llm={tiny_llm_dir}",
            f"pipeline.teacher_checkpoint={teacher}"]

    grey = tmp_path / "grey"
    assert _had_tree(shared_data / "had-metadata", grey, uniform=True) == 240
    r = cli("run", "--bids", grey, "--out", tmp_path / "grey-run", *args)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "distinct answer(s) for" in r.stderr and "nearly identical" in r.stderr
    assert "annotate: running" in r.stdout and "stage1: running" not in r.stdout
    health = json.loads((tmp_path / "grey-run" / "teacher_health.json").read_text())
    assert health["degenerate"] and health["training"]["token_cosine"] > 0.995
    assert not (tmp_path / "grey-run" / "stage1").exists()

    moving = tmp_path / "moving"
    _had_tree(shared_data / "had-metadata", moving, uniform=False)
    run = tmp_path / "moving-run"
    # the tiny random LLM's teacher is degenerate whatever the clips (configs/tiny.yaml):
    # go on knowingly; its tokens still tell these clips apart more than the grey ones
    r = cli("run", "--bids", moving, "--out", run, *args, "pipeline.allow_degenerate_teacher=true")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    moved = json.loads((run / "teacher_health.json").read_text())
    assert moved["training"]["token_cosine"] < health["training"]["token_cosine"] - 1e-4
    m = json.loads((run / "metrics.json").read_text())
    assert list(m["subjects"]) == ["sub-24"] and m["n_test_trials"] > 0
    assert m["truth_source"] == "class names (template '{class_name}')"  # HAD has no captions
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    listed = (shared_data / "had-metadata" / "stimuli-list.txt").read_text().splitlines()
    names = {line.split("/")[0] for line in listed}
    assert all(row["truth"] and row["truth"][0] in names for row in rows)  # HAD's class names
    assert {"bertscore_f1", "bleu1"} <= set(m["vs_truth"]["subjects"]["sub-24"])
    assert m["teacher_health"]["degenerate"] and m["teacher_health"]["overridden"]
    assert "Degenerate teacher" in (run / "report.html").read_text()
