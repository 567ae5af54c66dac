"""A new subject's brain aligned to the training subjects' in the linear path (CORAL).

The linear path (:class:`fmri2text.models.student.LinearPath`) reads a window through the
leading principal directions of the *training* subjects' responses. Over the training trials
these components are uncorrelated, centred, with standard deviations
:attr:`~fmri2text.models.student.LinearPath.component_std`. A held-out subject's responses
project onto the same directions with other variances and correlations: its maps are warped
and partly its own, its noise is its own (simulated worlds: the held-out components' variances
are 0.1–0.9 of the training ones). The maps fitted on the training components then read a
new brain through a distorted lens.

CORAL (Sun, Feng & Saenko, AAAI 2016: "Return of frustratingly easy domain adaptation")
re-colours the new subject's components with the training ones' second-order statistics:
whiten them with their own covariance, estimated from the subject's *unlabelled* adapt trials
(what the paper lets a held-out subject contribute), and scale each by the training standard
deviation. The covariance of a few hundred trials in hundreds of dimensions is singular, so it
is shrunk toward its diagonal (``shrinkage``, Ledoit–Wolf-style).

Because the linear path is linear in its components, the aligned components act as per-trial
offsets of its tokens and of its semantic head (:func:`alignment_offsets`) — the same form as
Stage I's cross-fitting offsets, which hold each training subject aligned the same way
(:func:`fmri2text.training.stage1.crossfit_offsets`), so what Stage II trains and the
decoding choice validates on is what a held-out subject's trials look like at test.
"""

from __future__ import annotations

import numpy as np
import torch

MIN_TRIALS = 10  # fewer unlabelled trials than this: the subject is left unaligned


def coral_map(h: np.ndarray, target_std: np.ndarray, shrinkage: float
              ) -> tuple[np.ndarray, np.ndarray]:
    """(mean (r,), matrix (r, r)) mapping a subject's components ``h`` (n, r) onto components
    centred at 0 with covariance diag(``target_std``²): ``(h - mean) @ matrix``.

    The subject's covariance C is shrunk toward its diagonal, (1 − s) C + s diag(C), then
    matrix = C^-1/2 diag(target_std).
    """
    h = np.asarray(h, dtype=np.float64)
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage {shrinkage} must be in [0, 1]")
    mean = h.mean(axis=0)  # (r,)
    c = np.cov(h, rowvar=False).reshape(h.shape[1], h.shape[1])  # (r, r)
    c = (1.0 - shrinkage) * c + shrinkage * np.diag(np.diag(c))
    w, v = np.linalg.eigh(c)
    w = np.clip(w, max(w.max(), 0.0) * 1e-10 + 1e-12, None)
    inv_half = (v / np.sqrt(w)) @ v.T  # (r, r) C^-1/2
    return mean, inv_half * np.asarray(target_std, dtype=np.float64)[None, :]


def coral_shift(h: np.ndarray, adapt: np.ndarray, target_std: np.ndarray,
                shrinkage: float) -> np.ndarray:
    """(n, r) what CORAL adds to components ``h`` (n, r) of one subject whose unlabelled
    trials have components ``adapt`` (m, r); zeros when ``adapt`` has fewer than
    :data:`MIN_TRIALS` rows or the target statistics are unknown (all zero)."""
    h = np.asarray(h, dtype=np.float64)
    target_std = np.asarray(target_std, dtype=np.float64)
    if len(adapt) < MIN_TRIALS or not target_std.any():
        return np.zeros_like(h)
    mean, matrix = coral_map(adapt, target_std, shrinkage)
    return (h - mean) @ matrix - h


def alignment_offsets(linear, h: torch.Tensor, adapt: torch.Tensor, shrinkage: float
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One subject's alignment as offsets of ``linear``'s outputs (a
    :class:`~fmri2text.models.student.LinearPath`): tokens (n, L, d) at gain 1 (add them
    with :meth:`~fmri2text.models.student.Student.cross_fitted`, which applies the path's
    gain) and the semantic head's pre-normalisation prediction (n, d_s), or None without
    one. ``h`` (n, r): the trials' components; ``adapt`` (m, r): the subject's unlabelled
    trials' components."""
    delta = torch.as_tensor(coral_shift(h.double().numpy(), adapt.double().numpy(),
                                        linear.component_std.double().numpy(), shrinkage),
                            dtype=torch.float32)  # (n, r)
    tokens = (delta @ linear.weight.detach().float()).view(-1, linear.n_tokens, linear.dim)
    semantic = delta @ linear.sem_weight.float() if linear.semantic_dim else None
    return tokens, semantic


def subject_offsets(linear, h: torch.Tensor, subjects: np.ndarray, h_adapt: torch.Tensor,
                    adapt_subjects: np.ndarray, shrinkage: float
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`alignment_offsets` of trials from several subjects, each aligned by its own
    unlabelled trials: ``h`` (n, r) with ``subjects`` (n,), ``h_adapt`` (m, r) with
    ``adapt_subjects`` (m,). Returns tokens (n, L, d) and semantic (n, d_s) or None."""
    subjects, adapt_subjects = np.asarray(subjects), np.asarray(adapt_subjects)
    tokens = torch.zeros(len(h), linear.n_tokens, linear.dim)
    semantic = torch.zeros(len(h), linear.semantic_dim) if linear.semantic_dim else None
    for s in np.unique(subjects):
        rows = np.flatnonzero(subjects == s)
        t, m = alignment_offsets(linear, h[rows], h_adapt[np.flatnonzero(adapt_subjects == s)],
                                 shrinkage)
        tokens[rows] = t
        if semantic is not None:
            semantic[rows] = m
    return tokens, semantic
