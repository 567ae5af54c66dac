"""The prepared store: round trip, random batches, resume after a crash, reruns, corruption."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fmri2text.config import load_config
from fmri2text.data.bids import load_trials
from fmri2text.data.fmri import extract_responses
from fmri2text.data.store import PreparedStore, prepare
from fmri2text.errors import UserError

from .conftest import make_had, write_bold

OVERRIDES = ["split.n_heldout=1", "data.captions=", "data.store_chunk_rows=3"]


def _cfg(*extra: str):
    return load_config(None, OVERRIDES + list(extra))


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_had(tmp_path / "had", subjects=("01", "02", "03"), runs=2, n_trials=10)


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


class Log(list):
    """Collects log lines; raises after the n-th "written" line when ``crash_after`` is set."""

    def __init__(self, crash_after: int | None = None):
        super().__init__()
        self.crash_after = crash_after

    def __call__(self, msg: str) -> None:
        self.append(msg)
        if self.crash_after is not None and sum("written" in m for m in self) >= self.crash_after:
            raise KeyboardInterrupt("simulated crash")


def test_round_trip_random_batch_and_manifest(dataset: Path, tmp_path: Path):
    # one voxel constant in a run of sub-03: out of the common mask, so the other subjects'
    # chunks hold a column that the reader must drop
    bold = dataset / "sub-03/ses-action01/func/sub-03_ses-action01_task-action_run-01_bold.nii.gz"
    data = np.asarray(nib.load(bold).dataobj).copy()
    data[2, 2, 2, :] = 1000
    write_bold(bold, 40, 2.0, data=data)
    cfg = _cfg("data.max_bad_voxel_fraction=0.1")
    out = prepare(dataset, tmp_path / "prep", cfg, log=Log())
    want = extract_responses(load_trials(dataset, cfg.data), cfg.data)  # (60, 17) float32
    st = PreparedStore(out)
    assert st.shape == want.data.shape and len(st.trials) == 60
    assert st.trials["subject"].tolist()[:1] == ["01"] and set(st.trials["split"]) == {"train", "adapt", "test"}
    assert st.trials["captions"].map(type).eq(list).all()
    np.testing.assert_array_equal(st.get(st.trials["row"]),
                                  want.data.astype(np.float16).astype(np.float32))
    mask = nib.load(out / "mask.nii.gz").get_fdata()
    np.testing.assert_array_equal(mask, want.mask_img.get_fdata())

    fresh = PreparedStore(out)
    rows = np.array([37, 2, 2, 18])  # unsorted, repeated, across subjects
    batch = fresh.get(rows)
    assert batch.dtype == np.float32 and batch.shape == (4, want.data.shape[1])
    np.testing.assert_allclose(batch, want.data[rows], atol=2e-3, rtol=1e-3)
    # only the chunks of those rows were opened (3 rows per chunk, 20 rows per subject)
    assert fresh._verified == {12, 0, 6} and set(fresh._open) == {12, 0, 6}

    m = fresh.manifest
    assert m["shape"] == [60, 17] and [e["n_columns"] for e in m["subjects"].values()] == [18, 18, 17] and m["dtype"] == "float16" and m["counts"]["subjects"] == 3
    assert m["feature_space"].startswith("volume 5x5x4") and len(m["config_sha256"]) == 64
    bold = [s for s in m["sources"] if s["path"].endswith("bold.nii.gz")]
    assert len(bold) == 6 and all(s["bytes"] > 0 and len(s["sha256_ends"]) == 64 for s in bold)
    assert [len(e["chunks"]) for e in m["subjects"].values()] == [7, 7, 7]


def test_stacked_windows_round_trip(dataset: Path, tmp_path: Path):
    cfg = _cfg("data.aggregate=stack", "data.window=3")
    st = PreparedStore(prepare(dataset, tmp_path / "prep", cfg, log=Log()))
    want = extract_responses(load_trials(dataset, cfg.data), cfg.data).data  # (60, 3, 18)
    assert st.shape == want.shape == (60, 3, 18)
    rows = np.array([59, 0, 21])
    np.testing.assert_array_equal(st.get(rows), want[rows].astype(np.float16).astype(np.float32))


def test_interrupted_prepare_resumes_to_identical_outputs(dataset: Path, tmp_path: Path):
    cfg = _cfg("data.workers=1")  # one subject at a time, so the crash point is exact
    ref = prepare(dataset, tmp_path / "ref", cfg, log=Log())
    out = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        prepare(dataset, out, cfg, log=Log(crash_after=1))
    assert not (out / "manifest.json").exists()  # not a finished store
    with pytest.raises(UserError, match="manifest"):
        PreparedStore(out)
    # sub-01 is complete, sub-02 may have been running (it finishes), sub-03 never started
    done = sorted(p.name for p in (out / "store").iterdir())
    assert done in (["sub-01"], ["sub-01", "sub-02"])

    log = Log()
    prepare(dataset, out, cfg, log=log)
    assert [m.split()[1] for m in log if "kept" in m] == done
    assert sum("written" in m for m in log) == 3 - len(done)
    assert _files(out) == _files(ref)


def test_rerun_recomputes_only_what_changed(dataset: Path, tmp_path: Path):
    cfg = _cfg()
    out = prepare(dataset, tmp_path / "prep", cfg, log=Log())
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    log = Log()
    prepare(dataset, out, cfg, log=log)
    assert any("up to date" in m for m in log) and not any("written" in m for m in log)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before

    # a changed input file: only its subject is recomputed
    bold = dataset / "sub-02/ses-action01/func/sub-02_ses-action01_task-action_run-01_bold.nii.gz"
    write_bold(bold, 40, 2.0, seed=999)
    log = Log()
    prepare(dataset, out, cfg, log=log)
    assert [m.split()[1] for m in log if "written" in m] == ["sub-02"]
    want = extract_responses(load_trials(dataset, cfg.data), cfg.data).data
    np.testing.assert_allclose(PreparedStore(out).get(np.arange(60)), want, atol=2e-3, rtol=1e-3)

    # a changed split: no subject recomputed, trials.tsv rewritten
    log = Log()
    prepare(dataset, out, _cfg("split.seed=5"), log=log)
    assert not any("written" in m for m in log) and sum("kept" in m for m in log) == 3

    # a changed response setting: everything recomputed
    log = Log()
    prepare(dataset, out, _cfg("data.hrf_delay=6.0"), log=log)
    assert sum("written" in m for m in log) == 3


def test_corrupt_or_missing_chunk_is_reported(dataset: Path, tmp_path: Path):
    cfg = _cfg()
    out = prepare(dataset, tmp_path / "prep", cfg, log=Log())
    chunk = out / "store/sub-02/chunk-0001.npy"
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF
    chunk.write_bytes(bytes(data))
    st = PreparedStore(out)
    st.get([0, 1, 40])  # other chunks still read
    with pytest.raises(UserError, match="corrupt") as err:
        st.get([24])
    assert str(chunk) in str(err.value)

    log = Log()  # a verifying rerun rebuilds the damaged subject only
    prepare(dataset, out, cfg, log=log, verify=True)
    assert [m.split()[1] for m in log if "written" in m] == ["sub-02"]
    PreparedStore(out).get([24])

    chunk.unlink()
    with pytest.raises(UserError, match="missing"):
        PreparedStore(out).get([24])


def test_cli_prepare_missing_bids_folder(tmp_path: Path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "fmri2text.cli", "prepare", "--bids",
                        str(tmp_path / "nope"), "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    assert "dataset folder not found" in r.stderr and "nope" in r.stderr
    assert r.stderr.count("error:") == 1
    assert not out.exists()  # nothing written
