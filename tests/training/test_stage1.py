"""Stage I recipe: retrieval improves, artifacts, data batching, and exact resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fmri2text.config import load_config
from fmri2text.data.datasets import (ClipTargets, ResumableBatchSampler, VolumeCrop,
                                     synthetic_experiment)
from fmri2text.errors import UserError
from fmri2text.training.stage1 import load_student, train_stage1

SCRIPT = Path(__file__).with_name("_train_script.py")
TINY = ["encoder.preset=tiny", "encoder.projector_dim=32", "encoder.projector_heads=2",
        "stage1.batch_size=8", "stage1.lr=3e-3", "stage1.log_every=5", "stage1.checkpoint_every=20"]


@pytest.fixture(scope="module")
def experiment():
    return synthetic_experiment(grid=(10, 10, 8))


def test_stage1_beats_chance_and_untrained_and_writes_its_files(tmp_path, experiment):
    windows, targets = experiment
    # the deep path alone (no linear path, which is already at the ridge optimum at step 0)
    cfg = load_config(None, TINY + ["stage1.steps=60", "encoder.linear_rank=0"])
    m = train_stage1(None, tmp_path, cfg, windows=windows, targets=targets, progress=False,
                     log=lambda s: None)
    before, after = m["retrieval_before"], m["retrieval_after"]
    assert after["top1"] > 2 * after["chance_top1"]
    assert after["top1"] > before["top1"] + 0.2
    stage = tmp_path / "stage1"
    rows = [json.loads(line) for line in (stage / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(60))
    assert {"step", "clip", "l2", "l1", "l2l1", "total", "lr"} <= set(rows[0])
    assert np.mean([r["total"] for r in rows[-10:]]) < np.mean([r["total"] for r in rows[:10]])
    assert json.loads((stage / "metrics.json").read_text())["retrieval_after"]["top1"] == after["top1"]
    assert (stage / "checkpoints").is_dir() and any((stage / "tensorboard").iterdir())
    student, info = load_student(stage / "student.safetensors")
    saved = load_file(str(stage / "student.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in student.state_dict().items())
    assert info["input_shape"] == (2, 8, 8, 6)
    # the kept weights are those of the best validation step (training subjects' held-back
    # stimulus groups), scored before training and every val_every steps
    val = m["validation"]
    assert m["n_val_trials"] > 0 and [s for s, _ in val["scores"]] == [0, 25, 50, 60]
    assert val["best_score"] == min(v for _, v in val["scores"])
    best = load_file(str(stage / "best.safetensors"))
    assert all(torch.equal(saved[f"{k[len('student.'):]}"], v) for k, v in best.items()
               if k.startswith("student."))


def test_linear_path_starts_at_the_closed_form_ridge(experiment):
    from fmri2text.config import BaselineConfig
    from fmri2text.data.datasets import TrialWindows, split_rows
    from fmri2text.evaluation.baselines import RidgeBaseline
    from fmri2text.models.alignment import MIN_TRIALS, coral_shift
    from fmri2text.training.stage1 import build_student, fit_linear_path

    windows, targets = experiment
    cfg = load_config(None, TINY)
    train = TrialWindows(windows, split_rows(windows.trials, "train"))
    test = TrialWindows(windows, split_rows(windows.trials, "test"))
    x_train = targets.tokens_of(train.clips)  # (n, L, d)
    fit = fit_linear_path(cfg, train, x_train)
    ridge, offsets = fit.ridge, fit.offsets
    student, _ = build_student(cfg, train.input_shape, targets.d_llm, targets.n_tokens, None, fit)
    student.eval()
    with torch.no_grad():
        z = student(test.fmri(np.arange(len(test))))  # (n_test, L, d)
    # the untrained student is exactly the ridge map (its deep path starts at zero) ...
    exact = RidgeBaseline(cfg.baseline).fit(windows.data[train.rows].mean(1), ["."] * len(train),
                                            Y=x_train.reshape(len(train), -1).numpy(),
                                            groups=train.subjects)
    want = exact.predict_embeddings(windows.data[test.rows].mean(1)).reshape(z.shape)
    np.testing.assert_allclose(z.numpy(), want, rtol=1e-4, atol=1e-4)
    # ... and each training trial's offset turns its in-sample prediction into the one of the
    # map fitted without its subject, read through its components aligned to the fold's
    # training components by the subject's own trials (models/alignment.py)
    np.testing.assert_allclose(student.linear.component_std.numpy(), ridge.component_std_, rtol=1e-6)
    feats = windows.data[train.rows].mean(1)
    held = train.subjects == train.subjects[0]
    fold = RidgeBaseline(BaselineConfig(alphas=[ridge.alpha_], cv_folds=1)).fit(
        feats[~held], ["."] * int((~held).sum()), Y=x_train[~held].reshape(int((~held).sum()), -1).numpy())
    h = fold.components(feats[held])
    assert int(held.sum()) >= MIN_TRIALS
    aligned = (h + coral_shift(h, h, fold.component_std_, cfg.encoder.align_shrinkage)) @ fold.weight_ \
        + fold.intercept_
    got = ridge.predict_embeddings(feats[held]) + offsets[held].reshape(int(held.sum()), -1).numpy()
    np.testing.assert_allclose(got, aligned, rtol=1e-4, atol=1e-4)
    assert offsets.abs().max() > 0 and np.abs(aligned - fold.predict_embeddings(feats[held])).max() > 1e-3
    plain = fit_linear_path(load_config(None, [*TINY, "encoder.align_subjects=false"]), train, x_train)
    got = ridge.predict_embeddings(feats[held]) + plain.offsets[held].reshape(int(held.sum()), -1).numpy()
    np.testing.assert_allclose(got, fold.predict_embeddings(feats[held]), rtol=1e-4, atol=1e-4)
    # at gain g the offsets scale too: a fitted-on trial gets the held-out map's prediction
    # with its deviation from the mean token times g, as a new subject's prediction is
    student.linear.gain.fill_(1.75)
    with torch.no_grad():
        z_held = student.cross_fitted(student(train.fmri(np.flatnonzero(held))), offsets[held])
    bias = student.linear.bias.detach().numpy()
    want = bias + 1.75 * (aligned - bias)
    np.testing.assert_allclose(z_held.reshape(int(held.sum()), -1).numpy(), want, rtol=1e-4, atol=1e-4)
    assert student.cross_fitted(z_held, None) is z_held


def test_semantic_head_is_the_sentence_ridge_through_the_same_directions(experiment, tmp_path):
    """With the trials' answers, the linear path also holds the ridge map to their sentence
    embeddings (the ridge peer's target) through its own principal directions; its offsets
    give each trial the prediction of the map fitted without its subject; it survives the
    student file; without answers (or encoder.semantic_head=false) there is none."""
    from fmri2text.config import BaselineConfig
    from fmri2text.data.datasets import TrialWindows, split_rows
    from fmri2text.evaluation.baselines import RidgeBaseline
    from fmri2text.models.alignment import coral_shift
    from fmri2text.training.stage1 import build_student, fit_linear_path, save_student

    windows, targets = experiment
    cfg = load_config(None, TINY)
    train = TrialWindows(windows, split_rows(windows.trials, "train"))
    test = TrialWindows(windows, split_rows(windows.trials, "test"))
    texts = targets.text_of(train.clips)[1]
    fit = fit_linear_path(cfg, train, targets.tokens_of(train.clips), texts)
    student, spec = build_student(cfg, train.input_shape, targets.d_llm, targets.n_tokens, None, fit)
    feats = windows.data[train.rows].mean(1)
    e = fit.semantic.embed(texts)
    exact = RidgeBaseline(cfg.baseline).fit(feats, texts, Y=e, groups=train.subjects,
                                            max_rank=cfg.encoder.linear_rank)
    # the head predicts directions from its intercept, the training answers' mean embedding
    np.testing.assert_allclose(student.linear.semantic_centre.numpy(), e.mean(0), atol=1e-5)
    want = exact.predict_embeddings(windows.data[test.rows].mean(1)) - e.mean(0)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    with torch.no_grad():
        got = student.linear.semantic(test.fmri(np.arange(len(test))))
    np.testing.assert_allclose(got.numpy(), want, atol=1e-4)
    held = train.subjects == train.subjects[0]
    fold = RidgeBaseline(BaselineConfig(alphas=[exact.alpha_], cv_folds=1)).fit(
        feats[~held], ["."] * int((~held).sum()), Y=e[~held], max_rank=cfg.encoder.linear_rank)
    h = fold.components(feats[held])  # aligned by the subject's own trials, as the tokens are
    h = h + coral_shift(h, h, fold.component_std_, cfg.encoder.align_shrinkage)
    np.testing.assert_allclose(exact.predict_embeddings(feats[held]) + fit.semantic_offsets[held].numpy(),
                               h @ fold.weight_ + fold.intercept_, atol=1e-4)
    save_student(student, tmp_path / "s.safetensors", spec=spec, input_shape=train.input_shape,
                 d_llm=targets.d_llm, n_tokens=targets.n_tokens, enc=cfg.encoder)
    again, _ = load_student(tmp_path / "s.safetensors")
    assert torch.equal(again.linear.sem_weight, student.linear.sem_weight)
    assert fit_linear_path(cfg, train, targets.tokens_of(train.clips)).semantic is None
    off = load_config(None, TINY + ["encoder.semantic_head=false"])
    assert fit_linear_path(off, train, targets.tokens_of(train.clips), texts).semantic is None


@pytest.mark.parametrize("train_linear", [False, True])
def test_stage1_keeps_the_closed_form_linear_path_unless_told(tmp_path, experiment, train_linear):
    """The linear path's weights stay the fitted ridge map through Stage I (AdamW moved each
    of them by ~lr per step and the loss diverged from step 1); stage1.train_linear=true
    trains them. The last step is kept (val_every=0), so the check sees trained weights."""
    from fmri2text.data.datasets import TrialWindows, split_rows
    from fmri2text.training.stage1 import fit_linear_path

    windows, targets = experiment
    cfg = load_config(None, TINY + ["stage1.steps=4", "stage1.val_every=0",
                                    f"stage1.train_linear={str(train_linear).lower()}"])
    train_stage1(None, tmp_path, cfg, windows=windows, targets=targets, progress=False,
                 log=lambda s: None)
    student, _ = load_student(tmp_path / "stage1" / "student.safetensors")
    from fmri2text.data.splits import validation_rows

    fit, val = validation_rows(windows.trials, split_rows(windows.trials, "train"),
                               cfg.split.val_fraction, cfg.split.seed)
    labelled = TrialWindows(windows, np.r_[fit, val])
    ridge = fit_linear_path(cfg, labelled, targets.tokens_of(labelled.clips)).ridge
    fitted = torch.as_tensor(ridge.weight_, dtype=torch.float32)
    assert torch.equal(student.linear.weight, fitted) != train_linear
    assert student.projector.out.weight.abs().max() > 0  # the deep path did train (from 0)


def test_frozen_encoder_base_does_not_change(tmp_path, experiment):
    windows, targets = experiment
    cfg = load_config(None, TINY + ["stage1.steps=3"])
    train_stage1(None, tmp_path, cfg, windows=windows, targets=targets, progress=False, log=lambda s: None)
    student, _ = load_student(tmp_path / "stage1" / "student.safetensors")
    torch.manual_seed(0)  # the same seed rebuilds the same initial encoder base
    from fmri2text.training.stage1 import build_student

    fresh, _ = build_student(cfg, (2, 8, 8, 6), 32, 4, None)
    for (name, p), q in zip(student.encoder.named_parameters(), fresh.encoder.parameters()):
        if not p.requires_grad:
            assert torch.equal(p, q), name
    assert any(not torch.equal(a, b) for a, b in zip(student.projector.parameters(),
                                                     fresh.projector.parameters()))


def test_missing_teacher_annotation_is_a_user_error(tmp_path, experiment):
    windows, targets = experiment
    partial = ClipTargets(targets.clips[:3], targets.tokens[:3], targets.instructions[:3],
                          targets.answers[:3])
    with pytest.raises(UserError, match="no teacher annotation"):
        train_stage1(None, tmp_path, load_config(None, TINY + ["stage1.steps=2"]),
                     windows=windows, targets=partial, progress=False, log=lambda s: None)
    with pytest.raises(UserError, match="no teacher annotations found"):
        ClipTargets.from_store(tmp_path / "nowhere")


def test_volume_crop_puts_features_back_in_place():
    grid = (5, 6, 4)
    mask = np.zeros(grid, bool)
    mask[1:4, 2:5, 1:3] = True
    mask[2, 3, 1] = False
    crop = VolumeCrop(mask.ravel(), grid)
    assert crop.shape == (3, 3, 2)
    values = torch.arange(1, mask.sum() + 1, dtype=torch.float32)[None, None]  # (1, 1, F)
    vol = crop(values)[0, 0]
    full = np.zeros(grid, np.float32)
    full[mask] = values.numpy().ravel()
    assert np.array_equal(vol.numpy(), full[1:4, 2:5, 1:3])


def test_batch_sampler_resumes_and_shards_exactly():
    one = ResumableBatchSampler(10, 4, seed=3, start=0, stop=7)
    resumed = ResumableBatchSampler(10, 4, seed=3, start=4, stop=7)
    assert list(one)[4:] == list(resumed)
    r0 = ResumableBatchSampler(10, 2, seed=3, rank=0, world=2)
    r1 = ResumableBatchSampler(10, 2, seed=3, rank=1, world=2)
    for k in range(5):
        assert r0.batch(k) + r1.batch(k) == one.batch(k)
    assert sorted(sum((one.batch(k) for k in range(5)), [])[:10]) == list(range(10))  # an epoch


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STEPS = "40"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    full = tmp_path_factory.mktemp("full")
    subprocess.run([sys.executable, str(SCRIPT), str(full), STEPS, "8"], check=True, env=ENV,
                   capture_output=True, timeout=300)
    return full


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, sig, uninterrupted):
    env, steps, full = ENV, STEPS, uninterrupted
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(cut), steps, "8"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = cut / "stage1" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpts.is_dir() and any(p.name.startswith("step-")
                                                                 for p in ckpts.iterdir())):
        time.sleep(0.02)
    proc.send_signal(sig)
    rc = proc.wait(timeout=120)
    assert not (cut / "stage1" / "student.safetensors").exists(), "run finished before the kill"
    assert rc == (-9 if sig == signal.SIGKILL else 0)
    subprocess.run([sys.executable, str(SCRIPT), str(cut), steps, "8", "resume"], check=True,
                   env=env, capture_output=True, timeout=300)
    a = load_file(str(full / "stage1" / "student.safetensors"))
    b = load_file(str(cut / "stage1" / "student.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (cut / "stage1" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(int(STEPS)))
