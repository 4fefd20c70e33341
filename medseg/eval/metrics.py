"""Overlap, surface-distance and volume metrics of one prediction against one reference.

All functions are pure: boolean arrays in (any axis order, with ``spacing_mm`` in the same
order), floats out; nothing is read from disk and nothing raises on empty masks.

Empty-mask rule (the same everywhere in medseg):

==========================  ==========  ===================  =====  ======
case                        DSC/Jacc.   HD, HD95, ASSD, MASD  NSD    RVD
==========================  ==========  ===================  =====  ======
both empty                  NaN         NaN                   NaN    NaN
reference empty only        0           inf                   0      NaN
prediction empty only       0           inf                   0      -1
==========================  ==========  ===================  =====  ======

Aggregation over patients decides what an inf becomes (see :mod:`medseg.eval.aggregate`).
"""

from __future__ import annotations

import math

import numpy as np

from medseg.eval import catalog
from medseg.eval.surface import SurfaceDistances, bounding_box, surface_distances

#: Keys of :func:`compute_metrics` as described at import (:func:`medseg.eval.catalog.voxel_keys`
#: is the live list), in report order.
METRIC_KEYS = catalog.voxel_keys()
#: Keys whose value is a distance in mm (inf when exactly one mask is empty), computed here.
DISTANCE_KEYS = ("hd_mm", "hd95_mm", "assd_mm", "masd_mm")


def _as_bool(array) -> np.ndarray:
    arr = np.asarray(array)
    if arr.dtype != bool:
        arr = arr != 0
    return arr


def _check_pair(pred, ref, spacing_mm=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    pred = _as_bool(pred)
    ref = _as_bool(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref must have the same shape, found {pred.shape} and {ref.shape}")
    spacing = None
    if spacing_mm is not None:
        spacing = np.asarray(spacing_mm, dtype=np.float64).reshape(-1)
        if pred.ndim != 3:
            raise ValueError(f"surface metrics need 3D masks (I, J, K), found shape {pred.shape}")
        if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise ValueError(f"spacing_mm must be 3 positive finite numbers, found {np.asarray(spacing_mm).tolist()}")
    return pred, ref, spacing


def _overlap_counts(pred: np.ndarray, ref: np.ndarray, boxes: tuple | None = None) -> tuple[int, int, int]:
    """(|pred|, |ref|, |pred & ref|), the intersection counted inside the boxes' overlap only."""
    n_pred = int(np.count_nonzero(pred))
    n_ref = int(np.count_nonzero(ref))
    if n_pred == 0 or n_ref == 0:
        return n_pred, n_ref, 0
    if pred.ndim != 3:
        return n_pred, n_ref, int(np.count_nonzero(pred & ref))
    box_p, box_r = (bounding_box(pred), bounding_box(ref)) if boxes is None else boxes
    lo = np.maximum(box_p[0], box_r[0])
    hi = np.minimum(box_p[1], box_r[1])
    if np.any(hi <= lo):
        return n_pred, n_ref, 0
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    return n_pred, n_ref, int(np.count_nonzero(pred[sl] & ref[sl]))


def _dice_from_counts(n_pred: int, n_ref: int, n_both: int) -> float:
    total = n_pred + n_ref
    return math.nan if total == 0 else 2.0 * n_both / total


def _jaccard_from_counts(n_pred: int, n_ref: int, n_both: int) -> float:
    union = n_pred + n_ref - n_both
    return math.nan if union == 0 else n_both / union


def dice(pred, ref) -> float:
    """Dice similarity coefficient 2|P∩R| / (|P| + |R|) of two masks of any shape.

    Args:
        pred: bool (or 0/1) array.
        ref: bool (or 0/1) array of the same shape.

    Returns:
        DSC in [0, 1]; NaN when both masks are empty, 0 when exactly one is.

    Raises:
        ValueError: if the shapes differ.

    Example:
        >>> dice(np.array([1, 1, 0], bool), np.array([1, 0, 0], bool))
        0.6666666666666666
    """
    pred, ref, _ = _check_pair(pred, ref)
    return _dice_from_counts(*_overlap_counts(pred, ref))


def jaccard(pred, ref) -> float:
    """Jaccard index |P∩R| / |P∪R|; NaN when both masks are empty, 0 when exactly one is.

    Raises:
        ValueError: if the shapes differ.
    """
    pred, ref, _ = _check_pair(pred, ref)
    return _jaccard_from_counts(*_overlap_counts(pred, ref))


def directed_percentile(distances_mm: np.ndarray, areas_mm2: np.ndarray, percentile: float) -> float:
    """Area-weighted percentile of one directed set of surface distances.

    The smallest distance ``d`` such that the elements at distance <= ``d`` (sorted by distance,
    then area) hold at least ``percentile`` % of the surface area (surface-distance's rule).

    Args:
        distances_mm: (N,) distances.
        areas_mm2: (N,) element areas.
        percentile: in [0, 100]; 100 gives the maximum.

    Returns:
        The distance in mm; NaN when the set is empty.
    """
    n = distances_mm.shape[0]
    if n == 0:
        return math.nan
    if percentile >= 100:
        return float(distances_mm.max())
    order = np.lexsort((areas_mm2, distances_mm))
    sorted_d = distances_mm[order]
    sorted_a = areas_mm2[order]
    cum = np.cumsum(sorted_a) / np.sum(sorted_a)
    idx = int(np.searchsorted(cum, percentile / 100.0))
    return float(sorted_d[min(idx, n - 1)])


def _weighted_sum_mean(distances_mm: np.ndarray, areas_mm2: np.ndarray) -> tuple[float, float]:
    return float(np.sum(distances_mm * areas_mm2)), float(np.sum(areas_mm2))


def _empty_distance_metrics(*, both_empty: bool) -> dict[str, float]:
    value = math.nan if both_empty else math.inf
    out = {key: value for key in DISTANCE_KEYS}
    out["nsd"] = math.nan if both_empty else 0.0
    return out


def distance_metrics(
    sd: SurfaceDistances, *, percentile: float = 95, nsd_tolerance_mm: float = 1.0
) -> dict[str, float]:
    """HD, HD at ``percentile``, ASSD, MASD and NSD from precomputed surface distances.

    Args:
        sd: both directed distance sets (:func:`medseg.eval.surface.surface_distances`).
        percentile: of the robust Hausdorff distance, in [0, 100].
        nsd_tolerance_mm: a surface element counts as matched within this distance.

    Returns:
        dict with ``hd_mm`` (max of both directed maxima), ``hd95_mm`` (larger of the two directed
        area-weighted percentiles), ``assd_mm`` (area-weighted mean of both sets pooled),
        ``masd_mm`` (mean of the two directed area-weighted means) and ``nsd`` (matched area over
        total area, both surfaces). Both empty: all NaN; one empty: distances inf, NSD 0.
    """
    n_p, n_r = sd.pred_to_ref_mm.shape[0], sd.ref_to_pred_mm.shape[0]
    if n_p == 0 or n_r == 0:
        return _empty_distance_metrics(both_empty=n_p == n_r)
    hd = max(float(sd.pred_to_ref_mm.max()), float(sd.ref_to_pred_mm.max()))
    hdp = max(
        directed_percentile(sd.pred_to_ref_mm, sd.pred_areas_mm2, percentile),
        directed_percentile(sd.ref_to_pred_mm, sd.ref_areas_mm2, percentile),
    )
    sum_p, area_p = _weighted_sum_mean(sd.pred_to_ref_mm, sd.pred_areas_mm2)
    sum_r, area_r = _weighted_sum_mean(sd.ref_to_pred_mm, sd.ref_areas_mm2)
    matched = float(np.sum(sd.pred_areas_mm2[sd.pred_to_ref_mm <= nsd_tolerance_mm])) + float(
        np.sum(sd.ref_areas_mm2[sd.ref_to_pred_mm <= nsd_tolerance_mm])
    )
    return {
        "hd_mm": hd,
        "hd95_mm": hdp,
        "assd_mm": (sum_p + sum_r) / (area_p + area_r),
        "masd_mm": 0.5 * (sum_p / area_p + sum_r / area_r),
        "nsd": matched / (area_p + area_r),
    }


def hausdorff_distance(pred, ref, spacing_mm, percentile: float = 100) -> float:
    """Hausdorff distance in mm (``percentile=100``) or its robust version (e.g. 95).

    Returns:
        NaN when both masks are empty, inf when exactly one is.

    Raises:
        ValueError: on different shapes, non-3D masks or a bad spacing.
    """
    pred, ref, spacing = _check_pair(pred, ref, spacing_mm)
    key = "hd_mm" if percentile >= 100 else "hd95_mm"
    return distance_metrics(surface_distances(pred, ref, spacing), percentile=percentile)[key]


def image_diagonal_mm(shape, spacing_mm) -> float:
    """Length in mm of the image's diagonal: the 'worst' distance used for empty masks."""
    extent = np.asarray(shape, dtype=np.float64) * np.asarray(spacing_mm, dtype=np.float64)
    return float(np.sqrt(np.sum(extent * extent)))


def compute_metrics(
    pred, ref, spacing_mm, *, percentile: float = 95, nsd_tolerance_mm: float = 1.0, workers: int = -1
) -> dict:
    """All per-patient metrics of a prediction against a reference, surface computed once.

    Args:
        pred: bool (or 0/1) array (I, J, K), the prediction.
        ref: bool (or 0/1) array (I, J, K), the reference; same shape and axis order.
        spacing_mm: voxel size along (I, J, K), mm.
        percentile: of ``hd95_mm`` (the key keeps its name for any percentile).
        nsd_tolerance_mm: tolerance of the normalized surface Dice, mm.
        workers: threads of the nearest-neighbour search (-1: all cores, 1 inside process
            pools); the values do not depend on it.

    Returns:
        dict with float values for the voxel-wise keys of :mod:`medseg.eval.catalog`, in its
        order: ``dsc``, ``jaccard``, ``hd_mm``, ``hd95_mm``, ``assd_mm``, ``masd_mm``, ``nsd``,
        ``vol_pred_ml``, ``vol_ref_ml`` and ``rvd`` = (V_pred - V_ref) / V_ref, computed here, and
        any other described metric by its ``compute(pred, ref, spacing_mm)``. Empty masks follow
        the module's table; never raises on them.

    Raises:
        ValueError: on different shapes, non-3D masks or a bad spacing (not on empty masks).

    Example:
        >>> m = compute_metrics(pred, ref, (0.7, 0.7, 2.5))
        >>> m["dsc"], m["hd95_mm"]
    """
    pred, ref, spacing = _check_pair(pred, ref, spacing_mm)
    boxes = (bounding_box(pred), bounding_box(ref))
    n_pred, n_ref, n_both = _overlap_counts(pred, ref, boxes)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    out = {
        "dsc": _dice_from_counts(n_pred, n_ref, n_both),
        "jaccard": _jaccard_from_counts(n_pred, n_ref, n_both),
    }
    if n_pred == 0 or n_ref == 0:
        # No surface work needed: the empty rule fixes every distance.
        out.update(_empty_distance_metrics(both_empty=n_pred == n_ref))
    else:
        sd = surface_distances(pred, ref, spacing, workers=workers, boxes=boxes)
        out.update(distance_metrics(sd, percentile=percentile, nsd_tolerance_mm=nsd_tolerance_mm))
    vol_pred, vol_ref = n_pred * voxel_ml, n_ref * voxel_ml
    out["vol_pred_ml"] = vol_pred
    out["vol_ref_ml"] = vol_ref
    out["rvd"] = (vol_pred - vol_ref) / vol_ref if n_ref else math.nan
    for key in catalog.voxel_keys():
        if key not in out:  # a described metric computed outside this body
            out[key] = catalog.metric(key).compute(pred, ref, spacing)
    return {k: float(out[k]) for k in catalog.voxel_keys()}
