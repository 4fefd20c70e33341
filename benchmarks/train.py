"""Training-step throughput of medseg's training stack vs a bare ``model.fit``.

Same UNet++, same loss, same in-memory batches (a cached ``tf.data`` of fixed tensors), same
number of steps. The bare run is ``model.compile(Adam, DiceCELoss per head) + model.fit`` with no
callbacks. The medseg run is what :func:`medseg.train.train` executes around the step:
the distribution strategy scope, :func:`medseg.train.assembly.compile_model` (scheduled optimizer,
Dice metrics), and the callbacks (diagnostics when available, run keeper with the atomic
per-epoch checkpoint, history and curves, TensorBoard). Whole-volume validation is switched off
(it is not part of a training step). Epochs alternate between the two so that load on the shared
machine hits both alike; the first epoch of each (graph tracing) is not timed.

Prints lines of detail and, last, one JSON object with ``throughput_ratio_vs_keras_fit``
(medseg steps/s divided by bare steps/s; 1.0 means no overhead).

    python benchmarks/train.py [--steps 40] [--epochs 4] [--patch 96] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from _needs import require  # benchmarks/ is on sys.path when run as a script

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="steps per timed epoch")
    parser.add_argument("--epochs", type=int, default=4, help="timed epochs per side (after one warm-up epoch)")
    parser.add_argument("--patch", type=int, default=96, help="patch height = width (px)")
    parser.add_argument("--batch", type=int, default=8, help="batch size")
    parser.add_argument("--filters", type=int, nargs="+", default=[16, 32, 64, 128], help="UNet++ filters")
    args = parser.parse_args(argv)
    require("medseg", "keras", "tensorflow")

    import keras
    import numpy as np
    import tensorflow as tf

    from medseg.data.plan import Plan
    from medseg.losses import DiceCELoss
    from medseg.nets.unetpp import deep_supervision_weights, head_names
    from medseg.train import assembly, monitoring
    from medseg.train.callbacks import RunKeeper, new_state
    from medseg.train.config import TrainConfig
    from medseg.train.strategy import select_strategy

    depth = len(args.filters) - 1
    total_epochs = 1 + args.epochs
    cfg = TrainConfig(filters=args.filters, depth=depth, batch_size=args.batch, epochs=total_epochs,
                      steps_per_epoch=args.steps, patch_size=[args.patch, args.patch])
    plan = Plan(modality="MR", patch_size=(args.patch, args.patch), divisor=2**depth)

    # In-memory batches: 16 distinct batches with blob-shaped lesions, cycled.
    rng = np.random.default_rng(0)
    n = 16 * args.batch
    images = rng.normal(size=(n, args.patch, args.patch, 1)).astype("float32")
    yy, xx = np.mgrid[: args.patch, : args.patch]
    masks = np.zeros((n, args.patch, args.patch), "int32")
    for i in range(n):
        cy, cx, r = rng.integers(16, args.patch - 16, 2).tolist() + [int(rng.integers(4, 12))]
        masks[i] = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype("int32")
        images[i, ..., 0] += 2.0 * masks[i]
    heads = assembly.output_heads(cfg)
    base = tf.data.Dataset.from_tensor_slices((images, masks)).batch(args.batch).cache().repeat()
    data = base.map(assembly.targets_for_heads(cfg)).prefetch(tf.data.AUTOTUNE)

    # --- bare Keras ---
    keras.utils.set_random_seed(0)
    bare = assembly.build_model(cfg, plan)
    bare.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-3), loss={h: DiceCELoss() for h in heads},
                 loss_weights=dict(zip(heads, deep_supervision_weights(depth))))

    # --- medseg stack ---
    keras.utils.set_random_seed(0)
    strategy = select_strategy()
    with strategy.scope():
        model = assembly.build_model(cfg, plan)
        assembly.compile_model(model, cfg, 1e-3)
    run_dir = tempfile.mkdtemp(prefix="medseg-bench-train-")
    state = new_state(0)
    keeper = RunKeeper(run_dir, state, save_best=lambda *a: None, epochs=total_epochs, verbose=0)
    callbacks = [keeper, keras.callbacks.TensorBoard(log_dir=os.path.join(run_dir, "tensorboard"),
                                                      write_graph=False, update_freq="epoch", profile_batch=0)]
    diagnostics = monitoring.make_diagnostics(cfg, run_dir)
    if diagnostics is not None:
        callbacks.insert(0, diagnostics)

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_epoch_begin(self, epoch, logs=None):
            self._t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self._t)

    bare_times, medseg_times = [], []
    # Epoch 0 of each side traces the graphs; then alternate one epoch each.
    for epoch in range(total_epochs):
        t_bare, t_medseg = EpochTimer(), EpochTimer()
        bare.fit(data, initial_epoch=epoch, epochs=epoch + 1, steps_per_epoch=args.steps, verbose=0,
                 callbacks=[t_bare], shuffle=False)
        # The timer goes last: it includes the other callbacks' end-of-epoch work (checkpoint...).
        model.fit(data, initial_epoch=epoch, epochs=epoch + 1, steps_per_epoch=args.steps, verbose=0,
                  callbacks=callbacks + [t_medseg], shuffle=False)
        if epoch > 0:
            bare_times.append(t_bare.times[-1])
            medseg_times.append(t_medseg.times[-1])
        print(f"epoch {epoch}: bare {t_bare.times[-1]:.2f} s, medseg {t_medseg.times[-1]:.2f} s"
              + ("  (warm-up, not timed)" if epoch == 0 else ""), flush=True)

    bare_sps = args.steps / statistics.median(bare_times)
    medseg_sps = args.steps / statistics.median(medseg_times)
    result = {
        "throughput_ratio_vs_keras_fit": round(medseg_sps / bare_sps, 4),
        "medseg_steps_per_s": round(medseg_sps, 3),
        "keras_fit_steps_per_s": round(bare_sps, 3),
        "steps_per_epoch": args.steps,
        "timed_epochs": args.epochs,
        "patch": args.patch,
        "batch": args.batch,
        "filters": args.filters,
        "params": int(model.count_params()),
        "device": "GPU" if tf.config.list_physical_devices("GPU") else "CPU",
        "checkpoint_written": bool(os.path.exists(os.path.join(run_dir, "checkpoints", "latest"))),
    }
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
