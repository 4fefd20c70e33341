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

#: Not metrics of the catalog: the DSC after keeping the largest component and after dropping the
#: components smaller than the training labels' smallest, for the post-processing choices; carried
#: beside the catalog's validation columns.
_LARGEST = "dsc_largest_component"
_SMALL = "dsc_without_small"


def _means() -> tuple[str, ...]:
    """Keys whose class mean a multi-class row carries: the catalog's validation columns."""
    from medseg.eval.catalog import validation_columns

    return (*validation_columns(), _LARGEST, _SMALL)


def _class_keys() -> tuple[str, ...]:
    """Keys kept per class as ``<key>_<name>``: the catalog's, and the largest-component DSC."""
    from medseg.eval.catalog import validation_class_columns

    return (*validation_class_columns(), _LARGEST, _SMALL)


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
    held, smallest = training_facts(plan)

    def evaluate(model) -> list[dict]:
        twin.set_weights(model.get_weights())
        rows = []
        for case in cases:
            # Read per validation, not cached: validation sets of CT volumes do not fit in memory.
            # load_pair applies the label map and brings the label onto the image's grid.
            image, label = load_pair(case)
            pred = np.asarray(predictor.segment(image, largest_component=False).array)
            ref = np.asarray(label.array)
            labelled = None
            if ignore is not None:  # partial labels: the labelled voxels only (score_case masks pred)
                labelled = ref != ignore
                ref = np.where(labelled, ref, 0)
            per_class = {name: score_case(spec.mask(pred, k), spec.mask(ref, k), image.spacing_mm, smallest.get(name),
                                          labelled)
                         for k, name in enumerate(spec.names)}
            # one foreground: its ids (every nonzero value by default)
            row = (class_row(case.case_id, validation, per_class) if spec.kind.per_class
                   else {"case_id": case.case_id, "validation": validation, **per_class[spec.names[0]]})
            missed = [name for name in spec.names if name in held and per_class[name]["pred_empty"]]
            if missed:
                row["warning"] = empty_prediction_text(case.case_id, missed, len(plan.fingerprint.get("cases", [])))
            rows.append(row)
        return rows

    return evaluate


#: Predicted components below this share of the training labels' smallest component are the
#: candidates the post-processing may drop. Not the smallest itself: a structure the field of view
#: cuts is smaller than any labelled one (patient B's 20 slices hold 22.4 ml of aorta, a 2 cm crop
#: half of it), while the false components it is meant for are a few voxels.
SMALL_COMPONENT_SHARE = 0.1


def training_facts(plan) -> tuple[set[str], dict[str, float]]:
    """From the plan's fingerprint (of the training cases): the classes every training case holds,
    and each class's size (ml) below which predicted components may be dropped:
    :data:`SMALL_COMPONENT_SHARE` of its smallest labelled component (classes without one left out)."""
    entries = [e for e in (plan.fingerprint or {}).get("cases", []) if "lesion" in e]
    spec = plan.class_spec
    if not entries:
        return set(), {}
    if "class_voxels" not in entries[0] or not spec.kind.per_class:
        name = spec.names[0]
        held = {name} if all(e["lesion"]["voxels"] > 0 for e in entries) else set()
        sizes = [e["lesion"].get("smallest_component_ml") for e in entries]
        sizes = [v for v in sizes if v is not None]
        return held, ({name: SMALL_COMPONENT_SHARE * min(sizes)} if sizes else {})
    held = {n for n in spec.names if all(e["class_voxels"].get(n, 0) > 0 for e in entries)}
    smallest = {}
    for n in spec.names:
        sizes = [e.get("class_smallest_component_ml", {}).get(n) for e in entries]
        sizes = [v for v in sizes if v is not None]
        if sizes:
            smallest[n] = SMALL_COMPONENT_SHARE * min(sizes)
    return held, smallest


def empty_prediction_text(case_id: str, names, n_training: int) -> str:
    """The warning for a validation case where the model predicts none of ``names`` although
    every training case holds them."""
    which = ", ".join(names)
    return (f"the model predicts no {which} on {case_id}, although each of the {n_training} training case"
            f"{'s' if n_training != 1 else ''} holds {'it' if len(names) == 1 else 'them'}: a new scan is likely "
            f"segmented as empty too (train longer, check --map-labels / --labels-map, or add cases)")


def score_case(pred: np.ndarray, ref: np.ndarray, spacing, min_component_ml: float | None = None,
               labelled: np.ndarray | None = None) -> dict:
    """The 3D metrics of one binary prediction against its reference, with the emptiness flags,
    the DSC after keeping the largest component and the DSC after dropping the components below
    ``min_component_ml`` (the training labels' smallest; None: nothing dropped), for the
    post-processing choices. ``labelled``: partial labels' labelled voxels, the only ones scored;
    the component rules run on the whole prediction first, as inference applies them (masking
    first would cut one organ into a component per labelled slice)."""
    from medseg.eval import compute_metrics
    from medseg.eval.metrics import dice
    from medseg.infer.postprocess import keep_largest_component, remove_small_lesions

    pred = np.asarray(pred) > 0
    scored = (lambda p: p) if labelled is None else (lambda p: p & labelled)
    without_small = pred if not min_component_ml else remove_small_lesions(pred, spacing, min_component_ml,
                                                                             spare_largest=True) > 0
    largest = keep_largest_component(pred) > 0
    pred = scored(pred)
    metrics = compute_metrics(pred, ref, spacing)
    return {**{k: float(v) for k, v in metrics.items()},
            "pred_empty": float(not pred.any()), "ref_empty": float(not ref.any()),
            # for the post-processing choices (medseg.infer.postprocess.choose_*)
            "dsc_largest_component": float(dice(scored(largest), ref)),
            "dsc_without_small": float(dice(scored(without_small), ref)),
            "min_component_ml": float(min_component_ml or 0.0)}


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


def postprocessing(spec, rows: list[dict], validation: str, smallest: dict[str, float] | None = None) -> dict:
    """The post-processing choices made on validation: the largest-component rule, one for a
    binary model (``choose_largest_component``'s dict), one per class (``{"largest_component":
    {name: bool}, "classes": {name: details}}``) for several; and, for the classes whose smallest
    training component is known (``smallest``, ml), whether to drop smaller predicted components
    (``"small_components": {name: choose_small_components's dict}``)."""
    from medseg.infer.postprocess import choose_largest_component, choose_small_components

    def column(key: str, name: str) -> str:
        return key if not spec.kind.per_class else f"{key}_{name}"

    small = {name: choose_small_components(
        [{"dsc": r.get(column("dsc", name), float("nan")),
          "dsc_without_small": r.get(column(_SMALL, name), float("nan"))} for r in rows],
        min_component_ml=smallest[name], validation=validation)
        for name in spec.names if (smallest or {}).get(name)}
    if not spec.kind.per_class:
        out = choose_largest_component(rows, validation=validation)
        return {**out, "small_components": small} if small else out
    details = {name: choose_largest_component(
        [{"dsc": r.get(f"dsc_{name}", float("nan")),
          "dsc_largest_component": r.get(f"dsc_largest_component_{name}", float("nan"))} for r in rows],
        validation=validation) for name in spec.names}
    out = {"largest_component": {name: d["largest_component"] for name, d in details.items()}, "classes": details}
    return {**out, "small_components": small} if small else out
