"""The regularization part of a Keras model's loss (kernel regularizers and ``add_loss`` terms)."""

from __future__ import annotations

import keras

__all__ = ["regularization_loss"]


def regularization_loss(model: keras.Model) -> float:
    """``sum(model.losses)`` now, as a float; 0.0 for a model without penalties.

    The loss Keras reports is the data loss plus this; an L2 penalty easily adds 0.7 and explains
    a "Dice loss above 1".
    """
    losses = list(model.losses)
    if not losses:
        return 0.0
    return float(sum(float(keras.ops.convert_to_numpy(v)) for v in losses))
