"""Per-trial fMRI responses: one vector per trial, from each run read exactly once.

Per run (NIfTI volume or CIFTI dtseries):
1. read the whole file once (``.nii.gz`` has no random access);
2. per-voxel statistics over time: brain = any non-zero value over time (all grayordinates for CIFTI);
   bad = NaN/inf anywhere or constant over the run (masked; fatal above
   ``cfg.max_bad_voxel_fraction`` of the brain);
3. regress out a constant, a linear trend, cosine drifts below ``cfg.high_pass`` Hz and any
   fMRIPrep confound columns ``cfg.confounds`` (one least-squares projection);
4. z-score each voxel within the run (``cfg.standardize``);
5. per trial, the mean of ``cfg.window`` volumes starting at the volume nearest to
   onset + ``cfg.hrf_delay`` (rounded to the nearest TR, not interpolated; see
   :func:`fmri2text.data.bids.window_start`); or, with ``cfg.response`` = ``lsa``/``lss``,
   single-trial GLM betas (:mod:`fmri2text.data.betas`).

The features kept are the voxels good in every run (a common mask across subjects and
runs, so all runs must share one grid: MNI space or fsLR grayordinates). Feature order is
the C order of the 3-D mask (nilearn's ``apply_mask``/``unmask`` convention).

Speed (steps 2-5 take about 1.5x the inflate of step 1): the masks come from one pass of
per-voxel max/min over cache-sized slabs; the good voxels are gathered in file order (a
sequential read); the nuisance fit is two whole-matrix BLAS products (BLAS rounds a column
differently near the end of a matrix, so splitting them would change the output's bits);
subtraction, z-scoring and windows then run block by block while a block is in cache; the
reorder to C order happens once, on the small per-trial output, fused with the selection of
the common voxels (:meth:`_Run.columns`).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from fmri2text.config import DataConfig
from fmri2text.data.betas import check_response, single_trial_betas
from fmri2text.data.bids import CIFTI_EXTENSION, window_start
from fmri2text.data.nifti import Scratch, read_series
from fmri2text.errors import UserError

MASK_BLOCK = 8192  # columns per slab of the mask pass and the gather: (T, 8192) int16 ~ 2.5 MB
BLOCK = 4096  # columns per block of detrending, z-scoring and windows: (T, 4096) float32 ~ 2.5 MB


@dataclass
class Responses:
    """Per-trial responses in the row order of the trial table.

    Attributes
    ----------
    data:
        (n_trials, n_features) float32 (data.aggregate=mean), or (n_trials, window, n_features)
        (data.aggregate=stack, the windows the 3D tokenizer reads); z-scored within each run.
    mask_img:
        The common brain mask as a NIfTI image (uint8), or None for CIFTI data.
    feature_space:
        A description of the grid, e.g. ``volume 45x54x45 4.0mm`` or ``cifti 91282``.
    feature_mask:
        (n_grid,) bool: which voxels/grayordinates of the grid are features (C order).
    n_bad_nonfinite, n_bad_constant:
        Brain voxels masked because they held NaN/inf, or were constant, in some run.
    """

    data: np.ndarray
    mask_img: nib.Nifti1Image | None
    feature_space: str
    feature_mask: np.ndarray
    n_bad_nonfinite: int = 0
    n_bad_constant: int = 0


@dataclass
class _Run:
    good: np.ndarray  # (n_grid,) bool, C order
    values: np.ndarray  # (n_trials_run, [window,] n_good) float32/16, columns in file order
    nonfinite: np.ndarray  # (n_grid,) bool
    constant: np.ndarray  # (n_grid,) bool
    to_c: np.ndarray | None = None  # (n_good,) file-order column of each good voxel, in C order

    def columns(self, keep: np.ndarray) -> np.ndarray:
        """File-order columns of ``values`` for the good voxels kept by ``keep`` ((n_grid,) bool,
        C order), in C order: the reorder and the selection in one gather."""
        sel = np.flatnonzero(keep[self.good])  # C-order ranks among this run's good voxels
        return sel if self.to_c is None else self.to_c[sel]


def drift_regressors(n_volumes: int, tr: float, high_pass: float) -> np.ndarray:
    """(n_volumes, K) constant, linear trend and DCT-II cosines of period > 1/high_pass.

    Same basis as SPM's ``spm_dctmtx`` / nilearn's cosine drift: cosine k has frequency
    k / (2 n TR), kept while that is below ``high_pass``.
    """
    t = np.arange(n_volumes, dtype=np.float64)
    cols = [np.ones(n_volumes), (t - t.mean()) / max(n_volumes - 1, 1)]
    order = int(np.floor(2 * n_volumes * high_pass * tr)) if high_pass > 0 else 0
    for k in range(1, order + 1):
        cols.append(np.sqrt(2.0 / n_volumes) * np.cos(np.pi * (t + 0.5) * k / n_volumes))
    return np.stack(cols, axis=1)


def _confounds(bold_path: str, columns: list[str], n_volumes: int) -> np.ndarray | None:
    """(n_volumes, len(columns)) fMRIPrep confounds beside ``bold_path``, n/a filled with 0."""
    if not columns:
        return None
    name = Path(bold_path).name
    stem = name.split("_space-")[0].split("_desc-")[0].split("_bold")[0]
    candidates = [Path(bold_path).with_name(f"{stem}_desc-confounds_{kind}.tsv")
                  for kind in ("timeseries", "regressors")]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise UserError("no fMRIPrep confounds file for this run", path=candidates[0],
                        fix="add the *_desc-confounds_timeseries.tsv, or set data.confounds=[]")
    table = pd.read_csv(path, sep="\t", na_values=["n/a"])
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise UserError(f"confound column(s) {missing} not in the file", path=path,
                        fix="choose data.confounds among: " + ", ".join(table.columns[:40]))
    if len(table) != n_volumes:
        raise UserError(f"confounds file has {len(table)} rows but the run has {n_volumes} volumes",
                        path=path, fix="use the confounds file of this run")
    return table[columns].fillna(0.0).to_numpy(np.float64)


def _voxel_masks(series: np.ndarray, volume: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(brain, nonfinite, constant) per column of a (T, V) series, one cache-blocked pass.

    The per-voxel max and min over time serve all three: a NaN propagates into the max and
    an infinity shows in the max or min, so a voxel is non-finite exactly when its max or
    min is; constant = max == min (NaN compares unequal); brain = any non-zero value (a
    volume's background is exactly zero; every grayordinate is brain).
    """
    n_v = series.shape[1]
    vmax, vmin = np.empty(n_v, series.dtype), np.empty(n_v, series.dtype)
    for a in range(0, n_v, MASK_BLOCK):  # max and min of one slab while it is in cache
        slab = series[:, a:a + MASK_BLOCK]
        np.max(slab, axis=0, out=vmax[a:a + MASK_BLOCK])
        np.min(slab, axis=0, out=vmin[a:a + MASK_BLOCK])
    if np.issubdtype(series.dtype, np.floating):
        nonfinite = ~(np.isfinite(vmax) & np.isfinite(vmin))
    else:
        nonfinite = np.zeros(n_v, bool)
    brain = (vmax != 0) | (vmin != 0) | nonfinite if volume else np.ones(n_v, bool)
    constant = (vmax == vmin) & brain & ~nonfinite
    return brain, nonfinite, constant


def _c_order(index: np.ndarray, shape: tuple) -> np.ndarray:
    """Permutation taking columns at file (Fortran-order) positions ``index`` to C order."""
    rank = np.zeros(int(np.prod(shape)), np.int64)
    rank[index] = np.arange(1, len(index) + 1)  # 1-based rank of each good voxel, 0 elsewhere
    rank = rank.reshape(shape, order="F").ravel()  # the same voxels, walked in C order
    return rank[rank > 0] - 1


def _process_run(bold_path: str, onsets: np.ndarray, tr: float, cfg: DataConfig,
                 events_path: str | None = None, durations: np.ndarray | None = None,
                 scratch: Scratch | None = None, dtype=np.float32) -> _Run:
    """Mask statistics, drift removal, z-scoring and trial windows (or betas) of one run.

    The large work arrays (the decompressed run, its good voxels as float32, the nuisance
    fit) come from ``scratch`` and go back to it, so the next run reuses their pages.
    ``dtype`` float16 rounds the float32 responses once more, block by block (the store's format).
    """
    scratch = scratch or Scratch()
    series, shape, pooled = read_series(bold_path, scratch)  # (T, V) in file order
    n_t = series.shape[0]
    brain, nonfinite, constant = _voxel_masks(series, shape is not None)
    bad = nonfinite | constant
    n_brain = int(brain.sum())
    if n_brain == 0:
        raise UserError("the image is empty (all voxels zero)", path=bold_path,
                        fix="check that this is the right BOLD file")
    frac = float(bad.sum()) / n_brain
    if frac > cfg.max_bad_voxel_fraction:
        raise UserError(
            f"{int(nonfinite.sum())} NaN/inf and {int(constant.sum())} constant voxels: "
            f"{100 * frac:.1f}% of {n_brain} brain voxels, above data.max_bad_voxel_fraction="
            f"{cfg.max_bad_voxel_fraction}", path=bold_path,
            fix="check the preprocessing of this run, or raise data.max_bad_voxel_fraction")
    good = brain & ~bad
    index = np.flatnonzero(good)  # file positions of good voxels, ascending: a sequential gather
    n_good = len(index)
    x = scratch.array((n_t, n_good), np.float32)  # (T, V_good) in file order
    for a in range(0, n_good, MASK_BLOCK):
        x[:, a:a + MASK_BLOCK] = np.take(series, index[a:a + MASK_BLOCK], axis=1)
    del series
    scratch.give(pooled)
    to_c = None
    if shape is not None:  # masks to C order (nilearn's convention)
        good, nonfinite, constant = (m.reshape(shape, order="F").ravel() for m in (good, nonfinite, constant))
        to_c = _c_order(index, shape)
    design = drift_regressors(n_t, tr, cfg.high_pass)
    conf = _confounds(bold_path, cfg.confounds, n_t)
    if conf is not None:
        design = np.concatenate([design, conf - conf.mean(axis=0)], axis=1)
    q = np.linalg.qr(design)[0].astype(np.float32)  # (T, K) orthonormal nuisance basis
    window = cfg.response == "window"
    if window:
        start = window_start(onsets, tr, cfg.hrf_delay)  # (n_trials,)
        if start.min() < 0 or start.max() + cfg.window > n_t:
            i = int(np.argmax(start))
            raise UserError(
                f"trial at onset {onsets[i]:.2f} s needs volumes {int(start[i])}..{int(start[i]) + cfg.window - 1}"
                f" but the run has {n_t} ({bold_path})", path=events_path or bold_path,
                fix="check the onsets, or lower data.hrf_delay / data.window")
        rows = start[:, None] + np.arange(cfg.window)  # (n_trials, window) volume indices
        lead = (len(start),) if cfg.aggregate == "mean" else rows.shape
        values = np.empty(lead + (n_good,), dtype)
    # the nuisance fit as whole-matrix products: BLAS rounds a column differently near the end
    # of a matrix, so splitting them into blocks would change the output's bits
    fit = np.matmul(q, q.T @ x, out=scratch.array(x.shape, np.float32))  # (T, V_good)
    for a in range(0, n_good, BLOCK):  # the rest column block by column block, in cache
        xb = x[:, a:a + BLOCK]
        xb -= fit[:, a:a + BLOCK]
        if cfg.standardize:
            std = xb.std(axis=0, ddof=1)
            xb /= np.where(std > 1e-8, std, 1.0)
        if window:
            win = xb[rows]  # (n_trials, window, b)
            if len(lead) == 1:
                win = win.mean(axis=1, dtype=np.float64).astype(np.float32)  # (n_trials, b)
            values[..., a:a + BLOCK] = win
    scratch.give(fit)
    if not window:  # single-trial betas replace the window mean
        dur = np.zeros_like(onsets) if durations is None else durations
        values = single_trial_betas(x, onsets, dur, tr, q, cfg.response, cfg.hrf_model,
                                    events_path or bold_path).astype(dtype, copy=False)
    scratch.give(x)
    return _Run(good, values, nonfinite, constant, to_c)


def _grid(trials: pd.DataFrame) -> tuple[tuple, np.ndarray | None, bool]:
    """Check from headers that all runs share one grid; return (shape, affine, is_cifti)."""
    ref = None
    for path in trials["bold_path"].unique():
        img = nib.load(path)
        cifti = isinstance(img, nib.Cifti2Image) or str(path).endswith(CIFTI_EXTENSION)
        shape = (img.shape[1],) if cifti else tuple(img.shape[:3])
        affine = None if cifti else img.affine
        if ref is None:
            ref = (shape, affine, cifti, path)
            continue
        same = shape == ref[0] and cifti == ref[2] and (
            cifti or np.allclose(affine, ref[1], atol=1e-3))
        if not same:
            raise UserError(
                f"runs are on different grids: {shape} here, {ref[0]} in {ref[3]}; a common "
                "mask across subjects needs one grid", path=path,
                fix="use data in a standard space (data.space=fmriprep with data.bold_space="
                    "MNI152NLin2009cAsym, or data.space=cifti)")
    return ref[0], ref[1], ref[2]


def extract_responses(trials: pd.DataFrame, cfg: DataConfig, scratch: Scratch | None = None,
                      dtype=np.float32) -> Responses:
    """Per-trial responses for every row of ``trials`` (see the module docstring).

    Parameters
    ----------
    trials:
        The trial table of :func:`fmri2text.data.bids.load_trials` (any row subset/order).
    cfg:
        hrf_delay, window, high_pass, standardize, confounds, max_bad_voxel_fraction, workers,
        response (window | lsa | lss; betas use the ``duration`` column) and hrf_model.
    scratch:
        Work buffers to reuse (``prepare`` shares one pool across subjects); default: a pool
        for this call only.
    dtype:
        float32, or float16 (the prepared store's format: the float32 values rounded once more).

    Returns
    -------
    Responses
        ``data`` is (len(trials), n_features) ``dtype`` in the row order of ``trials``.
    """
    needed = ["bold_path", "onset", "tr"]
    missing = [c for c in needed if c not in trials.columns]
    if missing or trials.empty:
        raise UserError(f"trial table lacks columns {missing} or has no rows",
                        fix="build it with fmri2text.data.bids.load_trials")
    check_response(cfg.response, cfg.aggregate, cfg.hrf_model)
    shape, affine, cifti = _grid(trials)
    runs = list(trials.groupby("bold_path", sort=False).indices.items())  # (path, row positions)
    scratch = scratch or Scratch()

    def work(item):
        path, rows = item
        sub = trials.iloc[rows]
        events = str(sub["events_path"].iat[0]) if "events_path" in sub.columns else None
        durations = sub["duration"].to_numpy(np.float64) if "duration" in sub.columns else None
        return _process_run(path, sub["onset"].to_numpy(np.float64), float(sub["tr"].iat[0]), cfg,
                            events, durations, scratch, dtype)

    workers = cfg.workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(runs)))) as pool:
        results = list(pool.map(work, runs))  # the first error is raised here

    common = np.logical_and.reduce([r.good for r in results])
    nonfinite = np.logical_or.reduce([r.nonfinite for r in results])
    constant = np.logical_or.reduce([r.constant for r in results]) & ~nonfinite
    if not common.any():
        raise UserError("no voxel is good in every run (the brain masks do not overlap)",
                        path=runs[0][0], fix="check that all runs are in the same space")
    if cfg.aggregate not in ("mean", "stack"):
        raise UserError(f"data.aggregate={cfg.aggregate!r} is not known",
                        fix="data.aggregate must be one of mean, stack")
    lead = (len(trials),) if cfg.aggregate == "mean" else (len(trials), cfg.window)
    data = np.empty(lead + (int(common.sum()),), dtype=dtype)
    for (path, rows), res in zip(runs, results):
        data[rows] = np.take(res.values, res.columns(common), axis=-1)
    if cifti:
        mask_img, space = None, f"cifti {shape[0]}"
    else:
        mask_img = nib.Nifti1Image(common.reshape(shape).astype(np.uint8), affine)
        zooms = nib.affines.voxel_sizes(affine)
        space = f"volume {'x'.join(map(str, shape))} {'x'.join(f'{z:g}' for z in zooms)}mm"
    return Responses(data, mask_img, space, common, int(nonfinite.sum()), int(constant.sum()))
