"""Spatial smoothing of the student's windows within the brain mask (data.smoothing_fwhm)."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from fmri2text.config import load_config
from fmri2text.data.datasets import smooth_windows
from fmri2text.errors import UserError

GRID = (9, 10, 8)
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])  # anisotropic voxels: sigma differs per axis


def _mask() -> np.ndarray:
    m = np.zeros(GRID, bool)
    m[1:8, 2:9, 1:7] = True
    m[4, 5, 3] = False  # a hole inside the brain
    return m.ravel()


def test_zero_fwhm_and_surface_data_are_unchanged():
    data = np.random.default_rng(0).standard_normal((3, 2, int(_mask().sum()))).astype(np.float32)
    assert smooth_windows(data, _mask(), GRID, AFFINE, 0.0) is data
    assert smooth_windows(data, _mask(), None, None, 6.0) is data


def test_constant_map_stays_constant_up_to_the_mask_edge():
    mask = _mask()
    data = np.full((2, 1, int(mask.sum())), 3.0, np.float32)
    out = smooth_windows(data, mask, GRID, AFFINE, 6.0)
    assert out.shape == data.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, 3.0, rtol=1e-5)  # edges are not pulled toward zero


def test_matches_a_masked_normalised_gaussian_with_nilearns_sigma():
    mask = _mask()
    rng = np.random.default_rng(1)
    data = rng.standard_normal((5, 2, int(mask.sum()))).astype(np.float32)
    fwhm = 7.0
    sigma = fwhm / np.sqrt(8 * np.log(2)) / np.array([2.0, 2.0, 3.0])
    out = smooth_windows(data, mask, GRID, AFFINE, fwhm, chunk=2)  # chunks change nothing
    vol = np.zeros((5, 2, *GRID), np.float32)
    vol.reshape(5, 2, -1)[..., mask] = data
    w = gaussian_filter(mask.reshape(GRID).astype(np.float64), sigma, mode="constant")
    ref = gaussian_filter(vol.astype(np.float64), (0, 0, *sigma), mode="constant") / w
    np.testing.assert_allclose(out, ref.reshape(5, 2, -1)[..., mask], rtol=1e-4, atol=1e-5)
    # smoothing trades variance for spatial correlation: neighbours now agree
    assert out.std() < 0.8 * data.std()


def test_negative_fwhm_is_refused_with_the_allowed_values():
    with pytest.raises(UserError, match="smoothing_fwhm"):
        load_config(None, ["data.smoothing_fwhm=-2"])
