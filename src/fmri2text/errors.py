"""User-facing errors: one clear message naming the file and the fix, exit code 2."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """An error the user can fix: bad input, bad config, bad path.

    The CLI prints ``str(err)`` (no traceback) and exits with code 2.

    Parameters
    ----------
    message:
        What is wrong, naming the bad value and, where there is a fixed set, the allowed ones.
    path:
        The file or folder at fault, if any.
    fix:
        What the user should do about it.
    """

    exit_code = 2

    def __init__(self, message: str, *, path: str | Path | None = None, fix: str | None = None):
        self.message = message
        self.path = Path(path) if path is not None else None
        self.fix = fix
        super().__init__(self.__str__())

    def __str__(self) -> str:
        text = self.message
        if self.path is not None:
            text = f"{self.path}: {text}"
        if self.fix:
            text = f"{text}\n  fix: {self.fix}"
        return text
