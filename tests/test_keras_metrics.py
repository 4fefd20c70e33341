"""Keras metrics: hand-computed epoch Dice, lesion-slice Dice, foreground fractions."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest

from medseg.losses import ForegroundDice, ForegroundFraction, LesionSliceDice, TrueForegroundFraction
from medseg.losses.metrics import MeanClassDice, class_metric_names, dice_metrics


def probs_from_labels(labels, num_classes=2):
    """Confident softmax-like probabilities whose argmax is ``labels``."""
    p = np.full(labels.shape + (num_classes,), 0.1 / (num_classes - 1), np.float32)
    np.put_along_axis(p, labels[..., None], 0.9, axis=-1)
    return p


# Batch A: lesion 1 pixel, predicted exactly -> batch Dice 1.
REF_A = np.array([[[1, 0], [0, 0]]], np.int32)
PRED_A = np.array([[[1, 0], [0, 0]]], np.int32)
# Batch B: lesion 3 pixels, 1 of them predicted -> batch Dice 2*1/(1+3) = 0.5.
REF_B = np.array([[[1, 1], [1, 0]]], np.int32)
PRED_B = np.array([[[1, 0], [0, 0]]], np.int32)


def test_foreground_dice_accumulates_counts_not_batch_means():
    metric = ForegroundDice()
    metric.update_state(REF_A, probs_from_labels(PRED_A))
    assert float(metric.result()) == pytest.approx(1.0)
    metric.update_state(REF_B, probs_from_labels(PRED_B))
    # TP = 1 + 1, FP = 0, FN = 0 + 2 -> 2*2 / (2*2 + 0 + 2) = 4/6; the mean of the batch
    # values would be (1 + 0.5)/2 = 0.75.
    assert float(metric.result()) == pytest.approx(4 / 6)
    assert float(metric.result()) != pytest.approx(0.75)
    metric.reset_state()
    assert np.isnan(float(metric.result()))


def test_lesion_slice_dice_skips_empty_slices():
    ref = np.array([[[1, 0], [0, 0]], [[0, 0], [0, 0]], [[1, 1], [1, 0]]], np.int32)
    pred = np.array([[[1, 1], [0, 0]], [[1, 1], [1, 1]], [[1, 0], [0, 0]]], np.int32)
    metric = LesionSliceDice()
    metric.update_state(ref, probs_from_labels(pred))
    # Slice 0: 2*1/(2+1) = 2/3. Slice 1 (no lesion) skipped despite 4 false positives.
    # Slice 2: 2*1/(1+3) = 1/2. Mean (2/3 + 1/2)/2 = 7/12.
    assert float(metric.result()) == pytest.approx(7 / 12)
    # The pooled Dice sees the false positives: TP 2, FP 1 + 4, FN 2 -> 4/11.
    pooled = ForegroundDice()
    pooled.update_state(ref, probs_from_labels(pred))
    assert float(pooled.result()) == pytest.approx(4 / 11)
    empty = LesionSliceDice()
    empty.update_state(np.zeros((1, 2, 2), np.int32), probs_from_labels(pred[:1]))
    assert np.isnan(float(empty.result()))


def test_foreground_fractions():
    ref = np.array([[[1, 0], [0, 0]], [[1, 1], [1, 0]]], np.int32)
    pred = np.array([[[1, 1], [0, 0]], [[0, 0], [0, 0]]], np.int32)
    fg, true_fg = ForegroundFraction(), TrueForegroundFraction()
    for m in (fg, true_fg):
        m.update_state(ref, probs_from_labels(pred))
        m.update_state(ref[:1, :, :, None], probs_from_labels(pred[:1]))   # (B, H, W, 1) too
    # Predicted: 2 + 0 + 2 of 12 pixels. Reference: 1 + 3 + 1 of 12.
    assert float(fg.result()) == pytest.approx(4 / 12)
    assert float(true_fg.result()) == pytest.approx(5 / 12)
    assert fg.name == "fg_fraction" and true_fg.name == "true_fg_fraction"


def test_all_background_model_scores_zero_where_smooth_one_scores_071():
    # 100 slices of 16x16, 71 empty, 29 with a 50-pixel lesion; the model predicts no lesion.
    rng = np.random.default_rng(0)
    ref = np.zeros((100, 16, 16), np.int32)
    for k in rng.choice(100, 29, replace=False):
        ref[k].flat[rng.choice(256, 50, replace=False)] = 1
    pred = np.zeros_like(ref)
    probs = probs_from_labels(pred)

    def user_dsc(y_true, y_pred, smooth=1.0):       # the user's metric, one slice at a time
        inter = np.sum(y_true * y_pred)
        return (2 * inter + smooth) / (np.sum(y_true) + np.sum(y_pred) + smooth)

    per_slice = [user_dsc((r == 1).astype(float), p[..., 1]) for r, p in zip(ref, probs)]
    # Empty slices: (0 + 1)/(0 + 25.6 + 1) ~ 0.04 with soft probabilities 0.1, and exactly 1 with
    # hard predictions; with hard predictions the mean is 0.71 + 0.29/51 = 0.7157.
    hard = [user_dsc((r == 1).astype(float), (p == 1).astype(float)) for r, p in zip(ref, pred)]
    assert np.mean(hard) == pytest.approx(0.71 + 0.29 / 51, abs=1e-9)
    assert np.mean(per_slice) < np.mean(hard)
    for metric in (ForegroundDice(), LesionSliceDice(), ForegroundFraction()):
        for start in range(0, 100, 10):           # ten batches, like an epoch
            metric.update_state(ref[start:start + 10], probs[start:start + 10])
        assert float(metric.result()) == 0.0, metric.name


def test_multiclass_and_class_id():
    ref = np.array([[[1, 2], [2, 0]]], np.int32)
    pred = np.array([[[2, 2], [2, 0]]], np.int32)
    p = probs_from_labels(pred, 3)
    pooled, lesion2, one = ForegroundDice(), ForegroundDice(class_id=2), ForegroundDice(class_id=1)
    for m in (pooled, lesion2, one):
        m.update_state(ref, p)
    # Pooled: TP 2 (the two 2s), the mislabelled pixel is FP and FN -> 4/(4+1+1).
    assert float(pooled.result()) == pytest.approx(4 / 6)
    assert float(lesion2.result()) == pytest.approx(4 / 5)     # TP 2, FP 1, FN 0
    assert float(one.result()) == pytest.approx(0.0)           # TP 0, FN 1


def test_sample_weight_per_slice():
    ref = np.concatenate([REF_A, REF_B])
    pred = np.concatenate([PRED_A, PRED_B])
    metric = ForegroundDice()
    metric.update_state(ref, probs_from_labels(pred), sample_weight=np.array([1.0, 0.0]))
    assert float(metric.result()) == pytest.approx(1.0)       # slice B ignored
    per_slice = LesionSliceDice()
    per_slice.update_state(ref, probs_from_labels(pred), sample_weight=np.array([0.0, 1.0]))
    assert float(per_slice.result()) == pytest.approx(0.5)     # slice A ignored
    per_pixel = LesionSliceDice()
    per_pixel.update_state(ref, probs_from_labels(pred),
                           sample_weight=np.stack([np.zeros((2, 2)), np.ones((2, 2))]))
    assert float(per_pixel.result()) == pytest.approx(0.5)


def test_evaluate_reports_epoch_value_not_batch_mean():
    # An identity "model": its output is the probability map given as input.
    inp = keras.Input((2, 2, 2))
    model = keras.Model(inp, keras.layers.Activation("linear")(inp))   # nothing to train
    model.compile(loss="mse", metrics=[ForegroundDice(), LesionSliceDice(), ForegroundFraction()])
    x = np.concatenate([probs_from_labels(PRED_A), probs_from_labels(PRED_B)])
    y = np.concatenate([REF_A, REF_B])
    out = model.evaluate(x, y, batch_size=1, verbose=0, return_dict=True)
    assert out["foreground_dice"] == pytest.approx(4 / 6)
    assert out["lesion_slice_dice"] == pytest.approx(0.75)    # per-slice mean, by definition
    assert out["fg_fraction"] == pytest.approx(2 / 8)


@pytest.mark.parametrize("metric", [ForegroundDice(class_id=2, name="dice2"), LesionSliceDice(),
                                    ForegroundFraction(source="true", name="tf"),
                                    TrueForegroundFraction()])
def test_metric_config_round_trip(metric):
    config = metric.get_config()
    clone = type(metric).from_config(config)
    assert clone.get_config() == config
    restored = keras.metrics.deserialize(keras.metrics.serialize(metric))
    assert type(restored) is type(metric) and restored.get_config() == config


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ForegroundDice(class_id=0), r"ForegroundDice: class_id must be >= 1 or None"),
        (lambda: LesionSliceDice(class_id=0), r"LesionSliceDice: class_id must be >= 1"),
        (lambda: ForegroundFraction(source="both"), r"source must be 'pred' or 'true'"),
    ],
)
def test_bad_metric_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# --- N classes: per-class and mean Dice -----------------------------------------------------------
# Batch 1: class 1 predicted at (0,0) (right) and (1,1) (a class-2 pixel); class 2 at (1,0) (right)
# and (2,2) (background). Batch 2: class 2 everywhere it is, nothing else.
REF3_1 = np.array([[[1, 1, 0], [2, 2, 0], [0, 0, 0]]], np.int32)
PRED3_1 = np.array([[[1, 0, 0], [2, 1, 0], [0, 0, 2]]], np.int32)
REF3_2 = np.array([[[2, 2, 2], [0, 0, 0], [0, 0, 0]]], np.int32)
PRED3_2 = REF3_2.copy()


def _three_class_epoch(metric):
    metric.update_state(REF3_1, probs_from_labels(PRED3_1, 3))
    metric.update_state(REF3_2, probs_from_labels(PRED3_2, 3))
    return float(metric.result())


def test_per_class_and_mean_dice_by_hand():
    # Class 1: TP 1, FP 1 (pixel (1,1)), FN 1 (pixel (0,1)) -> 2/4 = 0.5.
    # Class 2: batch 1 TP 1, FP 1 ((2,2)), FN 1 ((1,1)); batch 2 TP 3 -> 8/10 = 0.8.
    assert _three_class_epoch(ForegroundDice(class_id=1)) == pytest.approx(0.5)
    assert _three_class_epoch(ForegroundDice(class_id=2)) == pytest.approx(0.8)
    mean = MeanClassDice(3)
    # Mean of the epoch's class Dice (0.5 + 0.8)/2; the mean of per-batch means would be
    # ((0.5 + 0.5)/2 + 1.0)/2 = 0.75 (class 1 is absent from batch 2).
    assert _three_class_epoch(mean) == pytest.approx(0.65)
    np.testing.assert_allclose(np.asarray(mean.class_dice()), [0.5, 0.8], rtol=1e-6)
    # A class never labelled nor predicted has no Dice: left out of the mean, not counted as 0 or 1.
    four = MeanClassDice(4)
    four.update_state(REF3_1, probs_from_labels(PRED3_1, 4))
    four.update_state(REF3_2, probs_from_labels(PRED3_2, 4))
    assert float(four.result()) == pytest.approx(0.65)
    assert np.isnan(np.asarray(four.class_dice())[2])
    mean.reset_state()
    assert np.isnan(float(mean.result()))
    weighted = MeanClassDice(3)           # batch 2 weighted out: classes 1 and 2 at 0.5 each
    weighted.update_state(np.concatenate([REF3_1, REF3_2]),
                          probs_from_labels(np.concatenate([PRED3_1, PRED3_2]), 3),
                          sample_weight=np.array([1.0, 0.0]))
    assert float(weighted.result()) == pytest.approx(0.5)
    # Pooled over all foreground: TP 2 + 3, FP 2, FN 2 -> 10/14.
    assert _three_class_epoch(ForegroundDice()) == pytest.approx(10 / 14)
    # Predicted fraction of each class: class 1 in 2 of 18 pixels, class 2 in 2 + 3.
    assert _three_class_epoch(ForegroundFraction(class_id=1)) == pytest.approx(2 / 18)
    assert _three_class_epoch(ForegroundFraction(class_id=2)) == pytest.approx(5 / 18)
    assert ForegroundFraction(class_id=2).name == "fg_fraction_2"


def test_dice_metrics_names_and_values_in_evaluate():
    assert [m.name for m in dice_metrics(2)] == ["foreground_dice", "fg_fraction"]
    assert [m.name for m in dice_metrics(2, ["lesion"])] == ["foreground_dice", "fg_fraction"]
    metrics = dice_metrics(3, ["liver", "tumour"])
    assert [m.name for m in metrics] == ["dice_liver", "dice_tumour", "mean_dice", "fg_fraction",
                                         "fg_fraction_liver", "fg_fraction_tumour"]
    assert [m.name for m in dice_metrics(3)][:2] == ["dice_1", "dice_2"]
    inp = keras.Input((3, 3, 3))
    model = keras.Model(inp, keras.layers.Activation("linear")(inp))
    model.compile(loss="mse", metrics=metrics)
    x = np.concatenate([probs_from_labels(PRED3_1, 3), probs_from_labels(PRED3_2, 3)])
    out = model.evaluate(x, np.concatenate([REF3_1, REF3_2]), batch_size=1, verbose=0, return_dict=True)
    expected = {"dice_liver": 0.5, "dice_tumour": 0.8, "mean_dice": 0.65, "fg_fraction": 7 / 18,
                "fg_fraction_liver": 2 / 18, "fg_fraction_tumour": 5 / 18}
    assert {k: out[k] for k in expected} == pytest.approx(expected)
    # history.csv's "dice" column takes the mean over the classes.
    from medseg.train.callbacks import find_dice_key

    assert find_dice_key(out) == "mean_dice"
    assert find_dice_key({f"head_4_{k}": v for k, v in out.items()}) == "head_4_mean_dice"


def test_class_metric_names_and_errors():
    assert class_metric_names(4, ["liver", "non-enhancing tumour", "a.b"]) == [
        "liver", "non_enhancing_tumour", "a_b"]
    for args, match in [((1,), r"num_classes must be >= 2"),
                        ((3, ["liver"]), r"expected 2 foreground class names"),
                        ((3, ["a-b", "a_b"]), r"distinct metric names")]:
        with pytest.raises(ValueError, match=match):
            class_metric_names(*args)
    with pytest.raises(ValueError, match=r"MeanClassDice: num_classes must be >= 2"):
        MeanClassDice(1)
    with pytest.raises(ValueError, match=r"predictions have 3 classes, the metric was built for num_classes=4"):
        MeanClassDice(4).update_state(REF3_1, probs_from_labels(PRED3_1, 3))
    with pytest.raises(ValueError, match=r"ForegroundFraction: class_id must be >= 1"):
        ForegroundFraction(class_id=0)


@pytest.mark.parametrize("metric", [MeanClassDice(3), ForegroundFraction(class_id=2, name="f2")])
def test_class_metric_config_round_trip(metric):
    config = metric.get_config()
    restored = keras.metrics.deserialize(keras.metrics.serialize(metric))
    assert type(restored) is type(metric) and restored.get_config() == config
