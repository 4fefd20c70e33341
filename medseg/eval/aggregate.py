"""Summary statistics over patients, with an explicit policy for empty masks.

Per-case values keep the raw empty-mask rule of :func:`medseg.eval.metrics.compute_metrics`
(NaN when both masks are empty, inf distances when exactly one is). Aggregation then:

- drops NaN values (both masks empty: there is nothing to score) and counts them;
- for distances, ``empty_distance="worst"`` (default) replaces inf by the case's image
  diagonal in mm (the largest distance possible in that image), ``"exclude"`` drops them;
  both are counted. A case whose prediction file is missing always gets the diagonal, so a
  missing file can never improve the summary.

With several classes (:func:`aggregate_classes`) each class is aggregated as above on its own
(:func:`class_view`), the same rules applying per class.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np

from medseg.eval import catalog

EMPTY_DISTANCE_POLICIES = ("worst", "exclude")
#: Per-patient lesion-wise keys summarised like the metrics, and those summed (as described at
#: import; the live lists are :mod:`medseg.eval.catalog`'s).
LESION_RATE_KEYS = tuple(k for k in catalog.lesion_keys() if k not in catalog.count_keys())
LESION_COUNT_KEYS = catalog.count_keys()


def check_policy(empty_distance: str) -> str:
    """Return ``empty_distance`` if it is a known policy.

    Raises:
        ValueError: for anything but ``"worst"`` or ``"exclude"``.
    """
    if empty_distance not in EMPTY_DISTANCE_POLICIES:
        raise ValueError(f"empty_distance must be one of {EMPTY_DISTANCE_POLICIES}, found {empty_distance!r}")
    return empty_distance


def scored_value(case: Mapping, key: str, empty_distance: str = "worst") -> float:
    """The value of ``key`` for one case after the empty-mask policy (NaN = not counted).

    Args:
        case: a per-case record with ``metrics`` (dict), ``diagonal_mm`` and ``missing``.
        key: a metric or lesion-wise key.
        empty_distance: ``"worst"`` or ``"exclude"``.
    """
    source = case["metrics"] if key in case["metrics"] else case.get("lesions", {})
    value = float(source.get(key, math.nan))
    if key in catalog.distance_keys() and math.isinf(value):
        if empty_distance == "worst" or case.get("missing", False):
            return float(case["diagonal_mm"])
        return math.nan
    return value


def describe(values: Iterable[float]) -> dict:
    """NaN-aware ``n, mean, median, std (ddof=1), min, max`` of finite values (NaN when none)."""
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if arr.size == 0:
        return {"n": 0, "mean": math.nan, "median": math.nan, "std": math.nan, "min": math.nan, "max": math.nan}
    return {
        "n": int(arr.size),
        "mean": float(arr.mean()),
        "median": float(np.median(arr)),
        "std": float(arr.std(ddof=1)) if arr.size > 1 else math.nan,
        "min": float(arr.min()),
        "max": float(arr.max()),
    }


def aggregate(cases: list[Mapping], empty_distance: str = "worst", *, lesion_wise: bool = True) -> dict:
    """Summary over patients: statistics per metric, empty-mask counts and pooled lesion scores.

    Args:
        cases: per-case records (``metrics``, ``lesions``, ``diagonal_mm``, ``missing``,
            ``pred_empty``, ``ref_empty``).
        empty_distance: ``"worst"`` (inf distance -> image diagonal) or ``"exclude"``.
        lesion_wise: summarise the lesion-wise keys too (False: a class not counted lesion-wise).

    Returns:
        dict with ``policy`` (text and counts), ``metrics`` (key -> :func:`describe` plus
        ``n_nan`` and ``n_inf``) and ``lesions`` (totals and pooled precision/recall/F1; absent
        without ``lesion_wise``, as the lesion rates in ``metrics``).

    Raises:
        ValueError: on an unknown policy.
    """
    check_policy(empty_distance)
    counts = {
        "n_cases": len(cases),
        "n_missing_prediction": sum(bool(c.get("missing")) for c in cases),
        "n_both_empty": sum(bool(c["pred_empty"] and c["ref_empty"]) for c in cases),
        "n_pred_empty_only": sum(bool(c["pred_empty"] and not c["ref_empty"]) for c in cases),
        "n_ref_empty_only": sum(bool(c["ref_empty"] and not c["pred_empty"]) for c in cases),
    }
    stats = {}
    for key in catalog.averaged_keys(lesion_wise):
        raw = [float((c["metrics"] if key in c["metrics"] else c.get("lesions", {})).get(key, math.nan)) for c in cases]
        entry = describe(scored_value(c, key, empty_distance) for c in cases)
        entry["n_nan"] = sum(math.isnan(v) for v in raw)
        entry["n_inf"] = sum(math.isinf(v) for v in raw)
        stats[key] = entry
    totals = {k: int(sum(int(c.get("lesions", {}).get(k, 0)) for c in cases)) for k in catalog.count_keys()}
    tp, fp, fn = totals["lesion_tp"], totals["lesion_fp"], totals["lesion_fn"]
    pooled = {
        "precision": tp / (tp + fp) if tp + fp else math.nan,
        "recall": tp / (tp + fn) if tp + fn else math.nan,
        "f1": 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else math.nan,
    }
    out = {
        "policy": {"empty_distance": empty_distance, "description": _policy_text(empty_distance), **counts},
        "metrics": stats,
        "lesions": {"totals": totals, "pooled": pooled},
    }
    if not lesion_wise:
        del out["lesions"]
    return out


def _policy_text(empty_distance: str) -> str:
    if empty_distance == "worst":
        text = "inf distances (exactly one mask empty) replaced by the image diagonal in mm"
    else:
        text = "inf distances (exactly one mask empty) excluded, except for missing predictions (diagonal)"
    return text + "; NaN values (both masks empty) excluded from every statistic"


#: Keys averaged over classes in ``mean_over_classes`` as described at import (volumes are not: a
#: sum would be the total); the live list is :func:`medseg.eval.catalog.class_mean_keys`.
CLASS_MEAN_KEYS = catalog.class_mean_keys()


def class_view(case: Mapping, name: str) -> dict:
    """The record of one class of a per-class case record, shaped as a binary record
    (``metrics``, ``lesions`` ({} for a class not counted lesion-wise), ``pred_empty``, ...)."""
    view = {k: v for k, v in case.items() if k not in ("classes", "unknown_prediction_values")}
    view.update(case["classes"][name])
    view.setdefault("lesions", {})
    return view


def aggregate_classes(cases: list[Mapping], spec, empty_distance: str = "worst") -> dict:
    """Summary of per-class records (:class:`medseg.io.classes.ClassSpec` ``spec``): :func:`aggregate`
    per class.

    Returns:
        dict with ``policy`` (text, ``n_cases``, ``n_missing_prediction``), ``classes`` (name ->
        :func:`aggregate` of that class, lesion-wise for ``spec.lesions`` only; its ``policy``
        adds ``n_reference_without_class``, the cases whose reference lacks the class) and
        ``mean_over_classes`` (key of :func:`~medseg.eval.catalog.class_mean_keys` -> mean over classes of the
        per-class means; classes without a finite mean left out; NaN when none).

    Raises:
        ValueError: on an unknown policy.
    """
    check_policy(empty_distance)
    per_class = {}
    for name in spec.names:
        entry = aggregate([class_view(c, name) for c in cases], empty_distance, lesion_wise=name in spec.lesions)
        entry["policy"]["n_reference_without_class"] = sum(bool(c["classes"][name]["ref_empty"]) for c in cases)
        per_class[name] = entry
    means = {}
    for key in catalog.class_mean_keys():
        values = [entry["metrics"][key]["mean"] for entry in per_class.values()]
        means[key] = describe(values)["mean"]
    return {
        "policy": {
            "empty_distance": empty_distance,
            "description": _policy_text(empty_distance),
            "n_cases": len(cases),
            "n_missing_prediction": sum(bool(c.get("missing")) for c in cases),
        },
        "classes": per_class,
        "mean_over_classes": means,
    }
