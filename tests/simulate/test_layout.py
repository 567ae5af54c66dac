"""The simulated dataset is a BIDS dataset in HAD's layout with consistent ground truth."""

import json

import av
import bids
import nibabel as nib
import numpy as np
import pandas as pd

from fmri2text.simulate.bids_writer import onset_grid

EVENT_COLUMNS = ["onset", "duration", "trial_type", "response", "response_time", "stim_file"]


def test_pybids_parses_the_dataset(tiny_dataset):
    out, cfg = tiny_dataset
    layout = bids.BIDSLayout(out, validate=True)  # stimuli/ and derivatives/ pass the validator
    assert layout.get_subjects() == [f"{s:02d}" for s in range(1, cfg.subjects + 1)]
    assert layout.get_tasks() == ["action"]
    bolds = layout.get(suffix="bold", extension=".nii.gz")
    assert len(bolds) == cfg.subjects * cfg.runs
    assert layout.get_metadata(bolds[0].path)["RepetitionTime"] == 2.0


def test_runs_follow_had_timing_and_class_order(tiny_dataset):
    out, cfg = tiny_dataset
    folders = sorted(p.name for p in (out / "stimuli").iterdir())
    assert len(folders) == cfg.classes and any(" " in f for f in folders)
    bolds = sorted(out.glob("sub-*/ses-action01/func/*_bold.nii.gz"))
    assert len(bolds) == cfg.subjects * cfg.runs
    for bold in bolds:
        img = nib.load(bold)
        assert img.shape[3] == 156 and img.header.get_zooms()[3] == 2.0
        assert img.get_data_dtype() == np.int16
        assert np.allclose(img.header.get_zooms()[:3], cfg.resolution)
        ev = pd.read_csv(str(bold).replace("_bold.nii.gz", "_events.tsv"), sep="\t")
        assert list(ev.columns) == EVENT_COLUMNS
        assert len(ev) == 60
        np.testing.assert_array_equal(ev.onset.values, onset_grid())
        assert ev.onset.iloc[0] == 0.0 and ev.onset.iloc[5] == 24.0 and ev.onset.iloc[-1] == 280.0
        assert (ev.duration == 2.0).all()
        for tt, stim in zip(ev.trial_type, ev.stim_file):
            folder = stim.split("/")[0]
            assert tt == float(folders.index(folder) + 1)
            assert (out / "stimuli" / stim).is_file()
            assert stim.startswith(f"{folder}/v_{folder}_id_") and stim.endswith("_label_1.mp4")


def test_every_mp4_decodes_to_the_configured_frames(tiny_dataset):
    out, cfg = tiny_dataset
    files = sorted(out.glob("stimuli/*/*.mp4")) + sorted(out.glob("derivatives/simulation/webclips/*.mp4"))
    assert len(files) == cfg.subjects * cfg.runs * 60 + cfg.web_clips
    for f in files:
        with av.open(str(f)) as container:
            frames = [fr.to_ndarray(format="rgb24") for fr in container.decode(video=0)]
        assert len(frames) == round(cfg.fps * cfg.clip_seconds)
        assert frames[0].shape == (cfg.frame_size, cfg.frame_size, 3)
        assert np.ptp(frames[0]) > 50  # an actual picture, not a flat frame


def test_ground_truth_tables_are_consistent(tiny_dataset):
    out, cfg = tiny_dataset
    deriv = out / "derivatives" / "simulation"
    clips = pd.read_csv(deriv / "clips.tsv", sep="\t")
    caps = json.loads((deriv / "captions.json").read_text())
    assert list(clips.stim_file) == list(caps) and clips.stim_file.is_unique
    assert all(len(set(c)) >= 2 and all(s.endswith(".") for s in c) for c in caps.values())
    sizes = clips.groupby("group").size()
    assert sizes.max() <= 3 and (sizes >= 2).mean() > 0.9  # source videos yield 2-3 clips
    assert (clips.groupby("group").class_id.nunique() == 1).all()
    feats = np.load(deriv / "features.npz", allow_pickle=False)
    assert list(feats["stim_file"]) == list(clips.stim_file)
    assert feats["semantic"].shape == (len(clips), len(feats["semantic_names"]))
    assert np.all(feats["semantic"].sum(1) == 4)  # one shape, colour, action and scene each
    web = json.loads((deriv / "webclips" / "captions.json").read_text())
    web_ids = {name.removesuffix(".mp4") for name in web}
    assert len(web_ids) == cfg.web_clips and all(len(i) == 11 for i in web_ids)
    assert web_ids.isdisjoint(set(clips.group))
    truth = json.loads((deriv / "truth.json").read_text())
    assert "median" in truth["cnr_definition"] and truth["cnr_targets"]["visual"] == 0.63
    for roi in ("cortex", "visual", "early_visual"):
        mask = nib.load(deriv / "rois" / f"{roi}_mask.nii.gz").get_fdata()
        assert mask.sum() > 10


def test_subjects_share_but_differ_in_their_response_maps(tiny_dataset):
    out, cfg = tiny_dataset
    deriv = out / "derivatives" / "simulation"
    brain = nib.load(deriv / "rois" / "cortex_mask.nii.gz").get_fdata() > 0
    maps = []
    for s in range(1, cfg.subjects + 1):
        img = nib.load(deriv / f"sub-{s:02d}" / f"sub-{s:02d}_desc-truth_maps.nii.gz")
        data = img.get_fdata()[brain][:, :-1]  # (V, F) without the intercept volume
        maps.append((data / np.linalg.norm(data, axis=1, keepdims=True)).ravel())  # without voxel gains
    corr = np.corrcoef(maps)[np.triu_indices(cfg.subjects, 1)]
    assert np.all(corr > 0.15) and np.all(corr < 0.85), corr
