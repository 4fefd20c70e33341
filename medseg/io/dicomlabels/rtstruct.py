"""DICOM RTSTRUCT: rasterize its contours onto the referenced image's grid; make one from a label map.

Reading (pydicom only):

- Each CLOSED_PLANAR (or CLOSED_PLANAR_XOR) contour must lie in one slice plane of the referenced
  image (any orientation: an oblique series' contours lie in its oblique slices); its points are
  mapped to voxel indices and a voxel is inside when its CENTRE is inside the polygon.
- Contours of one ROI in one slice combine by XOR (even-odd): a contour inside another is a hole, a
  contour inside that hole an island (the nesting the standard describes, and what CLOSED_PLANAR_XOR
  states outright). POINT and OPEN_* contours enclose nothing and are skipped (logged).
- Overlapping ROIs: the voxel goes to the ROI with fewer voxels (an organ inside the body outline);
  logged. Label values: the ROI number, or the id of ``--labels-map NAME=ROIName`` (:mod:`.names`).

Writing (:func:`write_rtstruct`): one ROI per class; on each source image, the outlines of the class's
pixels traced between pixel centres (OpenCV on a 2x upsampled mask), so reading it back gives the same
voxels (checked on speckle: holes, islands, pixels touching only at a corner).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from medseg.errors import InputError
from medseg.io.dicomlabels.geometry import lps_to_index
from medseg.io.dicomlabels.names import named_id
from medseg.io.dicomlabels.seg import label_meta
from medseg.io.volume import Volume

log = logging.getLogger(__name__)

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
#: A contour's points may lie this far (voxels) off one slice plane (coordinates are stored as text).
PLANE_TOLERANCE = 0.05


def roi_names(ds) -> dict[int, str]:
    """ROI number -> ROIName of an RTSTRUCT dataset."""
    return {int(item.ROINumber): str(item.get("ROIName", "") or f"ROI {item.ROINumber}")
            for item in ds.get("StructureSetROISequence", [])}


def _contour_slice(points: np.ndarray, shape, where, what: str) -> tuple[int, int, np.ndarray]:
    """(slice axis, slice index, (N, 2) polygon in the two other axes' indices) of one contour."""
    spread = points.max(axis=0) - points.min(axis=0)
    axis = int(np.argmin(spread))
    position = float(np.median(points[:, axis]))
    if spread[axis] > PLANE_TOLERANCE or abs(position - round(position)) > PLANE_TOLERANCE:
        raise InputError(where, f"{what} in one slice plane of the referenced image",
                         f"points spread over {spread[axis]:.3f} voxels around index {position:.3f} of axis {axis}",
                         "medseg rasterizes contours drawn on the image's own slices")
    index = int(round(position))
    if not 0 <= index < shape[axis]:
        raise InputError(where, f"{what} inside the referenced image",
                         f"slice {index} on axis {axis} of a grid of shape {list(shape)}")
    return axis, index, points[:, [a for a in range(3) if a != axis]]


def _fill(polygon: np.ndarray, plane_shape) -> tuple[tuple[slice, slice], np.ndarray]:
    """Voxels of a 2D plane whose centres are inside ``polygon`` (index units): (bounding box, mask)."""
    from matplotlib.path import Path as PolygonPath

    lo = np.clip(np.floor(polygon.min(axis=0)).astype(int), 0, None)
    hi = np.minimum(np.ceil(polygon.max(axis=0)).astype(int), np.asarray(plane_shape) - 1)
    if np.any(hi < lo):
        return (slice(0, 0), slice(0, 0)), np.zeros((0, 0), bool)
    a, b = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1), indexing="ij")
    inside = PolygonPath(polygon).contains_points(np.stack([a.ravel(), b.ravel()], axis=1))
    return (slice(lo[0], hi[0] + 1), slice(lo[1], hi[1] + 1)), inside.reshape(a.shape)


def _roi_voxels(item, reference: Volume, where, name: str) -> np.ndarray:
    """Flat indices (into ``reference``'s array) of the voxels one ROI's contours enclose."""
    planes: dict[tuple[int, int], np.ndarray] = {}
    skipped = 0
    for n, contour in enumerate(item.get("ContourSequence", []), start=1):
        kind = str(contour.get("ContourGeometricType", "")).upper()
        if kind not in ("CLOSED_PLANAR", "CLOSED_PLANAR_XOR"):
            skipped += 1
            continue
        data = np.asarray([float(v) for v in contour.ContourData], dtype=np.float64)
        if data.size < 9 or data.size % 3:
            raise InputError(where, f"contour {n} of ROI {name!r} with 3 or more (x, y, z) points",
                             f"{data.size} coordinates")
        points = lps_to_index(reference.affine, data.reshape(-1, 3))
        axis, index, polygon = _contour_slice(points, reference.shape, where, f"contour {n} of ROI {name!r}")
        plane_shape = [s for a, s in enumerate(reference.shape) if a != axis]
        box, inside = _fill(polygon, plane_shape)
        plane = planes.setdefault((axis, index), np.zeros(plane_shape, dtype=bool))
        plane[box] ^= inside  # even-odd: nested contours are holes, and islands in holes
    if skipped:
        log.warning("%s: ROI %r: %d contours that are not CLOSED_PLANAR skipped", where, name, skipped)
    flat = []
    for (axis, index), plane in planes.items():
        ij = np.nonzero(plane)
        full = [None, None, None]
        others = [a for a in range(3) if a != axis]
        full[axis] = np.full(ij[0].shape, index)
        full[others[0]], full[others[1]] = ij
        flat.append(np.ravel_multi_index(tuple(full), reference.shape))
    return np.unique(np.concatenate(flat)) if flat else np.zeros(0, dtype=np.int64)


def read_rtstruct(ds, path: Path, reference: Volume, case_id: str) -> Volume:
    """The label map of RTSTRUCT dataset ``ds`` (from ``path``) rasterized on ``reference``'s grid.

    Returns:
        Volume with ``reference``'s affine, uint8 (uint16 when a value exceeds 255) label values,
        ``meta["class_names"]`` = {value: ROI name}. ROIs without contours are named but empty.

    Raises:
        InputError: a contour off the image's slice planes or outside it, a malformed contour.
    """
    names = roi_names(ds)
    values = {n: (named_id(name) or n) for n, name in names.items()}
    voxels = {}
    for item in ds.get("ROIContourSequence", []):
        number = int(item.ReferencedROINumber)
        voxels[number] = _roi_voxels(item, reference, path, names.get(number, f"ROI {number}"))
    dtype = np.uint8 if max(values.values(), default=0) <= 255 else np.uint16
    out = np.zeros(int(np.prod(reference.shape)), dtype=dtype)
    overlap = 0
    for number, flat in sorted(voxels.items(), key=lambda kv: -kv[1].size):  # smallest painted last, wins
        value = values.get(number, number)
        overlap += int(np.count_nonzero(out[flat] != 0))
        out[flat] = value
    if overlap:
        log.warning("%s: %d voxels belong to several ROIs; each went to the smallest ROI", path, overlap)
    meta = label_meta("RTSTRUCT", ds, path, reference, names, values)
    return Volume(out.reshape(reference.shape), reference.affine.copy(), case_id, meta)
