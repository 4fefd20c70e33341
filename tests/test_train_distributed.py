"""medseg-train under tf.distribute: 2 logical CPUs vs 1 device, and 2 workers with TF_CONFIG.

Each distributed run is a subprocess: logical devices and the multi-worker runtime must be set
up before TensorFlow initialises, which a pytest process has long done.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from test_train import TINY, final_weights, synthetic_dataset

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import tensorflow as tf
    settings = json.loads(sys.argv[1])
    logical = settings.pop("_logical_cpus", 0)
    if logical:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * logical)
    out = settings.pop("_out")
    from medseg.train import train
    result = train(settings)
    np.savez(out, *result.model.get_weights())
    with open(out + ".json", "w") as f:
        json.dump({"replicas": result.replicas, "global_batch": result.global_batch_size,
                   "lr": result.learning_rate, "strategy": result.strategy,
                   "losses": [r["loss"] for r in result.history]}, f)
""")


def _run(settings: dict, out: Path, env_extra: dict | None = None, wait: bool = True):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_CONFIG", None)
    env.update(env_extra or {})
    cmd = [sys.executable, "-c", SCRIPT, json.dumps(dict(settings, _out=str(out)))]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return proc


def _load(out: Path) -> tuple[list[np.ndarray], dict]:
    with np.load(out) as npz:
        weights = [npz[f"arr_{i}"] for i in range(len(npz.files))]
    return weights, json.loads(Path(str(out) + ".json").read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_logical_cpus_under_mirrored_strategy_match_one_device(tmp_path):
    """Same global batch (2 replicas x 2 = 1 x 4), same scaled lr, dropout off, BatchNorm
    synchronised: the two runs follow the same trajectory."""
    images, labels = synthetic_dataset(tmp_path)
    base = dict(TINY, images=str(images), labels=str(labels), steps_per_epoch=3, epochs=1, dropout=0.0)
    one = tmp_path / "one.npz"
    two = tmp_path / "two.npz"
    # One device: batch 4, lr 2e-3. Two replicas: batch 2 each, lr 1e-3 scaled x2 -> 2e-3.
    procs = [_run(dict(base, batch_size=4, lr=2e-3, run_dir=str(tmp_path / "one")), one, wait=False),
             _run(dict(base, batch_size=2, lr=1e-3, devices=["/cpu:0", "/cpu:1"], _logical_cpus=2,
                       run_dir=str(tmp_path / "two")), two, wait=False)]
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
    w1, info1 = _load(one)
    w2, info2 = _load(two)
    assert info1["replicas"] == 1 and info2["replicas"] == 2
    assert info2["strategy"] == "MirroredStrategy"
    assert info1["global_batch"] == info2["global_batch"] == 4
    assert info1["lr"] == pytest.approx(info2["lr"]) == pytest.approx(2e-3)
    np.testing.assert_allclose(info2["losses"], info1["losses"], rtol=1e-4)
    assert len(w1) == len(w2)
    # Gradients are summed in another order across replicas; Adam divides by sqrt(v), which
    # magnifies that rounding for near-zero gradients: allow 5 % of one Adam step (lr 2e-3).
    for a, b in zip(w1, w2):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4)
    # Both checkpoints hold the same variables, and both optimizers took the 3 steps.
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert a.keys() == b.keys()
    assert int(a["optimizer/vars/0"]) == int(b["optimizer/vars/0"]) == 3  # Adam's iteration counter


@pytest.mark.slow
def test_two_workers_with_tf_config_end_with_identical_weights(tmp_path):
    images, labels = synthetic_dataset(tmp_path)
    run_dir = tmp_path / "run"
    settings = dict(TINY, images=str(images), labels=str(labels), steps_per_epoch=2, epochs=1,
                    run_dir=str(run_dir))
    cluster = {"worker": [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]}
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        procs.append(_run(settings, tmp_path / f"w{index}.npz", {"TF_CONFIG": tf_config}, wait=False))
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=400)
        assert proc.returncode == 0, stderr[-3000:]
    (w0, info0), (w1, info1) = _load(tmp_path / "w0.npz"), _load(tmp_path / "w1.npz")
    assert info0["strategy"] == info1["strategy"] == "MultiWorkerMirroredStrategy"
    assert info0["replicas"] == info1["replicas"] == 2 and info0["global_batch"] == 4
    for a, b in zip(w0, w1):
        np.testing.assert_array_equal(a, b)
    # Only the chief (worker 0) wrote the run folder; it holds the bundle and a checkpoint.
    assert (run_dir / "bundle.json").is_file() and (run_dir / "checkpoints" / "latest").is_file()
    assert json.loads((run_dir / "state.json").read_text())["epoch"] == 1
