"""Atomic output files: write a temp file next to the target, then ``os.replace`` it into place.

A reader never sees a half-written output, and a failure (bad data, disk full, Ctrl-C) leaves
nothing behind: the temp file is removed and an existing target is untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from medseg.errors import InputError


def same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` name the same file (by inode when both exist, else by real path)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def check_output_path(
    path: str | os.PathLike, *, overwrite: bool = False, protect: Iterable[str | os.PathLike | None] = ()
) -> Path:
    """Validate an output path before anything is written.

    Args:
        path: the file to be written.
        overwrite: allow replacing an existing file.
        protect: input files that must never be written onto (e.g. the volume's ``source_path``),
            whatever ``overwrite`` says. ``None`` entries are ignored.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        InputError: the path is a protected input, an existing folder, or an existing file and
            ``overwrite`` is False.
    """
    path = Path(path)
    for src in protect:
        if src is not None and same_file(path, Path(src)):
            raise InputError(
                path, "an output path different from the input", "the input file itself",
                "medseg never overwrites an input; choose another output path",
            )
    if path.is_dir():
        raise InputError(path, "an output file path", "an existing folder")
    if path.exists() and not overwrite:
        raise InputError(
            path, "an output path that does not exist yet", "an existing file",
            "pass overwrite=True (--overwrite) to replace it",
        )
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path in ``path``'s folder; on success move it onto ``path``, on failure delete it.

    The temp file is hidden (leading dot) so dataset discovery never picks it up, and ends with
    ``suffix`` (default: ``path``'s own suffixes, e.g. ``.nii.gz``) because writers such as nibabel
    and SimpleITK choose the format from the extension. The parent folder is created if missing.

    Example:
        >>> with atomic_path("out/seg.nii.gz") as tmp:   # doctest: +SKIP
        ...     nib.save(img, tmp)
    """
    path = Path(path)
    if suffix is None:
        suffix = "".join(path.suffixes[-2:]) if path.name.lower().endswith(".nii.gz") else path.suffix
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes 0600 files; give the output the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
