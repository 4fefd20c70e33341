"""Lesion-wise detection scores: connected components of prediction and reference.

Detection rule (documented in docs/eval.md):

- Lesions are the connected components of each mask (:mod:`medseg.components`: 26-connectivity
  by default, as everywhere in medseg; 18 or 6 on request).
- A reference lesion is **detected** when the prediction covers at least one of its voxels and,
  if ``min_overlap_fraction`` > 0, at least that fraction of its volume. Overlap with the
  prediction as a whole counts, so one predicted component may detect several lesions and
  several components may detect one lesion.
- A predicted component is a **false positive** when it overlaps no detected reference lesion.
- TP = detected reference lesions, FN = missed ones, FP = false-positive components;
  precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2TP / (2TP + FP + FN); each is NaN
  when its denominator is 0 (e.g. recall of a patient without lesions).
- Per-lesion Dice compares the reference lesion with the predicted components that overlap it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from medseg.components import LESION_CONNECTIVITY, label_components
from medseg.eval.surface import bounding_box


def _ratio(num: float, den: float) -> float:
    return math.nan if den == 0 else num / den


def _joint_box(pred: np.ndarray, ref: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray]:
    """(slices, offset) of the bounding box of both masks; components never cross it."""
    boxes = [b for b in (bounding_box(pred), bounding_box(ref)) if b is not None]
    if not boxes:
        return (slice(0, 0),) * 3, np.zeros(3, np.int64)
    lo = np.min([b[0] for b in boxes], axis=0)
    hi = np.max([b[1] for b in boxes], axis=0)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)), lo


class _Components(NamedTuple):
    """Connected components of one mask: labels ``1..n`` and voxels per label (index 0: background)."""

    labels: np.ndarray
    n: int
    sizes: np.ndarray


def _components(mask: np.ndarray, connectivity: int) -> _Components:
    labels, n = label_components(mask, connectivity)
    return _Components(labels, n, np.bincount(labels.ravel(), minlength=n + 1))


def _overlaps(ref: _Components, pred: _Components):
    """Sparse overlap of reference lesions and predicted components.

    Returns:
        ``(pair_r, pair_p, pair_counts)``: each overlapping (reference lesion, predicted
        component) pair and its shared voxels.
    """
    both = (pred.labels > 0) & (ref.labels > 0)
    pairs_r = ref.labels[both].astype(np.int64)
    pairs_p = pred.labels[both].astype(np.int64)
    pair_ids, pair_counts = np.unique(pairs_r * (pred.n + 1) + pairs_p, return_counts=True)
    pair_r, pair_p = np.divmod(pair_ids, pred.n + 1)
    return pair_r, pair_p, pair_counts


def _centroids(comps: _Components, offset: np.ndarray) -> list[list[float]]:
    """Centroid (i, j, k) of each component in the full volume, rounded to 0.01 voxel."""
    if not comps.n:
        return []
    centres = ndimage.center_of_mass(comps.labels > 0, comps.labels, range(1, comps.n + 1))
    return [[round(float(c + o), 2) for c, o in zip(centre, offset)] for centre in centres]


def _ref_lesions(ref: _Components, pred: _Components, overlaps, detected: np.ndarray, covered: np.ndarray,
                 voxel_ml: float, offset: np.ndarray) -> list[dict]:
    """Per reference lesion: volume, covered fraction, detection, Dice with the components touching it."""
    pair_r, pair_p, _ = overlaps
    rows = []
    for r, centre in zip(range(1, ref.n + 1), _centroids(ref, offset)):
        touching = int(pred.sizes[pair_p[pair_r == r]].sum())
        rows.append({
            "id": r,
            "volume_ml": float(ref.sizes[r] * voxel_ml),
            "overlap_fraction": float(covered[r] / ref.sizes[r]),
            "detected": bool(detected[r]),
            "dice": float(2.0 * covered[r] / (ref.sizes[r] + touching)),
            "centroid_ijk": centre,
        })
    return rows


def _pred_lesions(pred: _Components, matched: np.ndarray, voxel_ml: float, offset: np.ndarray) -> list[dict]:
    """Per predicted component: volume, false positive or not."""
    return [
        {
            "id": p,
            "volume_ml": float(pred.sizes[p] * voxel_ml),
            "false_positive": not bool(matched[p]),
            "centroid_ijk": centre,
        }
        for p, centre in zip(range(1, pred.n + 1), _centroids(pred, offset))
    ]


def lesion_metrics(
    pred,
    ref,
    spacing_mm,
    *,
    connectivity: int = LESION_CONNECTIVITY,
    min_overlap_fraction: float = 0.0,
) -> dict:
    """Lesion-wise TP/FP/FN, precision, recall, F1 and per-lesion Dice and volumes.

    Args:
        pred: bool (or 0/1) array (I, J, K), the prediction.
        ref: bool (or 0/1) array (I, J, K), the reference.
        spacing_mm: voxel size along (I, J, K), mm (for volumes).
        connectivity: 6, 18 or 26 (:mod:`medseg.components`; default 26, as everywhere in medseg).
        min_overlap_fraction: a reference lesion is detected when the prediction covers at
            least one voxel and at least this fraction of it (0 = any overlap), in [0, 1].

    Returns:
        dict with ``n_ref_lesions``, ``n_pred_lesions``, ``lesion_tp``, ``lesion_fp``,
        ``lesion_fn``, ``lesion_precision``, ``lesion_recall``, ``lesion_f1`` and the lists
        ``ref_lesions`` (per reference lesion: ``id``, ``volume_ml``, ``overlap_fraction``,
        ``detected``, ``dice``, ``centroid_ijk``) and ``pred_lesions`` (``id``, ``volume_ml``,
        ``false_positive``, ``centroid_ijk``). Empty masks give zero counts, never an error.

    Raises:
        ValueError: on different shapes, a bad connectivity or a fraction outside [0, 1].
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    pred = pred if pred.dtype == bool else pred != 0
    ref = ref if ref.dtype == bool else ref != 0
    if pred.shape != ref.shape or pred.ndim != 3:
        raise ValueError(f"pred and ref must be 3D arrays of the same shape, found {pred.shape} and {ref.shape}")
    if not 0.0 <= float(min_overlap_fraction) <= 1.0:
        raise ValueError(f"min_overlap_fraction must be in [0, 1], found {min_overlap_fraction!r}")
    voxel_ml = float(np.prod(np.asarray(spacing_mm, dtype=np.float64))) / 1000.0
    box, offset = _joint_box(pred, ref)
    comps_p = _components(pred[box], connectivity)
    comps_r = _components(ref[box], connectivity)
    n_p, n_r = comps_p.n, comps_r.n
    overlaps = _overlaps(comps_r, comps_p)
    pair_r, pair_p, pair_counts = overlaps
    covered = np.bincount(pair_r, weights=pair_counts, minlength=n_r + 1)
    detected = (covered >= 1) & (covered / np.maximum(comps_r.sizes, 1) >= min_overlap_fraction)
    detected[0] = False  # the background
    matched_p = np.zeros(n_p + 1, dtype=bool)
    matched_p[pair_p[detected[pair_r]]] = True
    ref_lesions = _ref_lesions(comps_r, comps_p, overlaps, detected, covered, voxel_ml, offset)
    pred_lesions = _pred_lesions(comps_p, matched_p, voxel_ml, offset)
    tp = int(detected.sum())
    fn = n_r - tp
    fp = int(n_p - matched_p[1:].sum())
    return {
        "n_ref_lesions": int(n_r),
        "n_pred_lesions": int(n_p),
        "lesion_tp": tp,
        "lesion_fp": fp,
        "lesion_fn": fn,
        "lesion_precision": _ratio(tp, tp + fp),
        "lesion_recall": _ratio(tp, tp + fn),
        "lesion_f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "ref_lesions": ref_lesions,
        "pred_lesions": pred_lesions,
    }
