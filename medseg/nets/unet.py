"""Plain 2D U-Net (Ronneberger et al. 2015) as a Keras 3 functional model.

Level ``i`` (0 = full resolution) of the encoder is two 3x3 convolutions (+ BatchNorm) + ReLU on
the max-pooled level above; the decoder up-samples level ``i + 1``, concatenates the encoder's
level ``i`` (the skip connection) and applies the same two convolutions. A 1x1 convolution +
softmax on decoder level 0 gives the one output, ``head``.

Same conventions as :mod:`medseg.nets.unetpp` (the blocks of :mod:`medseg.nets.blocks`): stock
Keras layers only (``.keras`` files load without custom objects), a float32 head under mixed
precision, the L2 regularizer on every convolution. Layers are named ``enc{i}_...``,
``dec{i}_...``, ``logits`` and ``head``. Registered as network ``"unet"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Mapping

import keras

from medseg.nets.blocks import (check_input_shape, check_levels, conv_block, default_filters, layer_seeds, softmax_head,
                                upsample)
from medseg.nets.registry import Network, register_network

__all__ = ["HEAD", "UNet", "build_unet"]

#: Name of the U-Net's output.
HEAD = "head"


def build_unet(
    input_channels: int = 1,
    num_classes: int = 2,
    filters: Sequence[int] = (32, 64, 128, 256, 512),
    depth: int = 4,
    batch_norm: bool = True,
    dropout: float = 0.0,
    upsampling: str = "transpose",
    l2: float = 0.0,
    input_shape_hw: tuple[int | None, int | None] = (None, None),
    name: str = "unet",
    sync_batch_norm: bool = False,
    head_activation: str = "softmax",
    dtype=None,
    seed: int | None = None,
) -> keras.Model:
    """Build a U-Net that maps images to per-class softmax probabilities.

    Args:
        input_channels: image channels (1, or ``context_slices`` for 2.5D input).
        num_classes: output classes including background (class 0).
        filters: filters per resolution level, ``depth + 1`` values (finest first).
        depth: number of 2x down-samplings; input height/width must be multiples of
            ``2**depth``.
        batch_norm: BatchNorm after every convolution (the convolutions then have no bias).
        dropout: dropout rate after every convolution (0 disables the layers).
        upsampling: ``"transpose"`` (2x2 stride-2 transposed convolution to the level's filters)
            or ``"bilinear"`` (parameter-free; the next convolution mixes the channels).
        l2: L2 kernel-regularization factor of every convolution (0 disables it).
        input_shape_hw: fixed ``(height, width)`` or ``(None, None)`` for any valid size.
        name: model name.
        head_activation: ``"softmax"`` (classes), or ``"sigmoid"`` (one independent probability
            per output channel: nested regions); a run argument, not recorded in the spec.
        sync_batch_norm: synchronise BatchNorm statistics across replicas.
        dtype: dtype policy of every layer but the float32 head (e.g. ``"mixed_bfloat16"``;
            None: Keras' global policy).
        seed: seed of the initializers and dropout (same seed, same starting weights; None:
            Keras draws them from Python's global ``random``).

    Returns:
        A functional ``keras.Model``: input ``image`` ``(B, H, W, input_channels)`` float32,
        one output ``head``, float32 softmax ``(B, H, W, num_classes)`` (float32 under a
        mixed-precision policy too). Default configuration: 7,768,386 parameters (BatchNorm
        moving statistics included).

    Raises:
        ValueError: bad ``filters`` length, ``upsampling``, ``dropout``, ``depth``,
            ``num_classes``, or a fixed input size that is not a multiple of ``2**depth``.
    """
    filters = check_levels(filters, depth, upsampling, dropout)
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2 (background + lesion), found {num_classes}")
    check_input_shape(input_shape_hw, depth, network="U-Net")
    regularizer = keras.regularizers.L2(l2) if l2 > 0 else None
    seeds = layer_seeds(seed)
    block = dict(batch_norm=batch_norm, dropout=float(dropout), regularizer=regularizer,
                 sync_batch_norm=sync_batch_norm, dtype=dtype, seeds=seeds)

    inputs = keras.Input(shape=(*input_shape_hw, int(input_channels)), name="image")
    skips = []
    x = inputs
    for i in range(depth + 1):
        if i > 0:
            x = keras.layers.MaxPooling2D(2, dtype=dtype, name=f"enc{i}_pool")(x)
        x = conv_block(x, filters[i], f"enc{i}", **block)
        skips.append(x)
    for i in range(depth - 1, -1, -1):
        up = upsample(x, filters[i], f"dec{i}_up", upsampling=upsampling, regularizer=regularizer, dtype=dtype,
                      seeds=seeds)
        x = keras.layers.Concatenate(dtype=dtype, name=f"dec{i}_concat")([skips[i], up])
        x = conv_block(x, filters[i], f"dec{i}", **block)
    outputs = softmax_head(x, num_classes, regularizer=regularizer, logits_name="logits", name=HEAD,
                           activation=head_activation, seeds=seeds)
    return keras.Model(inputs=inputs, outputs=outputs, name=name)


@register_network("unet")
class UNet(Network):
    """Registry entry ``"unet"``: one output, :data:`HEAD`, run as is at inference."""

    title = "U-Net"
    builder = staticmethod(build_unet)

    @classmethod
    def complete(cls, args: Mapping[str, Any]) -> dict[str, Any]:
        full = super().complete(args)
        if "filters" not in args:
            full["filters"] = default_filters(full["depth"])
        full["filters"] = check_levels(full["filters"], full["depth"], full["upsampling"], full["dropout"])
        return full

    @classmethod
    def divisor(cls, args: Mapping[str, Any]) -> int:
        return 2 ** int(args["depth"])

    @classmethod
    def output_names(cls, args: Mapping[str, Any]) -> list[str]:
        return [HEAD]
