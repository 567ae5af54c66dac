"""Atomic file writing and output-folder checks shared by every command."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from fmri2text.errors import UserError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    Readers never see a half-written file: either the old content or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Write one JSON object per line, atomically."""
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def ensure_output_dir(path: str | Path, *, what: str = "output folder") -> Path:
    """Create ``path`` (and parents) if needed and check that it is a writable folder.

    Raises :class:`UserError` naming the folder when it is a file, cannot be created,
    or is not writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"the {what} is a file, not a folder", path=path,
                        fix="pass a folder path (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the {what}: {err.strerror}", path=path,
                        fix="choose a folder you can write to") from None
    try:  # a real probe: os.access says yes to root even on read-only mounts
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UserError(f"the {what} is not writable: {err.strerror}", path=path,
                        fix="choose a folder you can write to, or fix its permissions") from None
    return path
