"""Learning-rate schedule and the callbacks that validate, checkpoint and record a run.

Order inside ``model.fit(callbacks=[...])`` matters (callbacks share one ``logs`` dict per
epoch): :class:`WholeVolumeValidation` adds ``val_dsc_3d``/``val_hd95_mm``, then
:class:`RunKeeper` adds ``data_loss``/``reg_loss``, saves the best bundle, the checkpoint, the
history and the curves, and decides early stopping; TensorBoard comes last and logs all of it.
"""

from __future__ import annotations

import errno
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import keras
import numpy as np

from medseg.errors import InputError
from medseg.events import CheckpointWritten, Message, emit
from medseg.losses.regularization import regularization_loss
from medseg.train.checkpoint import CHECKPOINTS, atomic_write_json, latest_checkpoint, save_checkpoint
from medseg.train.curves import plot_curves, write_history_csv
from medseg.train.schedule import WarmupDecay  # noqa: F401  (its home until this module was split)

log = logging.getLogger(__name__)

MONITOR = "val_dsc_3d"


@keras.saving.register_keras_serializable(package="medseg")
class WholeVolumeValidation(keras.callbacks.Callback):
    """Every ``every`` epochs (and after the last), score whole validation volumes in 3D.

    ``evaluate(model)`` predicts each held-out volume slice by slice with the inference
    :class:`medseg.infer.predictor.Predictor`, restores it to the original grid and returns one
    dict per patient with at least ``case_id``, ``dsc`` and ``hd95_mm`` from
    :func:`medseg.eval.compute_metrics`. The callback puts the means into the epoch logs:

    - ``val_dsc_3d``: mean per-patient 3D Dice (patients whose reference and prediction are
      both empty, DSC NaN, are left out);
    - ``val_hd95_mm``: mean HD95 over the patients where it is finite (an empty prediction
      of a lesion has an infinite HD95; ``val_hd95_inf`` counts them).

    Args:
        evaluate: callable ``model -> list[dict]`` (see above).
        every: validate when ``(epoch + 1) % every == 0``.
        epochs: total epochs of the run; the last one is always validated.
        max_time_s: the run's wall-clock budget; the epoch that spends it is validated too.
        clock: a :class:`medseg.train.budget.BudgetClock` (placed before this callback) whose
            ``time_up`` decides the last epoch instead of ``max_time_s``.
        cancel: a :class:`medseg.events.CancelToken`; a cancelled run is not validated.

    Attributes:
        last_duration_s: seconds the last validation took.
    """

    def __init__(self, evaluate: Callable[[keras.Model], list[dict]], every: int = 1, epochs: int | None = None,
                 max_time_s: float | None = None, clock: Any = None, cancel: Any = None):
        super().__init__()
        self.evaluate = evaluate
        self.cancel = cancel
        self.every = int(every)
        self.epochs = epochs
        self.max_time_s = max_time_s
        self.clock = clock
        self.last_duration_s = 0.0
        self.last_rows: list[dict] = []
        self.last_epoch: int | None = None
        self.time_up = False
        self._t_start = time.perf_counter()

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._t_start = time.perf_counter()
        self.time_up = False

    def due(self, epoch: int) -> bool:
        """True when validation runs at the end of (0-based) ``epoch``: every ``every`` epochs,
        after the last epoch, and after the epoch that spends the wall-clock budget."""
        return ((epoch + 1) % self.every == 0 or (self.epochs is not None and epoch + 1 >= self.epochs)
                or self.time_up)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.clock is not None:
            self.time_up = bool(self.clock.time_up)
        elif self.max_time_s is not None and time.perf_counter() - self._t_start >= self.max_time_s:
            # Decided here, before validating, so the run's last epoch is always validated;
            # RunKeeper stops on this same decision.
            self.time_up = True
        if logs is None or not self.due(epoch) or (self.cancel is not None and self.cancel.cancelled):
            return
        t0 = time.perf_counter()
        rows = self.evaluate(self.model)
        self.last_duration_s = time.perf_counter() - t0
        self.last_rows = [dict(r, epoch=epoch + 1) for r in rows]
        self.last_epoch = epoch
        logs.update(summarize_validation(rows))

    def get_config(self) -> dict:
        return {"every": self.every, "epochs": self.epochs}


def summarize_validation(rows: Sequence[dict]) -> dict[str, float]:
    """Means of per-patient validation rows: ``val_dsc_3d``, ``val_hd95_mm``, ``val_hd95_inf``, and
    ``val_dsc_<class>`` per class for a multi-class model (its ``val_dsc_3d`` is the class mean)."""
    dsc = np.array([float(r.get("dsc", np.nan)) for r in rows], dtype=float)
    hd95 = np.array([float(r.get("hd95_mm", np.nan)) for r in rows], dtype=float)
    finite_hd = hd95[np.isfinite(hd95)]
    with np.errstate(all="ignore"):
        mean_dsc = float(np.nanmean(dsc)) if np.any(np.isfinite(dsc)) else float("nan")
    pred_empty = np.array([float(r.get("pred_empty", 0.0)) > 0 for r in rows], dtype=bool)
    ref_empty = np.array([float(r.get("ref_empty", 0.0)) > 0 for r in rows], dtype=bool)
    summary = {
        "val_dsc_3d": mean_dsc,
        "val_hd95_mm": float(finite_hd.mean()) if finite_hd.size else float("nan"),
        "val_hd95_inf": float(np.sum(np.isinf(hd95))),
        # Why a distance is infinite: a missed structure, or a patient without any to find.
        "val_empty_pred": float(np.sum(pred_empty & ~ref_empty)),
        "val_empty_ref": float(np.sum(ref_empty)),
    }
    # Several classes: each class's mean DSC too (rows of a multi-class model carry dsc_<name>).
    per_class = sorted({k for r in rows for k in r if k.startswith("dsc_")
                       and not k.startswith(("dsc_largest", "dsc_without_small"))})
    for key in per_class:
        values = np.array([float(r.get(key, np.nan)) for r in rows], dtype=float)
        summary[f"val_{key}"] = float(np.nanmean(values)) if np.any(np.isfinite(values)) else float("nan")
    return summary


def current_learning_rate(model: keras.Model) -> float:
    """The optimizer's learning rate at its current step (schedules evaluated)."""
    lr = model.optimizer.learning_rate
    return float(keras.ops.convert_to_numpy(lr))


@keras.saving.register_keras_serializable(package="medseg")
class RunKeeper(keras.callbacks.Callback):
    """Record each epoch, keep the best model, checkpoint atomically and stop early.

    At the end of every epoch, in this order: adds ``lr``, ``data_loss`` and ``reg_loss`` to the
    logs (``data_loss = loss - reg_loss``; ``reg_loss`` is the L2 penalty of the weights at the
    end of the epoch); when the epoch was validated and ``val_dsc_3d`` beats the best so far, calls
    ``save_best(model, epoch, logs)`` (the bundle); updates the early-stopping counter; writes the
    checkpoint (weights + optimizer + this state), ``history.csv``, ``validation.csv`` rows,
    ``curves.png`` and prints one summary line. A write that fails (a disk filled meanwhile) ends
    the run with one :class:`~medseg.errors.InputError` naming the file and the last complete
    checkpoint, which stays usable for ``--resume``.

    Args:
        run_dir: run folder (checkpoints, history, curves).
        state: training state to continue (from a checkpoint) or a fresh one from :func:`new_state`.
        save_best: callable ``(model, epoch, logs) -> None`` that writes the best bundle.
        validation: the :class:`WholeVolumeValidation` callback (its per-patient rows are kept).
        epochs: total epochs (for the summary line).
        patience: stop after this many validations without improvement (None: never).
        dice_key: log key of the training Dice (None: found automatically).
        extra_state: callable returning more JSON-serialisable state for the checkpoint.
        verbose: print the summary line when > 0.
        write_files: False on non-chief workers that must still take part in saving.
        max_time_s: stop after the epoch that ends past this many seconds since training began.
        clock: a :class:`medseg.train.budget.BudgetClock`; its ``time_up`` stops the run (instead
            of ``max_time_s``), its state goes into the checkpoint and the summary line shows the
            time left.
        selection: ``"best"`` keeps the model with the best validation DSC; ``"last"`` keeps
            the last validated model (the default: the schedule anneals to the end of the run;
            and the only choice when the validation cases are training cases); early stopping
            (``patience``) counts validations without a better DSC either way.
        schedule_end_lr: the learning-rate schedule's end value (recorded in ``state.json``).
        events: a :mod:`medseg.events` sink: the summary line becomes a ``Message`` and each
            checkpoint a ``CheckpointWritten`` (None: the summary line is printed).
        dice_title: title of the Dice panel of ``curves.png``.
        training_cases: the validation cases are the training cases (default: ``selection == "last"``,
            as before held-out runs could keep the last model).

    The state records ``steps`` (optimizer steps so far), ``stop_reason`` (``"epochs"``,
    ``"budget"`` or ``"early_stopping"``), ``final_lr`` (learning rate at the last step) and
    ``schedule_end_lr``; each history row has ``steps`` and, under a budget, ``time_left_s``.
    """

    def __init__(self, run_dir: str | Path, state: dict[str, Any], save_best: Callable[[keras.Model, int, dict], None],
                 validation: WholeVolumeValidation | None = None, epochs: int | None = None,
                 patience: int | None = None, dice_key: str | None = None,
                 extra_state: Callable[[], dict] | None = None, verbose: int = 1, write_files: bool = True,
                 max_time_s: float | None = None, clock: Any = None, selection: str = "best",
                 schedule_end_lr: float | None = None, events: Any = None,
                 dice_title: str = "Dice of the lesion class", training_cases: bool | None = None):
        super().__init__()
        self.events = events
        self.dice_title = dice_title
        self.run_dir = Path(run_dir)
        self.state = state
        self.save_best = save_best
        self.validation = validation
        self.epochs = epochs
        self.patience = patience
        self.dice_key = dice_key
        self.extra_state = extra_state
        self.verbose = int(verbose)
        self.write_files = write_files
        self.max_time_s = max_time_s
        self.clock = clock
        if selection not in ("best", "last"):
            raise ValueError(f"selection must be 'best' or 'last', found {selection!r}")
        self.selection = selection
        # Validation on the training cases (named so in the summary line and the curves).
        self.training_cases = selection == "last" if training_cases is None else bool(training_cases)
        self.schedule_end_lr = schedule_end_lr
        self._t0 = self._t_start = time.perf_counter()

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._t_start = time.perf_counter()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs if logs is not None else {}
        state = self.state
        row = self._epoch_row(epoch, logs)
        value = logs.get(MONITOR)
        validated = value is not None
        improved = self._keep_model(epoch, logs, value) if validated else False
        if validated and self.validation is not None:
            state["validation_rows"].extend(self.validation.last_rows)
        row["time_s"] = time.perf_counter() - self._t0
        self._decide_stop(epoch, row)
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None:
            row["steps"] = int(keras.ops.convert_to_numpy(optimizer.iterations))
            state["steps"] = row["steps"]
        state["final_lr"] = row.get("lr")
        if self.schedule_end_lr is not None:
            state["schedule_end_lr"] = float(self.schedule_end_lr)
        state["history"].append(row)
        state["epoch"] = epoch + 1
        if self.extra_state is not None:
            state.update(self.extra_state())
        checkpoint = self._write_outputs(epoch, validated)
        emit(self.events, CheckpointWritten(epoch=epoch + 1, path=str(checkpoint), what="checkpoint"))
        if self.verbose > 0:
            line = self.summary_line(epoch, row, validated, improved)
            if self.events is None:
                print(line, flush=True)
            else:
                emit(self.events, Message(line))

    def _epoch_row(self, epoch: int, logs: dict) -> dict[str, Any]:
        """Add ``reg_loss``, ``data_loss`` and ``lr`` to ``logs``; the history row of its scalars
        (``dice``: the training Dice under a fixed name)."""
        reg = float(logs["reg_loss"]) if "reg_loss" in logs else regularization_loss(self.model)
        logs.setdefault("reg_loss", reg)
        if "loss" in logs:
            logs.setdefault("data_loss", float(logs["loss"]) - reg)
        logs.setdefault("lr", current_learning_rate(self.model))
        dice_key = self.dice_key or find_dice_key(logs)
        row: dict[str, Any] = {"epoch": epoch + 1}
        for key, value in logs.items():
            if np.ndim(value) == 0:
                try:
                    row[key] = float(value)
                except (TypeError, ValueError):
                    continue
        if dice_key and dice_key in row:
            row["dice"] = row[dice_key]
        return row

    def _keep_model(self, epoch: int, logs: dict, value) -> bool:
        """After a validation scoring ``value``: save the model when it is kept, count the epochs
        without improvement (early stopping). Returns whether the best score improved."""
        state = self.state
        if self.selection == "last":
            # The model kept is the last one, whatever its score (the schedule anneals to the end;
            # on training cases a "best" would be chosen on training data). Validation stays the
            # curve and, on held-out cases, early stopping: ``peak_dsc`` is the best seen.
            state["best_dsc"] = float(value) if math.isfinite(float(value)) else float("nan")
            state["best_epoch"] = epoch + 1
            self._write(self.run_dir / "model.keras", epoch, self.save_best, self.model, epoch, logs)
            return self._count_wait(epoch, value)
        if math.isfinite(float(value)) and float(value) > state["best_dsc"]:
            state["best_dsc"] = float(value)
            state["best_epoch"] = epoch + 1
            state["wait"] = 0
            self._write(self.run_dir / "model.keras", epoch, self.save_best, self.model, epoch, logs)
            return True
        state["wait"] += 1
        self._stop_if_patient()
        return False

    def _count_wait(self, epoch: int, value) -> bool:
        """Selection "last": the best validation seen (``peak_dsc``/``peak_epoch``) and the
        validations since (early stopping). Returns whether the peak improved."""
        state = self.state
        if math.isfinite(float(value)) and float(value) > state.get("peak_dsc", -1.0):
            state["peak_dsc"], state["peak_epoch"], state["wait"] = float(value), epoch + 1, 0
            return True
        state["wait"] += 1
        self._stop_if_patient()
        return False

    def _stop_if_patient(self) -> None:
        state = self.state
        if self.patience is not None and state["wait"] >= self.patience:
            self.model.stop_training = True
            state["stopped_early"] = True
            state["stop_reason"] = "early_stopping"

    def _decide_stop(self, epoch: int, row: dict) -> None:
        """Stop when the time budget is spent; record why the run ends (``stop_reason``)."""
        state = self.state
        if self.clock is not None:
            time_up = bool(self.clock.time_up)
            row["time_left_s"] = self.clock.time_left_s()
            state["budget"] = self.clock.state()
        elif self.validation is not None and self.validation.max_time_s is not None:
            time_up = self.validation.time_up
        else:
            time_up = self.max_time_s is not None and time.perf_counter() - self._t_start >= self.max_time_s
        if time_up:
            # Wall-clock budget spent: this epoch is complete (checkpointed afterwards), stop here.
            self.model.stop_training = True
            state["stopped_by_time"] = True
            state["stop_reason"] = "budget"
        elif self.epochs is not None and epoch + 1 >= self.epochs and not state.get("stopped_early"):
            state["stop_reason"] = "epochs"

    def _write_outputs(self, epoch: int, validated: bool) -> Path:
        """The checkpoint, then (chief only) history, validation rows, state.json and curves;
        returns the checkpoint's folder."""
        state = self.state
        checkpoint = self._write(self.run_dir / CHECKPOINTS, epoch, save_checkpoint, self.run_dir, self.model, state)
        if not self.write_files:
            return checkpoint
        run = self.run_dir
        self._write(run / "history.csv", epoch, write_history_csv, state["history"], run / "history.csv")
        if state["validation_rows"]:
            self._write(run / "validation.csv", epoch, write_history_csv, state["validation_rows"],
                        run / "validation.csv")
        self._write(run / "state.json", epoch, atomic_write_json, run / "state.json",
                    {k: v for k, v in state.items() if k not in ("history", "validation_rows")})
        last = self.model.stop_training or (self.epochs is not None and epoch + 1 >= self.epochs)
        try:
            # Drawing takes a few hundred ms: only when the validation Dice moved or at the end.
            if validated or last or not (run / "curves.png").exists():
                self._write(run / "curves.png", epoch, plot_curves, state["history"], run / "curves.png",
                            validation="training cases" if self.training_cases else "whole volumes",
                            title=self.dice_title)
        except (ValueError, RuntimeError) as exc:  # a figure problem must never end a run
            if isinstance(exc, InputError):  # a full disk does
                raise
            log.warning("could not draw curves.png: %s", exc)
        return checkpoint

    def _write(self, path: Path, epoch: int, write: Callable[..., Any], *args, **kwargs) -> Any:
        """``write(*args, **kwargs)``, one of the run's outputs; an ``OSError`` (a full disk) ends
        the run as one :class:`InputError` naming ``path`` and the checkpoint to resume from."""
        try:
            return write(*args, **kwargs)
        except OSError as exc:
            raise write_failed(exc, path, self.run_dir, epoch) from exc

    def summary_line(self, epoch: int, row: dict, validated: bool, improved: bool) -> str:
        """One line per epoch: losses, train Dice, 3D validation DSC, best so far, lr, time."""
        total = f"/{self.epochs}" if self.epochs else ""
        parts = [f"epoch {epoch + 1}{total}"]
        if "loss" in row:
            parts.append(f"loss {row['loss']:.4f} (data {row.get('data_loss', float('nan')):.4f} "
                         f"+ reg {row.get('reg_loss', 0.0):.4f})")
        if "dice" in row:
            parts.append(f"train Dice {row['dice']:.3f}")
        if validated:
            hd = row.get("val_hd95_mm", float("nan"))
            on = " (training cases)" if self.training_cases else ""
            parts.append(f"val{on} 3D DSC {row.get(MONITOR, float('nan')):.3f}" + (" *best*" if improved and not self.training_cases else ""))
            n_inf = int(row.get("val_hd95_inf", 0) or 0)
            why = _empty_text(row, n_inf)
            if np.isfinite(hd):
                parts.append(f"HD95 {hd:.1f} mm" + (f" ({why}: inf)" if n_inf else ""))
            elif n_inf:  # every validation patient's distance is infinite
                parts.append(f"HD95 inf ({why})")
        else:
            parts.append("val 3D DSC -")
        if self.state["best_epoch"] and self.selection == "best":
            parts.append(f"best {self.state['best_dsc']:.3f} @ {self.state['best_epoch']}")
        elif self.state.get("peak_epoch") and not self.training_cases:  # "last": the kept model is this one
            parts.append(f"best {self.state['peak_dsc']:.3f} @ {self.state['peak_epoch']} (keeping the last)")
        parts.append(f"lr {row.get('lr', float('nan')):.2e}")
        parts.append(f"{row['time_s']:.0f} s")
        if "time_left_s" in row:
            parts.append(f"{row['time_left_s']:.0f} s left")
        return "  ".join(parts)

    def get_config(self) -> dict:
        return {"run_dir": str(self.run_dir), "epochs": self.epochs, "patience": self.patience}


def write_failed(exc: OSError, path: Path, run_dir: Path, epoch: int) -> InputError:
    """The one-line error of a failed write of a run's output during epoch ``epoch`` (0-based):
    the file (``exc.filename`` unless it is a hidden temporary file, else ``path``), what went
    wrong, and the last complete checkpoint that ``--resume`` continues from."""
    named = Path(exc.filename) if exc.filename and not Path(exc.filename).name.startswith(".") else Path(path)
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        expected, found = "room on its disk for the run's outputs", "a full disk (no space left on the device)"
    else:
        expected, found = "a writable output of the run", (exc.strerror or str(exc) or type(exc).__name__)
    checkpoint = latest_checkpoint(run_dir)
    kept = (f"checkpoint {checkpoint.name} is complete: free space, then continue with --resume {run_dir}"
            if checkpoint is not None else "no checkpoint was complete yet")
    return InputError(named, expected, found, f"training stopped in epoch {epoch + 1}; {kept}")


def _empty_text(row: dict, n_inf: int) -> str:
    """What made ``n_inf`` HD95 values infinite: empty predictions and/or empty references."""
    pred, ref = int(row.get("val_empty_pred", 0) or 0), int(row.get("val_empty_ref", 0) or 0)
    if pred + ref == 0:  # rows without the counts (older callers)
        return f"{n_inf} empty"
    parts = [f"{n} empty {what}{'s' if n > 1 else ''}" for n, what in ((pred, "prediction"), (ref, "reference"))
             if n]
    return ", ".join(parts)


class WarningsWriter(keras.callbacks.Callback):
    """Calls ``write()`` at the end of every epoch (``warnings.json`` survives a kill -9); with
    ``run_dir``, a failed write ends the run as :class:`RunKeeper`'s do (:func:`write_failed`)."""

    def __init__(self, write: Callable[[], Any], run_dir: str | Path | None = None):
        super().__init__()
        self.write = write
        self.run_dir = None if run_dir is None else Path(run_dir)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        try:
            self.write()
        except OSError as exc:
            if self.run_dir is None:
                raise
            raise write_failed(exc, self.run_dir / "warnings.json", self.run_dir, epoch) from exc


def new_state(seed: int) -> dict[str, Any]:
    """A fresh training state (saved in every checkpoint)."""
    return {
        "epoch": 0,
        "best_dsc": -1.0,
        "best_epoch": 0,
        "wait": 0,
        "stopped_early": False,
        "seed": int(seed),
        "history": [],
        "validation_rows": [],
    }


def find_dice_key(logs: dict) -> str | None:
    """The training-Dice key of Keras' logs: the deepest head's foreground Dice if present."""
    candidates = [k for k in logs if "dice" in k.lower() and not k.startswith("val_") and "loss" not in k]
    if not candidates:
        return None
    # With deep supervision Keras prefixes metrics by output name: head_1_..head_4_; take the last head.
    return sorted(candidates)[-1]
