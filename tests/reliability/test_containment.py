"""Containment: nothing a dataset names may resolve outside its root (DESIGN §8, issue 8.4).

The HTML report's escaping of ``<script>`` captions is tested in tests/report.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable

import pytest

from fmri2text.config import DataConfig
from fmri2text.data.bids import load_trials
from fmri2text.errors import UserError
from tests.data.conftest import HAD_COLUMNS, had_rows, make_had, write_events

FUNC = "sub-01/ses-action01/func"
STEM = "sub-01_ses-action01_task-action_run-01"
FIRST_STIM = had_rows("01", 1, 10)[0]["stim_file"]


def _stim(value: str) -> Callable[[Path, Path], str]:
    def setup(root: Path, outside: Path) -> str:
        rows = had_rows("01", 1, 10)
        rows[0]["stim_file"] = value
        write_events(root / FUNC / f"{STEM}_events.tsv", rows, HAD_COLUMNS)
        return "outside the dataset root"
    return setup


def _stim_file_link(root: Path, outside: Path) -> str:
    link = root / "stimuli" / FIRST_STIM
    link.parent.mkdir(parents=True)
    (outside / "clip.mp4").write_bytes(b"x")
    link.symlink_to(outside / "clip.mp4")
    return "outside the dataset root"


def _stim_folder_link(root: Path, outside: Path) -> str:
    (root / "stimuli").mkdir()
    (root / "stimuli" / Path(FIRST_STIM).parts[0]).symlink_to(outside, target_is_directory=True)
    return "outside the dataset root"


def _stimuli_root_link(root: Path, outside: Path) -> str:
    (root / "stimuli").symlink_to(outside, target_is_directory=True)
    return "outside the dataset root"


def _bold_link(root: Path, outside: Path) -> str:
    bold = root / FUNC / f"{STEM}_bold.nii.gz"
    shutil.move(bold, outside / bold.name)
    bold.symlink_to(outside / bold.name)
    return "outside the dataset root"


def _session_folder_link(root: Path, outside: Path) -> str:
    ses = root / "sub-01/ses-action01"
    shutil.move(ses, outside / "ses")
    ses.symlink_to(outside / "ses", target_is_directory=True)
    return "outside the dataset root"


def _captions_outside(root: Path, outside: Path) -> str:
    (outside / "captions.json").write_text(json.dumps({FIRST_STIM: ["x"]}))
    return "data.captions"


CASES = {
    "stim_dotdot": _stim("../../../etc/passwd"),
    "stim_dotdot_inside_name": _stim("Archery/../../../secret.mp4"),
    "stim_absolute": _stim("/etc/passwd"),
    "stim_deep_dotdot": _stim("a/b/../../../../../outside/x.mp4"),
    "stim_file_symlink_out": _stim_file_link,
    "stim_folder_symlink_out": _stim_folder_link,
    "stimuli_root_symlink_out": _stimuli_root_link,
    "bold_symlink_out": _bold_link,
    "session_folder_symlink_out": _session_folder_link,
    "captions_path_outside": _captions_outside,
}


@pytest.mark.parametrize("name", list(CASES))
def test_paths_leaving_the_root_are_refused(tmp_path: Path, name: str):
    root = make_had(tmp_path / "ds", subjects=("01", "02"), runs=1, n_trials=10, n_volumes=40)
    outside = tmp_path / "outside"
    outside.mkdir()
    needle = CASES[name](root, outside)
    cfg = DataConfig(workers=1)
    if name == "captions_path_outside":
        cfg = replace(cfg, captions="../outside/captions.json")
    with pytest.raises(UserError, match=needle.replace(".", r"\.")) as err:
        load_trials(root, cfg)
    assert err.value.path is not None and err.value.fix


def test_symlinks_inside_the_root_are_fine(tmp_path: Path):
    """DataLad-style datasets: files are links to an annex inside the dataset."""
    root = make_had(tmp_path / "ds", subjects=("01", "02"), runs=1, n_trials=10, n_volumes=40)
    annex = root / ".git/annex/objects"
    annex.mkdir(parents=True)
    bold = root / FUNC / f"{STEM}_bold.nii.gz"
    shutil.move(bold, annex / "key")
    bold.symlink_to(annex / "key")
    clip = root / "stimuli" / FIRST_STIM
    clip.parent.mkdir(parents=True)
    (annex / "clip").write_bytes(b"x")
    clip.symlink_to(annex / "clip")
    t = load_trials(root, DataConfig(workers=1))
    assert len(t) == 20 and t["stim_path"].iat[0] == str((annex / "clip").resolve())
