"""Simulated brains: MNI grid and ROIs, subject response maps and HRFs, noise, BOLD.

A subject's response to trial k in voxel v is linear in the clip's standardised features:

    a[k, v] = b[v] + sum_f F[k, f] * T[f, v]            (scanner units, peak of the response)

where T = the subject's maps (a shared topography, warped by a smooth individual
deformation and mixed with an individual component) scaled per voxel so that the voxel's
contrast-to-noise ratio (``CNR_DEFINITION``) equals its target. The BOLD of a run is

    Y[t, v] = baseline[v] + sum_k X[t, k] * a[k, v] + noise[t, v]

with X the trial regressors (a 2-s box at each onset convolved with the subject's
double-gamma HRF, scaled to peak 1) and noise = AR(1) + respiration (0.2 Hz) + cardiac
(1.17 Hz, aliased by TR sampling) + structured low-rank + slow drift + head motion.
The ROIs are geometric approximations in MNI space (no atlas download): cortex = grey
matter (MNI152 GM probability > 0.5), visual = cortex with y < -62 mm, early visual =
visual with |x| < 22, y < -70, -14 < z < 22 mm (around the calcarine sulcus).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy import ndimage, stats

HAD_CNR = {"cortex": 0.34, "visual": 0.63, "early_visual": 0.82}  # HAD's measured medians
HIGH_PASS_HZ = 0.01  # cosine drift cut-off used in the CNR definition (nilearn's model)
CNR_DEFINITION = (
    "Per voxel v of a subject: CNR_v = std_k(a_kv) / sd_v. a_kv is the true response "
    "amplitude of trial k in scanner units: the coefficient of that trial's unit-peak "
    "regressor (the trial's 2-s box convolved with the subject's HRF, scaled to a maximum "
    "of 1); std over all the subject's trials, ddof=0. sd_v is the temporal standard "
    "deviation of the voxel's noise (BOLD minus baseline minus stimulus response: AR(1), "
    "respiration, cardiac, structured, drift and motion terms) after regressing out a "
    f"constant and a cosine drift basis with cut-off {HIGH_PASS_HZ} Hz (nilearn's 'cosine' "
    "drift model), root-mean-square over the subject's runs. The CNR of an ROI is the "
    "median of CNR_v over its voxels. Targets = HAD's measured values x cnr_scale.")
NOISE_FRACTIONS = {"ar1": 0.78, "respiration": 0.06, "cardiac": 0.05, "structured": 0.08}
INDIVIDUAL_SHARE = 0.35  # variance share of a subject's own component in its maps
DEFORMATION_MM = 4.0  # rms of the smooth individual deformation
MAP_FWHM_MM = 14.0  # smoothness of the response maps
SEMANTIC_SHARE = {"early_visual": 0.3, "visual": 0.6, "cortex": 0.85, "other": 0.5}


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    """An independent generator for one part of the simulation (order-independent)."""
    return np.random.default_rng([seed, *keys])


@dataclass
class Grid:
    """The MNI grid at the simulated resolution and its brain voxels.

    ``xyz``, ``ijk``, ``baseline``, ``grad`` and ROI vectors index the V brain voxels.
    """

    affine: np.ndarray  # (4, 4) voxel -> MNI mm
    shape: tuple[int, int, int]
    brain: np.ndarray  # bool (X, Y, Z)
    ijk: np.ndarray  # int (V, 3)
    xyz: np.ndarray  # float (V, 3) mm
    baseline: np.ndarray  # float (V,) mean signal, ~1000
    grad: np.ndarray  # float (V, 3) baseline gradient per mm (for motion)
    rois: dict[str, np.ndarray] = field(default_factory=dict)  # name -> bool (V,)

    @property
    def n_voxels(self) -> int:
        return len(self.ijk)

    def to_volume(self, values: np.ndarray, dtype=np.float32) -> np.ndarray:
        """Scatter (V, ...) brain values into a (X, Y, Z, ...) volume, zero outside."""
        vol = np.zeros(self.shape + values.shape[1:], dtype, order="F")  # NIfTI's on-disk order
        vol[tuple(self.ijk.T)] = values
        return vol


@lru_cache(maxsize=2)
def make_grid(resolution: float) -> Grid:
    """The nilearn MNI152 grid (origin and extent of its 1-mm template) at ``resolution`` mm.

    Cached: callers must not modify the returned grid.
    """
    from nilearn import datasets  # ships the MNI152 images offline

    tpl = datasets.load_mni152_template(resolution=1)
    shape = tuple(int(s) for s in np.ceil(np.array(tpl.shape) / resolution))
    affine = np.diag([resolution, resolution, resolution, 1.0])
    affine[:3, 3] = tpl.affine[:3, 3]
    # target voxel centres in the 1-mm template's voxel indices: (3, X, Y, Z)
    to_src = np.linalg.inv(tpl.affine) @ affine
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")).reshape(3, -1)
    src = to_src[:3, :3] @ idx + to_src[:3, 3:]

    def sample(img) -> np.ndarray:  # anti-aliased resampling onto the grid, (X, Y, Z)
        data = ndimage.gaussian_filter(np.asarray(img.dataobj, np.float32), resolution / 2.355)
        return ndimage.map_coordinates(data, src, order=1).reshape(shape)

    mask = sample(datasets.load_mni152_brain_mask(resolution=1)) > 0.5
    gm = sample(datasets.load_mni152_gm_template(resolution=1))
    t1 = sample(tpl)
    ijk = np.argwhere(mask)  # (V, 3)
    xyz = ijk * resolution + affine[:3, 3]
    t1v = t1[mask] / max(float(t1[mask].max()), 1e-6)
    baseline_vol = np.zeros(shape, np.float32)
    baseline_vol[mask] = 1000.0 * (1.15 - 0.3 * t1v)  # EPI-like: grey matter brighter than white
    g = np.gradient(ndimage.gaussian_filter(baseline_vol, 1.0), resolution)  # 3 x (X, Y, Z)
    grid = Grid(affine=affine, shape=shape, brain=mask, ijk=ijk, xyz=xyz,
                baseline=baseline_vol[mask].astype(np.float64),
                grad=np.stack([c[mask] for c in g], 1).astype(np.float64))
    cortex = gm[mask] > 0.5
    visual = cortex & (xyz[:, 1] < -62)
    early = visual & (np.abs(xyz[:, 0]) < 22) & (xyz[:, 1] < -70) & (xyz[:, 2] > -14) & (xyz[:, 2] < 22)
    grid.rois = {"cortex": cortex, "visual": visual, "early_visual": early}
    return grid


def smooth_fields(grid: Grid, n: int, fwhm_mm: float, rng: np.random.Generator,
                  volumes: bool = False) -> np.ndarray:
    """``n`` Gaussian random fields, standardised over the brain.

    Returns (n, V) brain values, or (n, X, Y, Z) full volumes when ``volumes``.
    """
    sigma = fwhm_mm / 2.355 / grid.affine[0, 0]
    out = []
    for _ in range(n):
        f = ndimage.gaussian_filter(rng.standard_normal(grid.shape), sigma)
        v = f[grid.brain]
        f = (f - v.mean()) / (v.std() + 1e-12)
        out.append(f if volumes else f[grid.brain])
    return np.asarray(out, np.float32)


# ----------------------------------------------------------------------------- HRF


@dataclass
class HRF:
    """SPM-style double gamma: gamma(delay) - gamma(undershoot) / ratio, dispersion 1 s."""

    delay: float = 6.0  # shape of the positive gamma; its peak is at delay - 1 s
    undershoot: float = 16.0
    ratio: float = 6.0

    def __call__(self, t: np.ndarray) -> np.ndarray:
        """Unit-peak HRF at times ``t`` (s)."""
        h = stats.gamma.pdf(t, self.delay) - stats.gamma.pdf(t, self.undershoot) / self.ratio
        return h / np.abs(h).max() if np.abs(h).max() > 0 else h


def sample_hrf(rng: np.random.Generator) -> HRF:
    """A subject's HRF: peak jittered around 5 s (4.0-6.2 s), undershoot and ratio jittered."""
    delay = float(np.clip(rng.normal(6.0, 0.5), 5.0, 7.2))
    return HRF(delay=round(delay, 3), undershoot=round(delay + 10 + float(rng.normal(0, 1)), 3),
               ratio=round(float(rng.uniform(4.5, 8.0)), 3))


def trial_regressors(onsets: np.ndarray, duration: float, n_vol: int, tr: float, hrf: HRF,
                     dt: float = 0.05) -> np.ndarray:
    """Unit-peak response to each trial, sampled at t_i = i * tr.

    Returns X of shape (n_vol, K) for K onsets (seconds from the scan start).
    """
    tau = np.arange(0, duration + 40.0, dt)  # time after onset
    kernel = hrf(tau)
    box = (tau < duration).astype(float)
    resp = np.convolve(box, kernel)[: len(tau)] * dt
    resp /= resp.max()
    lag = np.arange(n_vol)[:, None] * tr - np.asarray(onsets)[None, :]  # (T, K)
    return np.interp(lag, tau, resp, left=0.0, right=0.0)


def cosine_basis(n_vol: int, tr: float, high_pass: float = HIGH_PASS_HZ) -> np.ndarray:
    """Orthonormal constant + cosine drift basis (T, 1 + order), nilearn's cut-off rule."""
    order = max(int(np.floor(2 * n_vol * high_pass * tr)), 0)
    t = np.arange(n_vol)
    cols = [np.ones(n_vol)] + [np.cos(np.pi * k * (t + 0.5) / n_vol) for k in range(1, order + 1)]
    q, _ = np.linalg.qr(np.stack(cols, 1))
    return q


def highpass_var(noise: np.ndarray, tr: float) -> np.ndarray:
    """Per-voxel variance of (T, V) noise after removing the cosine drift basis."""
    q = cosine_basis(noise.shape[0], tr)
    resid = noise - q @ (q.T @ noise)
    return (resid ** 2).mean(0)


# ----------------------------------------------------------------------------- subjects


@dataclass
class Subject:
    """One simulated subject: maps, HRF and noise parameters (all over the V brain voxels)."""

    maps: np.ndarray  # (F, V) unitless response maps, variance-weighted per voxel
    hrf: HRF
    cnr: np.ndarray  # (V,) target CNR per voxel
    tsnr: np.ndarray  # (V,) temporal SNR (baseline / total noise sd before drift)
    ar1: np.ndarray  # (V,) AR(1) coefficient, 0.5-0.86
    physio: np.ndarray  # (2, V) respiration and cardiac amplitude maps (mean-square 1)
    modes: np.ndarray  # (M, V) spatial maps of the structured noise
    resp_hz: float
    card_hz: float
    mean_response: float  # mean evoked response, in units of the voxel's response sd


def _cnr_targets(grid: Grid, jitter: np.ndarray, scale: float) -> np.ndarray:
    """Per-voxel CNR so that ROI medians equal HAD's values x scale (nested ROIs)."""
    ev, vis, ctx = (grid.rois[k] for k in ("early_visual", "visual", "cortex"))
    groups = [(ev, ev, HAD_CNR["early_visual"]), (vis & ~ev, vis, HAD_CNR["visual"]),
              (ctx & ~vis, ctx, HAD_CNR["cortex"])]
    cnr = 0.1 * jitter  # white matter and the rest of the brain respond weakly
    for members, roi, target in groups:
        if not members.any() or not roi.any():
            continue
        lo, hi = 0.0, 10.0
        for _ in range(60):  # bisection on the group level: the ROI median is monotone in it
            mid = 0.5 * (lo + hi)
            cnr[members] = mid * jitter[members]
            lo, hi = (mid, hi) if np.median(cnr[roi]) < target else (lo, mid)
        cnr[members] = 0.5 * (lo + hi) * jitter[members]
    return cnr * scale


def make_shared_maps(grid: Grid, n_features: int, rng: np.random.Generator) -> np.ndarray:
    """The topography all subjects share: (F, X, Y, Z) smooth fields."""
    return smooth_fields(grid, n_features, MAP_FWHM_MM, rng, volumes=True)


def make_subject(grid: Grid, shared: np.ndarray, n_semantic: int, cnr_scale: float,
                 rng: np.random.Generator) -> Subject:
    """A subject: shared maps warped and mixed with its own component, HRF, noise maps."""
    n_feat = shared.shape[0]
    res = grid.affine[0, 0]
    disp = smooth_fields(grid, 3, 25.0, rng).T * (DEFORMATION_MM / np.sqrt(3) / res)  # (V, 3) vox
    coords = (grid.ijk + disp).T  # (3, V)
    warped = np.stack([ndimage.map_coordinates(s, coords, order=1, mode="nearest") for s in shared])
    own = smooth_fields(grid, n_feat, MAP_FWHM_MM, rng)
    maps = np.sqrt(1 - INDIVIDUAL_SHARE) * warped + np.sqrt(INDIVIDUAL_SHARE) * own  # (F, V)
    # semantic vs low-level share of each voxel's response variance
    share = np.full(grid.n_voxels, SEMANTIC_SHARE["other"])
    for roi in ("cortex", "visual", "early_visual"):
        share[grid.rois[roi]] = SEMANTIC_SHARE[roi]
    maps[:n_semantic] *= np.sqrt(share / n_semantic)
    maps[n_semantic:] *= np.sqrt((1 - share) / max(n_feat - n_semantic, 1))
    jitter = np.exp(0.25 * smooth_fields(grid, 1, 10.0, rng)[0])
    return Subject(
        maps=maps.astype(np.float32), hrf=sample_hrf(rng),
        cnr=_cnr_targets(grid, jitter, cnr_scale),
        tsnr=np.clip(70 * np.exp(0.2 * smooth_fields(grid, 1, 20.0, rng)[0]), 35, 120),
        ar1=0.5 + 0.36 * stats.norm.cdf(smooth_fields(grid, 1, 12.0, rng)[0]),
        physio=np.sqrt(np.exp(0.7 * smooth_fields(grid, 2, 20.0, rng))
                       / np.exp(0.7 ** 2 / 2)),  # lognormal, mean square ~1
        modes=smooth_fields(grid, 4, 30.0, rng),
        resp_hz=round(float(rng.normal(0.2, 0.02)), 4),
        card_hz=round(float(rng.normal(1.17, 0.05)), 4),
        mean_response=round(float(rng.uniform(0.5, 1.0)), 3))


def calibrate(subject: Subject, feats: np.ndarray, noise_sd: np.ndarray):
    """Scale the maps so each voxel hits its CNR over the subject's trials.

    Parameters
    ----------
    feats : (N, F) standardised features of all the subject's trials
    noise_sd : (V,) high-passed noise sd (``CNR_DEFINITION``)

    Returns
    -------
    T : (F, V) response per unit feature, b : (V,) intercept, so that a = b + feats @ T.
    """
    raw = feats @ subject.maps  # (N, V)
    sd = raw.std(0) + 1e-12
    gain = subject.cnr * noise_sd / sd  # (V,)
    T = subject.maps * gain[None, :]
    b = subject.mean_response * subject.cnr * noise_sd - raw.mean(0) * gain
    return T, b


def make_noise(grid: Grid, subject: Subject, n_vol: int, tr: float, rng: np.random.Generator):
    """Noise of one run.

    Returns
    -------
    noise : (T, V) float64, scanner units
    motion : (T, 6) translations (mm: x, y, z) and rotations (rad: about x, y, z)
    """
    V = grid.n_voxels
    sd = grid.baseline / subject.tsnr  # (V,)
    t = np.arange(n_vol) * tr
    # AR(1) with unit stationary variance, per-voxel coefficient
    phi = subject.ar1
    ar = np.empty((n_vol, V))
    ar[0] = rng.standard_normal(V)
    innov = rng.standard_normal((n_vol, V)) * np.sqrt(1 - phi ** 2)
    for i in range(1, n_vol):
        ar[i] = phi * ar[i - 1] + innov[i]
    noise = ar * (np.sqrt(NOISE_FRACTIONS["ar1"]) * sd)
    # respiration and cardiac: sines with wandering phase, sampled at the TR (cardiac aliases)
    for j, (hz, key) in enumerate(((subject.resp_hz, "respiration"), (subject.card_hz, "cardiac"))):
        wander = np.cumsum(rng.normal(0, 0.3, n_vol))
        wave = np.sqrt(2) * np.sin(2 * np.pi * hz * t + rng.uniform(0, 2 * np.pi) + wander)
        noise += np.outer(wave, np.sqrt(NOISE_FRACTIONS[key]) * sd * subject.physio[j])
    # structured low-rank noise: smooth maps with slow AR(1) time courses
    m = len(subject.modes)
    tc = np.empty((n_vol, m))
    tc[0] = rng.standard_normal(m)
    for i in range(1, n_vol):
        tc[i] = 0.9 * tc[i - 1] + np.sqrt(1 - 0.81) * rng.standard_normal(m)
    noise += (tc @ subject.modes) * (np.sqrt(NOISE_FRACTIONS["structured"] / m) * sd)
    # slow drift: linear + quadratic, per voxel
    u = np.linspace(-1, 1, n_vol)
    drift = np.stack([u, 1.5 * u ** 2 - 0.5], 1)  # (T, 2)
    noise += drift @ (rng.normal(0, 0.8, (2, V)) * sd)
    # head motion: small random walks, effect = -grad(baseline) . displacement
    steps = rng.normal(0, 1, (n_vol, 6)) * np.array([0.01, 0.01, 0.015, 2e-4, 2e-4, 2e-4])
    motion = np.cumsum(steps, 0)
    motion -= motion[0]
    # displacement d_v = t + w x r_v, so grad . d_v = t . grad + w . (r_v x grad)
    r = grid.xyz - grid.xyz.mean(0)  # (V, 3) lever arms, mm
    noise -= motion[:, :3] @ grid.grad.T + motion[:, 3:] @ np.cross(r, grid.grad).T
    return noise, motion


def synthesize_run(grid: Grid, subject: Subject, T: np.ndarray, b: np.ndarray,
                   feats: np.ndarray, onsets: np.ndarray, duration: float, noise: np.ndarray,
                   tr: float) -> np.ndarray:
    """The BOLD of one run as int16 (X, Y, Z, T).

    feats: (K, F) standardised features of the run's trials; onsets: (K,) s from scan start.
    """
    n_vol = noise.shape[0]
    X = trial_regressors(onsets, duration, n_vol, tr, subject.hrf)  # (T, K)
    amp = b[None, :] + feats @ T  # (K, V)
    bold = grid.baseline[None, :] + X @ amp + noise  # (T, V)
    vals = np.clip(np.rint(bold), -32768, 32767).astype(np.int16)
    vol = np.zeros(grid.shape + (n_vol,), np.int16, order="F")  # NIfTI's on-disk order
    vol[tuple(grid.ijk.T)] = vals.T
    return vol
