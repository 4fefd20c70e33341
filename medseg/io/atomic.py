"""Atomic output files: write a temp file next to the target, then ``os.replace`` it into place.

A reader never sees a half-written output, and a failure (bad data, disk full, Ctrl-C) leaves
nothing behind: the temp file is removed and an existing target is untouched. A writer killed
outright (SIGKILL, power loss) cannot remove its temp file; the temp name carries the writer's
process id, so the next write of the same target removes it once that process is gone
(:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from medseg.errors import InputError

log = logging.getLogger(__name__)

#: Bytes the writability check writes (and removes): a full disk fails on them.
PROBE_BYTES = 64 * 1024
# Temp files made by earlier medseg versions carry no process id: removed only when older than
# this process, so a writer running now is never robbed of its temp file.
_STARTED = time.time()


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


def renamed(exc: OSError, path: str | os.PathLike) -> OSError:
    """``exc`` naming ``path``: a full disk fails a ``write()`` without a file name, or names a
    hidden temporary file; the user knows the output they asked for."""
    return OSError(exc.errno, exc.strerror or str(exc), os.fspath(path))


def _default_suffix(path: Path) -> str:
    return "".join(path.suffixes[-2:]) if path.name.lower().endswith(".nii.gz") else path.suffix


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, owned by someone else
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike, *, suffix: str | None = None) -> list[Path]:
    """Remove the temp files an interrupted write of ``path`` left next to it.

    Only names :func:`atomic_path` makes for this very target are considered
    (``.<name>.<pid>-<random>.tmp<suffix>``), and only when process ``pid`` no longer runs (a
    concurrent writer keeps its file). Process ids are those of this machine: a writer on another
    host sharing the folder is not seen. A previous target that :func:`atomic_paths` had moved
    aside (``....tmp<suffix>.old``) goes back into place when the target is missing.

    Returns:
        the removed files.
    """
    path = Path(path)
    suffix = _default_suffix(path) if suffix is None else suffix
    parent = path.parent if str(path.parent) else Path(".")
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:(\d+)-)?[a-z0-9_]{{8}}\.tmp{re.escape(suffix)}(\.old)?")
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    prefix = f".{path.name}."
    for name in names:
        match = pattern.fullmatch(name) if name.startswith(prefix) else None
        if match is None:
            continue
        stale = parent / name
        pid = match.group(1)
        try:
            if pid is not None:
                if int(pid) == os.getpid() or _pid_alive(int(pid)):
                    continue
            elif stale.stat().st_mtime >= _STARTED:
                continue
            if match.group(2) and not path.exists():
                os.replace(stale, path)
                log.info("%s: restored from %s, left by an interrupted write", path, name)
                continue
            stale.unlink()
        except OSError:
            continue
        log.info("%s: removed %s, left by an interrupted write", path, name)
        removed.append(stale)
    return removed


def _unwritable_reason(exc: OSError) -> str:
    if exc.errno == errno.EROFS:
        return "a read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "a folder without write permission"
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return "a full disk (no space left on the device)"
    return f"an unwritable folder ({exc.strerror or exc})"


def check_writable_folder(folder: str | os.PathLike, *, what: str = "a writable output folder") -> Path:
    """Check, before any work, that files can be written in ``folder``.

    A file of :data:`PROBE_BYTES` bytes is written, flushed and removed in ``folder`` (in its
    nearest existing ancestor when it does not exist yet, as writers create it): permissions,
    read-only mounts and a full disk all show, as they would for the real outputs.

    Raises:
        InputError: naming ``folder``: a file stands in its way, or it cannot be written.
    """
    folder = Path(folder)
    probe_dir = folder
    while not probe_dir.exists() and probe_dir.parent != probe_dir:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        found = "a file" if probe_dir == folder else f"a file in its place: {probe_dir}"
        raise InputError(folder, "an output folder", found)
    try:
        fd, name = tempfile.mkstemp(prefix=".medseg-write-check-", dir=probe_dir)
        try:
            os.write(fd, bytes(PROBE_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(name)
    except OSError as exc:
        raise InputError(folder, what, _unwritable_reason(exc)) from exc
    return folder


def _make_temp(path: Path, suffix: str | None) -> Path:
    suffix = _default_suffix(path) if suffix is None else suffix
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path, suffix=suffix)
    # The process id in the name tells a later run whether the writer is still alive.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=f".tmp{suffix}", dir=parent)
    os.close(fd)
    return Path(tmp_name)


def _finish(tmp: Path) -> None:
    # mkstemp makes 0600 files; give the output the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())


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
    tmp = _make_temp(path, suffix)
    try:
        yield tmp
        _finish(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.filename in (None, os.fspath(tmp)) and exc.errno is not None:
            raise renamed(exc, path) from exc
        raise


@contextlib.contextmanager
def atomic_paths(
    paths: Sequence[str | os.PathLike], *, suffixes: Sequence[str | None] | None = None
) -> Iterator[list[Path]]:
    """:func:`atomic_path` for files that belong together (a label map and its probabilities):
    all of them are moved into place, or none.

    Every file is written to its temp path first; only then are they moved into place, each
    existing target kept aside until all new files are in, so a failure at any point restores
    the previous set and never leaves one file of the set without the others.
    """
    paths = [Path(p) for p in paths]
    suffixes = list(suffixes) if suffixes is not None else [None] * len(paths)
    temps: list[Path] = []
    try:
        for path, suffix in zip(paths, suffixes):
            temps.append(_make_temp(path, suffix))
        yield list(temps)
        for tmp in temps:
            _finish(tmp)
        _replace_all(temps, paths)
    except BaseException as exc:
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()
        names = {os.fspath(t): os.fspath(p) for t, p in zip(temps, paths)}
        if isinstance(exc, OSError) and exc.filename in names and exc.errno is not None:
            raise renamed(exc, names[exc.filename]) from exc
        raise


def _replace_all(temps: list[Path], paths: list[Path]) -> None:
    """Move ``temps`` onto ``paths``; on failure put every old file back and remove the new ones."""
    placed: list[tuple[Path, Path | None]] = []  # (target, its previous file moved aside, or None)
    try:
        for tmp, path in zip(temps, paths):
            old = None
            if path.exists():
                old = tmp.with_name(tmp.name + ".old")
                os.replace(path, old)
            placed.append((path, old))
            os.replace(tmp, path)
    except BaseException:
        for path, old in reversed(placed):
            with contextlib.suppress(OSError):
                if old is not None:
                    os.replace(old, path)
                elif path.exists():
                    path.unlink()
        raise
    for _, old in placed:
        if old is not None:
            with contextlib.suppress(OSError):
                old.unlink()
