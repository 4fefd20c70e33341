"""Errors medseg raises for bad input; commands print them as one line (no traceback)."""

from __future__ import annotations

import os


class MedsegError(Exception):
    """Base class of errors caused by the user's input or setup, shown as one clear line."""


class InputError(MedsegError, ValueError):
    """A file or folder is unreadable or not what was expected.

    The message names the path, what was expected and what was found, e.g.
    ``InputError("/data/a.nii.gz", "a gzip-compressed NIfTI file", "a truncated gzip stream")``.
    """

    def __init__(self, path: str | os.PathLike | None, expected: str, found: str, hint: str = ""):
        self.path = None if path is None else os.fspath(path)
        self.expected = expected
        self.found = found
        self.hint = hint
        where = f"{self.path}: " if self.path else ""
        msg = f"{where}expected {expected}, found {found}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)

    def __reduce__(self):
        # Rebuild from the constructor's arguments so the error survives process pools.
        return (type(self), (self.path, self.expected, self.found, self.hint))


class DatasetError(MedsegError, ValueError):
    """A dataset (folders of images and labels) has problems; ``problems`` lists all of them."""

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems or [])
        self.headline = message
        if self.problems:
            message = message + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.headline, self.problems))
