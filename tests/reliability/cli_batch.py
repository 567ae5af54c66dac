"""Run many ``fmri2text`` command lines in one process: ``python cli_batch.py OUT.json < cases.json``.

Each case is ``{"argv": [...], "cwd": "...", "env": {...}}`` (``env``: variables set for
that case alone); for each, the real entry point
``fmri2text.cli.main(argv)`` runs with stdout/stderr captured, and the result is
``{"returncode": n, "stdout": ..., "stderr": ...}``, as a fresh ``python -m fmri2text.cli``
would give (an uncaught exception: exit code 1 and its traceback on stderr). One process
for a whole table saves the ~1 s interpreter and import start-up per case.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import traceback


def run_one(argv: list[str], cwd: str, env: dict | None = None) -> dict:
    from fmri2text.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    os.chdir(cwd)
    saved = dict(os.environ)
    os.environ.update(env or {})
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # what the interpreter would print for an uncaught error
            traceback.print_exc()
            code = 1
    os.environ.clear()
    os.environ.update(saved)
    return {"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def main() -> None:
    cases = json.load(sys.stdin)
    results = [run_one(c["argv"], c["cwd"], c.get("env")) for c in cases]
    with open(sys.argv[1], "w", encoding="utf-8") as f:  # not stdout: a command may print there
        json.dump(results, f)


if __name__ == "__main__":
    main()
