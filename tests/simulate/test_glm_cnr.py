"""A standard nilearn GLM recovers the simulated clip responses at the configured CNR.

CNR as defined in truth.json: sd over trials of a voxel's single-trial response amplitude
(peak units) / sd of its high-passed noise, median over the ROI. Measured here from data:

- responses: nilearn FirstLevelModel, one regressor per trial (LSA), glover HRF, cosine
  drift 0.01 Hz, AR(1); each beta is scaled to peak units. With single presentations 4 s
  apart the betas carry a lot of estimation noise, so the signal sd is the part of the
  betas that follows the true amplitudes a: cov_k(beta_k, a_k) / sd_k(a_k).
- noise: residual sd after regressing each voxel on the same design's drift terms and the
  response predicted by the truth (sum_k a_k x regressor_k), dof-corrected.
"""

import json
import warnings

import nibabel as nib
import numpy as np
import pandas as pd
from nilearn.glm.first_level import FirstLevelModel
from nilearn.maskers import NiftiMasker


def _measured_cnr(out, subject: str, roi: str) -> tuple[float, float]:
    deriv = out / "derivatives" / "simulation"
    bold = next((out / subject).glob("ses-action01/func/*_run-01_bold.nii.gz"))
    ev = pd.read_csv(str(bold).replace("_bold.nii.gz", "_events.tsv"), sep="\t")
    events = pd.DataFrame({"onset": ev.onset + 12.0, "duration": ev.duration,
                           "trial_type": [f"trial{k:02d}" for k in range(len(ev))]})
    mask = nib.load(deriv / "rois" / f"{roi}_mask.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        glm = FirstLevelModel(t_r=2.0, hrf_model="glover", drift_model="cosine", high_pass=0.01,
                              noise_model="ar1", signal_scaling=False, mask_img=mask)
        glm.fit(str(bold), events=events)
        design = glm.design_matrices_[0]
        trials = [c for c in design.columns if c.startswith("trial")]
        peaks = design[trials].max().values
        betas = np.stack([np.ravel(glm.masker_.transform(glm.compute_contrast(c, output_type="effect_size")))
                          for c in trials]) * peaks[:, None]  # (K, V) peak units
        masker = NiftiMasker(mask).fit()
        Y = masker.transform(str(bold))  # (T, V)
        maps = masker.transform(str(deriv / subject / f"{subject}_desc-truth_maps.nii.gz"))  # (F+1, V)
    # true amplitudes of this run's trials, from clips.tsv + features.npz + truth maps
    clips = pd.read_csv(deriv / "clips.tsv", sep="\t")
    feats = np.load(deriv / "features.npz", allow_pickle=False)
    rows = np.where((clips.subject == subject) & (clips.run == 1))[0]
    rows = rows[np.argsort(clips.trial.values[rows])]
    assert list(clips.stim_file.values[rows]) == list(ev.stim_file)
    F = (np.concatenate([feats["semantic"], feats["lowlevel"]], 1)[rows] - feats["feature_mean"]) \
        / feats["feature_std"]
    amp = maps[-1] + F @ maps[:-1]  # (K, V)

    centred = amp - amp.mean(0)
    signal = ((betas - betas.mean(0)) * centred).sum(0) / (len(amp) - 1) / amp.std(0, ddof=1)
    X = design[trials].values / peaks  # (T, K) unit-peak regressors
    drift = design[[c for c in design.columns if not c.startswith("trial")]].values
    noise = np.empty(Y.shape[1])
    for v in range(Y.shape[1]):
        Z = np.column_stack([X @ amp[:, v], drift])
        coef, *_ = np.linalg.lstsq(Z, Y[:, v], rcond=None)
        noise[v] = np.sqrt(((Y[:, v] - Z @ coef) ** 2).sum() / (len(Y) - Z.shape[1]))
    corr = np.median([np.corrcoef(betas[:, v], amp[:, v])[0, 1] for v in range(Y.shape[1])])
    return float(np.median(signal / noise)), float(corr)


def test_glm_recovers_responses_at_the_configured_visual_cnr(tiny_dataset):
    out, cfg = tiny_dataset
    target = json.loads((out / "derivatives/simulation/truth.json").read_text())["cnr_targets"]["visual"]
    assert target == 0.63 * cfg.cnr_scale
    for s in range(1, cfg.subjects + 1):
        cnr, corr = _measured_cnr(out, f"sub-{s:02d}", "visual")
        assert abs(cnr - target) <= 0.3 * target, (s, cnr, target)
        assert corr > 0.2, (s, corr)  # the single-trial betas follow the true responses
