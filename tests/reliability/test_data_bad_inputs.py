"""Bad data through the library loaders: each gives a UserError naming the file at fault.

A tiny HAD-layout dataset (two subjects, one run, 10 trials) is written, one file is broken,
and ``load_trials`` + ``extract_responses`` (or ``read_frames`` for clips) must refuse it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest

from fmri2text.config import DataConfig
from fmri2text.data.bids import load_trials
from fmri2text.data.fmri import extract_responses
from fmri2text.data.video import read_frames
from fmri2text.errors import UserError
from tests.data.conftest import HAD_COLUMNS, had_rows, make_had, write_bold, write_events

FUNC = "sub-01/ses-action01/func"
STEM = "sub-01_ses-action01_task-action_run-01"
CFG = DataConfig(workers=1)


def bold(root: Path) -> Path:
    return root / FUNC / f"{STEM}_bold.nii.gz"


def events(root: Path) -> Path:
    return root / FUNC / f"{STEM}_events.tsv"


def sidecar(root: Path) -> Path:
    return root / FUNC / f"{STEM}_bold.json"


def captions(root: Path) -> Path:
    return root / "derivatives/simulation/captions.json"


def _edit_rows(edit: Callable[[list[dict]], None]) -> Callable[[Path], Path]:
    def setup(root: Path) -> Path:
        rows = had_rows("01", 1, 10)
        edit(rows)
        write_events(events(root), rows, HAD_COLUMNS)
        return events(root)
    return setup


def _write(target: Callable[[Path], Path], content: bytes | str | Callable[[bytes], bytes]):
    def setup(root: Path) -> Path:
        path = target(root)
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            path.write_bytes(content(path.read_bytes()))
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path
    return setup


def _bold_data(edit: Callable[[np.ndarray], np.ndarray]):
    def setup(root: Path) -> Path:
        data = edit(np.asarray(nib.load(bold(root)).dataobj).astype(np.float32))
        return write_bold(bold(root), data.shape[-1], 2.0, data=data)
    return setup


def _sidecar_tr(value) -> Callable[[Path], Path]:
    """The sidecar's RepetitionTime; the message names the BOLD file whose metadata it is
    (pybids merges inherited sidecars, so the BOLD file is the unambiguous name)."""
    def setup(root: Path) -> Path:
        sidecar(root).write_text(json.dumps({"RepetitionTime": value}))
        return bold(root)
    return setup


def _too_short_run(root: Path) -> Path:
    data = np.asarray(nib.load(bold(root)).dataobj)[..., :20]
    write_bold(bold(root), 20, 2.0, data=data)
    return events(root)  # the onsets past the run's end are in the events file


def _nifti_of_shape(shape: tuple) -> Callable[[Path], Path]:
    def setup(root: Path) -> Path:
        nib.save(nib.Nifti1Image(np.ones(shape, np.int16), np.eye(4)), bold(root))
        return bold(root)
    return setup


def _truncated_uncompressed(root: Path) -> Path:
    data = np.asarray(nib.load(bold(root)).dataobj)
    bold(root).unlink()
    path = bold(root).with_name(f"{STEM}_bold.nii")
    write_bold(path, 40, 2.0, data=data)
    path.write_bytes(path.read_bytes()[:-2000])
    return path


def _caption_entry(value) -> Callable[[Path], Path]:
    return _write(captions, json.dumps({had_rows("01", 1, 10)[0]["stim_file"]: value}))


def _set_nan(d):
    d[1:4, 1:4, 1:3] = np.nan
    return d


def _set_inf(d):
    d[1:4, 1:4, 1:3, 5] = np.inf
    return d


def _short_row(text: bytes) -> bytes:
    return text + b"30.0\t2.0\n"


def _ragged_row(text: bytes) -> bytes:
    return text + b"1\t2\t3\t4\t5\t6\t7\t8\n"


#: name → setup(root) that breaks the dataset and returns the file the message must name.
DATA_CASES: dict[str, Callable[[Path], Path]] = {
    "nifti_truncated_gz": _write(bold, lambda b: b[: len(b) // 2]),
    "nifti_truncated_header": _write(bold, lambda b: b[:60]),
    "nifti_garbage": _write(bold, os.urandom(5000)),
    "nifti_empty_file": _write(bold, b""),
    "nifti_truncated_uncompressed": _truncated_uncompressed,
    "nifti_3d": _nifti_of_shape((5, 5, 4)),
    "nifti_5d": _nifti_of_shape((5, 5, 4, 40, 2)),
    "nifti_nan": _bold_data(_set_nan),
    "nifti_inf": _bold_data(_set_inf),
    "nifti_all_zero": _bold_data(lambda d: d * 0),
    "nifti_too_short_for_onsets": _too_short_run,
    "tr_mismatch": _sidecar_tr(1.5),
    "tr_zero": _sidecar_tr(0),
    "tr_not_a_number": _sidecar_tr("abc"),
    "tr_a_list": _sidecar_tr([2.0]),
    "tr_bool": _sidecar_tr(True),
    "events_empty_file": _write(events, b""),
    "events_header_only": _write(events, "\t".join(HAD_COLUMNS) + "\n"),
    "events_short_row": _write(events, _short_row),
    "events_ragged_row": _write(events, _ragged_row),
    "events_comma_separated": _write(events, lambda b: b.replace(b"\t", b",")),
    "events_binary": _write(events, b"\xff\xfe\x00\x01" * 50),
    "events_missing_stim_file": _write(events, lambda b: b.replace(b"stim_file", b"stimulus")),
    "events_missing_onset": _write(events, lambda b: b.replace(b"onset", b"start", 1)),
    "onset_text": _edit_rows(lambda r: r[3].update(onset="abc")),
    "onset_na": _edit_rows(lambda r: r[3].update(onset="n/a")),
    "onset_inf": _edit_rows(lambda r: r[3].update(onset="inf")),
    "onset_past_end": _edit_rows(lambda r: r[-1].update(onset="500")),
    "onset_negative": _edit_rows(lambda r: r[0].update(onset="-40")),
    "duration_negative": _edit_rows(lambda r: r[0].update(duration="-2")),
    "class_id_text": _edit_rows(lambda r: r[0].update(trial_type="abc")),
    "class_id_fraction": _edit_rows(lambda r: r[0].update(trial_type="1.5")),
    "class_id_conflict": _edit_rows(lambda r: r[0].update(trial_type="3.0")),
    "class_unknown_id": _edit_rows(lambda r: [x.update(trial_type="999") for x in r
                                              if x["stim_file"].startswith("Archery")]),
    "captions_not_json": _write(captions, "{"),
    "captions_not_object": _write(captions, "[1]"),
    "captions_empty_string": _caption_entry([""]),
    "captions_blank": _caption_entry("   "),
    "captions_empty_list": _caption_entry([]),
    "captions_not_strings": _caption_entry([3]),
}

#: Cases where the file is named inside the message rather than as its path (pybids indexing).
NAMED_IN_TEXT = {
    "sidecar_not_json": _write(sidecar, "{RepetitionTime: "),
}
DATA_CASES.update(NAMED_IN_TEXT)


@pytest.mark.parametrize("name", list(DATA_CASES))
def test_bad_data_names_the_file(tmp_path: Path, name: str):
    root = make_had(tmp_path / "ds", subjects=("01", "02"), runs=1, n_trials=10, n_volumes=40)
    at_fault = DATA_CASES[name](root)
    with pytest.raises(UserError) as err:
        extract_responses(load_trials(root, CFG), CFG)
    text = str(err.value)
    assert "fix:" in text and err.value.fix
    if name in NAMED_IN_TEXT:
        assert at_fault.name in text
    else:
        assert err.value.path is not None and Path(err.value.path) == at_fault, text


def test_intact_fixture_loads(tmp_path: Path):
    """The cases above fail because of what they break, not because of the fixture."""
    root = make_had(tmp_path / "ds", subjects=("01", "02"), runs=1, n_trials=10, n_volumes=40)
    json_path = captions(root)
    json_path.parent.mkdir(parents=True)
    json_path.write_text(json.dumps({had_rows("01", 1, 10)[0]["stim_file"]: ["", "a caption"]}))
    trials = load_trials(root, CFG)
    assert extract_responses(trials, CFG).data.shape[0] == len(trials) == 20
    assert trials["captions"].iat[0] == ["a caption"]  # blanks beside a real caption are dropped


# ----------------------------------------------------------------------------- video clips


def _mp4(path: Path, n_frames: int = 12) -> Path:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 20 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


VIDEO_CASES: dict[str, Callable[[Path], None]] = {
    "missing": lambda p: None,
    "empty_file": lambda p: p.write_bytes(b""),
    "garbage": lambda p: p.write_bytes(os.urandom(4000)),
    "text": lambda p: p.write_text("not a video\n" * 100),
    "truncated": lambda p: p.write_bytes(_mp4(p).read_bytes()[:300]),
    "header_only": lambda p: p.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100),
    "a_folder": lambda p: p.mkdir(),
    "too_few_frames": lambda p: _mp4(p, n_frames=2),
}


@pytest.mark.parametrize("name", list(VIDEO_CASES))
def test_bad_clip_names_the_file(tmp_path: Path, name: str):
    clip = tmp_path / "clip.mp4"
    VIDEO_CASES[name](clip)
    with pytest.raises(UserError) as err:
        read_frames(clip, n_frames=4, size=16)
    assert err.value.path == clip and err.value.fix


def test_good_clip_reads(tmp_path: Path):
    assert read_frames(_mp4(tmp_path / "ok.mp4"), n_frames=4, size=16).shape == (4, 3, 16, 16)


@pytest.fixture(scope="module")
def prepare_results(tmp_path_factory) -> dict:
    """Every data case above through the real CLI's ``prepare``, in one batch process."""
    from .conftest import run_cli_batch

    runs = {}
    for name, setup in DATA_CASES.items():
        work = tmp_path_factory.mktemp(f"cli-{name}")
        root = make_had(work / "ds", subjects=("01", "02"), runs=1, n_trials=10, n_volumes=40)
        at_fault = setup(root)
        argv = ["prepare", "--bids", root, "--out", work / "prepared", "data.workers=1",
                "split.n_heldout=1"]
        runs[name] = (argv, work, at_fault)
    results = run_cli_batch([(argv, work) for argv, work, _ in runs.values()],
                            tmp_path_factory.mktemp("batch") / "prepare.json")
    return {name: (r, work, at_fault) for (name, (_, work, at_fault)), r in
            zip(runs.items(), results)}


@pytest.mark.parametrize("name", list(DATA_CASES))
def test_bad_data_through_the_cli(prepare_results: dict, name: str):
    """``fmri2text prepare`` on each broken dataset: exit 2, one message, no usable store.

    Subjects finished before the broken one keep their (complete, renamed-into-place) folders
    so the rerun after the fix recomputes only the broken subject; the store stays unusable
    (no manifest), and no half-written or lock file is left.
    """
    from .conftest import assert_clear_user_error

    r, work, at_fault = prepare_results[name]
    assert_clear_user_error(r, at_fault.name)
    prepared = work / "prepared"
    assert not (prepared / "manifest.json").exists()
    leftovers = [p for p in prepared.rglob("*") if p.is_file() and
                 (p.suffix == ".tmp" or p.name.endswith(".lock") or p.parent == prepared)]
    assert not leftovers, leftovers
