"""Outputs of a per-class evaluation (``--labels-map``, ``--dataset-json``): long-form
``metrics.csv``, ``summary.json`` per class and the per-class parts of ``report.html``.

A binary evaluation never comes here: its files are :mod:`medseg.eval.report`'s, unchanged.
This module reuses that one's pieces (value formatting, statistics table, outline figure) and
adds one colour per class, the same in the tables, the box plots and the overlays.
"""

from __future__ import annotations

import csv
import html
import io
from typing import Iterator

import numpy as np

from medseg.eval import catalog
from medseg.eval.aggregate import class_view, scored_value
from medseg.eval.figures import (  # noqa: F401  (class_figure_png importable from here as before)
    _png_b64, _pyplot, class_colours, class_figure_png,
)
from medseg.eval.report_text import (case_value as _case_value, csv_cell, html_notes, html_stats_table,
                                     labelled_columns, lesion_text, versions)
from medseg.io.jsonsafe import json_safe

#: Per-row fields of the long-form ``metrics.csv`` before the metrics, and after them.
CLASS_CSV_LEAD = ("case", "class", "missing", "pred_empty", "ref_empty", "resampled")
CLASS_CSV_TAIL = ("diagonal_mm", "pred_path", "ref_path")
#: The text columns that lead the per-patient-and-class table: ``(key, title)``.
CLASS_LEAD = (("case_id", "case"), ("class", "class"))

_fmt = catalog.format_value


def class_csv_columns() -> tuple[str, ...]:
    """Columns of the long-form ``metrics.csv``: one row per case and class (lesion columns empty
    for a class not counted lesion-wise); the metrics are :data:`medseg.eval.catalog.METRICS`."""
    return CLASS_CSV_LEAD + catalog.keys() + CLASS_CSV_TAIL



def class_rows(cases: list[dict], spec) -> Iterator[tuple[dict, str, dict]]:
    """``(case, class name, view)`` per case and class, case-major; ``view`` is
    :func:`~medseg.eval.aggregate.class_view` plus ``case`` (the id) and ``class``."""
    for case in cases:
        for name in spec.names:
            view = class_view(case, name)
            view["case"], view["class"] = case["case_id"], name
            yield case, name, view


def csv_text(cases: list[dict], spec) -> str:
    """Long-form ``metrics.csv``: :func:`class_csv_columns`, one row per case and class, raw values."""

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    columns = CLASS_CSV_LEAD + labelled_columns(cases) + class_csv_columns()[len(CLASS_CSV_LEAD):]
    writer.writerow(columns)
    for _, _, view in class_rows(cases, spec):
        writer.writerow([csv_cell(_case_value(view, key)) for key in columns])
    return buf.getvalue()


def _unknown_totals(cases: list[dict]) -> dict:
    """Prediction value of no class -> ``{"cases": n, "voxels": n}`` over all cases."""
    out: dict[str, dict] = {}
    for case in cases:
        for value, voxels in case["unknown_prediction_values"].items():
            entry = out.setdefault(value, {"cases": 0, "voxels": 0})
            entry["cases"] += 1
            entry["voxels"] += int(voxels)
    return dict(sorted(out.items(), key=lambda kv: float(kv[0])))


def summary_dict(result) -> dict:
    """``summary.json`` of a per-class evaluation: the binary summary's parts keyed by class.

    Keys: ``classes`` (name -> ids, lesion-wise or not), ``metric_per_case``, ``mean`` and
    ``statistics`` (class -> metric -> ...), ``mean_over_classes`` (metric -> mean over classes of
    the per-class means), ``policy`` (with ``classes``: per class the empty-mask counts and
    ``n_reference_without_class``), ``lesions`` (lesion classes only), ``unknown_prediction_values``,
    ``options``, ``unmatched_predictions``, ``warnings``, ``versions``.
    """
    from medseg.eval.evaluate import options_dict

    spec = result.options.classes
    per_class = result.summary["classes"]
    shared = set(result.summary["policy"])
    return json_safe(
        {
            "classes": {name: {"ids": list(ids), "lesion_wise": name in spec.lesions}
                        for name, ids in zip(spec.names, spec.ids)},
            "regions": spec.regions,
            "metric_per_case": list(result.cases),
            "mean": {name: {k: v["mean"] for k, v in entry["metrics"].items()} for name, entry in per_class.items()},
            "mean_over_classes": result.summary["mean_over_classes"],
            "statistics": {name: entry["metrics"] for name, entry in per_class.items()},
            "policy": {
                **result.summary["policy"],
                "classes": {name: {k: v for k, v in entry["policy"].items() if k not in shared}
                            for name, entry in per_class.items()},
            },
            "lesions": {name: entry["lesions"] for name, entry in per_class.items() if "lesions" in entry},
            "unknown_prediction_values": _unknown_totals(result.cases),
            "options": options_dict(result.options),
            "unmatched_predictions": list(result.unmatched_predictions),
            "warnings": list(getattr(result, "warnings", [])),
            "versions": versions(),
        },
        inf_as_text=True,
    )



def boxplot_png(cases: list[dict], spec, empty_distance: str) -> str:
    """Base64 PNG: per metric of :func:`medseg.eval.catalog.class_plot_metrics`, one box per class
    in its colour (values after the empty-mask policy; NaN not drawn)."""
    plt = _pyplot()
    colours = class_colours(spec.names)
    shown = catalog.class_plot_metrics()
    keys = [m.key for m in shown]
    width = min(2.0 + 0.45 * len(spec.names), 14.0)
    fig, axes = plt.subplots(len(keys), 1, figsize=(width, 1.9 * len(keys)), dpi=90, squeeze=False)
    rng = np.random.default_rng(0)  # jitter only; fixed so reports are reproducible
    try:
        for ax, m in zip(axes[:, 0], shown):
            key = m.key
            for pos, name in enumerate(spec.names, 1):
                values = np.asarray([scored_value(class_view(c, name), key, empty_distance) for c in cases])
                values = values[np.isfinite(values)]
                if values.size:
                    box = ax.boxplot(values, positions=[pos], widths=0.5, showfliers=False, patch_artist=True)
                    box["boxes"][0].set(facecolor=colours[name], alpha=0.35)
                    ax.scatter(pos + rng.uniform(-0.12, 0.12, values.size), values, s=10, color=colours[name])
            ax.set_xticks(range(1, len(spec.names) + 1))
            ax.set_xticklabels(spec.names, rotation=45 if len(spec.names) > 6 else 0, ha="right"
                               if len(spec.names) > 6 else "center", fontsize=8)
            ax.set_xlim(0.4, len(spec.names) + 0.6)
            ax.set_title(m.label, fontsize=9)
            ax.tick_params(labelsize=8)
        fig.tight_layout()
        return _png_b64(fig)
    finally:
        plt.close(fig)


def _class_table(summary: dict, spec) -> list[str]:
    """One row per class: colour, ids, the described statistics (``class_stats`` of
    :mod:`medseg.eval.catalog`), empty-mask counts, pooled lesion F1 (``summary``:
    :func:`~medseg.eval.aggregate.aggregate_classes`, raw values)."""
    esc = html.escape
    colours = class_colours(spec.names)
    shown = [(m, stat) for m in catalog.class_table_metrics() for stat in m.class_stats]
    head = ("class", "colour", "ids", "n", *(f"{stat} {m.column}" for m, stat in shown),
            "reference without class", "both empty", "missed", "false alarm", "lesion F1 (pooled)")
    lead = catalog.primary().key
    parts = ["<table class='classes'><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    for name, ids in zip(spec.names, spec.ids):
        entry = summary["classes"][name]
        stats, counts, lesions = entry["metrics"], entry["policy"], entry.get("lesions")
        cells = [
            f"<td class='id'>{esc(name)}</td>",
            f"<td class='id'><span class='swatch' style='background:{colours[name]}'></span> {colours[name]}</td>",
            f"<td>{esc(','.join(map(str, ids)))}</td>",
            f"<td>{stats[lead]['n']}</td>",
            *(f"<td>{_fmt(stats[m.key][stat], m.digits)}</td>" for m, stat in shown),
            *(f"<td>{counts[k]}</td>" for k in ("n_reference_without_class", "n_both_empty", "n_pred_empty_only",
                                                "n_ref_empty_only")),
            f"<td>{_fmt(lesions['pooled']['f1']) if lesions else '-'}</td>",
        ]
        parts.append(f"<tr data-class='{esc(name)}'>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    return parts


def html_class_sections(result) -> list[str]:
    """The per-class parts of ``report.html`` after its head: classes with colours and statistics,
    empty masks, warnings, full statistics per class, box plots per class."""

    esc = html.escape
    spec = result.options.classes
    summary = result.summary  # raw values: NaN shows as nan, as in the binary report
    policy = summary["policy"]
    kind = f"{spec.kind.count_text(len(spec.names))} ({spec.kind.ids_meaning})"
    lead = catalog.primary()
    parts = [
        "<style>.swatch{display:inline-block;width:0.9em;height:0.9em;vertical-align:middle;"
        "border:1px solid #888}</style>",
        f"<h2>Classes</h2><p class='note'>{kind}, scored one by one; statistics over "
        "patients after the empty-mask policy below. Missed: prediction empty, reference not; false "
        "alarm: reference empty, prediction not.</p>",
    ]
    parts += _class_table(summary, spec)
    parts.append(f"<p>Mean over classes of the per-class mean {lead.abbr}: "
                 f"<b>{_fmt(summary['mean_over_classes'][lead.key], lead.digits)}</b>.</p>")
    parts += [
        "<h2>Empty masks</h2>",
        f"<p>Policy <b>{esc(policy['empty_distance'])}</b>: {esc(policy['description'])}; per class, "
        "counts in the table above. A class absent from a reference scores NaN (absent from the "
        "prediction too) or 0 / inf.</p>",
        f"<p>Prediction files missing (scored as a miss for every class): {policy['n_missing_prediction']}.</p>",
    ]
    parts += html_notes(result)
    parts.append("<h2>Summary over patients, per class</h2>")
    for name in spec.names:
        entry = summary["classes"][name]
        parts.append(f"<details><summary>{esc(name)}</summary>")
        parts += html_stats_table(entry["metrics"])
        if "lesions" in entry:
            parts.append("<p>Lesions over all patients: " + lesion_text(entry["lesions"]) + ".</p>")
        parts.append("</details>")
    parts.append("<h2>Distributions</h2><p class='note'>One point per patient and class, after the "
                 "empty-mask policy above (NaN values are not drawn).</p><img alt='box plots per class' "
                 f"src='data:image/png;base64,{boxplot_png(result.cases, spec, result.empty_distance)}'>")
    if result.options.figures:
        parts.append("<p class='note'>Slices below: reference outlines solid, prediction dashed, in the "
                     "colour of each class.</p>")
    return parts


def mean_over_classes_text(summary: dict) -> str:
    """One line per class (the means of :func:`medseg.eval.catalog.headline_metrics`: mean DSC,
    mean HD95) and the primary metric's mean over classes, for the terminal."""
    lines = []
    for name, entry in summary["classes"].items():
        stats = entry["metrics"]
        means = ", ".join(m.headline_text(stats[m.key]["mean"]) for m in catalog.headline_metrics())
        lines.append(f"{name}: {means} (reference without it: {entry['policy']['n_reference_without_class']})")
    lead = catalog.primary()
    lines.append(f"mean {lead.abbr} over classes {summary['mean_over_classes'][lead.key]:.{lead.headline}f}")
    return "\n".join(lines)
