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


#: three small clips (32 px, 8 fps, 2 s) and the sha256 of their frames and mp4 bytes; a
#: machine whose rendering or encoding differs from the one these were recorded on fails here
CLIP_DIGESTS = [
    (("4QZLK0ua3nP", 10.0, "star", "pink", "sliding right", "grass", 0.3, 0.5, 0.12, 1.0, 0.4, 0.2, 123),
     "fb994d061cc57d530a2e567d05fea5669f739f4b2828ef6d245e563365e86e4b",
     "b48d8c8f05939690e5ea58d490e179749cad6d57ffc3af0a56feb5ebf9da6faf"),
    (("8EJzQIXg35z", 107.0, "ball", "white", "shrinking", "night", 0.5, 0.5, 0.15, 1.1, 0.1, 0.0, 7),
     "5d5e566fdfa09c4cc935be52d782b1f17f53b0543778b577c4194be3166e70d8",
     "1a08a80dbec5d4ef381094e3c0e6f35c845f2e6f7dacbcf84f20179258d65836"),
    (("Tp0kwnHno-b", 54.5, "ring", "green", "orbiting", "sea", 0.4, 0.4, 0.1, 0.9, 1.2, 0.5, 99),
     "2b7b789358b73e9882d96bab697f456d11af3a2dbe895c1ab52940277628e705",
     "dbdceaa64a18c2d4bba1a3cadf3650bf75842353694b67dfccf5b7e1f9fa6a89"),
]


def test_clips_match_recorded_digests_and_encode_identically_every_time():
    from fmri2text.simulate import stimuli

    for args, frames_sha, mp4_sha in CLIP_DIGESTS:
        frames, _ = stimuli.render_clip(stimuli.ClipSpec(*args), 8, 2.0, 32)
        assert hashlib.sha256(frames.tobytes()).hexdigest() == frames_sha, args[2:5]
        # the same frames encoded many times (heap reuse differs each time): one result
        encoded = {hashlib.sha256(stimuli.encode_mp4(frames, 8)).hexdigest() for _ in range(40)}
        assert encoded == {mp4_sha}, args[2:5]


def test_two_processes_encode_the_same_bytes():
    import subprocess
    import sys

    code = ("import hashlib; from fmri2text.simulate import stimuli as s; "
            f"f, _ = s.render_clip(s.ClipSpec(*{CLIP_DIGESTS[0][0]!r}), 8, 2.0, 64); "
            "print(hashlib.sha256(s.encode_mp4(f, 8)).hexdigest())")
    out = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout for _ in range(2)]
    assert out[0] == out[1] and len(out[0].strip()) == 64


def test_yuv_conversion_is_bt601_limited_range():
    import numpy as np

    from fmri2text.simulate.stimuli import rgb_to_yuv420p

    frame = np.zeros((4, 4, 3), np.uint8)
    frame[:, :2] = (255, 255, 255)  # white left half, black right half
    yuv = rgb_to_yuv420p(frame)
    assert yuv.shape == (6, 4)
    assert (yuv[:4, :2] == 235).all() and (yuv[:4, 2:] == 16).all()  # luma range 16..235
    assert (yuv[4:] == 128).all()  # no chroma in grey levels
