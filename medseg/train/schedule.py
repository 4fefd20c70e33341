"""The learning-rate schedule of a run: warm-up, then poly, cosine or constant decay, optionally
following the wall-clock budget (:mod:`medseg.train.budget`)."""

from __future__ import annotations

import math

import keras

#: Peak learning rate of a fine-tuning run (``--init-from``; one replica). Measured on the
#: multi-organ task (docs/train.md, 40 steps from a 400-step M0): 1e-4 learns too slowly (mean
#: DSC 0.803 on B's other slices), 3e-4 and 1e-3 tie (0.868 / 0.869); 3e-4 moves the parent less.
FINETUNE_LR = 3e-4
#: Linear warm-up steps of a fine-tuning run (``warmup_epochs`` replaces it). Measured at 3e-4:
#: none 0.893, 20 steps 0.868; in a 60 s budget a warm-up only spends steps at a lower rate.
FINETUNE_WARMUP_STEPS = 0


@keras.saving.register_keras_serializable(package="medseg")
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Per-step learning rate: optional linear warm-up, then poly, cosine or constant decay.

    ``lr(step) = final + (initial - final) * warm(step) * decay(progress)`` with
    ``warm = min(1, (step + 1) / warmup_steps)`` and ``progress`` going from 0 (end of warm-up)
    to 1 (``total_steps``). ``poly``: ``decay = (1 - progress) ** power`` (the user's
    ``poly_decay``, nnU-Net's power 0.9); ``cosine``: ``decay = (1 + cos(pi * progress)) / 2``.

    The optimizer's step counter drives it, so a resumed run continues the schedule exactly.
    With ``clock=True`` (a wall-clock budget, :mod:`medseg.train.budget`) ``progress`` is the
    larger of the step fraction and ``clock_progress``, a non-trainable variable that
    :class:`~medseg.train.budget.BudgetClock` sets before every step to the fraction of the
    budget spent when that step ends; the decay then reaches its end value at the budget.

    Args:
        initial_learning_rate: learning rate after warm-up.
        total_steps: optimizer steps of the whole run (epochs * steps per epoch).
        kind: ``"poly"``, ``"cosine"`` or ``"constant"``.
        power: exponent of the poly decay.
        warmup_steps: steps of linear warm-up (0: none).
        final_learning_rate: value reached at ``total_steps``.
        clock: follow ``clock_progress`` as well (budgeted training).
    """

    def __init__(self, initial_learning_rate: float, total_steps: int, kind: str = "poly", power: float = 0.9,
                 warmup_steps: int = 0, final_learning_rate: float = 0.0, name: str | None = None,
                 clock: bool = False):
        if kind not in ("poly", "cosine", "constant"):
            raise ValueError(f"kind must be 'poly', 'cosine' or 'constant', found {kind!r}")
        if int(total_steps) < 1:
            raise ValueError(f"total_steps must be >= 1, found {total_steps}")
        self.initial_learning_rate = float(initial_learning_rate)
        self.total_steps = int(total_steps)
        self.kind = kind
        self.power = float(power)
        self.warmup_steps = int(warmup_steps)
        self.final_learning_rate = float(final_learning_rate)
        self.name = name
        self.clock = bool(clock)
        self.clock_progress = (keras.Variable(0.0, trainable=False, dtype="float32", name="clock_progress")
                               if self.clock else None)

    def __call__(self, step):
        ops = keras.ops
        step = ops.cast(step, "float32")
        warm = 1.0
        if self.warmup_steps > 0:
            warm = ops.minimum(1.0, (step + 1.0) / float(self.warmup_steps))
        span = float(max(1, self.total_steps - self.warmup_steps))
        progress = ops.clip((step - float(self.warmup_steps)) / span, 0.0, 1.0)
        if self.clock_progress is not None:
            progress = ops.maximum(progress, ops.clip(ops.cast(self.clock_progress, "float32"), 0.0, 1.0))
        if self.kind == "poly":
            decay = ops.power(1.0 - progress, self.power)
        elif self.kind == "cosine":
            decay = 0.5 * (1.0 + ops.cos(math.pi * progress))
        else:
            decay = ops.ones_like(progress)
        lr = self.final_learning_rate + (self.initial_learning_rate - self.final_learning_rate) * warm * decay
        return ops.cast(lr, "float32")

    def get_config(self) -> dict:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "total_steps": self.total_steps,
            "kind": self.kind,
            "power": self.power,
            "warmup_steps": self.warmup_steps,
            "final_learning_rate": self.final_learning_rate,
            "name": self.name,
            "clock": self.clock,
        }
