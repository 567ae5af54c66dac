"""The ridge baseline and the sentence embedder it regresses onto."""

import numpy as np
import pytest

from fmri2text.config import BaselineConfig
from fmri2text.errors import UserError
from fmri2text.evaluation.baselines import RidgeBaseline
from fmri2text.evaluation.metrics import retrieval_metrics


def synthetic(n_clips=30, subjects=6, p=120, d=16, noise=1.0, seed=0):
    """Each subject sees every clip; fMRI = subject-specific linear map of the clip embedding."""
    rng = np.random.default_rng(seed)
    Y = rng.normal(size=(n_clips, d))
    Y /= np.linalg.norm(Y, axis=1, keepdims=True)
    shared = rng.normal(size=(d, p))
    X, clips, subj = [], [], []
    for s in range(subjects):
        A = shared + 0.3 * rng.normal(size=(d, p))  # individual deformation
        X.append(Y @ A * 3 + noise * rng.normal(size=(n_clips, p)) + rng.normal(size=p))
        clips += list(range(n_clips))
        subj += [s] * n_clips
    return np.concatenate(X), np.array(clips), np.array(subj), Y


def test_ridge_recovers_linear_map_across_subjects():
    X, clips, subj, Y = synthetic()
    texts = np.array([f"caption {c}" for c in range(Y.shape[0])])
    train, test = subj < 4, subj >= 4  # cross-subject: held-out subjects 4 and 5
    ridge = RidgeBaseline(BaselineConfig(alphas=[1e-1, 1e1, 1e3, 1e5], cv_folds=4))
    ridge.fit(X[train], list(texts[clips[train]]), Y=Y[clips[train]], groups=subj[train])
    assert ridge.alpha_ in (1e-1, 1e1, 1e3, 1e5) and len(ridge.cv_errors_) == 4
    decoded = ridge.decode(X[test])
    acc = np.mean(np.array(decoded) == texts[clips[test]])
    assert acc > 0.5  # chance is 1/30
    r = retrieval_metrics(ridge.predict_embeddings(X[test]), Y, clips[test])
    assert r["top1"] > 10 * r["top1_chance"] and r["twoway"] > 90


def test_standardisation_uses_training_statistics_only():
    X, clips, subj, Y = synthetic(seed=1)
    ridge = RidgeBaseline(BaselineConfig(alphas=[10.0], cv_folds=1))
    ridge.fit(X[subj < 4], [str(c) for c in clips[subj < 4]], Y=Y[clips[subj < 4]])
    np.testing.assert_allclose(ridge.mean_, X[subj < 4].mean(0))
    one = ridge.predict_embeddings(X[subj >= 4][:1])  # a single trial: no test statistics used
    np.testing.assert_allclose(one, ridge.predict_embeddings(X[subj >= 4])[:1])


def test_ridge_rejects_bad_input():
    with pytest.raises(UserError, match="alphas"):
        RidgeBaseline(BaselineConfig(alphas=[-1.0]))
    X = np.ones((4, 3))
    X[0, 1] = np.nan
    with pytest.raises(UserError, match="NaN"):
        RidgeBaseline(BaselineConfig()).fit(X, list("abcd"), Y=np.eye(4))
    ridge = RidgeBaseline(BaselineConfig(alphas=[1.0])).fit(np.eye(4), list("abcd"), Y=np.eye(4))
    with pytest.raises(UserError, match="columns"):
        ridge.predict_embeddings(np.ones((2, 5)))


def test_sentence_embeddings_are_unit_norm_and_semantic():
    from fmri2text.models.sentence import SentenceEmbedder

    texts = ["A red ball bounces on the grass.", "A red ball is bouncing on grass.",
             "The stock market fell sharply today.", "A red ball bounces on the grass."]
    E = SentenceEmbedder().encode(texts)
    assert E.shape == (4, 384) and E.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(E, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(E[0], E[3], atol=1e-6)
    assert E[0] @ E[1] > E[0] @ E[2] + 0.3


def test_sentence_embeddings_are_the_same_bytes_in_every_process():
    """Texts of one length are batched in text order, not in the set's order (which follows
    each process's string hashing): processes with other hash seeds give the same bytes
    (the texts: equal lengths, other word-piece counts, so the batches' padding can differ).
    With the set's order the batches, and so the padded shapes and the sums, differed, and
    the teacher's contrastive targets with them."""
    from tests.hash_seeds import outputs_under_hash_seeds

    code = ("import sys, hashlib; from fmri2text.models.sentence import SentenceEmbedder; "
            "texts = [f'A {c} {s}.' for c in ('red', 'qzx', 'blue', 'xqzj', 'pink', 'zzqv', "
            "'grey', 'kqxw', 'gold', 'vvxq') for s in ('ball', 'star', 'xqzb')]; "
            "e = SentenceEmbedder(batch_size=3).encode(texts); "
            "sys.stdout.write(hashlib.sha256(e.tobytes()).hexdigest())")
    assert len(outputs_under_hash_seeds(code)) == 1
