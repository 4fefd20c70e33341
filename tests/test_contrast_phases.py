"""Simulated contrast phases (issue 23 item 1): the table, the step on hand-made patches, the plan's
default for one class and several, and the CT window that keeps the enhanced range unclipped."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.data.plan import Plan, make_plan
from medseg.io.classes import ClassSpec
from medseg.io.volume import Volume
from medseg.transforms.phase import (PHASE_HU, PHASES, ContrastPhase, PhaseConfig, PhaseParams, RandContrastPhased,
                                     phase_row)
from medseg.transforms.pipeline import Pipeline

WINDOW = (-1000.0, 650.0)
SPAN = WINDOW[1] - WINDOW[0]


def _hu(x):
    return np.asarray(x) * SPAN + WINDOW[0]


def _norm(hu):
    return (np.asarray(hu, dtype=np.float32) - WINDOW[0]) / SPAN


def test_phase_rows_by_name():
    assert phase_row("aorta") == "aorta" and phase_row("Aorta") == "aorta"
    assert phase_row("kidney_left") == "kidney" and phase_row("inferior_vena_cava") == "vein"
    assert phase_row("liver") == "liver" and phase_row("portal_vein_and_splenic_vein") == "vein"
    assert phase_row("lesion") == "enhancing" and phase_row("tumour") == "enhancing"
    # The documented anchors (docs/train.md): aorta ~40 HU native, 150-200 portal-venous, 300-550 arterial.
    aorta = PHASE_HU["aorta"]
    assert aorta["native"][0] <= 40 <= aorta["native"][1]
    assert aorta["portal_venous"][0] <= 150 and aorta["portal_venous"][1] >= 200
    assert aorta["arterial"][0] <= 300 and aorta["arterial"][1] >= 550
    # The row of an unknown structure spans the enhancing soft tissue (parenchyma, portal-venous
    # vessels), phase by phase, but not the arterial vessels' 250-550 HU: a vessel is named.
    for phase in PHASES:
        rows = [r[phase] for name, r in PHASE_HU.items() if name in ("liver", "spleen", "pancreas")]
        assert PHASE_HU["enhancing"][phase][0] <= min(lo for lo, _ in rows) + 30
        assert PHASE_HU["enhancing"][phase][1] >= max(hi for _, hi in rows)
    assert PHASE_HU["enhancing"]["arterial"][1] == 250.0 < PHASE_HU["aorta"]["arterial"][1]


def test_window_top_keeps_an_unnamed_structure_s_real_arterial_range():
    """The window keeps 550 HU + 100 for an unnamed class (it may be an arterial vessel in a real
    scan) although its targets stop at 250 HU; a named class's top is its own row's + 100."""
    from medseg.transforms.phase import window_top_hu

    assert window_top_hu(PhaseConfig.for_classes(["lesion"]).targets) == 650.0
    assert window_top_hu(PhaseConfig.for_classes(["liver"]).targets) == 130.0 + 100.0
    assert window_top_hu(PhaseConfig.for_classes(["liver", "aorta"]).targets) == 550.0 + 100.0
    assert window_top_hu({}) == 100.0


def _patch():
    """A 40 x 40 patch: air left, fat band, soft tissue at 40 HU, a 10 x 10 'aorta' (class 1) at 40 HU."""
    hu = np.full((40, 40), 40.0, np.float32)
    hu[:, :5] = -1000.0
    hu[:, 5:10] = -100.0
    mask = np.zeros((40, 40), np.int64)
    mask[15:25, 20:30] = 1
    return _norm(hu)[None, ..., None].copy(), mask[None], hu


def test_a_phase_moves_the_class_to_its_target_and_tissue_above_fat_only():
    images, masks, hu = _patch()
    config = PhaseConfig.for_classes(["aorta"], sigma_px=0.0, tissue_shift_hu=(30.0, 30.0))
    phase = ContrastPhase(config, WINDOW, num_classes=2)
    params = PhaseParams(np.array([1]), np.array([30.0]), np.array([[0.0, 400.0]]))
    out = _hu(phase.apply(images, masks, params)[0, ..., 0])
    inside = masks[0] == 1
    # Hand-computed: the class is set to its target; tissue at 40 HU gets the full +30 HU; fat at
    # -100 HU (the ramp's foot) and air are left where they were.
    np.testing.assert_allclose(out[inside], 400.0, atol=0.05)
    np.testing.assert_allclose(out[~inside & (hu == 40.0)], 70.0, atol=0.05)
    np.testing.assert_allclose(out[hu == -100.0], -100.0, atol=0.05)
    np.testing.assert_allclose(out[hu == -1000.0], -1000.0, atol=0.05)


def test_a_phase_moves_an_enhanced_class_down_to_native():
    """The reverse direction: a contrast scan's aorta (180 HU) moved to a native target."""
    images, masks, _ = _patch()
    images[0, 15:25, 20:30, 0] = _norm(180.0)
    phase = ContrastPhase(PhaseConfig.for_classes(["aorta"], sigma_px=0.0), WINDOW, num_classes=2)
    params = PhaseParams(np.array([0]), np.array([0.0]), np.array([[0.0, 45.0]]))
    out = _hu(phase.apply(images, masks, params)[0, ..., 0])
    np.testing.assert_allclose(out[masks[0] == 1], 45.0, atol=0.05)


def test_untouched_patches_and_absent_classes_stay_as_they_were():
    images, masks, _ = _patch()
    before = images.copy()
    phase = ContrastPhase(PhaseConfig.for_classes(["aorta"]), WINDOW, num_classes=2)
    phase.apply(images, masks, PhaseParams(np.array([-1]), np.array([0.0]), np.array([[0.0, 0.0]])))
    np.testing.assert_array_equal(images, before)
    empty = np.zeros_like(masks)
    phase.apply(images, empty, PhaseParams(np.array([2]), np.array([0.0]), np.array([[0.0, 500.0]])))
    np.testing.assert_array_equal(images, before)  # no aorta pixel, no tissue offset: nothing moves


def test_draws_stay_inside_each_phase_range():
    config = PhaseConfig.for_classes(["aorta", "liver"], prob=1.0)
    phase = ContrastPhase(config, WINDOW, num_classes=3)
    params = phase.draw(4000, np.random.default_rng(0))
    assert set(params.phase.tolist()) == {0, 1, 2, 3}
    for k, name in ((1, "aorta"), (2, "liver")):
        for p, phase_name in enumerate(PHASES):
            lo, hi = PHASE_HU[name][phase_name]
            values = params.target_hu[params.phase == p, k]
            assert values.min() >= lo and values.max() <= hi
    assert np.all(params.target_hu[:, 0] == 0)
    off = ContrastPhase(PhaseConfig.for_classes(["aorta"], prob=0.0), WINDOW).draw(50, np.random.default_rng(1))
    assert np.all(off.phase == -1) and not off.target_hu.any() and not off.tissue_hu.any()


def test_config_is_checked_and_round_trips():
    config = PhaseConfig.for_classes(["aorta"])
    assert PhaseConfig.from_dict(config.to_dict()) == config
    assert config.top_hu == PHASE_HU["aorta"]["arterial"][1]
    with pytest.raises(ValueError, match="prob must lie in"):
        PhaseConfig.for_classes(["aorta"], prob=1.5)
    with pytest.raises(ValueError, match="for each of"):
        PhaseConfig(targets={"aorta": {"native": (0, 1)}})
    with pytest.raises(ValueError, match="unknown contrast-phase settings"):
        PhaseConfig.from_dict({**config.to_dict(), "strength": 2})
    step = RandContrastPhased(window_hu=WINDOW, num_classes=2, config=config.to_dict())
    rebuilt = RandContrastPhased(**step.get_config())
    assert rebuilt.get_config() == step.get_config()


def _ct_case(hu_aorta: float = 40.0):
    """A small synthetic CT: air around a 40 HU body with fat, bone at 1000 HU and an 'aorta' (label 52)."""
    hu = np.full((40, 40, 6), -1000.0, np.float32)
    hu[5:35, 5:35] = -100.0
    hu[8:32, 8:32] = 40.0
    hu[18:22, 25:29] = 1000.0  # a vertebra
    hu[18:22, 12:16] = hu_aorta
    label = np.zeros(hu.shape, np.uint8)
    label[18:22, 12:16] = 52
    label[10:16, 20:30] = 5
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    return Volume(hu, affine, "ct", meta={"modality": "CT"}), Volume(label, affine, "ct")


def test_binary_ct_plan_gets_phases_and_a_window_that_keeps_the_arterial_aorta():
    image, label = _ct_case()
    label = label.with_array((np.asarray(label.array) == 52).astype(np.uint8))
    assert make_plan([(image, label)]).contrast_phases is None  # an unnamed class: off unless asked
    plan = make_plan([(image, label)], overrides={"contrast_phases": "on"})
    assert plan.contrast_phases is not None and list(plan.contrast_phases["targets"]) == ["lesion"]
    window = plan.normalization
    assert window["kind"] == "ct_window" and window["low_hu"] == -1000.0
    # Its targets stop at 250 HU, its window keeps a real arterial vessel's 550 HU (+ 100).
    assert max(hi for hi in (r[1] for r in plan.contrast_phases["targets"]["lesion"].values())) == 250.0
    assert window["high_hu"] == 650.0
    # A 350-550 HU arterial aorta stays inside the window, below clipped bone (1000 HU -> 1).
    span = window["high_hu"] - window["low_hu"]
    for hu in (350.0, 550.0):
        assert (hu - window["low_hu"]) / span < 0.95
    steps = [type(t).__name__ for t in Pipeline.from_plan(plan).random]
    assert steps == ["RandLesionPatchd", "RandContrastPhased", "RandJointAugmentd"]
    # Switched off in the plan: the window is the binary rule's, the step is gone.
    off = make_plan([(image, label)], overrides={"contrast_phases": None})
    assert off.contrast_phases is None and off.normalization["high_hu"] == 400.0
    assert "RandContrastPhased" not in [type(t).__name__ for t in Pipeline.from_plan(off).random]
    assert "contrast_phases" not in off.to_dict()  # plans without it read as before


def test_class_plan_window_rises_above_the_aortas_arterial_range():
    image, label = _ct_case()
    spec = ClassSpec.parse(["liver=5", "aorta=52"])
    plan = make_plan([(image, label)], overrides={"classes": spec.to_dict(), "num_classes": 3})
    assert list(plan.contrast_phases["targets"]) == ["liver", "aorta"]
    assert plan.contrast_phases["targets"]["aorta"]["arterial"] == list(PHASE_HU["aorta"]["arterial"])
    assert plan.normalization["high_hu"] == PHASE_HU["aorta"]["arterial"][1] + 100.0
    assert plan.enhancement is None  # the phases move each class; no relative shift on top
    assert Plan.from_dict(plan.to_dict()).contrast_phases == plan.contrast_phases
    # Organs whose brightest phase stays low keep the classes' window (5/95 percentiles +- 250 HU).
    liver_only = ClassSpec.parse(["liver=5", "spleen=1"])
    lab = np.asarray(label.array).copy()
    lab[28:31, 10:14] = 1
    plan2 = make_plan([(image, label.with_array(lab))], overrides={"classes": liver_only.to_dict(), "num_classes": 3})
    assert plan2.normalization["high_hu"] == pytest.approx(40.0 + 250.0)


def test_regions_and_mr_get_no_phases():
    image, label = _ct_case()
    regions = ClassSpec.from_dict({"names": ["whole", "core"], "ids": [[5, 52], [52]], "regions": True,
                                   "region_order": [5, 52]})
    plan = make_plan([(image, label)], overrides={"classes": regions.to_dict(), "num_classes": regions.num_classes})
    assert plan.contrast_phases is None
    with pytest.raises(ValueError, match="not nested"):
        plan.replace(contrast_phases=PhaseConfig.for_classes(["whole"]).to_dict())
    mr = Volume(np.asarray(image.array) + 1000.0, image.affine, "mr", meta={"modality": "MR"})
    assert make_plan([(mr, label)]).contrast_phases is None


def test_a_class_of_unknown_kind_beside_named_ones_keeps_the_phases():
    """Unnamed classes only: no phases by default; one of unknown kind beside a named structure
    (the stomach beside the liver) gets the enhancing row with the others."""
    image, label = _ct_case()
    spec = ClassSpec.parse(["liver=5", "stomach=52"])
    plan = make_plan([(image, label)], overrides={"classes": spec.to_dict(), "num_classes": 3})
    targets = plan.contrast_phases["targets"]
    assert list(targets) == ["liver", "stomach"]
    assert targets["stomach"]["arterial"] == list(PHASE_HU["enhancing"]["arterial"])
    assert targets["liver"]["arterial"] == list(PHASE_HU["liver"]["arterial"])
    unknown = ClassSpec.parse(["stomach=5", "tumour=52"])
    assert make_plan([(image, label)], overrides={"classes": unknown.to_dict(), "num_classes": 3}).contrast_phases is None
