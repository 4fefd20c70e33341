"""``train(config) -> RunResult``: the whole training run behind ``medseg-train``.

Steps, in order:

1. Resolve the configuration (defaults < config file < flags; ``resume`` reads the run's own).
2. Choose the ``tf.distribute`` strategy (first, before any other TensorFlow work, as
   ``MultiWorkerMirroredStrategy`` requires) and the precision policy.
3. Check the dataset (:func:`medseg.data.check.check_dataset`); fatal problems stop the run,
   all of them listed.
4. Split patients (:func:`medseg.data.split`), fit the preprocessing plan on the training
   patients (:func:`medseg.data.plan.make_plan`), save ``plan.json``/``split.json``.
5. Build the network (``network``: a registered builder, :mod:`medseg.nets.registry`), its
   losses and metrics inside ``strategy.scope()``; restore the last checkpoint when resuming.
6. ``model.fit`` on the lesion-aware patch pipeline with the run-keeping callbacks: whole-volume
   3D validation, best bundle, atomic checkpoint, history, curves, TensorBoard, early stopping.

Run folder (``out/<YYYYmmdd-HHMMSS>`` by default)::

    model.keras, bundle.json   best model by mean 3D validation DSC (medseg.infer.bundle)
    config.json                effective configuration
    plan.json, split.json      preprocessing plan; patients used for training / validation
    check.json                 dataset check report
    history.csv, curves.png    one row per epoch; loss (data + regularization) and Dice curves
    validation.csv             per-patient 3D metrics at each validation
    warnings.json              training diagnostics (medseg.train.diagnostics)
    tensorboard/               TensorBoard event files
    checkpoints/               per-epoch checkpoints (weights + optimizer + state), for --resume
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from medseg.errors import DatasetError, InputError
from medseg.io.atomic import check_writable_folder
from medseg.train.checkpoint import atomic_write_json, latest_checkpoint, load_checkpoint
from medseg.train.config import RESUME_MUTABLE, TrainConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
PLAN_FILE = "plan.json"
SPLIT_FILE = "split.json"
#: ``split.json``/bundle value of ``validation`` when the validation cases are the training cases.
ON_TRAINING = "training cases"
HELD_OUT = "held-out cases"


@dataclass
class RunResult:
    """What a training run produced.

    Attributes:
        run_dir: the run folder.
        best_dsc: best mean per-patient 3D validation DSC (NaN when never validated).
        best_epoch: epoch (1-based) of the best model, 0 when none.
        epochs_completed: epochs trained in total (including before a resume).
        stopped_early: early stopping ended the run.
        history: one dict per epoch (as ``history.csv``).
        bundle_dir: folder holding ``model.keras`` + ``bundle.json`` (the run folder).
        replicas: replicas in sync (devices x workers).
        global_batch_size: patches per optimizer step over all replicas.
        learning_rate: peak learning rate after linear scaling with the replicas.
        precision: Keras dtype policy used.
        strategy: class name of the distribution strategy.
        train_cases, val_cases: patient ids of the split.
        model: the model with the final weights (float32, outside any strategy); the bundle
            holds the best one instead.
        validation: ``"held-out cases"`` or ``"training cases"`` (see :func:`check_and_split`).
        stop_reason: ``"epochs"``, ``"budget"`` or ``"early_stopping"``.
        steps: optimizer steps run in all (including before a resume).
        final_lr: learning rate at the last step.
        budget: the budget state (``max_time_s``, ``spent_s``, ``progress``, ``step_s``), or None.
        final_validation_s: duration of the last validation, under a budget.
        wall_s: seconds this invocation took.
        model_config: ``{"filters", "depth"}`` of the network trained (after CPU sizing).
    """

    run_dir: Path
    best_dsc: float
    best_epoch: int
    epochs_completed: int
    stopped_early: bool
    history: list[dict] = field(default_factory=list)
    bundle_dir: Path | None = None
    replicas: int = 1
    global_batch_size: int = 0
    learning_rate: float = 0.0
    precision: str = "float32"
    strategy: str = ""
    train_cases: list[str] = field(default_factory=list)
    val_cases: list[str] = field(default_factory=list)
    model: Any = field(default=None, repr=False)
    validation: str = HELD_OUT
    stop_reason: str | None = None
    steps: int = 0
    final_lr: float | None = None
    budget: dict | None = None
    final_validation_s: float | None = None
    wall_s: float = 0.0
    model_config: dict = field(default_factory=dict)


# --- configuration and run folder ------------------------------------------------------------------
def resolve_config(config: TrainConfig | Mapping[str, Any]) -> TrainConfig:
    """The effective configuration; with ``resume``, the run's saved one plus the allowed changes.

    Raises:
        InputError: ``resume`` is not a run folder, or a setting that shapes the model/data was
            changed on resume.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    if not cfg.resume:
        if not cfg.images or not cfg.labels:
            raise InputError(None, "--images and --labels (or --resume RUN_DIR)",
                             f"images={cfg.images!r}, labels={cfg.labels!r}")
        # Absolute paths in config.json: --resume works from any working folder.
        for name in ("images", "labels", "run_dir", "out"):
            if getattr(cfg, name):
                setattr(cfg, name, os.path.abspath(getattr(cfg, name)))
        return cfg
    run_dir = Path(cfg.resume).resolve()
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.is_file():
        raise InputError(run_dir, f"a medseg-train run folder holding {CONFIG_FILE}",
                         "a folder without it" if run_dir.is_dir() else "nothing")
    saved = TrainConfig.from_dict(json.loads(saved_path.read_text(encoding="utf-8")), source=saved_path)
    for name in ("images", "labels"):
        path = getattr(saved, name)
        if path and not os.path.isabs(path) and not os.path.exists(path):
            # A run saved by an older medseg with relative paths: relative to where it ran,
            # which is unknown; the run folder's parent is the usual place.
            candidate = run_dir.parent.parent / path
            if candidate.exists():
                setattr(saved, name, os.fspath(candidate))
    defaults = TrainConfig()
    changed = []
    for name in TrainConfig.__dataclass_fields__:
        if name in RESUME_MUTABLE or name in ("run_dir", "out"):
            continue
        mine = getattr(cfg, name)
        if mine != getattr(defaults, name) and mine != getattr(saved, name):
            changed.append(f"{name}={mine!r} (run has {getattr(saved, name)!r})")
    if changed:
        allowed = [n for n in RESUME_MUTABLE if n not in ("resume", "debug", "verbose")]
        raise InputError(run_dir, f"only {', '.join(allowed)} to change on resume", "; ".join(changed))
    for name in RESUME_MUTABLE:
        mine = getattr(cfg, name)
        if mine != getattr(defaults, name):
            setattr(saved, name, mine)
    saved.resume = os.fspath(run_dir)
    saved.run_dir = os.fspath(run_dir)
    saved.validate()
    return saved


def new_run_dir(cfg: TrainConfig) -> Path:
    """The folder of a new run: ``run_dir`` if given, else ``out/<YYYYmmdd-HHMMSS>`` (made unique).

    Under ``TF_CONFIG`` every worker must agree on the folder without talking to each other, so
    the name is ``out/run-<hash of the cluster spec>`` unless ``run_dir`` is given.

    Raises:
        InputError: ``run_dir`` already holds a run (use ``--resume`` to continue it).
    """
    from medseg.train.strategy import tf_config

    if cfg.run_dir:
        run_dir = Path(cfg.run_dir)
    elif tf_config() is not None:
        digest = hashlib.sha1(json.dumps(tf_config()["cluster"], sort_keys=True).encode()).hexdigest()[:10]
        run_dir = Path(cfg.out) / f"run-{digest}"
    else:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(cfg.out) / stamp
        n = 1
        while run_dir.exists():
            n += 1
            run_dir = Path(cfg.out) / f"{stamp}-{n}"
    if (run_dir / CONFIG_FILE).exists() and latest_checkpoint(run_dir) is not None:
        raise InputError(run_dir, "a new run folder", "a previous run (continue it with --resume)")
    return run_dir


# --- data --------------------------------------------------------------------------------------------
def check_and_split(cfg: TrainConfig):
    """Discover cases, run the dataset check (fatal problems raise), split patients.

    With ``val_fraction == 0`` (and no folds), or a dataset of one labelled case, every case
    trains and validation runs on the training cases (a one-line note says so for the latter).

    Returns:
        ``(report, train_cases, val_cases, validation)`` with ``validation`` either
        :data:`HELD_OUT` or :data:`ON_TRAINING`.

    Raises:
        DatasetError: listing every fatal problem of the dataset check, or no labelled patient
            (or fewer than the folds need).
    """
    from medseg.data.check import check_dataset
    from medseg.io import pair_cases
    from medseg.io.labels import parse_label_map

    label_map = parse_label_map(cfg.map_labels) if cfg.map_labels else None
    cases, unpaired = pair_cases(cfg.images, cfg.labels)
    if label_map:
        cases = [dataclasses.replace(c, label_map=label_map) for c in cases]
    report = check_dataset(cases, label_map=label_map, extra_problems=unpaired, classes=class_spec_for(cfg))
    report.raise_if_fatal()
    labelled = [c for c in cases if c.label_path is not None]
    if not labelled:
        raise DatasetError("training needs at least 1 labelled patient, found 0",
                           [f"images: {cfg.images}", f"labels: {cfg.labels}"])
    if cfg.folds is None and (cfg.val_fraction == 0 or len(labelled) == 1):
        if len(labelled) == 1 and cfg.val_fraction != 0 and cfg.verbose:
            print(f"medseg-train: 1 labelled case ({labelled[0].case_id}): training on it and validating on it "
                  f"(marked 'training cases'); the model kept is the last one, not a 'best' chosen on training "
                  f"data", flush=True)
        return report, list(labelled), list(labelled), ON_TRAINING
    train_ids, val_ids = split_ids([c.case_id for c in labelled], cfg)
    by_id = {c.case_id: c for c in labelled}
    return report, [by_id[i] for i in train_ids], [by_id[i] for i in val_ids], HELD_OUT


def split_ids(case_ids: list[str], cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """Patient-level split by ``val_fraction`` or ``folds``/``fold``, seeded."""
    from medseg.data import split as split_module

    try:
        if cfg.folds is not None:
            return split_module.kfold_split(case_ids, cfg.folds, cfg.fold, seed=cfg.seed)
        return split_module.train_val_split(case_ids, val_fraction=cfg.val_fraction, seed=cfg.seed)
    except ValueError as exc:
        raise DatasetError(f"cannot split the {len(case_ids)} labelled patients: {exc}",
                           [f"images: {cfg.images}", f"labels: {cfg.labels}"]) from exc


def _epoch_seed(seed: int, epoch: int) -> int:
    """Seed of the patch order of one epoch: depends only on (run seed, epoch), so a resumed run
    draws exactly the batches the uninterrupted run would have drawn."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


# --- model -------------------------------------------------------------------------------------------
def network_spec(cfg: TrainConfig):
    """The run's :class:`~medseg.nets.registry.NetworkSpec`: network ``cfg.network`` with the
    configured filters, depth, dropout, L2 and deep supervision (for the networks that take it)."""
    from medseg.nets.registry import NetworkSpec

    return NetworkSpec.from_settings(cfg.network, filters=cfg.unet_filters, depth=cfg.depth,
                                     deep_supervision=cfg.deep_supervision, dropout=cfg.dropout, l2=cfg.l2)


def build_model(cfg: TrainConfig, plan, *, sync_batch_norm: bool = False):
    """The run's network, built by its registered builder (2.5D input channels =
    ``plan.context_slices``)."""
    spec = plan.class_spec
    if spec.regions:  # one sigmoid per region (they overlap), no background channel
        return network_spec(cfg).build(int(plan.context_slices), spec.num_outputs, sync_batch_norm=sync_batch_norm,
                                       head_activation="sigmoid")
    return network_spec(cfg).build(int(plan.context_slices), int(plan.num_classes), sync_batch_norm=sync_batch_norm)


def output_heads(cfg: TrainConfig) -> list[str]:
    """Names of the model outputs that are trained (all heads with deep supervision)."""
    return network_spec(cfg).output_names


def make_loss(cfg: TrainConfig, regions: bool = False):
    """The per-sample segmentation loss (Dice + cross-entropy by default; nested regions: Dice +
    binary cross-entropy per region, :class:`medseg.losses.regions.RegionDiceBCELoss`)."""
    from medseg.losses import DiceCELoss, DiceLoss

    if regions:
        from medseg.losses.regions import RegionDiceBCELoss

        return RegionDiceBCELoss(dice_weight=0.0 if cfg.loss == "ce" else 1.0,
                                 bce_weight=0.0 if cfg.loss == "dice" else 1.0)

    if cfg.loss == "dice":
        return DiceLoss()
    if cfg.loss == "ce":
        return DiceCELoss(dice_weight=0.0, ce_weight=1.0, name="ce_loss", ce_class_weights=cfg.ce_class_weights)
    return DiceCELoss(ce_class_weights=cfg.ce_class_weights)


def ce_class_weights_for(cfg: TrainConfig, plan) -> list[float] | None:
    """The cross-entropy class weights of the run: the config's, checked against the plan's
    classes, else automatic (:func:`medseg.losses.balanced_class_weights` of the classes' body
    shares with two or more classes; None, equal weights, for binary lesions and nested regions).

    Raises:
        InputError: weights given for nested regions, or not one per class.
    """
    spec = plan.class_spec
    where = "training configuration"
    if cfg.ce_class_weights is not None:
        if spec.regions:
            raise InputError(where, "ce_class_weights only with classes: nested regions are trained with a "
                             "binary cross-entropy per region", f"{len(cfg.ce_class_weights)} weights")
        if len(cfg.ce_class_weights) != plan.num_classes:
            raise InputError(where, f"ce_class_weights with {plan.num_classes} values ({', '.join(spec.output_names)})",
                             f"{len(cfg.ce_class_weights)} values {list(cfg.ce_class_weights)}")
        return [float(w) for w in cfg.ce_class_weights]
    fractions = _softmax_class_shares(plan)
    if fractions is None:
        return None
    from medseg.losses import balanced_class_weights

    return [round(w, 4) for w in balanced_class_weights(fractions)]


def output_bias_for(plan) -> list[float] | None:
    """The softmax heads' starting bias: the class priors of the training patients' body
    (:func:`medseg.nets.prior.prior_logits`) with two or more classes; None (zeros, as built)
    for binary lesions, nested regions and plans fitted before the class shares were recorded."""
    fractions = _softmax_class_shares(plan)
    if fractions is None:
        return None
    from medseg.nets.prior import prior_logits

    return prior_logits(fractions)


def _softmax_class_shares(plan) -> list[float] | None:
    """The classes' body shares where they set class weights and head priors: two or more
    classes under one softmax (None for binary lesions, nested regions and older plans)."""
    spec = plan.class_spec
    return None if spec.is_binary or spec.regions else plan.class_body_fractions()


def make_schedule(cfg: TrainConfig, learning_rate: float):
    """The per-step :class:`WarmupDecay` schedule; under a time budget (``max_time_s``, with
    ``schedule_over == "budget"``) it also follows the clock (:mod:`medseg.train.budget`)."""
    from medseg.train.callbacks import WarmupDecay

    return WarmupDecay(learning_rate, total_steps=cfg.epochs * cfg.steps_per_epoch, kind=cfg.schedule,
                       power=cfg.poly_power, warmup_steps=cfg.warmup_epochs * cfg.steps_per_epoch,
                       clock=cfg.max_time_s is not None and cfg.schedule_over == "budget")


def make_optimizer(cfg: TrainConfig, learning_rate: float, schedule=None):
    """Adam (AdamW with ``weight_decay``) driven by ``schedule`` (default :func:`make_schedule`)."""
    import keras

    schedule = schedule if schedule is not None else make_schedule(cfg, learning_rate)
    if cfg.weight_decay > 0:
        return keras.optimizers.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay)
    return keras.optimizers.Adam(learning_rate=schedule)


def compile_model(model, cfg: TrainConfig, learning_rate: float, schedule=None, regions: bool = False,
                  class_names=None) -> None:
    """Compile with one loss per trained output (the network's deep-supervision weights) and the
    Dice metrics on its final output (none for nested regions: their multi-hot targets are scored
    by the whole-volume validation, region by region)."""
    from medseg.losses.metrics import dice_metrics

    spec = network_spec(cfg)
    heads = spec.output_names
    # Two classes: foreground_dice, fg_fraction as ever; more: dice_<name> per class and mean_dice.
    metrics = [] if regions else dice_metrics(len(class_names) + 1 if class_names else 2, class_names)
    if len(heads) > 1:
        model.compile(
            optimizer=make_optimizer(cfg, learning_rate, schedule),
            loss={h: make_loss(cfg, regions) for h in heads},
            loss_weights=dict(zip(heads, spec.loss_weights)),
            metrics={spec.final_output: metrics},
            run_eagerly=cfg.run_eagerly,
        )
    else:
        model.compile(optimizer=make_optimizer(cfg, learning_rate, schedule), loss=make_loss(cfg, regions),
                      metrics=metrics, run_eagerly=cfg.run_eagerly)


def targets_for_heads(cfg: TrainConfig):
    """``tf.data`` map function giving every trained output its copy of the mask (None for a
    single-output network)."""
    heads = output_heads(cfg)
    if len(heads) == 1:
        return None

    def repeat(images, masks):
        return images, {h: masks for h in heads}

    return repeat


# --- validation ----------------------------------------------------------------------------------------
def make_validator(twin, plan, val_cases, cfg: TrainConfig, run_dir: Path, validation: str = HELD_OUT,
                   pipeline=None):
    """``evaluate(model) -> rows``: segment each validation volume whole with the inference
    :class:`~medseg.infer.predictor.Predictor` (on ``twin``, a float32 copy of the trained model
    outside the strategy) and score it in 3D on its own grid with :func:`medseg.eval.compute_metrics`.
    """
    from medseg.data.plan import load_pair
    from medseg.eval import compute_metrics
    from medseg.eval.metrics import dice
    from medseg.infer.bundle import Bundle
    from medseg.infer.postprocess import keep_largest_component
    from medseg.infer.predictor import Predictor

    bundle = Bundle(run_dir=run_dir, model=twin, plan=plan, head_level=None, divisor=int(plan.divisor),
                    input_channels=int(plan.context_slices), pipeline=pipeline, network=network_spec(cfg))
    predictor = Predictor(bundle, batch_size=max(8, cfg.batch_size))
    cases = list(val_cases)[: cfg.max_val_cases] if cfg.max_val_cases else list(val_cases)

    spec = predictor.classes

    def score(pred: np.ndarray, ref: np.ndarray, spacing) -> dict:
        metrics = compute_metrics(pred, ref, spacing)
        return {**{k: float(v) for k, v in metrics.items()},
                "pred_empty": float(not pred.any()), "ref_empty": float(not ref.any()),
                # for the post-processing choice (medseg.infer.postprocess.choose_largest_component)
                "dsc_largest_component": float(dice(keep_largest_component(pred) > 0, ref))}

    def evaluate(model) -> list[dict]:
        twin.set_weights(model.get_weights())
        rows = []
        for case in cases:
            # Read per validation, not cached: validation sets of CT volumes do not fit in memory.
            # load_pair applies the label map and brings the label onto the image's grid.
            image, label = load_pair(case)
            pred = np.asarray(predictor.segment(image, largest_component=False).array)
            if spec.is_binary:
                rows.append({"case_id": case.case_id, "validation": validation,
                             **score(pred > 0, np.asarray(label.array) > 0, image.spacing_mm)})
                continue
            ref = np.asarray(label.array)
            per_class = {name: score(spec.mask(pred, k), spec.mask(ref, k), image.spacing_mm)
                         for k, name in enumerate(spec.names)}
            rows.append(_class_row(case.case_id, validation, per_class))
        return rows

    return evaluate


def _class_row(case_id: str, validation: str, per_class: Mapping[str, dict]) -> dict:
    """One validation row of a multi-class model: the mean over classes (what selects the model)
    and each class's ``dsc_<name>``, ``hd95_mm_<name>``, ``dsc_largest_component_<name>``."""
    def mean(key: str) -> float:
        values = [m[key] for m in per_class.values() if np.isfinite(m[key])]
        return float(np.mean(values)) if values else float("nan")

    row = {"case_id": case_id, "validation": validation,
           **{k: mean(k) for k in ("dsc", "jaccard", "hd95_mm", "assd_mm", "nsd", "dsc_largest_component")},
           "pred_empty": float(all(m["pred_empty"] for m in per_class.values())),
           "ref_empty": float(all(m["ref_empty"] for m in per_class.values()))}
    for name, m in per_class.items():
        row.update({f"dsc_{name}": m["dsc"], f"hd95_mm_{name}": m["hd95_mm"],
                    f"dsc_largest_component_{name}": m["dsc_largest_component"]})
    return row


# --- the run ------------------------------------------------------------------------------------------
def train(config: TrainConfig | Mapping[str, Any], *, callbacks: Sequence[Any] = ()) -> RunResult:
    """Train a lesion segmenter (the configured network) end to end; see the module docstring for the steps.

    Args:
        config: a :class:`TrainConfig` or a mapping of its fields.
        callbacks: extra Keras callbacks, run after medseg's own each epoch (their logs include
            ``val_dsc_3d`` on validated epochs).

    Returns:
        :class:`RunResult` (the run folder holds the bundle, history, curves, checkpoints).

    Raises:
        DatasetError: the dataset check found fatal problems (all listed), or too few patients.
        InputError: bad configuration, input folders, or ``resume`` folder; a run folder that
            cannot be written or whose disk lacks room for the outputs (checked before training);
            a write that fails during training (a disk filled by another process: the last
            complete checkpoint stays usable for ``resume``).
    """
    from medseg.train import budget as budget_clock

    started_at = budget_clock.now()  # the budget counts from here: start-up is part of the run
    cfg = resolve_config(config)
    import keras

    run = _start_run(cfg, started_at)
    previous_policy = keras.config.dtype_policy()
    keras.utils.set_random_seed(cfg.seed)
    try:
        _settle_cases_and_plan(run)
        _build(run)
        _fit(run, callbacks)
    except BaseException:
        if run.created and run.chief and latest_checkpoint(run.run_dir) is None:
            # Nothing of the new run is worth keeping: leave no half-made run folder behind.
            shutil.rmtree(run.run_dir, ignore_errors=True)
        raise
    finally:
        keras.config.set_dtype_policy(previous_policy)
        run.strat.cleanup_writing_dir(run.write_dir, run.run_dir)
    return _result(run, budget_clock.now() - started_at)


@dataclasses.dataclass
class _Run:
    """What the phases of :func:`train` hand each other (one run, one process)."""

    cfg: TrainConfig
    started_at: float
    strat: Any
    strategy: Any
    strategy_name: str
    replicas: int
    chief: bool
    precision: str
    learning_rate: float
    verbose: int
    report: Any
    train_cases: list
    val_cases: list
    validation_kind: str
    run_dir: Path
    write_dir: Path
    created: bool
    saved_state: dict | None
    replanned: Any
    plan: Any = None
    pipeline: Any = None
    global_batch: int = 0
    twin: Any = None
    model: Any = None
    schedule: Any = None
    state: dict = dataclasses.field(default_factory=dict)
    validation: Any = None
    clock: Any = None


def _start_run(cfg: TrainConfig, started_at: float) -> _Run:
    """Strategy, dataset check and split, run folder: everything before the first file of the run."""
    import tensorflow as tf

    from medseg.train import strategy as strat

    # The strategy comes first: MultiWorkerMirroredStrategy must exist before other TF ops.
    strategy = strat.select_strategy(cfg.gpus, cfg.devices)
    chief = strat.is_chief(strategy)
    replicas = strat.num_replicas(strategy)
    verbose = cfg.verbose if chief else 0
    # The dataset check runs before anything is written: a refused dataset leaves no run folder.
    report, train_cases, val_cases, validation_kind = check_and_split(cfg)
    _print_check_warnings(report, verbose)
    check_resources(cfg)
    run_dir = Path(cfg.resume) if cfg.resume else new_run_dir(cfg)
    _check_run_dir_outside_data(run_dir, cfg)
    saved_state = _saved_state(run_dir) if cfg.resume else None
    run = _Run(cfg=cfg, started_at=started_at, strat=strat, strategy=strategy,
               strategy_name=("MultiWorkerMirroredStrategy" if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
                              else type(strategy).__name__.lstrip("_")),
               replicas=replicas, chief=chief, precision=strat.resolve_precision(cfg.precision, strategy),
               learning_rate=strat.scaled_learning_rate(cfg.lr, replicas), verbose=verbose, report=report,
               train_cases=train_cases, val_cases=val_cases, validation_kind=validation_kind, run_dir=run_dir,
               write_dir=strat.writing_dir(run_dir), created=not run_dir.exists(), saved_state=saved_state,
               replanned=_replan_budget(cfg, saved_state))
    # Before any file of the run: a read-only or full disk shows now (a 64 KiB probe).
    check_writable_folder(run.write_dir, what="a writable run folder")
    run.write_dir.mkdir(parents=True, exist_ok=True)
    if verbose:
        print(f"medseg-train: run folder {run_dir}", flush=True)
    return run


def _settle_cases_and_plan(run: _Run) -> None:
    """The split (a resumed run keeps its own), the plan (CPU-sized network), the pipeline."""
    import keras

    cfg = run.cfg
    if cfg.resume and (run.run_dir / SPLIT_FILE).is_file():
        split = json.loads((run.run_dir / SPLIT_FILE).read_text(encoding="utf-8"))
        by_id = {c.case_id: c for c in run.train_cases + run.val_cases}
        missing = sorted(set(split["train"] + split["val"]) - set(by_id))
        if missing:
            raise InputError(cfg.images, "every patient of the run being resumed", f"{', '.join(missing)} missing")
        run.train_cases = [by_id[i] for i in split["train"]]
        run.val_cases = [by_id[i] for i in split["val"]]
        run.validation_kind = split.get("validation", HELD_OUT)
    if run.chief:
        atomic_write_json(run.run_dir / "check.json", run.report.to_dict())
        atomic_write_json(run.run_dir / SPLIT_FILE, {"train": [c.case_id for c in run.train_cases],
                                                     "val": [c.case_id for c in run.val_cases], "seed": cfg.seed,
                                                     "folds": cfg.folds, "fold": cfg.fold,
                                                     "val_fraction": None if cfg.folds else cfg.val_fraction,
                                                     "validation": run.validation_kind})
    plan = _plan_for_run(cfg, run.train_cases, run.run_dir, run.chief)
    if _cpu_sizing_wanted(cfg, run.strategy):
        from medseg.train.sizing import choose_network

        sizing = choose_network(cfg, plan, precision=run.precision, verbose=run.verbose)
        cfg.filters, cfg.depth = list(sizing["chosen"]["filters"]), int(sizing["chosen"]["depth"])
        plan = plan.replace(fingerprint=dict(plan.fingerprint, cpu_sizing=sizing), divisor=network_spec(cfg).divisor)
        keras.utils.set_random_seed(cfg.seed)  # the probes drew random numbers
        if run.chief:
            plan.save(run.run_dir / PLAN_FILE)
    run.plan, run.pipeline = plan, build_pipeline(cfg, plan)
    cfg.ce_class_weights = ce_class_weights_for(cfg, plan)  # recorded in config.json: a resume reuses them
    cfg.run_dir = os.fspath(run.run_dir)
    run.global_batch = cfg.batch_size * run.replicas
    if run.verbose:
        print(f"medseg-train: {len(run.train_cases)} training / {len(run.val_cases)} validation patients"
              + (" (the training cases)" if run.validation_kind == ON_TRAINING else "")
              + f"; {run.strategy_name} with {run.replicas} replica(s), global batch {run.global_batch}, "
              f"peak lr {run.learning_rate:g} ({cfg.lr:g} x {run.replicas}), precision {run.precision}; "
              f"patch {tuple(plan.patch_size)}, {plan.context_slices} context slice(s); network {cfg.network} "
              f"(filters {' '.join(map(str, cfg.unet_filters))}, depth {cfg.depth})", flush=True)
        if cfg.ce_class_weights is not None and cfg.loss != "dice":
            print("medseg-train: cross-entropy class weights "
                  + ", ".join(f"{n} {w:g}" for n, w in zip(plan.class_spec.output_names, cfg.ce_class_weights)),
                  flush=True)
        if plan.keep_orientation:
            sides = (plan.fingerprint or {}).get("lateral_classes") or {}
            print("medseg-train: patches keep the orientation (no flips, no quarter turns)"
                  + (": " + ", ".join(f"{n} {side}" for n, side in sides.items()) if sides else "")
                  + "; --no-keep-orientation mirrors them", flush=True)
        if run.replanned is not None and run.replanned.message:
            print(f"medseg-train: {run.replanned.message}", flush=True)


def _build(run: _Run) -> None:
    """The trained model (in the strategy's scope), its float32 twin, the restored checkpoint."""
    import keras
    import tensorflow as tf

    from medseg.train.callbacks import new_state

    cfg = run.cfg
    # Twin: float32, outside the strategy, shares nothing with the trained model. Validation
    # and the bundle use it, so inference sees exactly what will be shipped.
    keras.config.set_dtype_policy("float32")
    run.twin = build_model(cfg, run.plan)
    keras.config.set_dtype_policy(run.precision)
    with run.strategy.scope():
        run.model = build_model(cfg, run.plan, sync_batch_norm=run.replicas > 1)
        bias = output_bias_for(run.plan)
        if bias is not None:  # a resumed run's checkpoint overwrites it below
            from medseg.nets.prior import set_output_bias

            set_output_bias(run.model, bias)
            if run.verbose:
                print("medseg-train: output heads start at the class priors (bias "
                      + ", ".join(f"{n} {b:.2f}" for n, b in zip(run.plan.class_spec.output_names, bias)) + ")",
                      flush=True)
        run.schedule = make_schedule(cfg, run.learning_rate)
        spec = run.plan.class_spec
        compile_model(run.model, cfg, run.learning_rate, run.schedule, regions=spec.regions,
                      class_names=None if spec.is_binary else spec.names)
    check_disk_space(run.write_dir, run.model)  # before the work: the outputs' size is known from here
    if isinstance(run.strategy, tf.distribute.MultiWorkerMirroredStrategy):
        _fix_multi_worker_build(run.model, run.strategy)
    run.state = new_state(cfg.seed)
    if cfg.resume:
        checkpoint = latest_checkpoint(run.run_dir)
        if checkpoint is not None:
            run.state = load_checkpoint(checkpoint, run.model)
            if run.verbose:
                print(f"medseg-train: resumed from {checkpoint} (epoch {run.state['epoch']}, optimizer step "
                      f"{int(run.model.optimizer.iterations)})", flush=True)


def _budget_clock(run: _Run):
    """The :class:`~medseg.train.budget.BudgetClock` of a run with ``max_time_s``, else None."""
    if run.replanned is None:
        return None
    from medseg.train.budget import BudgetClock, strategy_agree

    budget = (run.saved_state or {}).get("budget", {})
    return BudgetClock(run.cfg.max_time_s, started_at=run.started_at, remaining_s=run.replanned.remaining_s,
                       start_progress=run.replanned.start_progress, spent_s=float(budget.get("spent_s", 0.0)),
                       step_s=float(budget.get("step_s", 0.0) or 0.0), progress=run.schedule.clock_progress,
                       agree=strategy_agree(run.strategy))


def _bundle_saver(run: _Run, selection: str):
    """``save_best(model, epoch, logs)``: the twin gets the weights and is written as the bundle."""
    cfg = run.cfg

    def save_best(model_, epoch, logs):
        from medseg.infer.bundle import save_bundle

        run.twin.set_weights(model_.get_weights())
        rows = run.validation.last_rows if run.validation.last_epoch == epoch else []
        spec = run.plan.class_spec
        save_bundle(run.write_dir, run.twin, run.plan, pipeline=run.pipeline, network=network_spec(cfg),
                    classes=spec.output_names, extra={
            "epoch": epoch + 1, "val_dsc_3d": logs.get("val_dsc_3d"), "val_hd95_mm": logs.get("val_hd95_mm"),
            "train_cases": [c.case_id for c in run.train_cases], "val_cases": [c.case_id for c in run.val_cases],
            "validation": run.validation_kind,
            "selection": ("last model (validation on the training cases)" if selection == "last"
                          else "best mean 3D validation DSC on held-out cases"),
            "map_labels": cfg.map_labels,
            "postprocessing": _postprocessing(spec, rows, run.validation_kind),
        })

    return save_best


def _postprocessing(spec, rows: list[dict], validation: str) -> dict:
    """The largest-component choice made on validation: one for a binary model, one per class
    (``{"largest_component": {name: bool}, "classes": {name: details}}``) for several."""
    from medseg.infer.postprocess import choose_largest_component

    if spec.is_binary:
        return choose_largest_component(rows, validation=validation)
    details = {name: choose_largest_component(
        [{"dsc": r.get(f"dsc_{name}", float("nan")),
          "dsc_largest_component": r.get(f"dsc_largest_component_{name}", float("nan"))} for r in rows],
        validation=validation) for name in spec.names}
    return {"largest_component": {name: d["largest_component"] for name, d in details.items()}, "classes": details}


def _fit(run: _Run, extra_callbacks: Sequence[Any]) -> None:
    """Data, validation, callbacks, ``model.fit``; the bundle is written by the run keeper."""
    import keras

    from medseg.train.callbacks import RunKeeper, WarningsWriter, WholeVolumeValidation

    cfg, state = run.cfg, run.state
    start_epoch = int(state["epoch"])
    dataset = make_train_dataset(run.train_cases, run.plan, cfg, run.global_batch, start_epoch, pipeline=run.pipeline)
    run.clock = _budget_clock(run)
    run.validation = WholeVolumeValidation(
        make_validator(run.twin, run.plan, run.val_cases, cfg, run.run_dir, run.validation_kind, pipeline=run.pipeline),
        every=cfg.val_every, epochs=cfg.epochs, clock=run.clock)
    selection = "last" if run.validation_kind == ON_TRAINING else "best"
    save_best = _bundle_saver(run, selection)
    keeper = RunKeeper(run.write_dir, state, save_best, validation=run.validation, epochs=cfg.epochs,
                       patience=cfg.early_stopping, verbose=run.verbose, write_files=True, clock=run.clock,
                       selection=selection, schedule_end_lr=0.0)
    callbacks_ = [run.validation, keeper]
    if run.verbose == 1:
        # Keras' progress bar, placed so its end-of-epoch line shows the 3D validation DSC and
        # comes before RunKeeper's one-line summary.
        callbacks_.insert(1, keras.callbacks.ProgbarLogger())
    if run.clock is not None:
        callbacks_.insert(0, run.clock)  # before validation: its time_up makes the final validation
    # Region labels are bits (values up to 2**R - 1) until the batches turn them multi-hot.
    spec = run.plan.class_spec
    diagnostics = make_diagnostics(cfg, run.write_dir, dataset,
                                   num_classes=2 ** len(spec.names) if spec.regions else run.plan.num_classes,
                                   class_names=None if spec.is_binary or spec.regions else spec.names)
    callbacks_.insert(0, diagnostics)  # first: its reg_loss/data_loss reach the others
    previous_warnings = _read_warnings(run.run_dir) if cfg.resume else []
    if run.chief:
        callbacks_.append(WarningsWriter(lambda: write_warnings(diagnostics, run.run_dir, previous_warnings),
                                         run.run_dir))
    callbacks_ = callbacks_ + list(extra_callbacks)
    tensorboard = make_tensorboard(run.write_dir)
    if tensorboard is not None:
        callbacks_.append(tensorboard)
    state.pop("stopped_by_time", None)  # a new invocation has a new time budget
    if run.chief:
        # Saved once the network is decided and the checkpoint restored, so a resume rebuilds
        # the same network and a failed resume leaves the saved configuration as it was.
        cfg.save(run.run_dir / CONFIG_FILE)
    if start_epoch < cfg.epochs and not state.get("stopped_early"):
        run.model.fit(dataset, epochs=cfg.epochs, initial_epoch=start_epoch, steps_per_epoch=cfg.steps_per_epoch,
                      callbacks=callbacks_, verbose=_keras_verbose(run.verbose), shuffle=False)
    if run.chief:
        write_warnings(diagnostics, run.run_dir, previous_warnings)
    if run.chief and not (run.run_dir / "bundle.json").exists():
        # No finite validation DSC ever (e.g. validation patients without lesion and no false
        # positives): ship the last model rather than nothing.
        save_best(run.model, int(state["epoch"]) - 1, {})
    run.twin.set_weights(run.model.get_weights())  # RunResult.model: the final weights, float32


def _result(run: _Run, wall_s: float) -> RunResult:
    state, cfg = run.state, run.cfg
    best = float(state["best_dsc"]) if state["best_epoch"] else float("nan")
    return RunResult(
        run_dir=run.run_dir, best_dsc=best, best_epoch=int(state["best_epoch"]), epochs_completed=int(state["epoch"]),
        stopped_early=bool(state.get("stopped_early")), history=list(state["history"]), bundle_dir=run.run_dir,
        replicas=run.replicas, global_batch_size=run.global_batch, learning_rate=run.learning_rate,
        precision=run.precision, strategy=run.strategy_name, train_cases=[c.case_id for c in run.train_cases],
        val_cases=[c.case_id for c in run.val_cases], model=run.twin, validation=run.validation_kind,
        stop_reason=state.get("stop_reason"), steps=int(state.get("steps", 0)), final_lr=state.get("final_lr"),
        budget=state.get("budget"),
        final_validation_s=run.validation.last_duration_s if run.clock is not None else None,
        wall_s=wall_s, model_config={"network": cfg.network, "filters": cfg.unet_filters, "depth": cfg.depth},
    )


#: Rough bytes of training memory per patch pixel and first-level filter (UNet++ activations and
#: their gradients, float32): a 256x256 batch of 8 with 32 filters needs about 1.3 GB.
_TRAIN_BYTES_PER_PIXEL_FILTER = 80


def check_resources(cfg: TrainConfig) -> None:
    """Refuse, before anything is written, a patch whose training batch cannot fit in memory.

    Raises:
        InputError: the estimated memory of one training batch exceeds the physical memory.
    """
    if cfg.patch_size is None:
        return  # the plan's patch is at most 256 x 256
    h, w = (int(v) for v in cfg.patch_size)
    first = cfg.unet_filters[0] if cfg.filters is not None else 8
    need = float(h) * w * cfg.batch_size * first * _TRAIN_BYTES_PER_PIXEL_FILTER
    try:
        have = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not POSIX: no check
        return
    if need > have:
        raise InputError("--patch-size", f"a patch whose training batch fits in this machine's {have / 2**30:.0f} GiB "
                         f"of memory", f"{h} x {w} (batch {cfg.batch_size}, {first} filters: about "
                         f"{need / 2**30:.0f} GiB)", "choose a smaller --patch-size or --batch-size")


#: Bytes a run writes besides its weights (history, curves.png, JSON files, TensorBoard events,
#: HDF5 and zip headers), a generous round figure: a 3-epoch run of the smallest network (filters
#: 4 8, depth 1) writes 0.4 MB, nearly all of it the headers of its 2 checkpoints and model.keras.
RUN_FILES_MARGIN = 4 * 2**20


def disk_space_needed(model, existing: int = 0) -> int:
    """Bytes of disk a run of ``model`` needs at its peak: 3 checkpoints (the 2 kept and the one
    being written), each the weights plus Adam's 2 moments (3x the weights), 2 ``model.keras``
    (the new one is complete before the old one goes), plus :data:`RUN_FILES_MARGIN`.

    ``existing``: bytes of checkpoints and ``model.keras`` a resumed run already holds (counted
    as written; at least one more checkpoint and model still need room).
    """
    weights = sum(int(np.prod(v.shape)) * np.dtype(str(getattr(v.dtype, "name", v.dtype))).itemsize
                  for v in model.weights)
    checkpoint = 3 * weights
    full = 3 * checkpoint + 2 * weights + RUN_FILES_MARGIN
    return max(full - int(existing), checkpoint + weights + RUN_FILES_MARGIN)


def check_disk_space(run_dir: Path, model) -> None:
    """Refuse, before training, a run folder whose disk cannot hold the run's outputs
    (:func:`disk_space_needed`, measured with ``shutil.disk_usage``).

    Raises:
        InputError: naming the folder, the space needed and the space free.
    """
    run_dir = Path(run_dir)
    existing = sum(p.stat().st_size for p in (run_dir / "checkpoints").rglob("*") if p.is_file())
    if (run_dir / "model.keras").is_file():
        existing += (run_dir / "model.keras").stat().st_size
    need = disk_space_needed(model, existing)
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise InputError(run_dir, f"a run folder with room for the run's outputs: about {need / 1e6:.1f} MB "
                         "(2 checkpoints of weights + optimizer state, model.keras, history, curves)",
                         f"{free / 1e6:.1f} MB free on its disk", "free space, or pass another --run-dir")


def _check_run_dir_outside_data(run_dir: Path, cfg: TrainConfig) -> None:
    """Refuse a run folder equal to or inside a data folder (run files would land among the scans)."""
    run = Path(run_dir).resolve()
    for name, folder in (("--images", cfg.images), ("--labels", cfg.labels)):
        if folder is None:
            continue
        data = Path(folder).resolve()
        if run == data or data in run.parents:
            raise InputError(run_dir, f"a run folder outside the {name} folder {folder}", "a folder inside it",
                             "pass another --run-dir or --out")


def _print_check_warnings(report, verbose: int) -> None:
    """The dataset check's warnings on the terminal (not only in check.json)."""
    if not verbose:
        return
    warnings = [p for p in getattr(report, "problems", []) if getattr(p, "severity", "") != "fatal"]
    for problem in warnings[:10]:
        print(f"medseg-train: warning: {problem.case_id}: {problem.message}", flush=True)
    if len(warnings) > 10:
        print(f"medseg-train: warning: {len(warnings) - 10} more in check.json", flush=True)


def _saved_state(run_dir: Path) -> dict | None:
    """The training state of the newest checkpoint of ``run_dir`` (None without one)."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        return None
    try:
        return json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _replan_budget(cfg: TrainConfig, saved_state: dict | None):
    """The budget plan of this invocation (:func:`medseg.train.budget.replan`), None without a budget.

    Raises:
        InputError: a resumed run whose budget is already spent.
    """
    if cfg.max_time_s is None:
        return None
    from medseg.train.budget import replan

    saved = (saved_state or {}).get("budget")
    try:
        return replan(cfg.max_time_s, saved)
    except ValueError as exc:
        raise InputError(cfg.resume or cfg.run_dir, "a budget with time left to train", str(exc)) from exc


def _cpu_sizing_wanted(cfg: TrainConfig, strategy) -> bool:
    """CPU-aware network sizing: no GPU in the strategy, the network and batch left at defaults."""
    if not cfg.cpu_sizing or cfg.resume:
        return False
    defaults = TrainConfig()
    if (cfg.filters is not None or cfg.depth != defaults.depth or cfg.patch_size is not None
            or cfg.batch_size != defaults.batch_size or "patch_size" in cfg.plan):
        return False
    try:
        devices = [str(d).lower() for d in strategy.extended.worker_devices]
    except (AttributeError, RuntimeError):  # the default strategy has no device list: one CPU or GPU
        devices = []
    return not any("gpu" in d for d in devices) and not _gpus_visible()


def _gpus_visible() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_logical_devices("GPU"))


def _fix_multi_worker_build(model, strategy) -> None:
    """Let ``model.fit`` run under ``MultiWorkerMirroredStrategy`` (keras-team/keras#20585).

    Before the first epoch Keras 3 builds the model on one batch, which it gets by a ``MEAN``
    ``strategy.reduce`` of the whole ``(x, y)`` structure; the multi-worker cross-device reduce
    accepts single values only and fails. Building needs shapes and dtypes, not a mean, so this
    replacement takes this worker's first replica's batch instead. Nothing else changes.
    """
    import tensorflow as tf
    from keras import tree

    def maybe_symbolic_build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, it in iterator:
                batch = next(it)
                data_batch = tree.map_structure(
                    lambda v: strategy.experimental_local_results(v)[0]
                    if isinstance(v, tf.distribute.DistributedValues) else v,
                    batch,
                )
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    object.__setattr__(model, "_maybe_symbolic_build", maybe_symbolic_build)

    # Same bug, every step: the logs of the step are reduced with a multi-worker
    # ``reduce("MEAN", value, axis=0)``, which fails on scalars. The logs are metric results,
    # already identical on all replicas, so giving them a length-1 axis makes that mean exact.
    train_step = model.train_step

    def train_step_with_vector_logs(data):
        logs = train_step(data)
        return {k: tf.reshape(v, (1,)) for k, v in logs.items()}

    object.__setattr__(model, "train_step", train_step_with_vector_logs)


def make_tensorboard(write_dir: Path):
    """Keras' TensorBoard callback writing epoch scalars to ``write_dir/tensorboard`` (None, with a
    warning, when the ``tensorboard`` package is missing: training must not fail for a log)."""
    import importlib.util

    import keras

    if importlib.util.find_spec("tensorboard") is None:
        log.warning("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
        return None
    return keras.callbacks.TensorBoard(log_dir=os.fspath(Path(write_dir) / "tensorboard"), write_graph=False,
                                       update_freq="epoch", profile_batch=0)


def _read_warnings(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "warnings.json"
    try:
        return list(json.loads(path.read_text(encoding="utf-8")).get("warnings", []))
    except (OSError, ValueError, AttributeError):
        return []


def _keras_verbose(verbose: int) -> int | str:
    # 2 (a log without a terminal): RunKeeper's plain line per epoch is the only output.
    return {0: 0, 1: "auto", 2: 0}.get(int(verbose), "auto")


def class_spec_for(cfg: TrainConfig):
    """The run's named classes: ``labels_map``, else a ``dataset.json`` (next to the images or one
    folder up, as MSD/nnU-Net lay them out) naming two or more; None: binary lesion segmentation.

    Raises:
        InputError: malformed ``labels_map`` or ``dataset.json`` labels.
    """
    from medseg.io.classes import ClassSpec
    from medseg.io.dataset import find_dataset_json

    if cfg.labels_map:
        return ClassSpec.parse(cfg.labels_map)
    path = find_dataset_json(cfg.images) if cfg.images is not None else None
    return ClassSpec.from_dataset_json(path) if path is not None else None


def _plan_for_run(cfg: TrainConfig, train_cases, run_dir: Path, chief: bool):
    """The run's plan: fitted on the training patients (or read back on resume), with overrides."""
    from medseg.data.plan import Plan, make_plan

    path = run_dir / PLAN_FILE
    if cfg.resume and path.is_file():
        return Plan.load(path)
    overrides = dict(cfg.plan)
    overrides.setdefault("divisor", network_spec(cfg).divisor)
    spec = class_spec_for(cfg)
    if spec is not None:
        overrides.setdefault("classes", spec.to_dict())
        overrides.setdefault("num_classes", spec.num_classes)
    if cfg.patch_size is not None:
        overrides["patch_size"] = tuple(cfg.patch_size)
    try:
        plan = make_plan(train_cases, overrides=overrides, seed=cfg.seed)
    except ValueError as exc:
        raise InputError(cfg.images, "training cases a preprocessing plan can be fitted to", str(exc)) from exc
    if chief:
        plan.save(path)
    return plan


# --- diagnostics ------------------------------------------------------------------------------------------
def make_diagnostics(cfg: TrainConfig, write_dir: Path, dataset=None, num_classes: int = 2, class_names=None):
    """The training-diagnostics callback (:class:`medseg.train.diagnostics.Diagnostics`).

    With the training ``dataset`` it checks the labels of the first batch and the augmentation
    alignment self-check (image and mask warped together must stay in register).
    """
    from medseg.train.diagnostics import Diagnostics

    sample_batch, alignment = None, None
    maker = getattr(dataset, "batch_maker", None)
    if maker is not None:
        sample_batch = maker.batch(0)
        if maker.augmenter is not None:
            from medseg.transforms.augment import check_alignment

            alignment = check_alignment(maker.augmenter, n=16, size=32, channels=maker.context_slices,
                                        seed=cfg.seed)
    # verbose=0: RunKeeper prints the epoch's summary line (with the same loss split).
    return Diagnostics(sample_batch=sample_batch, alignment_dice=alignment, verbose=0,
                       flat_epochs=flat_dice_window(cfg.steps_per_epoch), num_classes=num_classes,
                       class_names=class_names)


#: The flat-Dice rule looks at least this many optimizer steps back: in the first few hundred
#: steps of a healthy run the cross-entropy part falls while the hard Dice is still near 0.
FLAT_DICE_MIN_STEPS = 1000


def flat_dice_window(steps_per_epoch: int) -> int:
    """Epochs of the flat-Dice window: 4, or more when epochs are short (>= 1000 steps in all)."""
    return max(4, math.ceil(FLAT_DICE_MIN_STEPS / max(1, int(steps_per_epoch))))


def write_warnings(diagnostics, run_dir: Path, previous: list[dict] | None = None) -> Path:
    """``warnings.json``: the diagnostics' warnings (those of the run before a resume kept)."""
    seen = list(previous or [])
    # A warning is one kind at one epoch (for one class, with several classes).
    keys = {(w.get("kind"), w.get("epoch"), w.get("class")) for w in seen}
    seen += [w for w in getattr(diagnostics, "warnings", [])
             if (w.get("kind"), w.get("epoch"), w.get("class")) not in keys]
    return atomic_write_json(Path(run_dir) / "warnings.json", {"warnings": seen})


# --- data ----------------------------------------------------------------------------------------------
def build_pipeline(cfg: TrainConfig, plan):
    """The model's pipeline: the steps ``plan`` implies plus the config's ``transforms``.

    Raises:
        InputError: naming the config's ``transforms`` entry that cannot be built (unknown name,
            module not importable, bad arguments or position).
    """
    from medseg.transforms.pipeline import Pipeline

    try:
        return Pipeline.from_plan(plan, extra=cfg.transforms)
    except (TypeError, ValueError) as exc:
        raise InputError("the training configuration's transforms",
                         "entries naming registered transforms (docs/pipeline.md)", str(exc)) from exc


def make_train_dataset(train_cases, plan, cfg: TrainConfig, global_batch: int, start_epoch: int, cache_dir=None,
                       pipeline=None):
    """The endless lesion-aware patch stream (:func:`medseg.data.pipeline.make_dataset`).

    Batch ``i`` depends only on ``(seed, i)``, so a run resumed at ``start_epoch`` starts at batch
    ``start_epoch * steps_per_epoch`` and sees exactly what the uninterrupted run would have seen.
    Each element is one global batch; Keras splits it over the replicas. Under multi-worker
    training every worker builds the same stream and keeps its own share (DATA sharding).
    """
    import tensorflow as tf

    from medseg.data.pipeline import make_dataset

    ds = make_dataset(train_cases, plan, batch_size=global_batch, seed=cfg.seed,
                      start_batch=start_epoch * cfg.steps_per_epoch, num_parallel_calls=cfg.workers,
                      cache_dir=cache_dir, pipeline=pipeline if pipeline is not None else build_pipeline(cfg, plan))
    maker = ds.batch_maker
    spec = plan.class_spec
    if spec.regions:
        from medseg.losses.regions import multi_hot_from_bits

        n_regions = len(spec.names)
        ds = ds.map(lambda images, masks: (images, multi_hot_from_bits(masks, n_regions)))
    heads = targets_for_heads(cfg)
    if heads is not None:
        ds = ds.map(heads)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    ds = ds.with_options(options)
    ds.batch_maker = maker
    return ds
