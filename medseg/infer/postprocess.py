"""Clean-up of predicted label volumes: drop tiny lesions, keep the largest one, and the choices
of either made on validation.

Both functions work on 3D label arrays (``0`` background, ``> 0`` lesion) in voxel space and
return a new ``uint8`` array; label values of the voxels that are kept are preserved. Lesions are
connected components (:func:`medseg.components.label_components`, 26-neighbour, as the dataset
check and the lesion-wise evaluation count them): two voxels that touch at a corner belong to the
same lesion.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from medseg.components import label_components


def _as_label_array(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"expected a 3D label array, found shape {mask.shape} ({mask.ndim}D)")
    return mask


def remove_small_lesions(mask: np.ndarray, spacing_mm: Sequence[float], min_lesion_ml: float, *,
                         spare_largest: bool = False) -> np.ndarray:
    """Remove connected lesions smaller than ``min_lesion_ml``.

    Args:
        mask: 3D label array ``(i, j, k)``; voxels ``> 0`` are lesion.
        spacing_mm: voxel size along the three array axes, mm.
        min_lesion_ml: lesions whose volume (voxel count x voxel volume) is strictly below this
            are set to 0; ``0`` keeps everything. 1 ml = 1000 mm^3.
        spare_largest: keep the largest component whatever its size (the size rule a bundle
            learned from its training labels: a scan whose field of view cuts the structure holds
            less of it than any training label, and the rule must not empty the class).

    Returns:
        ``uint8`` array of the same shape; kept voxels keep their label.

    Raises:
        ValueError: if ``mask`` is not 3D, ``spacing_mm`` is not three positive numbers or
            ``min_lesion_ml`` is negative or not finite.

    Example:
        >>> m = np.zeros((4, 4, 4), np.uint8); m[0, 0, 0] = 1; m[2:4, 2:4, 2:4] = 1
        >>> int(remove_small_lesions(m, (10, 10, 10), 2.0).sum())  # 1 ml voxel dropped, 8 ml cube kept
        8
    """
    mask = _as_label_array(mask)
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"spacing_mm must be three positive numbers, found {np.asarray(spacing_mm).tolist()}")
    if not np.isfinite(min_lesion_ml) or min_lesion_ml < 0:
        raise ValueError(f"min_lesion_ml must be a finite number >= 0, found {min_lesion_ml}")
    out = mask.astype(np.uint8, copy=True)
    if min_lesion_ml == 0 or not out.any():
        return out
    voxel_ml = float(np.prod(spacing)) / 1000.0
    components, n = label_components(out > 0)
    sizes_ml = np.bincount(components.ravel(), minlength=n + 1) * voxel_ml
    too_small = sizes_ml < min_lesion_ml
    too_small[0] = False  # label 0 is the background, already 0
    if spare_largest:
        too_small[int(np.argmax(sizes_ml[1:])) + 1] = False  # the first of equal largest, as below
    out[too_small[components]] = 0
    return out


def clean_mask(mask: np.ndarray, spacing_mm: Sequence[float], min_ml: float, keep_largest: bool, *,
               spare_largest: bool = False) -> np.ndarray:
    """One class's post-processing in inference's order: components below ``min_ml`` (ml) dropped
    (0: none; ``spare_largest``: the largest one stays whatever its size), then, with
    ``keep_largest``, the largest remaining component kept. ``uint8`` out; ``mask`` itself is
    returned unchanged when there is nothing to do."""
    if min_ml > 0:
        mask = remove_small_lesions(mask, spacing_mm, min_ml, spare_largest=spare_largest)
    return keep_largest_component(mask) if keep_largest else mask


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep only the largest connected lesion (by voxel count).

    Args:
        mask: 3D label array ``(i, j, k)``; voxels ``> 0`` are lesion.

    Returns:
        ``uint8`` array of the same shape. An empty mask stays empty. On a tie the component
        met first in C (row-major) scan order wins, so the result is deterministic.

    Raises:
        ValueError: if ``mask`` is not 3D.
    """
    mask = _as_label_array(mask)
    out = mask.astype(np.uint8, copy=True)
    if not out.any():
        return out
    components, _ = label_components(out > 0)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    largest = int(np.argmax(sizes))  # argmax returns the first maximum: lowest label = first in scan order
    out[components != largest] = 0
    return out


def choose_largest_component(rows: Sequence[dict], *, validation: str = "held-out cases") -> dict:
    """Decide from validation rows whether inference keeps the largest component (nnU-Net's
    post-processing choice, made on validation, applied at inference by the bundle).

    Each row needs ``dsc`` (raw prediction) and ``dsc_largest_component`` (after
    :func:`keep_largest_component`). The largest component is kept when its mean DSC is at least
    the raw mean DSC (a tie means it removed nothing that mattered), over the rows where both
    are finite.

    Returns:
        ``{"largest_component": bool, "dsc": raw mean, "dsc_largest_component": mean,
        "cases": n, "validation": validation, "reason": one line}``; ``largest_component`` is
        False without a usable row.
    """
    pairs = [(float(r["dsc"]), float(r["dsc_largest_component"])) for r in rows
             if "dsc_largest_component" in r and np.isfinite(float(r.get("dsc", np.nan)))
             and np.isfinite(float(r["dsc_largest_component"]))]
    if not pairs:
        return {"largest_component": False, "dsc": None, "dsc_largest_component": None, "cases": 0,
                "validation": validation, "reason": "no validation case with a finite DSC"}
    raw, lcc = (float(np.mean(v)) for v in zip(*pairs))
    keep = lcc >= raw
    return {"largest_component": bool(keep), "dsc": raw, "dsc_largest_component": lcc, "cases": len(pairs),
            "validation": validation,
            "reason": f"mean 3D DSC on {len(pairs)} {validation} {raw:.3f} -> {lcc:.3f} keeping the largest component"}


def choose_small_components(rows: Sequence[dict], *, min_component_ml: float,
                            validation: str = "held-out cases") -> dict:
    """Decide from validation rows whether inference drops predicted components smaller than
    ``min_component_ml`` (the training labels' smallest component), as
    :func:`choose_largest_component` decides its rule: dropped when the mean DSC without them
    (``dsc_without_small``) is at least the raw mean DSC (``dsc``), over the rows where both are
    finite (a tie: what it drops did not matter, and nothing that small was ever labelled), but
    not on a tie at 0 (a model that found nothing tells nothing about the rule).

    Returns:
        ``{"drop": bool, "min_component_ml": float, "dsc": raw mean, "dsc_without_small": mean,
        "cases": n, "validation": validation, "reason": one line}``; ``drop`` is False without a
        usable row.

    Raises:
        ValueError: ``min_component_ml`` not a finite number > 0.
    """
    if not (np.isfinite(min_component_ml) and min_component_ml > 0):
        raise ValueError(f"min_component_ml must be a finite number > 0, found {min_component_ml!r}")
    pairs = [(float(r["dsc"]), float(r["dsc_without_small"])) for r in rows
             if "dsc_without_small" in r and np.isfinite(float(r.get("dsc", np.nan)))
             and np.isfinite(float(r["dsc_without_small"]))]
    if not pairs:
        return {"drop": False, "min_component_ml": float(min_component_ml), "dsc": None, "dsc_without_small": None,
                "cases": 0, "validation": validation, "reason": "no validation case with a finite DSC"}
    raw, kept = (float(np.mean(v)) for v in zip(*pairs))
    return {"drop": bool(kept > raw or (kept == raw and raw > 0)), "min_component_ml": float(min_component_ml), "dsc": raw,
            "dsc_without_small": kept, "cases": len(pairs), "validation": validation,
            "reason": f"mean 3D DSC on {len(pairs)} {validation} {raw:.3f} -> {kept:.3f} dropping components "
                      f"under {min_component_ml:.3g} ml (the training labels' smallest)"}
