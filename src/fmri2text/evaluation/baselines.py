"""The ridge baseline (DESIGN §5): fMRI → sentence embedding of the clip's text → nearest clip.

Ridge regression from per-trial fMRI features to the sentence embedding (all-MiniLM-L6-v2)
of the clip's reference text; the decoded answer is the reference text of the training clip
whose embedding is nearest (cosine) to the prediction. Cross-subject: fit on the training
subjects' trials, apply to the held-out subjects'. Features are standardised with
statistics of the training data only (fit/transform); the ridge penalty is chosen from
``cfg.alphas`` by K-fold cross-validation on the training data (grouped, e.g. by subject,
when groups are given), all folds solved in closed form from one Gram matrix.
"""

from __future__ import annotations

import numpy as np

from fmri2text.config import BaselineConfig
from fmri2text.errors import UserError


def _folds(n: int, k: int, groups: np.ndarray | None, seed: int = 0) -> list[np.ndarray]:
    """Validation index sets of k folds (whole groups per fold when ``groups`` is given)."""
    rng = np.random.default_rng(seed)
    if groups is not None:
        labels = np.unique(groups)
        if len(labels) >= 2:
            order = rng.permutation(labels)
            return [np.flatnonzero(np.isin(groups, part))
                    for part in np.array_split(order, min(k, len(labels)))]
    return [np.sort(part) for part in np.array_split(rng.permutation(n), min(k, n))]


class RidgeBaseline:
    """Ridge from fMRI features to sentence embeddings, decoded by nearest training clip.

    Parameters
    ----------
    cfg:
        ``alphas`` (penalties to choose from) and ``cv_folds`` (K of the K-fold search;
        <= 1 or a single alpha: no search).
    embedder:
        Object with ``encode(texts) -> (n, d)``; default the embedded MiniLM
        (:class:`fmri2text.models.sentence.SentenceEmbedder`).
    """

    def __init__(self, cfg: BaselineConfig, embedder=None):
        if not cfg.alphas or min(cfg.alphas) <= 0:
            raise UserError(f"baseline.alphas={cfg.alphas!r} must be a non-empty list of positive "
                            "numbers", fix="e.g. baseline.alphas=[1e2,1e3,1e4]")
        self.cfg = cfg
        self._embedder = embedder

    # ---------------------------------------------------------------- embeddings

    def embed(self, texts: list[str]) -> np.ndarray:
        """(n, d) unit-norm sentence embeddings of ``texts``."""
        if self._embedder is None:
            from fmri2text.models.sentence import SentenceEmbedder

            self._embedder = SentenceEmbedder()
        return np.asarray(self._embedder.encode(list(texts)), dtype=np.float64)

    # ---------------------------------------------------------------- fit / predict

    @staticmethod
    def _check_X(X: np.ndarray, what: str) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2:
            raise ValueError(f"{what} must be (n_trials, n_features), got shape {X.shape}")
        if not np.isfinite(X).all():
            bad = int((~np.isfinite(X)).any(0).sum())
            raise UserError(f"{what} contains NaN or infinite values in {bad} feature(s)",
                            fix="mask or drop bad voxels before fitting the ridge baseline")
        return X

    def fit(self, X: np.ndarray, texts: list[str], Y: np.ndarray | None = None,
            groups: np.ndarray | None = None, max_rank: int = 0) -> "RidgeBaseline":
        """Fit the standardiser and the ridge map on training trials.

        Parameters
        ----------
        X:
            (n, p) fMRI features of the training trials.
        texts:
            (n,) reference text of each trial's clip; the decoding candidates.
        Y:
            (n, d) targets; default the sentence embeddings of ``texts``.
        groups:
            (n,) labels (e.g. subjects) kept whole within CV folds, so the penalty is
            chosen for generalisation to new subjects.
        max_rank:
            Keep only the ``max_rank`` leading principal directions of the standardised
            features (0: all, the exact ridge solution). The map is stored factored as
            ``basis_`` (p, r) and ``weight_`` (r, d), so a wide target (the teacher's L x d
            tokens) never forms a (p, d) matrix.
        """
        X = self._check_X(X, "training fMRI features")
        texts = [str(t) for t in texts]
        if len(texts) != len(X):
            raise ValueError(f"{len(X)} trials but {len(texts)} texts")
        if len(X) < 2:
            raise UserError("the ridge baseline needs at least 2 training trials",
                            fix="add training subjects or runs")
        Y = self.embed(texts) if Y is None else np.asarray(Y, dtype=np.float64)  # (n, d)
        # standardisation fitted on training data only
        self.mean_ = X.mean(0)  # (p,)
        scale = X.std(0)
        self.scale_ = np.where(scale > 0, scale, 1.0)  # constant features stay 0
        Xs = (X - self.mean_) / self.scale_  # (n, p), column means exactly 0
        K = Xs @ Xs.T  # (n, n) Gram matrix: every fold below is solved from it

        alphas = np.asarray(sorted(self.cfg.alphas), dtype=np.float64)
        self.cv_errors_ = None
        if len(alphas) > 1 and self.cfg.cv_folds > 1:
            errors = np.zeros(len(alphas))
            for val in _folds(len(X), self.cfg.cv_folds, None if groups is None else np.asarray(groups)):
                train = np.setdiff1d(np.arange(len(X)), val)
                if len(train) < 2 or len(val) == 0:
                    continue
                errors += self._fold_errors(K, Y, train, val, alphas)
            self.cv_errors_ = dict(zip(alphas.tolist(), errors.tolist()))
            self.alpha_ = float(alphas[int(np.argmin(errors))])
        else:
            self.alpha_ = float(alphas[0])

        lam, Q = np.linalg.eigh(K)  # K = Q diag(lam) Q^T (Xs is centred: K is too)
        # Xs = U S V^T: keep the components with S > 0, largest first (at most max_rank)
        keep = np.flatnonzero(lam > max(lam.max(), 0.0) * 1e-10)[::-1]
        if max_rank > 0:
            keep = keep[:max_rank]
        S = np.sqrt(lam[keep])  # (r,)
        U = Q[:, keep]  # (n, r)
        self.intercept_ = Y.mean(0)  # (d,)
        # coef = Xs^T Q diag(1/(lam+alpha)) Q^T Yc = V diag(S/(S^2+alpha)) U^T Yc, V = Xs^T U / S
        self.basis_ = Xs.T @ (U / S)  # (p, r) orthonormal feature directions
        # the training trials' components Xs @ basis_ = U S: centred, uncorrelated, with these
        # standard deviations (what a new subject's are aligned to: models/alignment.py)
        self.component_std_ = S / np.sqrt(max(len(X) - 1, 1))  # (r,)
        self.weight_ = (S / (lam[keep] + self.alpha_))[:, None] * (U.T @ (Y - self.intercept_))  # (r, d)
        # decoding candidates: each distinct training text once
        first: dict[str, int] = {}
        for i, t in enumerate(texts):
            first.setdefault(t, i)
        self.candidates_ = list(first)
        cand = Y[[first[t] for t in self.candidates_]]  # (c, d)
        self.candidate_emb_ = cand / np.maximum(np.linalg.norm(cand, axis=1, keepdims=True), 1e-12)
        return self

    @staticmethod
    def _fold_errors(K: np.ndarray, Y: np.ndarray, train: np.ndarray, val: np.ndarray,
                     alphas: np.ndarray) -> np.ndarray:
        """Summed squared validation error of each alpha; features centred on the fold's train part."""
        Ktt = K[np.ix_(train, train)]  # (t, t)
        Kvt = K[np.ix_(val, train)]  # (v, t)
        row_t = Ktt.mean(1)
        grand = row_t.mean()
        Ktt = Ktt - row_t[:, None] - row_t[None, :] + grand  # centred by the train mean
        Kvt = Kvt - Kvt.mean(1)[:, None] - row_t[None, :] + grand
        lam, Q = np.linalg.eigh(Ktt)
        lam = np.clip(lam, 0, None)
        y_mean = Y[train].mean(0)
        QtY = Q.T @ (Y[train] - y_mean)  # (t, d)
        KQ = Kvt @ Q  # (v, t)
        out = np.empty(len(alphas))
        for a, alpha in enumerate(alphas):
            pred = KQ @ (QtY / (lam + alpha)[:, None]) + y_mean  # (v, d)
            out[a] = ((pred - Y[val]) ** 2).sum()
        return out

    @property
    def coef_(self) -> np.ndarray:
        """(p, d) primal weights (formed on demand: ``basis_ @ weight_``)."""
        self._check_fitted()
        return self.basis_ @ self.weight_

    def _check_fitted(self) -> None:
        if not hasattr(self, "weight_"):
            raise RuntimeError("RidgeBaseline is not fitted: call fit() first")

    def predict_embeddings(self, X: np.ndarray) -> np.ndarray:
        """(n, d) predicted sentence embeddings of new trials (e.g. held-out subjects)."""
        return self.components(X) @ self.weight_ + self.intercept_

    def components(self, X: np.ndarray) -> np.ndarray:
        """(n, r) standardised features of new trials in the principal directions ``basis_``."""
        self._check_fitted()
        X = self._check_X(X, "fMRI features")
        if X.shape[1] != len(self.mean_):
            raise UserError(f"fMRI features have {X.shape[1]} columns but the ridge baseline was "
                            f"fitted on {len(self.mean_)}",
                            fix="extract features with the same mask and window as training")
        return ((X - self.mean_) / self.scale_) @ self.basis_

    def decode(self, X: np.ndarray) -> list[str]:
        """The reference text of the nearest (cosine) training clip, per trial."""
        pred = self.predict_embeddings(X)  # (n, d)
        pred = pred / np.maximum(np.linalg.norm(pred, axis=1, keepdims=True), 1e-12)
        best = np.argmax(pred @ self.candidate_emb_.T, axis=1)  # (n,)
        return [self.candidates_[i] for i in best]
