"""Benchmark: medseg UNet++ training step, float32 vs mixed_bfloat16, against the user's recipe.

Run: ``python benchmarks/model.py [--steps 3] [--warmup 1] [--size 256] [--batch 8]``

Measures, on this machine's CPU:

* ``params``: parameters of the default :func:`medseg.nets.build_unetpp` (deep supervision);
* ``step_s_float32`` / ``step_s_bfloat16``: seconds per training step of that model at
  256x256, batch 8 (``DiceCELoss`` on each of the 4 heads, Adam), median of up to ``--steps``
  timed steps after ``--warmup`` untimed ones (the first includes graph tracing); at least one
  step is timed per model, more only within ``--budget-s`` (a step of the default model takes
  tens of seconds on 2 CPU cores, and bfloat16 is emulated, hence slower, on CPUs without
  AVX512-BF16/AMX);
* the peer: the user's original Keras recipe (USER_STORY.md: ``Nest_UNet`` with Dropout 0.5
  and L2 1e-4 after every convolution, the weighted-Dice loss with smooth = 1), ported to
  Keras 3 and timed the same way in float32.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def user_nest_unet(input_size=(None, None, 1), num_class=2, dropout_rate=0.5, l2=1e-4):
    """The user's ``Nest_UNet`` (deep_supervision=False -> output_4), in Keras 3 syntax."""
    import keras
    from keras import layers

    reg = keras.regularizers.L2(l2)

    def standard_unit(x, stage, nb_filter):
        for k in (1, 2):
            x = layers.Conv2D(nb_filter, 3, padding="same", activation="relu",
                              kernel_initializer="he_normal", kernel_regularizer=reg,
                              name=f"conv{stage}_{k}")(x)
            x = layers.Dropout(dropout_rate, name=f"dp{stage}_{k}")(x)
        return x

    def up(x, nb_filter, name):
        return layers.Conv2DTranspose(nb_filter, 2, strides=2, padding="same", activation="relu",
                                      kernel_initializer="he_normal", kernel_regularizer=reg,
                                      name=name)(x)

    nb = [32, 64, 128, 256, 512]
    img = keras.Input(input_size, name="main_input")
    c11 = standard_unit(img, "11", nb[0])
    c21 = standard_unit(layers.MaxPooling2D(2, name="pool1")(c11), "21", nb[1])
    c12 = standard_unit(layers.concatenate([up(c21, nb[0], "up12"), c11], name="merge12"), "12", nb[0])
    c31 = standard_unit(layers.MaxPooling2D(2, name="pool2")(c21), "31", nb[2])
    c22 = standard_unit(layers.concatenate([up(c31, nb[1], "up22"), c21], name="merge22"), "22", nb[1])
    c13 = standard_unit(layers.concatenate([up(c22, nb[0], "up13"), c11, c12], name="merge13"), "13", nb[0])
    c41 = standard_unit(layers.MaxPooling2D(2, name="pool3")(c31), "41", nb[3])
    c32 = standard_unit(layers.concatenate([up(c41, nb[2], "up32"), c31], name="merge32"), "32", nb[2])
    c23 = standard_unit(layers.concatenate([up(c32, nb[1], "up23"), c21, c22], name="merge23"), "23", nb[1])
    c14 = standard_unit(layers.concatenate([up(c23, nb[0], "up14"), c11, c12, c13], name="merge14"), "14", nb[0])
    c51 = standard_unit(layers.MaxPooling2D(2, name="pool4")(c41), "51", nb[4])
    c42 = standard_unit(layers.concatenate([up(c51, nb[3], "up42"), c41], name="merge42"), "42", nb[3])
    c33 = standard_unit(layers.concatenate([up(c42, nb[2], "up33"), c31, c32], name="merge33"), "33", nb[2])
    c24 = standard_unit(layers.concatenate([up(c33, nb[1], "up24"), c21, c22, c23], name="merge24"), "24", nb[1])
    c15 = standard_unit(layers.concatenate([up(c24, nb[0], "up15"), c11, c12, c13, c14], name="merge15"), "15", nb[0])
    out4 = layers.Conv2D(num_class, 1, activation="softmax", name="output_4",
                         kernel_initializer="he_normal", padding="same", kernel_regularizer=reg)(c15)
    return keras.Model(inputs=img, outputs=out4)


def user_dice_loss(y_true, y_pred):
    """The user's weighted Dice (0.3 background, 0.7 lesion, smooth 1, flattened batch)."""
    from keras import ops

    y_true = ops.one_hot(ops.cast(y_true, "int32"), 2)

    def coef(c):
        t, p = ops.reshape(y_true[..., c], (-1,)), ops.reshape(y_pred[..., c], (-1,))
        return (2.0 * ops.sum(t * p) + 1.0) / (ops.sum(t) + ops.sum(p) + 1.0)

    return 1.0 - (0.3 * coef(0) + 0.7 * coef(1))


def time_steps(model, loss, x, y, warmup, steps, heads, deadline):
    """Median seconds per ``train_on_batch`` step (after ``warmup`` untimed steps).

    At least one step is timed; further ones (up to ``steps``) only before ``deadline``
    (``time.perf_counter()`` value), so the whole run stays bounded on a slow or busy CPU.
    """
    import keras

    if heads > 1:
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-3), loss=[loss] * heads)
        targets = [y] * heads
    else:
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-3), loss=loss)
        targets = y
    for _ in range(warmup):
        model.train_on_batch(x, targets)
    times = []
    for _ in range(steps):
        if times and time.perf_counter() + times[-1] > deadline:
            break
        start = time.perf_counter()
        model.train_on_batch(x, targets)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="patch height and width (px)")
    parser.add_argument("--batch", type=int, default=8, help="batch size")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (at most)")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="time after which no further timed steps start (s)")
    parser.add_argument("--skip-peer", action="store_true", help="do not time the user's model")
    parser.add_argument("--policies", default="float32,mixed_bfloat16",
                        help="comma-separated Keras dtype policies to time medseg's model under")
    args = parser.parse_args(argv)

    import keras
    import numpy as np

    from medseg.losses import DiceCELoss
    from medseg.nets import build_unetpp

    load_before = os.getloadavg()
    deadline = time.perf_counter() + args.budget_s
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, args.size, args.size, 1)).astype("float32")
    y = np.zeros((args.batch, args.size, args.size), np.int32)
    y[:, args.size // 3: args.size // 2, args.size // 3: args.size // 2] = 1
    result: dict = {"size": args.size, "batch": args.batch, "warmup": args.warmup,
                    "steps": args.steps}

    import tensorflow as tf

    result["tensorflow"] = tf.__version__
    for policy in [p.strip() for p in args.policies.split(",") if p.strip()]:
        keras.config.set_dtype_policy(policy)
        keras.utils.set_random_seed(0)
        model = build_unetpp()
        result["params"] = int(model.count_params())
        result["params_trainable"] = int(sum(int(np.prod(w.shape)) for w in model.trainable_weights))
        median, times = time_steps(model, DiceCELoss(), x, y, args.warmup, args.steps, heads=4,
                                   deadline=deadline)
        key = {"float32": "float32", "mixed_bfloat16": "bfloat16"}.get(policy, policy)
        result[f"step_s_{key}"] = round(median, 3)
        result[f"timed_steps_{key}"] = len(times)
        print(f"medseg UNet++ {policy}: steps {[round(t, 3) for t in times]} s", flush=True)
        del model
        keras.backend.clear_session()
    keras.config.set_dtype_policy("float32")
    if "step_s_float32" in result and "step_s_bfloat16" in result:
        result["bf16_speedup"] = round(result["step_s_float32"] / result["step_s_bfloat16"], 2)

    if not args.skip_peer:
        keras.utils.set_random_seed(0)
        peer = user_nest_unet()
        result["peer"] = "user's Keras recipe (Nest_UNet, dropout 0.5, L2 1e-4, smooth-1 Dice)"
        result["peer_params"] = int(peer.count_params())
        median, times = time_steps(peer, user_dice_loss, x, y, args.warmup, args.steps, heads=1,
                                   deadline=deadline)
        result["peer_step_s_float32"] = round(median, 3)
        result["peer_timed_steps"] = len(times)
        print(f"user recipe float32: steps {[round(t, 3) for t in times]} s", flush=True)

    result["load_avg_before"] = round(load_before[0], 2)
    result["load_avg_after"] = round(os.getloadavg()[0], 2)
    result["cpu_count"] = os.cpu_count()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
