"""The real HAD and BOLD Moments metadata (../shared/data), with synthetic images written here.

Skips when the reference data is absent. Nothing from it is copied into the repository:
the events/sidecars are copied into a tmp dir and tiny NIfTIs are written beside them.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from fmri2text.config import load_config
from fmri2text.data.bids import load_trials
from fmri2text.data.fmri import extract_responses
from fmri2text.data.splits import assign_splits, check_leakage

from .conftest import write_bold

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _copy_metadata(src: Path, dst: Path) -> list[Path]:
    """Copy top-level JSON and every func/*_events.tsv, *_bold.json; return the bold JSONs."""
    for f in src.glob("*.json"):
        shutil.copy(f, dst / f.name)
    sidecars = []
    for f in sorted(src.glob("sub-*/ses-*/func/*")):
        if f.name.endswith(("_events.tsv", "_bold.json")):
            out = dst / f.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, out)
            if f.name.endswith("_bold.json"):
                sidecars.append(out)
    return sidecars


def test_had_metadata(shared_data: Path, tmp_path: Path):
    src = shared_data / "had-metadata"
    for i, sidecar in enumerate(_copy_metadata(src, tmp_path)):
        write_bold(Path(str(sidecar).replace(".json", ".nii.gz")), 156, 2.0, shape=(4, 4, 3), seed=i)
    cfg = load_config(CONFIGS / "had.yaml")
    t = load_trials(tmp_path, cfg.data)
    assert sorted(t["subject"].unique()) == ["01", "02", "03", "24"]
    counts = t.groupby(["subject", "run"]).size()
    assert len(counts) == 4 * 12 and (counts == 60).all()
    # class ids: 1 + ASCII sort index of the class folders listed in stimuli-list.txt
    folders = sorted({line.split("/")[0] for line in (src / "stimuli-list.txt").read_text().splitlines()})
    assert len(folders) == 180
    assert (t["class_id"] == t["class_name"].map(lambda c: folders.index(c) + 1)).all()
    assert t["group"].str.len().eq(11).all()
    assert (t["group"] == t["stim_file"].str.extract(r"_id_(.{11})_start_")[0]).all()
    # absolute onsets: HAD's events count from the first trial, which starts 12 s into the scan
    for (sub, run), rows in t.groupby(["subject", "run"]):
        events = pd.read_csv(rows["events_path"].iat[0], sep="\t")
        np.testing.assert_allclose(rows["onset"].to_numpy(), events["onset"].to_numpy() + 12.0)
        assert rows["onset"].min() >= 12.0 and rows["onset"].max() < 156 * 2.0
    # sub-24 run 5 was re-acquired at the end of the session: still run 5, 60 trials, own file
    r5 = t[(t.subject == "24") & (t.run == 5)]
    assert len(r5) == 60 and r5["bold_path"].iat[0].endswith("sub-24_ses-action01_task-action_run-05_bold.nii.gz")
    # 'n/a' responses are missing values; the trials stay
    ev = (tmp_path / "sub-24/ses-action01/func/sub-24_ses-action01_task-action_run-04_events.tsv").read_text()
    n_na = sum("n/a" in line for line in ev.splitlines())
    sub24 = t[(t.subject == "24") & (t.run == 4)]
    assert n_na >= 1 and sub24["response"].isna().sum() == n_na and len(sub24) == 60
    # the whole chain runs on the real timing: responses and a leak-free split
    resp = extract_responses(t[t.subject == "24"], cfg.data)
    assert resp.data.shape == (720, 4) and np.isfinite(resp.data).all()
    split = assign_splits(t, cfg.split.__class__(n_heldout=1))
    check_leakage(split)
    assert set(split.loc[split.subject == "24", "split"]) == {"adapt", "test"}


def test_bold_moments_metadata(shared_data: Path, tmp_path: Path):
    src = shared_data / "bmd-metadata"
    sidecars = _copy_metadata(src, tmp_path)
    for i, sidecar in enumerate(sidecars):
        events = pd.read_csv(str(sidecar).replace("_bold.json", "_events.tsv"), sep="\t")
        n_volumes = math.ceil((events["onset"].max() + 4.0) / 1.75) + 4
        write_bold(Path(str(sidecar).replace(".json", ".nii.gz")), n_volumes, 1.75, shape=(3, 3, 3), seed=i)
    ann = src / "derivatives/stimuli_metadata/llm_frame_annotations.json"
    (tmp_path / "derivatives/stimuli_metadata").mkdir(parents=True)
    shutil.copy(ann, tmp_path / "derivatives/stimuli_metadata/annotations.json")
    cfg = load_config(CONFIGS / "bold_moments.yaml", ["data.caption_field=GIT-git-large-coco"])
    t = load_trials(tmp_path, cfg.data)
    n_rows, n_odd = 0, 0
    for f in sorted(tmp_path.glob("sub-*/ses-*/func/*_events.tsv")):
        ev = pd.read_csv(f, sep="\t", keep_default_na=False)
        n_rows += len(ev)
        n_odd += int((ev["stim_file"] == "n/a").sum())
    assert n_odd > 0 and len(t) == n_rows - n_odd  # oddball trials dropped
    assert (t["tr"] == 1.75).all() and set(t["task"]) == {"train", "test"}
    assert t["stim_file"].str.fullmatch(r"(train|test)/\d{4}\.mp4").all()
    assert t.groupby(["subject", "task"])["run"].nunique().to_dict() == {
        ("01", "test"): 3, ("01", "train"): 10, ("02", "test"): 3, ("02", "train"): 10}
    assert (t["captions"].map(len) == 5).all()  # five captions per video, looked up by stem
    for _, rows in t.groupby(["subject", "task", "run"]):  # already absolute: nothing added
        ev = pd.read_csv(rows["events_path"].iat[0], sep="\t", keep_default_na=False)
        np.testing.assert_allclose(rows["onset"], ev.loc[ev.stim_file != "n/a", "onset"].astype(float))
    split = assign_splits(t, cfg.split.__class__(n_heldout=1, test_stim_pattern="^test/", overlap="drop"))
    check_leakage(split)
    test = split[split.split == "test"]
    assert len(test) and test["stim_file"].str.startswith("test/").all() and (test.subject == "02").all()
    assert not split[split.subject == "01"]["stim_file"].str.startswith("test/").any()
