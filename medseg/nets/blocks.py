"""Building blocks shared by medseg's encoder-decoder networks (UNet++ and U-Net).

Checks of the architecture arguments, the two-convolution node, the 2x up-sampling and the
float32 softmax head. Only stock Keras layers: models built from them save to ``.keras`` and load
with plain ``keras.saving.load_model``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import numpy as np

__all__ = [
    "UPSAMPLING",
    "check_input_shape",
    "check_levels",
    "conv_block",
    "default_filters",
    "initializer",
    "layer_seeds",
    "nearest_valid_sizes",
    "softmax_head",
    "upsample",
]

UPSAMPLING = ("transpose", "bilinear")

_INITIALIZERS = {"he_normal": "HeNormal", "glorot_uniform": "GlorotUniform"}


def layer_seeds(seed):
    """Seeds of a model's random layers, in the order they are built, from ``seed`` alone: a
    private ``random.Random(seed)`` drawing what Keras draws for an unseeded initializer
    (``randint(1, 10**9)``, keras.random.make_default_seed), so a network built with a seed has
    exactly the starting weights it had when medseg seeded Python's global ``random`` instead, and
    the caller's generators are never touched. None: no seeds (Keras draws its own); a stream
    this function made is returned as it is (models built one after the other from one stream)."""
    if seed is None or not isinstance(seed, (int, np.integer)):
        return seed
    import random

    rng = random.Random(int(seed))

    def draw():
        while True:
            yield rng.randint(1, int(1e9))

    return draw()


def initializer(kind: str, seeds):
    """The kernel initializer ``kind`` (``"he_normal"``, ``"glorot_uniform"``) seeded by the next
    of ``seeds`` (:func:`layer_seeds`); the plain name when ``seeds`` is None."""
    if seeds is None:
        return kind
    return getattr(keras.initializers, _INITIALIZERS[kind])(seed=next(seeds))


def nearest_valid_sizes(size: int, depth: int) -> tuple[int, int]:
    """Nearest multiples of ``2**depth`` below and above ``size`` (equal if ``size`` is valid).

    The lower one is never below ``2**depth``.
    """
    divisor = 2**depth
    lower = max(divisor, (int(size) // divisor) * divisor)
    upper = int(math.ceil(int(size) / divisor)) * divisor
    return lower, max(upper, divisor)


def check_input_shape(hw: Sequence[int | None], depth: int = 4, *, network: str = "network") -> None:
    """Check that a (height, width) pair can go through a network with ``depth`` down-samplings.

    Args:
        hw: ``(height, width)`` in pixels; ``None`` entries (any size) are accepted.
        depth: number of down-samplings; each spatial size must be a positive multiple of
            ``2**depth``.
        network: the network's name in the message (``"UNet++"``).

    Raises:
        ValueError: naming the bad size(s) and the nearest valid sizes (pad the input to the
            upper one; ``medseg.infer`` does this automatically).
    """
    if len(hw) != 2:
        raise ValueError(f"expected a (height, width) pair, found {tuple(hw)!r}")
    divisor = 2**depth
    problems = []
    for axis, size in zip(("height", "width"), hw):
        if size is None:
            continue
        if int(size) <= 0 or int(size) % divisor:
            lo, hi = nearest_valid_sizes(max(int(size), 1), depth)
            problems.append(
                f"{axis} {size} is not a positive multiple of 2**depth = {divisor} "
                f"(nearest valid sizes: {lo} or {hi})"
            )
    if problems:
        raise ValueError(
            f"input shape {tuple(hw)} does not fit a {network} of depth {depth}: "
            + "; ".join(problems) + "; pad or crop the images to a valid size"
        )


def default_filters(depth: int) -> list[int]:
    """The paper's filters per level, ``32 * 2**level`` capped at 512, for ``depth + 1`` levels."""
    return [min(32 * 2**level, 512) for level in range(int(depth) + 1)]


def check_levels(filters: Sequence[int], depth: int, upsampling: str, dropout: float) -> list[int]:
    """Check the level arguments of an encoder-decoder network; returns ``filters`` as ints.

    Raises:
        ValueError: ``depth < 1``, ``filters`` without ``depth + 1`` values, an unknown
            ``upsampling`` or a dropout rate outside ``[0, 1)``.
    """
    if int(depth) < 1:
        raise ValueError(f"depth must be >= 1, found {depth}")
    filters = [int(f) for f in filters]
    if len(filters) != depth + 1:
        raise ValueError(
            f"filters must have depth + 1 = {depth + 1} values (one per level), found "
            f"{len(filters)}: {filters}"
        )
    if upsampling not in UPSAMPLING:
        raise ValueError(f"upsampling must be one of {UPSAMPLING}, found {upsampling!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), found {dropout}")
    return filters


def conv_block(x, filters, prefix, *, batch_norm, dropout, regularizer, sync_batch_norm, dtype=None, seeds=None):
    """Two 3x3 convolutions, each followed by BatchNorm (optional), ReLU and dropout (if > 0).

    Layers are named ``<prefix>_conv1``, ``<prefix>_bn1``, ``<prefix>_relu1``, ``<prefix>_drop1``,
    then the same with ``2``. ``dtype``: the layers' dtype policy (None: Keras' global one);
    ``seeds``: :func:`layer_seeds` for the initializers and dropout (None: unseeded).
    """
    # The convolution bias is redundant in front of BatchNorm's beta, so it is dropped then.
    for k in (1, 2):
        x = keras.layers.Conv2D(
            filters,
            3,
            padding="same",
            use_bias=not batch_norm,
            kernel_initializer=initializer("he_normal", seeds),
            kernel_regularizer=regularizer,
            dtype=dtype,
            name=f"{prefix}_conv{k}",
        )(x)
        if batch_norm:
            x = keras.layers.BatchNormalization(
                synchronized=sync_batch_norm, dtype=dtype, name=f"{prefix}_bn{k}"
            )(x)
        x = keras.layers.Activation("relu", dtype=dtype, name=f"{prefix}_relu{k}")(x)
        if dropout > 0:
            x = keras.layers.Dropout(dropout, seed=None if seeds is None else next(seeds), dtype=dtype,
                                     name=f"{prefix}_drop{k}")(x)
    return x


def upsample(x, filters, name, *, upsampling, regularizer, dtype=None, seeds=None):
    """2x up-sampling: a learnable 2x2 stride-2 transposed convolution to ``filters`` channels
    (``"transpose"``), or parameter-free bilinear interpolation keeping the channels."""
    if upsampling == "transpose":
        return keras.layers.Conv2DTranspose(
            filters,
            2,
            strides=2,
            padding="same",
            kernel_initializer=initializer("he_normal", seeds),
            kernel_regularizer=regularizer,
            dtype=dtype,
            name=name,
        )(x)
    return keras.layers.UpSampling2D(2, interpolation="bilinear", dtype=dtype, name=name)(x)


def softmax_head(x, num_classes, *, regularizer, logits_name, name, activation: str = "softmax", seeds=None):
    """1x1 convolution to ``num_classes`` logits, then softmax; output ``(B, H, W, num_classes)``.
    ``activation="sigmoid"``: one independent probability per channel (nested regions).

    Both layers compute in float32 even under mixed_float16/bfloat16: a half-precision softmax
    saturates and the Dice/CE of small lesions loses its gradient.
    """
    logits = keras.layers.Conv2D(
        int(num_classes),
        1,
        kernel_initializer=initializer("glorot_uniform", seeds),
        kernel_regularizer=regularizer,
        dtype="float32",
        name=logits_name,
    )(x)
    if activation not in ("softmax", "sigmoid"):
        raise ValueError(f"head activation must be softmax or sigmoid, found {activation!r}")
    return keras.layers.Activation(activation, dtype="float32", name=name)(logits)
