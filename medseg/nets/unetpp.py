"""UNet++ (Zhou et al. 2018, nested dense skip connections) as a Keras 3 functional model.

Node ``X(i, j)`` sits at resolution level ``i`` (0 = full resolution) and column ``j``:

* ``X(i, 0) = block(pool(X(i-1, 0)))`` is the encoder (``X(0, 0) = block(input)``);
* ``X(i, j) = block(concat(X(i, 0), ..., X(i, j-1), up(X(i+1, j-1))))`` for ``j >= 1``.

Head ``head_L`` (level ``L = 1..depth``) is a 1x1 convolution + softmax on ``X(0, L)``. It depends
only on nodes with ``i + j <= L``, which is what :func:`prune_unetpp` keeps.

Only stock Keras layers are used, so a saved ``.keras`` file loads with plain
``keras.saving.load_model`` (no custom objects needed). Layer names follow ``x{i}_{j}_...`` so the
structure can be read back from a saved model.

Registered as network ``"unetpp"`` (:mod:`medseg.nets.registry`): its arguments are those of
:func:`build_unetpp` after the channels and classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Mapping

import keras

from medseg.nets.blocks import (
    check_input_shape,
    check_levels,
    conv_block,
    default_filters,
    layer_seeds,
    nearest_valid_sizes,
    softmax_head,
    upsample,
)
from medseg.nets.registry import Network, register_network

__all__ = [
    "build_unetpp",
    "prune_unetpp",
    "check_input_shape",
    "nearest_valid_sizes",
    "head_names",
    "head_levels",
    "deep_supervision_weights",
    "repeat_targets",
    "UNetPlusPlus",
]


def head_names(depth: int = 4) -> list[str]:
    """Output names of the deep-supervision heads, ``["head_1", ..., "head_<depth>"]``."""
    return [f"head_{level}" for level in range(1, depth + 1)]


def head_levels(model: keras.Model) -> list[int]:
    """Levels ``L`` of the ``head_L`` outputs of a UNet++ model, in output order."""
    levels = []
    for layer_name in model.output_names:
        if not layer_name.startswith("head_") or not layer_name[5:].isdigit():
            raise ValueError(
                f"model {model.name!r} output {layer_name!r} is not a UNet++ head "
                "(expected layers named head_1..head_<depth>, as built by build_unetpp)"
            )
        levels.append(int(layer_name.split("_")[1]))
    return levels


def deep_supervision_weights(depth: int = 4, scheme: str = "equal") -> list[float]:
    """Loss weights for the deep-supervision heads, summing to 1.

    Args:
        depth: number of heads.
        scheme: ``"equal"`` (the paper: average of the head losses) or ``"linear"``
            (weight proportional to the level, favouring the deepest, most accurate head).

    Returns:
        A list of ``depth`` floats, in head order; pass it as ``loss_weights=`` to ``compile``.
    """
    if scheme == "equal":
        raw = [1.0] * depth
    elif scheme == "linear":
        raw = [float(level) for level in range(1, depth + 1)]
    else:
        raise ValueError(f"scheme must be 'equal' or 'linear', found {scheme!r}")
    total = sum(raw)
    return [w / total for w in raw]


def repeat_targets(images, masks, num_heads: int = 4):
    """Map function for ``tf.data``: one copy of the mask per deep-supervision head.

    Keras 3 matches targets to outputs by structure, so a model with 4 heads needs a tuple of 4
    masks: ``dataset.map(lambda x, y: repeat_targets(x, y, 4))``.
    """
    return images, tuple(masks for _ in range(num_heads))


def build_unetpp(
    input_channels: int = 1,
    num_classes: int = 2,
    filters: Sequence[int] = (32, 64, 128, 256, 512),
    depth: int = 4,
    deep_supervision: bool = True,
    batch_norm: bool = True,
    dropout: float = 0.0,
    upsampling: str = "transpose",
    l2: float = 0.0,
    input_shape_hw: tuple[int | None, int | None] = (None, None),
    name: str = "unetpp",
    sync_batch_norm: bool = False,
    head_activation: str = "softmax",
    dtype=None,
    seed: int | None = None,
) -> keras.Model:
    """Build a UNet++ that maps images to per-class softmax probabilities.

    Args:
        input_channels: image channels (1, or ``context_slices`` for 2.5D input).
        num_classes: output classes including background (class 0).
        filters: filters per resolution level, ``depth + 1`` values (finest first).
        depth: number of 2x down-samplings; input height/width must be multiples of
            ``2**depth``.
        deep_supervision: if True the model has ``depth`` outputs ``head_1..head_<depth>``
            (a list, in that order); otherwise one output, ``head_<depth>``.
        batch_norm: BatchNorm after every convolution of the nodes.
        dropout: dropout rate after every node convolution (0 disables the layers).
        upsampling: ``"transpose"`` (2x2 stride-2 transposed convolution, learnable) or
            ``"bilinear"`` (parameter-free bilinear up-sampling).
        l2: L2 kernel-regularization factor of every convolution (0 disables it). Its penalty
            is added to the training loss; ``medseg.train.diagnostics.Diagnostics`` reports it
            separately as ``reg_loss``.
        input_shape_hw: fixed ``(height, width)`` or ``(None, None)`` for any valid size.
        name: model name.
        head_activation: ``"softmax"`` (classes), or ``"sigmoid"`` (one independent probability
            per output channel: nested regions); a run argument, not recorded in the spec.
        sync_batch_norm: synchronise BatchNorm statistics across replicas under a
            ``tf.distribute`` strategy (so N replicas train like one device).
        dtype, seed: the layers' dtype policy (heads stay float32; None: the global policy) and
            the seed of initializers and dropout (None: drawn from Python's ``random``).

    Returns:
        A functional ``keras.Model``: input ``(B, H, W, input_channels)`` float32, output(s)
        float32 softmax ``(B, H, W, num_classes)``. Heads stay float32 under a mixed-precision
        policy. Default configuration: 9,052,776 parameters, of which 9,045,480 trainable
        (the paper's 9.04 M; the rest are BatchNorm moving statistics; without BatchNorm,
        9,041,832).

    Raises:
        ValueError: bad ``filters`` length, ``upsampling``, ``dropout``, ``depth``, or a fixed
            input size that is not a multiple of ``2**depth``.

    Example:
        >>> model = build_unetpp(input_channels=3, num_classes=2)
        >>> model.compile(optimizer="adam", loss=[DiceCELoss()] * 4,
        ...               loss_weights=deep_supervision_weights(4))
        >>> # targets: dataset.map(lambda x, y: repeat_targets(x, y, 4))
    """
    filters = check_levels(filters, depth, upsampling, dropout)
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2 (background + lesion), found {num_classes}")
    check_input_shape(input_shape_hw, depth, network="UNet++")
    block = dict(batch_norm=batch_norm, dropout=float(dropout), sync_batch_norm=sync_batch_norm, dtype=dtype,
                 regularizer=keras.regularizers.L2(l2) if l2 > 0 else None, seeds=layer_seeds(seed))
    inputs = keras.Input(shape=(*input_shape_hw, int(input_channels)), name="image")
    nodes = _nested_nodes(inputs, filters, upsampling, block)
    levels = list(range(1, depth + 1)) if deep_supervision else [depth]
    outputs = [
        softmax_head(nodes[0, level], num_classes, regularizer=block["regularizer"],
                     logits_name=f"x0_{level}_logits", name=f"head_{level}", activation=head_activation,
                     seeds=block["seeds"])
        for level in levels
    ]
    return keras.Model(
        inputs=inputs, outputs=outputs if deep_supervision else outputs[0], name=name
    )


def _nested_nodes(inputs, filters: list[int], upsampling: str, block: dict) -> dict[tuple[int, int], Any]:
    """The nodes ``X(i, j)`` (``i + j <= depth``), keyed ``(i, j)``; layers created encoder first,
    then column by column, so the layer order (and weight order) is fixed."""
    depth = len(filters) - 1
    nodes: dict[tuple[int, int], Any] = {}
    for i in range(depth + 1):
        x = inputs if i == 0 else keras.layers.MaxPooling2D(2, dtype=block["dtype"],
                                                              name=f"x{i}_0_pool")(nodes[i - 1, 0])
        nodes[i, 0] = conv_block(x, filters[i], f"x{i}_0", **block)
    # Column by column: X(i, j) needs X(i+1, j-1), computed in the previous column.
    for j in range(1, depth + 1):
        for i in range(0, depth + 1 - j):
            up = upsample(nodes[i + 1, j - 1], filters[i], f"x{i}_{j}_up", upsampling=upsampling,
                          regularizer=block["regularizer"], dtype=block["dtype"], seeds=block["seeds"])
            merged = keras.layers.Concatenate(dtype=block["dtype"], name=f"x{i}_{j}_concat")(
                [nodes[i, k] for k in range(j)] + [up]
            )
            nodes[i, j] = conv_block(merged, filters[i], f"x{i}_{j}", **block)
    return nodes


def prune_unetpp(model: keras.Model, level: int) -> keras.Model:
    """Keep only the head at ``level`` and the layers it needs (for inference).

    UNet++ head ``L`` depends only on the nodes ``X(i, j)`` with ``i + j <= L``, so the pruned
    model is smaller and faster; its output equals the full model's ``head_L`` exactly.

    Args:
        model: a model from :func:`build_unetpp` (or loaded from its ``.keras`` file).
        level: head level ``L`` in ``1..depth``.

    Returns:
        A new functional model with its own copy of the weights (training it does not change
        ``model``), output ``head_L``, named ``"<model.name>_L<level>"``.

    Raises:
        ValueError: if ``model`` has no layer ``head_<level>``.
    """
    names = {layer.name for layer in model.layers}
    head = f"head_{level}"
    if head not in names:
        available = sorted(n for n in names if n.startswith("head_"))
        raise ValueError(
            f"model {model.name!r} has no output {head!r}; available heads: {available}"
        )
    sub = keras.Model(inputs=model.inputs, outputs=model.get_layer(head).output)
    # clone_model rebuilds only the layers reachable from the kept output, with new variables.
    pruned = keras.models.clone_model(sub)
    pruned.set_weights(sub.get_weights())
    return keras.Model(
        inputs=pruned.inputs, outputs=pruned.outputs[0], name=f"{model.name}_L{level}"
    )


@register_network("unetpp")
class UNetPlusPlus(Network):
    """Registry entry ``"unetpp"``: outputs ``head_1..head_<depth>`` with deep supervision (equal
    loss weights, :func:`deep_supervision_weights`), else ``head_<depth>``; inference runs
    ``head_<depth>``, or the model pruned to the asked head (:func:`prune_unetpp`)."""

    title = "UNet++"
    builder = staticmethod(build_unetpp)

    @classmethod
    def complete(cls, args: Mapping[str, Any]) -> dict[str, Any]:
        full = super().complete(args)
        if "filters" not in args:  # the paper's widths, cut to the depth asked for
            full["filters"] = default_filters(full["depth"])
        full["filters"] = check_levels(full["filters"], full["depth"], full["upsampling"], full["dropout"])
        return full

    @classmethod
    def divisor(cls, args: Mapping[str, Any]) -> int:
        return 2 ** int(args["depth"])

    @classmethod
    def output_names(cls, args: Mapping[str, Any]) -> list[str]:
        depth = int(args["depth"])
        return head_names(depth) if args["deep_supervision"] else [f"head_{depth}"]

    @classmethod
    def loss_weights(cls, args: Mapping[str, Any]) -> list[float]:
        return deep_supervision_weights(len(cls.output_names(args)))

    @classmethod
    def inference_model(cls, model: keras.Model, args: Mapping[str, Any], head: int | None = None) -> keras.Model:
        if head is None:
            return super().inference_model(model, args)
        return prune_unetpp(model, head)

    @classmethod
    def describe_head(cls, args: Mapping[str, Any], head: int | None) -> str:
        return super().describe_head(args, None) if head is None else f"a UNet++ with head_{head}"

    @classmethod
    def legacy_args(cls, model: keras.Model) -> dict[str, Any] | None:
        """Read back from the layers :func:`build_unetpp` names; bundles written before the
        network key existed hold a UNet++ (or a model of the user's, which gives None)."""
        try:
            depth = max(head_levels(model))
            first = model.get_layer("x0_0_conv1")
            names = {layer.name for layer in model.layers}
            regularizer = first.kernel_regularizer
            return {
                "filters": [model.get_layer(f"x{i}_0_conv1").filters for i in range(depth + 1)],
                "depth": depth,
                "deep_supervision": len(model.output_names) > 1,
                "batch_norm": "x0_0_bn1" in names,
                "dropout": model.get_layer("x0_0_drop1").rate if "x0_0_drop1" in names else 0.0,
                "upsampling": "transpose" if isinstance(model.get_layer("x0_1_up"), keras.layers.Conv2DTranspose)
                else "bilinear",
                "l2": float(regularizer.l2) if regularizer is not None else 0.0,
            }
        except ValueError:  # not head_L outputs, or a layer build_unetpp always makes is missing
            return None
