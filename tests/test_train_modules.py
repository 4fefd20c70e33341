"""The shape of medseg.train: modules of one rule each, no import circle (imports inside
functions included), no module over 500 lines nor function over 80, no process-wide state set
by library code, and the Keras internals it leans on still behave as the workarounds assume."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medseg"
TRAIN = PACKAGE / "train"


def train_imports() -> dict[str, set[str]]:
    """Module of medseg.train -> the medseg.train modules it imports (anywhere in its body)."""
    modules = {p.stem for p in TRAIN.glob("*.py")}
    edges: dict[str, set[str]] = {}
    for path in TRAIN.glob("*.py"):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "medseg.train":
                found |= {a.name if a.name in modules else "__init__" for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("medseg.train."):
                found.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[2] for a in node.names if a.name.startswith("medseg.train.")}
        edges[path.stem] = found - {path.stem}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_in_medseg_train():
    edges = train_imports()
    assert "loop" not in edges  # split into the modules below
    assert {"run", "fit", "resolve", "rundir", "cases", "assembly", "validation", "bundling"} <= set(edges)
    assert find_cycle(edges) is None
    assert "assembly" not in edges["sizing"] or "sizing" not in edges["assembly"]


def test_no_module_over_500_lines_no_function_over_80():
    for path in TRAIN.glob("*.py"):
        text = path.read_text()
        assert len(text.splitlines()) <= 500, path.name
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 80, f"{path.name}: {node.name}"


#: Calls that change the state of the whole process (other threads, the caller's generators).
PROCESS_WIDE = {"set_random_seed", "set_dtype_policy", "set_global_policy", "set_seed", "seed", "clear_session",
                "set_floatx"}


def test_library_code_sets_no_process_wide_state():
    offenders = []
    for path in PACKAGE.rglob("*.py"):  # the whole library
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in PROCESS_WIDE:
                offenders.append(f"{path.name}:{node.lineno} {ast.unparse(node.func)}")
    assert offenders == []


def test_keras_still_builds_from_a_mean_of_the_first_batch():
    """The multi-worker build patch (keras-team/keras#20585, medseg.train.strategy) is needed while
    Keras' TensorFlow trainer builds the model from a ``MEAN`` ``strategy.reduce`` of the whole
    first batch. This test FAILS once Keras stops doing so: then remove the patch.

    The failure itself needs ``MultiWorkerMirroredStrategy`` over several worker processes
    (tests/test_train_distributed.py trains that way); here the condition it keys on is read."""
    from medseg.train.strategy import keras_reduces_batches, needs_multi_worker_build_fix

    assert keras_reduces_batches()
    import tensorflow as tf

    assert not needs_multi_worker_build_fix(tf.distribute.get_strategy())


def test_checkpoint_weights_come_from_keras_private_h5_store():
    """medseg.train.checkpoint.weights_h5_bytes uses keras.src.saving.saving_lib (H5IOStore,
    _save_state) to build the checkpoint's bytes in memory. This test FAILS when that private API
    changes (the function then returns None and checkpoints fall back to ``save_weights``): the
    bytes must stay a complete ``.weights.h5`` that ``load_weights`` restores exactly."""
    import keras

    from medseg.train.checkpoint import weights_h5_bytes

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    model.train_on_batch(np.ones((4, 3), "float32"), np.zeros((4, 2), "float32"))
    data = weights_h5_bytes(model)
    assert data is not None
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "state.weights.h5"
        path.write_bytes(bytes(data))
        twin = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        twin.compile(optimizer="adam", loss="mse")
        twin.optimizer.build(twin.trainable_variables)
        twin.load_weights(path)
    for a, b in zip(model.get_weights(), twin.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert int(twin.optimizer.iterations) == 1
    for a, b in zip(model.optimizer.variables, twin.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kind_name,outputs,diag", [("binary", 2, 2), ("classes", 3, 3), ("bits", 2, 4)])
def test_label_kinds_answer_what_training_asks(kind_name, outputs, diag):
    from medseg.io.classes import ClassSpec
    from medseg.losses import DiceCELoss, DiceLoss
    from medseg.losses.regions import RegionDiceBCELoss

    spec = {"binary": ClassSpec.binary("liver"),
            "classes": ClassSpec.parse(["liver=1", "spleen=2"]),
            "bits": ClassSpec(("whole", "core"), ((1, 2), (2,)), True, (1, 2))}[kind_name]
    kind = spec.kind
    assert kind.name == kind_name and spec.num_outputs == outputs
    assert kind.diagnostic_classes(spec) == diag
    if kind_name == "bits":
        assert isinstance(kind.loss("dice_ce"), RegionDiceBCELoss) and kind.training_metrics(spec) == []
        assert not kind.takes_ce_class_weights and kind.target_map(spec) is not None
        images, targets = kind.target_map(spec)(None, np.array([[0, 1, 2, 3]]))
        np.testing.assert_array_equal(np.asarray(targets)[0], [[0, 0], [1, 0], [0, 1], [1, 1]])
    else:
        assert isinstance(kind.loss("dice"), DiceLoss) and isinstance(kind.loss("ce", [1.0, 2.0]), DiceCELoss)
        assert kind.loss("ce", [1.0, 2.0]).ce_class_weights == [1.0, 2.0]
        assert kind.target_map(spec) is None
    assert kind.per_class == (kind_name != "binary")
    assert kind.balances_classes == (kind_name == "classes")
    assert kind.diagnostic_names(spec) == (["liver", "spleen"] if kind_name == "classes" else None)
