"""Statistics of label maps for the dataset check: lesions (connected components) of a binary
mask, and voxels, volume, components and slices of each named class."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from medseg.components import label_components
from medseg.io.classes import ClassSpec
from medseg.io.volume import largest_spacing_axis


def lesion_statistics(mask: np.ndarray, spacing_mm: Iterable[float]) -> dict[str, Any]:
    """Lesion statistics of a binary mask.

    Args:
        mask: boolean (or 0/1) 3D array, axes (i, j, k).
        spacing_mm: voxel size along (i, j, k) in mm.

    Returns:
        dict with ``lesion_count`` (connected components), ``lesion_voxels``,
        ``lesion_volume_ml``, ``lesion_volumes_ml`` (each component, largest first),
        ``slice_axis``, ``n_slices``, ``slices_with_lesion``, ``slice_fraction``,
        ``n_voxels``, ``foreground_fraction``.
    """
    mask = np.asarray(mask) != 0
    spacing = np.asarray(list(spacing_mm), dtype=np.float64)
    voxel_ml = float(np.prod(spacing) / 1000.0)
    axis = largest_spacing_axis(spacing)
    voxels = int(np.count_nonzero(mask))
    volumes: list[float] = []
    count = 0
    slices_with = 0
    if voxels:
        # Label only the bounding box of the foreground: lesions are small, scans are not.
        box = tuple(slice(int(idx[0]), int(idx[-1]) + 1) for idx in
                    (np.flatnonzero(mask.any(axis=tuple(b for b in range(mask.ndim) if b != a)))
                     for a in range(mask.ndim)))
        labelled, count = label_components(mask[box])
        sizes = np.bincount(labelled.ravel())[1:]
        volumes = sorted((float(s) * voxel_ml for s in sizes), reverse=True)
        other = tuple(a for a in range(mask.ndim) if a != axis)
        slices_with = int(np.count_nonzero(mask.any(axis=other)))
    n_slices = int(mask.shape[axis])
    return {
        "lesion_count": int(count),
        "lesion_voxels": voxels,
        "lesion_volume_ml": voxels * voxel_ml,
        "lesion_volumes_ml": volumes,
        "slice_axis": axis,
        "n_slices": n_slices,
        "slices_with_lesion": slices_with,
        "slice_fraction": slices_with / n_slices if n_slices else 0.0,
        "n_voxels": int(mask.size),
        "foreground_fraction": voxels / mask.size if mask.size else 0.0,
    }


def class_statistics(label: np.ndarray, spacing_mm: Iterable[float], classes: ClassSpec) -> dict[str, Any]:
    """Statistics of each class (or region) of a label map of ids.

    Args:
        label: 3D array of integral label ids (any dtype), axes (i, j, k).
        spacing_mm: voxel size along (i, j, k) in mm.
        classes: named classes or regions; class ``k`` is every voxel whose id is in ``ids[k]``.

    Returns:
        ``{"slice_axis", "n_slices", "n_voxels", "classes", "unlisted_ids"}``: ``classes`` maps each
        name to ``{"voxels", "volume_ml", "components", "slices", "slice_fraction"}`` (components
        by :func:`medseg.components.label_components`; slices along the slice axis that hold the
        class); ``unlisted_ids`` maps each nonzero id of no class to its voxel count.
    """
    label = np.asarray(label)
    spacing = [float(v) for v in spacing_mm]
    per_class: dict[str, dict[str, Any]] = {}
    s: dict[str, Any] = {}
    for name, ids in zip(classes.names, classes.ids):
        s = lesion_statistics(np.isin(label, ids), spacing)
        per_class[name] = {"voxels": s["lesion_voxels"], "volume_ml": s["lesion_volume_ml"],
                           "components": s["lesion_count"], "slices": s["slices_with_lesion"],
                           "slice_fraction": s["slice_fraction"]}
    listed = sorted({i for ids in classes.ids for i in ids})
    other = label[(label != 0) & ~np.isin(label, listed)]
    values, counts = np.unique(other, return_counts=True)
    return {
        "slice_axis": s["slice_axis"],
        "n_slices": s["n_slices"],
        "n_voxels": s["n_voxels"],
        "classes": per_class,
        "unlisted_ids": {int(v): int(c) for v, c in zip(values.tolist(), counts.tolist())},
    }

