"""Lesion-wise detection scores: connected components of prediction and reference.

Detection rule (documented in docs/eval.md):

- Lesions are the connected components of each mask (26-connectivity by default; 18 or 6).
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

import numpy as np
from scipy import ndimage

from medseg.eval.surface import bounding_box

#: Supported connectivities (neighbours of a voxel) -> scipy structuring-element rank.
CONNECTIVITY_RANK = {6: 1, 18: 2, 26: 3}


def _structure(connectivity: int) -> np.ndarray:
    if connectivity not in CONNECTIVITY_RANK:
        raise ValueError(f"connectivity must be 6, 18 or 26, found {connectivity!r}")
    return ndimage.generate_binary_structure(3, CONNECTIVITY_RANK[connectivity])


def _ratio(num: float, den: float) -> float:
    return math.nan if den == 0 else num / den


def lesion_metrics(
    pred,
    ref,
    spacing_mm,
    *,
    connectivity: int = 26,
    min_overlap_fraction: float = 0.0,
) -> dict:
    """Lesion-wise TP/FP/FN, precision, recall, F1 and per-lesion Dice and volumes.

    Args:
        pred: bool (or 0/1) array (I, J, K), the prediction.
        ref: bool (or 0/1) array (I, J, K), the reference.
        spacing_mm: voxel size along (I, J, K), mm (for volumes).
        connectivity: 6, 18 or 26.
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
    structure = _structure(connectivity)
    voxel_ml = float(np.prod(np.asarray(spacing_mm, dtype=np.float64))) / 1000.0

    # Components never cross the joint bounding box, so label only inside it.
    boxes = [b for b in (bounding_box(pred), bounding_box(ref)) if b is not None]
    if boxes:
        lo = np.min([b[0] for b in boxes], axis=0)
        hi = np.max([b[1] for b in boxes], axis=0)
        sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        offset = lo
    else:
        sl = (slice(0, 0),) * 3
        offset = np.zeros(3, np.int64)
    lab_p, n_p = ndimage.label(pred[sl], structure=structure)
    lab_r, n_r = ndimage.label(ref[sl], structure=structure)

    size_p = np.bincount(lab_p.ravel(), minlength=n_p + 1)
    size_r = np.bincount(lab_r.ravel(), minlength=n_r + 1)
    both = (lab_p > 0) & (lab_r > 0)
    pairs_r = lab_r[both].astype(np.int64)
    pairs_p = lab_p[both].astype(np.int64)
    # overlap[r, p] = voxels shared by reference lesion r and predicted component p (sparse).
    pair_ids, pair_counts = np.unique(pairs_r * (n_p + 1) + pairs_p, return_counts=True)
    pair_r, pair_p = np.divmod(pair_ids, n_p + 1)
    covered_r = np.bincount(pair_r, weights=pair_counts, minlength=n_r + 1)

    ref_lesions = []
    detected = np.zeros(n_r + 1, dtype=bool)
    centroids_r = ndimage.center_of_mass(lab_r > 0, lab_r, range(1, n_r + 1)) if n_r else []
    for r in range(1, n_r + 1):
        fraction = covered_r[r] / size_r[r]
        detected[r] = covered_r[r] >= 1 and fraction >= min_overlap_fraction
        touching = pair_p[pair_r == r]
        pred_volume = int(size_p[touching].sum())
        dice = 2.0 * covered_r[r] / (size_r[r] + pred_volume)
        ref_lesions.append(
            {
                "id": r,
                "volume_ml": float(size_r[r] * voxel_ml),
                "overlap_fraction": float(fraction),
                "detected": bool(detected[r]),
                "dice": float(dice),
                "centroid_ijk": [round(float(c + o), 2) for c, o in zip(centroids_r[r - 1], offset)],
            }
        )
    matched_p = np.zeros(n_p + 1, dtype=bool)
    matched_p[pair_p[detected[pair_r]]] = True
    pred_lesions = []
    centroids_p = ndimage.center_of_mass(lab_p > 0, lab_p, range(1, n_p + 1)) if n_p else []
    for p in range(1, n_p + 1):
        pred_lesions.append(
            {
                "id": p,
                "volume_ml": float(size_p[p] * voxel_ml),
                "false_positive": not bool(matched_p[p]),
                "centroid_ijk": [round(float(c + o), 2) for c, o in zip(centroids_p[p - 1], offset)],
            }
        )
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
