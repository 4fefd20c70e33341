"""Shared arithmetic of the overlap losses and metrics: one-hot targets, per-class sums.

Kept private: the public names live in :mod:`medseg.losses.dice`, :mod:`.compound` and
:mod:`.metrics`.
"""

from __future__ import annotations

import keras
from keras import ops


def as_probabilities(y_pred, from_logits: bool):
    """``(B, *spatial, C)`` float32 probabilities (softmax over the last axis if logits)."""
    y_pred = ops.cast(y_pred, "float32")
    if len(y_pred.shape) < 3:
        raise ValueError(
            "expected predictions of shape (batch, *spatial, num_classes), found shape "
            f"{tuple(y_pred.shape)}"
        )
    return ops.softmax(y_pred, axis=-1) if from_logits else y_pred


#: Unlabelled voxels in class-index targets (``--ignore-label``): they enter no loss and no metric.
#: The same value as :data:`medseg.io.classes.IGNORE_INDEX` (``tests/test_ignore_label.py``).
IGNORE_INDEX = 255


def labelled_pixels(y_true, num_classes: int, spatial_rank: int):
    """float32 ``(B, *spatial)``: 1 where the target is labelled, 0 at :data:`IGNORE_INDEX`;
    None for one-hot targets (every pixel labelled)."""
    rank = len(y_true.shape)
    if rank == spatial_rank + 2 and y_true.shape[-1] == num_classes and num_classes > 1:
        return None
    if rank == spatial_rank + 2 and y_true.shape[-1] == 1:
        y_true = ops.squeeze(y_true, axis=-1)
    indices = ops.cast(ops.round(ops.cast(y_true, "float32")), "int32")
    return ops.cast(ops.not_equal(indices, IGNORE_INDEX), "float32")


def one_hot_targets(y_true, num_classes: int, spatial_rank: int):
    """Targets as float32 one-hot ``(B, *spatial, C)``.

    Accepts class indices ``(B, *spatial)`` or ``(B, *spatial, 1)`` (any numeric dtype; Keras
    casts targets to float32 before a loss sees them), or an already one-hot
    ``(B, *spatial, C)`` array when ``C > 1``. Indices outside ``0..C-1`` give an all-zero row
    (``medseg.train.diagnostics.check_labels`` reports such labels).
    """
    rank = len(y_true.shape)
    if rank == spatial_rank + 2 and y_true.shape[-1] == num_classes and num_classes > 1:
        return ops.cast(y_true, "float32")
    if rank == spatial_rank + 2 and y_true.shape[-1] == 1:
        y_true = ops.squeeze(y_true, axis=-1)
    elif rank != spatial_rank + 1:
        raise ValueError(
            f"expected targets as class indices of shape (batch, *spatial) or "
            f"(batch, *spatial, 1), or one-hot (batch, *spatial, {num_classes}); found shape "
            f"{tuple(y_true.shape)} for predictions with {spatial_rank} spatial axes"
        )
    # round() so float32-cast indices (e.g. 0.99999994) map to the right class.
    indices = ops.cast(ops.round(ops.cast(y_true, "float32")), "int32")
    return ops.one_hot(indices, num_classes, dtype="float32")


def replica_sum(tensors):
    """Sum tensors over the replicas of the current ``tf.distribute`` strategy (if any).

    The gradient of a replica all-reduce SUM is itself an all-reduce SUM, so a loss built on the
    summed statistics back-propagates into every replica's own predictions exactly as the
    single-device loss would.
    """
    if keras.backend.backend() != "tensorflow":
        return tensors
    import tensorflow as tf

    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return tensors
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, tensors)


def overlap_sums(onehot, probs, batch_dice: bool, labelled=None):
    """Per-class soft overlap statistics.

    ``labelled``: float32 ``(B, *spatial)`` 1/0 (:func:`labelled_pixels`), or None (all pixels).
    Unlabelled pixels count nowhere: their one-hot row is 0 and their probabilities are left out
    of ``pred_sum`` and ``n_pixels``, so the statistics equal those of the labelled pixels alone.

    Returns:
        ``(intersection, pred_sum, ref_sum, n_pixels)``: the first three ``(B, C)`` per sample,
        or ``(1, C)`` summed over the global batch (all replicas) when ``batch_dice``;
        ``n_pixels`` is the matching pixel count (scalar float32; ``(B, 1)`` / ``(1, 1)`` with
        ``labelled``).
    """
    axes = tuple(range(1, len(probs.shape) - 1))
    intersection = ops.sum(onehot * probs, axis=axes)
    shape = ops.shape(probs)
    if labelled is None:
        pred_sum = ops.sum(probs, axis=axes)
        n_pixels = ops.cast(ops.prod(ops.convert_to_tensor(shape[1:-1], dtype="int32")), "float32")
        sample_pixels = ops.reshape(n_pixels * ops.cast(shape[0], "float32"), (1, 1))
    else:
        pred_sum = ops.sum(probs * ops.expand_dims(labelled, -1), axis=axes)
        n_pixels = ops.reshape(ops.sum(labelled, axis=axes), (-1, 1))
        sample_pixels = ops.sum(n_pixels, axis=0, keepdims=True)
    ref_sum = ops.sum(onehot, axis=axes)
    if batch_dice:
        stats = [
            ops.sum(intersection, axis=0, keepdims=True),
            ops.sum(pred_sum, axis=0, keepdims=True),
            ops.sum(ref_sum, axis=0, keepdims=True),
            sample_pixels,
        ]
        intersection, pred_sum, ref_sum, total = replica_sum(stats)
        n_pixels = ops.reshape(total, ()) if labelled is None else total
    return intersection, pred_sum, ref_sum, n_pixels


def per_sample(values, probs):
    """Broadcast ``values`` of shape ``(1,)`` or ``(B,)`` to the local batch ``(B,)``."""
    batch_zeros = ops.zeros((ops.shape(probs)[0],), dtype="float32")
    return batch_zeros + ops.reshape(values, (-1,))


def included_weights(class_weights, num_classes: int, include_background: bool, owner: str):
    """Weights ``(C,)`` of the classes that enter the loss (background weight 0 if excluded)."""
    if class_weights is None:
        weights = [1.0] * num_classes
    else:
        weights = [float(w) for w in class_weights]
        if len(weights) != num_classes:
            raise ValueError(
                f"{owner}: class_weights has {len(weights)} values {weights} but the predictions "
                f"have {num_classes} classes (give one weight per class, background first)"
            )
    if not include_background:
        if num_classes < 2:
            raise ValueError(
                f"{owner}: include_background=False needs at least 2 classes, found {num_classes}"
            )
        weights[0] = 0.0
    if sum(weights) <= 0:
        raise ValueError(f"{owner}: the included classes all have weight 0: {weights}")
    return ops.convert_to_tensor(weights, dtype="float32")


def check_class_weights(class_weights, owner: str):
    """Validate user class weights at construction (non-negative numbers); returns a list."""
    if class_weights is None:
        return None
    try:
        weights = [float(w) for w in class_weights]
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{owner}: class_weights must be a sequence of numbers, found {class_weights!r}"
        ) from exc
    if any(w < 0 for w in weights):
        raise ValueError(f"{owner}: class_weights must be >= 0, found {weights}")
    return weights


def weighted_class_mean(per_class, weights):
    """``(N, C)`` per-class losses -> ``(N,)`` weighted mean over classes."""
    return ops.sum(per_class * weights, axis=-1) / ops.sum(weights)


def empty_reference_loss(pred_sum, n_pixels):
    """Loss of a class whose reference is empty: the soft false-positive fraction ``P / N``.

    0 for a confident empty prediction, 1 if every pixel is predicted as that class; its gradient
    is ``1/N`` per pixel (cross-entropy scale), so empty slices neither give the Dice term's
    constant 1 (smooth/epsilon -> 0) nor a free 1.0 score (smooth = 1).
    """
    return pred_sum / ops.maximum(n_pixels, 1.0)  # a sample without labelled pixel: 0
