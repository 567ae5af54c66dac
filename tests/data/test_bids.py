"""Trial tables from the project's own fixtures: HAD raw/fMRIPrep/CIFTI, and bad layouts."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fmri2text.config import DataConfig
from fmri2text.data.bids import load_trials, window_start
from fmri2text.errors import UserError

from .conftest import CLASSES, HAD_COLUMNS, had_onsets, had_rows, make_had, write_bold, write_cifti, write_events


def test_had_raw_trial_table(had_root: Path):
    captions = {had_rows("01", 1, 10)[0]["stim_file"]: ["a person shoots an arrow"]}
    (had_root / "derivatives" / "simulation").mkdir(parents=True)
    (had_root / "derivatives/simulation/captions.json").write_text(json.dumps(captions))
    t = load_trials(had_root, DataConfig())
    assert len(t) == 2 * 2 * 10 and list(t["subject"].unique()) == ["01", "02"]
    assert t["run"].dtype == np.int64 and set(t["run"]) == {1, 2}
    first = t[(t.subject == "01") & (t.run == 1)]
    np.testing.assert_allclose(first["onset"], had_onsets(10) + 0.1 + 12.0)  # +12 s: min < 6
    assert set(t["class_name"]) == set(CLASSES)
    ids = dict(zip(t["class_name"], t["class_id"]))
    assert ids == {c: i + 1 for i, c in enumerate(sorted(CLASSES))}
    assert first["group"].iat[0] == "01r01t000xx" and first["group"].iat[1] == "01r01t000xx"
    assert first["captions"].iat[0] == ["a person shoots an arrow"] and first["captions"].iat[2] == []
    assert np.isnan(first["response"].iat[1])  # 'n/a' read as missing, row kept
    assert (t["tr"] == 2.0).all() and (t["n_volumes"] == 40).all()
    assert all(Path(p).is_relative_to(had_root.resolve() / "stimuli") for p in t["stim_path"])


def test_onset_offset_not_added_twice(had_root: Path):
    path = had_root / "sub-01/ses-action01/func/sub-01_ses-action01_task-action_run-01_events.tsv"
    rows = had_rows("01", 1, 10)
    for r in rows:
        r["onset"] = float(r["onset"]) + 12.0  # v2 events already count from scan start
    write_events(path, rows, HAD_COLUMNS)
    t = load_trials(had_root, DataConfig())
    np.testing.assert_allclose(t[(t.subject == "01") & (t.run == 1)]["onset"], had_onsets(10) + 12.1)


def test_class_folders_with_underscores(had_root: Path):
    stim = next(r["stim_file"] for r in had_rows("01", 1, 10) if r["stim_file"].startswith("Playing"))
    clip = had_root / "stimuli" / stim.replace(" ", "_")  # HAD v2 style names
    clip.parent.mkdir(parents=True)
    clip.write_bytes(b"")
    t = load_trials(had_root, DataConfig())
    row = t[t["stim_file"].str.startswith("Playing guitar/")].iloc[0]
    assert row["class_name"] == "Playing guitar"
    assert t.loc[t["stim_file"] == stim, "stim_path"].iat[0] == str(clip.resolve())


def test_fmriprep_flat_and_mni_layouts(tmp_path: Path):
    root = make_had(tmp_path / "had", subjects=("01",), runs=2, raw_bold=False)
    flat = root / "derivatives/fmriprep/sub-01"
    mni = root / "derivatives/fmriprep/sub-01/ses-action01/func"
    for run in (1, 2):
        write_bold(flat / f"sub-01_task-action_run-{run}_desc-preproc_bold.nii.gz", 40, 2.0)
        write_bold(mni / f"sub-01_ses-action01_task-action_run-{run}_space-MNI152NLin2009cAsym"
                   f"_desc-preproc_bold.nii.gz", 41, 2.0)
    t = load_trials(root, DataConfig(space="fmriprep", bold_dir="derivatives/fmriprep"))
    assert len(t) == 20 and set(t["session"]) == {"action01"}
    assert all("desc-preproc" in p and "space-" not in p for p in t["bold_path"])
    t2 = load_trials(root, DataConfig(space="fmriprep", bold_dir="derivatives/fmriprep",
                                      bold_space="MNI152NLin2009cAsym"))
    assert len(t2) == 20 and (t2["n_volumes"] == 41).all()
    with pytest.raises(UserError, match="no fmriprep BOLD"):
        load_trials(root, DataConfig(space="fmriprep", bold_dir="derivatives/fmriprep",
                                     bold_space="T1w"))


def test_cifti_layout_reads_header(tmp_path: Path):
    root = make_had(tmp_path / "had", subjects=("01",), runs=2, raw_bold=False)
    for run in (1, 2):
        write_cifti(root / f"derivatives/ciftify/sub-01/results/ses-action01_task-action_run-{run}"
                    "_Atlas.dtseries.nii", 40, 2.0, n_left=7, n_right=9)
    t = load_trials(root, DataConfig(space="cifti", bold_dir="derivatives/ciftify"))
    assert len(t) == 20 and (t["tr"] == 2.0).all() and (t["n_volumes"] == 40).all()


def test_bold_moments_style_layout(tmp_path: Path):
    root = tmp_path / "bmd"
    rows_per_run = []
    for ses in ("02", "03"):
        for task in ("train", "test"):
            func = root / f"sub-01/ses-{ses}/func"
            rows = [{"onset": 4.0 * (k + 1), "duration": 3.0, "trial_type": task, "value": 0,
                     "stim_file": f"{task}/{k + (1001 if task == 'test' else 1):04d}.mp4"}
                    for k in range(6)]
            rows[2] = {**rows[2], "stim_file": "n/a", "trial_type": "oddball"}
            write_events(func / f"sub-01_ses-{ses}_task-{task}_run-1_events.tsv", rows,
                         ["onset", "duration", "stim_file", "trial_type", "value"])
            write_bold(func / f"sub-01_ses-{ses}_task-{task}_run-1_bold.nii.gz", 20, 1.75)
            rows_per_run.append(rows)
    ann = root / "derivatives/stimuli_metadata/annotations.json"
    ann.parent.mkdir(parents=True)
    ann.write_text(json.dumps({"0001": {"set": "train", "text_descriptions": ["a dog runs", "dog"]}}))
    from fmri2text.config import load_config

    cfg = load_config(Path(__file__).parents[2] / "configs/bold_moments.yaml").data
    t = load_trials(root, cfg)
    assert len(t) == 4 * 5 and (t["n_dropped_rows"] == 1).all()  # oddballs dropped
    assert set(t["task"]) == {"train", "test"} and set(t["session"]) == {"02", "03"}
    assert (t["tr"] == 1.75).all() and (t["class_id"] == -1).all()
    np.testing.assert_allclose(t["onset"].iloc[:2], [4.0, 8.0])  # no offset added
    assert t.loc[t.stim_file == "train/0001.mp4", "captions"].iat[0] == ["a dog runs", "dog"]
    assert (t["group"] == t["stim_file"]).all()


def test_window_start_rounds_to_nearest_tr():
    np.testing.assert_array_equal(window_start([12.1, 12.9, 0.0], 2.0, 4.0), [8, 8, 2])


# ------------------------------------------------------------------------------ bad inputs


def test_stim_file_escaping_root_is_refused(had_root: Path):
    path = had_root / "sub-01/ses-action01/func/sub-01_ses-action01_task-action_run-01_events.tsv"
    rows = had_rows("01", 1, 10)
    rows[3]["stim_file"] = "../../etc/passwd"
    write_events(path, rows, HAD_COLUMNS)
    with pytest.raises(UserError, match="outside the dataset root") as err:
        load_trials(had_root, DataConfig())
    assert err.value.path == path


def test_symlink_leaving_root_is_refused(had_root: Path, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (had_root / "stimuli").mkdir()
    os.symlink(outside, had_root / "stimuli" / "Archery")
    with pytest.raises(UserError, match="outside the dataset root"):
        load_trials(had_root, DataConfig())


def test_run_without_events_file(had_root: Path):
    (had_root / "sub-02/ses-action01/func/sub-02_ses-action01_task-action_run-02_events.tsv").unlink()
    with pytest.raises(UserError, match="no events file") as err:
        load_trials(had_root, DataConfig())
    assert "run-02_bold" in str(err.value.path)


def test_duplicate_runs(had_root: Path):
    func = had_root / "sub-01/ses-action01/func"
    shutil.copy(func / "sub-01_ses-action01_task-action_run-01_bold.nii.gz",
                func / "sub-01_ses-action01_task-action_run-01_bold.nii")  # gz and plain copy
    with pytest.raises(UserError, match="duplicate"):
        load_trials(had_root, DataConfig())


def test_tr_mismatch_between_sidecar_and_header(had_root: Path):
    func = had_root / "sub-01/ses-action01/func"
    write_bold(func / "sub-01_ses-action01_task-action_run-02_bold.nii.gz", 40, 2.0, sidecar_tr=1.5)
    with pytest.raises(UserError, match="TR mismatch") as err:
        load_trials(had_root, DataConfig())
    assert "run-02_bold" in str(err.value.path)


def test_onsets_past_end_of_run(had_root: Path):
    func = had_root / "sub-02/ses-action01/func"
    write_bold(func / "sub-02_ses-action01_task-action_run-01_bold.nii.gz", 20, 2.0)
    with pytest.raises(UserError, match="volumes") as err:
        load_trials(had_root, DataConfig())
    assert err.value.path.name == "sub-02_ses-action01_task-action_run-01_events.tsv"


def test_events_missing_columns(had_root: Path):
    path = had_root / "sub-01/ses-action01/func/sub-01_ses-action01_task-action_run-01_events.tsv"
    pd.DataFrame({"onset": [0.0], "duration": [2.0]}).to_csv(path, sep="\t", index=False)
    with pytest.raises(UserError, match="stim_file"):
        load_trials(had_root, DataConfig())
