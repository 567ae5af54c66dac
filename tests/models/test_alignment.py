"""CORAL alignment of a new subject's linear-path components (models/alignment.py)."""

import numpy as np
import pytest
import torch

from fmri2text.config import BaselineConfig
from fmri2text.evaluation.baselines import RidgeBaseline
from fmri2text.models.alignment import (MIN_TRIALS, alignment_offsets, coral_map, coral_shift,
                                        subject_offsets)
from fmri2text.models.student import LinearPath


def _correlated(n=400, r=6, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(r, r))
    return rng.normal(size=(n, r)) @ mix + rng.normal(size=r), rng


def test_coral_map_recolours_to_the_target_covariance():
    h, rng = _correlated()
    target = rng.uniform(0.5, 3.0, size=h.shape[1])
    mean, matrix = coral_map(h, target, shrinkage=0.0)
    out = (h - mean) @ matrix
    np.testing.assert_allclose(out.mean(0), 0, atol=1e-10)
    np.testing.assert_allclose(np.cov(out, rowvar=False), np.diag(target ** 2), atol=1e-8)
    # shrinkage 1: each component scaled alone (the covariance's diagonal)
    _, diag = coral_map(h, target, shrinkage=1.0)
    np.testing.assert_allclose(diag, np.diag(target / h.std(0, ddof=1)), atol=1e-10)
    with pytest.raises(ValueError, match="shrinkage"):
        coral_map(h, target, shrinkage=1.5)


def test_coral_shift_needs_trials_and_target_statistics():
    h, rng = _correlated(n=50)
    target = np.ones(h.shape[1])
    assert not coral_shift(h, h[:MIN_TRIALS - 1], target, 0.5).any()
    assert not coral_shift(h, h, np.zeros_like(target), 0.5).any()  # a student saved before
    shift = coral_shift(h, h, target, 0.5)
    mean, matrix = coral_map(h, target, 0.5)
    np.testing.assert_allclose(h + shift, (h - mean) @ matrix, atol=1e-10)


def _path(rank=5, n_tokens=3, dim=4, sem=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    path = LinearPath(torch.arange(10), rank, n_tokens, dim, semantic_dim=sem)
    with torch.no_grad():
        path.weight.copy_(torch.randn(rank, n_tokens * dim, generator=g))
        path.sem_weight.copy_(torch.randn(rank, sem, generator=g))
        path.component_std.copy_(torch.rand(rank, generator=g) + 0.5)
    return path


def test_offsets_are_the_paths_outputs_at_aligned_components():
    path = _path()
    h = torch.randn(40, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    tokens, sem = alignment_offsets(path, h[:8], h, shrinkage=0.3)
    mean, matrix = coral_map(h.double().numpy(), path.component_std.double().numpy(), 0.3)
    aligned = torch.as_tensor((h[:8].double().numpy() - mean) @ matrix, dtype=torch.float32)
    w = path.weight.detach()
    torch.testing.assert_close(tokens, ((aligned - h[:8]) @ w).view(8, 3, 4), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sem, (aligned - h[:8]) @ path.sem_weight, atol=1e-4, rtol=1e-4)
    # several subjects: each aligned by its own unlabelled trials
    subjects = np.array(["a"] * 4 + ["b"] * 4)
    adapt = torch.cat([h[:20], 3 * h[20:] + 1])
    adapt_subjects = np.array(["a"] * 20 + ["b"] * 20)
    t2, s2 = subject_offsets(path, h[:8], subjects, adapt, adapt_subjects, 0.3)
    for s, rows, ad in (("a", slice(0, 4), adapt[:20]), ("b", slice(4, 8), adapt[20:])):
        t1, s1 = alignment_offsets(path, h[rows], ad, 0.3)
        torch.testing.assert_close(t2[rows], t1)
        torch.testing.assert_close(s2[rows], s1)


def test_ridge_component_std_is_the_training_components():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 30)) @ rng.normal(size=(30, 30))
    ridge = RidgeBaseline(BaselineConfig(alphas=[10.0], cv_folds=1)).fit(
        X, ["."] * 60, Y=rng.normal(size=(60, 4)), max_rank=8)
    h = ridge.components(X)
    np.testing.assert_allclose(h.mean(0), 0, atol=1e-8)
    np.testing.assert_allclose(np.cov(h, rowvar=False), np.diag(ridge.component_std_ ** 2), atol=1e-8)


def test_alignment_decodes_a_distorted_new_subject_better():
    """Training subjects and a new one share a linear code of the clip; the new subject's
    features are seen through its own gains and mixing (as a warped, partly individual brain
    is): decoding its trials by nearest clip improves once its components are aligned by its
    unlabelled trials."""
    gains = []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        n_clips, d, p = 40, 12, 80
        Y = rng.normal(size=(n_clips, d))
        code = rng.normal(size=(d, p))
        train = [Y @ code + 0.5 * rng.normal(size=(n_clips, p)) for _ in range(4)]
        distort = np.diag(rng.lognormal(0.0, 0.8, size=p)) + 0.3 * rng.normal(size=(p, p))
        new = (Y @ code + 0.5 * rng.normal(size=(n_clips, p))) @ distort
        unlabelled = (Y[rng.integers(0, n_clips, 60)] @ code
                      + 0.5 * rng.normal(size=(60, p))) @ distort
        ridge = RidgeBaseline(BaselineConfig(alphas=[10.0], cv_folds=1)).fit(
            np.concatenate(train), ["."] * 4 * n_clips, Y=np.tile(Y, (4, 1)), max_rank=12)
        h, h_un = ridge.components(new), ridge.components(unlabelled)

        def accuracy(hh):
            pred = hh @ ridge.weight_ + ridge.intercept_
            sim = (pred / np.linalg.norm(pred, axis=1, keepdims=True)) @ \
                (Y / np.linalg.norm(Y, axis=1, keepdims=True)).T
            return float(np.mean(sim.argmax(1) == np.arange(n_clips)))

        aligned = h + coral_shift(h, h_un, ridge.component_std_, 0.3)
        gains.append(accuracy(aligned) - accuracy(h))
    assert min(gains) > 0 and np.mean(gains) >= 0.06, gains  # 2-9 of 40 clips each
