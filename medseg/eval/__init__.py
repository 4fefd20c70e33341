"""Evaluation of segmentations: surface metrics, lesion-wise scores, aggregation and reports.

Pure metric functions (NumPy/SciPy only, no TensorFlow)::

    from medseg.eval import compute_metrics, dice
    m = compute_metrics(pred, ref, spacing_mm=(0.7, 0.7, 2.5))   # dsc, hd95_mm, assd_mm, nsd, ...

Definitions, the empty-mask rule, the lesion detection rule and per-class evaluation: docs/eval.md.
"""

from medseg.eval.aggregate import aggregate, aggregate_classes, class_view, describe, scored_value
from medseg.eval.lesions import lesion_metrics
from medseg.eval.metrics import (
    DISTANCE_KEYS,
    METRIC_KEYS,
    compute_metrics,
    dice,
    directed_percentile,
    distance_metrics,
    hausdorff_distance,
    image_diagonal_mm,
    jaccard,
)
from medseg.eval.surface import SurfaceDistances, extract_surface, surface_distances

__all__ = [
    "DISTANCE_KEYS",
    "METRIC_KEYS",
    "SurfaceDistances",
    "aggregate",
    "aggregate_classes",
    "class_view",
    "compute_metrics",
    "describe",
    "dice",
    "directed_percentile",
    "distance_metrics",
    "extract_surface",
    "hausdorff_distance",
    "image_diagonal_mm",
    "jaccard",
    "lesion_metrics",
    "scored_value",
    "surface_distances",
]
