"""Class balance of multi-class training: the plan's class shares and CT window, the automatic
cross-entropy class weights, and the diagnostics' rule for such weights.

Independent answers: weights worked out by hand, voxel counts of a synthetic CT made here, and
the binary plan of the same volume, which must not change.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg.data.plan import CLASS_WINDOW_MARGIN_HU, DEFAULT_CT_WINDOW_HU, Plan, make_plan
from medseg.errors import InputError
from medseg.io import Volume
from medseg.io.classes import ClassSpec
from medseg.losses import DiceCELoss, balanced_class_weights
from medseg.train.config import TrainConfig
from medseg.train.assembly import ce_class_weights_for, make_loss


# --- balanced_class_weights --------------------------------------------------------------------
def test_weights_by_hand():
    # background 1 - 0.09 - 0.01 = 0.9: sqrt(0.9 / 0.09) = sqrt(10), sqrt(0.9 / 0.01) = sqrt(90)
    assert balanced_class_weights([0.09, 0.01]) == pytest.approx([1.0, math.sqrt(10), math.sqrt(90)])
    # power 1: full inverse frequency (above the default cap of 30); power 0: equal
    assert balanced_class_weights([0.09, 0.01], power=1.0, max_weight=100) == pytest.approx([1.0, 10.0, 90.0])
    assert balanced_class_weights([0.09, 0.01], power=0.0) == [1.0, 1.0, 1.0]


def test_weights_capped_floored_and_absent_class():
    # 1e-6 of the body: sqrt(~1e6) = 1000 is capped; absent: the cap; a class larger than the
    # background (0.6 against 0.4) keeps weight 1, never below the background's.
    assert balanced_class_weights([1e-6, 0.0]) == [1.0, 30.0, 30.0]
    assert balanced_class_weights([0.6]) == [1.0, 1.0]
    assert balanced_class_weights([0.01], max_weight=5.0) == [1.0, 5.0]


@pytest.mark.parametrize("fractions, kwargs", [([0.7, 0.5], {}), ([-0.1], {}), ([1.5], {}),
                                               ([0.1], {"power": -1}), ([0.1], {"max_weight": 0.5})])
def test_weights_refuse_bad_arguments(fractions, kwargs):
    with pytest.raises(ValueError, match="must"):
        balanced_class_weights(fractions, **kwargs)


# --- the plan: class shares and window ---------------------------------------------------------
def _ct_pair():
    """40x40x10 CT: air, a 30x30 body block at 0 HU (9000 voxels), 'liver' (id 5) 10x10x10
    voxels, half at 20 HU and half at 80 HU, 'aorta' (id 52) 3x3x10 at 50 HU, and a label id
    (7) that belongs to no class."""
    image = np.full((40, 40, 10), -1000.0, np.float32)
    label = np.zeros((40, 40, 10), np.uint8)
    image[5:35, 5:35] = 0.0
    image[10:15, 10:20], image[15:20, 10:20] = 20.0, 80.0
    label[10:20, 10:20] = 5
    image[25:28, 25:28] = 50.0
    label[25:28, 25:28] = 52
    label[30:33, 30:33] = 7
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    return Volume(image, affine, "ct", {"modality": "CT"}), Volume(label, affine, "ct", {})


ORGANS = ClassSpec.parse(["liver=5", "aorta=52"])
REGIONS = ClassSpec.from_dict({"names": ["whole", "core"], "ids": [[5, 52], [52]], "regions": True,
                               "region_order": [5, 52]})


def _class_plan():
    return make_plan([_ct_pair()], overrides={"classes": ORGANS.to_dict(), "num_classes": 3})


def test_plan_records_each_class_share_of_the_body():
    plan = _class_plan()
    assert plan.class_body_fractions() == pytest.approx([1000 / 9000, 90 / 9000])
    entry = plan.fingerprint["cases"][0]
    assert entry["body_voxels"] == 9000 and entry["class_voxels"] == {"liver": 1000, "aorta": 90}
    # written and read back
    again = Plan.from_dict(plan.to_dict())
    assert again.class_body_fractions() == pytest.approx([1000 / 9000, 90 / 9000])


def test_class_plan_windows_the_classes_and_binary_plan_is_unchanged():
    plan = make_plan([_ct_pair()], overrides={"classes": ORGANS.to_dict(), "num_classes": 3,
                                              "contrast_phases": None})
    # Class voxels: 500 at 20 HU, 500 at 80 HU, 90 at 50 HU -> 5th percentile 20, 95th 80.
    assert plan.normalization == {"kind": "ct_window", "low_hu": 20.0 - CLASS_WINDOW_MARGIN_HU,
                                  "high_hu": 80.0 + CLASS_WINDOW_MARGIN_HU}
    # With the contrast phases (the default, issue 23) the top rises above the aorta's arterial range.
    assert _class_plan().normalization["high_hu"] == 650.0
    binary = make_plan([_ct_pair()], overrides={"contrast_phases": None})
    # binary: the default window, widened to the lesion's 0.5/99.5 percentiles (inside it here)
    assert binary.normalization == {"kind": "ct_window", "low_hu": DEFAULT_CT_WINDOW_HU[0],
                                    "high_hu": DEFAULT_CT_WINDOW_HU[1]}
    assert binary.class_body_fractions() is None
    assert "class_body_fractions" not in binary.fingerprint
    assert not {"class_voxels", "body_voxels"} & set(binary.fingerprint["cases"][0])
    # an explicit normalization still wins
    override = {"kind": "ct_window", "low_hu": -500.0, "high_hu": 500.0}
    assert make_plan([_ct_pair()], overrides={"classes": ORGANS.to_dict(), "num_classes": 3,
                                              "normalization": override}).normalization == override


# --- the run's weights -------------------------------------------------------------------------
def test_run_weights_automatic_for_classes_none_for_binary_and_regions():
    plan = _class_plan()
    f1, f2 = 1000 / 9000, 90 / 9000
    bg = 1 - f1 - f2
    expected = [1.0, round(math.sqrt(bg / f1), 4), round(math.sqrt(bg / f2), 4)]
    assert ce_class_weights_for(TrainConfig(), plan) == expected
    assert make_loss(TrainConfig(ce_class_weights=expected)).ce_class_weights == expected
    assert ce_class_weights_for(TrainConfig(), make_plan([_ct_pair()])) is None
    region_plan = plan.replace(classes=REGIONS.to_dict(), num_classes=REGIONS.num_classes, enhancement=None,
                               contrast_phases=None)
    assert ce_class_weights_for(TrainConfig(), region_plan) is None
    # a plan fitted before the shares were recorded: equal weights, as it was trained then
    old = plan.replace(fingerprint={k: v for k, v in plan.fingerprint.items() if k != "class_body_fractions"})
    assert ce_class_weights_for(TrainConfig(), old) is None


def test_run_weights_given_are_checked_against_the_classes():
    plan = _class_plan()
    assert ce_class_weights_for(TrainConfig(ce_class_weights=[1, 2, 3]), plan) == [1.0, 2.0, 3.0]
    with pytest.raises(InputError, match=r"3 values \(background, liver, aorta\).*2 values"):
        ce_class_weights_for(TrainConfig(ce_class_weights=[1, 2]), plan)
    with pytest.raises(InputError, match="nested regions"):
        ce_class_weights_for(TrainConfig(ce_class_weights=[1, 2, 3]),
                             plan.replace(classes=REGIONS.to_dict(), num_classes=REGIONS.num_classes, enhancement=None,
                                          contrast_phases=None))


@pytest.mark.parametrize("weights", [[1.0], [1.0, -2.0], [0.0, 0.0], [1.0, float("nan")], [1.0, float("inf")]])
def test_config_refuses_bad_weights(weights):
    with pytest.raises(InputError, match="ce_class_weights"):
        TrainConfig(ce_class_weights=weights).validate()


def test_cli_flag_reaches_the_config():
    from medseg.cli.train import build_parser, config_from_args

    args = build_parser().parse_args(["--images", "i", "--labels", "l", "--ce-class-weights", "1", "4", "9"])
    assert config_from_args(args).ce_class_weights == [1.0, 4.0, 9.0]


# --- diagnostics -------------------------------------------------------------------------------
def test_diagnostics_hold_ce_weights_next_to_a_foreground_dice_only_to_not_favouring_background():
    import keras

    from medseg.train.diagnostics import Diagnostics, DiagnosticsWarning

    y = np.zeros((4, 10, 10), np.int32)
    y[:, :1, :5] = 1  # 5 % lesion: weights [1, 4] leave background 95 % / (95 % + 20 %) of the pixel mass
    batch = (np.zeros((4, 10, 10, 1)), y)
    inp = keras.Input((10, 10, 1))
    model = keras.Model(inp, keras.layers.Conv2D(2, 1, activation="softmax")(inp))

    def warnings_for(loss):
        model.compile(loss=loss)
        diag = Diagnostics(sample_batch=batch, verbose=0)
        diag.set_model(model)
        diag.on_train_begin()
        return [w["kind"] for w in diag.warnings_seen]

    assert warnings_for(DiceCELoss(ce_class_weights=[1.0, 4.0])) == []
    with pytest.warns(DiagnosticsWarning, match=r"background carries 83%"):
        assert warnings_for(DiceCELoss(ce_class_weights=[1.0, 4.0], dice_weight=0.0)) == ["class_weights"]
    with pytest.warns(DiagnosticsWarning, match=r"at least the weight"):
        assert warnings_for(DiceCELoss(ce_class_weights=[2.0, 1.0])) == ["class_weights"]
