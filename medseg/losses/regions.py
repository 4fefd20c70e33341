"""Loss for nested regions (BraTS-style whole ⊃ core ⊃ enhancing): one sigmoid per region.

Targets are multi-hot ``(B, H, W, R)`` (region ``r`` is 1 wherever it holds; regions overlap),
predictions sigmoid probabilities ``(B, H, W, R)``. Per sample and region: the soft Dice loss of
:mod:`medseg.losses.dice` (with its empty-reference rule: the soft false-positive fraction),
plus the binary cross-entropy; the mean over regions, **one value per sample** ``(B,)`` as every
medseg loss (exact under ``tf.distribute``). nnU-Net trains regions the same way (Dice + BCE
on sigmoid outputs).
"""

from __future__ import annotations

import keras
from keras import ops

from medseg.losses import _overlap

__all__ = ["RegionDiceBCELoss", "multi_hot_from_bits"]


@keras.saving.register_keras_serializable(package="medseg")
class RegionDiceBCELoss(keras.losses.Loss):
    """``dice_weight * soft Dice + bce_weight * BCE`` per region, averaged over regions; ``(B,)``.

    Args:
        dice_weight, bce_weight: weights of the two terms (>= 0, not both 0).
        epsilon: guards the Dice division only (does not move the value).
    """

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0, epsilon: float = 1e-6,
                 name: str = "region_dice_bce", reduction: str = "sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype or "float32")
        if dice_weight < 0 or bce_weight < 0 or dice_weight + bce_weight == 0:
            raise ValueError(f"weights must be >= 0 and not both 0, found dice {dice_weight}, bce {bce_weight}")
        self.dice_weight, self.bce_weight, self.epsilon = float(dice_weight), float(bce_weight), float(epsilon)

    def call(self, y_true, y_pred):
        probs = ops.cast(y_pred, "float32")
        target = ops.cast(y_true, "float32")
        # Unlabelled pixels carry -1 in every region (multi_hot_from_bits): they count nowhere.
        labelled = ops.cast(target[..., 0] >= 0.0, "float32")
        target = ops.maximum(target, 0.0)
        intersection, pred_sum, ref_sum, n_pixels = _overlap.overlap_sums(target, probs, False, labelled)
        dice = 1.0 - (2.0 * intersection + self.epsilon) / (pred_sum + ref_sum + self.epsilon)
        dice = ops.where(ref_sum > 0, dice, _overlap.empty_reference_loss(pred_sum, n_pixels))
        clipped = ops.clip(probs, 1e-7, 1.0 - 1e-7)
        bce = -(target * ops.log(clipped) + (1.0 - target) * ops.log(1.0 - clipped))
        spatial = tuple(range(1, len(probs.shape) - 1))
        bce = ops.sum(ops.mean(bce, axis=-1) * labelled, axis=spatial) / ops.maximum(ops.sum(labelled, axis=spatial), 1.0)
        return self.dice_weight * ops.mean(dice, axis=-1) + self.bce_weight * bce

    def get_config(self):
        return {**super().get_config(), "dice_weight": self.dice_weight, "bce_weight": self.bce_weight,
                "epsilon": self.epsilon}


def multi_hot_from_bits(bits, n_regions: int):
    """Region bits ``(B, H, W)`` (bit ``r`` set where region ``r`` holds) -> float32 multi-hot
    ``(B, H, W, n_regions)`` (what the training batches of a region model carry); an unlabelled
    pixel (ignore value, at most 7 regions) is -1 in every region."""
    powers = ops.convert_to_tensor([1 << r for r in range(n_regions)], dtype="int32")
    bits = ops.expand_dims(ops.cast(bits, "int32"), -1)
    multi_hot = ops.cast(ops.bitwise_and(bits, powers) > 0, "float32")
    if n_regions > 7:  # 8 regions take every bit: no ignore value (at most 7 with one)
        return multi_hot
    # Unlabelled pixels (_overlap.IGNORE_INDEX): -1 in every region, skipped by the loss.
    return ops.where(ops.equal(bits, _overlap.IGNORE_INDEX), -1.0, multi_hot)
