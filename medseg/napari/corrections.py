"""Corrections of a predicted label map as a partial label: which slices the user vouched for.

No napari or Qt import (the fine-tune widget, :mod:`medseg.napari.finetune`, drives it). A slice is
*labelled* when the user painted on it (napari's Labels ``paint`` events, or any difference from
the original prediction: edits that raise no event) or marked it as checked; every voxel of the
other slices becomes the ignore value, so training learns from the vouched-for slices only
(nnU-Net's ignore label). Slices are indices along one axis of the layer's data: the data axis
that runs along the model's slice axis (:func:`slice_axis_of_bundle`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from medseg.errors import InputError

__all__ = ["IGNORE_VALUE", "SliceRecord", "slices_of_paint", "changed_slices", "partial_label", "ignore_value_for",
           "slice_axis_of_bundle", "Difference", "difference"]

#: The ignore value of a partial label when the bundle's training data name none: above every
#: uint8 label value, inside int16/uint16 (the partial label is written as int32).
IGNORE_VALUE = 32767
#: World axis (napari: 0 = z_S, 1 = y_P, 2 = x_L) of each axis code of a plan's orientation.
_WORLD_AXIS_OF_CODE = {"S": 0, "I": 0, "A": 1, "P": 1, "R": 2, "L": 2}


@dataclass
class SliceRecord:
    """Slices of one Labels layer the user vouched for, along data axis ``axis``:
    ``painted`` (paint events) and ``checked`` (marked with one click)."""

    axis: int = 0
    painted: set = field(default_factory=set)
    checked: set = field(default_factory=set)

    def labelled(self) -> list[int]:
        return sorted(self.painted | self.checked)

    def snapshot(self) -> tuple:
        """An immutable copy (tests compare records before and after a run)."""
        return self.axis, frozenset(self.painted), frozenset(self.checked)


def slices_of_paint(atoms: Iterable, axis: int) -> set[int]:
    """Indices along ``axis`` touched by one napari ``paint`` event's ``value`` (a list of history
    atoms: a masked atom ``(slice_key, mask, old_values, new_value)`` or ``(indices, old, new)``)."""
    touched: set[int] = set()
    for atom in atoms:
        if hasattr(atom, "slice_key"):  # napari >= 0.6: bounding box of the edit and the changed pixels in it
            box = atom.slice_key[axis]
            start = int(box.start or 0)
            if atom.mask is None:
                touched.update(range(start, int(box.stop)))
            else:
                others = tuple(a for a in range(np.ndim(atom.mask)) if a != axis)
                hit = np.flatnonzero(np.any(np.asarray(atom.mask), axis=others))
                touched.update(int(start + i) for i in hit)
        else:  # (fancy indices, previous values, new values)
            touched.update(int(i) for i in np.unique(np.asarray(atom[0][axis])))
    return touched


def changed_slices(data: np.ndarray, original: np.ndarray | None, axis: int) -> set[int]:
    """Indices along ``axis`` where ``data`` differs from ``original`` (None: none)."""
    if original is None or np.shape(original) != np.shape(data):
        return set()
    diff = np.asarray(data) != np.asarray(original)
    others = tuple(a for a in range(diff.ndim) if a != axis)
    return {int(i) for i in np.flatnonzero(np.any(diff, axis=others))}


def partial_label(data: np.ndarray, axis: int, labelled: Iterable[int], ignore_value: int,
                  classes: Mapping[int, str], name: str = "labels") -> np.ndarray:
    """The partial label map: ``data``'s values on the ``labelled`` slices along ``axis``, the
    ignore value everywhere else (int32, ``data``'s shape; ``data`` is not modified).

    Raises:
        InputError: no slice labelled, a slice index outside the data, or a labelled voxel holding
            a value that is neither background (0) nor one of ``classes`` ({label id: name}): a
            value painted by mistake would be learnt as background, or the ignore value itself.
    """
    data = np.asarray(data)
    rows = sorted({int(i) for i in labelled})
    if not rows:
        raise InputError(None, f"at least one corrected or checked slice in {name!r}",
                         "none (paint on a slice, or mark it checked)")
    if rows[0] < 0 or rows[-1] >= data.shape[axis]:
        raise InputError(None, f"slice indices 0..{data.shape[axis] - 1} of {name!r}", f"slice {rows[-1]}")
    taken = np.take(data, rows, axis=axis)
    allowed = np.array(sorted({0, *(int(k) for k in classes)}))
    stray = np.setdiff1d(np.unique(taken), allowed)
    if stray.size:
        names = ", ".join(f"{k} {v}" for k, v in sorted(classes.items()))
        raise InputError(None, f"label values 0 (background) or the model's classes ({names}) on the corrected "
                         f"slices of {name!r}", f"value(s) {', '.join(map(str, stray[:8].tolist()))}",
                         "paint with a class's value, or 0 to erase")
    out = np.full(data.shape, ignore_value, dtype=np.int32)
    index = [slice(None)] * data.ndim
    index[axis] = rows
    out[tuple(index)] = taken
    return out


def ignore_value_for(bundle: Path, classes: Mapping[int, str]) -> int:
    """The ignore value of a partial label for ``bundle``: its run's own ``ignore_label``
    (``config.json``: its training data may hold that value, e.g. an earlier correction), else
    :data:`IGNORE_VALUE`; never a class id."""
    import json

    value = None
    try:
        value = json.loads((Path(bundle) / "config.json").read_text(encoding="utf-8")).get("ignore_label")
    except (OSError, ValueError, AttributeError):
        pass
    value = IGNORE_VALUE if value is None else int(value)
    if value in {int(k) for k in classes} or value == 0:
        raise InputError(Path(bundle) / "config.json", "an ignore value that is no class id",
                         f"ignore_label {value}")
    return value


def slice_axis_of_bundle(bundle: Path) -> int:
    """The napari world axis (0 z, 1 y, 2 x) along which the bundle's 2D model takes slices
    (its plan's ``orientation[slice_axis]``); 0 (axial) when the bundle records no plan. The
    layer's data axis ``a`` runs along world axis ``a`` (:mod:`medseg.napari.geometry`)."""
    import json

    try:
        plan = json.loads((Path(bundle) / "bundle.json").read_text(encoding="utf-8")).get("plan") or {}
        return _WORLD_AXIS_OF_CODE[str(plan.get("orientation", "RAS")).upper()[int(plan.get("slice_axis", 2))]]
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
        return 0


@dataclass
class Difference:
    """Before/after of a re-segmentation: ``changed`` (uint8: 0 same, 1 gained a class, 2 became
    background, 3 another class), ``rows`` (per class: ``voxels_before``, ``voxels_after``,
    ``ml_before``, ``ml_after``, ``ml_change``), ``agreement_before``/``_after`` (fraction of the
    labelled voxels where the prediction equals the correction; None without any)."""

    changed: np.ndarray
    rows: list
    agreement_before: float | None
    agreement_after: float | None

    @property
    def voxels_changed(self) -> int:
        return int(np.count_nonzero(self.changed))


def difference(before: np.ndarray, after: np.ndarray, classes: Mapping[int, str], voxel_ml: float,
               partial: np.ndarray | None = None, ignore_value: int | None = None) -> Difference:
    """Compare two label maps of one grid (same shape), per class of ``classes`` ({id: name})."""
    before, after = np.asarray(before), np.asarray(after)
    changed = np.zeros(before.shape, np.uint8)
    moved = before != after
    changed[moved & (before == 0)] = 1
    changed[moved & (after == 0)] = 2
    changed[moved & (before != 0) & (after != 0)] = 3
    rows = []
    for k, name in sorted(classes.items()):
        b, a = int(np.count_nonzero(before == k)), int(np.count_nonzero(after == k))
        rows.append({"class": name, "voxels_before": b, "voxels_after": a, "ml_before": b * voxel_ml,
                     "ml_after": a * voxel_ml, "ml_change": (a - b) * voxel_ml})
    agree = [None, None]
    if partial is not None:
        known = np.asarray(partial) != ignore_value
        if known.any():
            truth = np.asarray(partial)[known]
            agree = [float(np.mean(before[known] == truth)), float(np.mean(after[known] == truth))]
    return Difference(changed, rows, agree[0], agree[1])
