"""Text pieces shared by the binary and the per-class reports: table cells, CSV values, notes,
statistics tables, the lesion phrase, versions. Kept apart so ``report`` and ``report_classes``
both use them without importing each other."""

from __future__ import annotations

import html
import platform

import numpy as np

from medseg.eval import catalog

_fmt = catalog.format_value


def cell_text(key: str, value) -> str:
    """A metric's value in a table, with its described decimals (other keys: 3)."""
    try:
        digits = catalog.metric(key).digits
    except KeyError:
        digits = 3
    return _fmt(value, digits)


def case_value(case: dict, key: str):
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


def csv_cell(value) -> str:
    """One CSV value: floats as ``repr`` (``nan``, ``inf`` as text), booleans lower case, None empty."""
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    return "" if value is None else str(value)


def html_notes(result) -> list[str]:
    """The warnings and the predictions without reference."""
    esc = html.escape
    parts = []
    note = labelled_note(result.options)
    if note:
        parts.append(f"<p class='warn'><b>Partial labels:</b> {esc(note)}.</p>")
    for warning in getattr(result, "warnings", []):
        parts.append(f"<p class='warn'><b>Warning:</b> {esc(warning)}</p>")
    if result.unmatched_predictions:
        parts.append("<p class='note'>Predictions without reference (ignored): "
                     + esc(", ".join(result.unmatched_predictions)) + "</p>")
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


#: The per-case column of an evaluation with an ignore value (``--ignore-label``): the share of
#: the reference's voxels that are labelled, the only ones scored.
LABELLED_KEY = "labelled_fraction"


def labelled_columns(cases) -> tuple[str, ...]:
    """``(LABELLED_KEY,)`` when the cases were scored on their labelled voxels only, else ``()``."""
    return (LABELLED_KEY,) if any(LABELLED_KEY in c for c in cases) else ()


def labelled_note(options) -> str | None:
    """The sentence every report gives with an ignore value (None without one)."""
    value = getattr(options, "ignore_label", None)
    if value is None:
        return None
    return (f"scored on the labelled voxels only: reference value {value} marks unlabelled voxels (--ignore-label); "
            "prediction and reference are cleared there before every metric")
