"""Single-trial betas (LSA / LSS): a GLM alternative to the per-trial window average.

Selected with ``data.response`` (``window`` | ``lsa`` | ``lss``) and computed inside
:func:`fmri2text.data.fmri._process_run`, on the run's (T, V) series after drift/confound
removal and z-scoring, so each BOLD file is still read once.

Each trial is a boxcar at (onset, duration) convolved with the HRF (``data.hrf_model``) by
nilearn's :func:`~nilearn.glm.first_level.compute_regressor`, sampled at volume times
``i * TR`` (the same convention as :func:`fmri2text.data.bids.window_start`).

- **LSA** (least squares all): one design holding every trial's regressor plus the nuisance
  basis (constant, trend, cosine drifts, confounds); one OLS fit for all voxels at once.
- **LSS** (least squares separate; Mumford et al. 2012, NeuroImage 59:2636): for each trial
  a design [that trial, the sum of all other trials, nuisance]; only the first row of each
  design's pseudo-inverse is needed, so the n_trials rows are stacked into one (n, T)
  matrix and applied to all voxels in a single product: O(n_trials * T * V).
"""

from __future__ import annotations

import numpy as np

from fmri2text.errors import UserError

RESPONSES = ("window", "lsa", "lss")
HRF_MODELS = ("glover", "spm")  # single-column nilearn HRFs (one beta per trial)


def check_response(response: str, aggregate: str, hrf_model: str) -> None:
    """Validate ``data.response`` / ``data.aggregate`` / ``data.hrf_model`` together.

    Raises
    ------
    UserError
        Unknown response or HRF model, or ``aggregate=stack`` with betas (no window axis).
    """
    if response not in RESPONSES:
        raise UserError(f"data.response={response!r} is not known",
                        fix="data.response must be one of " + ", ".join(RESPONSES))
    if response == "window":
        return
    if aggregate != "mean":
        raise UserError(
            f"data.aggregate={aggregate!r} does not go with data.response={response!r}: "
            "single-trial betas have no window axis",
            fix="set data.aggregate=mean with data.response=lsa|lss, or data.response=window "
                "for stacked windows")
    if hrf_model not in HRF_MODELS:
        raise UserError(f"data.hrf_model={hrf_model!r} is not known",
                        fix="data.hrf_model must be one of " + ", ".join(HRF_MODELS))


def trial_regressors(onsets: np.ndarray, durations: np.ndarray, n_volumes: int, tr: float,
                     hrf_model: str = "glover", oversampling: int = 50) -> np.ndarray:
    """(n_volumes, n_trials) HRF-convolved boxcars, one column per trial.

    Parameters
    ----------
    onsets, durations:
        (n_trials,) seconds from scan start (volume ``i`` is acquired at ``i * tr``).
    n_volumes, tr:
        Length of the run and its repetition time in seconds.
    hrf_model:
        A nilearn single-column HRF: ``glover`` or ``spm``.
    oversampling:
        Temporal oversampling of nilearn's convolution.
    """
    from nilearn.glm.first_level import compute_regressor  # here: importing it takes ~2 s

    frame_times = np.arange(n_volumes, dtype=np.float64) * tr  # (T,)
    cols = []
    for onset, duration in zip(np.asarray(onsets, float), np.asarray(durations, float)):
        condition = np.array([[onset], [duration], [1.0]])  # (3, 1): onset, duration, amplitude
        reg, _ = compute_regressor(condition, hrf_model, frame_times, oversampling=oversampling)
        cols.append(reg[:, 0])
    return np.stack(cols, axis=1)  # (T, n_trials)


def _check_design(design: np.ndarray, what: str, path: str) -> None:
    """Raise when the (T, K) design is rank deficient (betas would not be identifiable)."""
    rank = np.linalg.matrix_rank(design)
    if rank < design.shape[1]:
        raise UserError(
            f"the {what} design is rank deficient ({rank} < {design.shape[1]} columns for "
            f"{design.shape[0]} volumes): trials too many or too close for this run",
            path=path, fix="use data.response=lss (or window), or lower data.high_pass")


def lsa_betas(x: np.ndarray, regressors: np.ndarray, nuisance: np.ndarray,
              path: str = "") -> np.ndarray:
    """Least-squares-all betas: one OLS fit of every trial at once, all voxels together.

    Parameters
    ----------
    x:
        (T, V) float32 series of the run (already cleaned; nuisance is refitted anyway).
    regressors:
        (T, n_trials) trial regressors of :func:`trial_regressors`.
    nuisance:
        (T, K) drift/confound basis.
    path:
        File named in errors.

    Returns
    -------
    np.ndarray
        (n_trials, V) float32 betas.
    """
    n = regressors.shape[1]
    design = np.concatenate([regressors, nuisance], axis=1)  # (T, n + K)
    _check_design(design, "LSA", path)
    pinv = np.linalg.pinv(design)[:n].astype(np.float32)  # (n, T): the trial rows only
    return pinv @ x  # (n, V)


def lss_betas(x: np.ndarray, regressors: np.ndarray, nuisance: np.ndarray,
              path: str = "") -> np.ndarray:
    """Least-squares-separate betas (Mumford 2012), all voxels at once.

    For trial i the design is [r_i, sum_{j != i} r_j, nuisance] (T, 2 + K); row 0 of its
    pseudo-inverse maps the series to trial i's beta. The n rows form one (n, T) matrix.

    Parameters
    ----------
    x, regressors, nuisance, path:
        As in :func:`lsa_betas`.

    Returns
    -------
    np.ndarray
        (n_trials, V) float32 betas.
    """
    n = regressors.shape[1]
    total = regressors.sum(axis=1)  # (T,)
    rows = np.empty((n, regressors.shape[0]), np.float64)  # (n, T)
    for i in range(n):
        cols = [regressors[:, i:i + 1]]
        if n > 1:  # a single trial has no "others" regressor
            cols.append((total - regressors[:, i])[:, None])
        design = np.concatenate(cols + [nuisance], axis=1)  # (T, 2 + K)
        _check_design(design, f"LSS (trial {i})", path)
        rows[i] = np.linalg.pinv(design)[0]
    return rows.astype(np.float32) @ x  # (n, V)


def single_trial_betas(x: np.ndarray, onsets: np.ndarray, durations: np.ndarray, tr: float,
                       nuisance: np.ndarray, method: str, hrf_model: str = "glover",
                       path: str = "") -> np.ndarray:
    """(n_trials, V) LSA or LSS betas of one run's (T, V) series.

    Parameters
    ----------
    x:
        (T, V) float32 cleaned series.
    onsets, durations:
        (n_trials,) seconds from scan start.
    tr:
        Repetition time in seconds.
    nuisance:
        (T, K) drift/confound basis (any basis of the same column space).
    method:
        ``lsa`` or ``lss``.
    hrf_model:
        ``glover`` or ``spm``.
    path:
        The events (or BOLD) file named in errors.
    """
    n_t = x.shape[0]
    onsets = np.asarray(onsets, np.float64)
    last = (n_t - 1) * tr
    outside = (onsets < 0) | (onsets > last)
    if outside.any():
        i = int(np.argmax(outside))
        raise UserError(f"trial at onset {onsets[i]:.2f} s is outside the run (0..{last:g} s, "
                        f"{n_t} volumes of {tr:g} s)", path=path, fix="check the onsets")
    regressors = trial_regressors(onsets, durations, n_t, tr, hrf_model)  # (T, n)
    fit = {"lsa": lsa_betas, "lss": lss_betas}[method]
    return fit(x, regressors, np.asarray(nuisance, np.float64), path)
