"""The dataset fingerprint: what :func:`medseg.data.plan.make_plan` measures on the training set.

Per case (after reorientation to the plan's orientation): spacing, shape, modality guess, body
and foreground intensity samples, lesion (class) components and, for named classes, the share
of each class on each side of the body. Pooled: the median spacing, intensity statistics, the
patch size, the normalization a modality implies, the CT window of named classes, the classes
lying on one side of the body. The constants of these choices live here; :mod:`medseg.data.plan`
turns the measures into a :class:`~medseg.data.plan.Plan`.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Mapping

import numpy as np

from medseg.errors import InputError
from medseg.io.classes import CLASSES, ClassSpec, LabelKind
from medseg.transforms.intensity import body_mask, guess_modality
from medseg.transforms.spatial import reorient_array, reorientation

__all__ = ["load_pair", "fingerprint_cases", "summary"]

DEFAULT_CT_WINDOW_HU = (-1000.0, 400.0)
#: HU added below the named classes' 5th and above their 95th percentile to make their CT window
#: (organs of one non-contrast patient, 5..65 HU, give about [-245, 315]).
CLASS_WINDOW_MARGIN_HU = 250.0
#: A class is on one side of the body when at least this share of its voxels lies on that side of
#: the body's centre (along the orientation's left-right axis) in every case holding it, the same
#: side in all: the organs of patient A lie 89-100 % on their side; a class covering both kidneys
#: lies about half and half, and a lesion class found on either side across patients is not
#: one-sided.
LATERAL_SHARE = 0.8
DEFAULT_PATCH = 256
#: Voxels sampled per case for the intensity fingerprint (nnU-Net uses 10 000 foreground voxels).
_SAMPLES_PER_CASE = 10_000


#: Plan.modality of a training set that mixes modalities (normalized by per-volume z-score).
MIXED = "MIXED"


def _zscore_mr() -> dict:
    return {"kind": "zscore", "mean": None, "std": None, "clip_low": None, "clip_high": None,
            "clip_percentiles": [0.5, 99.5], "region": "body"}


def load_pair(item: Any):
    """(image Volume, label Volume or None) from a Case, dict, tuple, Volume or path.

    A Case's label gets its ``label_map`` applied, and a label holding the image's voxels in
    another axis order (e.g. stored LAS for an LPS DICOM series) is brought onto the image's
    grid exactly (:meth:`medseg.io.volume.Volume.onto_grid_of`).
    """
    from medseg.io.volume import Volume

    def read(x, case_id=None, reference=None):
        if x is None or isinstance(x, Volume):
            return x
        from medseg.io import read_volume  # imported late: reading files is the only use of io here

        # The image as reference: a DICOM SEG / RTSTRUCT label is placed on its grid (other labels ignore it).
        return read_volume(x, case_id=case_id, reference=reference)

    if isinstance(item, Volume):
        return item, None
    if isinstance(item, Mapping):
        image, label = read(item["image"]), read(item.get("label"))
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        image, label = read(item[0]), read(item[1])
    elif hasattr(item, "image_path"):
        cid = getattr(item, "case_id", None)
        image = read(item.image_path, cid)
        label = read(getattr(item, "label_path", None), cid, reference=image)
        label_map = getattr(item, "label_map", None)
        if label is not None and label_map:
            from medseg.io.labels import apply_label_map

            label = label.with_array(apply_label_map(np.asarray(label.array), label_map))
    elif isinstance(item, (str, os.PathLike)):
        return read(item), None
    else:
        raise TypeError(f"make_plan expects Cases, Volumes, (image, label) pairs or dicts, found {type(item).__name__}")
    if label is not None:
        label = label.onto_grid_of(image) or label
    return image, label


def _case_fingerprint(image, label, orientation: str, rng: np.random.Generator,
                      classes=None, ignore: int | None = None) -> tuple[dict, np.ndarray, np.ndarray]:
    from medseg.components import label_components

    reo = reorientation(image.affine, image.shape, orientation)
    arr = reorient_array(np.asarray(image.array), reo)
    spacing = np.linalg.norm(reo.output_affine[:3, :3], axis=0)
    # Without a CT-like header or HU range, treat the scan as MR (z-score: no absolute scale).
    modality = guess_modality(image) or "MR"
    body = body_mask(arr, modality)
    lab, n_labelled = None, None
    if label is not None and ignore is not None and label.shape == image.shape:
        # Partial labels: every statistic below counts the labelled voxels only.
        lab = np.asarray(label.array)
        labelled = lab != ignore
        n_labelled = int(np.count_nonzero(labelled))
        lab = np.where(labelled, lab, 0)
        body &= reorient_array(labelled, reo)
    body_vals = arr[body]
    body_vals = body_vals[rng.integers(0, body_vals.size, size=min(body_vals.size, _SAMPLES_PER_CASE))]
    entry: dict[str, Any] = {
        "case_id": image.case_id,
        "shape": list(arr.shape),
        "spacing_mm": [float(s) for s in spacing],
        "modality": modality,
        "original_orientation": image.orientation,
        "body_fraction": float(body.mean()),
    }
    fg_vals = np.zeros(0, dtype=np.float64)
    if label is not None:
        if label.shape != image.shape:
            raise InputError(label.meta.get("source_path") or label.case_id, f"a label of shape {image.shape}",
                             f"shape {label.shape}")
        lab = np.asarray(label.array) if lab is None else lab
        # Foreground = the named classes only (a multi-organ map holds many more ids), else nonzero.
        if classes is not None:
            # Each class's share of the body: the cross-entropy's automatic class weights.
            # One pass per class gives both its count and the union (no second pass over all ids).
            entry["body_voxels"] = int(body.sum())
            entry["class_voxels"], union = {}, np.zeros(lab.shape, dtype=bool)
            # Left-right: the plan orientation's L/R axis; the body's centre is its mean position.
            lr = _left_right_axis(orientation)
            body_x = body.sum(axis=tuple(a for a in range(3) if a != lr))
            centre = float(np.average(np.arange(body_x.size), weights=body_x)) if body_x.any() else None
            entry["class_side_shares"] = {}
            for name, ids in zip(classes.names, classes.ids):
                mask = np.isin(lab, ids)
                entry["class_voxels"][name] = int(mask.sum())
                entry["class_side_shares"][name] = _side_share(reorient_array(mask, reo), centre, lr)
                union |= mask
            lab = union
        lab = reorient_array(lab, reo) > 0
        n_vox = int(lab.sum())
        comps, n_comp = label_components(lab)
        sizes = np.bincount(comps.ravel())[1:] if n_comp else np.zeros(0, int)
        if n_labelled is not None:
            entry["labelled_fraction"] = float(n_labelled / lab.size)
        entry["lesion"] = {
            "voxels": n_vox,
            "volume_ml": float(n_vox * abs(np.linalg.det(reo.output_affine[:3, :3])) / 1000.0),
            "components": int(n_comp),
            "component_voxels": [int(s) for s in sorted(sizes.tolist(), reverse=True)[:20]],
            "fraction": float(n_vox / (lab.size if n_labelled is None else max(n_labelled, 1))),
            # Per array axis: how many slices along that axis contain lesion.
            "slices_with_lesion": [int(np.any(lab, axis=tuple(a for a in range(3) if a != ax)).sum())
                                   for ax in range(3)],
        }
        if n_vox:
            fg = arr[lab]
            fg_vals = fg[rng.integers(0, fg.size, size=min(fg.size, _SAMPLES_PER_CASE))].astype(np.float64)
    return entry, body_vals.astype(np.float64), fg_vals


def _left_right_axis(orientation: str) -> int:
    """The array axis of ``orientation`` (axis codes such as ``"RAS"``) that runs left-right."""
    return next(i for i, c in enumerate(orientation.upper()) if c in "LR")


def _side_share(mask: np.ndarray, centre: float | None, axis: int) -> float | None:
    """Share of ``mask``'s voxels past ``centre`` (an index) along ``axis``, the left-right one;
    voxels on the centre count half. None for an empty mask or a scan without body."""
    per_x = mask.sum(axis=tuple(a for a in range(3) if a != axis))
    n = int(per_x.sum())
    if not n or centre is None:
        return None
    x = np.arange(per_x.size)
    return float((per_x[x > centre].sum() + 0.5 * per_x[x == centre].sum()) / n)


def _stats(values: np.ndarray) -> dict | None:
    if values.size == 0:
        return None
    p = np.percentile(values, [0.5, 50, 99.5])
    return {"p0_5": float(p[0]), "median": float(p[1]), "p99_5": float(p[2]),
            "mean": float(values.mean()), "std": float(values.std()), "n_samples": int(values.size)}


def _lateral_classes(entries: list[dict], names, orientation: str) -> dict[str, str]:
    """``{class: "left" or "right"}`` for the classes lying on one side of the body
    (:data:`LATERAL_SHARE`) in every labelled case holding them, the same side in all."""
    # The shares count voxels toward higher indices of the orientation's L/R axis.
    high = {"R": "right", "L": "left"}[orientation.upper()[_left_right_axis(orientation)]]
    low = "left" if high == "right" else "right"
    sides = {}
    for name in names:
        shares = [e["class_side_shares"][name] for e in entries
                  if e.get("class_side_shares", {}).get(name) is not None]
        if shares and min(shares) >= LATERAL_SHARE:
            sides[name] = high
        elif shares and max(shares) <= 1.0 - LATERAL_SHARE:
            sides[name] = low
    return sides


def _class_body_fractions(entries: list[dict], names) -> dict | None:
    """Pooled share of the body's voxels of each named class (None without labelled cases)."""
    labelled = [e for e in entries if "class_voxels" in e]
    body = sum(e["body_voxels"] for e in labelled)
    if not labelled or body <= 0:
        return None
    return {name: float(sum(e["class_voxels"][name] for e in labelled) / body) for name in names}


def _class_ct_window(values: np.ndarray) -> dict:
    """The named classes' CT window: their 5/95 HU percentiles, each widened by the margin.

    5/95 rather than 0.5/99.5: a stomach's gas or a calcification would otherwise stretch the
    window back over the whole HU range and squeeze the organs' contrast."""
    p5, p95 = np.percentile(values, [5, 95])
    return {"kind": "ct_window", "low_hu": round(float(p5) - CLASS_WINDOW_MARGIN_HU, 1),
            "high_hu": round(float(p95) + CLASS_WINDOW_MARGIN_HU, 1)}


def _normalization_for(modality: str, fg_stats: dict | None) -> dict:
    """CT: the default HU window widened to the lesions' 0.5/99.5 percentiles; else per-volume z-score."""
    if modality != "CT":
        return _zscore_mr()
    low, high = DEFAULT_CT_WINDOW_HU
    if fg_stats is not None:
        low, high = min(low, fg_stats["p0_5"]), max(high, fg_stats["p99_5"])
    return {"kind": "ct_window", "low_hu": float(low), "high_hu": float(high)}


def _patch_for(entries: list[dict], inplane: list[int], spacing_mm: np.ndarray, divisor: int) -> tuple[int, int]:
    """The median resampled in-plane size, rounded up to ``divisor``, at most ``DEFAULT_PATCH``."""
    sizes = np.array([[e["shape"][a] * e["spacing_mm"][a] for a in inplane] for e in entries])
    median_hw = np.median(sizes, axis=0) / spacing_mm
    return tuple(int(min(DEFAULT_PATCH, max(divisor, math.ceil(v / divisor) * divisor))) for v in median_hw)


def _lesion_summary(entries: list[dict], slice_axis: int) -> dict | None:
    """Pooled lesion statistics of the labelled cases (None when no case has a label)."""
    lesion_entries = [e["lesion"] for e in entries if "lesion" in e]
    if not lesion_entries:
        return None
    n_slices = [e["shape"][slice_axis] for e in entries if "lesion" in e]
    with_lesion = [le["slices_with_lesion"][slice_axis] for le in lesion_entries]
    return {
        "cases": len(lesion_entries),
        "cases_without_lesion": sum(1 for le in lesion_entries if le["voxels"] == 0),
        "median_volume_ml": float(np.median([le["volume_ml"] for le in lesion_entries])),
        "components_total": int(sum(le["components"] for le in lesion_entries)),
        "median_voxel_fraction": float(np.median([le["fraction"] for le in lesion_entries])),
        "slice_fraction_with_lesion": float(sum(with_lesion) / max(1, sum(n_slices))),
    }


def _modality_for(modalities: list[str], overrides: Mapping[str, Any]) -> str:
    """The override, else the cases' one modality, else ``MIXED``."""
    if "modality" in overrides:
        return str(overrides["modality"]).upper()
    if len(modalities) == 1:
        return modalities[0]
    # Several modalities (e.g. MR brain and CT chest cases): HU windows would be meaningless for
    # the MR cases, so every volume is z-scored over its own body, which suits both.
    return MIXED


def _kind(classes: ClassSpec | None) -> LabelKind:
    """The label kind of a ``classes`` override, read as the plan saves it (its dict form)."""
    return LabelKind.of(None if classes is None else classes.to_dict())

def fingerprint_cases(cases_or_volumes: Iterable[Any], orientation: str, rng: np.random.Generator,
                      classes: ClassSpec | None = None,
                      ignore: int | None = None) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """Each case's fingerprint entry, and the pooled body and foreground intensity samples.

    Raises:
        ValueError: if there are no cases.
        InputError: if a label's shape differs from its image's.
    """
    entries, body_all, fg_all = [], [], []
    for item in cases_or_volumes:
        image, label = load_pair(item)
        entry, body_vals, fg_vals = _case_fingerprint(image, label, orientation, rng, classes, ignore)
        entries.append(entry)
        body_all.append(body_vals)
        fg_all.append(fg_vals)
    if not entries:
        raise ValueError("make_plan needs at least one case, found none")
    return entries, np.concatenate(body_all), np.concatenate(fg_all)


def summary(entries: list[dict], median_spacing: np.ndarray, body_values: np.ndarray, fg_values: np.ndarray,
            slice_axis: int, classes: ClassSpec | None, orientation: str) -> tuple[dict, dict[str, str]]:
    """``(Plan.fingerprint, {class: side} of the classes on one side of the body)``."""
    fingerprint = {
        "n_cases": len(entries),
        "modalities": sorted({e["modality"] for e in entries}),
        "median_spacing_mm": [float(v) for v in median_spacing],
        "intensity_body": _stats(body_values),
        "intensity_foreground": _stats(fg_values),
        "lesion": _lesion_summary(entries, slice_axis),
        "cases": entries,
    }
    sides: dict[str, str] = {}
    if classes is not None:
        fingerprint["class_body_fractions"] = _class_body_fractions(entries, classes.names)
        if _kind(classes) is CLASSES:  # regions nest, they have no sides
            sides = _lateral_classes(entries, classes.names, orientation)
            fingerprint["lateral_classes"] = sides
    return fingerprint, sides
