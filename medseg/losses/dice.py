"""Overlap losses: soft Dice, generalized Dice, focal Tversky.

All losses take probabilities ``(B, H, W, C)`` (or logits with ``from_logits=True``; any number
of spatial axes) and targets as class indices ``(B, H, W)`` / ``(B, H, W, 1)`` (or one-hot
``(B, H, W, C)``), and return **one value per sample**, shape ``(B,)``. Keras then averages over
the global batch (``sum_over_batch_size``), which is exact under ``tf.distribute``; a loss that
returns one scalar is neither averaged nor scaled by Keras and is counted once per replica.

Empty references and the epsilon (why not ``smooth = 1``):

* A class present in the reference of a sample gets the soft Dice loss
  ``1 - (2 I + eps) / (P + G + eps)`` with a tiny ``eps`` (1e-6) that only guards the division:
  it does not move the value (``smooth = 1`` adds 1 pixel of agreement to every sample, which
  is large for a 20-pixel lesion).
* A class absent from the reference (``G = 0``, e.g. a slice without lesion) has no defined
  Dice. ``smooth = 1`` scores such a slice 1.0 whenever the prediction is near-empty, so on data
  with 71 % empty slices an all-background model gets a mean Dice of 0.71; ``eps -> 0`` instead
  gives it loss 1 with no gradient whatever the model does, so empty slices dominate the value.
  medseg uses the soft false-positive fraction ``P / N`` for such a class: 0 for an empty
  prediction (empty-empty contributes 0 loss), up to 1 for an all-foreground prediction, with a
  cross-entropy-sized gradient. It is a loss term only: the metrics in
  :mod:`medseg.losses.metrics` pool TP/FP/FN over the epoch, so an all-background model scores
  foreground Dice 0, not 0.71.
* ``include_background=False`` (default): the background Dice is near 1 for any model and would
  dilute the lesion term; it is left out. ``class_weights`` (one per class, background first)
  weight the per-class terms; they are normalised to sum to 1 over the included classes, so the
  loss stays in ``[0, 1]``.
* ``batch_dice=True`` pools the sums over the global batch (all replicas) first: one Dice per
  class for the whole batch, returned repeated per sample so the Keras mean equals it.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops

from medseg.losses import _overlap

__all__ = ["DiceLoss", "GeneralizedDiceLoss", "FocalTverskyLoss"]


class _OverlapLoss(keras.losses.Loss):
    """Base: argument checks, one-hot targets, sums; subclasses turn sums into per-class losses."""

    def __init__(
        self,
        class_weights: Sequence[float] | None = None,
        include_background: bool = False,
        batch_dice: bool = False,
        epsilon: float = 1e-6,
        from_logits: bool = False,
        name: str | None = None,
        reduction: str = "sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype or "float32")
        owner = type(self).__name__
        self.class_weights = _overlap.check_class_weights(class_weights, owner)
        self.include_background = bool(include_background)
        self.batch_dice = bool(batch_dice)
        if not float(epsilon) >= 0:
            raise ValueError(f"{owner}: epsilon must be >= 0, found {epsilon}")
        self.epsilon = float(epsilon)
        self.from_logits = bool(from_logits)

    def _sums(self, y_true, y_pred):
        probs = _overlap.as_probabilities(y_pred, self.from_logits)
        num_classes = probs.shape[-1]
        onehot = _overlap.one_hot_targets(y_true, num_classes, len(probs.shape) - 2)
        # Unlabelled pixels (ignore value) count nowhere: the loss of the labelled pixels alone.
        labelled = _overlap.labelled_pixels(y_true, num_classes, len(probs.shape) - 2)
        weights = _overlap.included_weights(
            self.class_weights, num_classes, self.include_background, type(self).__name__
        )
        return probs, onehot, weights, _overlap.overlap_sums(onehot, probs, self.batch_dice, labelled)

    def call(self, y_true, y_pred):
        probs, onehot, weights, sums = self._sums(y_true, y_pred)
        return _overlap.per_sample(self._loss_from_sums(*sums, weights), probs)

    def _loss_from_sums(self, intersection, pred_sum, ref_sum, n_pixels, weights):
        per_class = self._per_class(intersection, pred_sum, ref_sum)
        empty = _overlap.empty_reference_loss(pred_sum, n_pixels)
        per_class = ops.where(ref_sum > 0, per_class, empty)
        return _overlap.weighted_class_mean(per_class, weights)

    def get_config(self):
        config = super().get_config()
        config.update(
            class_weights=self.class_weights,
            include_background=self.include_background,
            batch_dice=self.batch_dice,
            epsilon=self.epsilon,
            from_logits=self.from_logits,
        )
        return config


@keras.saving.register_keras_serializable(package="medseg")
class DiceLoss(_OverlapLoss):
    """Soft Dice loss per class, with class weights; one value per sample ``(B,)``.

    Per sample ``b`` and class ``c`` (sums over pixels; ``p`` probabilities, ``g`` one-hot
    reference): ``I = sum p g``, ``P = sum p``, ``G = sum g``,
    ``L = 1 - (2 I + eps) / (P + G + eps)`` if ``G > 0`` else ``P / N`` (soft false-positive
    fraction, see the module docstring). The sample's loss is the class-weighted mean of ``L``
    over the included classes, in ``[0, 1]``.

    Args:
        class_weights: one weight per class (background first); ``None`` = equal.
        include_background: include class 0 (default False: it is near 1 for any model).
        batch_dice: one Dice over the whole global batch (sums all-reduced across replicas)
            instead of one per sample; every sample then carries the batch value.
        epsilon: guards the division only (default 1e-6); not a smoothing term.
        from_logits: ``y_pred`` are logits (softmax applied here).

    Example:
        >>> model.compile(optimizer="adam", loss=DiceLoss(), metrics=[ForegroundDice()])
    """

    def __init__(self, class_weights=None, include_background=False, batch_dice=False,
                 epsilon=1e-6, from_logits=False, name="dice_loss", **kwargs):
        super().__init__(class_weights, include_background, batch_dice, epsilon, from_logits,
                         name=name, **kwargs)

    def _per_class(self, intersection, pred_sum, ref_sum):
        denominator = ops.where(ref_sum > 0, pred_sum + ref_sum + self.epsilon, 1.0)
        return 1.0 - (2.0 * intersection + self.epsilon) / denominator


@keras.saving.register_keras_serializable(package="medseg")
class FocalTverskyLoss(_OverlapLoss):
    """Focal Tversky loss (Abraham & Khan 2019); one value per sample ``(B,)``.

    Tversky index ``TI = (I + eps) / (I + alpha FN + beta FP + eps)`` with soft
    ``FN = G - I`` and ``FP = P - I``; loss ``(1 - TI) ** gamma``. ``alpha > beta`` penalises
    missed lesion more than false alarms; ``gamma < 1`` (the paper's 1/(4/3) = 0.75) keeps the
    gradient large for hard, poorly segmented samples. Classes with an empty reference use the
    soft false-positive fraction, as :class:`DiceLoss`.

    Args:
        alpha: weight of false negatives (default 0.7).
        beta: weight of false positives (default 0.3).
        gamma: focal exponent (default 0.75).
        class_weights, include_background, batch_dice, epsilon, from_logits: as
            :class:`DiceLoss`.
    """

    def __init__(self, alpha=0.7, beta=0.3, gamma=0.75, class_weights=None,
                 include_background=False, batch_dice=False, epsilon=1e-6, from_logits=False,
                 name="focal_tversky_loss", **kwargs):
        super().__init__(class_weights, include_background, batch_dice, epsilon, from_logits,
                         name=name, **kwargs)
        for key, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
            if not float(value) > 0:
                raise ValueError(f"FocalTverskyLoss: {key} must be > 0, found {value}")
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)

    def _per_class(self, intersection, pred_sum, ref_sum):
        fn = ref_sum - intersection
        fp = pred_sum - intersection
        denominator = ops.where(
            ref_sum > 0, intersection + self.alpha * fn + self.beta * fp + self.epsilon, 1.0
        )
        tversky = (intersection + self.epsilon) / denominator
        # Floor before the power: d/dx x**0.75 is infinite at x = 0 (a perfect sample).
        return ops.power(ops.maximum(1.0 - tversky, 1e-7), self.gamma)

    def get_config(self):
        config = super().get_config()
        config.update(alpha=self.alpha, beta=self.beta, gamma=self.gamma)
        return config


@keras.saving.register_keras_serializable(package="medseg")
class GeneralizedDiceLoss(_OverlapLoss):
    """Generalized Dice loss (Sudre et al. 2017); one value per sample ``(B,)``.

    ``L = 1 - (2 sum_c w_c I_c + eps) / (sum_c w_c (P_c + G_c) + eps)`` with
    ``w_c = 1 / G_c**2`` over the included classes, so rare classes count as much as frequent
    ones (which is why the background may be included, the default here). A class absent from
    the sample's reference gets the largest weight of the present classes (MONAI's rule), so its
    false positives still cost; a sample with no included class present gets the mean soft
    false-positive fraction (as :class:`DiceLoss`).

    Args:
        include_background: include class 0 (default True, as in the paper).
        batch_dice, epsilon, from_logits: as :class:`DiceLoss`. No class weights: the
            ``1/G**2`` weights replace them.
    """

    def __init__(self, include_background=True, batch_dice=False, epsilon=1e-6,
                 from_logits=False, name="generalized_dice_loss", **kwargs):
        if kwargs.pop("class_weights", None) is not None:
            raise ValueError(
                "GeneralizedDiceLoss takes no class_weights: its class weights are 1/G**2 "
                "(use DiceLoss(class_weights=...) for fixed weights)"
            )
        super().__init__(None, include_background, batch_dice, epsilon, from_logits,
                         name=name, **kwargs)

    def _loss_from_sums(self, intersection, pred_sum, ref_sum, n_pixels, weights):
        included = ops.cast(weights > 0, "float32")[None, :]
        present = ops.cast(ref_sum > 0, "float32") * included
        inverse = present / ops.square(ops.maximum(ref_sum, 1.0))
        max_w = ops.max(inverse, axis=-1, keepdims=True)
        w = inverse + (included - present) * max_w
        numerator = 2.0 * ops.sum(w * intersection, axis=-1)
        denominator = ops.sum(w * (pred_sum + ref_sum), axis=-1)
        any_present = ops.sum(present, axis=-1) > 0
        gdl = 1.0 - (numerator + self.epsilon) / ops.where(
            any_present, denominator + self.epsilon, 1.0
        )
        empty = _overlap.weighted_class_mean(
            _overlap.empty_reference_loss(pred_sum, n_pixels), weights
        )
        return ops.where(any_present, gdl, empty)

    def get_config(self):
        config = super().get_config()
        config.pop("class_weights", None)
        return config
