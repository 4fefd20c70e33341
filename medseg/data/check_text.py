"""The text of a dataset check (``medseg-check``'s report): problems, lesion or per-class
statistics per case and in total, verdict."""

from __future__ import annotations


def format_report(report) -> str:
    """Human-readable report: problems table, lesion (or per-class) statistics per case and in
    total, verdict."""
    lines: list[str] = []
    t = report.totals
    lines.append(f"{t.get('n_cases', len(report.stats))} cases checked")
    if report.problems:
        lines.append(f"\nproblems ({len(report.fatal_problems)} fatal, {len(report.warnings)} warnings):")
        width = max(len(p.case_id) for p in report.problems)
        for p in report.problems:
            where = f"  [{p.path}]" if p.path else ""
            lines.append(f"  {p.severity.upper():<7}  {p.case_id:<{width}}  {p.message}{where}")
    else:
        lines.append("\nproblems: none")
    lines += _labelled_lines(report)
    lines += _lesion_lines(report) if report.classes is None else _class_lines(report)
    verdict = (
        f"FAILED: {len(report.fatal_problems)} fatal problem(s)" if report.fatal
        else "OK" + (f" ({len(report.warnings)} warnings)" if report.warnings else "")
    )
    lines.append(f"\nresult: {verdict}")
    return "\n".join(lines)


def _labelled_lines(report) -> list[str]:
    """With an ignore value: each case's labelled share of voxels and slices (the rest is unlabelled)."""
    rows = [(cid, s) for cid, s in report.stats.items() if "labelled_fraction" in s]
    if getattr(report, "ignore", None) is None or not rows:
        return []
    width = max(5, max(len(cid) for cid, _ in rows))
    head = f"  {'case':<{width}}  {'labelled_voxels':>15}  {'labelled_slices':>15}"
    lines = [f"\nlabelled voxels (value {report.ignore} = unlabelled, --ignore-label; the statistics below count "
             "it as background):", head, "  " + "-" * (len(head) - 2)]
    for cid, s in rows:
        lines.append(f"  {cid:<{width}}  {100 * s['labelled_fraction']:>14.2f}%  "
                     f"{_slices_text(s['labelled_slices'], s['n_slices']):>15}")
    return lines


def _lesion_lines(report) -> list[str]:
    """The lesion statistics table (binary labels), empty without a valid label."""
    lines: list[str] = []
    t = report.totals
    rows = [(cid, s) for cid, s in report.stats.items() if "lesion_count" in s]
    if rows:
        width = max(5, max(len(cid) for cid, _ in rows))
        head = f"  {'case':<{width}}  {'lesions':>7}  {'volume_ml':>10}  {'largest_ml':>10}  {'slices_with_lesion':>18}  {'fg_fraction':>11}"
        lines += ["\nlesion statistics:", head, "  " + "-" * (len(head) - 2)]
        for cid, s in rows:
            largest = s["lesion_volumes_ml"][0] if s["lesion_volumes_ml"] else 0.0
            sl = f"{s['slices_with_lesion']}/{s['n_slices']} ({100 * s['slice_fraction']:.0f}%)"
            lines.append(
                f"  {cid:<{width}}  {s['lesion_count']:>7d}  {s['lesion_volume_ml']:>10.3f}  {largest:>10.3f}  "
                f"{sl:>18}  {s['foreground_fraction']:>11.5f}"
            )
        lines.append("  " + "-" * (len(head) - 2))
        sl = f"{t['slices_with_lesion']}/{t['n_slices']} ({100 * t['slice_fraction']:.0f}%)"
        lines.append(
            f"  {'total':<{width}}  {t['lesion_count']:>7d}  {t['lesion_volume_ml']:>10.3f}  "
            f"{t['largest_lesion_ml']:>10.3f}  {sl:>18}  {t['foreground_fraction']:>11.5f}"
        )
        lines.append(
            f"  valid labels: {t['n_labelled']}, with lesion: {t['n_with_lesion']}, empty: {t['n_empty_labels']}; "
            f"median lesions per case {t['median_lesion_count']:g}, smallest lesion {t['smallest_lesion_ml']:.4f} mL"
        )
    return lines


def _slices_text(slices: int, n_slices: int) -> str:
    return f"{slices}/{n_slices} ({100 * slices / n_slices if n_slices else 0:.0f}%)"


def _class_lines(report: CheckReport) -> list[str]:
    """The per-class tables: one row per case and class, then one total per class."""
    spec = report.classes
    kind = spec.kind.noun
    ids = {name: ",".join(str(i) for i in v) for name, v in zip(spec.names, spec.ids)}
    lines = [f"\n{kind} ids (from {report.classes_source or 'the caller'}): "
             + ", ".join(f"{name}={ids[name]}" for name in spec.names)]
    rows = [(cid, s) for cid, s in report.stats.items() if "classes" in s]
    if not rows:
        return lines
    cw = max(5, max(len(cid) for cid, _ in rows))
    nw = max(len(kind), max(len(n) for n in spec.names))
    head = (f"  {'case':<{cw}}  {kind:<{nw}}  {'voxels':>10}  {'volume_ml':>10}  {'components':>10}  "
            f"{f'slices_with_{kind}':>19}")
    rule = "  " + "-" * (len(head) - 2)
    lines += [f"\n{kind} statistics (slices along each case's slice axis, its largest spacing):", head, rule]
    for cid, s in rows:
        for name in spec.names:
            c = s["classes"][name]
            lines.append(f"  {cid:<{cw}}  {name:<{nw}}  {c['voxels']:>10d}  {c['volume_ml']:>10.3f}  "
                         f"{c['components']:>10d}  {_slices_text(c['slices'], s['n_slices']):>19}")
    lines.append(rule)
    for name in spec.names:
        c = report.totals["classes"][name]
        lines.append(f"  {'total':<{cw}}  {name:<{nw}}  {c['voxels']:>10d}  {c['volume_ml']:>10.3f}  "
                     f"{c['components']:>10d}  {_slices_text(c['slices'], c['n_slices']):>19}"
                     f"  in {c['n_present']}/{report.totals['n_labelled']} labels")
    return lines

