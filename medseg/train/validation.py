"""Whole-volume validation during training and the post-processing choice it informs.

:func:`make_validator` segments each validation volume whole with the inference
:class:`~medseg.infer.predictor.Predictor` and scores it in 3D on its own grid; one row per
patient (a multi-class model: the class mean plus each class's figures, :func:`class_row`).
:func:`postprocessing` turns the rows into the largest-component choice the bundle records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from medseg.train.assembly import network_spec
from medseg.train.cases import HELD_OUT

#: Not a metric of the catalog: the DSC after keeping the largest component, for the
#: post-processing choice; carried beside the catalog's validation columns.
_LARGEST = "dsc_largest_component"


def _means() -> tuple[str, ...]:
    """Keys whose class mean a multi-class row carries: the catalog's validation columns."""
    from medseg.eval.catalog import validation_columns

    return (*validation_columns(), _LARGEST)


def _class_keys() -> tuple[str, ...]:
    """Keys kept per class as ``<key>_<name>``: the catalog's, and the largest-component DSC."""
    from medseg.eval.catalog import validation_class_columns

    return (*validation_class_columns(), _LARGEST)


def make_validator(twin, plan, val_cases, cfg, run_dir: Path, validation: str = HELD_OUT, pipeline=None):
    """``evaluate(model) -> rows``: segment each validation volume whole with the inference
    :class:`~medseg.infer.predictor.Predictor` (on ``twin``, a float32 copy of the trained model
    outside the strategy) and score it in 3D on its own grid with :func:`medseg.eval.compute_metrics`;
    with the plan's ``ignore_label``, on the labelled voxels only (prediction and reference).
    """
    from medseg.data.plan import load_pair
    from medseg.infer.bundle import Bundle
    from medseg.infer.predictor import Predictor

    bundle = Bundle(run_dir=run_dir, model=twin, plan=plan, head_level=None, divisor=int(plan.divisor),
                    input_channels=int(plan.context_slices), pipeline=pipeline, network=network_spec(cfg))
    predictor = Predictor(bundle, batch_size=max(8, cfg.batch_size))
    cases = list(val_cases)[: cfg.max_val_cases] if cfg.max_val_cases else list(val_cases)
    spec = predictor.classes
    ignore = getattr(plan, "ignore_label", None)

    def evaluate(model) -> list[dict]:
        twin.set_weights(model.get_weights())
        rows = []
        for case in cases:
            # Read per validation, not cached: validation sets of CT volumes do not fit in memory.
            # load_pair applies the label map and brings the label onto the image's grid.
            image, label = load_pair(case)
            pred = np.asarray(predictor.segment(image, largest_component=False).array)
            ref = np.asarray(label.array)
            if ignore is not None:  # partial labels: the labelled voxels only, in both
                labelled = ref != ignore
                pred, ref = np.where(labelled, pred, 0), np.where(labelled, ref, 0)
            if not spec.kind.per_class:  # one foreground: its ids (every nonzero value by default)
                rows.append({"case_id": case.case_id, "validation": validation,
                             **score_case(spec.mask(pred, 0), spec.mask(ref, 0), image.spacing_mm)})
                continue
            per_class = {name: score_case(spec.mask(pred, k), spec.mask(ref, k), image.spacing_mm)
                         for k, name in enumerate(spec.names)}
            rows.append(class_row(case.case_id, validation, per_class))
        return rows

    return evaluate


def score_case(pred: np.ndarray, ref: np.ndarray, spacing) -> dict:
    """The 3D metrics of one binary prediction against its reference, with the emptiness flags
    and the DSC after keeping the largest component (for the post-processing choice)."""
    from medseg.eval import compute_metrics
    from medseg.eval.metrics import dice
    from medseg.infer.postprocess import keep_largest_component

    metrics = compute_metrics(pred, ref, spacing)
    return {**{k: float(v) for k, v in metrics.items()},
            "pred_empty": float(not pred.any()), "ref_empty": float(not ref.any()),
            # for the post-processing choice (medseg.infer.postprocess.choose_largest_component)
            "dsc_largest_component": float(dice(keep_largest_component(pred) > 0, ref))}


def class_row(case_id: str, validation: str, per_class: Mapping[str, dict]) -> dict:
    """One validation row of a multi-class model: the mean over classes (what selects the model)
    and each class's ``dsc_<name>``, ``hd95_mm_<name>``, ``dsc_largest_component_<name>``."""
    def mean(key: str) -> float:
        values = [m[key] for m in per_class.values() if np.isfinite(m[key])]
        return float(np.mean(values)) if values else float("nan")

    row = {"case_id": case_id, "validation": validation, **{k: mean(k) for k in _means()},
           "pred_empty": float(all(m["pred_empty"] for m in per_class.values())),
           "ref_empty": float(all(m["ref_empty"] for m in per_class.values()))}
    for name, m in per_class.items():
        row.update({f"{key}_{name}": m[key] for key in _class_keys()})
    return row


def per_class_means(spec, rows: list[dict]) -> dict[str, dict[str, float]]:
    """Class name -> ``{key: mean}`` over the validation rows (finite values only) for the catalog's
    per-class validation columns (``dsc``, ``hd95_mm``): the one class of a binary model under its
    name, else each class's own columns."""
    def mean(key: str) -> float:
        values = [float(r[key]) for r in rows if key in r and np.isfinite(float(r[key]))]
        return float(np.mean(values)) if values else float("nan")

    from medseg.eval.catalog import validation_class_columns

    keys = validation_class_columns()
    if not spec.kind.per_class:
        return {spec.names[0]: {key: mean(key) for key in keys}}
    return {name: {key: mean(f"{key}_{name}") for key in keys} for name in spec.names}


def postprocessing(spec, rows: list[dict], validation: str) -> dict:
    """The largest-component choice made on validation: one for a binary model, one per class
    (``{"largest_component": {name: bool}, "classes": {name: details}}``) for several."""
    from medseg.infer.postprocess import choose_largest_component

    if not spec.kind.per_class:
        return choose_largest_component(rows, validation=validation)
    details = {name: choose_largest_component(
        [{"dsc": r.get(f"dsc_{name}", float("nan")),
          "dsc_largest_component": r.get(f"dsc_largest_component_{name}", float("nan"))} for r in rows],
        validation=validation) for name in spec.names}
    return {"largest_component": {name: d["largest_component"] for name, d in details.items()}, "classes": details}
