"""Atomic file writing, output-folder checks and the run-directory lock shared by every command.

- :func:`atomic_path` (and ``write_*``): temp file beside the target, renamed onto it only
  when complete; a full disk (ENOSPC/EDQUOT) becomes a :class:`UserError` saying that the
  previous version is intact, and no temp file is left behind.
- :func:`run_lock`: one writer per run directory (``RUN/.lock``, ``fcntl.flock``); a second
  command refuses with a message naming the first one. The kernel drops the lock when its
  holder dies, so a stale lock file never blocks.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Iterator

from fmri2text.errors import UserError

#: errno values meaning "no space left": the disk (ENOSPC) or the user's quota (EDQUOT).
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: errno values meaning "this place cannot be written".
NOT_WRITABLE_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
LOCK_NAME = ".lock"


def file_hash(path: str | Path) -> str:
    """Short SHA-256 (16 hex digits) of a file's bytes: keys outputs to the file they came from."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _read_umask() -> int:
    """The process umask (read once at import: ``os.umask`` can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: mkstemp creates 0600 files; artifacts get the usual 0666 & ~umask instead.
_FILE_MODE = 0o666 & ~_read_umask()


def _write_error(err: OSError, path: Path) -> UserError | None:
    """The :class:`UserError` for a disk-full or read-only failure writing ``path``, else None."""
    if err.errno in DISK_FULL_ERRNOS:
        return UserError(f"disk full while writing {path.name} ({err.strerror}); the previous "
                         "version of the file, if any, is intact", path=path,
                         fix="free disk space (or quota) and rerun the same command")
    if err.errno in NOT_WRITABLE_ERRNOS:
        return UserError(f"cannot write {path.name}: {err.strerror}", path=path,
                         fix="choose a folder you can write to, or fix its permissions")
    return None


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    Readers never see a half-written file: either the old content or the new one. The temp
    file is removed whatever happens; a full disk or a read-only folder raises
    :class:`UserError` (the previous version of ``path`` is left as it was).
    """
    path = Path(path)
    if path.is_dir():
        raise UserError("is a folder, not a file: cannot write over it", path=path,
                        fix="pass a file path (e.g. a name ending in .html/.json), not a folder")
    tmp_path: Path | None = None
    in_body = False  # the caller's own code may fail for other reasons: map only a full disk
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        in_body = True
        yield tmp_path
        in_body = False
        os.chmod(tmp_path, _FILE_MODE)
        os.replace(tmp_path, path)
    except OSError as err:
        user_error = _write_error(err, path)
        if user_error is None or (in_body and err.errno not in DISK_FULL_ERRNOS):
            raise
        raise user_error from None
    finally:
        if tmp_path is not None:
            with suppress(FileNotFoundError):
                tmp_path.unlink()


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None
                      ) -> None:
    """Write ``tensors`` (name → contiguous CPU tensor) and string ``metadata`` as one
    safetensors file, atomically, the same bytes in every process.

    The library writes its JSON header from a hash map whose order changes from process to
    process (two runs' student files differed in the order of their metadata keys alone), so
    the header is written again with sorted keys; offsets are relative to the data, which
    is kept as it is, and the header is space-padded to 8 bytes as the library pads it.
    """
    from safetensors.torch import save

    data = save(tensors, metadata)
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    write_bytes(path, len(header).to_bytes(8, "little") + header + memoryview(data)[8 + n:])


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


# ----------------------------------------------------------------------------- run lock

_held_lock = threading.Lock()
_held: dict[Path, list] = {}  # resolved run dir → [fd, command, depth]: re-entry in one process


def _lock_holder(fd: int) -> tuple[str, str]:
    """(command, pid) written in a lock file by its holder; '?' where unreadable."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        info = {}
    if not isinstance(info, dict):
        info = {}
    return str(info.get("command", "?")), str(info.get("pid", "?"))


@contextmanager
def run_lock(run_dir: str | Path, command: str, *, wait_s: float = 0.0) -> Iterator[Path]:
    """Hold the run directory's lock (``RUN/.lock``) while a command writes into it.

    The folder is created if missing. The lock is ``fcntl.flock`` on ``RUN/.lock``: the
    kernel releases it when the holder exits or is killed, so a lock file left by a dead
    process never blocks (its content is only a note of who holds it). A clean release
    removes the file; a waiter that then holds a removed file retries on the new one. Re-entering the lock of the same folder in the same process is allowed (``run``
    chaining steps); a forked child inherits it.

    Parameters
    ----------
    run_dir:
        The run directory (``--out``).
    command:
        The command taking the lock, e.g. ``"demo"``; shown to a second command.
    wait_s:
        Seconds to wait for the other command to finish before refusing (0: refuse at once).

    Yields
    ------
    Path
        The run directory.

    Raises
    ------
    UserError
        When another process holds the lock (naming its command and pid), or the run
        directory is a file or not writable.
    """
    run_dir = ensure_output_dir(run_dir, what="run directory")
    key = run_dir.resolve()
    with _held_lock:
        entry = _held.get(key)
        if entry is not None:
            entry[2] += 1
    if entry is not None:
        try:
            yield run_dir
        finally:
            with _held_lock:
                entry[2] -= 1
        return

    lock_path = run_dir / LOCK_NAME
    deadline = time.monotonic() + max(wait_s, 0.0)
    fd = _open_lock(lock_path)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if _same_file(fd, lock_path):
                    break
                # the holder removed the file on release while we waited: lock the new one
                os.close(fd)
                fd = _open_lock(lock_path)
                continue
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    other, pid = _lock_holder(fd)
                    raise UserError(
                        f"another fmri2text command ({other}, pid {pid}) is writing this run "
                        "directory", path=run_dir,
                        fix="wait for it to finish, or use another --out") from None
                time.sleep(min(0.2, max(deadline - time.monotonic(), 0.01)))
        note = json.dumps({"command": command, "pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n"
        with suppress(OSError):  # the note is informational: a full disk must not stop the run
            os.ftruncate(fd, 0)
            os.pwrite(fd, note.encode("utf-8"), 0)
        with _held_lock:
            _held[key] = [fd, command, 1]
        try:
            yield run_dir
        finally:
            with _held_lock:
                del _held[key]
            with suppress(OSError):
                os.unlink(lock_path)  # removed while still held: waiters re-check the inode
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _open_lock(lock_path: Path) -> int:
    try:
        return os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
    except OSError as err:
        raise UserError(f"cannot open the lock file: {err.strerror}", path=lock_path,
                        fix="choose a run directory you can write to") from None


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not unlinked or replaced)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
