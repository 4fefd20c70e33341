"""Training diagnostics: explain the loss and warn about the silent failures of Dice training.

:class:`Diagnostics` is a Keras callback (``medseg-train`` adds it; it also works in any plain
``model.fit``). Every epoch it splits the reported loss into the data loss and the
regularization loss (``sum(model.losses)``: an L2 penalty easily adds 0.7 and explains a "Dice
loss above 1"), and it warns, naming the cause and the fix, when

* ``collapse``: the predicted foreground fraction stays 0 for ``collapse_epochs`` epochs;
* ``flat_dice``: the loss falls while the hard foreground Dice stays flat;
* ``labels``: the labels are not exactly class indices ``{0, 1}`` (0/255 masks, interpolated
  labels), checked on ``sample_batch`` or with :func:`check_labels`;
* ``class_weights``: the loss weights favour background;
* ``alignment``: the augmentation self-check found image and mask out of register
  (``alignment_dice < 0.99``).

With ``num_classes > 2`` (background + several classes) ``collapse`` and ``flat_dice`` are also
judged per foreground class, on the per-class metrics of
:func:`medseg.losses.metrics.dice_metrics` (``dice_<name>``, ``fg_fraction_<name>``) or on
``sample_batch``: a class the model never predicts, or whose Dice stays flat while the loss
falls, is named by its index (and name); the class-weight rule names each class that background
outweighs. Two classes behave as always (class 1 is the lesion).

Each warning is a :class:`DiagnosticsWarning` (Python ``warnings``), a ``logging`` warning, and
a dict ``{"kind", "epoch", "cause", "fix", "message"}`` in ``callback.warnings_seen`` (plus
``"class"``, the class index, for a per-class warning).
"""

from __future__ import annotations

import logging
import math
import re
import warnings as _warnings
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from medseg.losses.metrics import class_metric_names
from medseg.losses.regularization import regularization_loss
from medseg.train.label_checks import check_class_weights, check_labels

__all__ = [
    "Diagnostics",
    "DiagnosticsWarning",
    "check_labels",
    "check_class_weights",
    "regularization_loss",
]

log = logging.getLogger(__name__)


class DiagnosticsWarning(UserWarning):
    """A training run shows a known failure mode (collapse, flat Dice, bad labels, ...)."""


def _compiled_regularization(model: keras.Model):
    """A no-argument function returning ``sum(model.losses)``; one graph call per use.

    Evaluating ~100 regularizers eagerly costs tens of milliseconds of Python per call, too
    much to do before every step on a GPU; traced once, it is one small kernel launch.
    """
    if keras.backend.backend() != "tensorflow":
        return lambda: regularization_loss(model)
    import tensorflow as tf

    @tf.function(autograph=False)
    def total():
        return tf.add_n([tf.cast(v, tf.float32) for v in model.losses])

    return lambda: float(total())


def _loss_class_weights(loss) -> list[tuple[list[float], bool, bool]]:
    """(weights, include_background, weigh pixel mass) of every medseg-style loss object in
    ``model.loss``.

    Cross-entropy weights always see background pixels. Next to a Dice term over the foreground
    classes only, they are held only to not weighing background at least as much as a class:
    that Dice already balances the classes, and cross-entropy weights that also balanced the
    pixel mass would flood small classes with false positives
    (:func:`medseg.losses.balanced_class_weights`).
    """
    found = []
    for item in keras.tree.flatten(loss) if loss is not None else []:
        weights = getattr(item, "class_weights", None)
        if weights is not None:
            found.append((list(weights), bool(getattr(item, "include_background", True)), True))
        ce = getattr(item, "ce_class_weights", None)
        if ce is not None and getattr(item, "ce_weight", 1.0) > 0:
            foreground_dice = getattr(item, "dice_weight", 0.0) > 0 and not getattr(item, "include_background", True)
            found.append((list(ce), True, not foreground_dice))
    return found


def _find_key(logs: dict, name: str, output_names: Sequence[str] = (), prefix: str = "") -> str | None:
    """Log key of metric ``name``: exact, else ``<output>_<name>`` of the last model output
    (the deepest head), else ``head_L_<name>`` with the largest ``L``."""
    if prefix + name in logs:
        return prefix + name
    for output in reversed(list(output_names)):
        if f"{prefix}{output}_{name}" in logs:
            return f"{prefix}{output}_{name}"
    pattern = re.compile(rf"^{re.escape(prefix)}head_(\d+)_{re.escape(name)}$")
    heads = sorted((int(m.group(1)), k) for k in logs if (m := pattern.match(k)))
    return heads[-1][1] if heads else None


def _finite(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


@keras.saving.register_keras_serializable(package="medseg")
class Diagnostics(keras.callbacks.Callback):
    """Explain the loss and warn about collapse, flat Dice, bad labels, weights, alignment.

    Put it first in ``callbacks`` so the ``reg_loss``/``data_loss`` it adds to ``logs`` reach
    the later callbacks (CSVLogger, TensorBoard, History).

    Args:
        collapse_epochs: warn when the predicted foreground fraction is 0 this many epochs in a
            row.
        flat_epochs: window (epochs) for the flat-Dice rule: the loss fell by more than
            ``loss_drop`` (relative) over the window while the foreground Dice moved less than
            ``flat_dice_tolerance`` (absolute).
        flat_dice_tolerance: see ``flat_epochs``.
        loss_drop: see ``flat_epochs``.
        sample_batch: optional ``(images, labels)`` batch: its labels are checked at the start,
            its class fractions feed the class-weight check, and when the compiled metrics are
            missing the callback measures foreground Dice and fraction on it every epoch.
        class_weights: class weights of a loss the callback cannot inspect (e.g. the user's own
            function); medseg losses in ``model.loss`` are found automatically.
        include_background: whether that loss includes the background class.
        num_classes: classes including background, for the label check; above 2 the collapse
            and flat-Dice rules also run per foreground class.
        alignment_dice: Dice between a mask warped by the augmentation and the mask recomputed
            from the warped image (the pipeline's self-check); warn below
            ``alignment_threshold``.
        alignment_threshold: see ``alignment_dice`` (default 0.99).
        dice_key, fraction_key: metric names to read from the logs (default the medseg
            metrics ``foreground_dice`` and ``fg_fraction``; ``head_L_`` prefixes are found).
        verbose: 1 prints one line per epoch with the loss split; 0 only logs it.
        class_names: names of the foreground classes (``num_classes - 1``, e.g.
            ``ClassSpec.names``): the per-class metrics are read as ``dice_<name>`` and
            ``fg_fraction_<name>`` (:func:`medseg.losses.metrics.dice_metrics`) and warnings say
            ``class 2 (spleen)``; default the indices (``dice_1``, ``dice_2``, ...).
        foreground_name: what the one foreground class of a two-class run is called in the
            warnings (``ClassSpec.names[0]``: ``"liver"`` for ``--labels-map liver=5``).

    Example:
        >>> diag = Diagnostics(sample_batch=(x[:8], y[:8]))
        >>> model.fit(x, y, epochs=20, callbacks=[diag])
        >>> diag.warnings_seen    # [{"kind": "collapse", "cause": ..., "fix": ...}, ...]
    """

    def __init__(
        self,
        collapse_epochs: int = 3,
        flat_epochs: int = 4,
        flat_dice_tolerance: float = 0.005,
        loss_drop: float = 0.05,
        sample_batch=None,
        class_weights: Sequence[float] | None = None,
        include_background: bool = True,
        num_classes: int = 2,
        alignment_dice: float | None = None,
        alignment_threshold: float = 0.99,
        dice_key: str = "foreground_dice",
        fraction_key: str = "fg_fraction",
        verbose: int = 1,
        class_names: Sequence[str] | None = None,
        foreground_name: str = "lesion",
    ):
        super().__init__()
        if int(collapse_epochs) < 1 or int(flat_epochs) < 2:
            raise ValueError(
                "Diagnostics: collapse_epochs must be >= 1 and flat_epochs >= 2, found "
                f"{collapse_epochs} and {flat_epochs}"
            )
        self.collapse_epochs = int(collapse_epochs)
        self.flat_epochs = int(flat_epochs)
        self.flat_dice_tolerance = float(flat_dice_tolerance)
        self.loss_drop = float(loss_drop)
        self.sample_batch = sample_batch
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]
        self.include_background = bool(include_background)
        self.num_classes = int(num_classes)
        self.alignment_dice = alignment_dice
        self.alignment_threshold = float(alignment_threshold)
        self.dice_key = dice_key
        self.fraction_key = fraction_key
        self.verbose = int(verbose)
        self.class_names = None if class_names is None else [str(n) for n in class_names]
        self.foreground_name = str(foreground_name)
        # Metric-name suffixes of the foreground classes, checked one by one above 2 classes.
        self._class_keys = (class_metric_names(self.num_classes, self.class_names)
                            if self.num_classes > 2 else [])
        self.warnings_seen: list[dict[str, Any]] = []
        self._reset_history()

    @property
    def warnings(self) -> list[dict[str, Any]]:
        """Alias of :attr:`warnings_seen` (what ``medseg-train`` writes to warnings.json)."""
        return self.warnings_seen

    def _reset_history(self):
        self._losses: list[float] = []
        self._dice: list[float | None] = []
        self._zero_epochs = 0
        self._class_dice: dict[int, list[float | None]] = {k: [] for k in range(1, len(self._class_keys) + 1)}
        self._class_zero = {k: 0 for k in self._class_dice}
        self._kinds_this_run: set[tuple[str, int | None]] = set()
        self._reg_sum, self._reg_steps = 0.0, 0

    # === Warnings ===
    def _warn(self, kind: str, cause: str, fix: str, epoch: int | None = None,
              class_id: int | None = None) -> None:
        # Once per run for each kind, and for each class of a per-class rule.
        if (kind, class_id) in self._kinds_this_run:
            return
        self._kinds_this_run.add((kind, class_id))
        where = f"epoch {epoch + 1}: " if epoch is not None else ""
        message = f"medseg diagnostics [{kind}] {where}{cause}. Fix: {fix}."
        record = {"kind": kind, "epoch": None if epoch is None else epoch + 1, "cause": cause,
                  "fix": fix, "message": message}
        if class_id is not None:
            record["class"] = class_id
        self.warnings_seen.append(record)
        log.warning(message)
        _warnings.warn(message, DiagnosticsWarning, stacklevel=2)

    def report_alignment(self, alignment_dice: float, epoch: int | None = None) -> None:
        """Record the augmentation self-check (Dice between warped and re-derived masks)."""
        self.alignment_dice = float(alignment_dice)
        if self.alignment_dice < self.alignment_threshold:
            self._warn(
                "alignment",
                f"augmentation breaks image/mask alignment: self-check Dice "
                f"{self.alignment_dice:.3f} < {self.alignment_threshold}; the network learns "
                "from masks that do not match their images",
                "apply every geometric transform jointly to image and mask with one set of "
                "parameters (nearest-neighbour for the mask); Keras ImageDataGenerator.flow(x, y) "
                "transforms x only",
                epoch,
            )

    def _check_labels_and_weights(self) -> None:
        fractions = None
        if self.sample_batch is not None:
            report = check_labels(self.sample_batch, self.num_classes)
            if not report["ok"]:
                self._warn(
                    "labels",
                    f"labels are not exactly class indices 0..{self.num_classes - 1}: found "
                    f"values {report['values']}",
                    "; ".join(report["problems"]),
                )
            fg = report["foreground_fraction"]
            if report["ok"] and self.num_classes == 2 and math.isfinite(fg):
                fractions = [1.0 - fg, fg]
            elif report["ok"] and math.isfinite(fg):
                fractions = report["class_fractions"]
        candidates = _loss_class_weights(getattr(self.model, "loss", None))
        if self.class_weights is not None:
            candidates.insert(0, (self.class_weights, self.include_background, True))
        for weights, include_background, by_mass in candidates:
            problem = check_class_weights(weights, fractions if by_mass else None, include_background,
                                          foreground=self.foreground_name)
            if problem:
                self._warn(
                    "class_weights",
                    f"the loss weights favour background: {problem}; a model that predicts "
                    "only background already scores well on such a loss",
                    "leave the background out of the Dice (DiceLoss(include_background=False)), "
                    + (f"or give the {self.foreground_name} class the larger weight" if len(weights) == 2 else
                       "or give each foreground class a larger weight than background")
                    + ", e.g. inverse class frequency",
                )
                break

    # === Keras hooks ===
    def on_train_begin(self, logs=None):
        self._reset_history()
        self._reg_sum, self._reg_steps = 0.0, 0
        if self.alignment_dice is not None:
            self.report_alignment(self.alignment_dice)
        self._check_labels_and_weights()

    def on_epoch_begin(self, epoch, logs=None):
        self._reg_sum, self._reg_steps = 0.0, 0

    def on_train_batch_begin(self, batch, logs=None):
        # The reported loss averages each step's loss, computed with the weights as they are
        # before that step's update: sample the penalty at the same moments (it can halve within
        # an epoch early on, so the end-of-epoch value would misstate the data loss).
        if self.model is None:
            return
        if getattr(self, "_reg_fn_model", None) is not self.model:
            self._reg_fn_model = self.model
            self._reg_fn = _compiled_regularization(self.model) if self.model.losses else None
        if self._reg_fn is not None:
            self._reg_sum += self._reg_fn()
            self._reg_steps += 1

    def _sample_metrics(self) -> dict[str, Any]:
        """On ``sample_batch``: ``dice``, ``fraction`` (any foreground class), ``class_dice`` and
        ``class_fraction`` (lists over the foreground classes above 2 classes; Dice None where
        neither labelled nor predicted)."""
        images, labels = self.sample_batch[0], np.asarray(self.sample_batch[1])
        pred = self.model.predict(images, verbose=0)
        if isinstance(pred, dict):
            pred = pred[sorted(pred)[-1]]
        elif isinstance(pred, (list, tuple)):
            pred = pred[-1]
        hard = np.argmax(np.asarray(pred), axis=-1)
        if labels.ndim == hard.ndim + 1:
            labels = labels[..., 0] if labels.shape[-1] == 1 else labels.argmax(-1)
        tp = np.count_nonzero((hard > 0) & (hard == labels))
        denominator = np.count_nonzero(hard > 0) + np.count_nonzero(labels > 0)
        out: dict[str, Any] = {"dice": 2.0 * tp / denominator if denominator else None,
                               "fraction": float(np.mean(hard > 0)), "class_dice": [], "class_fraction": []}
        for k in range(1, len(self._class_keys) + 1):
            pred_k, ref_k = hard == k, labels == k
            denominator = np.count_nonzero(pred_k) + np.count_nonzero(ref_k)
            out["class_dice"].append(2.0 * np.count_nonzero(pred_k & ref_k) / denominator if denominator else None)
            out["class_fraction"].append(float(np.mean(pred_k)))
        return out

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        reg_end = regularization_loss(self.model) if self.model is not None else 0.0
        steps = getattr(self, "_reg_steps", 0)
        reg = self._reg_sum / steps if steps else reg_end
        logs["reg_loss"] = reg
        loss = _finite(logs.get("loss"))
        if loss is not None:
            logs["data_loss"] = loss - reg
        if _finite(logs.get("val_loss")) is not None:
            # Validation runs after the epoch's last update: its penalty is the end value.
            logs["val_reg_loss"] = reg_end
            logs["val_data_loss"] = float(logs["val_loss"]) - reg_end

        dice, fraction, per_class = self._epoch_metrics(logs)
        line = f"epoch {epoch + 1}: loss {loss if loss is not None else float('nan'):.4f} = " \
               f"data {logs.get('data_loss', float('nan')):.4f} + regularization {reg:.4f}"
        if dice is not None:
            line += f"; foreground Dice {dice:.4f}"
        if fraction is not None:
            line += f"; predicted foreground fraction {fraction:.4f}"
        shown = [f"{self._class_label(k)} {d:.4f}" for k, d, _ in per_class if d is not None]
        if shown:
            line += "; Dice of " + ", ".join(shown)
        log.info(line)
        if self.verbose:
            print(line, flush=True)
        self._check_collapse(epoch, fraction, per_class)
        self._check_flat_dice(epoch, loss, dice, per_class)

    def _class_label(self, k: int) -> str:
        return f"class {k}" + (f" ({self.class_names[k - 1]})" if self.class_names else "")

    def _epoch_metrics(self, logs: dict) -> tuple[float | None, float | None, list[tuple[int, Any, Any]]]:
        """(foreground Dice, predicted foreground fraction, per class ``(k, Dice, fraction)``)
        of the epoch: from the logs, else measured on ``sample_batch`` (also written to the logs
        as ``diag_*``), else None."""
        outputs = list(getattr(self.model, "output_names", None) or [])
        dice_key = _find_key(logs, self.dice_key, outputs)
        fraction_key = _find_key(logs, self.fraction_key, outputs)
        dice = _finite(logs.get(dice_key)) if dice_key else None
        fraction = _finite(logs.get(fraction_key)) if fraction_key else None
        class_keys = [(_find_key(logs, f"dice_{n}", outputs), _find_key(logs, f"fg_fraction_{n}", outputs))
                      for n in self._class_keys]
        # Above 2 classes the Dice rule is judged per class: the pooled Dice is only shown.
        missing = fraction_key is None or (dice_key is None and not class_keys) or \
            any(key is None for pair in class_keys for key in pair)
        sample = self._sample_metrics() if missing and self.sample_batch is not None else None
        if sample is not None:
            if dice_key is None:
                dice = sample["dice"]
                logs["diag_foreground_dice"] = float("nan") if dice is None else dice
            if fraction_key is None:
                fraction = sample["fraction"]
                logs["diag_fg_fraction"] = fraction
        per_class = []
        for k, (name, (d_key, f_key)) in enumerate(zip(self._class_keys, class_keys), 1):
            d = _finite(logs.get(d_key)) if d_key else None
            f = _finite(logs.get(f_key)) if f_key else None
            if sample is not None and d_key is None:
                d = sample["class_dice"][k - 1]
                logs[f"diag_dice_{name}"] = float("nan") if d is None else d
            if sample is not None and f_key is None:
                f = logs[f"diag_fg_fraction_{name}"] = sample["class_fraction"][k - 1]
            per_class.append((k, d, f))
        return dice, fraction, per_class

    def _check_collapse(self, epoch: int, fraction, per_class) -> None:
        """Nothing predicted for ``collapse_epochs`` epochs: no foreground at all, or one class
        while others are predicted."""
        if fraction is not None:
            self._zero_epochs = self._zero_epochs + 1 if fraction <= 0.0 else 0
            if self._zero_epochs >= self.collapse_epochs:
                self._warn(
                    "collapse",
                    f"the model predicts no foreground at all for {self._zero_epochs} epochs "
                    "(collapsed to background)",
                    "use a foreground Dice + cross-entropy loss (DiceCELoss), sample more "
                    f"{self.foreground_name}-containing patches, check the labels and lower the learning rate",
                    epoch,
                )
        for k, _, f in per_class:
            if f is None:
                continue
            self._class_zero[k] = self._class_zero[k] + 1 if f <= 0.0 else 0
            # A model predicting nothing at all gets the one warning above, not one per class.
            if self._class_zero[k] >= self.collapse_epochs and not (fraction is not None and fraction <= 0.0):
                self._warn(
                    "collapse",
                    f"the model predicts no voxel of {self._class_label(k)} for {self._class_zero[k]} "
                    "epochs while it predicts other classes",
                    f"check that the labels hold class index {k} (--labels-map / dataset.json ids), give "
                    "the class a larger cross-entropy weight (--ce-class-weights, ce_class_weights) and sample "
                    "more patches containing it",
                    epoch, class_id=k,
                )

    def _check_flat_dice(self, epoch: int, loss, dice, per_class) -> None:
        """The loss fell by ``loss_drop`` over ``flat_epochs`` epochs while a Dice stayed flat:
        the foreground Dice (2 classes, or no per-class Dice), else each class's."""
        if loss is None:
            return
        self._losses.append(loss)
        self._dice.append(dice)
        for k, d, _ in per_class:
            self._class_dice[k].append(d)
        window = self.flat_epochs
        if len(self._losses) < window:
            return
        losses = self._losses[-window:]
        if not losses[-1] < losses[0] * (1.0 - self.loss_drop):
            return
        fell = f"the loss fell from {losses[0]:.4f} to {losses[-1]:.4f} over {window} epochs"
        fix = ("use a foreground-only loss (DiceLoss/DiceCELoss with include_background=False), watch "
               "reg_loss vs data_loss, and check that augmentation keeps masks aligned")
        series = [(k, self._class_dice[k][-window:]) for k in self._class_dice]
        if not any(d is not None for _, values in series for d in values):
            series = [(None, self._dice[-window:])]
        for k, dices in series:
            if all(d is not None for d in dices) and max(dices) - min(dices) <= self.flat_dice_tolerance:
                which = "the hard foreground Dice" if k is None else f"the hard Dice of {self._class_label(k)}"
                self._warn(
                    "flat_dice",
                    f"{fell} while {which} stayed at {dices[-1]:.4f}: the loss is improving on something "
                    "other than " + (f"the {self.foreground_name}" if k is None else "this class")
                    + " (background Dice, the regularization term, or empty slices)",
                    fix if k is None else fix + f"; with several classes, weight class {k} up in the cross-entropy "
                    "(medseg-train --ce-class-weights, DiceCELoss(ce_class_weights=...))",
                    epoch, class_id=k,
                )

    def get_config(self):
        return {
            "collapse_epochs": self.collapse_epochs,
            "flat_epochs": self.flat_epochs,
            "flat_dice_tolerance": self.flat_dice_tolerance,
            "loss_drop": self.loss_drop,
            "class_weights": self.class_weights,
            "include_background": self.include_background,
            "num_classes": self.num_classes,
            "alignment_dice": self.alignment_dice,
            "alignment_threshold": self.alignment_threshold,
            "dice_key": self.dice_key,
            "fraction_key": self.fraction_key,
            "verbose": self.verbose,
            "class_names": self.class_names,
        }
