"""The fast paths of ``prepare``: the .nii.gz reader, its buffer pool, the float16 output, the
memoised stimulus lookup and the BOLD-only metadata index; each against the plain way."""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fmri2text.config import DataConfig
from fmri2text.data.bids import _real, load_trials, window_start
from fmri2text.data.fmri import _process_run, _store, drift_regressors, extract_responses
from fmri2text.data.nifti import Scratch, read_gz_nifti, read_series
from fmri2text.errors import UserError

from .conftest import make_had

RNG = np.random.default_rng(7)


def _save(img, path: Path) -> Path:
    nib.save(img, path)
    return path


@pytest.mark.parametrize("kind", ["int16", "scaled", "nifti2", "extension", "big-endian", "float64"])
def test_reader_matches_nibabel(tmp_path: Path, kind: str):
    data = RNG.integers(-3000, 3000, (6, 5, 4, 7)).astype(np.int16)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    if kind == "nifti2":
        img = nib.Nifti2Image(data, affine)
    elif kind == "float64":
        img = nib.Nifti1Image(data.astype(np.float64) / 7, affine)
    else:
        img = nib.Nifti1Image(data, affine)
    if kind == "scaled":
        img.header.set_slope_inter(0.25, -3.0)
    if kind == "extension":  # data starts after a header extension (vox_offset > 352)
        img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"x" * 1000))
    if kind == "big-endian":
        img = nib.Nifti1Image(data.astype(">i2"), affine)
    path = _save(img, tmp_path / "bold.nii.gz")
    want = np.asanyarray(nib.load(path).dataobj)
    scratch = Scratch()
    arr, pooled = read_gz_nifti(str(path), scratch)
    assert pooled == (kind != "scaled") and arr.shape == want.shape
    np.testing.assert_array_equal(arr, want)
    assert arr.dtype == (np.float32 if kind == "scaled" else want.dtype)
    series, shape, owned = read_series(str(path), scratch)
    assert shape == want.shape[:3] and series.shape == (7, 6 * 5 * 4)
    np.testing.assert_array_equal(series, want.reshape(-1, 7, order="F").T)


def test_reader_refuses_truncated_and_corrupt_files(tmp_path: Path):
    img = nib.Nifti1Image(RNG.integers(0, 3000, (8, 8, 8, 20)).astype(np.int16), np.eye(4))
    path = _save(img, tmp_path / "bold.nii.gz")
    blob = path.read_bytes()
    cases = {"truncated": blob[: len(blob) // 2],
             "bad CRC": blob[:-8] + bytes([blob[-8] ^ 0xFF]) + blob[-7:],
             "not gzip": gzip.decompress(blob)}
    for name, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(UserError, match="truncated or corrupt") as err:
            read_series(str(path), Scratch())
        assert Path(err.value.path) == path, name
    # a complete stream holding less data than the header says
    short = gzip.decompress(blob)[:-100]
    path.write_bytes(gzip.compress(short))
    with pytest.raises(UserError, match="image data ends"):
        read_series(str(path), Scratch())


def test_scratch_reuses_buffers():
    scratch = Scratch()
    a = scratch.array((10, 20), np.float32)
    b = scratch.array((4,), np.int16)
    assert not np.shares_memory(a, b)
    scratch.give(a, b, None)
    c = scratch.array((2,), np.float32)  # 8 bytes: the smallest free buffer that fits (b's)
    assert c.base is b.base
    small = scratch.array((3, 30), np.float32)  # 360 bytes: a (800) is over twice that
    assert small.base is not a.base
    d = scratch.array((10, 15), np.float32, order="F")  # 600 bytes: a (800) fits
    assert d.base is a.base and d.flags.f_contiguous
    e = scratch.array((1000,), np.float32)  # nothing free fits: a new buffer
    assert e.base is not a.base and e.base is not b.base
    scratch.give(d)
    scratch.give(d)  # giving twice keeps one entry
    scratch.give(np.zeros(1000, np.uint8)[:10])  # not from the pool: ignored
    assert sum(x is a.base for x in scratch._free) == 1 and len(scratch._free) == 1


def test_float16_output_is_the_float32_output_rounded(tmp_path: Path):
    root = make_had(tmp_path / "had", subjects=("01", "02"), runs=2)
    for extra in ({}, {"response": "lss"}, {"aggregate": "stack", "window": 3}):
        cfg = replace(DataConfig(captions=""), **extra)
        trials = load_trials(root, cfg)
        full = extract_responses(trials, cfg).data
        half = extract_responses(trials, cfg, Scratch(), np.float16).data
        assert half.dtype == np.float16
        np.testing.assert_array_equal(half.view(np.uint16), full.astype(np.float16).view(np.uint16))


def test_memoised_resolution_equals_resolve(tmp_path: Path):
    root = tmp_path / "root"
    (root / "stimuli/Real class").mkdir(parents=True)
    (root / "stimuli/Real class/a.mp4").write_bytes(b"")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "b.mp4").write_bytes(b"")
    os.symlink(root / "stimuli/Real class", root / "stimuli/Linked class")
    os.symlink(outside / "b.mp4", root / "stimuli/Real class/escape.mp4")
    os.symlink(outside, root / "stimuli/Out")
    dirs: dict = {}
    for rel in ["Real class/a.mp4", "Linked class/a.mp4", "Real class/escape.mp4", "Out/b.mp4",
                "Real class/../Real class/a.mp4", "missing/x.mp4", "Real class/..", "Real class"]:
        for _ in range(2):  # the second lookup comes from the memo
            path = root / "stimuli" / rel
            assert Path(_real(path, dirs)) == path.resolve(), rel


def test_sidecar_inheritance_with_the_bold_only_metadata_index(tmp_path: Path):
    root = make_had(tmp_path / "had", subjects=("01", "02"), runs=1)
    for sidecar in root.glob("sub-*/ses-*/func/*_bold.json"):
        sidecar.unlink()
    cfg = DataConfig(captions="")
    assert (load_trials(root, cfg)["tr"] == 2.0).all()  # header TR when no sidecar
    for where in ("task-action_bold.json", "sub-02/sub-02_task-action_bold.json",
                  "sub-02/ses-action01/sub-02_ses-action01_task-action_bold.json"):
        (root / where).write_text(json.dumps({"RepetitionTime": 3.0}))  # inherited by sub-02
        with pytest.raises(UserError, match="TR mismatch: sidecar RepetitionTime 3.0"):
            load_trials(root, cfg)
        (root / where).unlink()


def _reference_run(data: np.ndarray, onsets: np.ndarray, cfg: DataConfig, tr: float = 2.0):
    """The per-run pipeline by definition, in float64: (good mask, nonfinite, constant in C
    order, (n_trials, n_good) window means of the z-scored residuals in C order)."""
    x = data.reshape(-1, data.shape[-1]).T.astype(np.float64)  # (T, V), C order of the grid
    with np.errstate(invalid="ignore"):
        nonfinite = ~np.isfinite(x).all(axis=0)
        brain = (x != 0).any(axis=0) | nonfinite
        constant = (x == x[0]).all(axis=0) & ~nonfinite & brain
    good = brain & ~nonfinite & ~constant
    d = drift_regressors(x.shape[0], tr, cfg.high_pass)
    g = x[:, good]
    r = g - d @ np.linalg.lstsq(d, g, rcond=None)[0]
    z = r / r.std(axis=0, ddof=1)
    start = window_start(onsets, tr, cfg.hrf_delay)
    return good, nonfinite, constant, np.stack([z[s:s + cfg.window].mean(axis=0) for s in start])


@pytest.mark.parametrize("kind", ["int16", "float32", "big-endian", "uncompressed"])
def test_streamed_run_matches_the_definition(tmp_path: Path, kind: str):
    """The .nii.gz path takes volume 0's non-zero voxels while inflating; voxels that turn
    non-zero later, -0.0 (not brain), NaN after volume 0 and constant voxels must come out
    as the definition says, and as the whole-run path (uncompressed .nii) gives."""
    rng = np.random.default_rng(3)
    shape, n_t = (9, 8, 7), 60
    data = np.zeros((*shape, n_t), np.float64)
    data[2:7, 2:6, 2:5] = 900 + 15 * rng.standard_normal((5, 4, 3, n_t))
    data[0, 0, 0, 5:] = 40 + rng.integers(1, 9, n_t - 5)  # zero in volume 0 only: late
    data[8, 7, 6, 30] = 3  # one late value in the last voxel of the grid
    data[3, 3, 3, :] = 1234  # constant
    if kind != "int16":
        data[1, 1, 1, 10:20] = -0.0  # bits set, value zero: not brain
        data[4, 4, 4, 7] = np.nan  # non-finite after volume 0
    dtype = {"int16": np.int16, "float32": np.float32, "big-endian": ">f4",
             "uncompressed": np.float32}[kind]
    name = "bold.nii" if kind == "uncompressed" else "bold.nii.gz"
    path = _save(nib.Nifti1Image(data.astype(dtype), np.eye(4)), tmp_path / name)
    cfg = DataConfig(window=2, hrf_delay=4.0, high_pass=0.01)
    onsets = np.arange(10) * 9.0 + 3.0
    run = _process_run(str(path), onsets, 2.0, cfg, scratch=Scratch())
    good, nonfinite, constant, want = _reference_run(data.astype(dtype).astype(np.float64), onsets, cfg)
    np.testing.assert_array_equal(run.good, good)
    np.testing.assert_array_equal(run.nonfinite, nonfinite)
    np.testing.assert_array_equal(run.constant, constant)
    assert good[0] and good[-1] and not good[np.ravel_multi_index((1, 1, 1), shape)]
    got = run.values[:, run.columns(run.good)]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_drift_dominated_voxels_keep_their_precision(tmp_path: Path):
    """A drift 10^4 times the noise makes |y|^2 - |c|^2 cancel in float32; those columns are
    recomputed from their residual and still match float64."""
    rng = np.random.default_rng(5)
    n_t = 80
    t = np.arange(n_t)
    data = np.zeros((4, 4, 4, n_t))
    data[1:3, 1:3, 1:3] = 1000 + rng.standard_normal((2, 2, 2, n_t))
    data[1, 1, 1] += 1e4 * t / n_t  # drift: all but 1e-8 of the energy is nuisance
    path = _save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), tmp_path / "bold.nii.gz")
    cfg = DataConfig(window=2, hrf_delay=4.0, high_pass=0.01)
    onsets = np.arange(8) * 18.0
    run = _process_run(str(path), onsets, 2.0, cfg, scratch=Scratch())
    good, _, _, want = _reference_run(data.astype(np.float32).astype(np.float64), onsets, cfg)
    np.testing.assert_allclose(run.values[:, run.columns(run.good)], want, rtol=1e-3, atol=2e-3)


def test_float16_rounding_is_numpys():
    """The store's float32 -> float16 rounding on the bits equals numpy's cast, bit for bit,
    over a sweep of the whole float32 range and the edges (ties, subnormals, overflow)."""
    bits = np.arange(0, 1 << 32, 2039, dtype=np.uint64).astype(np.uint32)
    edges = np.array([0.0, -0.0, 2.0**-14, 2.0**-14 * (1 - 2**-11), 2.0**-24, 2.0**-25, 65504,
                      65519.99, 65520, -65520, 1e9, np.inf, -np.inf, np.nan,
                      1 + 2.0**-11, 1 + 3 * 2.0**-11, -(1 + 2.0**-11)], np.float32)
    for src in (bits.view(np.float32)[:bits.size // 7 * 7].reshape(-1, 7), edges.reshape(-1, 1)):
        out = np.empty((src.shape[0], src.shape[1] + 2), np.float16)[:, 1:-1]  # strided, as in the store
        _store(src, out)
        with np.errstate(over="ignore"):
            want = src.astype(np.float16)
        nan = np.isnan(want)
        assert np.isnan(out[nan]).all()
        np.testing.assert_array_equal(out.view(np.uint16)[~nan], want.view(np.uint16)[~nan])
