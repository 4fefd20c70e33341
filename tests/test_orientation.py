"""Classes on one side of the body: the plan's side shares and ``keep_orientation``, the
augmentation it implies (no flips, no quarter turns), test-time flips that follow the training's,
and the command-line switch.

Independent answers: side shares counted by hand on synthetic CTs made here (one stored LPS,
which must give the same answer as its RAS twin), and Predictor outputs recomputed from plain
model calls on flipped arrays.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest

from medseg.data.plan import LATERAL_SHARE, Plan, make_plan
from medseg.infer.predictor import TTA_FLIPS, Predictor, tta_flips
from medseg.io import Volume
from medseg.io.classes import ClassSpec
from medseg.transforms.augment import AugmentConfig, Augmenter
from medseg.transforms.pipeline import Pipeline

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])  # RAS: array axis 0 runs left-right


def _ct(liver_x: slice, spleen_x=slice(8, 13), kidney_x=(slice(8, 12), slice(27, 31)), affine=AFFINE, flip=False):
    """40x40x6 CT, body x 5..34 (centre 19.5): 'liver' (id 5) over ``liver_x``, 'spleen' (id 4)
    over ``spleen_x`` (left: low x in RAS), 'kidneys' (id 3) 4 columns each side of the centre.
    ``flip`` stores the same anatomy LPS (axes 0, 1 reversed)."""
    image = np.full((40, 40, 6), -1000.0, np.float32)
    label = np.zeros((40, 40, 6), np.uint8)
    image[5:35, 5:35] = 40.0
    label[liver_x, 10:20] = 5
    label[spleen_x, 28:32] = 4
    for xs in kidney_x:
        label[xs, 22:26] = 3
    if flip:
        image, label = image[::-1, ::-1].copy(), label[::-1, ::-1].copy()
        affine = affine.copy()
        affine[:2, :2] = -affine[:2, :2]
        affine[:2, 3] = [39 * 1.5, 39 * 1.5]  # voxel (39, 39) sits where the RAS twin's (0, 0) is
    return Volume(image, affine, "ct", {"modality": "CT"}), Volume(label, affine, "ct", {})


CLASSES = ClassSpec.parse(["liver=5", "kidneys=3", "spleen=4"])
NONE = slice(0, 0)


def _plan(*pairs, **overrides):
    return make_plan(list(pairs), overrides={"classes": CLASSES.to_dict(), "num_classes": 4, **overrides})


def _shares(plan, name):
    return [e["class_side_shares"][name] for e in plan.fingerprint["cases"]]


def test_side_shares_by_hand_and_classes_on_opposite_sides_keep_the_orientation():
    plan = _plan(_ct(slice(25, 31)))
    # liver x 25..30, all past the centre 19.5 (toward R); spleen 8..12 none; kidneys 4 + 4 columns
    assert plan.fingerprint["cases"][0]["class_side_shares"] == {"liver": 1.0, "kidneys": 0.5, "spleen": 0.0}
    assert plan.fingerprint["lateral_classes"] == {"liver": "right", "spleen": "left"}
    assert plan.keep_orientation is True and plan.to_dict()["keep_orientation"] is True
    assert Plan.from_dict(plan.to_dict()).keep_orientation is True
    # the same decision in an LPS plan: its L/R axis runs the other way
    lps = _plan(_ct(slice(25, 31)), orientation="LPS")
    assert _shares(lps, "liver") == [0.0] and lps.fingerprint["lateral_classes"] == {"liver": "right",
                                                                                      "spleen": "left"}
    assert lps.keep_orientation is True


def test_classes_on_one_side_only_keep_the_full_augmentation():
    # liver and a lesion inside it (LiTS): a mirrored patch swaps no two classes' places
    plan = _plan(_ct(slice(25, 31), spleen_x=NONE))
    assert plan.fingerprint["lateral_classes"] == {"liver": "right"}
    assert plan.keep_orientation is False and "keep_orientation" not in plan.to_dict()


def test_share_threshold_and_voxels_on_the_centre():
    # 12 columns 14..25: 6 past the centre 19.5 -> 0.5; 18..24: 5 of 7 -> 0.714; 18..27: 8 of 10 -> 0.8
    for xs, share in ((slice(14, 26), 0.5), (slice(18, 25), 5 / 7), (slice(18, 28), 0.8)):
        plan = _plan(_ct(xs))
        assert _shares(plan, "liver") == [pytest.approx(share)]
        assert plan.keep_orientation is (share >= LATERAL_SHARE)
    # a body of odd width: centre on column 19, whose voxels count half
    image, label = _ct(slice(19, 20))
    image.array[34] = -1000.0  # body x 5..33: centre 19.0
    assert _shares(_plan((image, label)), "liver") == [0.5]


def test_sides_are_read_after_reorientation():
    # The same anatomy stored LPS: the raw array has liver and spleen on the other side of axis 0,
    # the patient does not. Measured on the raw arrays, the two cases would disagree (1.0 and 0.0).
    ras, lps = _ct(slice(25, 31)), _ct(slice(25, 31), flip=True)
    assert np.all(np.nonzero(lps[1].array == 5)[0] < 19.5)
    plan = _plan(ras, lps)
    assert _shares(plan, "liver") == [1.0, 1.0] and _shares(plan, "spleen") == [0.0, 0.0]
    assert plan.keep_orientation is True


def test_a_class_on_either_side_across_cases_is_not_one_sided():
    # a lesion-like class: right in one patient, left in the other
    plan = _plan(_ct(slice(25, 31)), _ct(slice(8, 14)))
    assert _shares(plan, "liver") == [1.0, 0.0]
    assert plan.fingerprint["lateral_classes"] == {"spleen": "left"} and plan.keep_orientation is False
    # a case without the class does not vote
    plan = _plan(_ct(slice(25, 31)), _ct(NONE))
    assert _shares(plan, "liver") == [1.0, None]
    assert plan.keep_orientation is True


def test_binary_regions_and_overrides():
    binary = make_plan([_ct(slice(25, 31))])
    assert binary.keep_orientation is False and "keep_orientation" not in binary.to_dict()
    assert "lateral_classes" not in binary.fingerprint
    regions = ClassSpec.from_dict({"names": ["whole", "core"], "ids": [[5, 4], [4]], "regions": True,
                                   "region_order": [5, 4]})
    plan = make_plan([_ct(slice(25, 31))], overrides={"classes": regions.to_dict(), "num_classes": 3})
    assert plan.keep_orientation is False and "lateral_classes" not in plan.fingerprint
    assert _plan(_ct(slice(25, 31)), keep_orientation=False).keep_orientation is False
    assert make_plan([_ct(slice(25, 31))], overrides={"keep_orientation": True}).keep_orientation is True
    with pytest.raises(ValueError, match="Plan.keep_orientation must be true or false"):
        Plan(keep_orientation="no")


# --- the augmentation ----------------------------------------------------------------------------
def _joint(pipeline):
    return next(t for t in pipeline.random if isinstance(getattr(t, "augmenter", None), Augmenter))


def test_kept_orientation_trains_without_flips_and_quarter_turns():
    plan = Plan(patch_size=(32, 32), keep_orientation=True)
    config = _joint(Pipeline.from_plan(plan)).config
    assert config == AugmentConfig(flip_prob=0.0, rot90=False)  # nothing else changed
    assert config.rotate_prob == 0.2 and config.scale_prob == 0.2  # small rotations and scaling stay
    params = Augmenter(config).draw_spatial(2000, np.random.default_rng(0), square=True)
    assert not params.flip_h.any() and not params.flip_w.any() and not params.rot90.any()
    assert 0 < np.abs(params.angle_deg).max() <= 15.0
    # the pipeline's config round trip keeps it; an explicit augmentation is taken as given
    again = Pipeline.from_config(Pipeline.from_plan(plan).to_config())
    assert _joint(again).config == config
    assert _joint(Pipeline.from_plan(plan, augment={"flip_prob": 0.3})).config.flip_prob == 0.3
    assert _joint(Pipeline.from_plan(Plan(patch_size=(32, 32)))).config == AugmentConfig()


# --- test-time flips -------------------------------------------------------------------------------
def test_tta_flips_follow_the_training_augmentation():
    plan = Plan(patch_size=(32, 32))

    def flips(plan_=plan, **kw):
        return tta_flips(SimpleNamespace(pipeline=Pipeline.from_plan(plan_, **kw)))

    assert tta_flips(SimpleNamespace(pipeline=None)) == TTA_FLIPS  # bundles from before pipelines
    assert flips() == TTA_FLIPS == ((), (1,), (2,), (1, 2))
    assert flips(augment={"flip_prob": 0.0}) == ((), (1, 2))  # quarter turns only: the half turn
    assert flips(plan.replace(keep_orientation=True)) == ((),)
    assert flips(augment={"flip_prob": 0.0, "rot90": False}) == ((),)
    assert flips(augment=False) == ((),)


def _bundle(tmp_path, plan, **kwargs):
    import keras

    from medseg.infer.bundle import load_bundle, save_bundle
    from medseg.nets.unetpp import build_unetpp

    keras.utils.set_random_seed(2)
    model = build_unetpp(input_channels=1, filters=(4, 8), depth=1, deep_supervision=False, batch_norm=False)
    save_bundle(tmp_path, model, plan, **kwargs)
    return load_bundle(tmp_path)


MR = dict(modality="MR", divisor=2, patch_size=(32, 32), normalization={"kind": "zscore"})


def test_tta_of_a_model_trained_with_turns_only_averages_the_half_turn(tmp_path):
    plan = Plan(**MR)
    bundle = _bundle(tmp_path, plan, pipeline=Pipeline.from_plan(plan, augment={"flip_prob": 0.0}))
    x = np.random.default_rng(1).normal(size=(2, 20, 18, 1)).astype(np.float32)
    plain = Predictor(bundle).predict_slices(x)
    turned = Predictor(bundle).predict_slices(np.ascontiguousarray(x[:, ::-1, ::-1]))[:, ::-1, ::-1]
    tta = Predictor(bundle, tta=True)
    assert tta.flips == ((), (1, 2))
    np.testing.assert_allclose(tta.predict_slices(x), (plain + turned) / 2, atol=1e-6)
    assert np.abs(turned - plain).max() > 1e-4  # the random net is not turn-invariant


def test_tta_refused_for_a_model_that_kept_the_orientation(tmp_path, capsys):
    from medseg.cli.infer import main
    from medseg.io import write_volume

    bundle = _bundle(tmp_path / "run", Plan(**MR, keep_orientation=True))
    with pytest.raises(ValueError, match="trained without either"):
        Predictor(bundle, tta=True)
    assert Predictor(bundle).flips == ((),)  # without tta: fine
    volume = Volume(np.random.default_rng(0).normal(size=(20, 18, 4)).astype(np.float32), np.eye(4), "mr",
                    {"modality": "MR"})
    write_volume(volume, tmp_path / "mr.nii.gz")
    out = tmp_path / "out.nii.gz"
    assert main([str(tmp_path / "mr.nii.gz"), "--model", str(tmp_path / "run"), "-o", str(out), "--tta"]) == 2
    err = capsys.readouterr().err
    assert "trained with flips or 180-degree turns" in err and "keeps the orientation" in err
    assert "run without --tta" in err and not out.exists()


def test_train_cli_keep_orientation_switch():
    from medseg.cli.train import build_parser, config_from_args

    def plan(*extra):
        return config_from_args(build_parser().parse_args(["--images", "i", "--labels", "l", *extra])).plan

    assert "keep_orientation" not in plan()
    assert plan("--keep-orientation") == {"keep_orientation": True}
    assert plan("--no-keep-orientation") == {"keep_orientation": False}
