"""``train(config) -> RunResult``: the whole training run behind ``medseg-train``.

Steps, in order (each rule in its own module):

1. Resolve the configuration (:mod:`medseg.train.resolve`: defaults < config file < flags;
   ``resume`` reads the run's own) into new values; the caller's is never edited.
2. Choose the ``tf.distribute`` strategy (:mod:`medseg.train.strategy`; first, before any other
   TensorFlow work, as ``MultiWorkerMirroredStrategy`` requires) and the precision policy.
3. Check the dataset and split patients (:mod:`medseg.train.cases`), check the run folder and
   the machine's resources (:mod:`medseg.train.rundir`).
4. Fit the preprocessing plan on the training patients; on a CPU, size the network
   (:mod:`medseg.train.sizing`); the configuration is then final (``RunStarted``).
5. Build the network, its losses and metrics (:mod:`medseg.train.assembly`) inside
   ``strategy.scope()``, its layers in the run's precision and seeded from ``cfg.seed``; restore
   the last checkpoint when resuming.
6. ``model.fit`` (:mod:`medseg.train.fit`) with whole-volume 3D validation
   (:mod:`medseg.train.validation`), the bundle (:mod:`medseg.train.bundling`), checkpoints,
   history, curves, diagnostics, TensorBoard, early stopping, events and cancellation.

Nothing process-wide is set: no global seeds, no global dtype policy. Events: ``RunStarted``,
``StepProgress`` per step, ``ValidationResult``, ``CheckpointWritten`` (bundle, checkpoint),
``EpochEnd`` per epoch, ``Message`` for each line ``medseg-train`` prints, then ``Finished``,
``Cancelled`` or ``Failed``. A cancel stops at the next step, writes the checkpoint and a bundle
marked ``"cancelled"``, emits ``Cancelled`` and raises :class:`~medseg.events.RunCancelled`
(``--resume`` continues from that checkpoint at the next epoch).
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from medseg.events import CancelToken, Cancelled, EventSink, Failed, Finished, Message, RunCancelled, RunStarted, emit
from medseg.train import assembly, budget, cases, resolve, rundir
from medseg.train import strategy as strat
from medseg.train.checkpoint import latest_checkpoint, load_checkpoint
from medseg.train.config import RunConfig, TrainConfig
from medseg.train.fit import discard, fit, run_result


@dataclass
class RunResult:
    """What a training run produced.

    Attributes:
        run_dir: the run folder.
        best_dsc: mean per-patient 3D validation DSC of the model kept (``selection`` "best": the
            best; "last": the last validated; NaN when never validated).
        best_epoch: epoch (1-based) of the model kept, 0 when none.
        epochs_completed: epochs trained in total (including before a resume).
        stopped_early: early stopping ended the run.
        history: one dict per epoch (as ``history.csv``).
        bundle_dir: folder holding ``model.keras`` + ``bundle.json`` (the run folder).
        replicas: replicas in sync (devices x workers).
        global_batch_size: patches per optimizer step over all replicas.
        learning_rate: peak learning rate after linear scaling with the replicas.
        precision: Keras dtype policy of the trained layers.
        strategy: class name of the distribution strategy.
        train_cases, val_cases: patient ids of the split.
        model: the model with the final weights (float32, outside any strategy); the bundle
            holds the one ``selection`` keeps (the same weights with "last").
        validation: ``"held-out cases"`` or ``"training cases"`` (:func:`medseg.train.cases.check_and_split`).
        stop_reason: ``"epochs"``, ``"budget"`` or ``"early_stopping"``.
        steps: optimizer steps run in all (including before a resume).
        final_lr: learning rate at the last step.
        budget: the budget state (``max_time_s``, ``spent_s``, ``progress``, ``step_s``), or None.
        final_validation_s: duration of the last validation, under a budget.
        wall_s: seconds this invocation took.
        model_config: ``{"network", "filters", "depth"}`` of the network trained (after CPU sizing).
        config: the resolved, frozen configuration of the run (as ``config.json``).
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
    validation: str = cases.HELD_OUT
    stop_reason: str | None = None
    steps: int = 0
    final_lr: float | None = None
    budget: dict | None = None
    final_validation_s: float | None = None
    wall_s: float = 0.0
    model_config: dict = field(default_factory=dict)
    config: Any = None


@dataclasses.dataclass
class _Run:
    """What the phases of :func:`train` hand each other (one run, one process)."""

    cfg: Any
    started_at: float
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
    events: EventSink | None = None
    cancel: CancelToken | None = None
    plan: Any = None
    pipeline: Any = None
    global_batch: int = 0
    twin: Any = None
    model: Any = None
    schedule: Any = None
    state: dict = dataclasses.field(default_factory=dict)
    validation: Any = None
    clock: Any = None

    def say(self, text: str) -> None:
        """A line ``medseg-train`` prints (verbose runs, the chief only), as a ``Message``."""
        if self.verbose:
            emit(self.events, Message(text))


def train(config: TrainConfig | RunConfig | Mapping[str, Any], *, events: EventSink | None = None,
          cancel: CancelToken | None = None, callbacks: Sequence[Any] = ()) -> RunResult:
    """Train a segmenter (the configured network) end to end; see the module docstring for the steps.

    Args:
        config: a :class:`TrainConfig`, a :class:`RunConfig` or a mapping of their fields; never
            modified (the resolved configuration is ``RunResult.config``).
        events: a :mod:`medseg.events` sink (``medseg.events.Printer`` prints what
            ``medseg-train`` prints); None: nothing is printed.
        cancel: a :class:`~medseg.events.CancelToken`; once cancelled, the run stops at the next
            step, checkpoints, writes a bundle marked ``"cancelled"`` and raises ``RunCancelled``.
        callbacks: extra Keras callbacks, run after medseg's own each epoch (their logs include
            ``val_dsc_3d`` on validated epochs).

    Returns:
        :class:`RunResult` (the run folder holds the bundle, history, curves, checkpoints).

    Raises:
        RunCancelled: ``cancel`` was cancelled (its ``checkpoint`` is the one to resume from).
        DatasetError: the dataset check found fatal problems (all listed), or too few patients.
        InputError: bad configuration, input folders, or ``resume`` folder; a run folder that
            cannot be written or whose disk lacks room for the outputs (checked before training);
            a write that fails during training (a disk filled by another process: the last
            complete checkpoint stays usable for ``resume``).
    """
    started_at = budget.now()  # the budget counts from here: start-up is part of the run
    caller, events = events, events if events is not None else discard
    try:
        run = start_run(resolve.resolve_config(config), started_at, events, cancel)
        try:
            settle_cases_and_plan(run)
            emit(events, RunStarted(task="train", settings=run.cfg.to_dict()))
            build(run)
            fit(run, callbacks)
        except BaseException:
            if run.created and run.chief and latest_checkpoint(run.run_dir) is None:
                # Nothing of the new run is worth keeping: leave no half-made run folder behind.
                shutil.rmtree(run.run_dir, ignore_errors=True)
            raise
        finally:
            strat.cleanup_writing_dir(run.write_dir, run.run_dir)
    except RunCancelled as exc:
        emit(caller, Cancelled(task="train", reason=str(exc), checkpoint=exc.checkpoint))
        raise
    except Exception as exc:
        emit(caller, Failed(task="train", error=str(exc) or type(exc).__name__))
        raise
    result = RunResult(**run_result(run, budget.now() - started_at))
    emit(events, Finished(task="train", summary={"best_dsc": result.best_dsc, "best_epoch": result.best_epoch,
                                                 "epochs": result.epochs_completed, "steps": result.steps,
                                                 "stop_reason": result.stop_reason, "run_dir": str(result.run_dir)}))
    return result


def start_run(cfg: TrainConfig, started_at: float, events=None, cancel=None) -> _Run:
    """Strategy, dataset check and split, run folder: everything before the first file of the run."""
    import tensorflow as tf

    # The strategy comes first: MultiWorkerMirroredStrategy must exist before other TF ops.
    strategy = strat.select_strategy(cfg.gpus, cfg.devices)
    chief = strat.is_chief(strategy)
    replicas = strat.num_replicas(strategy)
    verbose = cfg.verbose if chief else 0
    # The dataset check runs before anything is written: a refused dataset leaves no run folder.
    report, train_cases, val_cases, validation_kind = cases.check_and_split(cfg, events)
    _report_check_warnings(report, verbose, events)
    rundir.check_resources(cfg)
    run_dir = Path(cfg.resume) if cfg.resume else rundir.new_run_dir(cfg)
    rundir.check_run_dir_outside_data(run_dir, cfg)
    saved_state = rundir.saved_state(run_dir) if cfg.resume else None
    name = ("MultiWorkerMirroredStrategy" if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            else type(strategy).__name__.lstrip("_"))
    run = _Run(cfg=cfg, started_at=started_at, strategy=strategy, strategy_name=name, replicas=replicas, chief=chief,
               precision=strat.resolve_precision(cfg.precision, strategy),
               learning_rate=strat.scaled_learning_rate(cfg.lr, replicas), verbose=verbose, report=report,
               train_cases=train_cases, val_cases=val_cases, validation_kind=validation_kind, run_dir=run_dir,
               write_dir=strat.writing_dir(run_dir), created=not run_dir.exists(), saved_state=saved_state,
               replanned=resolve.replan_budget(cfg, saved_state), events=events, cancel=cancel)
    rundir.prepare_write_dir(run.write_dir)
    run.say(f"medseg-train: run folder {run_dir}")
    return run


def _report_check_warnings(report, verbose: int, events) -> None:
    """The dataset check's warnings on the terminal (not only in check.json)."""
    if not verbose:
        return
    warnings = [p for p in getattr(report, "problems", []) if getattr(p, "severity", "") != "fatal"]
    for problem in warnings[:10]:
        emit(events, Message(f"medseg-train: warning: {problem.case_id}: {problem.message}"))
    if len(warnings) > 10:
        emit(events, Message(f"medseg-train: warning: {len(warnings) - 10} more in check.json"))


def settle_cases_and_plan(run: _Run) -> None:
    """The split (a resumed run keeps its own), the plan (CPU-sized network), the pipeline, and
    the final, frozen configuration (``run.cfg`` becomes a :class:`RunConfig`)."""
    cfg = run.cfg
    run.train_cases, run.val_cases, run.validation_kind = cases.saved_split(
        cfg, run.run_dir, run.train_cases, run.val_cases, run.validation_kind)
    if run.chief:
        cases.write_split(cfg, run.run_dir, run.report, run.train_cases, run.val_cases, run.validation_kind)
    plan = cases.plan_for_run(cfg, run.train_cases, run.run_dir, run.chief)
    if resolve.cpu_sizing_wanted(cfg, run.strategy):
        from medseg.train.sizing import choose_network

        sizing = choose_network(cfg, plan, precision=run.precision, verbose=run.verbose, events=run.events)
        plan, sizing = _coarsened(run, cfg, plan, sizing)
        cfg = resolve.sized(cfg, sizing)
        plan = plan.replace(fingerprint=dict(plan.fingerprint, cpu_sizing=sizing),
                            divisor=assembly.network_spec(cfg).divisor)
        if run.chief:
            plan.save(run.run_dir / rundir.PLAN_FILE)
    run.cfg = cfg = resolve.settled(cfg, ce_class_weights=assembly.ce_class_weights_for(cfg, plan),
                                    run_dir=run.run_dir)
    run.plan, run.pipeline = plan, cases.build_pipeline(cfg, plan)
    run.global_batch = cfg.batch_size * run.replicas
    _report_settings(run)


def _coarsened(run: _Run, cfg, plan, sizing: dict):
    """Under a time budget too short for the plan's pixels even with the narrowest network,
    the plan at coarser pixels (same field of view) and the network sized again for it
    (:func:`medseg.train.sizing.coarsening`); a spacing the user gave is kept."""
    from medseg.train.sizing import choose_network, coarsening, coarser_plan

    kept = "target_spacing_mm" in cfg.plan or cfg.max_time_s is None or cfg.init_from
    factor = None if kept else coarsening(plan, sizing)
    if factor is None:
        return plan, sizing
    coarse = coarser_plan(plan, factor)
    was = ", ".join(f"{v:.2f}" for v in plan.target_spacing_mm)
    now = ", ".join(f"{v:.2f}" for v in coarse.target_spacing_mm)
    run.say(f"medseg-train: the narrowest network takes {sizing['probes'][0]['step_s']:.2f} s a step at "
            f"{was} mm, {'x'.join(map(str, plan.patch_size))} patches: too slow for this budget "
            f"({sizing['target_step_s']:.2f} s a step); training at {now} mm pixels instead, "
            f"{'x'.join(map(str, coarse.patch_size))} patches of the same field of view "
            f"(keep the data's spacing with plan target_spacing_mm, or --no-cpu-sizing)")
    resized = choose_network(cfg, coarse, precision=run.precision, verbose=run.verbose, events=run.events)
    resized["coarsened"] = {"factor": round(factor, 3), "from_spacing_mm": list(plan.target_spacing_mm),
                            "from_patch_size": list(plan.patch_size), "first_sizing": sizing}
    return coarse, resized


def _report_settings(run: _Run) -> None:
    cfg, plan = run.cfg, run.plan
    run.say(f"medseg-train: {len(run.train_cases)} training / {len(run.val_cases)} validation patients"
            + (" (the training cases)" if run.validation_kind == cases.ON_TRAINING else "")
            + f"; {run.strategy_name} with {run.replicas} replica(s), global batch {run.global_batch}, "
            f"peak lr {run.learning_rate:g} ({cfg.lr:g} x {run.replicas}), precision {run.precision}; "
            f"patch {tuple(plan.patch_size)}, {plan.context_slices} context slice(s); network {cfg.network} "
            f"(filters {' '.join(map(str, cfg.unet_filters))}, depth {cfg.depth})")
    if cfg.ce_class_weights is not None and cfg.loss != "dice":
        run.say("medseg-train: cross-entropy class weights "
                + ", ".join(f"{n} {w:g}" for n, w in zip(plan.class_spec.output_names, cfg.ce_class_weights)))
    if plan.ignore_label is not None:
        run.say(f"medseg-train: label value {plan.ignore_label} = unlabelled (--ignore-label): no loss, no metric "
                "and no patch centre there; validation scores the labelled voxels only")
    if plan.keep_orientation:
        sides = (plan.fingerprint or {}).get("lateral_classes") or {}
        run.say("medseg-train: patches keep the orientation (no flips, no quarter turns)"
                + (": " + ", ".join(f"{n} {side}" for n, side in sides.items()) if sides else "")
                + "; --no-keep-orientation mirrors them")
    if run.replanned is not None and run.replanned.message:
        run.say(f"medseg-train: {run.replanned.message}")


def build(run: _Run) -> None:
    """The trained model (in the strategy's scope, its layers in the run's precision), its float32
    twin, the restored checkpoint."""
    from medseg.nets.blocks import layer_seeds
    from medseg.train.callbacks import new_state

    cfg = run.cfg
    # Twin: float32, outside the strategy, shares nothing with the trained model. Validation
    # and the bundle use it, so inference sees exactly what will be shipped.
    # One seed stream for both, twin first: the trained model starts from exactly the weights it
    # had when medseg seeded Python's global random (figures unchanged), without touching it.
    seeds = layer_seeds(cfg.seed)
    run.twin = assembly.build_model(cfg, run.plan, dtype="float32", seeds=seeds)
    with run.strategy.scope():
        run.model = assembly.build_model(cfg, run.plan, sync_batch_norm=run.replicas > 1, dtype=run.precision,
                                         seeds=seeds)
        bias = assembly.output_bias_for(run.plan)
        if bias is not None:  # a resumed run's checkpoint overwrites it below
            from medseg.nets.prior import set_output_bias

            set_output_bias(run.model, bias)
            run.say("medseg-train: output heads start at the class priors (bias "
                    + ", ".join(f"{n} {b:.2f}" for n, b in zip(run.plan.class_spec.output_names, bias)) + ")")
        run.schedule = assembly.make_schedule(cfg, run.learning_rate)
        assembly.compile_model(run.model, cfg, run.learning_rate, run.schedule, classes=run.plan.class_spec,
                               precision=run.precision)
    rundir.check_disk_space(run.write_dir, run.model)  # before the work: the outputs' size is known from here
    if strat.needs_multi_worker_build_fix(run.strategy):
        strat.fix_multi_worker_build(run.model, run.strategy)
    run.state = new_state(cfg.seed)
    if cfg.init_from and not cfg.resume:  # fine-tuning: the parent's weights (a resume has its checkpoint)
        from medseg.train.parent import load_parent_weights

        load_parent_weights(run.model, cfg)
        run.say(f"medseg-train: fine-tuning {cfg.init_from}: its weights, network, classes and pipeline; "
                f"peak lr {run.learning_rate:g}")
    if cfg.resume:
        checkpoint = latest_checkpoint(run.run_dir)
        if checkpoint is not None:
            run.state = load_checkpoint(checkpoint, run.model)
            run.say(f"medseg-train: resumed from {checkpoint} (epoch {run.state['epoch']}, optimizer step "
                    f"{int(run.model.optimizer.iterations)})")
