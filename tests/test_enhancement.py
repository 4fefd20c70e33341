"""Simulated contrast enhancement (medseg.transforms.enhance): settings, the shifts worked out by
hand in HU, the plan's default (CT classes only; binary plans unchanged), the pipeline step and
the batch maker applying exactly those shifts.
"""

from __future__ import annotations

import numpy as np
import pytest

from medseg.data.cache import VolumeCache
from medseg.data.pipeline import BatchMaker
from medseg.data.plan import Plan, make_plan
from medseg.io import Volume
from medseg.io.classes import ClassSpec
from medseg.transforms.augment import AugmentConfig
from medseg.transforms.enhance import Enhancement, EnhancementConfig, EnhancementParams
from medseg.transforms.pipeline import Pipeline

LOW, HIGH = -250.0, 350.0  # a 600 HU window: 1 HU = 1/600
SPAN = HIGH - LOW


def hu(x):
    return np.asarray(x, np.float64) * SPAN + LOW


def norm(v_hu):
    return (np.asarray(v_hu, np.float64) - LOW) / SPAN


# --- settings --------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"class_prob": 1.5}, "class_prob must lie in"),
    ({"tissue_prob": -0.1}, "tissue_prob must lie in"),
    ({"class_shift_hu": (50, -50)}, "class_shift_hu must be finite"),
    ({"tissue_shift_hu": (0, float("nan"))}, "tissue_shift_hu must be finite"),
    ({"tissue_ramp_hu": (0, 0)}, "tissue_ramp_hu must be finite"),
    ({"class_shift_hu": 5}, "class_shift_hu must be"),
    ({"sigma_px": -1}, "sigma_px must be >= 0"),
    ({"classes": "liver"}, "list of class names"),
])
def test_config_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EnhancementConfig(**kwargs)


def test_config_round_trip_and_unknown_keys():
    c = EnhancementConfig(class_shift_hu=(-10, 20), classes=["liver"])
    assert c.to_dict()["class_shift_hu"] == [-10.0, 20.0] and c.to_dict()["classes"] == ["liver"]
    assert EnhancementConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match=r"unknown enhancement settings \['shift'\]"):
        EnhancementConfig.from_dict({"shift": 3})
    with pytest.raises(ValueError, match="window must rise"):
        Enhancement(c, (100, 100), (1,))
    with pytest.raises(ValueError, match="indices >= 1"):
        Enhancement(c, (LOW, HIGH), (0, 1))


# --- the shifts, by hand ---------------------------------------------------------------------
def _patches():
    """2 patches 12x12, 3 context channels: body at 40 HU, fat at -100 HU, air at -1000 HU
    (clipped to the window's low end), class 1 a 6x6 block, class 2 a 4x4 block, class 3 absent."""
    img_hu = np.full((2, 12, 12, 3), 40.0)
    img_hu[:, :, :2] = -100.0
    img_hu[:, :, -1] = -1000.0
    masks = np.zeros((2, 12, 12), np.uint8)
    masks[:, 2:8, 3:9] = 1
    masks[:, 8:12, 6:10] = 2
    return np.clip(norm(img_hu), 0, 1).astype(np.float32), masks


def test_class_offsets_exact_without_blur():
    images, masks = _patches()
    enh = Enhancement(EnhancementConfig(sigma_px=0), (LOW, HIGH), classes=(1, 2), num_classes=4)
    params = EnhancementParams(np.zeros(2), np.array([[0, 100.0, -30.0, 77.0], [0, 0, 0, 0]]))
    before = hu(images)
    out = hu(enh.apply(images, masks, params))
    d = out - before
    # patch 0: class 1 +100 HU, class 2 -30 HU in every channel; the rest unchanged (class 3's 77
    # is never used: no voxel holds it); patch 1 unchanged
    np.testing.assert_allclose(d[0][masks[0] == 1], 100.0, atol=1e-3)
    np.testing.assert_allclose(d[0][masks[0] == 2], -30.0, atol=1e-3)
    np.testing.assert_allclose(d[0][masks[0] == 0], 0.0, atol=1e-3)
    np.testing.assert_array_equal(d[1], 0.0)


def test_shifts_clip_to_the_window():
    images, masks = _patches()
    enh = Enhancement(EnhancementConfig(sigma_px=0), (LOW, HIGH), classes=(1,), num_classes=3)
    out = enh.apply(images, masks, EnhancementParams(np.zeros(2), np.array([[0, 400.0, 0], [0, -400.0, 0]])))
    # 40 + 400 = 440 HU is above the 350 HU top; 40 - 400 = -360 below the -250 HU bottom
    assert out[0][masks[0] == 1].min() == 1.0 and out[1][masks[1] == 1].max() == 0.0


def test_soft_tissue_ramp():
    enh = Enhancement(EnhancementConfig(tissue_ramp_hu=(-100, 0)), (LOW, HIGH), classes=(1,), num_classes=2)
    values = np.array([-1000.0, -100.0, -50.0, 0.0, 40.0, 300.0])
    images = np.clip(norm(values), 0, 1).astype(np.float32).reshape(1, 1, 6, 1)
    masks = np.zeros((1, 1, 6), np.uint8)
    out = hu(enh.apply(images, masks, EnhancementParams(np.array([80.0]), np.zeros((1, 2)))))
    # air (clipped to -250) and fat unchanged, half-way up the ramp half the shift, soft tissue
    # the whole shift, 300 + 80 clipped to the window's 350
    np.testing.assert_allclose(out.ravel(), [LOW, -100.0, -10.0, 80.0, 120.0, HIGH], atol=1e-3)


def test_blur_softens_the_edge_only():
    images = np.full((1, 40, 40, 1), norm(40.0), np.float32)
    masks = np.zeros((1, 40, 40), np.uint8)
    masks[0, 10:30, 10:30] = 1
    enh = Enhancement(EnhancementConfig(sigma_px=1.5), (LOW, HIGH), classes=(1,), num_classes=2)
    d = hu(enh.apply(images, masks, EnhancementParams(np.zeros(1), np.array([[0, 120.0]])))) - 40.0
    assert d[0, 20, 20, 0] == pytest.approx(120.0, abs=1e-3)     # deep inside: the whole offset
    assert d[0, 0, 0, 0] == pytest.approx(0.0, abs=1e-3)         # far outside: nothing
    assert 20.0 < d[0, 10, 20, 0] < 100.0 and 0.0 < d[0, 9, 20, 0] < d[0, 10, 20, 0]  # a ramp across the edge
    assert d.sum() == pytest.approx(120.0 * 400, rel=1e-3)       # a blur moves the shift, keeps its total


def test_draws_respect_probabilities_ranges_and_classes():
    enh = Enhancement(EnhancementConfig(class_prob=1.0, tissue_prob=0.0, class_shift_hu=(10, 20)),
                      (LOW, HIGH), classes=(2,), num_classes=4)
    p = enh.draw(500, np.random.default_rng(0))
    assert not p.tissue_hu.any()
    assert not p.class_hu[:, [0, 1, 3]].any()                   # background and unlisted classes
    assert p.class_hu[:, 2].min() >= 10 and p.class_hu[:, 2].max() <= 20
    default = Enhancement(EnhancementConfig(), (LOW, HIGH), classes=(1, 2, 3), num_classes=4)
    q = default.draw(4000, np.random.default_rng(1))
    # default: half the patches each; tissue offsets in [0, 100], class offsets in [-60, 150]
    assert 0.45 < np.mean(q.tissue_hu > 0) < 0.55 and 0.45 < np.mean(q.class_hu[:, 1] != 0) < 0.55
    assert q.tissue_hu.max() <= 100 and -60 <= q.class_hu.min() and q.class_hu.max() <= 150
    np.testing.assert_array_equal(q.class_hu, default.draw(4000, np.random.default_rng(1)).class_hu)


# --- the plan's default ----------------------------------------------------------------------
def _ct_pair():
    image = np.full((32, 32, 6), -1000.0, np.float32)
    label = np.zeros((32, 32, 6), np.uint8)
    image[4:28, 4:28] = 0.0
    image[8:16, 8:16], label[8:16, 8:16] = 60.0, 5
    image[20:23, 20:23], label[20:23, 20:23] = 45.0, 52
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    return Volume(image, affine, "ct", {"modality": "CT"}), Volume(label, affine, "ct", {})


ORGANS = ClassSpec.parse(["liver=5", "aorta=52"])


def _class_plan(**overrides):
    # Issue 13's step on its own: it is the default of plans without the contrast phases (issue 23),
    # which replace it by default.
    overrides.setdefault("contrast_phases", None)
    return make_plan([_ct_pair()], overrides={"classes": ORGANS.to_dict(), "num_classes": 3, **overrides})


def test_plan_default_for_ct_classes_only():
    default = make_plan([_ct_pair()], overrides={"classes": ORGANS.to_dict(), "num_classes": 3})
    assert default.enhancement is None and default.contrast_phases is not None
    plan = _class_plan()
    assert plan.enhancement == EnhancementConfig().to_dict()
    assert plan.enhanced_class_indices() == [1, 2]
    assert Plan.from_dict(plan.to_dict()) == plan
    # binary: no enhancement and no key, so binary plans read as before
    binary = make_plan([_ct_pair()])
    assert binary.enhancement is None and "enhancement" not in binary.to_dict()
    # turned off, or limited to some classes, by the plan override
    assert _class_plan(enhancement=None).enhancement is None
    only = _class_plan(enhancement={"classes": ["aorta"]})
    assert only.enhanced_class_indices() == [2] and only.enhancement["class_prob"] == 0.5
    # MR (z-score) and nested regions get none
    zscore = {"kind": "zscore"}
    assert _class_plan(normalization=zscore).enhancement is None
    regions = ClassSpec.from_dict({"names": ["whole", "core"], "ids": [[5, 52], [52]], "regions": True,
                                   "region_order": [5, 52]})
    assert _class_plan(classes=regions.to_dict()).enhancement is None


@pytest.mark.parametrize("change, match", [
    ({"enhancement": {"classes": ["kidney"]}}, r"classes \['kidney'\] are not among"),
    ({"enhancement": {"class_prob": 2}}, "class_prob must lie in"),
    ({"enhancement": "on"}, "must be None or a mapping"),
    ({"normalization": {"kind": "zscore"}, "enhancement": {}}, "needs a ct_window"),
])
def test_plan_refuses_bad_enhancement(change, match):
    with pytest.raises(ValueError, match=match):
        _class_plan().replace(**change)
    with pytest.raises(ValueError, match="binary lesion class"):
        make_plan([_ct_pair()]).replace(enhancement={})


# --- the pipeline step and the batch maker ---------------------------------------------------
def _plan_for_arrays(**changes):
    base = _class_plan().replace(target_spacing_mm=None, patch_size=(32, 32), lesion_fraction=1.0)
    return base.replace(**changes) if changes else base


def test_pipeline_step_sits_between_patches_and_augmentation():
    plan = _class_plan()
    pipe = Pipeline.from_plan(plan)
    names = [type(t).__name__ for t in pipe.random]
    assert names == ["RandLesionPatchd", "RandEnhancementd", "RandJointAugmentd"]
    step = pipe.random[1]
    assert step.get_config()["window_hu"] == [plan.normalization["low_hu"], plan.normalization["high_hu"]]
    assert step.get_config()["classes"] == [1, 2]
    again = Pipeline.from_config(pipe.to_config())
    assert again.random[1].get_config() == step.get_config()
    assert [type(t).__name__ for t in Pipeline.from_plan(plan, augment=False).random] == ["RandLesionPatchd"]
    assert "RandEnhancementd" not in [type(t).__name__ for t in Pipeline.from_plan(make_plan([_ct_pair()])).random]
    # the dictionary form shifts the image by the classes of the label it is given
    from medseg.transforms.dictionary import RandEnhancementd

    direct = RandEnhancementd(window_hu=(LOW, HIGH), classes=[1], num_classes=2, seed=0,
                              config={"class_prob": 1.0, "tissue_prob": 0.0, "sigma_px": 0.0})
    label = np.zeros((1, 8, 8), np.uint8)
    label[0, 2:5, 2:5] = 1
    sample = {"image": np.full((1, 8, 8, 1), norm(40.0), np.float32), "label": label}
    out = direct(sample)
    offset = direct.last_params["class_hu"][0][1]
    assert -60 <= offset <= 150 and offset != 0
    np.testing.assert_allclose(hu(out["image"][0, ..., 0]), 40.0 + offset * label[0], atol=0.01)
    assert np.all(sample["image"] == np.float32(norm(40.0)))  # the caller's sample is not modified
    with pytest.raises(ValueError, match=r"images \(B, H, W, C\)"):
        direct({"image": np.zeros((8, 8)), "label": np.zeros((8, 8))})
    with pytest.raises(KeyError, match="no key 'label'"):
        direct({"image": np.zeros((1, 8, 8, 1))})


def test_batch_maker_applies_exactly_the_recorded_shifts():
    image = np.random.default_rng(0).random((6, 48, 48), dtype=np.float32)  # CT-window values
    label = np.zeros((6, 48, 48), np.uint8)
    label[:, 10:24, 10:24], label[:, 30:36, 30:36] = 1, 2
    arrays = [("a", image, label)]
    plan = _plan_for_arrays()
    cache = VolumeCache.from_arrays(arrays, plan, label_kind="classes")
    flips = AugmentConfig.flips_only()
    with_step = BatchMaker(cache, plan, batch_size=6, seed=4, augment=flips)
    without = BatchMaker(cache, plan.replace(enhancement=None), batch_size=6, seed=4, augment=flips)
    names = [type(t).__name__ for t in with_step.pipeline.random]
    assert names == ["RandLesionPatchd", "RandEnhancementd", "RandJointAugmentd"]
    assert "RandEnhancementd" not in [type(t).__name__ for t in without.pipeline.random]
    enhancement = with_step.pipeline.random[1].enhancement
    shifted, masks = with_step.batch_uint8(2)
    plain, plain_masks = without.batch_uint8(2)
    np.testing.assert_array_equal(masks, plain_masks)       # same centres and flips
    recorded = with_step.last_params["enhancement"]
    expected = enhancement.apply(plain.copy(), plain_masks, EnhancementParams(
        np.asarray(recorded["tissue_hu"]), np.asarray(recorded["class_hu"])))
    np.testing.assert_allclose(shifted, expected, atol=2e-5)   # the recorded draws (rounded to 0.01 HU)
    assert not np.array_equal(shifted, plain)
    assert set(without.last_params) == {"index", "centres", "spatial", "intensity"}


def test_cli_flag_turns_it_off():
    from medseg.cli.train import build_parser, config_from_args

    on = config_from_args(build_parser().parse_args(["--images", "i", "--labels", "l"]))
    assert "enhancement" not in on.plan
    off = config_from_args(build_parser().parse_args(["--images", "i", "--labels", "l", "--no-enhancement"]))
    assert off.plan == {"enhancement": None}
