"""Dice + (weighted) cross-entropy, the recommended training loss (nnU-Net's default recipe)."""

from __future__ import annotations

import math

import keras
from keras import ops

from medseg.losses import _overlap
from medseg.losses.dice import DiceLoss

__all__ = ["DiceCELoss", "balanced_class_weights", "weighted_cross_entropy"]


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


#: Upper bound of :func:`balanced_class_weights`: a class seen in a handful of voxels would
#: otherwise get a weight in the hundreds and be painted everywhere.
MAX_BALANCED_WEIGHT = 30.0


def balanced_class_weights(fractions, power: float = 0.5, max_weight: float = MAX_BALANCED_WEIGHT) -> list[float]:
    """Cross-entropy class weights, background first, from the foreground classes' voxel shares.

    ``w_0 = 1`` and ``w_c = min(max_weight, max(1, f_0 / f_c) ** power)`` with ``f_0 = 1 - sum(f)``
    (a class as common as the background keeps weight 1).
    ``power=0.5`` (inverse square root of the frequency) lifts a class 100x rarer than the
    background to weight 10: enough for its pixels to be heard next to a large class within a
    few hundred steps, while the background still outweighs it in pixel mass (full inverse
    frequency, ``power=1``, floods small classes with false positives). An absent class
    (``f_c = 0``) gets ``max_weight``.

    Args:
        fractions: share of each foreground class in ``[0, 1]``, summing to at most 1.
        power: exponent of the frequency ratio (0 gives equal weights).
        max_weight: cap of every weight (>= 1).

    Raises:
        ValueError: on fractions outside ``[0, 1]`` or summing above 1, ``power < 0`` or
            ``max_weight < 1``.
    """
    f = [float(v) for v in fractions]
    if any(not 0.0 <= v <= 1.0 for v in f) or sum(f) > 1.0 + 1e-9:
        raise ValueError(f"class fractions must lie in [0, 1] and sum to at most 1, found {f}")
    if power < 0 or max_weight < 1:
        raise ValueError(f"power must be >= 0 and max_weight >= 1, found {power} and {max_weight}")
    background = max(0.0, 1.0 - sum(f))
    weights = [1.0]
    for v in f:
        ratio = background / v if v > 0 else math.inf
        weights.append(float(min(max_weight, max(1.0, ratio) ** power)))
    return weights


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
