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

Speed: the work rides on the inflate. As each volume of a ``.nii.gz`` is inflated, and
while it is still in cache, the voxels non-zero in volume 0 are taken from it into a (T, n)
array in the file's dtype; a per-voxel OR of the volume's bits finds, after the read, the
few voxels first non-zero later (taken then from the whole run): see
:func:`fmri2text.data.nifti.brain_columns`. Other formats take the brain columns after one
max/min pass. The nuisance fit, z-scoring and windows then run column block by column block
while a block is in cache, without forming the residual (:func:`_windows`). The reorder to C order happens once, on
the small per-trial output, fused with the selection of the common voxels
(:meth:`_Run.columns`).
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
from fmri2text.data.nifti import Scratch, brain_columns, column_flags, max_min
from fmri2text.errors import UserError

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
    values: np.ndarray  # (n_trials_run, [window,] n_columns) float32/16
    nonfinite: np.ndarray  # (n_grid,) bool
    constant: np.ndarray  # (n_grid,) bool
    to_c: np.ndarray  # (n_good,) column of ``values`` of each good voxel, in C order

    def columns(self, keep: np.ndarray) -> np.ndarray:
        """Columns of ``values`` for the good voxels kept by ``keep`` ((n_grid,) bool, C order),
        in C order: the reorder and the selection in one gather."""
        return self.to_c[np.flatnonzero(keep[self.good])]  # C-order ranks among good voxels


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


def _bad_columns(x: np.ndarray, suspect: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nonfinite, constant) per column of ``x``, checked exactly on the ``suspect`` columns
    only (every other column is known finite and not constant)."""
    nonfinite, constant = np.zeros(x.shape[1], bool), np.zeros(x.shape[1], bool)
    cols = np.flatnonzero(suspect)
    if len(cols):
        _, nonfinite[cols], constant[cols] = column_flags(*max_min(np.take(x, cols, axis=1)))
    return nonfinite, constant


def _c_positions(index: np.ndarray, shape: tuple | None) -> np.ndarray:
    """C-order grid positions of voxels at file positions ``index`` (Fortran order for a
    volume; CIFTI grayordinates are already in order)."""
    if shape is None:
        return index
    return np.ravel_multi_index(np.unravel_index(index, shape, order="F"), shape)


def _c_order(pos: np.ndarray, n_grid: int) -> np.ndarray:
    """Permutation that sorts the distinct positions ``pos``: ``pos[_c_order(pos, n)]``
    ascends (a scatter and a gather, cheaper than a sort)."""
    rank = np.zeros(n_grid, np.int64)
    rank[pos] = np.arange(1, len(pos) + 1)  # 1-based rank of each voxel, 0 elsewhere
    return rank[rank > 0] - 1


_HALF_LOW = np.uint32(113 << 23)  # |x| below 2**-14: float16 subnormal or zero
_HALF_SPAN = np.uint32(30 << 23)  # normal float16 inputs: 2**-14 <= |x| < 2**16
_HALF_BIAS = np.uint32((0xFFF - (112 << 23)) % (1 << 32))  # rebias the exponent, round down-half


def _store(src: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = src`` for a C-contiguous float32 ``src``; into float16 exactly as numpy
    rounds (to nearest, ties to even) but about 2x faster: numpy's cast is scalar code, this
    is seven integer ufuncs on the bits, with numpy's cast kept for the rare elements
    outside the normal float16 range (tiny, huge, inf, NaN)."""
    if out.dtype != np.float16:
        out[...] = src
        return
    u = src.view(np.uint32)
    a = u & np.uint32(0x7FFFFFFF)  # |x|
    h = a >> 13
    h &= np.uint32(1)  # the lowest kept mantissa bit: ties go to even
    h += a
    h += _HALF_BIAS
    h >>= 13  # a mantissa carry rounds up into the exponent (65520 and up -> inf)
    sign = u >> 16
    sign &= np.uint32(0x8000)
    h |= sign
    out.view(np.uint16)[...] = h
    a -= _HALF_LOW  # wraps below 2**-14
    odd = np.flatnonzero(a >= _HALF_SPAN)
    if len(odd):
        at = np.unravel_index(odd, src.shape)
        with np.errstate(over="ignore"):  # inf is numpy's answer too; the store refuses it
            out[at] = src[at].astype(np.float16)


def _windows(x: np.ndarray, q: np.ndarray, rows: np.ndarray, standardize: bool, stack: bool,
             dtype, scratch: Scratch) -> tuple[np.ndarray, np.ndarray]:
    """Per-trial window responses of a run's (T, n) series, column block by column block.

    Each block (in cache) is shifted by its first volume, ``y = x - x[0]`` (exact for integer
    data; the constant is in the nuisance basis, so the residuals do not change), and
    projected once: ``c = q.T @ y``. Then, with ``q`` orthonormal,

    - residual sum of squares: ``|y|^2 - |c|^2`` (recomputed from the residual itself in the
      columns where it is under 5 % of ``|y|^2``: the float32 cancellation would cost more
      than ~1.3 of its ~7 digits there);
    - window of trial i: ``mean(y[rows_i]) - mean(q[rows_i]) @ c``,

    so the (T, n) residual is never formed. Returns the (n_trials, [window,] n) ``dtype``
    responses and, per column, whether it may be constant or non-finite (``|y|^2`` is not
    a positive finite number; :func:`_bad_columns` checks those exactly).
    """
    n_t, n = x.shape
    n_trials, window = rows.shape
    qw = q[rows]  # (n_trials, window, K): the nuisance basis at each window volume
    qmean = qw.mean(axis=1)  # (n_trials, K): its window means
    values = scratch.array((n_trials, window, n) if stack else (n_trials, n), dtype)
    suspect = np.empty(n, bool)
    y = scratch.array((n_t, min(BLOCK, n)), np.float32)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # bad columns: dropped later
        for a in range(0, n, BLOCK):
            raw = x[:, a:a + BLOCK]
            yb = y[:, :raw.shape[1]]
            np.subtract(raw, raw[0], out=yb, dtype=np.float32)  # (T, b)
            c = q.T @ yb  # (K, b) nuisance coefficients
            yy = np.einsum("tv,tv->v", yb, yb)  # (b,)
            suspect[a:a + BLOCK] = ~(np.isfinite(yy) & (yy > 0))
            scale = None
            if standardize:
                ss = yy - np.einsum("kv,kv->v", c, c)  # (b,) residual sum of squares
                shaky = np.flatnonzero(~(ss > 0.05 * yy))
                if len(shaky):
                    r = yb[:, shaky] - q @ c[:, shaky]
                    ss[shaky] = np.einsum("tv,tv->v", r, r)
                std = np.sqrt(ss / np.float32(n_t - 1))
                scale = np.float32(1) / np.where(std > 1e-8, std, np.float32(1))
            if stack:
                for k in range(window):
                    part = np.take(yb, rows[:, k], axis=0)  # (n_trials, b)
                    part -= qw[:, k] @ c
                    if scale is not None:
                        part *= scale
                    _store(part, values[:, k, a:a + BLOCK])
            else:
                acc = np.take(yb, rows[:, 0], axis=0)  # (n_trials, b)
                for k in range(1, window):
                    acc += np.take(yb, rows[:, k], axis=0)
                acc *= np.float32(1 / window)
                acc -= qmean @ c
                if scale is not None:
                    acc *= scale
                _store(acc, values[:, a:a + BLOCK])
    scratch.give(y)
    return values, suspect


def _cleaned(x: np.ndarray, q: np.ndarray, standardize: bool) -> np.ndarray:
    """(T, n) float32 residuals of ``x`` on the nuisance basis ``q``, z-scored if asked (the
    input of single-trial betas). Shifted by the first volume first, as in :func:`_windows`."""
    x = x.astype(np.float32)
    x -= x[0].copy()
    x -= q @ (q.T @ x)
    if standardize:
        std = x.std(axis=0, ddof=1)
        x /= np.where(std > 1e-8, std, 1.0)
    return x


def _process_run(bold_path: str, onsets: np.ndarray, tr: float, cfg: DataConfig,
                 events_path: str | None = None, durations: np.ndarray | None = None,
                 scratch: Scratch | None = None, dtype=np.float32) -> _Run:
    """Brain mask, drift removal, z-scoring and trial windows (or betas) of one run.

    The large work arrays (the decompressed run, its brain voxels) come from ``scratch`` and
    go back to it, so the next run reuses their pages. ``dtype`` float16 rounds the float32
    responses once more, block by block (the store's format).
    """
    scratch = scratch or Scratch()
    x, index, shape = brain_columns(bold_path, scratch)  # x: (T, n_brain)
    try:
        return _respond(x, index, shape, bold_path, onsets, tr, cfg, events_path, durations,
                        scratch, dtype)
    finally:
        scratch.give(x)


def _respond(x, index, shape, bold_path, onsets, tr, cfg, events_path, durations, scratch,
             dtype) -> _Run:
    """The body of :func:`_process_run` once the brain voxels are read."""
    n_t, n_brain = x.shape
    if n_brain == 0:
        raise UserError("the image is empty (all voxels zero)", path=bold_path,
                        fix="check that this is the right BOLD file")
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
        values, suspect = _windows(x, q, rows, cfg.standardize, cfg.aggregate == "stack", dtype,
                                   scratch)
    else:
        suspect = np.ones(n_brain, bool)  # betas: check every column before the fit
    nonfinite_c, constant_c = _bad_columns(x, suspect)  # (n_brain,) per column
    frac = float((nonfinite_c | constant_c).sum()) / n_brain
    if frac > cfg.max_bad_voxel_fraction:
        raise UserError(
            f"{int(nonfinite_c.sum())} NaN/inf and {int(constant_c.sum())} constant voxels: "
            f"{100 * frac:.1f}% of {n_brain} brain voxels, above data.max_bad_voxel_fraction="
            f"{cfg.max_bad_voxel_fraction}", path=bold_path,
            fix="check the preprocessing of this run, or raise data.max_bad_voxel_fraction")
    good_cols = np.flatnonzero(~(nonfinite_c | constant_c))  # columns of x that are good
    pos = _c_positions(index, shape)  # (n_brain,) C-order grid position of each column
    n_grid = int(np.prod(shape)) if shape is not None else n_brain
    good, nonfinite, constant = (np.zeros(n_grid, bool) for _ in range(3))
    good[pos[good_cols]] = nonfinite[pos[nonfinite_c]] = constant[pos[constant_c]] = True
    order = _c_order(pos[good_cols], n_grid)  # good columns, walked in C order
    if window:
        return _Run(good, values, nonfinite, constant, good_cols[order])
    # single-trial betas replace the window mean; they see only the good columns
    clean = _cleaned(np.take(x, good_cols, axis=1), q, cfg.standardize)
    dur = np.zeros_like(onsets) if durations is None else durations
    values = single_trial_betas(clean, onsets, dur, tr, q, cfg.response, cfg.hrf_model,
                                events_path or bold_path).astype(dtype, copy=False)
    return _Run(good, values, nonfinite, constant, order)


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
        for this call only. The result's ``data`` lies on it: :meth:`Scratch.give` it back
        when done, or the pool will not reuse that buffer.
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
    data = scratch.array(lead + (int(common.sum()),), dtype)  # reused pages when pooled
    for (path, rows), res in zip(runs, results):
        if rows[-1] - rows[0] == len(rows) - 1:  # ascending, distinct: a row range, no copy
            np.take(res.values, res.columns(common), axis=-1, out=data[rows[0]:rows[-1] + 1],
                    mode="clip")  # indices are in range; "raise" would buffer the output
        else:
            data[rows] = np.take(res.values, res.columns(common), axis=-1)
        scratch.give(res.values)
    if cifti:
        mask_img, space = None, f"cifti {shape[0]}"
    else:
        mask_img = nib.Nifti1Image(common.reshape(shape).astype(np.uint8), affine)
        zooms = nib.affines.voxel_sizes(affine)
        space = f"volume {'x'.join(map(str, shape))} {'x'.join(f'{z:g}' for z in zooms)}mm"
    return Responses(data, mask_img, space, common, int(nonfinite.sum()), int(constant.sum()))
