"""Every evaluation metric described once: what the CSV, ``summary.json``, ``report.html``, the
``medseg-eval`` table and the training validator show of it, and how.

A metric is one :class:`Metric` in :data:`METRICS` (in ``metrics.csv`` column order) plus its
computation: a voxel-wise metric is computed by :func:`medseg.eval.metrics.compute_metrics` (the
built-in ones in its body, any other by the entry's ``compute``), a lesion-wise one by
:func:`medseg.eval.lesions.lesion_metrics`. The readers ask this module at call time, never copy
it at import, so an entry added here reaches every output.

Every metric is scored per case (and, with named classes, per case and class); statistics over
patients apply the empty-mask policy of :mod:`medseg.eval.aggregate` (``distance`` metrics: inf
-> image diagonal or excluded), lesion counts are summed over patients (``count``).

Example:
    >>> metric("hd95_mm").column, metric("hd95_mm").better
    ('HD95 mm', 'lower')
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["Metric", "METRICS", "metric", "keys", "voxel_keys", "lesion_keys", "count_keys", "averaged_keys",
           "distance_keys", "table_metrics", "plot_metrics", "class_plot_metrics", "class_mean_keys",
           "class_table_metrics", "headline_metrics", "primary", "validation_columns",
           "validation_class_columns", "format_value", "HIGHER", "LOWER", "ZERO"]

#: Better directions: a larger value is better, a smaller one, one closer to 0; "" none (volumes, counts).
HIGHER, LOWER, ZERO = "higher", "lower", "zero"
VOXEL, LESION = "voxel", "lesion"


@dataclass(frozen=True)
class Metric:
    """One metric and where it is shown.

    Attributes:
        key: its key in the per-case records, ``metrics.csv`` and ``summary.json`` (``"hd95_mm"``).
        abbr: short name (``"HD95"``); the table column is ``abbr`` and ``unit`` (``"HD95 mm"``).
        name: full name, for documentation and tooltips.
        unit: ``"mm"``, ``"mL"`` or ``""`` (a ratio or a count).
        better: :data:`HIGHER`, :data:`LOWER`, :data:`ZERO` (closest to 0 is best) or ``""``.
        level: :data:`VOXEL` (``compute_metrics``: masks compared voxel by voxel or surface by
            surface) or :data:`LESION` (``lesion_metrics``: connected components; only for a
            case or class scored lesion-wise).
        digits: decimals in the tables (terminal and HTML).
        distance: a distance in mm, inf when exactly one mask is empty (the empty-distance policy).
        count: an integer count, summed over patients (the lesion totals), not averaged.
        table: column position in the per-patient table (terminal and HTML); 0: not shown.
        plot: panel position in the binary report's box plots; 0: not drawn.
        plot_label: the box plot's title (default ``abbr (unit)``).
        class_plot: row position in the per-class box plots; 0: not drawn.
        class_mean: position in ``mean_over_classes`` (a mean over classes of the per-class means;
            not for volumes, whose sum would be the total); 0: not averaged over classes.
        class_stats: statistics shown in the report's per-class table (``("mean", "median")``).
        headline: decimals in the terminal's summary line (``mean DSC 0.8312``); 0: not there.
        validation: averaged over classes in the training validator's row.
        validation_per_class: also kept per class there (``dsc_<name>``).
        compute: ``compute(pred, ref, spacing_mm) -> float`` of a voxel-wise metric that
            :func:`~medseg.eval.metrics.compute_metrics` does not compute in its body (None for those).
    """

    key: str
    abbr: str
    name: str
    unit: str = ""
    better: str = ""
    level: str = VOXEL
    digits: int = 3
    distance: bool = False
    count: bool = False
    table: int = 0
    plot: int = 0
    plot_label: str = ""
    class_plot: int = 0
    class_mean: int = 0
    class_stats: tuple[str, ...] = ()
    headline: int = 0
    validation: bool = False
    validation_per_class: bool = False
    compute: Callable | None = None

    def __post_init__(self) -> None:
        if self.better not in (HIGHER, LOWER, ZERO, ""):
            raise ValueError(f"Metric {self.key}: better must be higher, lower, zero or '', found {self.better!r}")
        if self.level not in (VOXEL, LESION):
            raise ValueError(f"Metric {self.key}: level must be voxel or lesion, found {self.level!r}")

    @property
    def column(self) -> str:
        """Column title in the tables: ``"HD95 mm"``, ``"DSC"``."""
        return f"{self.abbr} {self.unit}" if self.unit else self.abbr

    @property
    def label(self) -> str:
        """Axis or panel title: ``"HD95 (mm)"`` (or ``plot_label``)."""
        return self.plot_label or (f"{self.abbr} ({self.unit})" if self.unit else self.abbr)

    def headline_text(self, value: float) -> str:
        """``"mean HD95 1.25 mm"``: the mean in the terminal's summary line."""
        text = f"mean {self.abbr} {value:.{self.headline}f}"
        return f"{text} {self.unit}" if self.unit else text


_MM, _ML = dict(unit="mm", digits=2), dict(unit="mL", digits=2)

#: The metrics, in ``metrics.csv`` column order (voxel-wise, then lesion counts, then lesion rates).
METRICS: tuple[Metric, ...] = (
    Metric("dsc", "DSC", "Dice similarity coefficient", better=HIGHER, table=1, plot=1, class_plot=1,
           class_mean=1, class_stats=("mean", "median"), headline=4, validation=True, validation_per_class=True),
    Metric("jaccard", "Jaccard", "Jaccard index (intersection over union)", better=HIGHER, plot=2, class_mean=2,
           validation=True),
    Metric("hd_mm", "HD", "Hausdorff distance", better=LOWER, distance=True, plot=4, class_mean=4, **_MM),
    Metric("hd95_mm", "HD95", "robust Hausdorff distance (95th percentile by default)", better=LOWER,
           distance=True, table=2, plot=5, class_plot=2, class_mean=5, class_stats=("mean",), headline=2,
           validation=True, validation_per_class=True, **_MM),
    Metric("assd_mm", "ASSD", "average symmetric surface distance", better=LOWER, distance=True, table=3, plot=6,
           class_plot=3, class_mean=6, class_stats=("mean",), validation=True, **_MM),
    Metric("masd_mm", "MASD", "mean average surface distance", better=LOWER, distance=True, plot=7, class_mean=7,
           **_MM),
    Metric("nsd", "NSD", "normalized surface Dice", better=HIGHER, table=4, plot=3, class_plot=4, class_mean=3,
           class_stats=("mean",), validation=True),
    Metric("vol_pred_ml", "Vpred", "predicted volume", table=6, **_ML),
    Metric("vol_ref_ml", "Vref", "reference volume", table=5, **_ML),
    Metric("rvd", "RVD", "relative volume difference (Vpred - Vref) / Vref", better=ZERO, plot=8),
    Metric("n_ref_lesions", "ref lesions", "reference lesions (connected components)", level=LESION, count=True),
    Metric("n_pred_lesions", "pred lesions", "predicted components", level=LESION, count=True),
    Metric("lesion_tp", "TP", "detected reference lesions", level=LESION, count=True, table=7),
    Metric("lesion_fp", "FP", "false-positive predicted components", level=LESION, count=True, table=8),
    Metric("lesion_fn", "FN", "missed reference lesions", level=LESION, count=True, table=9),
    Metric("lesion_precision", "precision", "lesion precision TP / (TP + FP)", better=HIGHER, level=LESION),
    Metric("lesion_recall", "recall", "lesion recall TP / (TP + FN)", better=HIGHER, level=LESION),
    Metric("lesion_f1", "F1", "lesion F1 2TP / (2TP + FP + FN)", better=HIGHER, level=LESION, table=10, plot=9,
           plot_label="lesion F1"),
)


def metric(key: str) -> Metric:
    """The :class:`Metric` of ``key``.

    Raises:
        KeyError: naming the known keys.
    """
    for m in METRICS:
        if m.key == key:
            return m
    raise KeyError(f"no metric {key!r}; known: {', '.join(keys())}")


def _ranked(field: str) -> tuple[Metric, ...]:
    return tuple(sorted((m for m in METRICS if getattr(m, field)), key=lambda m: getattr(m, field)))


def keys() -> tuple[str, ...]:
    """Every key, in ``metrics.csv`` order."""
    return tuple(m.key for m in METRICS)


def voxel_keys() -> tuple[str, ...]:
    """Keys of :func:`~medseg.eval.metrics.compute_metrics`, in report order."""
    return tuple(m.key for m in METRICS if m.level == VOXEL)


def lesion_keys() -> tuple[str, ...]:
    """Lesion-wise keys (counts and rates) of :func:`~medseg.eval.lesions.lesion_metrics`."""
    return tuple(m.key for m in METRICS if m.level == LESION)


def count_keys() -> tuple[str, ...]:
    """Lesion counts: summed over patients into the totals."""
    return tuple(m.key for m in METRICS if m.count)


def averaged_keys(lesion_wise: bool = True) -> tuple[str, ...]:
    """Keys given statistics over patients (mean, median, ...): all but the counts; lesion
    rates only when ``lesion_wise``."""
    return tuple(m.key for m in METRICS if not m.count and (lesion_wise or m.level == VOXEL))


def distance_keys() -> frozenset[str]:
    """Keys of distances in mm (inf when exactly one mask is empty)."""
    return frozenset(m.key for m in METRICS if m.distance)


def table_metrics() -> tuple[Metric, ...]:
    """Columns of the per-patient table, in order."""
    return _ranked("table")


def plot_metrics() -> tuple[Metric, ...]:
    """Panels of the binary report's box plots, in order."""
    return _ranked("plot")


def class_plot_metrics() -> tuple[Metric, ...]:
    """Rows of the per-class box plots, in order."""
    return _ranked("class_plot")


def class_mean_keys() -> tuple[str, ...]:
    """Keys of ``mean_over_classes``, in order."""
    return tuple(m.key for m in _ranked("class_mean"))


def class_table_metrics() -> tuple[Metric, ...]:
    """Metrics with statistics in the report's per-class table (``class_stats``), in CSV order."""
    return tuple(m for m in METRICS if m.class_stats)


def headline_metrics() -> tuple[Metric, ...]:
    """Metrics of the terminal's summary line, in CSV order."""
    return tuple(m for m in METRICS if m.headline)


def primary() -> Metric:
    """The metric that leads: the first of the summary line (DSC), averaged over classes too."""
    return next(m for m in headline_metrics() if m.class_mean)


def validation_columns() -> tuple[str, ...]:
    """Keys the training validator averages over classes into one row per case (the row's
    ``dsc`` selects the model), in CSV order: ``("dsc", "jaccard", "hd95_mm", "assd_mm", "nsd")``."""
    return tuple(m.key for m in METRICS if m.validation)


def validation_class_columns() -> tuple[str, ...]:
    """Keys the training validator keeps per class as ``<key>_<class name>``: ``("dsc", "hd95_mm")``."""
    return tuple(m.key for m in METRICS if m.validation_per_class)


def format_value(value, digits: int = 3) -> str:
    """A value as the tables show it: ``-`` for None, ``yes``/``no``, integers as they are,
    floats with ``digits`` decimals, ``nan``, ``inf``, ``-inf``."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"
