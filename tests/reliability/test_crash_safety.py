"""Crash safety: a full disk leaves the previous artifact intact and says so; a SIGKILLed
``simulate`` rerun completes with the same bytes as an uninterrupted run."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fmri2text.io as fio
from fmri2text.errors import UserError

from .conftest import cli_env, run_cli, snapshot

OLD = {"version": "previous"}


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _half_write_then_full(self, data, *args, **kwargs):
    """Path.write_text/write_bytes that gets half the data out, then finds the disk full."""
    with open(self, "wb") as f:
        f.write((data.encode() if isinstance(data, str) else data)[: max(len(data) // 2, 1)])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _quota(*_args, **_kwargs):
    raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))


INJECTIONS = {  # where the write fails: [(object, attribute, replacement), ...]
    "replace": [(fio.os, "replace", _disk_full)],
    "mkstemp": [(fio.tempfile, "mkstemp", _disk_full)],
    "half_written": [(Path, "write_text", _half_write_then_full),
                     (Path, "write_bytes", _half_write_then_full)],
    "quota": [(fio.os, "replace", _quota)],
}
WRITERS = {
    "write_json": lambda p: fio.write_json(p, {"version": "new", "x": list(range(1000))}),
    "write_text": lambda p: fio.write_text(p, "new " * 1000),
    "write_bytes": lambda p: fio.write_bytes(p, b"new" * 1000),
    "write_jsonl": lambda p: fio.write_jsonl(p, [{"version": "new"}] * 100),
}


@pytest.mark.parametrize("writer", list(WRITERS))
@pytest.mark.parametrize("where", list(INJECTIONS))
def test_disk_full_keeps_previous_version(tmp_path: Path, monkeypatch, where: str, writer: str):
    target = tmp_path / "artifact.json"
    target.write_text(json.dumps(OLD))
    before = target.read_bytes()
    for obj, attr, fake in INJECTIONS[where]:
        monkeypatch.setattr(obj, attr, fake)
    with pytest.raises(UserError, match="disk full while writing artifact.json") as err:
        WRITERS[writer](target)
    monkeypatch.undo()
    assert "previous version" in str(err.value) and err.value.path == target and err.value.fix
    assert target.read_bytes() == before
    assert _no_temp_files(tmp_path) and sorted(os.listdir(tmp_path)) == ["artifact.json"]


def test_other_write_errors_are_not_disguised(tmp_path: Path, monkeypatch):
    """Only a full disk (or a read-only place) becomes a UserError; a bug stays a bug."""
    def boom(*_a, **_k):
        raise OSError(errno.EIO, "I/O error")
    monkeypatch.setattr(fio.os, "replace", boom)
    with pytest.raises(OSError, match="I/O error"):
        fio.write_text(tmp_path / "a.txt", "x")
    assert _no_temp_files(tmp_path)


def test_atomic_write_keeps_umask_permissions(tmp_path: Path):
    fio.write_text(tmp_path / "a.txt", "x")
    mode = (tmp_path / "a.txt").stat().st_mode & 0o777
    umask = os.umask(0o022)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # not mkstemp's 0600


REPORT_ON_FULL_DISK = """
import errno, os, sys
import fmri2text.io as fio
real_replace = os.replace
def replace(src, dst, *a, **k):
    if str(dst).endswith("report.html"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_replace(src, dst, *a, **k)
fio.os.replace = replace
from fmri2text.cli import main
main(sys.argv[1:])
"""


def test_disk_full_through_the_cli(tmp_path: Path):
    """``fmri2text report`` on a full disk: exit 2, one message, the earlier report intact."""
    from .test_cli_bad_inputs import _run_dir

    run = _run_dir(tmp_path)
    before = snapshot(run)
    r = subprocess.run([sys.executable, "-c", REPORT_ON_FULL_DISK, "report", "--run", str(run)],
                       capture_output=True, text=True, env=cli_env(), timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "disk full while writing report.html" in r.stderr
    assert "previous version" in r.stderr and "fix:" in r.stderr
    assert snapshot(run) == before and _no_temp_files(run)


# ----------------------------------------------------------------------------- SIGKILL


SIM = ["simulate.subjects=2", "simulate.runs=1", "simulate.classes=3", "simulate.resolution=16",
       "simulate.web_clips=1", "simulate.seed=3"]
STAMP = ".fmri2text-simulate.json"


def _without_timing(tree: dict[str, str], root: Path) -> dict[str, str]:
    """The snapshot, with the stamp compared by content minus its wall-clock seconds."""
    tree = dict(tree)
    if STAMP in tree:
        stamp = json.loads((root / STAMP).read_text())
        stamp.pop("seconds", None)
        tree[STAMP] = json.dumps(stamp, sort_keys=True)
    return tree


def _start(out: Path) -> tuple[subprocess.Popen, float]:
    """Start ``simulate``; return the process and the time its first output file appeared."""
    p = subprocess.Popen([sys.executable, "-m", "fmri2text.cli", "simulate", "--out", str(out), *SIM],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=cli_env())
    while p.poll() is None and not (out.is_dir() and any(out.iterdir())):
        time.sleep(0.02)
    return p, time.monotonic()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict, float]:
    """The uninterrupted run: its output and how long it spends writing."""
    out = tmp_path_factory.mktemp("sim") / "ref"
    p, first_file = _start(out)
    assert p.wait(timeout=300) == 0, p.stderr.read()
    return _without_timing(snapshot(out), out), time.monotonic() - first_file


@pytest.mark.parametrize("fraction", [0.1, 0.35, 0.6])  # well inside the writing phase
def test_sigkill_during_simulate_then_rerun(tmp_path: Path, reference, fraction: float):
    ref_tree, writing_seconds = reference
    out = tmp_path / "ds"
    p, _ = _start(out)
    time.sleep(fraction * writing_seconds)
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL, "the run ended before the kill: no crash point tested"
    if (out / STAMP).is_file() and json.loads((out / STAMP).read_text()).get("complete"):
        # killed after the final stamp (while exiting): then the dataset must be whole
        tree = {k: v for k, v in snapshot(out).items() if not k.endswith(".lock")}
        assert _without_timing(tree, out) == ref_tree
    r = run_cli("simulate", "--out", out, *SIM)
    assert r.returncode == 0, r.stderr
    assert _without_timing(snapshot(out), out) == ref_tree
    assert _no_temp_files(out)


# ----------------------------------------------------------------------------- SIGKILL prepare


def _start_prepare(bids: Path, out: Path) -> tuple[subprocess.Popen, float]:
    """Start ``prepare``; return the process and the time it first wrote into ``out``."""
    p = subprocess.Popen([sys.executable, "-m", "fmri2text.cli", "prepare", "--bids", str(bids),
                          "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env=cli_env())
    while p.poll() is None and not (out.is_dir() and any(out.iterdir())):
        time.sleep(0.01)
    return p, time.monotonic()


def _store_tree(out: Path) -> dict[str, str]:
    """The prepared folder's files, without the lock and without wall-clock fields."""
    tree = {k: v for k, v in snapshot(out).items() if not k.endswith(".lock")}
    if "manifest.json" in tree:
        manifest = json.loads((out / "manifest.json").read_text())
        for key in ("created", "seconds", "timings", "out"):
            manifest.pop(key, None)
        tree["manifest.json"] = json.dumps(manifest, sort_keys=True)
    return tree


@pytest.fixture(scope="module")
def prepared_reference(tmp_path_factory) -> tuple[Path, dict, float]:
    """A simulated dataset and its uninterrupted ``prepare``: output and writing time."""
    root = tmp_path_factory.mktemp("prep")
    bids = root / "bids"
    sim = ["simulate.subjects=4", "simulate.runs=1", "simulate.classes=3", "simulate.resolution=4",
           "simulate.web_clips=1", "simulate.seed=5"]
    assert run_cli("simulate", "--out", bids, *sim).returncode == 0
    p, first_write = _start_prepare(bids, root / "ref")
    assert p.wait(timeout=300) == 0, p.stderr.read()
    return bids, _store_tree(root / "ref"), time.monotonic() - first_write


@pytest.mark.parametrize("fraction", [0.05, 0.15, 0.3])  # its writes end early
def test_sigkill_during_prepare_then_rerun(tmp_path: Path, prepared_reference, fraction: float):
    """Killed at several points of its writing phase, ``prepare`` reruns to the same store."""
    bids, ref_tree, writing_seconds = prepared_reference
    out = tmp_path / "prepared"
    p, _ = _start_prepare(bids, out)
    time.sleep(fraction * writing_seconds)
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL, "prepare ended before the kill: no crash point tested"
    if (out / "manifest.json").is_file():  # the manifest is written last: the store is whole
        assert _store_tree(out) == ref_tree
    r = subprocess.run([sys.executable, "-m", "fmri2text.cli", "prepare", "--bids", str(bids),
                        "--out", str(out)], capture_output=True, text=True, env=cli_env(),
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert _store_tree(out) == ref_tree
    assert _no_temp_files(out)
