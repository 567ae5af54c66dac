"""Tiny synthetic BIDS datasets written by the tests themselves (HAD, fMRIPrep, CIFTI, BMD)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

CLASSES = ["Archery", "Playing guitar", "Springboard diving"]  # ASCII order = ids 1, 2, 3
HAD_TR = 2.0
HAD_VOLUMES = 156


def had_onsets(n: int) -> np.ndarray:
    """HAD timing from the first trial: 4 s apart, 4 s extra after each group of 5."""
    k = np.arange(n)
    return 4.0 * k + 4.0 * (k // 5)


def write_bold(path: Path, n_volumes: int, tr: float, shape=(5, 5, 4), seed: int = 0,
               data: np.ndarray | None = None, sidecar_tr: float | None = None,
               affine: np.ndarray | None = None) -> Path:
    """A 4-D NIfTI with a zero border (outside the brain), random int16 inside; + JSON sidecar."""
    if data is None:
        rng = np.random.default_rng(seed)
        data = np.zeros((*shape, n_volumes), np.float32)
        data[1:-1, 1:-1, 1:-1] = 1000 + 20 * rng.standard_normal((*[s - 2 for s in shape], n_volumes))
        data = data.astype(np.int16)
    img = nib.Nifti1Image(data, np.diag([4.0, 4.0, 4.0, 1.0]) if affine is None else affine)
    img.header.set_zooms((4.0, 4.0, 4.0, tr))
    img.header.set_xyzt_units("mm", "sec")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    name = path.name.replace(".nii.gz", ".json").replace(".nii", ".json")
    (path.parent / name).write_text(json.dumps({"RepetitionTime": sidecar_tr or tr}))
    return path


def write_events(path: Path, rows: list[dict], columns: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(columns)] + ["\t".join(str(r[c]) for c in columns) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def had_rows(subject: str, run: int, n_trials: int) -> list[dict]:
    rows = []
    for k, onset in enumerate(had_onsets(n_trials)):
        cls = CLASSES[(k + run) % len(CLASSES)]
        vid = f"{subject[-2:]}r{run:02d}t{k // 2:03d}xx"  # 11 chars, 2 clips per id
        rows.append({"onset": f"{onset + 0.1:.3f}", "duration": 2.0,
                     "trial_type": float(CLASSES.index(cls) + 1),
                     "response": "n/a" if k == 1 else 1.0, "response_time": "n/a",
                     "stim_file": f"{cls}/v_{cls}_id_{vid}_start_{k}.0_label_1.mp4"})
    return rows


HAD_COLUMNS = ["onset", "duration", "trial_type", "response", "response_time", "stim_file"]


def make_had(root: Path, subjects=("01", "02"), runs=2, n_trials=10, n_volumes=40,
             raw_bold=True, shape=(5, 5, 4)) -> Path:
    """HAD raw layout: sub-XX/ses-action01/func/sub-XX_ses-action01_task-action_run-0R_*."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.4.1"}))
    for si, sub in enumerate(subjects):
        func = root / f"sub-{sub}" / "ses-action01" / "func"
        for run in range(1, runs + 1):
            stem = f"sub-{sub}_ses-action01_task-action_run-{run:02d}"
            write_events(func / f"{stem}_events.tsv", had_rows(sub, run, n_trials), HAD_COLUMNS)
            if raw_bold:
                write_bold(func / f"{stem}_bold.nii.gz", n_volumes, HAD_TR, shape, seed=si * 100 + run)
    return root


@pytest.fixture
def had_root(tmp_path: Path) -> Path:
    return make_had(tmp_path / "had")


def write_cifti(path: Path, n_volumes: int, tr: float, n_left=30, n_right=30, seed=0) -> Path:
    """A dtseries with two cortical surface brain models, sizes chosen here (read from header)."""
    bm = (nib.cifti2.BrainModelAxis.from_mask(np.ones(n_left, bool), name="CortexLeft")
          + nib.cifti2.BrainModelAxis.from_mask(np.ones(n_right, bool), name="CortexRight"))
    series = nib.cifti2.SeriesAxis(start=0.0, step=tr, size=n_volumes, unit="SECOND")
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((n_volumes, n_left + n_right)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Cifti2Image(data, header=(series, bm)), path)
    return path
