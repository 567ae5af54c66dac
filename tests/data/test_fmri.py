"""Per-trial responses: values, common mask, bad voxels, corrupt files, CIFTI."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fmri2text.config import DataConfig
from fmri2text.data.bids import load_trials, window_start
from fmri2text.data.fmri import drift_regressors, extract_responses
from fmri2text.errors import UserError

from .conftest import make_had, write_bold, write_cifti

BOLD = "sub-{s}/ses-action01/func/sub-{s}_ses-action01_task-action_run-0{r}_bold.nii.gz"


def _expected(data: np.ndarray, onsets, cfg: DataConfig) -> np.ndarray:
    """Reference pipeline for one run written independently: lstsq residuals, z, window mean."""
    x = data.reshape(-1, data.shape[-1]).T.astype(np.float64)  # (T, V) in C order of the grid
    d = drift_regressors(x.shape[0], 2.0, cfg.high_pass)
    x = x - d @ np.linalg.lstsq(d, x, rcond=None)[0]
    x = x / x.std(axis=0, ddof=1)
    start = window_start(onsets, 2.0, cfg.hrf_delay)
    return np.stack([x[s:s + cfg.window].mean(axis=0) for s in start])


def test_responses_match_reference(tmp_path: Path):
    root = make_had(tmp_path / "had", subjects=("01", "02"), runs=2)
    cfg = DataConfig()
    trials = load_trials(root, cfg)
    resp = extract_responses(trials, cfg)
    assert resp.data.dtype == np.float32 and resp.data.shape == (40, 3 * 3 * 2)
    assert resp.mask_img is not None and int(resp.mask_img.get_fdata().sum()) == 18
    assert resp.feature_space.startswith("volume 5x5x4")
    rows = (trials.subject == "02") & (trials.run == 2)
    img = nib.load(root / BOLD.format(s="02", r=2))
    inside = img.get_fdata()[resp.mask_img.get_fdata() > 0]  # (V, T), nilearn's C order
    want = _expected(inside, trials.loc[rows, "onset"], cfg)
    np.testing.assert_allclose(resp.data[rows.to_numpy()], want, rtol=1e-4, atol=1e-4)
    # row order follows the given table, whatever its order
    shuffled = trials.sample(frac=1.0, random_state=0)
    again = extract_responses(shuffled, cfg)
    np.testing.assert_array_equal(again.data, resp.data[shuffled.index.to_numpy()])


def _bad_voxels(root: Path, n_bad: int, value: float) -> Path:
    path = root / BOLD.format(s="01", r=1)
    data = nib.load(path).get_fdata().astype(np.float32)
    inside = np.argwhere(data[..., 0] != 0)[:n_bad]
    for x, y, z in inside:
        data[x, y, z, :] = value if np.isfinite(value) else np.nan
        if np.isnan(value):
            data[x, y, z, 1:] = 1000.0
            data[x, y, z, 0] = np.nan
    write_bold(path, data.shape[-1], 2.0, data=data)
    return path


def test_few_nan_voxels_are_masked_and_reported(tmp_path: Path):
    root = make_had(tmp_path / "had", subjects=("01", "02"), runs=2, shape=(7, 7, 6))
    _bad_voxels(root, 2, np.nan)  # 2 of 100 brain voxels
    path = root / BOLD.format(s="02", r=1)
    data = nib.load(path).get_fdata().astype(np.float32)
    data[3, 3, 3, :] = 1234.0  # one constant voxel in another run
    write_bold(path, data.shape[-1], 2.0, data=data)
    resp = extract_responses(load_trials(root, DataConfig()), DataConfig())
    assert resp.n_bad_nonfinite == 2 and resp.n_bad_constant == 1
    assert resp.data.shape[1] == 100 - 3 and np.isfinite(resp.data).all()
    assert resp.mask_img.get_fdata()[3, 3, 3] == 0


def test_many_bad_voxels_are_fatal(tmp_path: Path):
    root = make_had(tmp_path / "had", subjects=("01", "02"), runs=1, shape=(7, 7, 6))
    path = _bad_voxels(root, 10, 500.0)  # 10 % constant
    with pytest.raises(UserError, match="constant voxels") as err:
        extract_responses(load_trials(root, DataConfig()), DataConfig())
    assert err.value.path == path


def test_truncated_gzip_names_the_file(tmp_path: Path):
    root = make_had(tmp_path / "had", subjects=("01", "02"), runs=1)
    trials = load_trials(root, DataConfig())
    path = root / BOLD.format(s="02", r=1)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) * 2 // 3])
    with pytest.raises(UserError, match="truncated or corrupt") as err:
        extract_responses(trials, DataConfig())
    assert err.value.path == path


def test_runs_on_different_grids_are_refused(tmp_path: Path):
    root = make_had(tmp_path / "had", subjects=("01", "02"), runs=1)
    write_bold(root / BOLD.format(s="02", r=1), 40, 2.0, shape=(6, 5, 4))
    with pytest.raises(UserError, match="different grids"):
        extract_responses(load_trials(root, DataConfig()), DataConfig())


def test_cifti_responses(tmp_path: Path):
    root = make_had(tmp_path / "had", subjects=("01", "02"), runs=1, raw_bold=False)
    for i, sub in enumerate(("01", "02")):
        write_cifti(root / f"derivatives/ciftify/sub-{sub}/results/ses-action01_task-action_run-1"
                    "_Atlas.dtseries.nii", 40, 2.0, n_left=11, n_right=13, seed=i)
    cfg = DataConfig(space="cifti", bold_dir="derivatives/ciftify")
    resp = extract_responses(load_trials(root, cfg), cfg)
    assert resp.mask_img is None and resp.feature_space == "cifti 24"
    assert resp.data.shape == (20, 24) and np.isfinite(resp.data).all()


def test_stacked_windows_average_to_the_mean_responses(had_root):
    from dataclasses import replace

    cfg = replace(DataConfig(), window=3, captions="")
    trials = load_trials(had_root, cfg)
    mean = extract_responses(trials, cfg)
    stack = extract_responses(trials, replace(cfg, aggregate="stack"))
    assert stack.data.shape == (len(trials), 3, mean.data.shape[1])
    np.testing.assert_allclose(stack.data.mean(axis=1), mean.data, atol=1e-5)
