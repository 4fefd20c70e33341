"""The user's original Keras recipe (docs/user_story.md), ported to Keras 3 syntax.

Used as the named peer by ``benchmarks/model.py`` (step time) and ``benchmarks/seed_recipe.py``
(held-out 3D DSC). Kept faithful on purpose: Dropout 0.5 after every convolution, L2 1e-4 on
every kernel, transposed-convolution up-sampling, softmax head ``output_4``, and the 0.3/0.7
weighted Dice over the flattened batch with smooth = 1 (one-hot ``y_true``).
"""

from __future__ import annotations

USER_FILTERS = (32, 64, 128, 256, 512)


def nest_unet(filters=USER_FILTERS, input_channels=1, num_class=2, dropout_rate=0.5, l2=1e-4):
    """The user's ``Nest_UNet(deep_supervision=False)``: output ``output_4`` (from ``conv1_5``)."""
    import keras
    from keras import layers

    reg = keras.regularizers.L2(l2)
    act = "relu"

    def standard_unit(x, stage, nb_filter):
        x = layers.Conv2D(nb_filter, 3, padding="same", activation=act, kernel_initializer="he_normal",
                          kernel_regularizer=reg, name=f"conv{stage}_1")(x)
        x = layers.Dropout(dropout_rate, name=f"dp{stage}_1")(x)
        x = layers.Conv2D(nb_filter, 3, padding="same", activation=act, kernel_initializer="he_normal",
                          kernel_regularizer=reg, name=f"conv{stage}_2")(x)
        return layers.Dropout(dropout_rate, name=f"dp{stage}_2")(x)

    def up(x, nb_filter, name):
        return layers.Conv2DTranspose(nb_filter, 2, strides=2, padding="same", activation=act,
                                      kernel_initializer="he_normal", kernel_regularizer=reg, name=name)(x)

    f = list(filters)
    img = keras.Input((None, None, input_channels), name="main_input")
    c11 = standard_unit(img, "11", f[0])
    c21 = standard_unit(layers.MaxPooling2D(2, name="pool1")(c11), "21", f[1])
    c12 = standard_unit(layers.concatenate([up(c21, f[0], "up12"), c11], name="merge12"), "12", f[0])
    c31 = standard_unit(layers.MaxPooling2D(2, name="pool2")(c21), "31", f[2])
    c22 = standard_unit(layers.concatenate([up(c31, f[1], "up22"), c21], name="merge22"), "22", f[1])
    c13 = standard_unit(layers.concatenate([up(c22, f[0], "up13"), c11, c12], name="merge13"), "13", f[0])
    c41 = standard_unit(layers.MaxPooling2D(2, name="pool3")(c31), "41", f[3])
    c32 = standard_unit(layers.concatenate([up(c41, f[2], "up32"), c31], name="merge32"), "32", f[2])
    c23 = standard_unit(layers.concatenate([up(c32, f[1], "up23"), c21, c22], name="merge23"), "23", f[1])
    c14 = standard_unit(layers.concatenate([up(c23, f[0], "up14"), c11, c12, c13], name="merge14"), "14", f[0])
    c51 = standard_unit(layers.MaxPooling2D(2, name="pool4")(c41), "51", f[4])
    c42 = standard_unit(layers.concatenate([up(c51, f[3], "up42"), c41], name="merge42"), "42", f[3])
    c33 = standard_unit(layers.concatenate([up(c42, f[2], "up33"), c31, c32], name="merge33"), "33", f[2])
    c24 = standard_unit(layers.concatenate([up(c33, f[1], "up24"), c21, c22, c23], name="merge24"), "24", f[1])
    c15 = standard_unit(layers.concatenate([up(c24, f[0], "up15"), c11, c12, c13, c14], name="merge15"), "15", f[0])
    out4 = layers.Conv2D(num_class, 1, activation="softmax", name="output_4", kernel_initializer="he_normal",
                         padding="same", kernel_regularizer=reg)(c15)
    return keras.Model(img, out4, name="nest_unet_seed")


def dice_loss(y_true, y_pred):
    """The user's loss: 1 - (0.3 Dice_0 + 0.7 Dice_1), each over the flattened batch, smooth 1."""
    from keras import ops

    smooth, w1, w2 = 1.0, 0.3, 0.7
    coefs = []
    for c in (0, 1):
        t = ops.reshape(y_true[..., c], (-1,))
        p = ops.reshape(y_pred[..., c], (-1,))
        inter = ops.abs(ops.sum(t * p))
        denom = ops.abs(ops.sum(t)) + ops.abs(ops.sum(p))
        coefs.append((2 * inter + smooth) / (denom + smooth))
    return 1 - (w1 * coefs[0] + w2 * coefs[1])


def dsc(y_true, y_pred):
    """The user's metric: lesion-channel Dice over the flattened batch, smooth 1."""
    from keras import ops

    t = ops.reshape(y_true[..., 1], (-1,))
    p = ops.reshape(y_pred[..., 1], (-1,))
    return (2 * ops.abs(ops.sum(t * p)) + 1.0) / (ops.abs(ops.sum(t)) + ops.abs(ops.sum(p)) + 1.0)
