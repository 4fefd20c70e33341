"""Losses: hand-computed values on 2x2 masks, empty cases, weights, per-sample shape, config."""

import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

from medseg.losses import (
    DiceCELoss,
    DiceLoss,
    FocalTverskyLoss,
    GeneralizedDiceLoss,
    weighted_cross_entropy,
)

# Two 2x2 samples. Sample 0: lesion at the top-left pixel, foreground probabilities
# [[0.8, 0.2], [0.1, 0.1]]. Sample 1: no lesion, foreground probabilities [[0.1, 0.1], [0.2, 0.0]].
Y = np.array([[[1, 0], [0, 0]], [[0, 0], [0, 0]]], np.int32)
FG = np.array([[[0.8, 0.2], [0.1, 0.1]], [[0.1, 0.1], [0.2, 0.0]]], np.float32)
P = np.stack([1 - FG, FG], axis=-1)

# By hand. Sample 0, foreground: I = 0.8, P = 0.8+0.2+0.1+0.1 = 1.2, G = 1
#   Dice = 2*0.8 / (1.2 + 1) = 1.6/2.2 = 8/11 -> loss 3/11.
# Sample 0, background: I = 0.8+0.9+0.9 = 2.6, P = 2.8, G = 3 -> loss 1 - 5.2/5.8 = 0.6/5.8.
# Sample 1, foreground: empty reference -> soft false-positive fraction 0.4/4 = 0.1.
# Sample 1, background: I = P_bg = 3.6 (0.9+0.9+0.8+1.0), G = 4 -> loss 1 - 7.2/7.6 = 0.4/7.6.
FG0, BG0, FG1, BG1 = 3 / 11, 0.6 / 5.8, 0.1, 0.4 / 7.6


def per_sample(loss, y=Y, p=P):
    return np.asarray(loss.call(y, p))


def test_dice_foreground_only_hand_values():
    values = per_sample(DiceLoss())
    assert values.shape == (2,)
    np.testing.assert_allclose(values, [FG0, FG1], rtol=1e-5)
    # Keras' reduction: mean over the batch.
    assert float(DiceLoss()(Y, P)) == pytest.approx((FG0 + FG1) / 2, rel=1e-5)


def test_dice_with_background_and_class_weights():
    np.testing.assert_allclose(per_sample(DiceLoss(include_background=True)),
                               [(BG0 + FG0) / 2, (BG1 + FG1) / 2], rtol=1e-5)
    weighted = DiceLoss(class_weights=[1.0, 3.0], include_background=True)
    np.testing.assert_allclose(per_sample(weighted),
                               [(BG0 + 3 * FG0) / 4, (BG1 + 3 * FG1) / 4], rtol=1e-5)
    # Background weight is irrelevant when the background is excluded.
    np.testing.assert_allclose(per_sample(DiceLoss(class_weights=[5.0, 1.0])), [FG0, FG1],
                               rtol=1e-5)


def test_batch_dice_pools_the_batch():
    # I = 0.8, P = 1.2 + 0.4 = 1.6, G = 1 -> 1 - 1.6/2.6 = 1/2.6, carried by every sample.
    values = per_sample(DiceLoss(batch_dice=True))
    np.testing.assert_allclose(values, [1 / 2.6, 1 / 2.6], rtol=1e-5)


def test_empty_and_one_empty_cases():
    empty_ref = np.zeros((1, 2, 2), np.int32)
    lesion_ref = np.array([[[1, 1], [0, 0]]], np.int32)
    all_bg = np.stack([np.ones((1, 2, 2)), np.zeros((1, 2, 2))], -1).astype("float32")
    all_fg = all_bg[..., ::-1].copy()
    loss = DiceLoss()
    assert per_sample(loss, empty_ref, all_bg)[0] == 0.0      # empty-empty: no loss
    assert per_sample(loss, empty_ref, all_fg)[0] == 1.0      # all false positive
    # Missed lesion: 1 - eps / (2 + eps), i.e. 1 up to eps.
    assert per_sample(loss, lesion_ref, all_bg)[0] == pytest.approx(1.0, abs=1e-6)
    exact = np.stack([1 - lesion_ref, lesion_ref], -1).astype("float32")
    assert per_sample(loss, lesion_ref, exact)[0] == pytest.approx(0.0, abs=1e-6)


def test_user_smooth_one_would_reward_empty_slices():
    # The user's smooth=1 gives a 1-pixel lesion missed entirely Dice (0+1)/(0+1+1) = 0.5:
    # half credit for nothing. medseg's eps only guards the division: loss 1 - eps/(1+eps).
    lesion_ref = np.array([[[1, 0], [0, 0]]], np.int32)
    all_bg = np.stack([np.ones((1, 2, 2)), np.zeros((1, 2, 2))], -1).astype("float32")
    smooth_one_dice = (2 * 0 + 1) / (0 + 1 + 1)   # the user's formula, 1 lesion pixel: 0.5
    assert smooth_one_dice == 0.5
    assert per_sample(DiceLoss(), lesion_ref, all_bg)[0] == pytest.approx(1.0, abs=1e-5)


def test_target_formats_and_logits_agree():
    expected = per_sample(DiceLoss())
    np.testing.assert_allclose(per_sample(DiceLoss(), Y[..., None]), expected, rtol=1e-6)
    onehot = np.eye(2, dtype="float32")[Y]
    np.testing.assert_allclose(per_sample(DiceLoss(), onehot), expected, rtol=1e-6)
    logits = np.log(np.clip(P, 1e-12, 1))
    np.testing.assert_allclose(per_sample(DiceLoss(from_logits=True), Y, logits), expected,
                               rtol=1e-5)
    np.testing.assert_allclose(per_sample(DiceLoss(), Y.astype("float32")), expected, rtol=1e-6)
    np.testing.assert_allclose(per_sample(DiceLoss(), Y, tf.cast(P, tf.bfloat16)), expected,
                               rtol=2e-2)


def test_three_dimensional_inputs():
    y3 = np.stack([Y, Y], axis=1)          # (B, D=2, H, W)
    p3 = np.stack([P, P], axis=1)
    # Both depth slices identical: sums double, Dice and the FP fraction do not change.
    np.testing.assert_allclose(per_sample(DiceLoss(), y3, p3), [FG0, FG1], rtol=1e-5)


def test_dice_ce_hand_values():
    ce0 = (2 * -math.log(0.8) + 2 * -math.log(0.9)) / 4
    ce1 = (2 * -math.log(0.9) - math.log(0.8) - math.log(1.0)) / 4
    np.testing.assert_allclose(per_sample(DiceCELoss()), [FG0 + ce0, FG1 + ce1], rtol=1e-5)
    # Lesion pixel weighted 3: (3*-ln 0.8 + -ln 0.8 + 2*-ln 0.9) / (3 + 1 + 1 + 1).
    wce0 = (4 * -math.log(0.8) + 2 * -math.log(0.9)) / 6
    loss = DiceCELoss(ce_class_weights=[1.0, 3.0], dice_weight=0.5, ce_weight=2.0)
    assert per_sample(loss)[0] == pytest.approx(0.5 * FG0 + 2.0 * wce0, rel=1e-5)
    onehot = np.eye(2, dtype="float32")[Y]
    np.testing.assert_allclose(np.asarray(weighted_cross_entropy(onehot, P)), [ce0, ce1],
                               rtol=1e-5)
    logits = np.log(np.clip(P, 1e-12, 1))
    np.testing.assert_allclose(per_sample(DiceCELoss(from_logits=True), Y, logits),
                               [FG0 + ce0, FG1 + ce1], rtol=1e-4)


def test_generalized_dice_hand_values():
    # Sample 0: w_bg = 1/3^2, w_fg = 1/1^2.
    #   1 - 2 (2.6/9 + 0.8) / ((2.8 + 3)/9 + 2.2) = 1 - 196/256.
    # Sample 1: no lesion -> its weight is the largest present one (1/16, background's):
    #   1 - 2 (3.6/16 + 0) / ((3.6 + 4)/16 + 0.4/16) = 1 - 7.2/8.
    np.testing.assert_allclose(per_sample(GeneralizedDiceLoss()), [1 - 196 / 256, 1 - 7.2 / 8],
                               rtol=1e-5)
    # Foreground only: sample 0 is the plain Dice, sample 1 the FP fraction.
    np.testing.assert_allclose(per_sample(GeneralizedDiceLoss(include_background=False)),
                               [FG0, FG1], rtol=1e-5)


def test_focal_tversky_hand_values():
    # Sample 0: FN = 1 - 0.8 = 0.2, FP = 1.2 - 0.8 = 0.4,
    #   TI = 0.8 / (0.8 + 0.7*0.2 + 0.3*0.4) = 0.8/1.06, loss = (0.26/1.06)**0.75.
    np.testing.assert_allclose(per_sample(FocalTverskyLoss()), [(0.26 / 1.06) ** 0.75, FG1],
                               rtol=1e-5)
    ft = FocalTverskyLoss(alpha=0.5, beta=0.5, gamma=1.0)   # = Dice
    np.testing.assert_allclose(per_sample(ft), [FG0, FG1], rtol=1e-5)


@pytest.mark.parametrize("loss", [DiceLoss(epsilon=0.0), DiceCELoss(epsilon=0.0),
                                  GeneralizedDiceLoss(epsilon=0.0),
                                  FocalTverskyLoss(epsilon=0.0)])
def test_gradients_finite_on_empty_and_perfect_samples(loss):
    y = np.array([[[0, 0], [0, 0]], [[1, 0], [0, 0]]], np.int32)
    logits = tf.Variable(np.array([[[[9.0, -9.0]] * 2] * 2, [[[-9.0, 9.0], [9.0, -9.0]],
                                                             [[9.0, -9.0], [9.0, -9.0]]]],
                                  np.float32))
    with tf.GradientTape() as tape:
        value = loss(y, tf.nn.softmax(logits))
    grad = tape.gradient(value, logits)
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad.numpy()))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: DiceLoss(class_weights=[1.0, -1.0]), r"DiceLoss: class_weights must be >= 0"),
        (lambda: DiceLoss(class_weights="ab"), r"class_weights must be a sequence of numbers"),
        (lambda: DiceLoss(epsilon=-1.0), r"DiceLoss: epsilon must be >= 0, found -1.0"),
        (lambda: FocalTverskyLoss(alpha=0.0), r"FocalTverskyLoss: alpha must be > 0"),
        (lambda: DiceCELoss(dice_weight=0.0, ce_weight=0.0), r"not both 0"),
        (lambda: GeneralizedDiceLoss(class_weights=[1.0, 2.0]),
         r"GeneralizedDiceLoss takes no class_weights: its class weights are 1/G\*\*2"),
    ],
)
def test_bad_arguments_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    ("loss", "y", "match"),
    [
        (DiceLoss(class_weights=[1.0, 2.0, 3.0]), Y,
         r"class_weights has 3 values \[1.0, 2.0, 3.0\] but the predictions have 2 classes"),
        (DiceLoss(class_weights=[1.0, 0.0]), Y, r"the included classes all have weight 0"),
        (DiceCELoss(ce_class_weights=[1.0]), Y, r"ce_class_weights has 1 values"),
        (DiceLoss(), Y[:, :, :, None, None], r"expected targets as class indices"),
    ],
)
def test_bad_inputs_at_call(loss, y, match):
    with pytest.raises(ValueError, match=match):
        loss.call(y, P)


def test_bad_prediction_rank():
    with pytest.raises(ValueError, match=r"expected predictions of shape \(batch, \*spatial"):
        DiceLoss().call(Y[:, 0, 0], P[:, 0, 0])
    with pytest.raises(ValueError, match=r"include_background=False needs at least 2 classes"):
        DiceLoss().call(Y, P[..., :1])


@pytest.mark.parametrize("loss", [
    DiceLoss(class_weights=[0.3, 0.7], include_background=True, batch_dice=True, epsilon=1e-5),
    DiceCELoss(ce_class_weights=[1.0, 2.0], dice_weight=0.5),
    GeneralizedDiceLoss(include_background=False),
    FocalTverskyLoss(alpha=0.6, beta=0.4, gamma=1.0, from_logits=True),
])
def test_config_round_trip(loss):
    config = loss.get_config()
    clone = type(loss).from_config(config)
    assert clone.get_config() == config
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is type(loss) and restored.get_config() == config
    np.testing.assert_allclose(per_sample(restored), per_sample(loss), rtol=1e-6)


def test_compiled_model_with_losses_saves_and_loads(tmp_path):
    from medseg.losses import ForegroundDice

    inp = keras.Input((4, 4, 1))
    model = keras.Model(inp, keras.layers.Conv2D(2, 1, activation="softmax")(inp))
    model.compile(optimizer="adam", loss=DiceCELoss(ce_class_weights=[1.0, 2.0]),
                  metrics=[ForegroundDice()])
    x = np.random.default_rng(0).normal(size=(4, 4, 4, 1)).astype("float32")
    y = (x[..., 0] > 0).astype("int32")
    before = model.evaluate(x, y, verbose=0, return_dict=True)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    after = loaded.evaluate(x, y, verbose=0, return_dict=True)
    assert isinstance(loaded.loss, DiceCELoss) and loaded.loss.ce_class_weights == [1.0, 2.0]
    assert after["loss"] == pytest.approx(before["loss"], rel=1e-6)
    assert after["foreground_dice"] == pytest.approx(before["foreground_dice"], rel=1e-6)


# --- three classes (background + 2) ---------------------------------------------------------------
# Two 2x2 samples; probabilities per pixel (background, class 1, class 2).
Y3 = np.array([[[1, 2], [0, 2]], [[1, 1], [0, 0]]], np.int32)
P3 = np.array([[[[0.2, 0.6, 0.2], [0.1, 0.2, 0.7]], [[0.8, 0.1, 0.1], [0.4, 0.2, 0.4]]],
               [[[0.1, 0.8, 0.1], [0.2, 0.5, 0.3]], [[0.9, 0.1, 0.0], [0.6, 0.2, 0.2]]]], np.float32)
# By hand, sample 0: class 1 I = 0.6, P = 0.6+0.2+0.1+0.2 = 1.1, G = 1 -> loss 1 - 1.2/2.1 = 3/7;
#   class 2 I = 0.7+0.4 = 1.1, P = 1.4, G = 2 -> 1 - 2.2/3.4 = 6/17;
#   background I = 0.8, P = 1.5, G = 1 -> 1 - 1.6/2.5 = 0.36.
# Sample 1: class 1 I = 1.3, P = 1.6, G = 2 -> 1 - 2.6/3.6 = 5/18; class 2 absent -> soft FP
#   fraction (0.1+0.3+0+0.2)/4 = 0.15; background I = 1.5, P = 1.8, G = 2 -> 1 - 3/3.8 = 0.8/3.8.
C1, C2, B0 = (3 / 7, 5 / 18), (6 / 17, 0.15), (0.36, 0.8 / 3.8)


def test_three_class_dice_hand_values():
    np.testing.assert_allclose(per_sample(DiceLoss(), Y3, P3), [(C1[s] + C2[s]) / 2 for s in (0, 1)], rtol=1e-5)
    np.testing.assert_allclose(per_sample(DiceLoss(include_background=True), Y3, P3),
                               [(B0[s] + C1[s] + C2[s]) / 3 for s in (0, 1)], rtol=1e-5)
    # Weights 1:3 between the classes; the background weight is ignored when it is excluded.
    np.testing.assert_allclose(per_sample(DiceLoss(class_weights=[9.0, 1.0, 3.0]), Y3, P3),
                               [(C1[s] + 3 * C2[s]) / 4 for s in (0, 1)], rtol=1e-5)
    # batch_dice: class 1 I = 1.9, P = 2.7, G = 3 -> 1 - 3.8/5.7 = 1/3;
    #   class 2 I = 1.1, P = 2.0, G = 2 -> 1 - 2.2/4 = 0.45; mean 47/120 on both samples.
    np.testing.assert_allclose(per_sample(DiceLoss(batch_dice=True), Y3, P3), [47 / 120] * 2, rtol=1e-5)
    # Targets as one-hot and predictions as logits give the same values.
    np.testing.assert_allclose(per_sample(DiceLoss(from_logits=True), np.eye(3, dtype="float32")[Y3],
                                          np.log(np.clip(P3, 1e-12, 1))),
                               [(C1[s] + C2[s]) / 2 for s in (0, 1)], rtol=1e-4)


def test_three_class_dice_ce_generalized_and_tversky_hand_values():
    ce = [-(math.log(0.6) + math.log(0.7) + math.log(0.8) + math.log(0.4)) / 4,
          -(math.log(0.8) + math.log(0.5) + math.log(0.9) + math.log(0.6)) / 4]
    # CE weights 1, 2, 3 by the reference class: sample 0 pixel weights 2, 3, 1, 3; sample 1 2, 2, 1, 1.
    wce = [-(2 * math.log(0.6) + 3 * math.log(0.7) + math.log(0.8) + 3 * math.log(0.4)) / 9,
           -(2 * math.log(0.8) + 2 * math.log(0.5) + math.log(0.9) + math.log(0.6)) / 6]
    np.testing.assert_allclose(per_sample(DiceCELoss(), Y3, P3), [(C1[s] + C2[s]) / 2 + ce[s] for s in (0, 1)],
                               rtol=1e-5)
    np.testing.assert_allclose(per_sample(DiceCELoss(ce_class_weights=[1.0, 2.0, 3.0]), Y3, P3),
                               [(C1[s] + C2[s]) / 2 + wce[s] for s in (0, 1)], rtol=1e-5)
    # Generalized Dice, background included, w = 1/G^2. Sample 0: w = 1, 1, 1/4:
    #   1 - 2 (0.8 + 0.6 + 1.1/4) / ((1.5+1) + (1.1+1) + (1.4+2)/4) = 1 - 3.35/5.45 = 42/109.
    # Sample 1: w = 1/4, 1/4 and, class 2 absent, the largest present weight 1/4:
    #   1 - 2 (1.5 + 1.3 + 0)/4 / ((1.8+2) + (1.6+2) + 0.6)/4 = 1 - 1.4/2 = 0.3.
    np.testing.assert_allclose(per_sample(GeneralizedDiceLoss(), Y3, P3), [42 / 109, 0.3], rtol=1e-5)
    # Focal Tversky, sample 0: class 1 FN = 0.4, FP = 0.5 -> TI = 0.6/(0.6+0.28+0.15) = 0.6/1.03;
    #   class 2 FN = 0.9, FP = 0.3 -> TI = 1.1/(1.1+0.63+0.09) = 1.1/1.82.
    ft0 = ((1 - 0.6 / 1.03) ** 0.75 + (1 - 1.1 / 1.82) ** 0.75) / 2
    assert per_sample(FocalTverskyLoss(), Y3, P3)[0] == pytest.approx(ft0, rel=1e-5)
