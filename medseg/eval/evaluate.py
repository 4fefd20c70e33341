"""Evaluate a folder of predictions against a folder of references, patient by patient.

Pairing, reading with geometry, grid and label checks, metrics and lesion-wise scores per case
(optionally in worker processes), then aggregation. Per-case records hold numbers only. Drawing
and writing the outputs is :mod:`medseg.eval.report`'s job (it imports this module, never the
reverse); ``medseg-eval`` calls :func:`evaluate_folders` then :func:`medseg.eval.report.write_report`.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from medseg.components import LESION_CONNECTIVITY
from medseg.errors import InputError, MedsegError
from medseg.eval.aggregate import aggregate, aggregate_classes, check_policy
from medseg.eval.lesions import lesion_metrics
from medseg.eval.metrics import compute_metrics, image_diagonal_mm
from medseg.eval.pairing import (  # noqa: F401  (importable from here, as before)
    MISSING_POLICIES,
    PREDICTION_SUFFIXES,
    CasePair,
    pair_cases,
)
from medseg.io.atomic import same_file
from medseg.io.classes import ClassSpec
from medseg.io.labels import check_label_values, label_values
from medseg.io.volume import Volume

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalOptions:
    """How each case is scored.

    Attributes:
        label: class value taken as foreground (None: masks must hold only 0 and 1).
        resample_pred: resample a prediction on another grid onto the reference grid
            (nearest neighbour) instead of refusing it.
        connectivity: of lesion components, 6, 18 or 26 (:mod:`medseg.components`).
        min_overlap_fraction: lesion detection rule (0: one voxel of overlap suffices).
        nsd_tolerance_mm: tolerance of the normalized surface Dice.
        percentile: of the robust Hausdorff distance (``hd95_mm``).
        figures: the report draws the per-patient slice figure.
        map_labels: ``--map-labels`` mapping applied to each reference label map first (as in
            ``medseg-train``; ``{5: 1, "*": 0}`` scores label 5 of a multi-organ map).
        classes: named classes or regions scored one by one (``--labels-map``, ``--dataset-json``;
            one named class too: reported by its name); None or the default binary spec
            (:meth:`~medseg.io.classes.ClassSpec.binary`): one 0/1 foreground, scored as without
            it. Lesion-wise counts for ``classes.lesions`` only. Incompatible with ``label``.
        ignore_label: reference value of unlabelled voxels (``--ignore-label``, before ``map_labels``):
            only the labelled voxels are scored; a reference of nothing else is refused.
    """

    label: int | None = None
    map_labels: dict | None = None
    resample_pred: bool = False
    connectivity: int = LESION_CONNECTIVITY
    min_overlap_fraction: float = 0.0
    nsd_tolerance_mm: float = 1.0
    percentile: float = 95.0
    figures: bool = True
    classes: ClassSpec | None = None
    ignore_label: int | None = None

    def __post_init__(self) -> None:
        if self.classes is not None and self.classes.any_nonzero:
            object.__setattr__(self, "classes", None)  # every nonzero value: the binary evaluation
        if self.classes is not None and self.label is not None:
            raise ValueError("label picks one foreground value; with classes each class names its ids")


@dataclass
class EvalResult:
    """Per-case records (sorted by case id), the aggregate summary, pairing notes and warnings
    (results that are computed but likely not what was meant, e.g. a label found nowhere)."""

    cases: list[dict]
    summary: dict
    unmatched_predictions: list[str]
    options: EvalOptions
    empty_distance: str
    warnings: list[str] = field(default_factory=list)


def _grid_text(vol) -> str:
    sp = ", ".join(f"{s:.4g}" for s in vol.spacing_mm)
    org = ", ".join(f"{o:.4g}" for o in vol.origin_mm)
    return f"shape {vol.shape}, spacing ({sp}) mm, origin ({org}) mm, orientation {vol.orientation}"


#: Advice on a bad label map, by problem (see :func:`medseg.io.labels.check_label_values`) and role.
_LABEL_HINTS = {
    "prediction": {
        "probability": "pass the label map, medseg-infer's _seg file, not the _prob file; or threshold the map "
                       "first, e.g. probability >= 0.5",
        "non_integer": "an image rather than a mask? pass the prediction label map",
        "outside": "pass --label N to evaluate the voxels equal to N",
    },
    "reference": {
        "probability": "a reference must be a label map",
        "non_integer": "an image rather than a mask? pass the reference label map",
        "outside": "pass --label N to evaluate the voxels equal to N",
    },
}


def binary_mask(array: np.ndarray, path, label: int | None, role: str = "prediction") -> np.ndarray:
    """Foreground of a label map: ``array == label``, or the 0/1 map itself.

    Args:
        role: ``"prediction"`` or ``"reference"``: what the advice in an error speaks of.

    Raises:
        InputError: values that are no class indices (:func:`medseg.io.labels.check_label_values`:
            NaN, non-integer, e.g. a probability map or an image, where ``--label`` cannot help;
            negative); without ``label``, values other than 0 and 1 (the message lists up to 10 of
            them and suggests ``--label N``).
    """
    check_label_values(array, path, num_classes=None if label is not None else 2, hints=_LABEL_HINTS[role])
    if label is not None:
        return array == label
    return array.astype(bool, copy=False)


def resample_nearest(moving, fixed) -> np.ndarray:
    """``moving``'s array resampled nearest-neighbour onto ``fixed``'s grid using both affines.

    Voxels of the fixed grid outside the moving image become 0.
    """
    from scipy import ndimage

    # fixed voxel -> world -> moving voxel, in one homogeneous matrix.
    matrix = np.linalg.inv(moving.affine) @ fixed.affine
    src = np.asarray(moving.array)
    if src.dtype == bool:
        src = src.astype(np.uint8)
    return ndimage.affine_transform(src, matrix, output_shape=fixed.shape, order=0, mode="constant", cval=0)


@dataclass(frozen=True)
class CaseMasks:
    """The masks of one case, both on the reference grid.

    Attributes:
        pred, ref: bool arrays of the reference's shape (``pred`` all False when missing); with
            ``options.classes``, the label maps (values checked: integers >= 0; ``pred`` all 0
            when missing).
        ref_volume: the reference as read (grid, spacing).
        ref_array: the reference label map after ``--map-labels`` (for the absent-label warning).
        resampled: the prediction was resampled nearest-neighbour onto the reference grid.
        reoriented: the prediction held the reference's voxels in another axis order.
    """

    pred: np.ndarray
    ref: np.ndarray
    ref_volume: Volume
    ref_array: np.ndarray
    resampled: bool = False
    reoriented: bool = False


def _prediction_on_reference_grid(pair: CasePair, ref_vol: Volume, options: EvalOptions):
    """``(array, resampled, reoriented)`` of the prediction, on the reference grid."""
    from medseg.io import read_volume

    pred_vol = read_volume(pair.pred_path)
    reoriented = False
    aligned = pred_vol.onto_grid_of(ref_vol)
    if aligned is not None and aligned is not pred_vol:
        # The same voxels stored in another axis order (e.g. an LPS prediction of a DICOM
        # series and an LAS reference): paired by physical position, exactly.
        pred_vol, reoriented = aligned, True
    if pred_vol.same_grid(ref_vol):
        return pred_vol.array, False, reoriented
    if not options.resample_pred:
        raise InputError(
            pair.pred_path,
            f"the grid of its reference {pair.ref_path} ({_grid_text(ref_vol)})",
            _grid_text(pred_vol),
            "pass --resample-pred to resample predictions nearest-neighbour onto the reference grid",
        )
    return resample_nearest(pred_vol, ref_vol), True, reoriented


def read_case(pair: CasePair, options: EvalOptions) -> CaseMasks:
    """Read and check the reference and prediction of one case (what is scored, and drawn).

    Raises:
        InputError: unreadable files, label values other than {0, 1} (without a label or
            classes; with classes: values that are no integers >= 0), or a prediction on
            another grid than the reference (without ``resample_pred``).
    """
    from medseg.io import read_volume

    ref_vol = read_volume(pair.ref_path)
    ref_array, labelled = ref_vol.array, None
    if options.ignore_label is not None:  # before --map-labels: `*` never takes it
        labelled = np.asarray(ref_array) != options.ignore_label
        if not labelled.any():
            raise InputError(pair.ref_path, "a reference with labelled voxels",
                             f"only the ignore value {options.ignore_label} (--ignore-label)")
        ref_array = np.where(labelled, ref_array, np.zeros((), np.asarray(ref_array).dtype))
    if options.map_labels:
        from medseg.io.labels import apply_label_map

        ref_array = apply_label_map(np.asarray(ref_array), options.map_labels)
    ref = _foreground(ref_array, pair.ref_path, options, "reference")
    if pair.pred_path is None:
        return CaseMasks(np.zeros(ref.shape, dtype=ref.dtype), ref, ref_vol, ref_array)
    pred_arr, resampled, reoriented = _prediction_on_reference_grid(pair, ref_vol, options)
    pred = _foreground(pred_arr, pair.pred_path, options, "prediction")
    if labelled is not None:
        pred = np.where(labelled, pred, np.zeros((), pred.dtype))
    return CaseMasks(pred, ref, ref_vol, ref_array, resampled, reoriented)


def _foreground(array: np.ndarray, path, options: EvalOptions, role: str) -> np.ndarray:
    """The bool foreground (:func:`binary_mask`), or with classes the checked label map."""
    if options.classes is None:
        return binary_mask(array, path, options.label, role=role)
    array = np.asarray(array)
    check_label_values(array, path, num_classes=None, hints=_LABEL_HINTS[role])
    return array


def class_masks(spec: ClassSpec, label: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, mask)`` per class of ``spec``, in order: bool ``label.shape``, True where the
    label is one of the class's ids (a region: the union of its ids, which may overlap other
    regions). Ids of no class belong to no mask. One mask at a time for classes (memory)."""
    if spec.regions:
        masks = spec.region_masks(label)
        for k, name in enumerate(spec.names):
            yield name, np.ascontiguousarray(masks[..., k])
    else:
        indices = spec.class_indices(label)
        for k, name in enumerate(spec.names, 1):
            yield name, indices == k


def unknown_values(spec: ClassSpec, label: np.ndarray) -> dict[str, int]:
    """Nonzero values of ``label`` in no class of ``spec`` -> their voxel counts (str keys, for JSON)."""
    label = np.asarray(label)
    known = sorted({i for ids in spec.ids for i in ids})
    stray = (label != 0) & ~np.isin(label, known)
    if not stray.any():
        return {}
    values, counts = np.unique(label[stray], return_counts=True)
    return {f"{v:g}": int(n) for v, n in zip(values.tolist(), counts.tolist())}


def score_masks(pred: np.ndarray, ref: np.ndarray, spacing, options: EvalOptions, *, lesion_wise: bool = True,
                kd_workers: int = -1) -> dict:
    """Metrics of one pair of bool masks (one class): ``pred_empty``, ``ref_empty``, ``metrics``
    (:func:`compute_metrics`, one surface computation) and, when ``lesion_wise``, ``lesions``
    (counts and rates) and ``lesion_details`` (per lesion)."""
    out = {
        "pred_empty": not bool(pred.any()),
        "ref_empty": not bool(ref.any()),
        "metrics": compute_metrics(pred, ref, spacing, percentile=options.percentile,
                                   nsd_tolerance_mm=options.nsd_tolerance_mm, workers=kd_workers),
    }
    if lesion_wise:
        lesions = lesion_metrics(
            pred, ref, spacing, connectivity=options.connectivity, min_overlap_fraction=options.min_overlap_fraction
        )
        out["lesions"] = lesions
        out["lesion_details"] = {"ref_lesions": lesions.pop("ref_lesions"), "pred_lesions": lesions.pop("pred_lesions")}
    return out


def evaluate_case(pair: CasePair, options: EvalOptions, *, kd_workers: int = -1) -> dict:
    """Read, check and score one case.

    Args:
        pair: the files of the case.
        options: scoring options.
        kd_workers: threads of the nearest-neighbour search (1 inside worker processes).

    Returns:
        a per-case record of numbers, flags and paths (no image data: figures are the report's,
        :func:`medseg.eval.report.case_figures`): ``case_id``, paths, ``missing``, ``pred_empty``,
        ``ref_empty``, grid, ``diagonal_mm``, ``metrics`` (:func:`compute_metrics`), ``lesions``
        (counts and rates), ``lesion_details`` (per lesion), ``resampled``, ``reoriented`` (the
        prediction held the reference's voxels in another axis order and was brought onto its grid
        exactly). With ``options.classes``, ``metrics``/``lesions``/``lesion_details`` move into
        ``classes`` (name -> :func:`score_masks`; lesions for lesion classes only), the case's
        ``pred_empty``/``ref_empty`` mean no class at all, and ``unknown_prediction_values``
        counts the voxels of prediction values in no class (ignored).

    Raises:
        InputError: see :func:`read_case`.
    """
    masks = read_case(pair, options)
    pred, ref, ref_vol = masks.pred, masks.ref, masks.ref_volume
    spacing = ref_vol.spacing_mm
    spec = options.classes
    if spec is None:
        scores = score_masks(pred, ref, spacing, options, kd_workers=kd_workers)
    else:
        scores = {"classes": {}}
        pairs = zip(class_masks(spec, pred), class_masks(spec, ref))
        for (name, pred_c), (_, ref_c) in pairs:
            scores["classes"][name] = score_masks(pred_c, ref_c, spacing, options, kd_workers=kd_workers,
                                                  lesion_wise=name in spec.lesions)
        scores["unknown_prediction_values"] = unknown_values(spec, pred)
        scores["pred_empty"] = all(c["pred_empty"] for c in scores["classes"].values())
        scores["ref_empty"] = all(c["ref_empty"] for c in scores["classes"].values())
    record = {
        "case_id": pair.case_id,
        "ref_path": str(pair.ref_path),
        "pred_path": None if pair.pred_path is None else str(pair.pred_path),
        "image_path": None if pair.image_path is None else str(pair.image_path),
        "missing": pair.pred_path is None,
        "pred_empty": scores.pop("pred_empty"),
        "ref_empty": scores.pop("ref_empty"),
        "resampled": masks.resampled,
        "reoriented": masks.reoriented,
        "shape": list(ref_vol.shape),
        "spacing_mm": [float(s) for s in spacing],
        "diagonal_mm": image_diagonal_mm(ref_vol.shape, spacing),
        **scores,
    }
    if options.ignore_label is not None:
        record["labelled_fraction"] = float(np.mean(np.asarray(ref_vol.array) != options.ignore_label))
    if options.label is not None and not ref.any():
        # For the warning on a label found nowhere (removed from the record by evaluate_folders).
        record["_ref_values"] = label_values(np.asarray(masks.ref_array), limit=10)
    return record


def _evaluate_in_worker(pair: CasePair, options: EvalOptions) -> dict:
    # One thread per process: the pool already uses the cores.
    try:
        return evaluate_case(pair, options, kd_workers=1)
    except InputError as exc:
        # medseg's errors do not survive pickling (their __init__ takes several arguments):
        # send the fields back and raise the same error in the parent.
        return {"_error": ("input", exc.path, exc.expected, exc.found, exc.hint)}
    except MedsegError as exc:
        return {"_error": ("other", str(exc))}


def _raise_worker_error(error: tuple) -> None:
    if error[0] == "input":
        raise InputError(*error[1:])
    raise MedsegError(error[1])


def evaluate_folders(
    pred_dir: str | os.PathLike,
    ref_dir: str | os.PathLike,
    *,
    images_dir: str | os.PathLike | None = None,
    options: EvalOptions | None = None,
    missing: str = "score",
    empty_distance: str = "worst",
    workers: int = 1,
    progress: bool = True,
) -> EvalResult:
    """Score every reference case against its prediction and aggregate.

    Args:
        pred_dir: folder of predictions.
        ref_dir: folder of references.
        images_dir: optional images, drawn under the outlines in the report.
        options: scoring options (:class:`EvalOptions`).
        missing: ``"score"`` or ``"error"`` for references without prediction.
        empty_distance: ``"worst"`` or ``"exclude"`` (see :mod:`medseg.eval.aggregate`).
        workers: processes evaluating patients in parallel (results identical to 1).
        progress: show a progress bar over patients on stderr.

    Returns:
        :class:`EvalResult` with cases sorted by id; its ``warnings`` name results that are
        computed but likely not what was meant (a label or class in no reference, a prediction
        that is its reference file, prediction values in no class).

    Raises:
        InputError, DatasetError: see :func:`pair_cases` and :func:`evaluate_case`.
        ValueError: bad ``workers``, ``missing`` or ``empty_distance``.
    """
    from tqdm import tqdm

    options = options or EvalOptions()
    check_policy(empty_distance)
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1, found {workers!r}")
    pairs, unmatched = pair_cases(pred_dir, ref_dir, images_dir=images_dir, missing=missing)
    for cid in unmatched:
        log.warning("prediction %s has no reference in %s: ignored", cid, ref_dir)
    for pair in pairs:
        if pair.pred_path is None:
            log.warning("%s: no prediction in %s: scored as a miss (empty prediction)", pair.case_id, pred_dir)
    bar = tqdm(total=len(pairs), desc="medseg-eval", unit="patient", disable=not progress, file=None)
    results: dict[str, dict] = {}
    try:
        if workers == 1 or len(pairs) <= 1:
            for pair in pairs:
                results[pair.case_id] = evaluate_case(pair, options)
                bar.update(1)
        else:
            import multiprocessing

            # spawn: workers start clean (no inherited threads or TensorFlow state from the caller).
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(int(workers), len(pairs)), mp_context=ctx) as pool:
                futures = {pool.submit(_evaluate_in_worker, pair, options): pair for pair in pairs}
                try:
                    for future in as_completed(futures):
                        record = future.result()
                        if "_error" in record:
                            _raise_worker_error(record["_error"])
                        results[futures[future].case_id] = record
                        bar.update(1)
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
    finally:
        bar.close()
    cases = [results[p.case_id] for p in pairs]
    warnings = _warnings(pairs, cases, options)
    if options.classes is None:
        summary = aggregate(cases, empty_distance)
    else:
        summary = aggregate_classes(cases, options.classes, empty_distance)
    return EvalResult(cases, summary, unmatched, options, empty_distance, warnings)


def _warnings(pairs: list[CasePair], cases: list[dict], options: EvalOptions) -> list[str]:
    """Results that are computed but likely not what was meant; drops the records' helper keys."""
    out = []
    copies = [p.case_id for p in pairs if p.pred_path is not None and _same_content(p.pred_path, p.ref_path)]
    if copies:
        out.append(f"{len(copies)} of {len(pairs)} predictions are their reference file or a copy of it "
                   f"({', '.join(copies[:5])}{', ...' if len(copies) > 5 else ''}): their scores are perfect by "
                   "construction; is --pred the right folder?")
    values = sorted({v for c in cases for v in c.pop("_ref_values", [])})
    if options.label is not None and cases and all(c["ref_empty"] for c in cases):
        where = "no reference and no prediction" if all(c["pred_empty"] for c in cases) else "no reference"
        n = f"{len(cases)} case" + ("s" if len(cases) > 1 else "")
        held = f"; the references hold the values {', '.join(f'{v:g}' for v in values[:10])}" if values else ""
        out.append(f"label {options.label} occurs in {where} ({n}): the scores compare empty masks "
                   f"(DSC NaN){held}; check --label")
    if options.classes is not None:
        out.extend(_class_warnings(cases, options.classes))
    return out


def _class_warnings(cases: list[dict], spec: ClassSpec) -> list[str]:
    """A class in no reference (a wrong id?), and prediction values in no class, once each."""
    out = []
    absent = [name for name in spec.names if cases and all(c["classes"][name]["ref_empty"] for c in cases)]
    if absent:
        ids = ", ".join(f"{name} ({','.join(map(str, spec.ids[spec.names.index(name)]))})" for name in absent)
        out.append(f"classes {ids} occur in no reference: their DSC is NaN or 0 in every case; check the label ids")
    stray = [c["unknown_prediction_values"] for c in cases if c["unknown_prediction_values"]]
    if stray:
        values = sorted({v for found in stray for v in found}, key=float)
        voxels = sum(n for found in stray for n in found.values())
        listed = ", ".join(values[:10]) + (", ..." if len(values) > 10 else "")
        out.append(f"{len(values)} prediction value{'s' if len(values) > 1 else ''} of no class ignored ({listed}; "
                   f"{voxels} voxels in {len(stray)} of {len(cases)} cases; summary.json unknown_prediction_values "
                   "has them per value); check --labels-map / --dataset-json")
    return out


def _same_content(pred: Path, ref: Path) -> bool:
    """The prediction is the reference file, or a byte-for-byte copy (a model's output hardly is)."""
    import filecmp

    if same_file(pred, ref):
        return True
    try:
        # Sizes first (filecmp compares them before reading); a DICOM folder is never a copy here.
        return pred.is_file() and ref.is_file() and filecmp.cmp(pred, ref, shallow=False)
    except OSError:
        return False


def options_dict(options: EvalOptions) -> dict:
    """The options as a JSON-ready dict (for ``summary.json``)."""
    out = asdict(options)
    out["percentile"] = float(out["percentile"])
    if out["label"] is None and options.classes is None:
        out["label"] = "binary {0, 1}"
    if out.pop("ignore_label") is not None:  # absent without one, as before it existed
        out["ignore_label"], out["scored"] = options.ignore_label, "labelled voxels only"
    classes = out.pop("classes")  # absent in a binary summary, as before classes existed
    if classes is not None:
        out["classes"] = options.classes.to_dict()
    return out

