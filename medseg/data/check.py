"""Dataset check: every problem of a set of image/label cases at once, plus lesion statistics.

Used by ``medseg-check`` and, before training, by ``medseg-train`` (``report.raise_if_fatal()``).
Fatal problems make training meaningless or wrong: unreadable files, image/label grid mismatch,
label values outside {0, 1}, interpolated (non-integer) label values, NaN/inf values.
Warnings are worth knowing: empty labels (no lesion), constant images.

Lesion statistics per case: connected components (:func:`medseg.components.label_components`,
26-connectivity), volume in mL, fraction of slices holding lesion (slices along
:func:`medseg.io.volume.largest_spacing_axis`, the axis training slices along),
fraction of foreground voxels. Label values are judged by :func:`medseg.io.labels.label_problems`.

With named classes (a :class:`medseg.io.classes.ClassSpec`: ``--labels-map liver=5 spleen=1`` or a
``dataset.json``) the statistics are per class (or nested region: region ``k`` is every voxel whose
id is one of ``ids[k]``) and per case: voxels, volume, connected components, slices holding the
class. Any integer label id is then valid: ids of no class are background, reported in one warning
with their voxel counts; a class absent from some labels is a warning naming them, a class absent
from every label is fatal (nothing to learn for it).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple

import numpy as np

from medseg.io.labels import apply_label_map, label_problems, label_values, parse_label_map, with_ignore  # noqa: F401
from medseg.errors import DatasetError, InputError, MedsegError
from medseg.io import Case, Volume, read_volume
from medseg.io.classes import ClassSpec
from medseg.io.jsonsafe import json_safe
from medseg.data.label_stats import class_statistics, lesion_statistics  # noqa: F401  (importable from here)

log = logging.getLogger(__name__)

FATAL, WARNING = "fatal", "warning"
#: Reader failures reported as "unreadable" problems (RuntimeError: ITK/pydicom internals).
_READ_ERRORS = (MedsegError, ValueError, OSError, RuntimeError)


class Problem(NamedTuple):
    """One finding: ``severity`` is ``"fatal"`` or ``"warning"``; ``path`` may be None (dataset-level)."""

    severity: str
    case_id: str
    path: str | None
    message: str


@dataclass
class CheckReport:
    """Result of :func:`check_dataset`.

    Attributes:
        problems: every finding, in case order.
        stats: case id -> per-case statistics (image shape/spacing/dtype/range; lesion statistics
            from :func:`lesion_statistics` when the label is valid).
        totals: dataset-level numbers (cases, empty labels, lesions, volume, fractions).
        label_map: the ``--map-labels`` mapping applied before checking label values.
        ignore: the ``--ignore-label`` value (None: every voxel is labelled).
        classes: the named classes reported per class (None: binary, every nonzero value);
            then each case's stats hold :func:`class_statistics` and ``totals["classes"]``
            sums them per class.
        classes_source: where the classes came from (``--labels-map`` or a dataset.json path).
    """

    problems: list[Problem] = field(default_factory=list)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    totals: dict[str, Any] = field(default_factory=dict)
    label_map: dict[int, int] | None = None
    classes: ClassSpec | None = None
    classes_source: str | None = None
    ignore: int | None = None

    @property
    def fatal(self) -> bool:
        """True when any problem is fatal (training must not start)."""
        return any(p.severity == FATAL for p in self.problems)

    @property
    def fatal_problems(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == FATAL]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    def raise_if_fatal(self) -> None:
        """Raise one :class:`DatasetError` listing every fatal problem (no-op when there is none)."""
        fatal = self.fatal_problems
        if fatal:
            raise DatasetError(
                f"dataset check found {len(fatal)} fatal problem(s) (run medseg-check for the full report)",
                [f"{p.case_id}: {p.message}" + (f" [{p.path}]" if p.path else "") for p in fatal],
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``ok``, ``fatal``, counts, ``problems``, ``cases`` (stats), ``totals``;
        with named classes also ``classes`` (the spec, with its ``source``)."""
        out = {
            "ok": not self.fatal,
            "fatal": self.fatal,
            "n_cases": len(self.stats),
            "n_fatal": len(self.fatal_problems),
            "n_warnings": len(self.warnings),
            "label_map": {str(k): v for k, v in (self.label_map or {}).items()},
            "problems": [p._asdict() for p in self.problems],
            "cases": self.stats,
            "totals": self.totals,
        }
        if self.classes is not None:
            out["classes"] = {**self.classes.to_dict(), "source": self.classes_source}
        if self.ignore is not None:
            out["ignore_label"] = self.ignore
        return json_safe(out)

    def format_text(self) -> str:
        """Human-readable report: problems table, lesion (or per-class) statistics per case and in
        total, verdict (:func:`medseg.data.check_text.format_report`)."""
        from medseg.data.check_text import format_report

        return format_report(self)


def _fmt(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in np.asarray(values, dtype=np.float64).ravel()) + ")"


def _grid_problems(image: Volume, label: Volume, tolerance_mm: float, direction_tolerance: float) -> list[str]:
    """Shape, spacing, origin and direction differences between the image and label grids.

    Spacing and direction are judged by the drift they cause across the image: a 0.001 mm spacing
    error moves the 500th voxel by 0.5 mm, so ``|d spacing| * (n - 1)`` and ``|d direction| *
    extent`` are compared with ``tolerance_mm`` (direction cosines also with ``direction_tolerance``).
    """
    found = []
    if image.shape != label.shape:
        found.append(f"image/label shape mismatch: image {image.shape}, label {label.shape}")
    steps = np.maximum(np.asarray(image.shape) - 1, 1)
    spacing_drift = float(np.max(np.abs(image.spacing_mm - label.spacing_mm) * steps))
    if spacing_drift > tolerance_mm:
        found.append(
            f"image/label spacing mismatch (mm): image {_fmt(image.spacing_mm)}, label {_fmt(label.spacing_mm)} "
            f"(voxels drift up to {spacing_drift:.3g} mm apart; tolerance {tolerance_mm:g} mm)"
        )
    origin_shift = float(np.linalg.norm(image.origin_mm - label.origin_mm))
    if origin_shift > tolerance_mm:
        found.append(
            f"image/label origin mismatch (RAS mm): image {_fmt(image.origin_mm)}, label {_fmt(label.origin_mm)} "
            f"({origin_shift:.3g} mm apart; tolerance {tolerance_mm:g} mm)"
        )
    cos_diff = np.abs(image.direction - label.direction)
    direction_drift = float(np.max(np.linalg.norm(image.direction - label.direction, axis=0) * image.spacing_mm * steps))
    if np.max(cos_diff) > direction_tolerance or direction_drift > tolerance_mm:
        found.append(
            f"image/label direction mismatch: image {image.orientation} {_fmt(image.direction)}, "
            f"label {label.orientation} {_fmt(label.direction)} (voxels up to {direction_drift:.3g} mm apart; "
            f"tolerance {tolerance_mm:g} mm)"
        )
    return found


def _label_value_problems(array: np.ndarray, label_map: Mapping[int, int] | None) -> tuple[list[str], np.ndarray | None]:
    """(messages, valid 0/1 mask or None) for a label array.

    NaN/inf and non-integer values are judged before ``--map-labels`` (no mapping repairs them),
    values outside {0, 1} after it.
    """
    if array.dtype == np.bool_:
        return [], array
    problems = _float_problems(array)
    if problems:
        return problems, None
    mapped = apply_label_map(array, label_map)
    if label_problems(mapped, num_classes=2):
        values = label_values(mapped)
        shown = ", ".join(f"{v:g}" for v in values[:12]) + (", ..." if len(values) > 12 else "")
        nonzero = [v for v in values if v != 0]
        if len(nonzero) == 1:
            fix = f"map them with --map-labels {nonzero[0]:g}:1"
        else:
            fix = (
                "medseg segments one foreground class: map them with --map-labels, e.g. "
                + ",".join(f"{v:g}:1" for v in nonzero if v != 1)
                + f" to merge all into one, or {nonzero[-1]:g}:1,*:0 to keep only {nonzero[-1]:g}"
            )
        mapped_note = " after --map-labels" if label_map else ""
        return [f"label values {{{shown}}}{mapped_note} outside {{0, 1}}; {fix}"], None
    return [], mapped == 1


def _id_problems(array: np.ndarray, label_map: Mapping[int, int] | None) -> tuple[list[str], np.ndarray | None]:
    """(messages, label ids after ``--map-labels`` or None) for a label of named classes: NaN/inf
    and non-integer values are fatal; any integer id is valid (ids of no class are background)."""
    if array.dtype == np.bool_:
        return [], array.astype(np.uint8)
    problems = _float_problems(array)
    return (problems, None) if problems else ([], apply_label_map(array, label_map))


def _float_problems(array: np.ndarray) -> list[str]:
    """NaN/inf and non-integer voxels (judged before ``--map-labels``: no mapping repairs them)."""
    problems = []
    # Only float arrays can hold NaN or fractions: spare integer labels a pass over the volume.
    for p in label_problems(array) if array.dtype.kind == "f" else []:
        if p.kind == "nan":
            problems.append(f"label has {p.count} NaN/inf voxels")
        elif p.kind == "non_integer":
            examples = ", ".join(f"{v:g}" for v in p.values)
            problems.append(
                f"label has {p.count} non-integer voxels (values such as {examples}): interpolated mask? "
                "resample labels with nearest-neighbour interpolation"
            )
    return problems


def _without_path(exc: BaseException, path: Path) -> str:
    """The error message without its leading ``"PATH: "`` (the problem row shows the path)."""
    text = str(exc)
    prefix = f"{path}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def check_case(
    case: Case,
    *,
    label_map: Mapping[int, int] | None = None,
    tolerance_mm: float = 0.01,
    direction_tolerance: float = 1e-3,
    classes: ClassSpec | None = None,
    ignore: int | None = None,
) -> tuple[list[Problem], dict[str, Any]]:
    """Check one case; returns its problems and statistics (see :func:`check_dataset`)."""
    cid = case.case_id
    problems: list[Problem] = []
    stats: dict[str, Any] = {"image_path": str(case.image_path),
                             "label_path": None if case.label_path is None else str(case.label_path)}

    def add(severity: str, path: Path | None, message: str) -> None:
        problems.append(Problem(severity, cid, None if path is None else str(path), message))

    image = label = None
    try:
        image = read_volume(case.image_path, case_id=cid)
    except _READ_ERRORS as exc:
        add(FATAL, case.image_path, f"unreadable image: {_without_path(exc, case.image_path)}")
    if image is not None:
        arr = image.array
        stats.update(shape=list(image.shape), spacing_mm=image.spacing_mm.tolist(),
                     orientation=image.orientation, dtype=str(arr.dtype), modality=image.meta.get("modality"))
        if np.issubdtype(arr.dtype, np.floating):
            finite = np.isfinite(arr)
            n_bad = int(arr.size - np.count_nonzero(finite))
            if n_bad:
                add(FATAL, case.image_path, f"image has {n_bad} NaN/inf voxels ({100 * n_bad / arr.size:.3g}%)")
                arr = arr[finite]
        if arr.size:
            lo, hi = float(np.min(arr)), float(np.max(arr))
            stats.update(intensity_min=lo, intensity_max=hi)
            if lo == hi:
                add(WARNING, case.image_path, f"image is constant (every voxel {lo:g})")
    if case.label_path is None:
        return problems, stats
    try:
        label = read_volume(case.label_path, case_id=cid, reference=image)  # a SEG / RTSTRUCT goes on its grid
    except _READ_ERRORS as exc:
        add(FATAL, case.label_path, f"unreadable label: {_without_path(exc, case.label_path)}")
        return problems, stats
    if image is not None:
        aligned = label.onto_grid_of(image)
        if aligned is not None and aligned is not label:
            # Same voxels in another axis order (e.g. LAS label, LPS DICOM): read exactly onto
            # the image's grid wherever labels are used, so this is no problem.
            stats["label_orientation"] = label.orientation
            label = aligned
        for message in _grid_problems(image, label, tolerance_mm, direction_tolerance):
            add(FATAL, case.label_path, message)
    if ignore is not None:
        label, message = _labelled_part(label, ignore, stats)
        if message:
            add(FATAL, case.label_path, message)
            return problems, stats
    if classes is not None:
        value_problems, ids = _id_problems(label.array, label_map)
        for message in value_problems:
            add(FATAL, case.label_path, message)
        if ids is not None:
            stats.update(class_statistics(ids, label.spacing_mm, classes))
        return problems, stats
    value_problems, mask = _label_value_problems(label.array, label_map)
    for message in value_problems:
        add(FATAL, case.label_path, message)
    if mask is None:
        return problems, stats
    stats.update(lesion_statistics(mask, label.spacing_mm))
    if stats["lesion_voxels"] == 0:
        add(WARNING, case.label_path, "empty label (no lesion voxel)")
    return problems, stats


def _labelled_part(label: Volume, ignore: int, stats: dict[str, Any]) -> tuple[Volume, str | None]:
    """``(label with its unlabelled voxels made 0, problem or None)``; records the case's
    ``labelled_fraction``, ``labelled_slices`` and ``n_slices`` (along its slice axis) in ``stats``."""
    from medseg.io.volume import largest_spacing_axis

    array = np.asarray(label.array)
    labelled = array != ignore
    axis = largest_spacing_axis(label.spacing_mm)
    per_slice = np.any(labelled, axis=tuple(a for a in range(array.ndim) if a != axis))
    n_labelled = int(np.count_nonzero(labelled))
    stats.update(labelled_fraction=n_labelled / array.size if array.size else 0.0,
                 labelled_slices=int(per_slice.sum()), n_slices=int(array.shape[axis]))
    if not n_labelled:
        return label, (f"label holds only the ignore value {ignore} (--ignore-label): no voxel is labelled, "
                       "nothing to learn or score")
    return label.with_array(np.where(labelled, array, np.zeros((), array.dtype))), None


def check_dataset(
    cases: Iterable[Case],
    *,
    label_map: Mapping[int, int] | None = None,
    tolerance_mm: float = 0.01,
    direction_tolerance: float = 1e-3,
    extra_problems: Iterable[str] = (),
    workers: int | None = None,
    progress: bool = False,
    classes: ClassSpec | None = None,
    classes_source: str | None = None,
    ignore: int | None = None,
) -> CheckReport:
    """Check every case and report all problems at once, with lesion statistics.

    Args:
        cases: from :func:`medseg.io.discover_cases` / :func:`medseg.io.pair_cases`.
        label_map: label value mapping applied before checking values (``{255: 1}``).
        tolerance_mm: largest distance, in mm, between where the image and the label put the same
            voxel, from an origin shift or from the drift a spacing/direction error causes
            across the volume.
        direction_tolerance: largest difference of direction cosines.
        extra_problems: dataset-level fatal problems found earlier (e.g. unpaired files).
        workers: cases checked in parallel threads (decompression and numpy release the GIL);
            default ``min(4, cpu count)``. The report's order does not depend on it.
        progress: show a progress bar on stderr (tqdm).
        classes: named classes (or regions) to report per class (:func:`class_statistics`), with
            warnings for classes absent from some labels and for label ids of no class; None
            (or the default binary spec): every nonzero value is the lesion, values must be 0/1.
            One named class (``liver=5``) is reported per class, by its name.
        classes_source: where ``classes`` came from, shown in the report.
        ignore: the label value of unlabelled voxels (``--ignore-label``), judged before
            ``label_map``: each case reports its labelled fraction and slices, the statistics
            count the rest as background, a label holding nothing else is fatal.

    Returns:
        :class:`CheckReport`; ``report.fatal`` says whether training may proceed.
    """
    with_ignore(label_map, ignore)  # refuses a --map-labels that maps the ignore value
    classes = None if classes is None or classes.any_nonzero else classes
    report = CheckReport(label_map=dict(label_map) if label_map else None, classes=classes,
                         classes_source=classes_source if classes is not None else None, ignore=ignore)
    for message in extra_problems:
        report.problems.append(Problem(FATAL, "(dataset)", None, message))
    cases = list(cases)
    workers = max(1, min(workers or min(4, os.cpu_count() or 1), len(cases) or 1))

    def one(case: Case) -> tuple[list[Problem], dict[str, Any]]:
        log.debug("checking %s", case.case_id)
        return check_case(case, label_map=label_map, tolerance_mm=tolerance_mm,
                          direction_tolerance=direction_tolerance, classes=classes, ignore=ignore)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(one, cases)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(cases), desc="checking", unit="case", leave=False)
        for case, (problems, stats) in zip(cases, results):
            report.problems.extend(problems)
            report.stats[case.case_id] = stats
    if classes is not None:
        report.totals = _class_totals(report.stats, classes)
        report.problems += _class_problems(report.totals, classes, label_map)
        return report
    report.totals = _totals(report.stats)
    empty = report.totals["n_empty_labels"]
    if empty and empty == report.totals["n_labelled"]:
        report.problems.append(Problem(
            FATAL, "(dataset)", None,
            f"every one of the {empty} valid labels is empty (no foreground voxel): there is nothing to learn"
            + ("; check --map-labels" if label_map else "; wrong label folder, or a label value to map with --map-labels?"),
        ))
    elif empty:
        report.problems.append(Problem(
            WARNING, "(dataset)", None,
            f"{empty} of {report.totals['n_labelled']} valid labels are empty (no lesion): they only teach background",
        ))
    return report


def _totals(stats: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    labelled = [s for s in stats.values() if "lesion_count" in s]
    volumes = [v for s in labelled for v in s["lesion_volumes_ml"]]
    voxels = sum(s["lesion_voxels"] for s in labelled)
    n_voxels = sum(s["n_voxels"] for s in labelled)
    n_slices = sum(s["n_slices"] for s in labelled)
    slices_with = sum(s["slices_with_lesion"] for s in labelled)
    return {
        "n_cases": len(stats),
        "n_labelled": len(labelled),
        "n_with_lesion": sum(1 for s in labelled if s["lesion_voxels"]),
        "n_empty_labels": sum(1 for s in labelled if not s["lesion_voxels"]),
        "lesion_count": sum(s["lesion_count"] for s in labelled),
        "median_lesion_count": float(np.median([s["lesion_count"] for s in labelled])) if labelled else 0.0,
        "lesion_voxels": voxels,
        "lesion_volume_ml": sum(s["lesion_volume_ml"] for s in labelled),
        "largest_lesion_ml": max(volumes) if volumes else 0.0,
        "smallest_lesion_ml": min(volumes) if volumes else 0.0,
        "n_slices": n_slices,
        "slices_with_lesion": slices_with,
        "slice_fraction": slices_with / n_slices if n_slices else 0.0,
        "foreground_fraction": voxels / n_voxels if n_voxels else 0.0,
    }


def _class_totals(stats: Mapping[str, Mapping[str, Any]], classes: ClassSpec) -> dict[str, Any]:
    """Dataset totals of :func:`class_statistics`: per class the sums over the valid labels, the
    cases holding it and those without it; per id of no class its voxels and cases."""
    labelled = {cid: s for cid, s in stats.items() if "classes" in s}
    per_class = {}
    for name in classes.names:
        rows = {cid: s["classes"][name] for cid, s in labelled.items()}
        per_class[name] = {
            "voxels": sum(c["voxels"] for c in rows.values()),
            "volume_ml": sum(c["volume_ml"] for c in rows.values()),
            "components": sum(c["components"] for c in rows.values()),
            "slices": sum(c["slices"] for c in rows.values()),
            "n_slices": sum(s["n_slices"] for s in labelled.values()),
            "n_present": sum(1 for c in rows.values() if c["voxels"]),
            "absent_cases": [cid for cid, c in rows.items() if not c["voxels"]],
        }
    unlisted: dict[int, dict[str, Any]] = {}
    for cid, s in labelled.items():
        for value, count in s["unlisted_ids"].items():
            entry = unlisted.setdefault(value, {"voxels": 0, "cases": []})
            entry["voxels"] += count
            entry["cases"].append(cid)
    return {"n_cases": len(stats), "n_labelled": len(labelled), "classes": per_class,
            "unlisted_ids": dict(sorted(unlisted.items()))}


#: Cases or ids named in one problem line; the JSON report has them all.
_SHOWN = 20


def _listed(items: list[str]) -> str:
    more = len(items) - _SHOWN
    return ", ".join(items[:_SHOWN]) + (f", ... ({more} more in --json)" if more > 0 else "")


def _class_problems(totals: Mapping[str, Any], classes: ClassSpec, label_map) -> list[Problem]:
    """Dataset-level findings of the per-class totals: a class absent from every valid label
    (fatal), from some (warning naming the cases), label ids of no class (warning with counts)."""
    found = []
    n = totals["n_labelled"]
    kind = classes.kind.noun
    unlisted = totals["unlisted_ids"]
    for name, ids in zip(classes.names, classes.ids):
        c = totals["classes"][name]
        what = f"{kind} {name!r} (label ids {', '.join(map(str, ids))})"
        if n and not c["n_present"]:
            others = f"; ids found in no {kind}: {_listed([str(v) for v in unlisted])}" if unlisted else ""
            found.append(Problem(FATAL, "(dataset)", None, (
                f"{what} is absent from every one of the {n} valid labels: there is nothing to learn for it; "
                f"check its ids" + (" and --map-labels" if label_map else "") + others)))
        elif c["absent_cases"]:
            found.append(Problem(WARNING, "(dataset)", None, (
                f"{what} is absent from {len(c['absent_cases'])} of {n} labels: {_listed(c['absent_cases'])}")))
    if unlisted:
        counts = [f"{v} ({e['voxels']} voxels in {len(e['cases'])} case{'s' if len(e['cases']) > 1 else ''})"
                  for v, e in unlisted.items()]
        found.append(Problem(WARNING, "(dataset)", None, (
            f"{len(unlisted)} label ids belong to no {kind} and count as background: {_listed(counts)}")))
    return found
