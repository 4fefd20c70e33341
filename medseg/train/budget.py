"""Training under a wall-clock budget: the schedule follows the clock, the clock is kept.

With ``--max-time-s S`` the run is planned in seconds, not epochs (Li, Yumer and Ramanan,
"Budgeted training", ICLR 2020: a schedule that reaches its end exactly at the budget beats a
truncated one):

- the budget ``S`` counts from the start of ``medseg-train`` (dataset check, plan, cache and
  model building included) to the last optimizer step; one final whole-volume validation may
  follow, and its duration is reported apart;
- :class:`BudgetClock` measures every optimizer step, keeps the median of the recent ones
  (the first, which traces the graph, excluded), and before each step sets the schedule's
  position to the fraction of the training time that will have passed at the end of that
  step; the step that would end past the deadline is not started, so a run ends within about
  half a step of ``S``;
- the schedule (:class:`medseg.train.callbacks.WarmupDecay` with ``clock=True``) decays over
  that fraction (or over ``step / (epochs * steps_per_epoch)``, whichever is further: an epoch
  limit reached first still ends the decay);
- the clock's position (``spent_s``, ``progress``) is saved in every checkpoint, so
  ``--resume`` continues the schedule where it stopped; a resumed run spreads the remaining part
  of the schedule over the remaining seconds of its (possibly new) budget
  (:func:`replan`).

Under ``MultiWorkerMirroredStrategy`` every decision (position, stop) is taken on the largest
elapsed time of all workers (``agree``), so the replicas step with the same learning rate and
stop at the same step.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import keras
import numpy as np

#: Steps whose durations make the step-time estimate (median: robust to a slow batch).
STEP_WINDOW = 20
#: Stop when less than this fraction of a step is left (0.5: the expected overshoot is zero).
STOP_MARGIN_STEPS = 0.5

def now() -> float:
    """The budget's clock (monotonic seconds); one function, so tests can replace it."""
    return time.monotonic()



@dataclass
class Replan:
    """How a resumed run continues the budget schedule (see :func:`replan`).

    Attributes:
        remaining_s: seconds this invocation may train.
        start_progress: the schedule's position when it starts (0 = peak, 1 = end value).
        message: one line for the user saying what was decided, or "" when nothing changed.
    """

    remaining_s: float
    start_progress: float
    message: str = ""


def replan(max_time_s: float, saved: dict[str, Any] | None) -> Replan:
    """The plan of a (resumed) budgeted run from the budget state saved in its checkpoint.

    - New run (``saved`` None): the whole budget, from the schedule's start.
    - Resume with the same budget: the seconds not yet spent, from the saved position.
    - Resume with a new budget: its seconds not yet spent, from the saved position, so the
      rest of the decay is spread over them (the message says so).
    - The saved schedule had reached its end (a completed budget) and the new budget is
      larger: a warm restart (position 0) over the extra seconds, since continuing at the end
      value would not move the weights.

    Raises:
        ValueError: the new budget is already spent (the message gives the seconds spent).
    """
    if not saved:
        return Replan(float(max_time_s), 0.0)
    spent = float(saved.get("spent_s", 0.0))
    progress = float(np.clip(saved.get("progress", 0.0), 0.0, 1.0))
    old = saved.get("max_time_s")
    remaining = float(max_time_s) - spent
    if remaining <= 0:
        raise ValueError(f"the run has already trained {spent:.0f} s of a {float(max_time_s):.0f} s budget; "
                         f"give a larger --max-time-s to train on")
    if progress >= 1.0:
        return Replan(remaining, 0.0, f"budget {_s(old)} -> {_s(max_time_s)}: the schedule had reached its end after "
                                      f"{spent:.0f} s; the extra {remaining:.0f} s run it again from the peak "
                                      f"learning rate (a warm restart)")
    if old is not None and abs(float(old) - float(max_time_s)) > 1e-9:
        return Replan(remaining, progress, f"budget {_s(old)} -> {_s(max_time_s)}: {spent:.0f} s spent, the schedule "
                                           f"continues from {100 * progress:.0f}% of its course and reaches its end "
                                           f"value in the remaining {remaining:.0f} s")
    return Replan(remaining, progress, f"budget {_s(max_time_s)}: {spent:.0f} s spent, the schedule continues from "
                                       f"{100 * progress:.0f}% of its course over the remaining {remaining:.0f} s")


def _s(value) -> str:
    return "none" if value is None else f"{float(value):.0f} s"


class BudgetClock(keras.callbacks.Callback):
    """Keeps a wall-clock budget step by step and drives the schedule's position.

    Args:
        max_time_s: the run's budget in seconds (over all invocations of a resumed run).
        started_at: ``clock()`` value when this invocation started (``medseg-train``'s start),
            so start-up work counts against the budget.
        remaining_s: seconds this invocation may use (``max_time_s`` minus what earlier
            invocations spent; see :func:`replan`).
        start_progress: schedule position at the first step of this invocation.
        spent_s: seconds spent by earlier invocations (kept in the saved state).
        step_s: step time measured by an earlier invocation: the estimate until this one has
            measured its own (so a resumed schedule continues without a lag).
        progress: the schedule's ``clock_progress`` variable (None: stop rule only).
        clock: monotonic seconds (default :func:`now`, looked up at each call).
        agree: maps this worker's elapsed seconds to the value all workers agree on (the max
            under multi-worker training; identity otherwise).

    Attributes:
        time_up: the budget is spent (set before the epoch-end callbacks that read it).
        step_times: recent step durations in seconds.
        steps: optimizer steps run by this invocation.
        stop_at_s: elapsed seconds (since ``started_at``) when the last step ended.
        overhead_s: duration of the last epoch-end work (validation, checkpoint).
    """

    def __init__(self, max_time_s: float, *, started_at: float, remaining_s: float | None = None,
                 start_progress: float = 0.0, spent_s: float = 0.0, step_s: float = 0.0, progress=None,
                 clock: Callable[[], float] | None = None, agree: Callable[[float], float] | None = None):
        super().__init__()
        self.max_time_s = float(max_time_s)
        self.started_at = float(started_at)
        self.remaining_s = float(max_time_s if remaining_s is None else remaining_s)
        self.start_progress = float(start_progress)
        self.spent_before_s = float(spent_s)
        self.initial_step_s = float(step_s)
        self.progress_var = progress
        self.clock = clock or (lambda: now())
        self.agree = agree or (lambda x: x)
        self.time_up = False
        self.step_times: deque[float] = deque(maxlen=STEP_WINDOW)
        self.steps = 0
        self.stop_at_s = 0.0
        self.position = self.start_progress
        self._fit_start = 0.0
        self.overhead_s = 0.0
        self._last_end: float | None = None
        self._epoch_end_at: float | None = None
        self._first_step = True

    # --- figures -----------------------------------------------------------------------------
    def elapsed(self) -> float:
        """Seconds since this invocation started (agreed between workers)."""
        return float(self.agree(self.clock() - self.started_at))

    @property
    def step_s(self) -> float:
        """Median duration of the recent steps (``initial_step_s`` before the first measured one)."""
        return float(np.median(self.step_times)) if self.step_times else self.initial_step_s

    def time_left_s(self) -> float:
        return max(0.0, self.remaining_s - self.elapsed())

    def position_at(self, elapsed_s: float) -> float:
        """Schedule position at ``elapsed_s``: the start position, then linear in time to 1 at
        the deadline (training time only: start-up before the first step is not in the span)."""
        span = self.remaining_s - self._fit_start
        if span <= 0:
            return 1.0
        frac = (elapsed_s - self._fit_start) / span
        return float(np.clip(self.start_progress + (1.0 - self.start_progress) * frac, 0.0, 1.0))

    def state(self) -> dict[str, Any]:
        """JSON state for the checkpoint: what :func:`replan` needs to continue.

        ``spent_s``: seconds of the budget used so far (all invocations, epoch-end work
        included); ``last_step_s``: the same up to the end of the last optimizer step (the figure
        the budget is kept to; a final validation comes after it); ``overshoot_fraction``:
        ``last_step_s / max_time_s - 1`` (negative when the run ended early).
        """
        last = self.spent_before_s + self.stop_at_s
        return {"max_time_s": self.max_time_s, "spent_s": self.spent_before_s + self.elapsed(),
                "last_step_s": last, "overshoot_fraction": last / self.max_time_s - 1.0,
                "progress": self.position, "step_s": self.step_s, "overhead_s": self.overhead_s}

    # --- callback ------------------------------------------------------------------------------
    def on_train_begin(self, logs=None) -> None:
        self._fit_start = self.elapsed()
        self.time_up = self._fit_start >= self.remaining_s
        if self.time_up and self.model is not None:
            self.model.stop_training = True

    def on_epoch_begin(self, epoch, logs=None) -> None:
        now = self.elapsed()
        if self._epoch_end_at is not None:
            # Epoch-end work (validation, checkpoint, history): predicts the next one.
            self.overhead_s = now - self._epoch_end_at
        # Step durations are measured end to end inside an epoch; epoch-end work is not a step.
        self._last_end = now

    def on_train_batch_begin(self, batch, logs=None) -> None:
        now = self.elapsed()
        # The position of the step about to run: where the clock will be when it ends ...
        self.position = self.position_at(now + self.step_s)
        if self.step_s > 0 and self._last_step_fits(batch, now):
            # ... or the end, when no step can follow it: the decay ends exactly at the last step.
            self.position = 1.0
        if self.progress_var is not None:
            self.progress_var.assign(self.position)

    def _last_step_fits(self, batch, now: float) -> bool:
        """True when the step about to run is the last one the stop rules will allow."""
        steps = (self.params or {}).get("steps")
        epoch_end_follows = steps is not None and int(batch) + 1 >= int(steps)
        extra = self.overhead_s if epoch_end_follows else 0.0
        return self.remaining_s - (now + self.step_s) - extra < STOP_MARGIN_STEPS * self.step_s

    def on_train_batch_end(self, batch, logs=None) -> None:
        now = self.elapsed()
        if self._last_end is not None and not self._first_step:
            self.step_times.append(now - self._last_end)
        self._first_step = False
        self._last_end = now
        self.steps += 1
        self.stop_at_s = now
        left = self.remaining_s - now
        if logs is not None:
            logs["time_left_s"] = max(0.0, left)
        if left < STOP_MARGIN_STEPS * self.step_s or left <= 0:
            self.time_up = True
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None) -> None:
        now = self.elapsed()
        self._epoch_end_at = now
        # Runs before the validation callback: when the epoch-end work would leave no room for
        # another step, this epoch is the last, and its validation is the final one.
        if self.remaining_s - now - self.overhead_s < STOP_MARGIN_STEPS * self.step_s:
            self.time_up = True
        if self.time_up and self.model is not None:
            self.model.stop_training = True
        if logs is not None:
            logs["time_left_s"] = max(0.0, self.remaining_s - now)


def strategy_agree(strategy) -> Callable[[float], float] | None:
    """``elapsed -> max over workers`` under ``MultiWorkerMirroredStrategy``, else None.

    Each call is one small collective; it runs at the same steps on every worker because
    the callbacks are called at the same steps.
    """
    import tensorflow as tf

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None

    def agree(value: float) -> float:
        per_replica = strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(float(value), tf.float64))
        return float(strategy.reduce(tf.distribute.ReduceOp.MAX, per_replica, axis=None))

    return agree
