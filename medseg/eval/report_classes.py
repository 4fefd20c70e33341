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

from medseg.eval.aggregate import LESION_COUNT_KEYS, LESION_RATE_KEYS, class_view, scored_value
from medseg.eval.metrics import METRIC_KEYS
from medseg.io.jsonsafe import json_safe

#: Columns of the long-form ``metrics.csv``: one row per case and class (lesion columns empty for
#: a class not counted lesion-wise).
CLASS_CSV_COLUMNS = (
    ("case", "class", "missing", "pred_empty", "ref_empty", "resampled")
    + METRIC_KEYS
    + LESION_COUNT_KEYS
    + LESION_RATE_KEYS
    + ("diagonal_mm", "pred_path", "ref_path")
)
#: Metrics drawn as box plots per class, with their axis labels.
CLASS_BOXPLOT_KEYS = {"dsc": "DSC", "hd95_mm": "HD95 (mm)", "assd_mm": "ASSD (mm)", "nsd": "NSD"}


def class_colours(names) -> dict[str, str]:
    """Class name -> ``"#rrggbb"``, distinct per class: matplotlib's tab10 up to 10 classes, tab20
    up to 20, evenly spaced hues beyond."""
    from matplotlib import colormaps
    from matplotlib.colors import hsv_to_rgb, to_hex

    names = list(names)
    if len(names) <= 20:
        cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
        return {name: to_hex(cmap(k)) for k, name in enumerate(names)}
    # Alternate brightness so neighbouring hues stay apart.
    return {name: to_hex(hsv_to_rgb((k / len(names), 0.85, 1.0 if k % 2 else 0.7))) for k, name in enumerate(names)}


def class_rows(cases: list[dict], spec) -> Iterator[tuple[dict, str, dict]]:
    """``(case, class name, view)`` per case and class, case-major; ``view`` is
    :func:`~medseg.eval.aggregate.class_view` plus ``case`` (the id) and ``class``."""
    for case in cases:
        for name in spec.names:
            view = class_view(case, name)
            view["case"], view["class"] = case["case_id"], name
            yield case, name, view


def csv_text(cases: list[dict], spec) -> str:
    """Long-form ``metrics.csv``: :data:`CLASS_CSV_COLUMNS`, one row per case and class, raw values."""
    from medseg.eval.report import _case_value, csv_cell

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CLASS_CSV_COLUMNS)
    for _, _, view in class_rows(cases, spec):
        writer.writerow([csv_cell(_case_value(view, key)) for key in CLASS_CSV_COLUMNS])
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
    from medseg.eval.report import versions

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


def class_figure_png(case: dict, masks, spec, *, image=None) -> str:
    """Base64 PNG of a case's slice with the most disagreeing voxels over all classes: per class,
    the reference outline solid and the prediction dashed in the class's colour, with a legend of
    the classes on the slice (:func:`medseg.eval.report.outline_figure_png`).

    Args:
        case: the record (:func:`~medseg.eval.evaluate.evaluate_case`) for the title's DSCs.
        masks: :class:`~medseg.eval.evaluate.CaseMasks` of the case (label maps).
        spec: the classes.
        image: the image on the reference grid, or None.
    """
    from matplotlib.lines import Line2D

    from medseg.eval.evaluate import class_masks
    from medseg.eval.report import _fmt, busiest_slice, outline_figure_png, slice_take

    spacing = masks.ref_volume.spacing_mm
    if spec.regions:
        pred, ref = spec.region_masks(masks.pred), spec.region_masks(masks.ref)
        differ, ref_any, pred_any = (pred != ref).any(axis=-1), ref.any(axis=-1), pred.any(axis=-1)
    else:
        # Class indices: a voxel disagrees when its class differs.
        pred, ref = spec.class_indices(masks.pred), spec.class_indices(masks.ref)
        differ, ref_any, pred_any = pred != ref, ref > 0, pred > 0
    axis, index = busiest_slice((differ, ref_any, pred_any), spacing)
    take = slice_take(axis, index)
    colours = class_colours(spec.names)
    layers, legend, dscs = [], [], []
    pred_slices = dict(class_masks(spec, masks.pred[take]))
    for name, ref_slice in class_masks(spec, masks.ref[take]):
        layers += [(ref_slice, colours[name], "solid"), (pred_slices[name], colours[name], "dashed")]
        if ref_slice.any() or pred_slices[name].any():
            legend.append(Line2D([], [], color=colours[name], linewidth=2, label=name))
            dscs.append(f"{name} {_fmt(case['classes'][name]['metrics']['dsc'], 2)}")
    legend += [Line2D([], [], color="#bbbbbb", linestyle=style, label=text)
               for style, text in (("solid", "reference"), ("dashed", "prediction"))]
    shown = dscs[:6] + (["..."] if len(dscs) > 6 else [])  # the title stays one line
    title = f"{case['case_id']}: array axis {axis}, slice {index}\nDSC " + ", ".join(shown or ["-"])
    return outline_figure_png(title, axis, index, spacing, layers, image=image, legend=legend)


def boxplot_png(cases: list[dict], spec, empty_distance: str) -> str:
    """Base64 PNG: per metric of :data:`CLASS_BOXPLOT_KEYS`, one box per class in its colour
    (values after the empty-mask policy; NaN not drawn)."""
    from medseg.eval.report import _png_b64, _pyplot

    plt = _pyplot()
    colours = class_colours(spec.names)
    keys = list(CLASS_BOXPLOT_KEYS)
    width = min(2.0 + 0.45 * len(spec.names), 14.0)
    fig, axes = plt.subplots(len(keys), 1, figsize=(width, 1.9 * len(keys)), dpi=90, squeeze=False)
    rng = np.random.default_rng(0)  # jitter only; fixed so reports are reproducible
    try:
        for ax, key in zip(axes[:, 0], keys):
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
            ax.set_title(CLASS_BOXPLOT_KEYS[key], fontsize=9)
            ax.tick_params(labelsize=8)
        fig.tight_layout()
        return _png_b64(fig)
    finally:
        plt.close(fig)


def _class_table(summary: dict, spec) -> list[str]:
    """One row per class: colour, ids, main statistics, empty-mask counts, pooled lesion F1
    (``summary``: :func:`~medseg.eval.aggregate.aggregate_classes`, raw values)."""
    from medseg.eval.report import _fmt

    esc = html.escape
    colours = class_colours(spec.names)
    head = ("class", "colour", "ids", "n", "mean DSC", "median DSC", "mean HD95 mm", "mean ASSD mm", "mean NSD",
            "reference without class", "both empty", "missed", "false alarm", "lesion F1 (pooled)")
    parts = ["<table class='classes'><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    for name, ids in zip(spec.names, spec.ids):
        entry = summary["classes"][name]
        stats, counts, lesions = entry["metrics"], entry["policy"], entry.get("lesions")
        cells = [
            f"<td class='id'>{esc(name)}</td>",
            f"<td class='id'><span class='swatch' style='background:{colours[name]}'></span> {colours[name]}</td>",
            f"<td>{esc(','.join(map(str, ids)))}</td>",
            f"<td>{stats['dsc']['n']}</td>",
            f"<td>{_fmt(stats['dsc']['mean'])}</td>",
            f"<td>{_fmt(stats['dsc']['median'])}</td>",
            f"<td>{_fmt(stats['hd95_mm']['mean'], 2)}</td>",
            f"<td>{_fmt(stats['assd_mm']['mean'], 2)}</td>",
            f"<td>{_fmt(stats['nsd']['mean'])}</td>",
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
    from medseg.eval.report import _fmt, html_notes, html_stats_table, lesion_text

    esc = html.escape
    spec = result.options.classes
    summary = result.summary  # raw values: NaN shows as nan, as in the binary report
    policy = summary["policy"]
    kind = "regions (each the union of its label ids)" if spec.regions else "classes (label ids)"
    parts = [
        "<style>.swatch{display:inline-block;width:0.9em;height:0.9em;vertical-align:middle;"
        "border:1px solid #888}</style>",
        f"<h2>Classes</h2><p class='note'>{len(spec.names)} {kind}, scored one by one; statistics over "
        "patients after the empty-mask policy below. Missed: prediction empty, reference not; false "
        "alarm: reference empty, prediction not.</p>",
    ]
    parts += _class_table(summary, spec)
    parts.append(f"<p>Mean over classes of the per-class mean DSC: <b>{_fmt(summary['mean_over_classes']['dsc'])}"
                 "</b>.</p>")
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
    """One line per class (mean DSC, mean HD95) and the mean over classes, for the terminal."""
    lines = []
    for name, entry in summary["classes"].items():
        stats = entry["metrics"]
        lines.append(f"{name}: mean DSC {stats['dsc']['mean']:.4f}, mean HD95 {stats['hd95_mm']['mean']:.2f} mm "
                     f"(reference without it: {entry['policy']['n_reference_without_class']})")
    lines.append(f"mean DSC over classes {summary['mean_over_classes']['dsc']:.4f}")
    return "\n".join(lines)
