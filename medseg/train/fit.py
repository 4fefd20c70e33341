"""The fit itself: the training data, the callbacks that validate, keep, checkpoint, report and
cancel, ``model.fit``, and what a run leaves when it ends (the bundle, ``warnings.json``).

Callbacks, in order (they share one ``logs`` dict per epoch): diagnostics (``reg_loss``,
``data_loss``), the budget clock, whole-volume validation (``val_dsc_3d``), Keras' progress bar
(verbose 1), :class:`~medseg.train.callbacks.RunKeeper` (bundle, checkpoint, history, summary
line), :class:`~medseg.train.progress.RunEvents` (step and epoch events, cancellation),
``warnings.json``, the caller's callbacks, TensorBoard.
"""

from __future__ import annotations

from typing import Any, Sequence

from medseg.events import RunCancelled
from medseg.train import cases, monitoring, rundir
from medseg.train.bundling import BundleWriter
from medseg.train.checkpoint import latest_checkpoint
from medseg.train.progress import RunEvents, reporting_validator
from medseg.train.validation import make_validator


def discard(event) -> None:
    """An events sink that keeps nothing (a library run without a subscriber prints nothing)."""


def fit(run: Any, extra_callbacks: Sequence[Any] = ()) -> None:
    """Data, validation, callbacks, ``model.fit``; the bundle is written by the run keeper.

    Raises:
        RunCancelled: the run's cancel token stopped it (checkpoint and cancelled bundle written).
    """
    import keras

    from medseg.train.callbacks import RunKeeper, WarningsWriter, WholeVolumeValidation

    cfg, state = run.cfg, run.state
    # The chief reports; the other workers of a multi-worker run keep quiet.
    events = run.events if run.events is not None and run.chief else discard
    was_cancelled = bool(state.pop("cancelled", False))
    start_epoch = int(state["epoch"])
    dataset = cases.make_train_dataset(run.train_cases, run.plan, cfg, run.global_batch, start_epoch,
                                       pipeline=run.pipeline)
    run.clock = _budget_clock(run)
    progress = RunEvents(events, run.cancel, epochs=cfg.epochs,
                         steps_per_epoch=cfg.steps_per_epoch, clock=run.clock)
    evaluate = make_validator(run.twin, run.plan, run.val_cases, cfg, run.run_dir, run.validation_kind,
                              pipeline=run.pipeline)
    run.validation = WholeVolumeValidation(
        reporting_validator(evaluate, run.plan.class_spec, run.validation_kind, events, lambda: progress.epoch),
        every=cfg.val_every, epochs=cfg.epochs, clock=run.clock, cancel=run.cancel)
    on_training = run.validation_kind == cases.ON_TRAINING
    writer = BundleWriter(run, "last" if on_training else cfg.selection, events)
    keeper = RunKeeper(run.write_dir, state, writer, validation=run.validation, epochs=cfg.epochs,
                       patience=None if on_training else cfg.early_stopping, verbose=run.verbose, write_files=True, clock=run.clock,
                       selection=writer.selection, schedule_end_lr=0.0, events=events,
                       extra_state=lambda: {"cancelled": True} if progress.cancelled_epoch is not None else {},
                       dice_title=dice_title(run.plan.class_spec), training_cases=on_training)
    callbacks = [run.validation, keeper, progress]
    if run.verbose == 1:
        # Keras' progress bar, placed so its end-of-epoch line shows the 3D validation DSC and
        # comes before RunKeeper's one-line summary.
        callbacks.insert(1, keras.callbacks.ProgbarLogger())
    if run.clock is not None:
        callbacks.insert(0, run.clock)  # before validation: its time_up makes the final validation
    spec = run.plan.class_spec
    diagnostics = monitoring.make_diagnostics(cfg, run.write_dir, dataset,
                                              num_classes=spec.kind.diagnostic_classes(spec),
                                              class_names=spec.kind.diagnostic_names(spec),
                                              foreground_name=spec.names[0])  # a one-class run's name
    callbacks.insert(0, diagnostics)  # first: its reg_loss/data_loss reach the others
    previous_warnings = rundir.read_warnings(run.run_dir) if cfg.resume else []
    if run.chief:
        callbacks.append(WarningsWriter(lambda: monitoring.write_warnings(diagnostics, run.run_dir, previous_warnings),
                                        run.run_dir))
    callbacks += list(extra_callbacks)
    tensorboard = monitoring.make_tensorboard(run.write_dir)
    if tensorboard is not None:
        callbacks.append(tensorboard)
    state.pop("stopped_by_time", None)  # a new invocation has a new time budget
    if run.chief:
        # Saved once the network is decided and the checkpoint restored, so a resume rebuilds
        # the same network and a failed resume leaves the saved configuration as it was.
        cfg.save(run.run_dir / rundir.CONFIG_FILE)
    bundles_before = writer.writes
    if start_epoch < cfg.epochs and not state.get("stopped_early"):
        run.model.fit(dataset, epochs=cfg.epochs, initial_epoch=start_epoch, steps_per_epoch=cfg.steps_per_epoch,
                      callbacks=callbacks, verbose=monitoring.keras_verbose(run.verbose), shuffle=False)
    if run.chief:
        monitoring.write_warnings(diagnostics, run.run_dir, previous_warnings)
    _finish(run, writer, progress, replace_cancelled=was_cancelled and writer.writes == bundles_before)


def _finish(run: Any, writer: BundleWriter, progress: RunEvents, *, replace_cancelled: bool) -> None:
    """The bundle a run ends with; a cancelled run's bundle and :class:`RunCancelled`."""
    state = run.state
    last_epoch = int(state["epoch"]) - 1
    if progress.cancelled_epoch is not None:
        state["stop_reason"] = "cancelled"
        if run.chief:
            writer.cancelled(run.model, last_epoch)
        run.twin.set_weights(run.model.get_weights())
        checkpoint = latest_checkpoint(run.run_dir)
        raise RunCancelled(f"{run.cancel.reason or 'cancelled'} (training stopped in epoch {last_epoch + 1}; "
                           f"continue with --resume {run.run_dir})", None if checkpoint is None else str(checkpoint))
    if run.chief and (replace_cancelled or not (run.run_dir / "bundle.json").exists()):
        # No finite validation DSC ever (e.g. validation patients without lesion and no false
        # positives), or the bundle of a cancel not replaced since the resume: ship the last
        # model rather than nothing (or a cancelled one).
        writer.selection = "last"
        writer(run.model, last_epoch, {})
    run.twin.set_weights(run.model.get_weights())  # RunResult.model: the final weights, float32


def dice_title(spec) -> str:
    """The Dice panel's title in ``curves.png``: a one-class run names its class."""
    if len(spec.names) == 1:
        return f"Dice of the {spec.names[0]} class"
    return "Dice of the foreground classes"


def _budget_clock(run: Any):
    """The :class:`~medseg.train.budget.BudgetClock` of a run with ``max_time_s``, else None."""
    if run.replanned is None:
        return None
    from medseg.train.budget import BudgetClock, strategy_agree

    budget = (run.saved_state or {}).get("budget", {})
    return BudgetClock(run.cfg.max_time_s, started_at=run.started_at, remaining_s=run.replanned.remaining_s,
                       start_progress=run.replanned.start_progress, spent_s=float(budget.get("spent_s", 0.0)),
                       step_s=float(budget.get("step_s", 0.0) or 0.0), progress=run.schedule.clock_progress,
                       agree=strategy_agree(run.strategy))


def run_result(run: Any, wall_s: float) -> dict[str, Any]:
    """The fields of :class:`~medseg.train.run.RunResult` for a finished run."""
    state, cfg = run.state, run.cfg
    best = float(state["best_dsc"]) if state["best_epoch"] else float("nan")
    return dict(
        run_dir=run.run_dir, best_dsc=best, best_epoch=int(state["best_epoch"]), epochs_completed=int(state["epoch"]),
        stopped_early=bool(state.get("stopped_early")), history=list(state["history"]), bundle_dir=run.run_dir,
        replicas=run.replicas, global_batch_size=run.global_batch, learning_rate=run.learning_rate,
        precision=run.precision, strategy=run.strategy_name, train_cases=[c.case_id for c in run.train_cases],
        val_cases=[c.case_id for c in run.val_cases], model=run.twin, validation=run.validation_kind,
        stop_reason=state.get("stop_reason"), steps=int(state.get("steps", 0)), final_lr=state.get("final_lr"),
        budget=state.get("budget"),
        final_validation_s=run.validation.last_duration_s if run.clock is not None else None,
        wall_s=wall_s, model_config={"network": cfg.network, "filters": cfg.unet_filters, "depth": cfg.depth},
        config=cfg,
    )
