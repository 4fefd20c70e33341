"""train() as a library: events in order, cancel and resume, no process-wide state, a resolved
config that is a new frozen value (the caller's is never edited).

Tiny runs (tests/test_train.py's synthetic volumes and TINY settings): seconds each.
"""

from __future__ import annotations

import dataclasses
import json
import random
import threading

import numpy as np
import pytest

from medseg.events import CancelToken, Recorder, RunCancelled
from medseg.train import TrainConfig
from tests.test_train import TINY, final_weights, synthetic_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_dataset(tmp_path_factory.mktemp("events"))


def tiny(data, run_dir, **changes) -> TrainConfig:
    images, labels = data
    return TrainConfig.from_dict(dict(TINY, images=str(images), labels=str(labels), run_dir=str(run_dir), **changes))


def test_events_in_order_and_the_callers_config_and_random_state_untouched(data, tmp_path):
    from medseg.train import train

    cfg = tiny(data, tmp_path / "a", val_every=2)
    before = dataclasses.asdict(cfg)
    random.seed(1234)
    np.random.seed(99)
    py_state, np_state = random.getstate(), np.random.get_state()
    rec = Recorder()
    result = train(cfg, events=rec)
    # The caller's generators and configuration are as they were.
    assert random.getstate() == py_state
    after_np = np.random.get_state()
    assert after_np[0] == np_state[0] and np.array_equal(after_np[1], np_state[1]) and after_np[2:] == np_state[2:]
    assert dataclasses.asdict(cfg) == before

    # 2 epochs of 2 steps, validated after epoch 2 only (val_every=2, the last epoch).
    kinds = [k for k in rec.kinds() if k != "message"]
    assert kinds == ["run_started", "step", "step", "checkpoint", "epoch_end",
                     "step", "step", "validation", "checkpoint", "checkpoint", "epoch_end", "finished"]
    started = rec[[e.kind for e in rec].index("run_started")]
    assert started.settings == result.config.to_dict()
    steps = [e for e in rec if e.kind == "step"]
    assert [(e.epoch, e.step, e.steps) for e in steps] == [(1, 1, 2), (1, 2, 2), (2, 1, 2), (2, 2, 2)]
    # Mean step time x steps left: 3, 2, 1, 0 steps left after each step.
    assert steps[-1].time_left_s == 0.0 and all(e.time_left_s > 0 for e in steps[:-1])
    written = [(e.what, e.epoch) for e in rec if e.kind == "checkpoint"]
    assert written == [("checkpoint", 1), ("bundle", 2), ("checkpoint", 2)]
    ends = [e for e in rec if e.kind == "epoch_end"]
    history = result.history
    for end, row in zip(ends, history):
        assert end.logs["loss"] == pytest.approx(row["loss"])
        assert end.logs["data_loss"] + end.logs["reg_loss"] == pytest.approx(end.logs["loss"])
        assert end.logs["lr"] == pytest.approx(row["lr"])
    validation = next(e for e in rec if e.kind == "validation")
    assert validation.epoch == 2 and list(validation.per_class) == ["lesion"]
    assert validation.mean_dsc == pytest.approx(history[-1]["val_dsc_3d"])
    assert validation.per_class["lesion"]["dsc"] == pytest.approx(history[-1]["val_dsc_3d"])
    finished = rec[-1]
    assert finished.summary["epochs"] == 2 and finished.summary["steps"] == 4

    # The resolved configuration: a new frozen value, saved as config.json.
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.config.epochs = 5
    assert json.loads((tmp_path / "a" / "config.json").read_text()) == json.loads(
        json.dumps(result.config.to_dict()))
    # The same configuration again (another run folder): the same resolved configuration, and the
    # same seed gives the same weights.
    again = train(dataclasses.replace(cfg, run_dir=str(tmp_path / "b")))
    assert dataclasses.replace(again.config, run_dir=None) == dataclasses.replace(result.config, run_dir=None)
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_same_seed_same_starting_weights_other_seed_others():
    from medseg.data.plan import Plan
    from medseg.train.assembly import build_model

    plan = Plan(modality="MR", patch_size=(32, 32), divisor=4)
    cfg = TrainConfig(filters=[4, 8, 16], depth=2, seed=3)
    first, second = build_model(cfg, plan), build_model(cfg, plan)
    other = build_model(dataclasses.replace(cfg, seed=4), plan)
    for w1, w2 in zip(first.get_weights(), second.get_weights()):
        np.testing.assert_array_equal(w1, w2)
    kernels = [(w1, w3) for w1, w3 in zip(first.get_weights(), other.get_weights()) if w1.ndim == 4]
    assert kernels and all(not np.array_equal(w1, w3) for w1, w3 in kernels)


def test_precision_is_given_to_the_layers_not_set_for_the_process(data, tmp_path):
    import keras

    from medseg.train import train

    seen = {}

    class Look(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if seen:
                return
            convs = [layer for layer in self.model.layers if isinstance(layer, keras.layers.Conv2D)]
            seen["trained"] = {layer.compute_dtype for layer in convs if not layer.name.endswith("logits")}
            seen["heads"] = {layer.compute_dtype for layer in convs if layer.name.endswith("logits")}

            def elsewhere():  # a viewer's thread building its own model meanwhile
                seen["global"] = keras.config.dtype_policy().name
                seen["other_model"] = keras.layers.Dense(2).dtype_policy.name

            thread = threading.Thread(target=elsewhere)
            thread.start()
            thread.join()

    result = train(tiny(data, tmp_path / "bf16", epochs=1, precision="mixed_bfloat16"), callbacks=[Look()])
    assert result.precision == "mixed_bfloat16"
    assert seen == {"trained": {"bfloat16"}, "heads": {"float32"}, "global": "float32", "other_model": "float32"}
    assert keras.config.dtype_policy().name == "float32"


def test_cancel_leaves_a_checkpoint_and_a_cancelled_bundle_and_resume_continues(data, tmp_path):
    from medseg.train import train

    token = CancelToken()
    rec = Recorder()

    def sink(event):
        rec(event)
        if event.kind == "step" and event.epoch == 2 and event.step == 1:
            token.cancel("stopped from the viewer")

    run = tmp_path / "cancelled"
    cfg = tiny(data, run, epochs=3, steps_per_epoch=3)
    with pytest.raises(RunCancelled, match="stopped from the viewer") as caught:
        train(cfg, events=sink, cancel=token)
    # One step of epoch 2 ran, then the run stopped: no second step, no validation.
    steps = [(e.epoch, e.step) for e in rec if e.kind == "step"]
    assert steps == [(1, 1), (1, 2), (1, 3), (2, 1)]
    assert rec[-1].kind == "cancelled" and rec[-1].checkpoint == caught.value.checkpoint
    assert caught.value.checkpoint.endswith("epoch-0002")
    state = json.loads((run / "state.json").read_text())
    assert state["epoch"] == 2 and state["steps"] == 4 and state["cancelled"] is True
    info = json.loads((run / "bundle.json").read_text())
    status = info["status"]
    assert status == "cancelled"

    from medseg.infer.bundle import load_bundle

    assert load_bundle(run).model is not None  # the cancelled bundle is a valid one

    resumed = train(dict(resume=str(run)))
    assert resumed.epochs_completed == 3 and [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert resumed.steps == 4 + 3
    info = json.loads((run / "bundle.json").read_text())
    assert info["status"] == "complete"


def test_a_one_class_run_names_its_class(data, tmp_path):
    """``labels_map liver=1``: the binary run named liver (no class weights or priors, as for
    ``--map-labels``); the messages, the validation event and the curves name the liver."""
    from medseg.io.classes import ClassSpec
    from medseg.train import train
    from medseg.train.fit import dice_title

    rec = Recorder()
    result = train(tiny(data, tmp_path / "liver", epochs=1, verbose=2, labels_map=["liver=1"]), events=rec)
    texts = [e.text for e in rec if e.kind == "message"]
    assert not any("class weights" in t or "(bias background" in t for t in texts)  # one class: binary
    assert any("liver" in t for t in texts) and not any("lesion" in t for t in texts)
    (validation,) = [e for e in rec if e.kind == "validation"]
    assert list(validation.per_class) == ["liver"] and validation.per_class["liver"]["dsc"] == pytest.approx(
        result.history[-1]["val_dsc_3d"])
    assert dice_title(ClassSpec.parse(["liver=1"])) == "Dice of the liver class"
    assert dice_title(ClassSpec.binary()) == "Dice of the lesion class"
    assert dice_title(ClassSpec.parse(["liver=1", "spleen=2"])) == "Dice of the foreground classes"


def test_a_failed_run_says_so_once(data, tmp_path):
    from medseg.errors import DatasetError
    from medseg.train import train

    rec = Recorder()
    with pytest.raises(DatasetError, match="cannot split the 4 labelled patients") as caught:
        train(tiny(data, tmp_path / "f", folds=5, fold=0), events=rec)
    assert rec.kinds() == ["failed"] and rec[0].task == "train" and rec[0].error == str(caught.value)
    assert not (tmp_path / "f").exists()
