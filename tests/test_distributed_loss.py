"""1 device vs 2 replicas (MirroredStrategy on 2 logical CPUs): same losses and weights.

Logical devices must be configured before TensorFlow initialises, so the comparison runs in a
fresh Python process; it prints one JSON line that the tests check.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    r'''
    import json, os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    import keras
    import numpy as np
    from keras import ops
    from medseg.losses import DiceCELoss, DiceLoss
    from medseg.nets import build_unetpp

    STEPS, GLOBAL_BATCH = 3, 4
    rng = np.random.default_rng(0)
    y = np.zeros((STEPS * GLOBAL_BATCH, 16, 16), np.int32)
    for k in range(len(y)):
        if k % 3:
            r, c = rng.integers(1, 10, 2)
            y[k, r:r + 5, c:c + 4] = 1
    x = (y[..., None] + rng.normal(0, 0.5, y.shape + (1,))).astype("float32")

    def build():
        # BatchNorm synchronised across replicas, dropout off: the two runs see the same maths.
        return build_unetpp(filters=(4, 4, 8), depth=2, deep_supervision=False,
                            sync_batch_norm=True, dropout=0.0, l2=1e-3)

    keras.utils.set_random_seed(0)
    first = build()
    initial = first.get_weights()
    reg_initial = float(sum(float(r) for r in first.losses))   # L2 penalty at step 1

    def naive_batch_dice(y_true, y_pred):
        # One scalar Dice over the (local) batch, as in the user's code.
        t = ops.reshape(ops.one_hot(ops.cast(y_true, "int32"), 2)[..., 1], (-1,))
        p = ops.reshape(y_pred[..., 1], (-1,))
        return 1.0 - (2.0 * ops.sum(t * p) + 1e-6) / (ops.sum(t) + ops.sum(p) + 1e-6)

    def run(strategy, make_loss):
        with strategy.scope():
            model = build()
            model.set_weights(initial)
            model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05), loss=make_loss())
        losses = []
        record = keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda b, logs: losses.append(float(logs["loss"])))
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
        model.fit(ds, epochs=1, verbose=0, shuffle=False, callbacks=[record])
        # Keras logs the running mean of the step losses (the first one is step 1's own).
        return losses, [w.tolist() for w in model.get_weights()]

    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert two.num_replicas_in_sync == 2
    out = {"reg_initial": reg_initial}
    for name, make in [("dice_ce", DiceCELoss), ("batch_dice", lambda: DiceLoss(batch_dice=True)),
                       ("naive", lambda: naive_batch_dice)]:
        l1, w1 = run(one, make)
        l2, w2 = run(two, make)
        out[name] = {
            "loss_1": l1, "loss_2": l2,
            "max_loss_diff": max(abs(a - b) for a, b in zip(l1, l2)),
            "max_weight_diff": max(float(np.max(np.abs(np.subtract(a, b))))
                                   for a, b in zip(w1, w2)),
        }
    print(json.dumps(out))
    '''
)


@pytest.fixture(scope="module")
def comparison():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dice_ce", "batch_dice"])
def test_one_vs_two_replicas_identical(comparison, name):
    result = comparison[name]
    assert len(result["loss_1"]) == 3
    assert result["max_loss_diff"] < 1e-6, result
    assert result["max_weight_diff"] < 1e-6, result
    # The run really trained (not a trivially equal no-op).
    assert result["loss_1"][-1] != result["loss_1"][0]


@pytest.mark.slow
def test_naive_scalar_batch_dice_is_doubled_under_two_replicas(comparison):
    result = comparison["naive"]
    # A scalar loss is neither averaged nor divided by the replica count: Keras reports (and
    # back-propagates) the sum of the two half-batch Dice losses, about twice the 1-device value.
    # The L2 term (same initial weights) is scaled correctly, so compare the data parts.
    reg = comparison["reg_initial"]
    ratio = (result["loss_2"][0] - reg) / (result["loss_1"][0] - reg)
    assert 1.9 < ratio < 2.1, (ratio, result)
    assert result["max_weight_diff"] > 1e-4
