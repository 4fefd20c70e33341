"""Evaluate a folder of predictions against a folder of references, patient by patient.

Pairing, reading with geometry, grid and label checks, metrics and lesion-wise scores per case
(optionally in worker processes), then aggregation. Writing the outputs is
:mod:`medseg.eval.report`'s job; ``medseg-eval`` calls :func:`evaluate_folders` then
:func:`medseg.eval.report.write_report`.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from medseg.errors import DatasetError, InputError, MedsegError
from medseg.eval.aggregate import aggregate, check_policy
from medseg.eval.lesions import lesion_metrics
from medseg.eval.metrics import compute_metrics, image_diagonal_mm

log = logging.getLogger(__name__)

MISSING_POLICIES = ("score", "error")


@dataclass(frozen=True)
class EvalOptions:
    """How each case is scored.

    Attributes:
        label: class value taken as foreground (None: masks must hold only 0 and 1).
        resample_pred: resample a prediction on another grid onto the reference grid
            (nearest neighbour) instead of refusing it.
        connectivity: of lesion components, 6, 18 or 26.
        min_overlap_fraction: lesion detection rule (0: one voxel of overlap suffices).
        nsd_tolerance_mm: tolerance of the normalized surface Dice.
        percentile: of the robust Hausdorff distance (``hd95_mm``).
        figures: draw the per-patient slice figure.
    """

    label: int | None = None
    resample_pred: bool = False
    connectivity: int = 26
    min_overlap_fraction: float = 0.0
    nsd_tolerance_mm: float = 1.0
    percentile: float = 95.0
    figures: bool = True


@dataclass(frozen=True)
class CasePair:
    """A reference with its prediction (None when missing) and optional image."""

    case_id: str
    ref_path: Path
    pred_path: Path | None
    image_path: Path | None = None


@dataclass
class EvalResult:
    """Per-case records (sorted by case id), the aggregate summary and pairing notes."""

    cases: list[dict]
    summary: dict
    unmatched_predictions: list[str]
    options: EvalOptions
    empty_distance: str


def pair_cases(
    pred_dir: str | os.PathLike,
    ref_dir: str | os.PathLike,
    *,
    images_dir: str | os.PathLike | None = None,
    missing: str = "score",
) -> tuple[list[CasePair], list[str]]:
    """Pair reference and prediction files by case id (medseg's discovery rules).

    Args:
        pred_dir: folder of predicted masks (file names = case ids, as ``medseg-infer`` writes).
        ref_dir: folder of reference masks.
        images_dir: optional folder of images (nnU-Net ``_0000`` suffixes allowed) for figures.
        missing: ``"score"`` (a reference without prediction is scored as a miss) or ``"error"``.

    Returns:
        ``(pairs, unmatched)``: one :class:`CasePair` per reference case, sorted by id, and the
        ids of predictions without a reference (ignored).

    Raises:
        InputError: a folder is missing or holds no volumes.
        DatasetError: predictions are missing and ``missing="error"``.
        ValueError: unknown ``missing`` policy.
    """
    from medseg.io.dataset import list_volume_files

    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing must be one of {MISSING_POLICIES}, found {missing!r}")
    refs = list_volume_files(ref_dir)
    preds = _strip_prediction_suffixes(list_volume_files(pred_dir), refs)
    images = list_volume_files(images_dir, images=True) if images_dir is not None else {}
    absent = [cid for cid in refs if cid not in preds]
    if absent and missing == "error":
        raise DatasetError(
            f"{pred_dir}: {len(absent)} of {len(refs)} reference cases have no prediction "
            "(expected a file named after each case id; --missing score scores them as misses)",
            [f"{cid}: no prediction for {refs[cid]}" for cid in absent],
        )
    unmatched = [cid for cid in preds if cid not in refs]
    pairs = [CasePair(cid, refs[cid], preds.get(cid), images.get(cid)) for cid in refs]
    return pairs, unmatched


#: Suffixes prediction writers add to the case id (``medseg-infer`` writes ``<case>_seg.nii.gz``).
PREDICTION_SUFFIXES = ("_seg", "_pred", "_prediction")


def _strip_prediction_suffixes(preds: dict, refs: dict) -> dict:
    """Map ``case_seg`` to ``case`` when only the stripped id names a reference case.

    An exact id match always wins, so a reference really named ``x_seg`` still pairs with ``x_seg``.
    """
    out = {}
    for cid, path in preds.items():
        if cid not in refs:
            for suffix in PREDICTION_SUFFIXES:
                base = cid[: -len(suffix)]
                if cid.endswith(suffix) and base in refs and base not in preds:
                    cid = base
                    break
        out[cid] = path
    return out


def _grid_text(vol) -> str:
    sp = ", ".join(f"{s:.4g}" for s in vol.spacing_mm)
    org = ", ".join(f"{o:.4g}" for o in vol.origin_mm)
    return f"shape {vol.shape}, spacing ({sp}) mm, origin ({org}) mm, orientation {vol.orientation}"


def binary_mask(array: np.ndarray, path, label: int | None) -> np.ndarray:
    """Foreground of a label map: ``array == label``, or the 0/1 map itself.

    Raises:
        InputError: without ``label``, when values other than 0 and 1 are present (the message
            lists up to 10 of them and suggests ``--label N``).
    """
    if label is not None:
        return array == label
    bad = (array != 0) & (array != 1)
    if bad.any():
        found = np.unique(array[bad])
        shown = ", ".join(f"{v:g}" for v in found[:10].tolist()) + (", ..." if found.size > 10 else "")
        raise InputError(
            path, "a binary mask with values {0, 1}", f"other values: {shown}",
            "pass --label N to evaluate the voxels equal to N",
        )
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


def evaluate_case(pair: CasePair, options: EvalOptions, *, kd_workers: int = -1) -> dict:
    """Read, check and score one case.

    Args:
        pair: the files of the case.
        options: scoring options.
        kd_workers: threads of the nearest-neighbour search (1 inside worker processes).

    Returns:
        a per-case record: ``case_id``, paths, ``missing``, ``pred_empty``, ``ref_empty``, grid,
        ``diagonal_mm``, ``metrics`` (:func:`compute_metrics`), ``lesions`` (counts and rates),
        ``lesion_details`` (per lesion), ``resampled`` and ``figure_png`` (base64, or None).

    Raises:
        InputError: unreadable files, label values other than {0, 1} (without a label), or a
            prediction on another grid than the reference (without ``resample_pred``).
    """
    from medseg.io import read_volume

    ref_vol = read_volume(pair.ref_path)
    ref = binary_mask(ref_vol.array, pair.ref_path, options.label)
    resampled = False
    if pair.pred_path is None:
        pred = np.zeros(ref.shape, dtype=bool)
    else:
        pred_vol = read_volume(pair.pred_path)
        if not pred_vol.same_grid(ref_vol):
            if not options.resample_pred:
                raise InputError(
                    pair.pred_path,
                    f"the grid of its reference {pair.ref_path} ({_grid_text(ref_vol)})",
                    _grid_text(pred_vol),
                    "pass --resample-pred to resample predictions nearest-neighbour onto the reference grid",
                )
            pred_arr = resample_nearest(pred_vol, ref_vol)
            resampled = True
        else:
            pred_arr = pred_vol.array
        pred = binary_mask(pred_arr, pair.pred_path, options.label)
    spacing = ref_vol.spacing_mm
    metrics = compute_metrics(
        pred, ref, spacing, percentile=options.percentile, nsd_tolerance_mm=options.nsd_tolerance_mm, workers=kd_workers
    )
    lesions = lesion_metrics(
        pred, ref, spacing, connectivity=options.connectivity, min_overlap_fraction=options.min_overlap_fraction
    )
    details = {"ref_lesions": lesions.pop("ref_lesions"), "pred_lesions": lesions.pop("pred_lesions")}
    figure = None
    if options.figures:
        from medseg.eval.report import case_figure_png

        image = None
        if pair.image_path is not None:
            image_vol = read_volume(pair.image_path)
            # Display only: an image on another grid is brought onto the reference grid.
            image = image_vol.array if image_vol.same_grid(ref_vol) else resample_nearest(image_vol, ref_vol)
        figure = case_figure_png(pair.case_id, pred, ref, spacing, image=image, dsc=metrics["dsc"])
    return {
        "case_id": pair.case_id,
        "ref_path": str(pair.ref_path),
        "pred_path": None if pair.pred_path is None else str(pair.pred_path),
        "image_path": None if pair.image_path is None else str(pair.image_path),
        "missing": pair.pred_path is None,
        "pred_empty": not bool(pred.any()),
        "ref_empty": not bool(ref.any()),
        "resampled": resampled,
        "shape": list(ref_vol.shape),
        "spacing_mm": [float(s) for s in spacing],
        "diagonal_mm": image_diagonal_mm(ref_vol.shape, spacing),
        "metrics": metrics,
        "lesions": lesions,
        "lesion_details": details,
        "figure_png": figure,
    }


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
        :class:`EvalResult` with cases sorted by id.

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
    summary = aggregate(cases, empty_distance)
    return EvalResult(cases, summary, unmatched, options, empty_distance)


def options_dict(options: EvalOptions) -> dict:
    """The options as a JSON-ready dict (for ``summary.json``)."""
    out = asdict(options)
    out["percentile"] = float(out["percentile"])
    if out["label"] is None:
        out["label"] = "binary {0, 1}"
    return out

