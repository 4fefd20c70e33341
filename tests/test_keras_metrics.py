"""Keras metrics: hand-computed epoch Dice, lesion-slice Dice, foreground fractions."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest

from medseg.losses import ForegroundDice, ForegroundFraction, LesionSliceDice, TrueForegroundFraction


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
