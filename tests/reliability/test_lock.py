"""The run-directory lock: a second writer refuses with a clear message; a dead holder frees it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fmri2text.errors import UserError
from fmri2text.io import LOCK_NAME, run_lock

from .conftest import cli_env

HOLDER = """
import sys, time
from fmri2text.io import run_lock
with run_lock(sys.argv[1], sys.argv[2]):
    print("locked", flush=True)
    time.sleep(float(sys.argv[3]))
print("released", flush=True)
"""

TAKER = """
import sys
from fmri2text.errors import UserError
from fmri2text.io import run_lock
try:
    with run_lock(sys.argv[1], "report", wait_s=float(sys.argv[2])):
        print("acquired", flush=True)
except UserError as err:
    print(str(err), file=sys.stderr)
    sys.exit(2)
"""


def _holder(run_dir: Path, command: str = "demo", seconds: float = 60) -> subprocess.Popen:
    """A process holding the lock of ``run_dir``; returns once it holds it."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), command, str(seconds)],
                         stdout=subprocess.PIPE, text=True, env=cli_env())
    assert p.stdout.readline().strip() == "locked"
    return p


def _take(run_dir: Path, wait_s: float = 0.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", TAKER, str(run_dir), str(wait_s)],
                          capture_output=True, text=True, env=cli_env(), timeout=60)


def test_second_process_refuses_naming_the_first(tmp_path: Path):
    run = tmp_path / "run"
    holder = _holder(run, "demo")
    try:
        r = _take(run)
        assert r.returncode == 2 and "acquired" not in r.stdout
        assert f"another fmri2text command (demo, pid {holder.pid})" in r.stderr
        assert str(run) in r.stderr and "--out" in r.stderr  # the folder and the fix
        with pytest.raises(UserError, match=f"pid {holder.pid}"):  # in this process too
            with run_lock(run, "simulate"):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_sigkilled_holder_leaves_no_block(tmp_path: Path):
    run = tmp_path / "run"
    holder = _holder(run, "prepare")
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == holder.pid
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (run / LOCK_NAME).exists()  # the stale file stays ...
    r = _take(run)  # ... and does not block
    assert r.returncode == 0 and "acquired" in r.stdout, r.stderr


def test_waiting_taker_gets_the_lock_after_release(tmp_path: Path):
    run = tmp_path / "run"
    holder = _holder(run, "demo", seconds=1.0)
    r = _take(run, wait_s=20)
    holder.wait()
    assert r.returncode == 0 and "acquired" in r.stdout, r.stderr


def test_lock_is_reentrant_in_one_process_and_released(tmp_path: Path):
    run = tmp_path / "run"
    with run_lock(run, "run") as d:
        assert d == run and run.is_dir()
        with run_lock(run, "simulate"):  # `run` chaining steps in one process
            pass
        r = _take(run)  # still held by the outer block
        assert r.returncode == 2 and f"pid {os.getpid()}" in r.stderr
    assert not (run / LOCK_NAME).exists()  # released: the lock file is removed
    assert _take(run).returncode == 0


def test_run_dir_that_is_a_file(tmp_path: Path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file") as err:
        with run_lock(f, "demo"):
            pass
    assert err.value.path == f and f.read_text() == "x"


def test_writers_never_interleave(tmp_path: Path):
    """Four processes race for one run directory: exactly those holding the lock write."""
    run = tmp_path / "run"
    run.mkdir()
    code = """
import sys, time
from fmri2text.errors import UserError
from fmri2text.io import run_lock
try:
    with run_lock(sys.argv[1], "w" + sys.argv[2]):
        with open(sys.argv[1] + "/log", "a") as f:
            f.write("start " + sys.argv[2] + "\\n"); f.flush(); time.sleep(0.3)
            f.write("end " + sys.argv[2] + "\\n")
except UserError:
    sys.exit(2)
"""
    procs = [subprocess.Popen([sys.executable, "-c", code, str(run), str(i)], env=cli_env())
             for i in range(4)]
    codes = [p.wait(timeout=60) for p in procs]
    assert set(codes) <= {0, 2} and 0 in codes
    lines = (run / "log").read_text().split()
    pairs = list(zip(lines[0::4], lines[1::4], lines[2::4], lines[3::4]))
    for start, i, end, j in pairs:  # start i, end i, start k, end k, ...: no interleaving
        assert (start, end, i) == ("start", "end", j)
    assert len(pairs) == codes.count(0)
