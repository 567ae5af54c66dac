"""Same config and seed give byte-identical files; another seed gives other data."""

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest

from fmri2text.config import SimulateConfig
from fmri2text.errors import UserError
from fmri2text.simulate.bids_writer import simulate_dataset

SMALL = SimulateConfig(subjects=2, runs=1, classes=3, seed=3, resolution=12.0, web_clips=2,
                       fps=4, frame_size=16)


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a, b, c = (simulate_dataset(tmp_path / n, cfg) for n, cfg in
               (("a", SMALL), ("b", SMALL), ("c", replace(SMALL, seed=4))))
    da, db, dc = _digests(a), _digests(b), _digests(c)
    assert len(da) > 100 and da == db
    bold = "sub-01/ses-action01/func/sub-01_ses-action01_task-action_run-01_bold.nii.gz"
    assert bold in dc and dc[bold] != da[bold]
    assert dc["derivatives/simulation/captions.json"] != da["derivatives/simulation/captions.json"]
    # rewriting an earlier simulation replaces it (no stale files left behind)
    simulate_dataset(c, SMALL)
    assert _digests(c) == da
    # clips and subjects spread over 2 worker processes: the same bytes
    assert _digests(simulate_dataset(tmp_path / "d", SMALL, workers=2)) == da


@pytest.mark.parametrize("change, key", [(dict(subjects=-1), "subjects"), (dict(classes=1), "classes"),
                                         (dict(frame_size=33), "frame_size"),
                                         (dict(volumes_per_run=100), "volumes_per_run"),
                                         (dict(resolution=0.5), "resolution")])
def test_bad_settings_are_user_errors(tmp_path, change, key):
    with pytest.raises(UserError, match=f"simulate.{key}"):
        simulate_dataset(tmp_path / "x", replace(SMALL, **change))


def test_foreign_or_file_output_is_refused(tmp_path):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        simulate_dataset(tmp_path / "foreign", SMALL)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        simulate_dataset(tmp_path / "file", SMALL)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"
