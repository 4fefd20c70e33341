"""Pairing of an evaluation: each reference case with its prediction (by case id) and image."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import DatasetError, InputError
from medseg.io.atomic import same_file

MISSING_POLICIES = ("score", "error")


@dataclass(frozen=True)
class CasePair:
    """A reference with its prediction (None when missing) and optional image."""

    case_id: str
    ref_path: Path
    pred_path: Path | None
    image_path: Path | None = None


def pair_cases(
    pred_dir: str | os.PathLike,
    ref_dir: str | os.PathLike,
    *,
    images_dir: str | os.PathLike | None = None,
    missing: str = "score",
) -> tuple[list[CasePair], list[str]]:
    """Pair reference and prediction files by case id (medseg's discovery rules).

    Args:
        pred_dir: folder of predicted masks (file names = case ids, as ``medseg-infer`` writes),
            or one prediction file (then ``ref_dir`` is its reference file).
        ref_dir: folder of reference masks, or one reference file.
        images_dir: optional folder of images (nnU-Net ``_0000`` suffixes allowed) for figures;
            one image file with a single pair.
        missing: ``"score"`` (a reference without prediction is scored as a miss) or ``"error"``.

    Returns:
        ``(pairs, unmatched)``: one :class:`CasePair` per reference case, sorted by id, and the
        ids of predictions without a reference (ignored).

    Raises:
        InputError: a folder is missing or holds no volumes; a file given with a folder;
            predictions and references are the same folder or file.
        DatasetError: predictions are missing and ``missing="error"``.
        ValueError: unknown ``missing`` policy.
    """
    from medseg.io.dataset import list_volume_files

    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing must be one of {MISSING_POLICIES}, found {missing!r}")
    pred_path, ref_path = Path(pred_dir), Path(ref_dir)
    if pred_path.exists() and ref_path.exists() and same_file(pred_path, ref_path):
        what = "folder" if ref_path.is_dir() else "file"
        raise InputError(
            pred_path, "predictions different from the references", f"the reference {what} itself ({ref_path})",
            "--pred and --ref name the same data: every score would be perfect",
        )
    if pred_path.is_file() or ref_path.is_file():
        return [_single_pair(pred_path, ref_path, images_dir)], []
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


def _single_pair(pred: Path, ref: Path, images: str | os.PathLike | None) -> CasePair:
    """The one case of ``--pred FILE --ref FILE`` (the image: a file, or looked up in a folder)."""
    from medseg.io.dataset import case_id_from_path, list_volume_files

    for path, other in ((pred, ref), (ref, pred)):
        if not path.is_file():
            found = "a folder" if path.is_dir() else "no such file"
            raise InputError(path, f"a volume file, as {other} is one (one prediction, one reference)", found)
    case_id = case_id_from_path(ref)
    image = None
    if images is not None:
        images = Path(images)
        image = images if images.is_file() else list_volume_files(images, images=True).get(case_id)
    return CasePair(case_id, ref, pred, image)


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

