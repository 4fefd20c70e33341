"""Keras metrics on hard predictions that mean what they say.

Predictions are turned into labels with ``argmax`` over the class axis (what inference does);
targets are class indices ``(B, H, W)`` / ``(B, H, W, 1)`` or one-hot ``(B, H, W, C)``.
All metrics accumulate counts over the whole epoch (``reset_state`` at epoch start, as
Keras does), so the value is the Dice of the epoch, not an average of per-batch Dice values:
a batch of empty slices adds nothing instead of scoring 1.0.

Names in Keras logs (prefixed ``head_L_`` for deep-supervision models, ``val_`` for
validation): ``foreground_dice``, ``lesion_slice_dice``, ``fg_fraction``, ``true_fg_fraction``.

N classes (background + several organs or lesions): :func:`dice_metrics` gives one Dice and one
predicted fraction per foreground class (``dice_<name>``, ``fg_fraction_<name>``), the mean Dice
over the foreground classes (``mean_dice``, :class:`MeanClassDice`) and ``fg_fraction``; for 2
classes it gives today's ``foreground_dice`` and ``fg_fraction``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import keras
from keras import ops

from medseg.losses import _overlap

__all__ = ["ForegroundDice", "LesionSliceDice", "ForegroundFraction", "TrueForegroundFraction",
           "MeanClassDice", "class_metric_names", "dice_metrics"]


def _labels(y_true, y_pred):
    """Hard ``(pred, ref)`` class-index tensors ``(B, *spatial)`` int32."""
    y_pred = ops.convert_to_tensor(y_pred)
    num_classes = y_pred.shape[-1]
    pred = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
    onehot = _overlap.one_hot_targets(
        ops.convert_to_tensor(y_true), num_classes, len(y_pred.shape) - 2
    )
    # argmax of a one-hot row; an all-zero row (out-of-range label) counts as background.
    ref = ops.cast(ops.argmax(onehot, axis=-1), "int32")
    return pred, ref, num_classes


def _pixel_weights(sample_weight, pred, y_true=None, num_classes: int = 0):
    """Per-pixel float32 weights (``(B,)`` sample weights broadcast over pixels), 0 at the
    unlabelled pixels of ``y_true`` (ignore value): metrics count labelled pixels only."""
    labelled = None
    if y_true is not None:
        labelled = _overlap.labelled_pixels(ops.convert_to_tensor(y_true), num_classes, len(pred.shape) - 1)
    if sample_weight is None:
        return ops.ones_like(pred, dtype="float32") if labelled is None else labelled
    sw = ops.cast(ops.convert_to_tensor(sample_weight), "float32")
    while len(sw.shape) < len(pred.shape):
        sw = ops.expand_dims(sw, -1)
    sw = ops.broadcast_to(sw, ops.shape(pred))
    return sw if labelled is None else sw * labelled


def _is_class(labels, class_id):
    # class_id None = any foreground class (> 0).
    return labels > 0 if class_id is None else ops.equal(labels, class_id)


@keras.saving.register_keras_serializable(package="medseg")
class ForegroundDice(keras.metrics.Metric):
    """Hard foreground Dice ``2 TP / (2 TP + FP + FN)`` pooled over the epoch.

    TP, FP and FN are summed over every pixel of every batch (replicas included), then the Dice
    is taken once. An all-background model scores 0 on any data containing lesion. NaN when the
    epoch has neither reference nor predicted foreground (Dice undefined, as ``medseg.eval``).

    Args:
        class_id: foreground class to score; ``None`` (default) pools all classes ``>= 1``
            (a pixel counts as TP when prediction and reference agree on its class).
        name: metric name in the logs.
    """

    def __init__(self, class_id=None, name="foreground_dice", dtype=None, **kwargs):
        super().__init__(name=name, dtype=dtype or "float32", **kwargs)
        if class_id is not None and int(class_id) < 1:
            raise ValueError(f"ForegroundDice: class_id must be >= 1 or None, found {class_id}")
        self.class_id = None if class_id is None else int(class_id)
        self.true_positives = self.add_variable((), initializer="zeros", name="true_positives")
        self.false_positives = self.add_variable((), initializer="zeros", name="false_positives")
        self.false_negatives = self.add_variable((), initializer="zeros", name="false_negatives")

    def update_state(self, y_true, y_pred, sample_weight=None):
        pred, ref, num_classes = _labels(y_true, y_pred)
        w = _pixel_weights(sample_weight, pred, y_true, num_classes)
        pred_fg = _is_class(pred, self.class_id)
        ref_fg = _is_class(ref, self.class_id)
        tp = ops.logical_and(ops.logical_and(pred_fg, ref_fg), ops.equal(pred, ref))
        fp = ops.logical_and(pred_fg, ops.logical_not(tp))
        fn = ops.logical_and(ref_fg, ops.logical_not(tp))
        self.true_positives.assign_add(ops.sum(ops.cast(tp, "float32") * w))
        self.false_positives.assign_add(ops.sum(ops.cast(fp, "float32") * w))
        self.false_negatives.assign_add(ops.sum(ops.cast(fn, "float32") * w))

    def result(self):
        denominator = 2.0 * self.true_positives + self.false_positives + self.false_negatives
        return ops.where(
            denominator > 0,
            2.0 * self.true_positives / ops.maximum(denominator, 1.0),
            float("nan"),
        )

    def reset_state(self):
        for v in (self.true_positives, self.false_positives, self.false_negatives):
            v.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "class_id": self.class_id}


@keras.saving.register_keras_serializable(package="medseg")
class LesionSliceDice(keras.metrics.Metric):
    """Mean hard Dice over the samples (slices) whose reference contains foreground.

    Slices without lesion are skipped (their Dice is undefined), so this is the quality of the
    lesion outlines where there is a lesion; false alarms on empty slices show up in
    :class:`ForegroundDice` and :class:`ForegroundFraction` instead. NaN before any lesion slice.

    Args:
        class_id: as :class:`ForegroundDice`.
    """

    def __init__(self, class_id=None, name="lesion_slice_dice", dtype=None, **kwargs):
        super().__init__(name=name, dtype=dtype or "float32", **kwargs)
        if class_id is not None and int(class_id) < 1:
            raise ValueError(f"LesionSliceDice: class_id must be >= 1 or None, found {class_id}")
        self.class_id = None if class_id is None else int(class_id)
        self.dice_sum = self.add_variable((), initializer="zeros", name="dice_sum")
        self.slice_count = self.add_variable((), initializer="zeros", name="slice_count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        pred, ref, num_classes = _labels(y_true, y_pred)
        axes = tuple(range(1, len(pred.shape)))
        labelled = _pixel_weights(None, pred, y_true, num_classes) > 0  # unlabelled pixels: no prediction
        pred_fg = ops.logical_and(_is_class(pred, self.class_id), labelled)
        ref_fg = _is_class(ref, self.class_id)
        tp = ops.logical_and(ops.logical_and(pred_fg, ref_fg), ops.equal(pred, ref))
        tp = ops.sum(ops.cast(tp, "float32"), axis=axes)
        n_pred = ops.sum(ops.cast(pred_fg, "float32"), axis=axes)
        n_ref = ops.sum(ops.cast(ref_fg, "float32"), axis=axes)
        has_lesion = ops.cast(n_ref > 0, "float32")
        if sample_weight is not None:
            sw = ops.cast(ops.convert_to_tensor(sample_weight), "float32")
            if len(sw.shape) > 1:       # per-pixel weights: a slice counts with their mean
                sw = ops.mean(ops.reshape(sw, (ops.shape(sw)[0], -1)), axis=-1)
            has_lesion = has_lesion * ops.reshape(sw, (-1,))
        dice = 2.0 * tp / ops.maximum(n_pred + n_ref, 1.0)
        self.dice_sum.assign_add(ops.sum(dice * has_lesion))
        self.slice_count.assign_add(ops.sum(has_lesion))

    def result(self):
        return ops.where(
            self.slice_count > 0,
            self.dice_sum / ops.maximum(self.slice_count, 1.0),
            float("nan"),
        )

    def reset_state(self):
        self.dice_sum.assign(0.0)
        self.slice_count.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "class_id": self.class_id}


@keras.saving.register_keras_serializable(package="medseg")
class ForegroundFraction(keras.metrics.Metric):
    """Fraction of pixels labelled foreground (class >= 1), pooled over the epoch.

    ``source="pred"`` (default, name ``fg_fraction``) counts the hard predictions: 0 means the
    model has collapsed to background. ``source="true"`` counts the reference, for comparison.
    ``class_id`` counts one class only (default name ``fg_fraction_<class_id>``): 0 means the
    model never predicts that class.
    """

    def __init__(self, source="pred", name=None, dtype=None, class_id=None, **kwargs):
        if source not in ("pred", "true"):
            raise ValueError(f"ForegroundFraction: source must be 'pred' or 'true', found {source!r}")
        if class_id is not None and int(class_id) < 1:
            raise ValueError(f"ForegroundFraction: class_id must be >= 1 or None, found {class_id}")
        class_id = None if class_id is None else int(class_id)
        default = ("fg_fraction" if source == "pred" else "true_fg_fraction") + (
            "" if class_id is None else f"_{class_id}")
        super().__init__(name=name or default, dtype=dtype or "float32", **kwargs)
        self.source = source
        self.class_id = class_id
        self.foreground = self.add_variable((), initializer="zeros", name="foreground")
        self.total = self.add_variable((), initializer="zeros", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        pred, ref, num_classes = _labels(y_true, y_pred)
        labels = pred if self.source == "pred" else ref
        w = _pixel_weights(sample_weight, pred, y_true, num_classes)
        self.foreground.assign_add(ops.sum(ops.cast(_is_class(labels, self.class_id), "float32") * w))
        self.total.assign_add(ops.sum(w))

    def result(self):
        return self.foreground / ops.maximum(self.total, 1.0)

    def reset_state(self):
        self.foreground.assign(0.0)
        self.total.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "source": self.source, "class_id": self.class_id}


@keras.saving.register_keras_serializable(package="medseg")
class TrueForegroundFraction(ForegroundFraction):
    """Reference foreground fraction (``ForegroundFraction(source="true")``), ``true_fg_fraction``."""

    def __init__(self, name="true_fg_fraction", dtype=None, **kwargs):
        kwargs.pop("source", None)
        super().__init__(source="true", name=name, dtype=dtype, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.pop("source", None)
        return config


@keras.saving.register_keras_serializable(package="medseg")
class MeanClassDice(keras.metrics.Metric):
    """Mean over the foreground classes ``1..C-1`` of each class's hard Dice, pooled over the epoch.

    Each class ``k`` keeps its own TP/FP/FN (pixels predicted ``k`` and labelled ``k``; predicted
    ``k`` elsewhere; labelled ``k`` and predicted otherwise), summed over every batch; its Dice is
    ``2 TP / (2 TP + FP + FN)`` as :class:`ForegroundDice` with ``class_id=k``. A class neither
    labelled nor predicted in the epoch has no Dice and is left out of the mean; NaN when no
    class has one.

    Args:
        num_classes: classes including background (>= 2); predictions must have this many channels.
        name: metric name in the logs (default ``mean_dice``).
    """

    def __init__(self, num_classes, name="mean_dice", dtype=None, **kwargs):
        super().__init__(name=name, dtype=dtype or "float32", **kwargs)
        if int(num_classes) < 2:
            raise ValueError(f"MeanClassDice: num_classes must be >= 2 (background + 1), found {num_classes}")
        self.num_classes = int(num_classes)
        shape = (self.num_classes - 1,)
        self.true_positives = self.add_variable(shape, initializer="zeros", name="true_positives")
        self.false_positives = self.add_variable(shape, initializer="zeros", name="false_positives")
        self.false_negatives = self.add_variable(shape, initializer="zeros", name="false_negatives")

    def update_state(self, y_true, y_pred, sample_weight=None):
        pred, ref, num_classes = _labels(y_true, y_pred)
        if num_classes != self.num_classes:
            raise ValueError(f"MeanClassDice: predictions have {num_classes} classes, the metric was built "
                             f"for num_classes={self.num_classes}")
        w = ops.expand_dims(_pixel_weights(sample_weight, pred, y_true, num_classes), -1)
        # Foreground channels of the one-hot labels: (B, *spatial, C - 1).
        p = ops.one_hot(pred, num_classes, dtype="float32")[..., 1:]
        r = ops.one_hot(ref, num_classes, dtype="float32")[..., 1:]
        axes = tuple(range(len(p.shape) - 1))
        self.true_positives.assign_add(ops.sum(p * r * w, axis=axes))
        self.false_positives.assign_add(ops.sum(p * (1.0 - r) * w, axis=axes))
        self.false_negatives.assign_add(ops.sum((1.0 - p) * r * w, axis=axes))

    def class_dice(self):
        """Per-class Dice ``(C - 1,)`` of the epoch so far (NaN where undefined)."""
        denominator = 2.0 * self.true_positives + self.false_positives + self.false_negatives
        return ops.where(denominator > 0, 2.0 * self.true_positives / ops.maximum(denominator, 1.0),
                         float("nan"))

    def result(self):
        denominator = 2.0 * self.true_positives + self.false_positives + self.false_negatives
        defined = ops.cast(denominator > 0, "float32")
        dice = 2.0 * self.true_positives / ops.maximum(denominator, 1.0)
        n = ops.sum(defined)
        return ops.where(n > 0, ops.sum(dice * defined) / ops.maximum(n, 1.0), float("nan"))

    def reset_state(self):
        for v in (self.true_positives, self.false_positives, self.false_negatives):
            v.assign(ops.zeros(v.shape, dtype=v.dtype))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


def class_metric_names(num_classes: int, class_names: Sequence[str] | None = None) -> list[str]:
    """Suffixes of the per-class metric names, one per foreground class ``1..num_classes-1``:
    the class names with characters other than letters, digits and ``_`` made ``_``
    (``"non-enhancing"`` -> ``non_enhancing``), or the class indices ``"1"``, ``"2"``, ...

    Raises:
        ValueError: ``num_classes < 2``, not ``num_classes - 1`` names, or two names alike.
    """
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2 (background + 1), found {num_classes}")
    if class_names is None:
        return [str(k) for k in range(1, int(num_classes))]
    names = [re.sub(r"[^A-Za-z0-9_]", "_", str(n)) for n in class_names]
    if len(names) != int(num_classes) - 1:
        raise ValueError(f"expected {int(num_classes) - 1} foreground class names (background excluded) for "
                         f"num_classes={num_classes}, found {list(class_names)}")
    if len(set(names)) != len(names) or "" in names:
        raise ValueError(f"class names must give distinct metric names, found {list(class_names)} -> {names}")
    return names


def dice_metrics(num_classes: int, class_names: Sequence[str] | None = None) -> list[keras.metrics.Metric]:
    """The Dice metrics of a model with ``num_classes`` outputs (background included).

    2 classes: ``[ForegroundDice(), ForegroundFraction()]``, logged as ``foreground_dice`` and
    ``fg_fraction`` (what medseg always logged). More: per foreground class ``k`` (named by
    :func:`class_metric_names`) ``dice_<name>`` (:class:`ForegroundDice` ``class_id=k``) and
    ``fg_fraction_<name>``, then ``mean_dice`` (:class:`MeanClassDice`) and ``fg_fraction`` (any
    foreground class). :class:`medseg.train.diagnostics.Diagnostics` reads these names.

    Args:
        num_classes: classes including background (>= 2).
        class_names: names of the foreground classes (``num_classes - 1``), e.g.
            ``ClassSpec.names``; default the class indices.

    Example:
        >>> model.compile(loss=DiceCELoss(), metrics=dice_metrics(3, ["liver", "tumour"]))
    """
    names = class_metric_names(num_classes, class_names)
    if int(num_classes) == 2:
        return [ForegroundDice(), ForegroundFraction()]
    per_class: list[keras.metrics.Metric] = [ForegroundDice(class_id=k, name=f"dice_{n}")
                                             for k, n in enumerate(names, 1)]
    fractions = [ForegroundFraction(class_id=k, name=f"fg_fraction_{n}") for k, n in enumerate(names, 1)]
    return per_class + [MeanClassDice(num_classes), ForegroundFraction()] + fractions
