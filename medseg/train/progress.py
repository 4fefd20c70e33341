"""Progress events and cancellation of a run: the Keras callback that turns ``model.fit``'s steps
and epochs into :mod:`medseg.events` and stops at the next step once the caller's
:class:`~medseg.events.CancelToken` is cancelled."""

from __future__ import annotations

import math
import time
from typing import Any

import keras
import numpy as np

from medseg.events import EpochEnd, Message, StepProgress, ValidationResult, emit
from medseg.train.callbacks import summarize_validation
from medseg.train.validation import per_class_means


class RunEvents(keras.callbacks.Callback):
    """Emits ``StepProgress`` after every step and ``EpochEnd`` after every epoch; checks ``cancel``.

    Place it after :class:`~medseg.train.callbacks.RunKeeper` so the epoch's logs carry
    ``data_loss``, ``reg_loss`` and ``lr``. ``time_left_s`` is the budget clock's when the run has
    one, else the mean step time times the steps left; ``cancelled_epoch`` is the (0-based) epoch
    a cancel stopped, None while not cancelled.
    """

    def __init__(self, events=None, cancel=None, *, epochs: int, steps_per_epoch: int, clock: Any = None):
        super().__init__()
        self.events = events
        self.cancel = cancel
        self.epochs = int(epochs)
        self.steps_per_epoch = int(steps_per_epoch)
        self.clock = clock
        self.cancelled_epoch: int | None = None
        self.epoch = 0
        self._t_train = self._t_epoch = time.perf_counter()
        self._steps_done = 0

    def on_train_begin(self, logs=None):
        self._t_train = time.perf_counter()
        self._steps_done = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = int(epoch)
        self._t_epoch = time.perf_counter()

    def time_left_s(self) -> float | None:
        if self.clock is not None:
            return float(self.clock.time_left_s())
        if not self._steps_done:
            return None
        steps_left = (self.epochs - self.epoch) * self.steps_per_epoch - self._step_in_epoch
        return max(0.0, steps_left) * (time.perf_counter() - self._t_train) / self._steps_done

    def on_train_batch_end(self, batch, logs=None):
        self._steps_done += 1
        self._step_in_epoch = int(batch) + 1
        emit(self.events, StepProgress(epoch=self.epoch + 1, step=int(batch) + 1, steps=self.steps_per_epoch,
                                       elapsed_s=time.perf_counter() - self._t_epoch, time_left_s=self.time_left_s()))
        if self.cancel is not None and self.cancel.cancelled:
            self.cancelled_epoch = self.epoch
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        self._step_in_epoch = self.steps_per_epoch
        scalars = {k: float(v) for k, v in (logs or {}).items() if np.ndim(v) == 0 and _number(v)}
        emit(self.events, EpochEnd(epoch=int(epoch) + 1, epochs=self.epochs, logs=scalars,
                                   duration_s=time.perf_counter() - self._t_epoch, time_left_s=self.time_left_s()))

    _step_in_epoch = 0


def _number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def reporting_validator(evaluate, spec, validation: str, events, epoch_of):
    """``evaluate`` that also emits a ``ValidationResult`` (per class means, the mean DSC) for
    the epoch ``epoch_of()`` (0-based) after scoring, and a warning ``Message`` (on stderr) for each
    validation row carrying a ``"warning"`` (an empty prediction of a class every training case
    holds, :func:`medseg.train.validation.empty_prediction_text`)."""
    if events is None:
        return evaluate

    def evaluate_and_report(model):
        rows = evaluate(model)
        mean = summarize_validation(rows).get("val_dsc_3d", math.nan)
        epoch = int(epoch_of()) + 1
        emit(events, ValidationResult(epoch=epoch, per_class=per_class_means(spec, rows),
                                      mean_dsc=float(mean), validation=validation))
        for row in rows:
            if row.get("warning"):
                emit(events, Message(f"medseg-train: warning: epoch {epoch} validation: {row['warning']}",
                                     level="warning", stream="stderr"))
        return rows

    return evaluate_and_report
