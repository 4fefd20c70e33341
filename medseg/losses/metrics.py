"""Keras metrics on hard predictions that mean what they say.

Predictions are turned into labels with ``argmax`` over the class axis (what inference does);
targets are class indices ``(B, H, W)`` / ``(B, H, W, 1)`` or one-hot ``(B, H, W, C)``.
All metrics accumulate counts over the whole epoch (``reset_state`` at epoch start, as
Keras does), so the value is the Dice of the epoch, not an average of per-batch Dice values:
a batch of empty slices adds nothing instead of scoring 1.0.

Names in Keras logs (prefixed ``head_L_`` for deep-supervision models, ``val_`` for
validation): ``foreground_dice``, ``lesion_slice_dice``, ``fg_fraction``, ``true_fg_fraction``.
"""

from __future__ import annotations

import keras
from keras import ops

from medseg.losses import _overlap

__all__ = ["ForegroundDice", "LesionSliceDice", "ForegroundFraction", "TrueForegroundFraction"]


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


def _pixel_weights(sample_weight, pred):
    """Per-pixel float32 weights (``(B,)`` sample weights broadcast over pixels)."""
    if sample_weight is None:
        return ops.ones_like(pred, dtype="float32")
    sw = ops.cast(ops.convert_to_tensor(sample_weight), "float32")
    while len(sw.shape) < len(pred.shape):
        sw = ops.expand_dims(sw, -1)
    return ops.broadcast_to(sw, ops.shape(pred))


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
        pred, ref, _ = _labels(y_true, y_pred)
        w = _pixel_weights(sample_weight, pred)
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
        pred, ref, _ = _labels(y_true, y_pred)
        axes = tuple(range(1, len(pred.shape)))
        pred_fg = _is_class(pred, self.class_id)
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
    """

    def __init__(self, source="pred", name=None, dtype=None, **kwargs):
        if source not in ("pred", "true"):
            raise ValueError(f"ForegroundFraction: source must be 'pred' or 'true', found {source!r}")
        name = name or ("fg_fraction" if source == "pred" else "true_fg_fraction")
        super().__init__(name=name, dtype=dtype or "float32", **kwargs)
        self.source = source
        self.foreground = self.add_variable((), initializer="zeros", name="foreground")
        self.total = self.add_variable((), initializer="zeros", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        pred, ref, _ = _labels(y_true, y_pred)
        labels = pred if self.source == "pred" else ref
        w = _pixel_weights(sample_weight, pred)
        self.foreground.assign_add(ops.sum(ops.cast(labels > 0, "float32") * w))
        self.total.assign_add(ops.sum(w))

    def result(self):
        return self.foreground / ops.maximum(self.total, 1.0)

    def reset_state(self):
        self.foreground.assign(0.0)
        self.total.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "source": self.source}


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
