"""Spatial, intensity, slicing and preprocess/restore: hand-checked values and real NRRD files."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medseg.data.plan import Plan
from medseg.io.volume import Volume
from medseg.transforms.intensity import (
    body_mask,
    check_normalization,
    ct_window,
    normalize,
    otsu_threshold,
    percentile_clip,
    zscore,
)
from medseg.transforms.preprocess import preprocess_image, preprocess_label, restore
from medseg.transforms.slicing import context_offsets, context_slices, from_stack, largest_spacing_axis, to_stack
from medseg.transforms.spatial import inplane_grid, reorient_array, reorientation, resample_inplane

NRRD = Path(__file__).parent / "data" / "nrrd"


def read_nrrd(name: str) -> Volume:
    """Independent reader (SimpleITK LPS -> RAS by hand), so these tests do not depend on medseg.io."""
    img = sitk.ReadImage(str(NRRD / name))
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    aff = np.eye(4)
    aff[:3, :3] = np.asarray(img.GetDirection()).reshape(3, 3) * np.asarray(img.GetSpacing())
    aff[:3, 3] = img.GetOrigin()
    return Volume(arr, np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff, name.split("_")[0], {"modality": "MR"})


def dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


# --- intensity -----------------------------------------------------------------------------
def test_ct_window_hand_values():
    out = ct_window(np.array([-1200, -1000, -300, 400, 900]), -1000, 400)
    np.testing.assert_allclose(out, [0, 0, 0.5, 1, 1])
    assert out.dtype == np.float32
    with pytest.raises(ValueError, match="high_hu > low_hu"):
        ct_window(np.zeros(3), 400, 400)


def test_zscore_hand_values_and_mask():
    x = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    # Over the first four: mean 2.5, std sqrt(1.25).
    out = zscore(x, mask=np.array([1, 1, 1, 1, 0], bool))
    np.testing.assert_allclose(out[:4], (np.array([1, 2, 3, 4]) - 2.5) / np.sqrt(1.25), rtol=1e-6)
    np.testing.assert_allclose(zscore(x, mean=1.0, std=2.0), (x - 1) / 2)
    assert np.all(zscore(np.full(4, 7.0)) == 0)  # constant: std 0 -> 1, no NaN


def test_percentile_clip_hand_values():
    x = np.arange(101, dtype=np.float32)  # percentile p of 0..100 is p itself
    out = percentile_clip(x, 10, 90)
    np.testing.assert_allclose(out[[0, 10, 50, 90, 100]], [0, 0, 0.5, 1, 1], atol=1e-6)
    np.testing.assert_allclose(percentile_clip(x, 10, 90, scale=False)[[0, 50, 100]], [10, 50, 90])
    with pytest.raises(ValueError, match="0 <= low < high <= 100"):
        percentile_clip(x, 90, 10)


def test_otsu_and_body_mask():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(10, 2, 5000), rng.normal(100, 5, 5000)])
    t = otsu_threshold(x)
    assert x[:5000].max() < t < x[5000:].min()  # separates the two modes
    assert 40 < t < 70  # and sits mid-gap, not at the edge of the dark mode
    ct = np.array([[[-1000, -600, -400, 40]]])
    np.testing.assert_array_equal(body_mask(ct, "CT"), [[[False, False, True, True]]])
    assert body_mask(np.zeros((2, 2, 2)), "MR").all()  # constant image: everything is body


def test_normalize_zscore_per_volume_over_body():
    x = np.zeros((1, 1, 8), np.float32)
    x[..., 4:] = [10, 20, 30, 40]
    body = x > 0
    out = normalize(x, {"kind": "zscore", "clip_percentiles": [0, 100]}, body=body)
    np.testing.assert_allclose(out[..., 4:].ravel(), (np.array([10, 20, 30, 40]) - 25) / np.sqrt(125), rtol=1e-5)
    # Fixed parameters from a dataset fingerprint (CT style): clip then (x - mean) / std.
    fixed = normalize(x, {"kind": "zscore", "mean": 20, "std": 10, "clip_low": 0, "clip_high": 30})
    np.testing.assert_allclose(fixed[..., 4:].ravel(), [-1, 0, 1, 1])
    pct = normalize(np.arange(101.0).reshape(1, 1, -1), {"kind": "percentile", "low": 0, "high": 50})
    assert pct[0, 0, 25] == pytest.approx(0.5) and pct[0, 0, 100] == 1


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"kind": "gauss"}, "kind must be one of"),
        ("ct", "must be a dict"),
        ({"kind": "ct_window", "low_hu": 0}, "needs 'low_hu' and 'high_hu'"),
        ({"kind": "ct_window", "low_hu": 5, "high_hu": 1}, "high_hu > low_hu"),
        ({"kind": "zscore", "clip_percentiles": [50, 10]}, "clip_percentiles"),
        ({"kind": "zscore", "region": "lung"}, "region must be"),
        ({"kind": "percentile", "low_pct": 60, "high_pct": 50}, "low_pct < high_pct"),
    ],
)
def test_check_normalization_rejects(spec, match):
    with pytest.raises(ValueError, match=match):
        check_normalization(spec)


# --- reorientation -------------------------------------------------------------------------
def test_reorient_brain1_lps_to_ras_exact():
    vol = read_nrrd("brain1_image.nrrd")
    # NRRD direction diag(1, -1, 1) in LPS is diag(-1, 1, 1) in RAS: axis 0 points Left.
    assert vol.orientation == "LAS"
    reo = reorientation(vol.affine, vol.shape, "RAS")
    out = reorient_array(vol.array, reo)
    np.testing.assert_array_equal(out, vol.array[::-1])
    assert "".join(nib.aff2axcodes(reo.output_affine)) == "RAS"
    # The same voxel content sits at the same world point.
    ijk = np.array([[3, 7, 11], [200, 5, 0]])
    ijk_out = np.array([[255 - 3, 7, 11], [255 - 200, 5, 0]])
    np.testing.assert_allclose(vol.world_of(ijk), (np.c_[ijk_out, np.ones(2)] @ reo.output_affine.T)[:, :3])
    np.testing.assert_array_equal(reorient_array(out, reo, inverse=True), vol.array)
    assert not reo.is_identity and reorientation(reo.output_affine, out.shape).is_identity


def test_reorient_permutation_and_errors():
    aff = np.array([[0, 0, 2.0, 0], [-1.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 0, 1]])  # axes -> A? P, S, R
    arr = np.arange(24).reshape(2, 3, 4)
    reo = reorientation(aff, arr.shape, "RAS")
    assert reo.output_shape == (4, 2, 3)
    out = reorient_array(arr, reo)
    assert out.shape == (4, 2, 3)
    np.testing.assert_array_equal(reorient_array(out, reo, inverse=True), arr)
    with pytest.raises(ValueError, match="one of each pair"):
        reorientation(aff, arr.shape, "RRS")
    with pytest.raises(ValueError, match="planned for shape"):
        reorient_array(np.zeros((3, 3, 3)), reo)


# --- in-plane resampling ---------------------------------------------------------------------
def test_inplane_grid_centred_and_errors():
    g = inplane_grid((10, 20), (1.0, 0.5), (2.0, 1.0))
    assert g.output_hw == (5, 10)
    # FOV centre: input (4.5, 9.5) px == output (2, 4.5) px.
    np.testing.assert_allclose(g.index_matrix() @ [2, 4.5, 1], [4.5, 9.5, 1])
    assert inplane_grid((10, 20), (1.0, 0.5), None).is_identity
    with pytest.raises(ValueError, match="two positive numbers"):
        inplane_grid((10, 20), (1.0, 0.5), (0.0, 1.0))
    with pytest.raises(ValueError, match=r"expected a stack \(n, 10, 20\)"):
        resample_inplane(np.zeros((2, 5, 5)), g)


def test_resample_linear_ramp_is_exact():
    """A ramp in mm stays a ramp: linear resampling of a linear function is exact (oracle: geometry)."""
    h, w = 30, 40
    hh, ww = np.meshgrid(np.arange(h) * 0.7, np.arange(w) * 1.3, indexing="ij")
    stack = np.stack([hh + 2 * ww + s for s in range(3)]).astype(np.float32)
    g = inplane_grid((h, w), (0.7, 1.3), (1.0, 1.0))
    out = resample_inplane(stack, g)
    m = g.index_matrix()
    oh, ow = np.meshgrid(np.arange(g.output_hw[0]), np.arange(g.output_hw[1]), indexing="ij")
    src_h, src_w = m[0, 0] * oh + m[0, 2], m[1, 1] * ow + m[1, 2]
    inside = (src_h >= 0) & (src_h <= h - 1) & (src_w >= 0) & (src_w <= w - 1)
    expected = src_h * 0.7 + 2 * src_w * 1.3
    np.testing.assert_allclose(out[1][inside], expected[inside] + 1, atol=1e-3)
    assert np.isfinite(out).all() and out.min() >= stack.min() - 1e-4  # borders edge-replicated, no 0 fill


# --- slicing -------------------------------------------------------------------------------
def test_slicing_inverse_and_context_edges():
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    for axis in range(3):
        st = to_stack(arr, axis)
        assert st.shape[0] == arr.shape[axis]
        np.testing.assert_array_equal(from_stack(st, axis), arr)
    stack = np.broadcast_to(np.arange(5, dtype=np.float32)[:, None, None], (5, 2, 2))
    out = context_slices(stack, [0, 2, 4], 3)
    assert out.shape == (3, 2, 2, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 0, 0, :], [[0, 0, 1], [1, 2, 3], [3, 4, 4]])
    np.testing.assert_array_equal(context_slices(stack, [4], 5)[0, 0, 0], [2, 3, 4, 4, 4])
    assert largest_spacing_axis([0.8, 0.8, 5.0]) == 2 and largest_spacing_axis([3.0, 1, 1]) == 0
    assert largest_spacing_axis([1, 1, 1]) == 2
    with pytest.raises(ValueError, match="positive odd integer"):
        context_offsets(2)
    with pytest.raises(IndexError, match=r"must lie in \[0, 5\)"):
        context_slices(stack, [5], 1)
    with pytest.raises(ValueError, match="expected a 3D array"):
        to_stack(arr, 3)
    with pytest.raises(ValueError, match="expected a 3D stack"):
        from_stack(arr[0], 0)


# --- preprocess / restore --------------------------------------------------------------------
@pytest.fixture(scope="module")
def brain1():
    return read_nrrd("brain1_image.nrrd"), read_nrrd("brain1_label.nrrd")


def mr_plan(**kw) -> Plan:
    base = dict(modality="MR", normalization={"kind": "zscore"}, patch_size=(64, 64))
    base.update(kw)
    return Plan(**base)


def test_preprocess_restore_resampled_exact_grid(brain1):
    image, label = brain1
    plan = mr_plan(target_spacing_mm=(1.0, 1.0), context_slices=3)
    prep = preprocess_image(image, plan, with_body=True)
    assert prep.array.shape == (25, 200, 200) and prep.array.dtype == np.float32
    assert prep.body.shape == prep.array.shape and prep.body.dtype == bool
    lab = preprocess_label(label, plan)
    assert lab.dtype == np.uint8 and set(np.unique(lab)) == {0, 1}
    # Lesion volume is preserved to a few percent (4137 voxels of 0.78^2 x 6.5 mm = 16.4 ml).
    assert lab.sum() * 1.0 * 6.5 / 1000 == pytest.approx(16.41, rel=0.05)
    back = restore(prep, lab.astype(np.float32))
    assert back.shape == image.shape and np.array_equal(back.affine, image.affine)
    assert back.case_id == image.case_id and back.meta == image.meta
    assert dice(back.array > 0.5, label.array > 0) > 0.95
    nearest = restore(prep, lab)
    assert nearest.array.dtype == np.uint8 and dice(nearest.array, label.array) > 0.95
    # Plan-space affine: world of plan voxel (s, h, w) matches the input geometry at the FOV centre.
    centre_in = image.world_of([(np.array(image.shape) - 1) / 2])[0]
    centre_plan = prep.affine @ [12, 99.5, 99.5, 1]
    np.testing.assert_allclose(centre_plan[:3], centre_in, atol=1e-6)
    x = prep.slices(0, 2)
    assert x.shape == (2, 200, 200, 3)
    np.testing.assert_array_equal(x[0, ..., 0], prep.array[0])  # edge slice repeated
    np.testing.assert_array_equal(x[1, ..., 0], prep.array[0])
    with pytest.raises(IndexError, match=r"slice range \[20, 30\)"):
        prep.slices(20, 30)
    with pytest.raises(ValueError, match="restore expects a stack of shape"):
        restore(prep, lab[:3])


def test_preprocess_restore_identity_spacing_is_lossless(brain1):
    image, _ = brain1
    plan = mr_plan(target_spacing_mm=(0.78125, 0.78125), slice_axis=2)
    prep = preprocess_image(image, plan)
    back = restore(prep, prep.array)
    expected = normalize(image.array[::-1], plan.normalization, modality="MR")[::-1]
    np.testing.assert_allclose(back.array, expected, rtol=1e-6, atol=1e-6)


def test_preprocess_other_slice_axis_round_trip():
    rng = np.random.default_rng(1)
    arr = (rng.random((12, 9, 10)) > 0.7).astype(np.uint8)
    aff = np.array([[0, 0, -1.5, 10], [0, 2.0, 0, -3], [4.0, 0, 0, 1], [0, 0, 0, 1]])  # SAL
    vol = Volume(arr, aff, "x", {"modality": "CT"})
    plan = Plan(slice_axis=2, target_spacing_mm=None, patch_size=(16, 16))
    lab = preprocess_label(vol, plan)
    assert lab.shape == (12, 10, 9)  # RAS: axis 2 (S) came from input axis 0
    back = restore(preprocess_image(vol, plan), lab)
    np.testing.assert_array_equal(back.array, arr)
    assert np.array_equal(back.affine, aff)


def test_preprocess_label_values():
    aff = np.eye(4)
    plan = Plan(patch_size=(16, 16))
    vol = Volume(np.array([0, 255, 2, 0]).reshape(1, 1, 4), aff, "m")
    np.testing.assert_array_equal(preprocess_label(vol, plan).ravel(), [0, 1, 1, 0])
    # medseg's one label rule (medseg.io.labels) names the case and the values found.
    with pytest.raises(ValueError, match=r"m: expected .*values >= 0.*found negative values: -1"):
        preprocess_label(Volume(np.full((1, 1, 2), -1), aff, "m"), plan)
    with pytest.raises(ValueError, match="expected class indices 0..2, found other values: 255"):
        preprocess_label(vol, Plan(num_classes=3, patch_size=(16, 16)))
    with pytest.raises(ValueError, match="NaN/inf voxels"):
        preprocess_label(Volume(np.array([0, np.nan]).reshape(1, 1, 2), aff, "m"), plan)
    three = preprocess_label(Volume(np.array([0, 2, 1.2, 0]).reshape(1, 1, 4), aff, "m"),
                             Plan(num_classes=3, patch_size=(16, 16)))
    np.testing.assert_array_equal(three.ravel(), [0, 2, 1, 0])


# --- the pipeline's steps: geometry round trip, normalization, failures, random steps ----------------
def test_plan_spaced_anisotropic_round_trip_keeps_world_places(brain1):
    """PlanSpaced to an anisotropic in-plane spacing and its inverse (what inference runs):
    the lesion stays at the same world place, and comes back on the input's exact grid."""
    from medseg.transforms.dictionary import PlanSpaced

    image, label = brain1
    step = PlanSpaced(("image", "label"), orientation="RAS", slice_axis=2, target_spacing_mm=(1.0, 1.2))
    sample = step({"image": image, "label": label})
    prep, lab = sample["image"], sample["label"]
    # 0.78 x 0.78 x 6.5 mm voxels, 25 slices -> slices first, 1.0 x 1.2 mm in-plane; nearest keeps the dtype
    assert prep.array.shape == (25, 200, 167) and lab.shape == prep.array.shape and lab.dtype == label.array.dtype
    assert set(np.unique(lab)) == {0, 1}
    np.testing.assert_allclose(np.linalg.norm(prep.affine[:3, :3], axis=0), (6.5, 1.0, 1.2), rtol=1e-6)

    def world_centroid(affine, mask):
        idx = np.argwhere(mask > 0)
        return (affine @ np.c_[idx, np.ones(len(idx))].T)[:3].mean(axis=1)

    np.testing.assert_allclose(world_centroid(prep.affine, lab), world_centroid(label.affine, label.array), atol=1.0)
    back = step.invert(prep, lab)
    assert back.shape == image.shape and np.array_equal(back.affine, image.affine) and back.case_id == image.case_id
    assert back.array.dtype == label.array.dtype and dice(back.array, label.array) > 0.95
    with pytest.raises(ValueError, match="restore expects a stack of shape"):
        step.invert(prep, lab[:3])
    with pytest.raises(ValueError, match="slice_axis must be 0, 1 or 2"):
        PlanSpaced(slice_axis=4)
    with pytest.raises(ValueError, match="one of each pair"):
        PlanSpaced(orientation="RAR")


def test_normalize_dict_transforms_and_failures_name_step_and_case():
    from medseg.transforms.base import Lambdad, MapTransform
    from medseg.transforms.dictionary import CTWindowd, PercentileClipd, ZScored
    from medseg.transforms.pipeline import Pipeline

    ct = Volume(np.array([-1000.0, -300.0, 400.0, 1000.0]).reshape(1, 1, 4), np.eye(4), "ct7")
    out = CTWindowd("image")({"image": ct, "label": None})
    np.testing.assert_allclose(out["image"].array.ravel(), [0, 0.5, 1, 1])
    assert out["image"].case_id == "ct7" and out["label"] is None
    # Body (Otsu) = the three bright voxels: mean 110, std sqrt(200 / 3).
    z = ZScored("image", clip_percentiles=(0, 100))({"image": np.array([0, 0, 0, 0, 100, 110, 120.0]).reshape(1, 1, 7)})
    np.testing.assert_allclose(z["image"].ravel()[4:], np.array([-10, 0, 10]) / np.sqrt(200 / 3), rtol=1e-5)
    # Percentiles of the body too: [100, 120] -> [0, 1]; the air below clips to 0.
    p = PercentileClipd("image", 0, 100)({"image": np.array([0, 0, 100, 110, 120.0]).reshape(1, 1, 5)})["image"]
    np.testing.assert_allclose(p.ravel(), [0, 0, 0, 0.5, 1])
    with pytest.raises(KeyError, match="sample has no key 'label'"):
        CTWindowd(("image", "label"))({"image": ct})
    assert "label" not in CTWindowd(("image", "label"), allow_missing_keys=True)({"image": ct})
    with pytest.raises(ValueError, match="needs at least one key"):
        MapTransform(())

    def boom(_):
        raise ZeroDivisionError("x")

    # The pipeline runs the steps in order; a failure keeps its type and gets a note naming step and case.
    pipeline = Pipeline([CTWindowd("image"), Lambdad("image", boom)])
    with pytest.raises(ZeroDivisionError) as info:
        pipeline.preprocess({"image": ct})
    assert any("while applying Lambdad(keys=('image',)) to ct7" in n for n in info.value.__notes__)
    assert len(pipeline) == 2 and "CTWindowd" in repr(pipeline)


def test_executor_draws_from_the_batch_generator_only():
    """run_random: the same batch generator gives the same patches, whatever the step's own
    generator holds; the step object itself is left as it was (parallel builders share it)."""
    from medseg.transforms.batch import PatchBatch, run_random
    from medseg.transforms.dictionary import RandLesionPatchd

    lab = np.zeros((4, 40, 40), np.uint8)
    lab[2, 20, 20] = 1
    sample = {"image": np.random.default_rng(0).random((4, 40, 40), dtype=np.float32), "label": lab}
    step = RandLesionPatchd(patch_size=(16, 16), num_samples=3, lesion_fraction=1.0, seed=99)
    own = step.rng.bit_generator.state

    def run(seed):
        return run_random([step], PatchBatch.of(sample, np.random.default_rng(seed)))

    a, b, c = run(11), run(11), run(12)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a.params == b.params and a.params["centres"]["lesion"] == [True, True, True]
    assert a.params != c.params
    # lesion-centred patches hold the lesion voxel, within the quarter-patch jitter
    assert np.all(a["label"].reshape(3, -1).max(axis=1) == 1)
    assert step.rng.bit_generator.state == own and step.last_params is None


def test_plan_pipeline_preprocess(brain1):
    from medseg.transforms.pipeline import Pipeline

    image, label = brain1
    pipeline = Pipeline.from_plan(mr_plan(target_spacing_mm=(2.0, 2.0)))
    out = pipeline.preprocess({"image": image, "label": label}, training=True)
    assert out["image"].array.shape == (25, 100, 100) and out["label"].shape == (25, 100, 100)
    assert out["image"].body is not None  # training-only step ran
    assert pipeline.preprocess({"image": image})["image"].body is None  # inference skips it
    assert "label" not in pipeline.preprocess({"image": image})
    with pytest.raises(TypeError, match="does not take images to plan space"):
        Pipeline(pipeline.deterministic[:1]).prepare(image)


# --- whole-volume normalization: exact and lean --------------------------------------------------
def _reference_normalize(x, spec, modality="MR"):
    """The straightforward formulas, one full-size temporary after another (float64 statistics)."""
    x = np.asarray(x, dtype=np.float32)
    body = body_mask(x, modality)
    if spec["kind"] == "ct_window":
        return ((np.clip(x, spec["low_hu"], spec["high_hu"]) - spec["low_hu"])
                / (spec["high_hu"] - spec["low_hu"])).astype(np.float32)
    if spec["kind"] == "percentile":
        lo, hi = np.percentile(x[body], [spec.get("low_pct", 0.5), spec.get("high_pct", 99.5)])
        return ((np.clip(x, lo, hi) - lo) / (hi - lo)).astype(np.float32)
    region = x[body] if spec.get("region", "body") == "body" else x.ravel()
    lo, hi = np.percentile(region, spec.get("clip_percentiles", [0.5, 99.5]))
    clipped = np.clip(x, np.float32(lo), np.float32(hi))
    values = (clipped[body] if spec.get("region", "body") == "body" else clipped.ravel()).astype(np.float64)
    return ((clipped - np.float32(values.mean())) / np.float32(values.std())).astype(np.float32)


def _mr_like(shape, seed=0, dtype=np.int16):
    """Air (noise around 0) around an ellipsoidal body of tissue intensities, MR-like."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = sum(g**2 for g in grid) < 0.8
    arr = np.abs(rng.normal(0, 8, shape)) + inside * rng.normal(600, 150, shape)
    return arr.astype(dtype)


@pytest.mark.parametrize("spec", [
    {"kind": "zscore"},
    {"kind": "zscore", "region": "all", "clip_percentiles": [2.0, 98.0]},
    {"kind": "percentile"},
    {"kind": "ct_window", "low_hu": -100.0, "high_hu": 900.0},
])
def test_preprocess_normalization_equals_reference(spec, monkeypatch):
    import medseg.transforms.intensity as intensity

    # Small chunks: the streamed percentile selection and the float64 sums span many of them.
    monkeypatch.setattr(intensity, "_CHUNK_VOXELS", 5000)
    arr = _mr_like((120, 100, 24), seed=3)
    vol = Volume(arr, np.diag([0.9, 0.9, 3.0, 1.0]), "mr", {"modality": "MR"})
    plan = Plan(modality="MR", slice_axis=2, target_spacing_mm=None, patch_size=(32, 32), normalization=spec)
    got = preprocess_image(vol, plan).array
    expected = _reference_normalize(np.moveaxis(arr, 2, 0), spec)
    assert got.dtype == np.float32 and got.shape == (24, 120, 100)

    def check(got, expected):
        if spec["kind"] == "zscore":
            # The float64 mean/std are summed in another order than the reference's: equal to far
            # below float32 precision, so the z-scores (about -4..4) agree to a few float32 ulps.
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
        else:  # the same percentiles (np.percentile of the same values) and float32 operations
            np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))

    check(got, expected)
    # The public function gives the same values and leaves its input alone.
    before = arr.copy()
    check(normalize(arr, spec), _reference_normalize(arr, spec))
    np.testing.assert_array_equal(arr, before)


def test_mean_std_equal_numpy_float64(monkeypatch):
    import medseg.transforms.intensity as intensity

    monkeypatch.setattr(intensity, "_CHUNK_VOXELS", 1000)  # most sizes below span several chunks
    rng = np.random.default_rng(7)
    for n in (1, 9, 999, 1000, 1001, 300_007):
        v = rng.normal(300, 120, n).astype(np.float32)
        mean, std = intensity._mean_std(v)
        np.testing.assert_allclose([mean, std], [v.astype(np.float64).mean(), v.astype(np.float64).std()], rtol=1e-12)
    body = _mr_like((60, 50, 12), seed=8).astype(np.float32)  # real-ish: a 3D volume, air and body
    np.testing.assert_allclose(intensity._mean_std(body), [body.astype(np.float64).mean(), body.astype(np.float64).std()],
                               rtol=1e-12)
    assert np.isnan(intensity._mean_std(np.zeros(0, np.float32))).all()  # an empty volume


def test_normalize_inplace_overwrites_and_refuses_other_arrays():
    from medseg.transforms.intensity import normalize_inplace

    x = _mr_like((30, 20, 10), seed=1).astype(np.float32)
    expected = normalize(x, {"kind": "zscore"})
    out = normalize_inplace(x, {"kind": "zscore"})
    assert out is x
    np.testing.assert_array_equal(x, expected)
    with pytest.raises(TypeError, match="writable C-contiguous float32 ndarray, found float64"):
        normalize_inplace(np.zeros((2, 2)), {"kind": "zscore"})
    with pytest.raises(TypeError, match="C-contiguous=False"):
        normalize_inplace(np.zeros((4, 4), np.float32)[:, ::2], {"kind": "zscore"})


def test_preprocess_restore_slabs_equal_whole_stack():
    # Reoriented (LPS input), resampled in-plane, more slices than one slab: the slab-wise
    # preprocessing and restore equal resampling the whole stack with the spatial functions.
    from medseg.transforms.preprocess import SLAB_SLICES

    arr = _mr_like((40, 36, SLAB_SLICES * 2 + 5), seed=2)
    vol = Volume(arr, np.diag([-1.1, -0.9, 2.0, 1.0]), "lps", {"modality": "MR"})
    plan = Plan(modality="MR", slice_axis=2, target_spacing_mm=(1.4, 1.3), patch_size=(32, 32),
                normalization={"kind": "zscore", "mean": 100.0, "std": 50.0, "clip_low": 0.0, "clip_high": 900.0})
    prep = preprocess_image(vol, plan)
    reo = reorientation(vol.affine, vol.shape, "RAS")
    stack = np.ascontiguousarray(to_stack(reorient_array(arr, reo), 2))
    whole = resample_inplane(stack, prep.inverse.grid)
    np.testing.assert_array_equal(prep.array, normalize(whole, plan.normalization))
    probs = np.random.default_rng(0).random(prep.shape).astype(np.float32)
    back = restore(prep, probs)
    whole_back = resample_inplane(probs, prep.inverse.grid, inverse=True)
    expected = reorient_array(np.ascontiguousarray(from_stack(whole_back, 2)), reo, inverse=True)
    assert back.array.flags.c_contiguous and back.array.dtype == np.float32
    np.testing.assert_array_equal(back.array, expected)


def test_restore_without_resampling_makes_no_copy():
    arr = _mr_like((20, 18, 12), seed=4)
    vol = Volume(arr, np.diag([-1.0, 1.0, 2.0, 1.0]), "v", {"modality": "MR"})  # LAS: a flip to undo
    plan = Plan(modality="MR", slice_axis=2, target_spacing_mm=None, patch_size=(16, 16))
    prep = preprocess_image(vol, plan)
    back = restore(prep, prep.array)
    assert np.shares_memory(back.array, prep.array)  # a view: no second float32 volume
    np.testing.assert_array_equal(back.array, np.moveaxis(prep.array, 0, 2)[::-1])


def test_whole_volume_preprocessing_peak_memory_grows_only_with_the_result(monkeypatch):
    # Python's tracemalloc sees numpy's array buffers. An MR z-score over the body of a 4x
    # longer volume: the peak grows by the growth of the float32 result and nothing else (no
    # copy of the body for the percentiles, no float64 copy for the mean/std, no boolean mask
    # of the volume, no clip/subtract/divide temporaries; with np.percentile on a float32 copy
    # of the body it grows by 1.36 times the result here). Chunks are small here so that the
    # volumes span many of them.
    import tracemalloc

    import medseg.transforms.intensity as intensity
    import medseg.transforms.preprocess as preprocess

    monkeypatch.setattr(intensity, "_CHUNK_VOXELS", 1 << 15)
    monkeypatch.setattr(preprocess, "SLAB_SLICES", 4)
    plan = Plan(modality="MR", slice_axis=2, target_spacing_mm=None, patch_size=(32, 32),
                normalization={"kind": "zscore"})
    peaks, sizes = [], []
    for n_slices in (40, 160):
        arr = _mr_like((96, 96, n_slices), seed=5)
        vol = Volume(arr, np.diag([1.0, 1.0, 3.0, 1.0]), "mr", {"modality": "MR"})
        # Otsu's threshold reads a subsample of at most ~1e6 voxels whatever the volume's length
        # (here: all of them, as float64): left out of the measurement, same threshold.
        threshold = intensity._body_threshold(np.moveaxis(arr, 2, 0).astype(np.float32), "MR")
        monkeypatch.setattr(intensity, "_body_threshold", lambda x, modality, background="otsu", t=threshold: t)
        tracemalloc.start()
        try:
            prep = preprocess_image(vol, plan)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        peaks.append(peak)
        sizes.append(prep.array.nbytes)
        del prep
    growth = (peaks[1] - peaks[0]) / (sizes[1] - sizes[0])
    assert 0.95 < growth < 1.05, growth


@pytest.mark.parametrize("pcts", [[0.5, 99.5], [0.0, 100.0], [33.3, 66.7]])
def test_streamed_percentiles_equal_numpy_bits(pcts):
    # The exact selection over chunks must give np.percentile's very float, ties, infinities,
    # tiny values and a single value included; NaN falls back to numpy (NaN result).
    from medseg.transforms.intensity import _percentiles_chunks

    rng = np.random.default_rng(11)
    cases = [rng.normal(0, 100, 70_001), rng.integers(-3, 3, 5000).astype(float), np.abs(rng.normal(0, 1e-30, 999)),
             np.r_[rng.normal(5, 1, 300), np.inf, -np.inf], np.array([42.0]), np.r_[rng.normal(5, 1, 50), np.nan],
             _mr_like((40, 30, 20), seed=12).ravel()]
    for values in cases:
        v = values.astype(np.float32)
        with np.errstate(invalid="ignore"):
            got = _percentiles_chunks(lambda: iter(np.array_split(v, 4)), v.size, pcts)
            expected = [float(p) for p in np.percentile(v, pcts)]
        assert np.array_equal(got, expected, equal_nan=True), (v.size, got, expected)


def test_needs_body_only_for_per_volume_body_statistics():
    from medseg.transforms.intensity import needs_body

    assert needs_body({"kind": "zscore"}) and needs_body({"kind": "percentile", "low": 0})
    assert not needs_body({"kind": "zscore", "region": "all"})
    assert not needs_body({"kind": "zscore", "mean": 0, "std": 1, "clip_low": -1, "clip_high": 1})
    assert not needs_body({"kind": "percentile", "low": 0, "high": 1})
    assert not needs_body({"kind": "ct_window", "low_hu": -1000, "high_hu": 400})
    with pytest.raises(ValueError, match="kind must be one of"):
        needs_body({"kind": "gauss"})
