"""Knowing when it does not know (issue 23, item 6): the plan records the training range, and a
scan out of it gets one warning naming what, as structured findings (a viewer's), an
:class:`~medseg.events.OutOfRange` event (the Predictor's) and a line on the terminal
(medseg-infer's). Old bundles get no comparison, said once.

Independent answers: hand-built volumes whose percentiles are known by construction (a region
of one value has every percentile equal to it) and numpy's percentiles of the voxels."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from medseg.data.plan import Plan, make_plan
from medseg.events import Message, OutOfRange, Recorder
from medseg.infer.range_check import NO_RANGE_REASON, check_scan, training_range_of
from medseg.io import Volume, write_volume

from _helpers import no_env_model  # noqa: F401  (fixture)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
DATA = Path(__file__).parent / "data"

#: What a model of thin-slice scans with a portal-venous vessel saw (fingerprint["training_range"]).
SEEN = {"version": 1, "modalities": ["CT"], "slice_spacing_mm": [2.0, 3.0], "inplane_spacing_mm": [0.8, 3.0],
        "inplane_fov_mm": [300.0, 500.0], "body_median": [-30.0, 50.0],
        "classes": {"foreground": {"p0_5": 20.0, "p5": 100.0, "p95": 210.0, "p99_5": 900.0}}}


def ct_plan(seen=SEEN, **kw) -> Plan:
    return Plan(modality="CT", fingerprint={"training_range": seen}, **kw)


def phantom(slice_mm=2.0, pixel_mm=1.0, vessel_hu=180.0, body_hu=40.0, shape=(320, 320, 12)) -> tuple[Volume, Volume]:
    """Air around a body disc of ``body_hu`` holding a vessel disc of ``vessel_hu``; its label."""
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    r = np.hypot(i - shape[0] / 2, j - shape[1] / 2)
    body = np.repeat((r < shape[0] * 0.4)[..., None], shape[2], axis=2)
    vessel = np.repeat((np.hypot(i - shape[0] / 2 - 20, j - shape[1] / 2) < 12)[..., None], shape[2], axis=2)
    image = np.where(body, body_hu, -1000.0).astype(np.float32)
    image[vessel] = vessel_hu
    affine = np.diag([pixel_mm, pixel_mm, slice_mm, 1.0])
    return Volume(image, affine, "phantom"), Volume(vessel.astype(np.uint8), affine, "phantom")


def test_a_scan_like_the_training_scans_has_no_finding():
    image, label = phantom()
    check = check_scan(ct_plan(), image, label, class_names=["aorta"])
    assert check.compared and not check.out_of_range and check.warning() is None
    assert check.measured["class_percentiles"]["aorta"] == [180.0, 180.0, 180.0]
    assert check.measured["body_median"] == 40.0


def test_vessel_enhanced_by_300_hu_is_named_with_both_numbers():
    image, label = phantom(vessel_hu=480.0)
    check = check_scan(ct_plan(), image, label, class_names=["aorta"])
    (finding,) = check.findings
    assert (finding.what, finding.subject, finding.value, finding.high, finding.unit) == (
        "intensity", "aorta", 480.0, 210.0, "HU")
    line = check.warning()
    assert "\n" not in line and line.startswith("phantom: warning: out of the training range: ")
    assert "aorta intensities up to 480 HU; the model saw up to 210 HU" in line


def test_the_margin_is_100_hu_above_the_highest_training_95th_percentile():
    for hu, fires in [(309.0, False), (311.0, True), (1.0, False), (-1.0, True)]:
        image, label = phantom(vessel_hu=hu)
        assert check_scan(ct_plan(), image, label).out_of_range is fires, hu


def test_a_prediction_in_the_air_is_the_models_error_not_the_scans():
    image, label = phantom()
    air = np.zeros(image.shape, np.uint8)
    air[:20, :20, :] = 1  # outside the body disc: -1000 HU
    check = check_scan(ct_plan(), image, label.with_array(air))
    assert not check.out_of_range and "class_percentiles" not in check.measured


@pytest.mark.parametrize("slice_mm, fires", [(5.0, True), (4.7, False), (1.3, False), (1.0, True), (0.7, True),
                                             (3.0, False)])
def test_slice_spacing_beyond_1_6_times_the_training_range(slice_mm, fires):
    image, _ = phantom(slice_mm=slice_mm)
    check = check_scan(ct_plan(), image)
    assert [f.what for f in check.findings] == (["slice_spacing"] if fires else []), check.findings
    if fires:
        assert f"slices {slice_mm:.3g} mm apart; the model saw 2-3 mm" in check.warning()


def test_in_plane_spacing_is_resampled_so_only_much_coarser_pixels_fire():
    fine, _ = phantom(pixel_mm=0.5, shape=(800, 800, 4))  # 400 mm field of view
    assert not check_scan(ct_plan(), fine).out_of_range
    coarse, _ = phantom(pixel_mm=13.0, shape=(30, 30, 4))  # 390 mm field of view
    assert [f.what for f in check_scan(ct_plan(), coarse).findings] == ["inplane_spacing"]


def test_a_small_field_of_view_and_a_shifted_body_are_named():
    crop, _ = phantom(shape=(100, 100, 12))  # 100 mm: a third of the smallest training field
    check = check_scan(ct_plan(), crop)
    assert [f.what for f in check.findings] == ["field_of_view"]
    assert "field of view of 100 x 100 mm" in check.warning()
    offset, _ = phantom(body_hu=40.0 + 1024.0)  # a missing rescale intercept
    (finding,) = [f for f in check_scan(ct_plan(), offset).findings if f.subject == "body"]
    assert finding.value == 1064.0


def test_mr_plans_compare_geometry_but_not_intensities():
    image, label = phantom(vessel_hu=3000.0, slice_mm=6.0)
    check = check_scan(Plan(modality="MR", fingerprint={"training_range": SEEN}), image, label)
    assert [f.what for f in check.findings] == ["slice_spacing"]


def test_a_plan_without_a_training_range_is_not_compared():
    image, label = phantom(vessel_hu=3000.0)
    check = check_scan(Plan(modality="CT"), image, label)
    assert not check.compared and not check.findings and check.reason == NO_RANGE_REASON
    assert check.to_dict()["compared"] is False


def test_make_plan_records_the_training_range_from_the_voxels():
    rng = np.random.default_rng(0)
    cases = []
    for k, (slice_mm, shift) in enumerate([(2.0, 0.0), (3.0, 60.0)]):
        image, label = phantom(slice_mm=slice_mm, shape=(120, 120, 8))
        arr = np.asarray(image.array).copy()
        arr[np.asarray(label.array) > 0] = rng.normal(150 + shift, 20, int(label.array.sum()))
        cases.append((image.with_array(arr), label))
    plan = make_plan(cases)
    seen = training_range_of(plan)
    assert seen["slice_spacing_mm"] == [2.0, 3.0] and seen["inplane_fov_mm"] == [120.0, 120.0]
    per_case = [np.percentile(np.asarray(im.array)[np.asarray(lb.array) > 0], [0.5, 5, 95, 99.5]) for im, lb in cases]
    got = seen["classes"]["foreground"]
    assert got["p5"] == pytest.approx(min(p[1] for p in per_case), abs=0.01)
    assert got["p95"] == pytest.approx(max(p[2] for p in per_case), abs=0.01)
    assert got["p0_5"] == pytest.approx(min(p[0] for p in per_case), abs=0.01)
    assert seen["body_median"] == [40.0, 40.0]


def test_named_classes_are_ranged_one_by_one():
    image, label = phantom(shape=(120, 120, 8))
    lab = np.asarray(label.array).astype(np.uint8) * 7
    lab[:10, :10, :] = 3
    arr = np.asarray(image.array).copy()
    arr[:10, :10, :] = -500.0
    plan = make_plan([(image.with_array(arr), label.with_array(lab))],
                     overrides={"classes": {"names": ["vessel", "corner"], "ids": [[7], [3]]}, "num_classes": 3})
    classes = training_range_of(plan)["classes"]
    assert classes["vessel"]["p95"] == 180.0 and classes["corner"]["p5"] == -500.0
    shifted = image.with_array(np.where(lab == 7, 480.0, arr))
    check = check_scan(plan, shifted, label.with_array(lab))
    assert [f.subject for f in check.findings] == ["vessel"]


# --- the Predictor's event and medseg-infer's line ------------------------------------------------
@pytest.fixture(scope="module")
def ct_bundle(tmp_path_factory) -> Path:
    """A tiny CT bundle whose plan records :data:`SEEN`'s geometry (no class range: the untrained
    model's prediction is noise, whose intensities are not what is tested here)."""
    import keras

    from medseg.infer.bundle import save_bundle
    from medseg.nets.unetpp import build_unetpp

    keras.utils.set_random_seed(3)
    model = build_unetpp(input_channels=1, filters=(4, 8), depth=1, deep_supervision=False, batch_norm=False)
    plan = ct_plan(dict(SEEN, classes={}, inplane_fov_mm=[90.0, 120.0]), context_slices=1, divisor=2,
                   patch_size=(32, 32), target_spacing_mm=(4.0, 4.0))
    run = tmp_path_factory.mktemp("runs") / "ct"
    save_bundle(run, model, plan, threshold=0.5)
    return run


def test_predictor_emits_one_out_of_range_event(ct_bundle):
    from medseg.infer.bundle import load_bundle
    from medseg.infer.predictor import Predictor

    predictor = Predictor(load_bundle(ct_bundle))
    thick, _ = phantom(slice_mm=5.0, shape=(96, 96, 6))
    rec = Recorder()
    predictor.segment(thick, events=rec)
    (event,) = rec.of(OutOfRange)
    assert isinstance(event, Message) and event.level == "warning" and event.stream == "stderr"
    assert event.check["findings"][0]["what"] == "slice_spacing" and "slices 5 mm apart" in event.text
    rec = Recorder()
    predictor.segment(phantom(slice_mm=2.0, shape=(96, 96, 6))[0], events=rec)  # 2 mm slices, the same voxels
    assert rec.of(OutOfRange) == []


@pytest.mark.slow
def test_medseg_infer_prints_the_warning_for_the_scan_out_of_range(tmp_path, ct_bundle, capsys,
                                                                   no_env_model):  # noqa: F811
    from medseg.cli.infer import main

    inputs = tmp_path / "in"
    inputs.mkdir()
    write_volume(phantom(slice_mm=5.0, shape=(96, 96, 6))[0], inputs / "thick.nii.gz")
    write_volume(phantom(slice_mm=2.0, shape=(96, 96, 6))[0], inputs / "thin.nii.gz")
    assert main([str(inputs), "--model", str(ct_bundle), "-o", str(tmp_path / "out"), "--quiet"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "out of the training range" in line]
    assert len(warnings) == 1 and "thick.nii.gz: warning:" in warnings[0] and "slices 5 mm apart" in warnings[0], err
    assert NO_RANGE_REASON not in err


@pytest.mark.slow
def test_an_old_bundle_is_not_compared_and_says_so_once(tmp_path, capsys, no_env_model):  # noqa: F811
    from medseg.cli.infer import main

    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a", "b"):
        shutil.copy(DATA / "nrrd" / "breast1_image.nrrd", inputs / f"{name}.nrrd")
    assert main([str(inputs), "--model", str(DATA / "bundles" / "format1"), "-o", str(tmp_path / "out"),
                 "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count(NO_RANGE_REASON) == 1 and "out of the training range" not in err, err
