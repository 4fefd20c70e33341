"""Outputs of an evaluation: ``metrics.csv``, ``summary.json`` and a self-contained ``report.html``.

Values in ``metrics.csv`` and in ``summary.json``'s ``metric_per_case`` are the raw per-case
values (``nan`` / ``inf`` in the CSV; ``null`` / ``"inf"`` in the JSON, which must stay strict
JSON); the statistics apply the empty-mask policy stated in ``summary.json["policy"]``.
Figures are drawn with matplotlib's Agg backend and embedded as base64 PNG, so the HTML page
is one file that can be mailed or archived.
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
from pathlib import Path

from medseg.eval import catalog
from medseg.eval.figures import (  # noqa: F401  (the report's figures, importable from here as before)
    boxplot_png,
    busiest_slice,
    case_figure_png,
    case_figures,
    draw_case,
    largest_disagreement_slice,
    outline_figure_png,
    slice_take,
)
from medseg.eval.report_text import (  # noqa: F401  (importable from here as before)
    case_value as _case_value, cell_text, csv_cell, html_notes, html_stats_table, labelled_columns, lesion_text,
    versions,
)
from medseg.io.jsonsafe import json_safe

#: The files :func:`write_report` writes into its folder.
REPORT_FILES = ("metrics.csv", "summary.json", "report.html")
#: Per-case fields of ``metrics.csv`` before the metrics, and after them.
CSV_LEAD = ("case_id", "missing", "pred_empty", "ref_empty", "resampled")
CSV_TAIL = ("diagonal_mm", "pred_path", "ref_path")

_fmt = catalog.format_value


def csv_columns() -> tuple[str, ...]:
    """Columns of the binary ``metrics.csv``: the case fields, every described metric in order
    (:data:`medseg.eval.catalog.METRICS`), the diagonal and the paths."""
    return CSV_LEAD + catalog.keys() + CSV_TAIL


def table_columns(lead=(("case_id", "case"),), cases=()) -> tuple[tuple[str, str], ...]:
    """``(key, title)`` of the per-patient table (terminal and HTML): ``lead`` text columns, the
    labelled share of ``cases`` scored with an ignore value, then the described table metrics
    (:func:`medseg.eval.catalog.table_metrics`)."""
    labelled = tuple((key, "labelled") for key in labelled_columns(cases))
    return tuple(lead) + labelled + tuple((m.key, m.column) for m in catalog.table_metrics())





def csv_text(cases: list[dict], classes=None) -> str:
    """``metrics.csv``: one row per patient, raw values (``nan``/``inf`` as text); with ``classes``
    (a :class:`~medseg.io.classes.ClassSpec`) long form, one row per patient and class
    (:func:`medseg.eval.report_classes.csv_text`)."""
    if classes is not None:
        from medseg.eval.report_classes import csv_text as class_csv

        return class_csv(cases, classes)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    columns = CSV_LEAD + labelled_columns(cases) + csv_columns()[len(CSV_LEAD):]
    writer.writerow(columns)
    for case in cases:
        writer.writerow([csv_cell(_case_value(case, key)) for key in columns])
    return buf.getvalue()



def summary_dict(result) -> dict:
    """``summary.json`` content (nnU-Net-like): per-case values with paths, statistics, policy.

    Per class with ``result.options.classes``: :func:`medseg.eval.report_classes.summary_dict`.
    """
    from medseg.eval.evaluate import options_dict

    if result.options.classes is not None:
        from medseg.eval.report_classes import summary_dict as class_summary

        return class_summary(result)
    per_case = list(result.cases)
    stats = result.summary["metrics"]
    return json_safe(
        {
            "metric_per_case": per_case,
            "mean": {k: v["mean"] for k, v in stats.items()},
            "statistics": stats,
            "policy": result.summary["policy"],
            "lesions": result.summary["lesions"],
            "options": options_dict(result.options),
            "unmatched_predictions": list(result.unmatched_predictions),
            "warnings": list(getattr(result, "warnings", [])),
            "versions": versions(),
        },
        inf_as_text=True,
    )


def format_table(cases: list[dict], classes=None) -> str:
    """The per-patient table as aligned plain text (printed by ``medseg-eval``): the columns of
    :func:`table_columns`; with ``classes`` (a :class:`~medseg.io.classes.ClassSpec` reported per
    class) one row per patient and class."""
    columns = table_columns(cases=cases)
    if classes is not None:
        from medseg.eval.report_classes import CLASS_LEAD, class_rows

        columns = table_columns(CLASS_LEAD, cases)
        cases = [view for _, _, view in class_rows(cases, classes)]
    header = [title for _, title in columns]
    rows = []
    for case in cases:
        row = [cell_text(key, _case_value(case, key)) for key, _ in columns]
        if case.get("missing"):
            row[0] += " (missing)"
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    for row in rows:
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:0.85em}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f2f2f2}td.id{text-align:left}tr.flag td{background:#fff3e0}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{border:1px solid #ddd;padding:4px;text-align:center;font-size:0.8em}
.note{color:#555;font-size:0.9em}.warn{background:#fff3e0;border-left:4px solid #e65100;padding:6px 10px}
"""


def _html_intro(result, policy: dict) -> list[str]:
    """Title, the definitions used, the empty-mask policy and the warnings."""
    esc = html.escape
    parts = _html_head(result) + [
        "<h2>Empty masks</h2>",
        f"<p>Policy <b>{esc(policy['empty_distance'])}</b>: {esc(policy['description'])}.</p>",
        "<ul>"
        f"<li>both masks empty: {policy['n_both_empty']}</li>"
        f"<li>prediction empty, reference not (missed): {policy['n_pred_empty_only']}</li>"
        f"<li>reference empty, prediction not (false alarm): {policy['n_ref_empty_only']}</li>"
        f"<li>prediction file missing (scored as a miss): {policy['n_missing_prediction']}</li></ul>",
    ]
    return parts + html_notes(result)



def _html_head(result) -> list[str]:
    """The page's head, title and the definitions used."""
    options = result.options
    return [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>medseg evaluation report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>medseg evaluation report</h1>",
        f"<p class='note'>{len(result.cases)} patients. Distances on the surface-element lattice of "
        "surface-distance (area-weighted); HD95 = larger of the two directed 95th percentiles; "
        f"NSD tolerance {_fmt(options.nsd_tolerance_mm, 2)} mm; lesions = "
        f"{options.connectivity}-connected components, detected when the prediction overlaps "
        + ("at least one voxel" if options.min_overlap_fraction == 0 else
           f"at least {100 * options.min_overlap_fraction:.0f}% of the lesion")
        + ".</p>",
    ]


def _html_statistics(result) -> list[str]:
    """Statistics over patients, pooled lesion counts and the box plots."""
    parts = html_stats_table(result.summary["metrics"])
    parts[0] = "<h2>Summary over patients</h2>" + parts[0]  # one line, as the page always had
    parts.append("<p>Lesions over all patients: " + lesion_text(result.summary["lesions"]) + ".</p>")
    parts.append("<h2>Distributions</h2><p class='note'>One point per patient, after the empty-mask "
                 "policy above (NaN values are not drawn).</p><img alt='box plots' src='data:image/png;base64,"
                 f"{boxplot_png(result.cases, result.empty_distance)}'>")
    return parts




def _case_notes(case: dict) -> list[str]:
    notes = []
    if case.get("missing"):
        notes.append("prediction missing")
    elif case["pred_empty"] and not case["ref_empty"]:
        notes.append("empty prediction")
    if case["ref_empty"]:
        notes.append("empty reference")
    if case.get("resampled"):
        notes.append("prediction resampled")
    if case.get("reoriented"):
        notes.append("prediction reoriented onto the reference's axis order (same voxels)")
    return notes


def _html_case_table(cases: list[dict], columns=None, title: str = "Per patient") -> list[str]:
    """The per-patient table (``columns``: (key, title), text keys ``case_id`` and ``class``);
    rows with notes are highlighted."""
    esc = html.escape
    columns = table_columns(cases=cases) if columns is None else columns
    parts = [f"<h2>{esc(title)}</h2><table><tr>" + "".join(f"<th>{esc(t)}</th>" for _, t in columns)
             + "<th>notes</th></tr>"]
    for case in cases:
        notes = _case_notes(case)
        cls = " class='flag'" if notes else ""
        cells = []
        for key, _ in columns:
            value = _case_value(case, key)
            label = key in ("case_id", "class")
            text = esc(str(value)) if label else cell_text(key, value)
            cells.append(f"<td{' class=id' if label else ''}>{text}</td>")
        parts.append(f"<tr{cls}>" + "".join(cells) + f"<td class='id'>{esc('; '.join(notes))}</td></tr>")
    parts.append("</table>")
    return parts


def html_text(result, summary: dict, figures: dict[str, str] | None = None) -> str:
    """``report.html``: one self-contained page (table, statistics, box plots, per-patient slices).

    Args:
        result: the :class:`~medseg.eval.evaluate.EvalResult`.
        summary: :func:`summary_dict` of it (policy, versions).
        figures: case id -> base64 PNG (:func:`case_figures`); cases without one show none.
    """
    if result.options.classes is None:
        parts = _html_intro(result, summary["policy"]) + _html_statistics(result) + _html_case_table(result.cases)
    else:
        from medseg.eval.report_classes import CLASS_LEAD, class_rows, html_class_sections

        parts = _html_head(result) + html_class_sections(result)
        columns = table_columns(CLASS_LEAD, result.cases)
        views = [view for _, _, view in class_rows(result.cases, result.options.classes)]
        parts += _html_case_table(views, columns, "Per patient and class")
    shown = [c["case_id"] for c in result.cases if (figures or {}).get(c["case_id"])]
    if shown:
        parts.append("<h2>Slice with the largest disagreement</h2><div class='cards'>")
        for case_id in shown:
            parts.append(f"<div class='card'><img alt='{html.escape(case_id)}' "
                         f"src='data:image/png;base64,{figures[case_id]}'></div>")
        parts.append("</div>")
    ver = summary["versions"]
    parts.append("<p class='note'>" + html.escape(", ".join(f"{k} {v}" for k, v in ver.items())) + "</p></body></html>")
    return "\n".join(parts)


def check_report_folder(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Check ``out_dir`` before an evaluation starts: a folder (or none yet) that can be written,
    without the outputs of an earlier evaluation unless ``overwrite``.

    Raises:
        InputError: naming the folder: a file, not writable (read-only, no permission, full
            disk), or it holds :data:`REPORT_FILES` and ``overwrite`` is False.
    """
    from medseg.errors import InputError
    from medseg.io.atomic import check_writable_folder

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(out, "an output folder", "a file")
    existing = [name for name in REPORT_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise InputError(out, "an output folder without an earlier evaluation", f"{', '.join(existing)}",
                         "pass --overwrite to replace them, or choose another --out")
    check_writable_folder(out)
    return out


def write_report(result, out_dir: str | os.PathLike, *, workers: int = 1) -> dict[str, Path]:
    """Write ``metrics.csv``, ``summary.json`` and ``report.html`` into ``out_dir`` atomically.

    The per-patient figures (unless ``result.options.figures`` is off) are drawn here, in
    ``workers`` processes (:func:`case_figures`). Everything is rendered in memory first; each file then goes to a temp file in ``out_dir``
    and the three are moved into place together (:func:`medseg.io.atomic.atomic_paths`), so a
    failure leaves neither a half-written file nor a report that belongs to another run.

    Returns:
        ``{"csv": path, "json": path, "html": path}``.
    """
    from medseg.io.atomic import atomic_paths, renamed

    out = Path(out_dir)
    summary = summary_dict(result)
    texts = {
        "csv": ("metrics.csv", csv_text(result.cases, result.options.classes)),
        "json": ("summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n"),
        "html": ("report.html", html_text(result, summary, case_figures(result, workers))),
    }
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / name for kind, (name, _) in texts.items()}
    with atomic_paths(list(paths.values())) as temps:
        for tmp, path, (_, text) in zip(temps, paths.values(), texts.values()):
            try:
                tmp.write_text(text, encoding="utf-8")
            except OSError as exc:  # a full disk names no file: name the report's, not the temp file
                raise renamed(exc, path) from exc
    return paths
