"""Training configuration, precision/strategy choice, schedules, atomic checkpoints, history/curves.

Fast tests (no training): each checks a behaviour against a hand-computed answer.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from medseg.errors import InputError
from medseg.train.config import TrainConfig, load_config_file
from medseg.train.strategy import (
    cpu_has_native_bf16,
    is_chief,
    resolve_precision,
    scaled_learning_rate,
    select_strategy,
    tf_config,
    writing_dir,
    cleanup_writing_dir,
)


# --- config -----------------------------------------------------------------------------------
def test_defaults_are_valid_and_filters_follow_depth():
    cfg = TrainConfig()
    cfg.validate()
    assert cfg.unet_filters == [32, 64, 128, 256, 512]
    assert TrainConfig(depth=2).unet_filters == [32, 64, 128]


def test_yaml_file_overrides_defaults_and_coerces_types(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("epochs: 7\nlr: 1\nschedule: cosine\npatch_size: [32, 64]\nplan:\n  context_slices: 3\n"
                    "deep_supervision: 'false'\n")
    cfg = TrainConfig.from_dict(load_config_file(path), source=path)
    assert cfg.epochs == 7 and cfg.schedule == "cosine"
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.patch_size == [32, 64]
    assert cfg.plan == {"context_slices": 3}
    assert cfg.deep_supervision is False
    # untouched fields keep their defaults
    assert cfg.batch_size == TrainConfig().batch_size


def test_json_file_and_none_keeps_default(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"batch_size": 3, "seed": None}))
    cfg = TrainConfig.from_dict(load_config_file(path))
    assert cfg.batch_size == 3 and cfg.seed == 0


def test_save_roundtrip(tmp_path):
    cfg = TrainConfig(epochs=3, filters=[4, 8, 16], depth=2, plan={"lesion_fraction": 0.3})
    path = cfg.save(tmp_path / "config.json")
    again = TrainConfig.from_dict(json.loads(path.read_text()))
    assert again == cfg


@pytest.mark.parametrize(
    "values, match",
    [
        ({"epochs": 0}, "epochs to be a positive integer"),
        ({"lr": -1}, "lr to be a positive number"),
        ({"schedule": "step"}, "schedule to be one of poly, cosine, constant"),
        ({"precision": "fp8"}, "precision to be one of"),
        ({"loss": "focal"}, "loss to be one of"),
        ({"dropout": 1.0}, r"dropout to be in \[0, 1\)"),
        ({"l2": -1.0}, "l2, weight_decay and warmup_epochs >= 0"),
        ({"folds": 5}, "folds and fold given together"),
        ({"folds": 3, "fold": 3}, "0 <= fold < folds"),
        ({"val_fraction": 1.5}, r"val_fraction to be in \[0, 1\)"),
        ({"patch_size": [32]}, "patch_size to be two positive integers"),
        ({"patch_size": [40, 40], "depth": 4}, "patch_size multiples of 2\\*\\*depth = 16"),
        ({"filters": [8, 16], "depth": 2}, "filters with depth \\+ 1 = 3 values"),
        ({"early_stopping": 0}, "early_stopping to be a positive number"),
        ({"max_val_cases": 0}, "max_val_cases to be a positive integer"),
        ({"max_time_s": 0}, "max_time_s to be a positive number of seconds"),
        ({"gpus": [0], "devices": ["/cpu:0"]}, "either gpus or devices"),
        ({"epochs": "many"}, "epochs of type int"),
        ({"epochs": 2.5}, "epochs of type int"),
        ({"filters": "16,32"}, "filters of type list"),
        ({"plan": [1]}, "plan of type dict"),
        ({"deep_supervision": "maybe"}, "deep_supervision of type bool"),
        ({"out": 3}, "out of type str"),
        ({"lr": True}, "lr of type float"),
        ({"epochz": 3}, "unknown setting\\(s\\) 'epochz'"),
    ],
)
def test_bad_values_raise_naming_the_setting(values, match):
    with pytest.raises(InputError, match=match):
        TrainConfig.from_dict(values)


def test_bad_config_files(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_config_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1\n")
    with pytest.raises(InputError, match="bad.yaml: expected valid YAML or JSON, found a parse error"):
        load_config_file(bad)
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    with pytest.raises(InputError, match="expected a mapping of setting names to values, found a list"):
        load_config_file(listing)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config_file(empty) == {}


# --- precision / strategy ---------------------------------------------------------------------
CPUINFO_BF16 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n"
CPUINFO_PLAIN = "processor\t: 0\nflags\t\t: fpu sse avx2\n"


def test_cpu_bf16_detection_from_flags():
    assert cpu_has_native_bf16(CPUINFO_BF16)
    assert cpu_has_native_bf16("flags : amx_bf16 avx2\n")
    assert not cpu_has_native_bf16(CPUINFO_PLAIN)
    # a flag name inside another word must not count
    assert not cpu_has_native_bf16("flags : xavx512_bf16x\n")


def test_precision_auto_on_cpu_follows_cpuinfo():
    # No GPU on the test machine: auto depends only on the CPU flags.
    assert resolve_precision("auto", cpuinfo=CPUINFO_BF16) == "mixed_bfloat16"
    assert resolve_precision("auto", cpuinfo=CPUINFO_PLAIN) == "float32"
    assert resolve_precision("mixed_float16", cpuinfo=CPUINFO_PLAIN) == "mixed_float16"


def test_default_strategy_on_cpu_and_bad_gpu_index(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    import tensorflow as tf

    strategy = select_strategy()
    assert strategy.num_replicas_in_sync == 1
    assert not isinstance(strategy, tf.distribute.MirroredStrategy)
    with pytest.raises(InputError, match="--gpus: expected no --gpus \\(no GPU is visible\\), found 1"):
        select_strategy(gpus=[1])


def test_linear_lr_scaling():
    assert scaled_learning_rate(1e-3, 4) == pytest.approx(4e-3)
    assert scaled_learning_rate(1e-3, 1) == pytest.approx(1e-3)


def test_tf_config_parsing_and_chief(monkeypatch, tmp_path):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert tf_config() is None and is_chief()
    cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}}))
    assert is_chief() and writing_dir(tmp_path) == tmp_path
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}}))
    assert not is_chief()
    private = writing_dir(tmp_path)
    assert private != tmp_path and private.is_dir() and "worker-1" in private.name
    cleanup_writing_dir(private, tmp_path)
    assert not private.exists()
    cleanup_writing_dir(tmp_path, tmp_path)  # never removes the run folder
    assert tmp_path.exists()
    chief_cluster = dict(cluster, chief=["127.0.0.1:3"])
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": chief_cluster, "task": {"type": "worker", "index": 0}}))
    assert not is_chief()
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": chief_cluster, "task": {"type": "chief", "index": 0}}))
    assert is_chief()
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(InputError, match="TF_CONFIG: expected a JSON object, found unparsable text"):
        tf_config()
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster}))
    with pytest.raises(InputError, match='TF_CONFIG: expected a JSON object with "cluster" and "task"'):
        tf_config()


# --- schedule -----------------------------------------------------------------------------------
def test_poly_and_cosine_schedules_match_formulas():
    from medseg.train.callbacks import WarmupDecay

    poly = WarmupDecay(0.1, total_steps=100, kind="poly", power=0.9)
    for step in (0, 10, 50, 99, 100, 150):
        expected = 0.1 * (1 - min(step, 100) / 100) ** 0.9
        assert float(poly(step)) == pytest.approx(expected, rel=1e-5, abs=1e-9)
    cosine = WarmupDecay(0.1, total_steps=100, kind="cosine", warmup_steps=10)
    assert float(cosine(0)) == pytest.approx(0.1 * 1 / 10)  # warm-up: (step + 1) / warmup
    assert float(cosine(4)) == pytest.approx(0.1 * 5 / 10)
    assert float(cosine(10)) == pytest.approx(0.1)
    assert float(cosine(55)) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.5)), abs=1e-7)
    assert float(cosine(100)) == pytest.approx(0.0, abs=1e-7)
    const = WarmupDecay(0.1, total_steps=100, kind="constant")
    assert float(const(77)) == pytest.approx(0.1)
    again = WarmupDecay.from_config(cosine.get_config())
    assert float(again(55)) == pytest.approx(float(cosine(55)))
    with pytest.raises(ValueError, match="kind must be 'poly', 'cosine' or 'constant', found 'step'"):
        WarmupDecay(0.1, 10, kind="step")
    with pytest.raises(ValueError, match="total_steps must be >= 1, found 0"):
        WarmupDecay(0.1, 0)


# --- checkpoints ----------------------------------------------------------------------------------
def _tiny_model(seed=0):
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(2)(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return model


def test_checkpoint_roundtrip_restores_weights_and_optimizer(tmp_path):
    from medseg.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    y = np.zeros((8, 2), "float32")
    model = _tiny_model(0)
    model.fit(x, y, epochs=3, batch_size=4, verbose=0)
    assert latest_checkpoint(tmp_path) is None
    for epoch in (1, 2, 3):
        save_checkpoint(tmp_path, model, {"epoch": epoch, "best_dsc": 0.5}, keep=2)
    folders = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert folders == ["epoch-0002", "epoch-0003"]
    assert latest_checkpoint(tmp_path).name == "epoch-0003"

    other = _tiny_model(1)
    state = load_checkpoint(latest_checkpoint(tmp_path), other)
    assert state == {"epoch": 3, "best_dsc": 0.5}
    for a, b in zip(model.get_weights(), other.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert int(other.optimizer.iterations) == int(model.optimizer.iterations) == 6
    for a, b in zip(model.optimizer.variables, other.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # one more identical step gives identical weights: the Adam moments were restored
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, shuffle=False)
    other.fit(x, y, epochs=1, batch_size=8, verbose=0, shuffle=False)
    for a, b in zip(model.get_weights(), other.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_killed_save_leaves_previous_checkpoint(tmp_path):
    from medseg.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    model = _tiny_model(0)
    save_checkpoint(tmp_path, model, {"epoch": 1})
    root = tmp_path / "checkpoints"
    # What a kill -9 during the next save leaves: a half-written temp folder and no pointer update.
    (root / "epoch-0002.tmp-abc").mkdir()
    (root / "epoch-0002.tmp-abc" / "state.weights.h5").write_bytes(b"half")
    assert latest_checkpoint(tmp_path).name == "epoch-0001"
    # A lost pointer falls back to the newest complete folder.
    (root / "latest").unlink()
    assert latest_checkpoint(tmp_path).name == "epoch-0001"
    # The next save cleans the leftovers.
    save_checkpoint(tmp_path, model, {"epoch": 2})
    assert not list(root.glob("*.tmp-*"))
    # A damaged weights file is reported with its path.
    (root / "epoch-0002" / "state.weights.h5").write_bytes(b"not hdf5")
    with pytest.raises(InputError, match="state.weights.h5: expected weights of the same model architecture"):
        load_checkpoint(root / "epoch-0002", model)
    (root / "epoch-0002" / "state.json").write_text("{")
    with pytest.raises(InputError, match="state.json: expected a training state JSON file"):
        load_checkpoint(root / "epoch-0002", model)


def test_atomic_json_writes_nan_as_null(tmp_path):
    from medseg.train.checkpoint import atomic_write_json

    path = atomic_write_json(tmp_path / "a.json", {"x": float("nan"), "y": [np.float32(1.5), float("inf")]})
    assert json.loads(path.read_text()) == {"x": None, "y": [1.5, None]}
    assert os.listdir(tmp_path) == ["a.json"]


# --- history / curves -------------------------------------------------------------------------------
def test_history_csv_roundtrip_with_missing_validation(tmp_path):
    from medseg.train.curves import plot_curves, read_history_csv, write_history_csv

    rows = [
        {"epoch": 1, "loss": 1.2, "data_loss": 0.9, "reg_loss": 0.3, "dice": 0.1},
        {"epoch": 2, "loss": 1.0, "data_loss": 0.72, "reg_loss": 0.28, "dice": 0.3, "val_dsc_3d": 0.4,
         "val_hd95_mm": float("inf")},
    ]
    path = write_history_csv(rows, tmp_path / "history.csv")
    header = path.read_text().splitlines()[0].split(",")
    assert header == ["epoch", "loss", "data_loss", "reg_loss", "dice", "val_dsc_3d", "val_hd95_mm"]
    back = read_history_csv(path)
    assert back[0] == {"epoch": 1.0, "loss": 1.2, "data_loss": 0.9, "reg_loss": 0.3, "dice": 0.1}
    assert back[1]["val_dsc_3d"] == 0.4 and math.isinf(back[1]["val_hd95_mm"])
    png = plot_curves(rows, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "history.csv"]


def test_validation_summary_rules():
    from medseg.train.callbacks import find_dice_key, summarize_validation

    rows = [{"dsc": 0.8, "hd95_mm": 2.0}, {"dsc": 0.0, "hd95_mm": float("inf")}, {"dsc": float("nan"), "hd95_mm": float("nan")}]
    s = summarize_validation(rows)
    assert s["val_dsc_3d"] == pytest.approx(0.4)  # NaN (both empty) left out
    assert s["val_hd95_mm"] == pytest.approx(2.0) and s["val_hd95_inf"] == 1.0
    assert math.isnan(summarize_validation([{"dsc": float("nan")}])["val_dsc_3d"])
    logs = {"loss": 1, "head_1_foreground_dice": 0.1, "head_4_foreground_dice": 0.4, "val_dsc_3d": 0.2}
    assert find_dice_key(logs) == "head_4_foreground_dice"
    assert find_dice_key({"loss": 1}) is None


def test_run_keeper_best_model_early_stopping_time_budget_and_files(tmp_path, capsys):
    """RunKeeper's bookkeeping on hand-made epoch logs: best by val_dsc_3d, patience, budget."""
    from medseg.train.callbacks import RunKeeper, new_state
    from medseg.train.checkpoint import latest_checkpoint
    from medseg.train.curves import read_history_csv

    model = _tiny_model(0)
    model.optimizer.build(model.trainable_variables)
    saved = []
    state = new_state(seed=3)
    keeper = RunKeeper(tmp_path, state, save_best=lambda m, epoch, logs: saved.append((epoch, logs["val_dsc_3d"])),
                       epochs=10, patience=2, verbose=1)
    keeper.set_model(model)
    keeper.on_train_begin()
    epochs = [
        {"loss": 1.5, "reg_loss": 0.5, "head_2_foreground_dice": 0.1, "val_dsc_3d": 0.2},
        {"loss": 1.2, "reg_loss": 0.4, "head_2_foreground_dice": 0.3},  # not validated
        {"loss": 1.0, "reg_loss": 0.3, "head_2_foreground_dice": 0.5, "val_dsc_3d": 0.6},
        {"loss": 0.9, "reg_loss": 0.3, "head_2_foreground_dice": 0.6, "val_dsc_3d": 0.5},
        {"loss": 0.8, "reg_loss": 0.3, "head_2_foreground_dice": 0.6, "val_dsc_3d": float("nan")},
    ]
    for epoch, logs in enumerate(epochs):
        keeper.on_epoch_begin(epoch)
        keeper.on_epoch_end(epoch, dict(logs))
        if model.stop_training:
            break
    assert saved == [(0, 0.2), (2, 0.6)]  # improvements only
    assert state["best_dsc"] == 0.6 and state["best_epoch"] == 3
    assert state["stopped_early"] and epoch == 4 and state["wait"] == 2  # 0.5 and NaN: 2 without improvement
    rows = read_history_csv(tmp_path / "history.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["data_loss"] == pytest.approx(1.0) and rows[0]["dice"] == pytest.approx(0.1)
    assert "val_dsc_3d" not in rows[1]
    assert latest_checkpoint(tmp_path).name == "epoch-0005"
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("epoch 1/10  loss 1.5000 (data 1.0000 + reg 0.5000)  train Dice 0.100  val 3D DSC 0.200 *best*")
    assert "val 3D DSC -" in out[1]
    assert (tmp_path / "curves.png").is_file()

    # A spent wall-clock budget stops after the epoch, which is still checkpointed.
    model.stop_training = False
    timed = RunKeeper(tmp_path / "timed", new_state(0), save_best=lambda *a: None, epochs=10, verbose=0,
                      max_time_s=1e-9)
    timed.set_model(model)
    timed.on_train_begin()
    timed.on_epoch_begin(0)
    timed.on_epoch_end(0, {"loss": 1.0})
    assert model.stop_training and timed.state["stopped_by_time"]
    assert latest_checkpoint(tmp_path / "timed").name == "epoch-0001"


def test_whole_volume_validation_schedule():
    from medseg.train.callbacks import WholeVolumeValidation

    calls = []

    def evaluate(model):
        calls.append(model)
        return [{"case_id": "a", "dsc": 0.5, "hd95_mm": 3.0}, {"case_id": "b", "dsc": 0.7, "hd95_mm": 5.0}]

    val = WholeVolumeValidation(evaluate, every=3, epochs=7)
    assert [e for e in range(7) if val.due(e)] == [2, 5, 6]  # every 3rd and the last
    logs = {}
    val.on_epoch_end(0, logs)
    assert logs == {} and not calls
    val.on_epoch_end(2, logs)
    assert logs["val_dsc_3d"] == pytest.approx(0.6) and logs["val_hd95_mm"] == pytest.approx(4.0)
    assert [r["epoch"] for r in val.last_rows] == [3, 3]
    # The epoch that spends the time budget is validated even off schedule.
    timed = WholeVolumeValidation(evaluate, every=10, epochs=100, max_time_s=1e-9)
    timed.on_train_begin()
    logs = {}
    timed.on_epoch_end(0, logs)
    assert timed.time_up and "val_dsc_3d" in logs


def test_flat_dice_window_covers_at_least_1000_steps():
    from medseg.train.monitoring import flat_dice_window

    assert flat_dice_window(250) == 4      # default epochs: 4 x 250 = 1000 steps
    assert flat_dice_window(1000) == 4     # never shorter than 4 epochs
    assert flat_dice_window(25) == 40      # the demo's short epochs: 40 x 25 = 1000 steps
    assert flat_dice_window(300) == 4 and flat_dice_window(200) == 5


def test_summary_line_states_infinite_hd95(tmp_path):
    """An empty prediction has HD95 inf: the epoch line says so instead of printing 'nan mm'."""
    from medseg.train.callbacks import RunKeeper, new_state

    keeper = RunKeeper(tmp_path, new_state(seed=0), save_best=lambda *a: None, epochs=5, verbose=0)
    base = {"loss": 0.5, "data_loss": 0.5, "reg_loss": 0.0, "lr": 1e-3, "time_s": 3.0, "val_dsc_3d": 0.0}
    all_empty = keeper.summary_line(0, {**base, "val_hd95_mm": float("nan"), "val_hd95_inf": 1.0,
                                        "val_empty_pred": 1.0, "val_empty_ref": 0.0}, True, False)
    assert "HD95 inf (1 empty prediction)" in all_empty and "nan mm" not in all_empty
    # An empty *reference* is not called an empty prediction.
    no_ref = keeper.summary_line(0, {**base, "val_hd95_mm": float("nan"), "val_hd95_inf": 1.0,
                                     "val_empty_pred": 0.0, "val_empty_ref": 1.0}, True, False)
    assert "HD95 inf (1 empty reference)" in no_ref and "prediction" not in no_ref
    some = keeper.summary_line(0, {**base, "val_hd95_mm": 12.34, "val_hd95_inf": 3.0, "val_empty_pred": 2.0,
                                   "val_empty_ref": 1.0}, True, False)
    assert "HD95 12.3 mm (2 empty predictions, 1 empty reference: inf)" in some
    from medseg.train.callbacks import summarize_validation

    counts = summarize_validation([{"dsc": 0.0, "hd95_mm": float("inf"), "pred_empty": 1.0, "ref_empty": 0.0},
                                   {"dsc": float("nan"), "hd95_mm": float("inf"), "pred_empty": 0.0, "ref_empty": 1.0},
                                   {"dsc": 0.5, "hd95_mm": 4.0, "pred_empty": 0.0, "ref_empty": 0.0}])
    assert (counts["val_empty_pred"], counts["val_empty_ref"], counts["val_hd95_inf"]) == (1.0, 1.0, 2.0)
    finite = keeper.summary_line(0, {**base, "val_hd95_mm": 7.0, "val_hd95_inf": 0.0}, True, False)
    assert "HD95 7.0 mm  " in finite
