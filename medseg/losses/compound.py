"""Dice + (weighted) cross-entropy, the recommended training loss (nnU-Net's default recipe)."""

from __future__ import annotations

import keras
from keras import ops

from medseg.losses import _overlap
from medseg.losses.dice import DiceLoss

__all__ = ["DiceCELoss", "weighted_cross_entropy"]


def weighted_cross_entropy(onehot, probs, class_weights=None, from_logits=False, logits=None):
    """Per-sample class-weighted cross-entropy ``(B,)``.

    ``sum_pixels w[g] * (-log p_g) / sum_pixels w[g]``: a weighted mean over each sample's
    pixels, so it stays on the scale of plain cross-entropy (``ln 2 = 0.693`` for p = 0.5).
    """
    axes = tuple(range(1, len(probs.shape) - 1))
    if from_logits and logits is not None:
        log_p = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
    else:
        log_p = ops.log(ops.clip(probs, 1e-7, 1.0))
    num_classes = probs.shape[-1]
    w = ops.convert_to_tensor(
        class_weights if class_weights is not None else [1.0] * num_classes, dtype="float32"
    )
    pixel_w = ops.sum(onehot * w, axis=-1)
    pixel_ce = -ops.sum(onehot * log_p, axis=-1)
    return ops.sum(pixel_w * pixel_ce, axis=axes) / ops.maximum(ops.sum(pixel_w, axis=axes), 1e-12)


@keras.saving.register_keras_serializable(package="medseg")
class DiceCELoss(DiceLoss):
    """``dice_weight * DiceLoss + ce_weight * weighted cross-entropy``, per sample ``(B,)``.

    The cross-entropy sees every pixel, so it also penalises false positives on slices without
    lesion and gives a useful gradient from the first step, while the Dice term keeps the
    small lesion from being swamped by background pixels.

    Args:
        class_weights, include_background, batch_dice, epsilon, from_logits: of the Dice term,
            as :class:`~medseg.losses.dice.DiceLoss`.
        ce_class_weights: per-class cross-entropy weights (background first); ``None`` = equal.
        dice_weight, ce_weight: weights of the two terms (default 1 and 1).

    Example:
        >>> loss = DiceCELoss(ce_class_weights=[1.0, 3.0])
        >>> loss(np.array([[[0, 1], [0, 0]]]), probs)   # shape (1,)
    """

    def __init__(self, class_weights=None, include_background=False, batch_dice=False,
                 epsilon=1e-6, from_logits=False, ce_class_weights=None, dice_weight=1.0,
                 ce_weight=1.0, name="dice_ce_loss", **kwargs):
        super().__init__(class_weights, include_background, batch_dice, epsilon, from_logits,
                         name=name, **kwargs)
        self.ce_class_weights = _overlap.check_class_weights(ce_class_weights, "DiceCELoss")
        if float(dice_weight) < 0 or float(ce_weight) < 0 or dice_weight + ce_weight <= 0:
            raise ValueError(
                "DiceCELoss: dice_weight and ce_weight must be >= 0 and not both 0, found "
                f"{dice_weight} and {ce_weight}"
            )
        self.dice_weight, self.ce_weight = float(dice_weight), float(ce_weight)

    def call(self, y_true, y_pred):
        probs, onehot, weights, sums = self._sums(y_true, y_pred)
        dice = _overlap.per_sample(self._loss_from_sums(*sums, weights), probs)
        if self.ce_class_weights is not None and len(self.ce_class_weights) != probs.shape[-1]:
            raise ValueError(
                f"DiceCELoss: ce_class_weights has {len(self.ce_class_weights)} values "
                f"{self.ce_class_weights} but the predictions have {probs.shape[-1]} classes"
            )
        ce = weighted_cross_entropy(
            onehot, probs, self.ce_class_weights, self.from_logits, logits=y_pred
        )
        return self.dice_weight * dice + self.ce_weight * ce

    def get_config(self):
        config = super().get_config()
        config.update(
            ce_class_weights=self.ce_class_weights,
            dice_weight=self.dice_weight,
            ce_weight=self.ce_weight,
        )
        return config
