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
from fmri2text.data.bids import _real, load_trials
from fmri2text.data.fmri import extract_responses
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
    d = scratch.array((3, 30), np.float32, order="F")  # 360 bytes: a (800) is the only fit
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
