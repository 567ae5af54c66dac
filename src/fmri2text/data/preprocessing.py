"""A decoder's fitted preprocessing: one new run → the windows its student was trained on.

The state is the data config (window, HRF delay, drift, z-scoring, onset rule, response)
plus what training fitted: the common brain mask over the training data's grid (and so the
crop the 3D tokenizer reads). Nothing is re-implemented here: the trial table of an events
file is built by :mod:`fmri2text.data.bids` and the windows by
:func:`fmri2text.data.datasets.window_responses` (which calls
:func:`fmri2text.data.fmri.extract_responses`), the functions ``prepare`` and training use —
so a run decoded through :class:`fmri2text.api.Decoder` gives the same numbers as in the
run directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

from fmri2text.config import DataConfig
from fmri2text.errors import UserError
from fmri2text.io import write_bytes

_ENTITY = {k: re.compile(rf"(?:^|_){k}-({'[0-9]+' if k == 'run' else '[a-zA-Z0-9]+'})")
           for k in ("sub", "ses", "task", "run")}
_IMAGE_SUFFIXES = (".dtseries.nii", ".nii.gz", ".nii")


@dataclass
class Trials:
    """One run's trials and their preprocessed windows.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per trial (``onset`` in seconds from the start of the scan, ``tr``,
        ``bold_path``; from an events file also ``stim_file``, ``duration``, …).
    data : numpy.ndarray
        (n, T, F) float32 windows over the decoder's mask, z-scored within the run.
    """

    table: pd.DataFrame
    data: np.ndarray


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


@dataclass
class Preprocessing:
    """Data settings plus the fitted brain mask of a decoder.

    Parameters
    ----------
    data : DataConfig
        The preprocessing settings of training (``workers`` is not part of the state).
    feature_mask : numpy.ndarray
        (n_grid,) bool, C order over ``grid``: the voxels (or grayordinates) the student reads.
    grid : tuple of int, optional
        (X, Y, Z) of the volume grid; None for surface (CIFTI) data.
    affine : numpy.ndarray, optional
        (4, 4) voxel-to-world matrix of the grid; a run on another grid is refused.
    """

    data: DataConfig
    feature_mask: np.ndarray
    grid: tuple[int, int, int] | None = None
    affine: np.ndarray | None = None

    @cached_property
    def crop(self):
        """The :class:`~fmri2text.data.datasets.VolumeCrop` of the mask (None for surfaces)."""
        from fmri2text.data.datasets import VolumeCrop

        return VolumeCrop(self.feature_mask, self.grid) if self.grid else None

    @property
    def n_features(self) -> int:
        return int(self.feature_mask.sum())

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one student input: (T, X', Y', Z') or (T, V)."""
        t = self.data.window if self.data.response == "window" else 1
        return (t, *self.crop.shape) if self.crop is not None else (t, self.n_features)

    def mask_sha256(self) -> str:
        """sha256 of the mask as ``.npy`` bytes (the prepared store's ``mask_sha256``)."""
        return hashlib.sha256(_npy_bytes(self.feature_mask)).hexdigest()

    def save_mask(self, path: str | Path) -> None:
        write_bytes(path, _npy_bytes(np.asarray(self.feature_mask, bool)))

    # ------------------------------------------------------------------------- (de)serialising

    def to_json(self) -> dict:
        """The ``preprocessing`` section of a decoder's ``config.json``."""
        data = dataclasses.asdict(self.data)
        data.pop("workers")  # a machine setting, not part of the fitted state
        return {"data": data, "grid": None if self.grid is None else list(self.grid),
                "affine": None if self.affine is None else np.asarray(self.affine).tolist(),
                "n_grid": int(self.feature_mask.size), "n_features": self.n_features,
                "crop": None if self.crop is None else self.crop.to_dict(),
                "input_shape": list(self.input_shape), "mask_sha256": self.mask_sha256()}

    @classmethod
    def from_json(cls, section: dict, mask_path: Path) -> "Preprocessing":
        """Rebuild from ``config.json``'s section and the mask file (no pickle), checked."""
        config_path = mask_path.parent / "config.json"
        fix = "re-export the decoder (fmri2text run) or copy its folder again"
        try:
            data = dict(section["data"])
            names = {f.name for f in dataclasses.fields(DataConfig)}
            unknown = sorted(set(data) - names)
            if unknown:
                raise UserError(f"unknown data settings {unknown} (written by a newer fmri2text?)",
                                path=config_path, fix="upgrade fmri2text, or " + fix)
            data.setdefault("smoothing_fwhm", 0.0)  # decoders saved before it existed: none
            grid = None if section["grid"] is None else tuple(int(g) for g in section["grid"])
            affine = None if section["affine"] is None else np.asarray(section["affine"], np.float64)
            n_grid, n_features = int(section["n_grid"]), int(section["n_features"])
            input_shape = tuple(int(s) for s in section["input_shape"])
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"the preprocessing section is incomplete ({type(err).__name__}: "
                            f"{err})", path=config_path, fix=fix) from None
        if not mask_path.is_file():
            raise UserError("mask.npy is missing from the decoder folder", path=mask_path, fix=fix)
        try:
            mask = np.load(mask_path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise UserError(f"not a plain .npy array ({err})", path=mask_path, fix=fix) from None
        if mask.dtype != np.bool_ or mask.shape != (n_grid,) or int(mask.sum()) != n_features:
            raise UserError(f"the mask is {mask.dtype} {mask.shape} with "
                            f"{int(mask.sum()) if mask.dtype == np.bool_ else '?'} voxels; "
                            f"config.json expects bool ({n_grid},) with {n_features}",
                            path=mask_path, fix=fix)
        if grid is not None and int(np.prod(grid)) != n_grid:
            raise UserError(f"grid {grid} does not hold {n_grid} voxels", path=config_path, fix=fix)
        prep = cls(DataConfig(**data), mask, grid, affine)
        if prep.input_shape != input_shape:
            raise UserError(f"the mask and data settings give student inputs of shape "
                            f"{prep.input_shape}, config.json records {input_shape}",
                            path=mask_path, fix=fix)
        return prep

    @classmethod
    def from_prepared(cls, folder: str | Path, data: DataConfig) -> "Preprocessing":
        """The common mask of a prepared store (``mask.npy``, manifest grid, ``mask.nii.gz``)."""
        folder = Path(folder)
        manifest_path = folder / "manifest.json"
        fix = f"run (or rerun, it resumes) fmri2text prepare --out {folder}"
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            raw = (folder / "mask.npy").read_bytes()
        except (OSError, ValueError) as err:
            raise UserError(f"no finished prepared store ({err})", path=folder, fix=fix) from None
        if hashlib.sha256(raw).hexdigest() != manifest.get("mask_sha256"):
            raise UserError("mask.npy differs from the manifest (sha256)", path=folder / "mask.npy",
                            fix=fix)
        mask = np.load(io.BytesIO(raw), allow_pickle=False)
        grid = manifest.get("grid_shape")
        affine = None
        if grid is not None:
            import nibabel as nib

            grid = tuple(int(g) for g in grid[:3])
            affine = nib.load(str(folder / "mask.nii.gz")).affine
        return cls(data, mask, grid, affine)

    # ------------------------------------------------------------------------- one run

    def windows(self, bold, events: str | Path | None = None,
                onsets: Sequence[float] | None = None, tr: float | None = None) -> Trials:
        """One run's trials and windows (see :meth:`fmri2text.api.Decoder.windows`)."""
        from fmri2text.data.datasets import smooth_windows, window_responses

        if (events is None) == (onsets is None):
            raise UserError("give the run's trials as events= (a BIDS events.tsv) or onsets= "
                            "(seconds from the start of the scan), one of the two",
                            fix="decode(bold, events='..._events.tsv') or decode(bold, onsets=[...])")
        with _bold_file(bold) as path:
            table = self._trial_table(path, events, onsets, tr)
            responses = window_responses(table, self.data)
        shown = path if isinstance(bold, (str, Path)) else (bold.get_filename() or "<nibabel image>")
        self._check_grid(responses, shown)
        run_good = responses.feature_mask  # (n_grid,) voxels good in this run
        lost = self.feature_mask & ~run_good
        if lost.any():
            raise UserError(f"{int(lost.sum())} of the decoder's {self.n_features} voxels are "
                            "empty, NaN or constant in this run", path=shown,
                            fix="check the run's preprocessing (same space and brain coverage "
                                "as the training data)")
        data = responses.data[..., self.feature_mask[run_good]]  # (n, T, F), C order as in training
        data = smooth_windows(data, self.feature_mask, self.grid, self.affine,
                              self.data.smoothing_fwhm)  # within the training mask, as in training
        table["bold_path"] = str(shown)  # not the temporary copy of an in-memory image
        return Trials(table, np.ascontiguousarray(data))

    def _check_grid(self, responses, path) -> None:
        if self.grid is None:
            if responses.mask_img is not None or responses.feature_mask.size != self.feature_mask.size:
                raise UserError(f"the decoder reads {self.feature_mask.size} grayordinates "
                                f"({responses.feature_space} given)", path=path,
                                fix="pass a CIFTI dtseries on the training data's surface grid")
            return
        img = responses.mask_img
        shape = None if img is None else tuple(int(s) for s in img.shape[:3])
        if shape != self.grid or (self.affine is not None
                                  and not np.allclose(img.affine, self.affine, atol=1e-3)):
            raise UserError(f"the run is on another grid ({responses.feature_space}) than the "
                            f"decoder (volume {'x'.join(map(str, self.grid))})", path=path,
                            fix="resample the run to the training data's space and grid")

    def _trial_table(self, bold: Path, events, onsets, tr: float | None) -> pd.DataFrame:
        from fmri2text.data.bids import _header_info, _run_table

        header_tr, n_volumes = _header_info(str(bold), self.data)
        tr = _repetition_time(bold, tr, header_tr)
        if onsets is not None:
            onsets = np.asarray(onsets, dtype=np.float64).reshape(-1)
            if not len(onsets) or not np.isfinite(onsets).all():
                raise UserError(f"onsets must be finite seconds, at least one; got {onsets[:5]}",
                                fix="pass onsets=[12.0, 16.0, ...] from the start of the scan")
            return pd.DataFrame({"onset": onsets, "duration": np.zeros_like(onsets),
                                 "bold_path": str(bold), "tr": tr, "n_volumes": n_volumes})
        events = Path(events)
        if not events.is_file():
            raise UserError("events file not found", path=events,
                            fix="pass the run's BIDS *_events.tsv (or onsets=[...])")
        name = events.name  # BIDS entities name the run in the table, as in training
        key = (_entity(name, "sub") or "", _entity(name, "ses") or "", _entity(name, "task") or "",
               int(_entity(name, "run") or 1))
        root = next((p for p in events.resolve().parents
                     if (p / "dataset_description.json").is_file()), events.resolve().parent)
        return _run_table(key, str(events), str(bold), root, self.data, {}, root, tr, n_volumes)


def _entity(name: str, key: str) -> str | None:
    m = _ENTITY[key].search(name)
    return m.group(1) if m else None


def _repetition_time(bold: Path, tr: float | None, header_tr: float | None) -> float:
    """The TR given, else the BOLD sidecar's RepetitionTime, else the header's; checked."""
    from fmri2text.data.bids import TR_TOLERANCE

    source = "tr="
    if tr is None:
        stem = next((str(bold)[:-len(s)] for s in _IMAGE_SUFFIXES if str(bold).endswith(s)), None)
        sidecar = Path(stem + ".json") if stem else None
        if sidecar is not None and sidecar.is_file():
            try:
                tr = json.loads(sidecar.read_text(encoding="utf-8")).get("RepetitionTime")
            except (OSError, ValueError, AttributeError) as err:
                raise UserError(f"cannot read the JSON sidecar ({err})", path=sidecar,
                                fix="write valid JSON with RepetitionTime in seconds") from None
            source = f"sidecar {sidecar.name}"
    if tr is None:
        tr, source = header_tr, "header"
    if isinstance(tr, bool) or not isinstance(tr, (int, float)) or not np.isfinite(tr) or tr <= 0:
        raise UserError(f"no valid repetition time (from the {source}: {tr!r})", path=bold,
                        fix="pass tr= in seconds, or add RepetitionTime to the BOLD JSON sidecar")
    if header_tr is not None and abs(float(tr) - header_tr) > TR_TOLERANCE:
        raise UserError(f"TR mismatch: {float(tr)} s from the {source} but {header_tr} s in the "
                        "image header", path=bold,
                        fix="correct the sidecar or the header so both give the true TR")
    return float(tr)


@contextmanager
def _bold_file(bold) -> Iterator[Path]:
    """A path to read ``bold`` from: the path itself, an unmodified image's own file, or a
    temporary copy of an in-memory nibabel image."""
    import nibabel as nib

    if isinstance(bold, (str, Path)):
        path = Path(bold)
        if not path.is_file():
            raise UserError("BOLD file not found", path=path, fix="pass the run's *_bold.nii.gz")
        yield path
        return
    if not isinstance(bold, (nib.Nifti1Image, nib.Nifti2Image, nib.Cifti2Image)):
        raise UserError(f"bold must be a path or a nibabel image, got {type(bold).__name__}",
                        fix="pass the path of the run's BOLD file, or nibabel.load(path)")
    own = bold.get_filename()
    if own and nib.is_proxy(bold.dataobj) and Path(own).is_file():
        yield Path(own)  # an image as loaded: its file holds exactly its data
        return
    suffix = ".dtseries.nii" if isinstance(bold, nib.Cifti2Image) else ".nii"
    with tempfile.TemporaryDirectory(prefix="fmri2text-bold-") as tmp:
        path = Path(tmp) / f"bold{suffix}"
        if isinstance(bold, nib.Cifti2Image):
            nib.save(bold, str(path))
        else:
            arr = np.asanyarray(bold.dataobj)
            header = bold.header.copy()
            header.set_data_dtype(arr.dtype)  # values written as they are, not rescaled
            nib.save(type(bold)(arr, bold.affine, header), str(path))
        yield path
