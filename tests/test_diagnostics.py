"""Diagnostics callback: each failure mode reproduced (crafted logs and tiny real runs)."""

import logging
import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from medseg.losses import DiceCELoss, DiceLoss, ForegroundDice, ForegroundFraction
from medseg.nets import build_unetpp
from medseg.train.diagnostics import (
    Diagnostics,
    DiagnosticsWarning,
    check_class_weights,
    check_labels,
    regularization_loss,
)


def kinds(diag):
    return [w["kind"] for w in diag.warnings_seen]


def feed(diag, rows, model=None):
    """Run the callback over crafted per-epoch logs; returns the (mutated) logs."""
    if model is not None:
        diag.set_model(model)
    diag.on_train_begin()
    out = []
    for epoch, row in enumerate(rows):
        logs = dict(row)
        diag.on_epoch_begin(epoch)
        diag.on_epoch_end(epoch, logs)
        out.append(logs)
    return out


def healthy_rows(n=6):
    return [{"loss": 1.0 - 0.1 * e, "foreground_dice": 0.2 + 0.1 * e, "fg_fraction": 0.05}
            for e in range(n)]


def test_healthy_logs_no_warning(recwarn):
    labels = np.eye(4, dtype=int)[None].repeat(2, axis=0)
    diag = Diagnostics(verbose=0, sample_batch=(np.zeros((2, 4, 4, 1)), labels))
    feed(diag, healthy_rows())
    assert diag.warnings_seen == []
    assert not [w for w in recwarn if issubclass(w.category, DiagnosticsWarning)]


def test_collapse_warns_after_n_zero_epochs(caplog):
    rows = healthy_rows(5)
    for row in rows[1:]:
        row["fg_fraction"] = 0.0
    diag = Diagnostics(collapse_epochs=3, verbose=0)
    with pytest.warns(DiagnosticsWarning, match=r"\[collapse\] epoch 4: the model predicts no "
                                                r"foreground at all for 3 epochs"):
        with caplog.at_level(logging.WARNING, logger="medseg.train.diagnostics"):
            feed(diag, rows)
    assert kinds(diag) == ["collapse"]        # once, not every epoch after
    record = diag.warnings_seen[0]
    assert record["epoch"] == 4 and "DiceCELoss" in record["fix"]
    assert any("[collapse]" in r.getMessage() for r in caplog.records)
    assert diag.warnings is diag.warnings_seen


def test_collapse_needs_consecutive_epochs():
    rows = healthy_rows(6)
    for e in (1, 2, 4, 5):
        rows[e]["fg_fraction"] = 0.0           # interrupted at epoch 3: never 3 in a row
    diag = Diagnostics(collapse_epochs=3, verbose=0)
    feed(diag, rows)
    assert "collapse" not in kinds(diag)


def test_flat_dice_with_falling_loss():
    rows = [{"loss": 1.2 - 0.1 * e, "head_4_foreground_dice": 0.31, "head_1_foreground_dice": 0.9,
             "fg_fraction": 0.01} for e in range(4)]
    diag = Diagnostics(flat_epochs=4, verbose=0)
    with pytest.warns(DiagnosticsWarning, match=r"\[flat_dice\] epoch 4: the loss fell from "
                                                r"1.2000 to 0.9000 over 4 epochs while the hard "
                                                r"foreground Dice stayed at 0.3100"):
        feed(diag, rows)
    assert kinds(diag) == ["flat_dice"]


def test_flat_dice_not_raised_when_loss_flat_or_dice_moves():
    flat_loss = [{"loss": 0.5, "foreground_dice": 0.3, "fg_fraction": 0.1}] * 5
    moving = [{"loss": 1.0 - 0.1 * e, "foreground_dice": 0.3 + 0.01 * e, "fg_fraction": 0.1}
              for e in range(5)]
    no_dice = [{"loss": 1.0 - 0.1 * e, "foreground_dice": float("nan")} for e in range(5)]
    for rows in (flat_loss, moving, no_dice):
        diag = Diagnostics(flat_epochs=4, verbose=0)
        feed(diag, rows)
        assert diag.warnings_seen == []


def test_loss_split_into_data_and_regularization(capsys):
    keras.utils.set_random_seed(0)
    model = build_unetpp(filters=(2, 2, 2), depth=2, l2=0.1, deep_supervision=False)
    reg = regularization_loss(model)
    # Independent: 0.1 * sum of squared kernels of every regularized layer.
    by_hand = sum(0.1 * float(np.sum(np.square(l.kernel.numpy())))
                  for l in model.layers if getattr(l, "kernel_regularizer", None) is not None)
    assert reg == pytest.approx(by_hand, rel=1e-5)
    diag = Diagnostics(verbose=1)
    logs = feed(diag, [{"loss": reg + 0.4, "val_loss": reg + 0.5}], model=model)[0]
    assert logs["reg_loss"] == pytest.approx(reg, rel=1e-5)
    assert logs["data_loss"] == pytest.approx(0.4, abs=1e-5)
    assert logs["val_data_loss"] == pytest.approx(0.5, abs=1e-5)
    assert f"= data 0.4000 + regularization {reg:.4f}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("labels", "values", "match"),
    [
        (np.array([[0, 255], [255, 0]]), [0, 255], r"look like 0/255 masks"),
        (np.array([[0.0, 0.5], [1.0, 0.25]]), [0.0, 0.25, 0.5, 1.0],
         r"non-integer label values \[0.25, 0.5\]"),
        (np.array([[0, 1], [2, 0]]), [0, 1, 2], r"label values \[2\] outside the classes 0..1"),
    ],
)
def test_check_labels_finds_bad_values(labels, values, match):
    report = check_labels(labels[None], num_classes=2)
    assert not report["ok"] and report["values"] == values
    assert any(__import__("re").search(match, p) for p in report["problems"])


def test_check_labels_accepts_indices_one_hot_and_datasets():
    y = np.array([[[0, 1], [0, 0]]], np.int32)
    assert check_labels(y)["ok"] and check_labels(y)["foreground_fraction"] == 0.25
    assert check_labels(np.eye(2, dtype=np.float32)[y])["ok"]
    ds = tf.data.Dataset.from_tensor_slices((np.zeros((4, 2, 2, 1), "float32"),
                                             np.concatenate([y] * 3 + [y * 255]))).batch(2)
    assert check_labels(ds, max_batches=1)["ok"]
    bad = check_labels(ds)                    # second batch holds the 255 slice
    assert bad["values"] == [0, 1, 255] and not bad["ok"]
    per_head = ds.map(lambda a, b: (a, (b, b)))
    assert check_labels(per_head)["values"] == [0, 1, 255]
    assert check_labels((np.zeros((1, 2, 2, 1)), y))["ok"]


def test_label_warning_from_sample_batch():
    x = np.zeros((1, 2, 2, 1), "float32")
    diag = Diagnostics(sample_batch=(x, np.array([[[0, 255], [0, 0]]])), verbose=0)
    with pytest.warns(DiagnosticsWarning, match=r"\[labels\] labels are not exactly class "
                                                r"indices 0..1: found values \[0, 255\]"):
        diag.on_train_begin()
    assert "divide by 255" in diag.warnings_seen[0]["fix"]


def test_class_weight_rules():
    assert "at least the weight" in check_class_weights([0.7, 0.3])
    # The user's 0.3/0.7 with 5 % lesion pixels: 0.3*0.95 = 0.285 vs 0.7*0.05 = 0.035 -> 89 %.
    assert "background carries 89% of the weighted pixels" in check_class_weights(
        [0.3, 0.7], [0.95, 0.05])
    assert check_class_weights([0.3, 0.7]) is None
    assert check_class_weights([0.3, 0.7], [0.5, 0.5]) is None
    assert check_class_weights([5.0, 1.0], include_background=False) is None


def test_class_weight_warning_from_compiled_loss_and_not_when_excluded():
    inp = keras.Input((4, 4, 1))
    model = keras.Model(inp, keras.layers.Conv2D(2, 1, activation="softmax")(inp))
    model.compile(loss=DiceLoss(class_weights=[2.0, 1.0], include_background=True))
    diag = Diagnostics(verbose=0)
    diag.set_model(model)
    with pytest.warns(DiagnosticsWarning, match=r"\[class_weights\] the loss weights favour "
                                                r"background: class weights \[2.0, 1.0\]"):
        diag.on_train_begin()
    model.compile(loss=[DiceCELoss(class_weights=[2.0, 1.0], ce_class_weights=[1.0, 4.0])])
    quiet = Diagnostics(verbose=0)
    quiet.set_model(model)
    quiet.on_train_begin()
    assert quiet.warnings_seen == []


def test_user_weights_with_sample_batch_fractions():
    y = np.zeros((4, 10, 10), np.int32)
    y[:, :1, :5] = 1                           # 5 % lesion
    diag = Diagnostics(class_weights=[0.3, 0.7], sample_batch=(np.zeros((4, 10, 10, 1)), y),
                       verbose=0)
    with pytest.warns(DiagnosticsWarning, match=r"background carries 89%"):
        diag.on_train_begin()


def test_alignment_self_check():
    diag = Diagnostics(alignment_dice=0.62, verbose=0)
    with pytest.warns(DiagnosticsWarning, match=r"\[alignment\] augmentation breaks image/mask "
                                                r"alignment: self-check Dice 0.620 < 0.99"):
        diag.on_train_begin()
    assert "ImageDataGenerator" in diag.warnings_seen[0]["fix"]
    ok = Diagnostics(alignment_dice=0.995, verbose=0)
    ok.on_train_begin()
    ok.report_alignment(0.999, epoch=3)
    assert ok.warnings_seen == []
    with pytest.warns(DiagnosticsWarning, match=r"epoch 4: augmentation breaks"):
        ok.report_alignment(0.5, epoch=3)


def test_bad_arguments_and_config():
    with pytest.raises(ValueError, match=r"collapse_epochs must be >= 1 and flat_epochs >= 2"):
        Diagnostics(flat_epochs=1)
    diag = Diagnostics(collapse_epochs=5, class_weights=[1, 2], verbose=0)
    clone = Diagnostics(**diag.get_config())
    assert clone.get_config() == diag.get_config() and clone.class_weights == [1.0, 2.0]


def _lesions(side, n=32, seed=0):
    rng = np.random.default_rng(seed)
    y = np.zeros((n, 16, 16), np.int32)
    for k in range(n):
        if k % 3:                               # a third of the slices have no lesion
            r, c = rng.integers(2, 10, 2)
            y[k, r:r + side, c:c + side] = 1
    return y


def _tiny(**kwargs):
    keras.utils.set_random_seed(1)
    return build_unetpp(filters=(4, 8, 8), depth=2, deep_supervision=False, **kwargs)


@pytest.mark.slow
def test_healthy_training_run_has_no_warning():
    y = _lesions(side=5)
    x = (y[..., None] + np.random.default_rng(1).normal(0, 0.3, y.shape + (1,))).astype("float32")
    model = _tiny(l2=1e-3)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=DiceCELoss(),
                  metrics=[ForegroundDice(), ForegroundFraction()])
    diag = Diagnostics(collapse_epochs=2, flat_epochs=3, sample_batch=(x[:8], y[:8]),
                       alignment_dice=1.0, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagnosticsWarning)
        history = model.fit(x, y, batch_size=8, epochs=5, verbose=0, callbacks=[diag])
    assert diag.warnings_seen == []
    h = history.history
    assert h["foreground_dice"][-1] > 0.5 and h["fg_fraction"][-1] > 0
    np.testing.assert_allclose(np.add(h["data_loss"], h["reg_loss"]), h["loss"], rtol=1e-6)
    assert 0 < h["reg_loss"][-1] < h["reg_loss"][0]


@pytest.mark.slow
def test_users_recipe_collapses_and_is_flagged():
    """The user's situation: weighted Dice over both channels (smooth=1), L2, and images that
    do not show the lesion. The loss falls (and starts above 1), the metric does not move."""
    y = _lesions(side=3)
    x = np.full(y.shape + (1,), 0.5, "float32")

    def user_dice_loss(y_true, y_pred):
        y_true = ops.one_hot(ops.cast(y_true, "int32"), 2)

        def coef(c):
            t, p = ops.reshape(y_true[..., c], (-1,)), ops.reshape(y_pred[..., c], (-1,))
            return (2 * ops.sum(t * p) + 1.0) / (ops.sum(t) + ops.sum(p) + 1.0)

        return 1 - (0.3 * coef(0) + 0.7 * coef(1))

    model = _tiny(l2=1e-2)
    model.compile(optimizer=keras.optimizers.Adam(3e-2), loss=user_dice_loss,
                  metrics=[ForegroundDice(), ForegroundFraction()])
    diag = Diagnostics(collapse_epochs=2, flat_epochs=3, class_weights=[0.3, 0.7],
                       sample_batch=(x[:16], y[:16]), verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiagnosticsWarning)
        h = model.fit(x, y, batch_size=8, epochs=8, verbose=0, callbacks=[diag]).history
    assert set(kinds(diag)) == {"class_weights", "collapse", "flat_dice"}
    assert h["loss"][0] > 1 and h["data_loss"][0] < 1      # the L2 term explains loss > 1
    assert h["loss"][-1] < h["loss"][0] and h["fg_fraction"][-1] == 0.0


def test_reads_the_deepest_head_and_not_the_true_fraction():
    # Deep supervision logs one metric per head; the reference fraction must not be mistaken
    # for the predicted one.
    rows = [{"loss": 1.0, "head_1_fg_fraction": 0.3, "head_4_fg_fraction": 0.0,
             "head_4_true_fg_fraction": 0.05, "head_4_foreground_dice": 0.0}] * 3
    diag = Diagnostics(collapse_epochs=3, verbose=0)
    with pytest.warns(DiagnosticsWarning, match=r"\[collapse\] epoch 3"):
        feed(diag, rows)
    inp = keras.Input((4, 4, 1))
    model = keras.Model(inp, [keras.layers.Softmax(name="out_a")(inp),
                              keras.layers.Softmax(name="out_b")(inp)])
    rows = [{"loss": 1.0, "out_a_fg_fraction": 0.0, "out_b_fg_fraction": 0.2}] * 3
    quiet = Diagnostics(collapse_epochs=3, verbose=0)
    feed(quiet, rows, model=model)            # the last output (out_b) is read
    assert quiet.warnings_seen == []


def test_reg_loss_is_the_mean_over_steps_not_the_end_value():
    keras.utils.set_random_seed(0)
    model = build_unetpp(filters=(2, 2, 2), depth=2, l2=0.5, deep_supervision=False)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05),
                  loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).random((4, 8, 8, 1)).astype("float32")
    y = (x[..., 0] > 0.5).astype("int32")
    start = regularization_loss(model)
    after_first = []
    probe = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda b, logs: after_first.append(regularization_loss(model)))
    diag = Diagnostics(verbose=0)
    h = model.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[diag, probe]).history
    end = regularization_loss(model)
    # Two steps: the loss of step 1 used the initial weights, step 2 those after update 1.
    assert h["reg_loss"][0] == pytest.approx((start + after_first[0]) / 2, rel=1e-5)
    assert end < h["reg_loss"][0] < start


# --- three classes (background, liver, tumour) ----------------------------------------------------
def three_class_rows(n, tumour_dice=0.0, tumour_fraction=0.0):
    """Logs of dice_metrics(3, ["liver", "tumour"]): loss falls 0.1 per epoch, the liver Dice rises,
    the tumour's stays put."""
    return [{"loss": 1.2 - 0.1 * e, "dice_liver": 0.3 + 0.1 * e, "dice_tumour": tumour_dice,
             "mean_dice": (0.3 + 0.1 * e + tumour_dice) / 2, "fg_fraction": 0.1,
             "fg_fraction_liver": 0.08, "fg_fraction_tumour": tumour_fraction} for e in range(n)]


def test_three_classes_flat_and_missing_class_is_named():
    diag = Diagnostics(num_classes=3, class_names=["liver", "tumour"], collapse_epochs=3, flat_epochs=4,
                       verbose=0)
    with pytest.warns(DiagnosticsWarning) as caught:
        feed(diag, three_class_rows(5))
    assert [(w["kind"], w["epoch"], w["class"]) for w in diag.warnings_seen] == [
        ("collapse", 3, 2), ("flat_dice", 4, 2)]
    collapse, flat = (w["message"] for w in diag.warnings_seen)
    assert collapse.startswith("medseg diagnostics [collapse] epoch 3: the model predicts no voxel of "
                               "class 2 (tumour) for 3 epochs while it predicts other classes")
    assert flat.startswith("medseg diagnostics [flat_dice] epoch 4: the loss fell from 1.2000 to 0.9000 "
                           "over 4 epochs while the hard Dice of class 2 (tumour) stayed at 0.0000")
    assert "weight class 2 up" in diag.warnings_seen[1]["fix"]
    assert len([w for w in caught if issubclass(w.category, DiagnosticsWarning)]) == 2


def test_three_classes_predicted_but_wrong_and_healthy():
    # The tumour is predicted (fraction 0.01) but never right: only the flat-Dice rule fires.
    diag = Diagnostics(num_classes=3, flat_epochs=4, verbose=0)
    rows = [{k.replace("liver", "1").replace("tumour", "2"): v for k, v in row.items()}
            for row in three_class_rows(4, tumour_fraction=0.01)]
    with pytest.warns(DiagnosticsWarning, match=r"the hard Dice of class 2 stayed at 0.0000"):
        feed(diag, rows)
    assert kinds(diag) == ["flat_dice"]
    healthy = Diagnostics(num_classes=3, class_names=["liver", "tumour"], flat_epochs=4, verbose=0)
    rows = three_class_rows(6, tumour_fraction=0.02)
    for e, row in enumerate(rows):
        row["dice_tumour"] = 0.1 * e
    feed(healthy, rows)
    assert healthy.warnings_seen == []


def test_three_classes_collapse_to_background_is_one_warning():
    rows = three_class_rows(4)
    for row in rows:
        row.update(fg_fraction=0.0, fg_fraction_liver=0.0)
    diag = Diagnostics(num_classes=3, class_names=["liver", "tumour"], collapse_epochs=3, flat_epochs=9,
                       verbose=0)
    with pytest.warns(DiagnosticsWarning, match=r"no foreground at all for 3 epochs"):
        feed(diag, rows)
    assert [(w["kind"], "class" in w) for w in diag.warnings_seen] == [("collapse", False)]


def test_three_classes_measured_on_the_sample_batch(capsys):
    # An identity model: its output is its input, probabilities that never predict class 2.
    labels = np.array([[[1, 2], [0, 2]], [[1, 1], [0, 0]]], np.int32)
    pred = np.array([[[1, 1], [0, 0]], [[1, 0], [0, 0]]], np.int32)
    probs = np.eye(3, dtype="float32")[pred] * 0.8 + 0.1 / 1.5
    inp = keras.Input((2, 2, 3))
    model = keras.Model(inp, keras.layers.Activation("linear")(inp))
    diag = Diagnostics(num_classes=3, collapse_epochs=2, sample_batch=(probs, labels), verbose=1)
    with pytest.warns(DiagnosticsWarning, match=r"\[collapse\] epoch 2: the model predicts no voxel of "
                                                r"class 2 for 2 epochs"):
        logs = feed(diag, [{"loss": 1.0}, {"loss": 0.9}], model=model)
    # Class 1: predicted 3 pixels, labelled 3, 2 agree -> 4/6; class 2: 0 of 2 -> 0; 3 of 8 predicted.
    assert logs[0]["diag_dice_1"] == pytest.approx(4 / 6) and logs[0]["diag_dice_2"] == 0.0
    assert logs[0]["diag_fg_fraction_1"] == pytest.approx(3 / 8) and logs[0]["diag_fg_fraction_2"] == 0.0
    assert "Dice of class 1 0.6667, class 2 0.0000" in capsys.readouterr().out


def test_class_weights_and_labels_per_class():
    assert check_class_weights([1.0, 2.0, 1.0]) == (
        "class weights [1.0, 2.0, 1.0] give background (class 0) at least the weight of class 2")
    assert check_class_weights([3.0, 2.0, 1.0]).endswith("at least the weight of classes 1, 2")
    # Masses: background 0.1*0.9 = 0.09, class 1 2*0.08 = 0.16, class 2 4*0.02 = 0.08:
    # only class 2 is outweighed, 0.09/0.17 = 53 %.
    assert check_class_weights([0.1, 2.0, 4.0], [0.9, 0.08, 0.02]) == (
        "with class weights [0.1, 2.0, 4.0] and class pixel fractions [0.9, 0.08, 0.02], background carries "
        "53% of the weighted pixels of background and class 2")
    assert check_class_weights([0.1, 2.0, 5.0], [0.9, 0.08, 0.02]) is None
    y = np.zeros((2, 10, 10), np.int32)
    y[:, :1, :8] = 1                          # 8 % class 1
    y[:, 1, :2] = 2                           # 2 % class 2
    report = check_labels(y, num_classes=3)
    assert report["ok"] and report["class_fractions"] == pytest.approx([0.9, 0.08, 0.02])
    assert not check_labels(y, num_classes=2)["ok"]
    diag = Diagnostics(num_classes=3, class_weights=[0.1, 2.0, 4.0], sample_batch=(np.zeros((2, 10, 10, 1)), y),
                       verbose=0)
    with pytest.warns(DiagnosticsWarning, match=r"background carries 53% of the weighted pixels of "
                                                r"background and class 2"):
        diag.on_train_begin()
    assert "each foreground class a larger weight" in diag.warnings_seen[0]["fix"]


def test_three_class_arguments_and_config():
    with pytest.raises(ValueError, match=r"expected 2 foreground class names"):
        Diagnostics(num_classes=3, class_names=["liver"])
    diag = Diagnostics(num_classes=3, class_names=["liver", "tumour"], verbose=0)
    clone = Diagnostics(**diag.get_config())
    assert clone.get_config() == diag.get_config() and clone.class_names == ["liver", "tumour"]


def test_one_class_warnings_name_the_class():
    """A one-class run (``--labels-map liver=5``) is told about its liver, never a "lesion"."""
    assert check_class_weights([0.7, 0.3], foreground="liver") == (
        "class weights [0.7, 0.3] give background (class 0) at least the weight of the liver class")
    assert "the lesion class" in check_class_weights([0.7, 0.3])  # the default name
    diag = Diagnostics(class_weights=[0.6, 0.4], foreground_name="liver", verbose=0)
    with pytest.warns(DiagnosticsWarning):
        diag._check_labels_and_weights()
    (warning,) = diag.warnings
    assert "give the liver class the larger weight" in warning["fix"] and "lesion" not in str(warning)
