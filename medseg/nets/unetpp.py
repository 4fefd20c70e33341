"""UNet++ (Zhou et al. 2018, nested dense skip connections) as a Keras 3 functional model.

Node ``X(i, j)`` sits at resolution level ``i`` (0 = full resolution) and column ``j``:

* ``X(i, 0) = block(pool(X(i-1, 0)))`` is the encoder (``X(0, 0) = block(input)``);
* ``X(i, j) = block(concat(X(i, 0), ..., X(i, j-1), up(X(i+1, j-1))))`` for ``j >= 1``.

Head ``head_L`` (level ``L = 1..depth``) is a 1x1 convolution + softmax on ``X(0, L)``. It depends
only on nodes with ``i + j <= L``, which is what :func:`prune_unetpp` keeps.

Only stock Keras layers are used, so a saved ``.keras`` file loads with plain
``keras.saving.load_model`` (no custom objects needed). Layer names follow ``x{i}_{j}_...`` so the
structure can be read back from a saved model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras

__all__ = [
    "build_unetpp",
    "prune_unetpp",
    "check_input_shape",
    "nearest_valid_sizes",
    "head_names",
    "head_levels",
    "deep_supervision_weights",
    "repeat_targets",
]

_UPSAMPLING = ("transpose", "bilinear")


def nearest_valid_sizes(size: int, depth: int) -> tuple[int, int]:
    """Nearest multiples of ``2**depth`` below and above ``size`` (equal if ``size`` is valid).

    The lower one is never below ``2**depth``.
    """
    divisor = 2**depth
    lower = max(divisor, (int(size) // divisor) * divisor)
    upper = int(math.ceil(int(size) / divisor)) * divisor
    return lower, max(upper, divisor)


def check_input_shape(hw: Sequence[int | None], depth: int = 4) -> None:
    """Check that a (height, width) pair can go through a UNet++ of this depth.

    Args:
        hw: ``(height, width)`` in pixels; ``None`` entries (any size) are accepted.
        depth: number of down-samplings; each spatial size must be a positive multiple of
            ``2**depth``.

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
            "input shape " + str(tuple(hw)) + " does not fit a UNet++ of depth "
            f"{depth}: " + "; ".join(problems) + "; pad or crop the images to a valid size"
        )


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


def _conv_block(x, filters, prefix, *, batch_norm, dropout, regularizer, sync_batch_norm):
    # Two 3x3 convolutions per node, each followed by BN and ReLU (the paper's block, plus BN).
    # The convolution bias is redundant in front of BatchNorm's beta, so it is dropped then.
    for k in (1, 2):
        x = keras.layers.Conv2D(
            filters,
            3,
            padding="same",
            use_bias=not batch_norm,
            kernel_initializer="he_normal",
            kernel_regularizer=regularizer,
            name=f"{prefix}_conv{k}",
        )(x)
        if batch_norm:
            x = keras.layers.BatchNormalization(
                synchronized=sync_batch_norm, name=f"{prefix}_bn{k}"
            )(x)
        x = keras.layers.Activation("relu", name=f"{prefix}_relu{k}")(x)
        if dropout > 0:
            x = keras.layers.Dropout(dropout, name=f"{prefix}_drop{k}")(x)
    return x


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
        sync_batch_norm: synchronise BatchNorm statistics across replicas under a
            ``tf.distribute`` strategy (so N replicas train like one device).

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
    # === Checks ===
    if int(depth) < 1:
        raise ValueError(f"depth must be >= 1, found {depth}")
    filters = [int(f) for f in filters]
    if len(filters) != depth + 1:
        raise ValueError(
            f"filters must have depth + 1 = {depth + 1} values (one per level), found "
            f"{len(filters)}: {filters}"
        )
    if upsampling not in _UPSAMPLING:
        raise ValueError(f"upsampling must be one of {_UPSAMPLING}, found {upsampling!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), found {dropout}")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2 (background + lesion), found {num_classes}")
    check_input_shape(input_shape_hw, depth)
    regularizer = keras.regularizers.L2(l2) if l2 > 0 else None
    block = dict(
        batch_norm=batch_norm,
        dropout=float(dropout),
        regularizer=regularizer,
        sync_batch_norm=sync_batch_norm,
    )

    # === Functional Model ===
    inputs = keras.Input(shape=(*input_shape_hw, int(input_channels)), name="image")
    nodes: dict[tuple[int, int], object] = {}
    for i in range(depth + 1):
        x = inputs if i == 0 else keras.layers.MaxPooling2D(2, name=f"x{i}_0_pool")(nodes[i - 1, 0])
        nodes[i, 0] = _conv_block(x, filters[i], f"x{i}_0", **block)
    # Column by column: X(i, j) needs X(i+1, j-1), computed in the previous column.
    for j in range(1, depth + 1):
        for i in range(0, depth + 1 - j):
            below = nodes[i + 1, j - 1]
            if upsampling == "transpose":
                up = keras.layers.Conv2DTranspose(
                    filters[i],
                    2,
                    strides=2,
                    padding="same",
                    kernel_initializer="he_normal",
                    kernel_regularizer=regularizer,
                    name=f"x{i}_{j}_up",
                )(below)
            else:
                up = keras.layers.UpSampling2D(2, interpolation="bilinear", name=f"x{i}_{j}_up")(
                    below
                )
            merged = keras.layers.Concatenate(name=f"x{i}_{j}_concat")(
                [nodes[i, k] for k in range(j)] + [up]
            )
            nodes[i, j] = _conv_block(merged, filters[i], f"x{i}_{j}", **block)

    levels = list(range(1, depth + 1)) if deep_supervision else [depth]
    outputs = []
    for level in levels:
        # float32 logits and softmax even under mixed_float16/bfloat16: a half-precision
        # softmax saturates and the Dice/CE of small lesions loses its gradient.
        logits = keras.layers.Conv2D(
            int(num_classes),
            1,
            kernel_initializer="glorot_uniform",
            kernel_regularizer=regularizer,
            dtype="float32",
            name=f"x0_{level}_logits",
        )(nodes[0, level])
        outputs.append(
            keras.layers.Activation("softmax", dtype="float32", name=f"head_{level}")(logits)
        )
    return keras.Model(
        inputs=inputs, outputs=outputs if deep_supervision else outputs[0], name=name
    )


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
