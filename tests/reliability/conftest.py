"""Shared helpers of the reliability tests: the real CLI in a subprocess, folder snapshots."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

#: The tiny config of tests, CI and the examples (DESIGN §7 budgets are for the default).
TINY_DEMO = ["--config", str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")]


def cli_env(**extra: str) -> dict:
    """Environment of a CLI subprocess: offline, single-threaded, wide (no wrapped messages)."""
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
                COLUMNS="400", **extra)


def run_cli(*args, cwd: Path | None = None, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    """``python -m fmri2text.cli ARGS`` in a fresh process; stdout/stderr as text."""
    return subprocess.run([sys.executable, "-m", "fmri2text.cli", *map(str, args)],
                          capture_output=True, text=True, env=cli_env(**env), cwd=cwd,
                          timeout=timeout)


def assert_clear_user_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2, no traceback, one message on stderr that names each needle and a fix.

    Two kinds of message exist: ours (``error: ... / fix: ...``, from :class:`UserError`) and
    click's usage errors (a bad option value; they end with a ``--help`` hint).
    """
    out = r.stdout + r.stderr
    assert r.returncode == 2, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert "Traceback" not in out, out
    assert r.stderr.strip(), f"no message on stderr; stdout: {r.stdout}"
    if "error:" in r.stderr:
        assert r.stderr.count("error:") == 1, r.stderr
        assert "fix:" in r.stderr, r.stderr
    else:
        assert "Usage" in r.stderr or "--help" in r.stderr, r.stderr
    for needle in needles:
        assert str(needle) in r.stderr, f"{needle!r} not named in: {r.stderr}"


def snapshot(root: Path) -> dict[str, str]:
    """{relative path: sha256 (files) or 'dir'/'link->target'} of everything under ``root``."""
    root = Path(root)
    if not root.exists():
        return {}
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = f"link->{os.readlink(p)}"
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


BATCH_SCRIPT = Path(__file__).with_name("cli_batch.py")


def run_cli_batch(cases: list[tuple[list, Path]], results_path: Path,
                  timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Run several ``(argv, cwd[, env])`` command lines through ``fmri2text.cli.main`` in one
    subprocess (``env``: variables set for that command alone).

    ``results_path`` receives the batch's JSON results (keep it outside the cases' folders).
    """
    payload = json.dumps([{"argv": [str(a) for a in c[0]], "cwd": str(c[1]),
                           "env": c[2] if len(c) > 2 else {}} for c in cases])
    r = subprocess.run([sys.executable, str(BATCH_SCRIPT), str(results_path)], input=payload,
                       capture_output=True, text=True, env=cli_env(), timeout=timeout)
    assert r.returncode == 0, r.stderr
    data = json.loads(Path(results_path).read_text(encoding="utf-8"))
    return [subprocess.CompletedProcess(c[0], d["returncode"], d["stdout"], d["stderr"])
            for c, d in zip(cases, data)]
