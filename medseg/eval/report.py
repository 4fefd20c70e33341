"""Outputs of an evaluation: ``metrics.csv``, ``summary.json`` and a self-contained ``report.html``.

Values in ``metrics.csv`` and in ``summary.json``'s ``metric_per_case`` are the raw per-case
values (``nan`` / ``inf`` in the CSV; ``null`` / ``"inf"`` in the JSON, which must stay strict
JSON); the statistics apply the empty-mask policy stated in ``summary.json["policy"]``.
Figures are drawn with matplotlib's Agg backend and embedded as base64 PNG, so the HTML page
is one file that can be mailed or archived.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import platform
from pathlib import Path

import numpy as np

from medseg.eval.aggregate import LESION_COUNT_KEYS, LESION_RATE_KEYS, scored_value
from medseg.eval.metrics import METRIC_KEYS
from medseg.io.jsonsafe import json_safe

#: Metrics shown as box plots, with their axis labels.
BOXPLOT_KEYS = {
    "dsc": "DSC",
    "jaccard": "Jaccard",
    "nsd": "NSD",
    "hd_mm": "HD (mm)",
    "hd95_mm": "HD95 (mm)",
    "assd_mm": "ASSD (mm)",
    "masd_mm": "MASD (mm)",
    "rvd": "RVD",
    "lesion_f1": "lesion F1",
}
CSV_COLUMNS = (
    ("case_id", "missing", "pred_empty", "ref_empty", "resampled")
    + METRIC_KEYS
    + LESION_COUNT_KEYS
    + LESION_RATE_KEYS
    + ("diagonal_mm", "pred_path", "ref_path")
)
#: The files :func:`write_report` writes into its folder.
REPORT_FILES = ("metrics.csv", "summary.json", "report.html")
#: Columns of the per-patient table printed to stdout and shown in the HTML page.
TABLE_COLUMNS = (
    ("case_id", "case"),
    ("dsc", "DSC"),
    ("hd95_mm", "HD95 mm"),
    ("assd_mm", "ASSD mm"),
    ("nsd", "NSD"),
    ("vol_ref_ml", "Vref mL"),
    ("vol_pred_ml", "Vpred mL"),
    ("lesion_tp", "TP"),
    ("lesion_fp", "FP"),
    ("lesion_fn", "FN"),
    ("lesion_f1", "F1"),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png_b64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def largest_disagreement_slice(pred: np.ndarray, ref: np.ndarray, spacing_mm) -> tuple[int, int]:
    """``(axis, index)`` of the slice with most disagreeing voxels, across the coarsest axis.

    Falls back to the slice with the largest reference (then prediction) area when the masks agree,
    and to the middle slice when both are empty.
    """
    return busiest_slice((pred != ref, ref, pred), spacing_mm)


def busiest_slice(candidates, spacing_mm) -> tuple[int, int]:
    """``(axis, index)`` of the slice across the coarsest axis holding most nonzero voxels of the
    first 3D array of ``candidates`` with any; the middle slice when all are empty."""
    from medseg.io.volume import largest_spacing_axis

    axis = largest_spacing_axis(spacing_mm)
    other = tuple(a for a in range(3) if a != axis)
    for candidate in candidates:
        counts = np.count_nonzero(candidate, axis=other)
        if counts.any():
            return axis, int(np.argmax(counts))
    return axis, candidates[0].shape[axis] // 2


def _zoom_window(masks: list[np.ndarray], spacing_2d: np.ndarray, margin_mm: float = 25.0):
    """(r0, r1, c0, c1) around the True pixels of the slices, with a margin; None when empty."""
    union = np.logical_or.reduce(masks)
    if not union.any():
        return None
    rows = np.flatnonzero(union.any(axis=1))
    cols = np.flatnonzero(union.any(axis=0))
    pad_r = int(np.ceil(margin_mm / spacing_2d[0]))
    pad_c = int(np.ceil(margin_mm / spacing_2d[1]))
    return (
        max(rows[0] - pad_r, 0), min(rows[-1] + 1 + pad_r, union.shape[0]),
        max(cols[0] - pad_c, 0), min(cols[-1] + 1 + pad_c, union.shape[1]),
    )


def case_figure_png(case_id: str, pred: np.ndarray, ref: np.ndarray, spacing_mm, *, image=None, dsc=math.nan) -> str:
    """Base64 PNG of the slice with the largest disagreement, outlines of reference and prediction.

    The slice is taken across the coarsest axis (the acquisition's slice axis for anisotropic
    scans); reference in green, prediction in red, on the image (1st-99th percentile window of
    the slice) or on a black background. Left: the whole slice (the zoomed region framed in
    yellow); right: a zoom on the outlines with a 25 mm margin. Pixels keep their physical
    aspect ratio; the slice's first remaining array axis runs left to right.
    """
    axis, index = largest_disagreement_slice(pred, ref, spacing_mm)
    title = f"{case_id}: array axis {axis}, slice {index}; DSC {_fmt(dsc)}\ngreen: reference, red: prediction"
    return outline_figure_png(title, axis, index, spacing_mm, [(ref, "#00e000", None), (pred, "#ff3030", None)],
                              image=image)


def slice_take(axis: int, index: int) -> tuple:
    """The index tuple of slice ``index`` across ``axis`` of a 3D array."""
    take = [slice(None)] * 3
    take[axis] = index
    return tuple(take)


def outline_figure_png(title: str, axis: int, index: int, spacing_mm, layers, *, image=None, legend=None) -> str:
    """Base64 PNG of one slice: outlines of 3D masks on the image, whole slice and zoom.

    Args:
        title: the figure's title.
        axis, index: the slice (:func:`busiest_slice`).
        spacing_mm: voxel size of the masks' axes.
        layers: ``(mask, colour, linestyle)`` per outline, drawn in order; ``mask`` a 3D array
            (or the 2D slice already taken), ``linestyle`` None for matplotlib's default.
        image: 3D image under the outlines (1st-99th percentile window of the slice); None: black.
        legend: matplotlib handles shown as a legend below the panels (None: no legend).
    """
    from matplotlib.patches import Rectangle

    plt = _pyplot()
    take = slice_take(axis, index)
    horiz, vert = [a for a in range(3) if a != axis]
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    # Displayed arrays are (vertical, horizontal) = the slice transposed.
    shown = [np.asarray(m if np.ndim(m) == 2 else m[take], dtype=bool).T for m, _, _ in layers]
    if image is not None:
        background = np.asarray(image[take], dtype=np.float64).T
        finite = background[np.isfinite(background)]
        low, high = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
    else:
        background = np.zeros(shown[0].shape)
        low, high = 0.0, 1.0
    window = _zoom_window(shown, np.array([spacing[vert], spacing[horiz]]))
    fig, axes = plt.subplots(1, 2, figsize=(6.0, 3.2), dpi=90)
    try:
        for ax, zoomed in zip(axes, (False, True)):
            ax.imshow(background, cmap="gray", origin="lower", vmin=low, vmax=max(high, low + 1e-6),
                      aspect=spacing[vert] / spacing[horiz], interpolation="nearest")
            for mask, (_, colour, style) in zip(shown, layers):
                if mask.any() and not mask.all():
                    extra = {} if style is None else {"linestyles": style}
                    ax.contour(mask.astype(np.float32), levels=[0.5], colors=colour, linewidths=1.0, **extra)
            ax.set_xticks([])
            ax.set_yticks([])
            if window is not None:
                r0, r1, c0, c1 = window
                if zoomed:
                    ax.set_xlim(c0 - 0.5, c1 - 0.5)
                    ax.set_ylim(r0 - 0.5, r1 - 0.5)
                else:
                    ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fill=False,
                                           edgecolor="#ffd700", linewidth=0.8))
        fig.suptitle(title, fontsize=8)
        if legend:
            fig.legend(handles=legend, loc="lower center", ncol=min(len(legend), 4), fontsize=7,
                       bbox_to_anchor=(0.5, -0.02), frameon=False)
        return _png_b64(fig)
    finally:
        plt.close(fig)


def _image_on_grid(path: Path, ref_volume) -> np.ndarray:
    """The image of a case on the reference grid; display only, so another grid is resampled
    nearest-neighbour."""
    from medseg.eval.evaluate import resample_nearest
    from medseg.io import read_volume

    image = read_volume(path)
    aligned = image.onto_grid_of(ref_volume)
    return aligned.array if aligned is not None else resample_nearest(image, ref_volume)


def draw_case(case: dict, options) -> str:
    """Base64 PNG (:func:`case_figure_png`) of one record of :func:`~medseg.eval.evaluate.evaluate_case`.

    Records hold numbers only, so the masks (and the image) are read again with the same checks.
    """
    from medseg.eval.evaluate import CasePair, read_case

    def path(key: str) -> Path | None:
        return None if case.get(key) is None else Path(case[key])

    pair = CasePair(case["case_id"], Path(case["ref_path"]), path("pred_path"), path("image_path"))
    masks = read_case(pair, options)
    image = None if pair.image_path is None else _image_on_grid(pair.image_path, masks.ref_volume)
    if options.classes is not None:
        from medseg.eval.report_classes import class_figure_png

        return class_figure_png(case, masks, options.classes, image=image)
    return case_figure_png(pair.case_id, masks.pred, masks.ref, masks.ref_volume.spacing_mm, image=image,
                           dsc=case["metrics"]["dsc"])


def case_figures(result, workers: int = 1) -> dict[str, str]:
    """Case id -> base64 PNG of each case of ``result`` ({} when ``result.options.figures`` is off).

    ``workers`` > 1 draws in that many processes (spawned clean, as the evaluation's).
    """
    cases = result.cases
    if not result.options.figures or not cases:
        return {}
    if workers <= 1 or len(cases) == 1:
        pngs = [draw_case(case, result.options) for case in cases]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(int(workers), len(cases)), mp_context=ctx) as pool:
            pngs = list(pool.map(draw_case, cases, [result.options] * len(cases)))
    return {case["case_id"]: png for case, png in zip(cases, pngs)}


def boxplot_png(cases: list[dict], empty_distance: str) -> str:
    """Base64 PNG: one box plot per metric (values after the empty-mask policy), points overlaid."""
    plt = _pyplot()
    keys = list(BOXPLOT_KEYS)
    ncols = 3
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.6 * nrows), dpi=90)
    rng = np.random.default_rng(0)  # jitter only; fixed so reports are reproducible
    try:
        for ax, key in zip(np.ravel(axes), keys):
            values = np.asarray([scored_value(c, key, empty_distance) for c in cases], dtype=np.float64)
            values = values[np.isfinite(values)]
            if values.size:
                ax.boxplot(values, widths=0.5, showfliers=False)
                ax.scatter(1 + rng.uniform(-0.12, 0.12, values.size), values, s=10, color="#1f77b4", alpha=0.7)
            else:
                ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(f"{BOXPLOT_KEYS[key]}  (n={values.size})", fontsize=9)
            ax.set_xticks([])
            ax.tick_params(labelsize=8)
        for ax in np.ravel(axes)[len(keys):]:
            ax.axis("off")
        fig.tight_layout()
        return _png_b64(fig)
    finally:
        plt.close(fig)


def _fmt(value, digits: int = 3) -> str:
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


def _case_value(case: dict, key: str):
    if key in case["metrics"]:
        return case["metrics"][key]
    if key in case["lesions"]:
        return case["lesions"][key]
    return case.get(key)


def versions() -> dict:
    """Versions of the software that produced the numbers."""
    import scipy

    import medseg

    return {
        "medseg": medseg.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "python": platform.python_version(),
    }


def csv_text(cases: list[dict], classes=None) -> str:
    """``metrics.csv``: one row per patient, raw values (``nan``/``inf`` as text); with ``classes``
    (a :class:`~medseg.io.classes.ClassSpec`) long form, one row per patient and class
    (:func:`medseg.eval.report_classes.csv_text`)."""
    if classes is not None:
        from medseg.eval.report_classes import csv_text as class_csv

        return class_csv(cases, classes)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for case in cases:
        writer.writerow([csv_cell(_case_value(case, key)) for key in CSV_COLUMNS])
    return buf.getvalue()


def csv_cell(value) -> str:
    """One CSV value: floats as ``repr`` (``nan``, ``inf`` as text), booleans lower case, None empty."""
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    return "" if value is None else str(value)


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
    """The per-patient table as aligned plain text (printed by ``medseg-eval``); with ``classes``
    (a :class:`~medseg.io.classes.ClassSpec`) one row per patient and class."""
    columns = TABLE_COLUMNS
    if classes is not None:
        from medseg.eval.report_classes import class_rows

        columns = TABLE_COLUMNS[:1] + (("class", "class"),) + TABLE_COLUMNS[1:]
        cases = [view for _, _, view in class_rows(cases, classes)]
    header = [title for _, title in columns]
    rows = []
    for case in cases:
        row = [_fmt(_case_value(case, key), 2 if key.endswith("_ml") or key.endswith("_mm") else 3)
               for key, _ in columns]
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


def html_notes(result) -> list[str]:
    """The warnings and the predictions without reference."""
    esc = html.escape
    parts = []
    for warning in getattr(result, "warnings", []):
        parts.append(f"<p class='warn'><b>Warning:</b> {esc(warning)}</p>")
    if result.unmatched_predictions:
        parts.append("<p class='note'>Predictions without reference (ignored): "
                     + esc(", ".join(result.unmatched_predictions)) + "</p>")
    return parts


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


def html_stats_table(stats: dict) -> list[str]:
    """The table of :func:`~medseg.eval.aggregate.aggregate`'s ``metrics`` statistics."""
    parts = ["<table><tr><th>metric</th><th>n</th><th>mean</th>"
             "<th>median</th><th>std</th><th>min</th><th>max</th><th>NaN</th><th>inf</th></tr>"]
    for key, st in stats.items():
        parts.append(
            f"<tr><td class='id'>{html.escape(key)}</td><td>{st['n']}</td>"
            + "".join(f"<td>{_fmt(st[s])}</td>" for s in ("mean", "median", "std", "min", "max"))
            + f"<td>{st['n_nan']}</td><td>{st['n_inf']}</td></tr>"
        )
    parts.append("</table>")
    return parts


def lesion_text(lesions: dict) -> str:
    """Lesion totals and pooled rates of a summary's ``lesions``, as one phrase."""
    return (", ".join(f"{k.replace('lesion_', '').replace('_', ' ')} {v}" for k, v in lesions["totals"].items())
            + "; pooled precision " + _fmt(lesions["pooled"]["precision"]) + ", recall "
            + _fmt(lesions["pooled"]["recall"]) + ", F1 " + _fmt(lesions["pooled"]["f1"]))


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


def _html_case_table(cases: list[dict], columns=TABLE_COLUMNS, title: str = "Per patient") -> list[str]:
    """The per-patient table (``columns``: (key, title), text keys ``case_id`` and ``class``);
    rows with notes are highlighted."""
    esc = html.escape
    parts = [f"<h2>{esc(title)}</h2><table><tr>" + "".join(f"<th>{esc(t)}</th>" for _, t in columns)
             + "<th>notes</th></tr>"]
    for case in cases:
        notes = _case_notes(case)
        cls = " class='flag'" if notes else ""
        cells = []
        for key, _ in columns:
            value = _case_value(case, key)
            label = key in ("case_id", "class")
            text = esc(str(value)) if label else _fmt(value, 2 if key.endswith(("_ml", "_mm")) else 3)
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
        from medseg.eval.report_classes import class_rows, html_class_sections

        parts = _html_head(result) + html_class_sections(result)
        columns = TABLE_COLUMNS[:1] + (("class", "class"),) + TABLE_COLUMNS[1:]
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
