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
* the peer: the user's original Keras recipe (docs/user_story.md: ``Nest_UNet`` with Dropout 0.5
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

from _needs import require  # benchmarks/ is on sys.path when run as a script
from user_recipe import dice_loss, nest_unet

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def user_dice_loss(y_true, y_pred):
    """The user's weighted Dice on class-index masks (the benchmark's batches are not one-hot)."""
    from keras import ops

    return dice_loss(ops.one_hot(ops.cast(y_true, "int32"), 2), y_pred)


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
    require("medseg", "keras", "tensorflow")

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
        peer = nest_unet()
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
