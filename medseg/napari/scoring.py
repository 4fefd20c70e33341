"""Scoring a prediction layer against a reference layer, as ``medseg-eval`` does (no Qt here).

Both layers become Volumes on their scans' grids (:func:`medseg.napari.writer.labels_volume`);
the prediction is paired with the reference by physical position: the same voxels in another
axis order are reordered exactly (:meth:`medseg.io.Volume.onto_grid_of`), another grid is
resampled nearest-neighbour (:func:`medseg.eval.evaluate.resample_nearest`, what ``medseg-eval
--resample-pred`` does; the result says so). Metrics: :func:`medseg.eval.compute_metrics` per class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from medseg.napari.geometry import GEOMETRY_KEY, WORLD_FROM_RAS

__all__ = ["Scores", "score_layers", "COLUMNS"]

#: (key of compute_metrics, column title) of the table, in order.
COLUMNS = (("dsc", "DSC"), ("hd95_mm", "HD95 mm"), ("assd_mm", "ASSD mm"), ("vol_pred_ml", "pred mL"),
           ("vol_ref_ml", "ref mL"))


@dataclass
class Scores:
    """Per class ``rows`` (``{"class", "label", "dsc", "hd95_mm", ...}``), how the grids were
    paired (``pairing``: "same grid", "reordered" or "resampled"), and the worst class's slice:
    ``worst_class``, ``worst_world`` (napari world point, z y x mm, of its disagreement's centre
    on the slice with most disagreeing voxels), ``worst_slice`` (reference voxel axis, index)."""

    rows: list[dict] = field(default_factory=list)
    pairing: str = "same grid"
    worst_class: str | None = None
    worst_world: tuple[float, float, float] | None = None
    worst_slice: tuple[int, int] | None = None


def _classes(*layers) -> dict[int, str]:
    named: dict[int, str] = {}
    for layer in layers:
        for k, v in ((layer.metadata or {}).get(GEOMETRY_KEY, {}).get("classes") or {}).items():
            named.setdefault(int(k), str(v))
    return named


def score_layers(pred_layer, ref_layer, layers=()) -> Scores:
    """Score ``pred_layer`` against ``ref_layer`` (napari Labels layers), class by class.

    Classes: the named classes of either layer's metadata (by label id); without names, every
    nonzero label value found in either (``label N``).

    Raises:
        InputError: a layer without a grid (see :func:`medseg.napari.writer.labels_volume`).
    """
    from medseg.eval import compute_metrics
    from medseg.eval.evaluate import resample_nearest
    from medseg.napari.writer import _layer_meta, labels_volume

    def volume(layer):
        meta = dict(_layer_meta(layer), name=layer.name, metadata=layer.metadata)
        return labels_volume(layer.data, meta, layers)

    pred, ref = volume(pred_layer), volume(ref_layer)
    scores = Scores()
    aligned = pred.onto_grid_of(ref)
    if aligned is not None:
        scores.pairing = "same grid" if aligned is pred else "reordered"
        pred_array = np.asarray(aligned.array)
    else:
        scores.pairing = "resampled"
        pred_array = resample_nearest(pred, ref)
    ref_array = np.asarray(ref.array)
    classes = _classes(pred_layer, ref_layer)
    if not classes:
        values = np.union1d(np.unique(pred_array), np.unique(ref_array))
        classes = {int(v): f"label {int(v)}" for v in values if v != 0}
    worst = (math.inf, None, None)
    for label, name in sorted(classes.items()):
        p, r = pred_array == label, ref_array == label
        metrics = compute_metrics(p, r, ref.spacing_mm)
        scores.rows.append({"class": name, "label": label, **{k: float(metrics[k]) for k, _ in COLUMNS}})
        dsc = metrics["dsc"] if math.isfinite(metrics["dsc"]) else 1.0
        if (p != r).any() and dsc < worst[0]:
            worst = (dsc, name, (p, r))
    if worst[1] is not None:
        scores.worst_class = worst[1]
        scores.worst_slice, scores.worst_world = _worst_point(*worst[2], ref)
    return scores


def _worst_point(pred: np.ndarray, ref: np.ndarray, grid):
    """((axis, index), world point) of the slice with most disagreeing voxels (medseg-eval's
    report figure's choice) and the centre of the disagreement on it."""
    from medseg.eval.figures import largest_disagreement_slice

    axis, index = largest_disagreement_slice(pred, ref, grid.spacing_mm)
    wrong = np.argwhere(np.take(pred != ref, index, axis=axis))
    centre = wrong.mean(axis=0) if wrong.size else (np.array(pred.shape, float)[[a for a in range(3) if a != axis]] - 1) / 2
    ijk = np.insert(np.asarray(centre, float), axis, float(index))
    world = (WORLD_FROM_RAS @ grid.affine @ np.append(ijk, 1.0))[:3]
    return (int(axis), int(index)), tuple(float(w) for w in world)
