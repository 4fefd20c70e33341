"""Output bias set to the class priors (Lin et al. 2017, "Focal loss", section 4.1).

A freshly built softmax head predicts every class with probability ``1 / K``: the aorta, 0.2 %
of the body, is then predicted over a fifth of each patch. Its weighted cross-entropy first
pushes it up further (0.41 of the pixels after 250 steps, measured), then its Dice's false
positives drive it to nothing, and a class that is never predicted gets little gradient back:
in those runs the aorta and the stomach were never learned. Starting each head at the class
priors (``softmax(bias) = priors``) removes that swing: the same run learned every class in the
first 250 steps.

Example:
    >>> bias = prior_logits([0.05, 0.002])              # background 0.948, then the classes
    >>> set_output_bias(model, bias)                    # every output head of the model
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["prior_logits", "set_output_bias", "MIN_PRIOR"]

#: Floor of a class prior (a class absent from the training patients still gets a finite bias).
MIN_PRIOR = 1e-4


def prior_logits(fractions: Sequence[float]) -> list[float]:
    """Softmax logits whose softmax is ``[1 - sum(fractions), *fractions]`` (each floored at
    :data:`MIN_PRIOR`, then renormalised), centred on 0.

    Raises:
        ValueError: a fraction outside [0, 1], or fractions summing to more than 1.
    """
    f = np.asarray(fractions, dtype=np.float64)
    if f.ndim != 1 or f.size == 0 or not np.all(np.isfinite(f)) or f.min() < 0 or f.sum() > 1:
        raise ValueError(f"class fractions must be one value per class in [0, 1] summing to at most 1, "
                         f"found {list(fractions)!r}")
    priors = np.maximum(np.concatenate([[1.0 - f.sum()], f]), MIN_PRIOR)
    logits = np.log(priors / priors.sum())
    return [float(v) for v in logits - logits.mean()]


def set_output_bias(model, bias: Sequence[float]) -> list[str]:
    """Assign ``bias`` to the bias of every output head of ``model``: the output layer's own
    bias, else that of the layer whose output it activates (a 1x1 convolution before a softmax).

    Returns the names of the layers changed.

    Raises:
        ValueError: an output whose head has no bias of ``len(bias)`` values (names the output).
    """
    bias = np.asarray(bias, dtype=np.float32)
    producers = {}
    for layer in model.layers:
        try:
            producers[id(layer.output)] = layer
        except (AttributeError, ValueError):  # a layer called more than once has no single output
            continue
    changed = []
    for name in model.output_names:
        head = model.get_layer(name)
        layer = head if _bias_of(head, bias.size) is not None else producers.get(id(head.input))
        target = _bias_of(layer, bias.size) if layer is not None else None
        if target is None:
            raise ValueError(f"output {name!r} of model {model.name!r}: neither its layer nor the layer before it "
                             f"has a bias of {bias.size} values to set to the class priors")
        target.assign(bias.astype(target.dtype))
        changed.append(layer.name)
    return changed


def _bias_of(layer, size: int):
    b = getattr(layer, "bias", None)
    return b if b is not None and tuple(b.shape) == (size,) else None
