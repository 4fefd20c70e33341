"""Choice of ``tf.distribute`` strategy and mixed-precision policy, and who may write files.

- ``TF_CONFIG`` set with a cluster -> ``MultiWorkerMirroredStrategy`` (several machines).
- GPUs visible -> ``MirroredStrategy`` over all of them (or the ``gpus`` chosen).
- explicit ``devices`` -> ``MirroredStrategy`` over them (e.g. two logical CPUs in tests).
- otherwise the default strategy (one CPU or one device).

The global batch is ``batch_size * replicas`` and the learning rate is scaled by ``replicas``
(linear scaling rule), see :func:`scaled_learning_rate`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from medseg.errors import InputError

log = logging.getLogger(__name__)

#: /proc/cpuinfo flags of CPUs with native bfloat16 arithmetic (AVX512-BF16, Intel AMX).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def tf_config() -> dict | None:
    """The parsed ``TF_CONFIG`` environment variable, or None when unset/empty.

    Raises:
        InputError: ``TF_CONFIG`` is not valid JSON with a ``cluster`` and a ``task``.
    """
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise InputError("TF_CONFIG", "a JSON object", f"unparsable text ({exc})") from exc
    if not isinstance(config, dict) or "cluster" not in config or "task" not in config:
        raise InputError("TF_CONFIG", 'a JSON object with "cluster" and "task"', raw[:200])
    return config


def select_strategy(gpus: list[int] | None = None, devices: list[str] | None = None):
    """Pick the distribution strategy for this process.

    Args:
        gpus: indices of the GPUs to use (None: all visible GPUs).
        devices: explicit device names (``["/cpu:0", "/cpu:1"]``); overrides ``gpus``.

    Returns:
        A ``tf.distribute.Strategy``.

    Raises:
        InputError: a requested GPU index does not exist.
    """
    import tensorflow as tf

    if tf_config() is not None:
        log.info("TF_CONFIG found: MultiWorkerMirroredStrategy")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if devices:
        return tf.distribute.MirroredStrategy(devices=list(devices))
    physical = tf.config.list_physical_devices("GPU")
    if gpus is not None:
        missing = [g for g in gpus if not 0 <= g < len(physical)]
        if missing:
            raise InputError(
                "--gpus", f"indices of visible GPUs (0..{len(physical) - 1})" if physical else "no --gpus (no GPU is visible)",
                f"{','.join(map(str, gpus))}",
            )
        if not gpus:
            return tf.distribute.get_strategy()
        return tf.distribute.MirroredStrategy(devices=[f"/gpu:{g}" for g in gpus])
    if physical:
        return tf.distribute.MirroredStrategy(devices=[f"/gpu:{g}" for g in range(len(physical))])
    return tf.distribute.get_strategy()


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU advertises native bfloat16 arithmetic (AVX512-BF16 or AMX-BF16).

    Args:
        cpuinfo: text of ``/proc/cpuinfo`` (read from the system when None; False where absent).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def resolve_precision(precision: str, strategy=None, *, cpuinfo: str | None = None) -> str:
    """The Keras dtype policy name for ``precision``.

    ``auto`` gives ``mixed_float16`` when every GPU in use has compute capability >= 7.0
    (tensor cores), ``mixed_bfloat16`` on a CPU-only run whose CPU has native bf16, else
    ``float32``. Explicit names are returned unchanged.
    """
    if precision != "auto":
        return precision
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if strategy is not None:
        try:
            devices = strategy.extended.worker_devices
        except RuntimeError:  # the default strategy: one device, a GPU when there is one
            devices = None
        if devices is not None and not any("GPU" in d.upper() for d in devices):
            gpus = []  # a mirrored strategy over CPUs only
    if gpus:
        capabilities = [tf.config.experimental.get_device_details(g).get("compute_capability") for g in gpus]
        if all(c is not None and tuple(c) >= (7, 0) for c in capabilities):
            return "mixed_float16"
        return "float32"
    return "mixed_bfloat16" if cpu_has_native_bf16(cpuinfo) else "float32"


def num_replicas(strategy) -> int:
    """Replicas in sync (all devices of all workers)."""
    return int(strategy.num_replicas_in_sync)


def scaled_learning_rate(lr: float, replicas: int) -> float:
    """Linear scaling rule: the gradient of a ``replicas``-times larger batch is as noisy as one
    replica's with a ``replicas``-times smaller step, so the step grows with the batch."""
    return float(lr) * max(1, int(replicas))


def is_chief(strategy=None) -> bool:
    """True for the process that writes the run folder (always True outside multi-worker).

    The chief is the task of type ``chief``, or worker 0 when the cluster has no ``chief``.
    """
    config = tf_config()
    if config is None:
        return True
    task = config.get("task", {})
    task_type, task_id = task.get("type"), int(task.get("index", 0))
    if task_type == "chief":
        return True
    if task_type == "worker":
        return "chief" not in config.get("cluster", {}) and task_id == 0
    return False


def task_name() -> str:
    """``"<type>-<index>"`` of this process in ``TF_CONFIG`` (``"local"`` without it)."""
    config = tf_config()
    if config is None:
        return "local"
    task = config.get("task", {})
    return f"{task.get('type', 'worker')}-{task.get('index', 0)}"


def writing_dir(run_dir: str | os.PathLike) -> Path:
    """Where this process writes: the run folder for the chief, a private temp folder otherwise.

    Every worker of a multi-worker run must take part in saving (saving may involve collective
    operations), but only the chief's files are kept; the others write to a temporary folder
    that :func:`cleanup_writing_dir` removes (the pattern of the TensorFlow multi-worker guide).
    """
    run_dir = Path(run_dir)
    if is_chief():
        return run_dir
    return Path(tempfile.mkdtemp(prefix=f"medseg-{task_name()}-"))


def cleanup_writing_dir(path: str | os.PathLike, run_dir: str | os.PathLike) -> None:
    """Remove a non-chief worker's temporary writing folder (never the run folder)."""
    path, run_dir = Path(path), Path(run_dir)
    if path.resolve() != run_dir.resolve():
        shutil.rmtree(path, ignore_errors=True)


def needs_multi_worker_build_fix(strategy) -> bool:
    """Whether ``model.fit`` under ``strategy`` needs :func:`fix_multi_worker_build`: a
    ``MultiWorkerMirroredStrategy`` whose cross-device ``reduce`` accepts single values only
    (keras-team/keras#20585; :func:`keras_reduces_batches` says whether this Keras still does)."""
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and keras_reduces_batches()


def keras_reduces_batches() -> bool:
    """True while Keras' TensorFlow trainer builds the model from a ``MEAN`` ``strategy.reduce``
    of the whole first batch (the call keras-team/keras#20585 fails on under multi-worker
    training), read from the source of ``TensorFlowTrainer._maybe_symbolic_build``."""
    import inspect

    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    source = inspect.getsource(TensorFlowTrainer._maybe_symbolic_build)
    return "reduce" in source and "MEAN" in source


def fix_multi_worker_build(model, strategy) -> None:
    """Let ``model.fit`` run under ``MultiWorkerMirroredStrategy`` (keras-team/keras#20585).

    Before the first epoch Keras 3 builds the model on one batch, which it gets by a ``MEAN``
    ``strategy.reduce`` of the whole ``(x, y)`` structure; the multi-worker cross-device reduce
    accepts single values only and fails. Building needs shapes and dtypes, not a mean, so this
    replacement takes this worker's first replica's batch instead. Nothing else changes.
    """
    import tensorflow as tf
    from keras import tree

    def maybe_symbolic_build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, it in iterator:
                batch = next(it)
                data_batch = tree.map_structure(
                    lambda v: strategy.experimental_local_results(v)[0]
                    if isinstance(v, tf.distribute.DistributedValues) else v,
                    batch,
                )
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    object.__setattr__(model, "_maybe_symbolic_build", maybe_symbolic_build)

    # Same bug, every step: the logs of the step are reduced with a multi-worker
    # ``reduce("MEAN", value, axis=0)``, which fails on scalars. The logs are metric results,
    # already identical on all replicas, so giving them a length-1 axis makes that mean exact.
    train_step = model.train_step

    def train_step_with_vector_logs(data):
        logs = train_step(data)
        return {k: tf.reshape(v, (1,)) for k, v in logs.items()}

    object.__setattr__(model, "train_step", train_step_with_vector_logs)
