"""Predictor: streaming, padding, TTA, pruned heads, geometry, a golden known-function model; post-processing."""

from __future__ import annotations

import dataclasses
import logging
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from medseg.data.plan import Plan
from medseg.errors import InputError
from medseg.infer.bundle import load_bundle, save_bundle
from medseg.infer.postprocess import keep_largest_component, remove_small_lesions
from medseg.infer.predictor import Predictor, padding_for
from medseg.io import Volume, read_volume
from medseg.nets.unetpp import build_unetpp
from medseg.transforms.preprocess import preprocess_image, restore

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
DATA = os.path.join(os.path.dirname(__file__), "data")
BREAST = os.path.join(DATA, "nrrd", "breast1_image.nrrd")  # 45 x 120 x 21, LPS, MR


def mr_plan(**changes) -> Plan:
    fields = dict(modality="MR", context_slices=3, divisor=4, patch_size=(32, 32), normalization={"kind": "zscore"})
    fields.update(changes)
    return Plan(**fields)


def tiny_unetpp(channels: int = 3) -> keras.Model:
    keras.utils.set_random_seed(1)
    return build_unetpp(input_channels=channels, filters=(4, 8, 16), depth=2, deep_supervision=True)


def small_unetpp(channels: int) -> keras.Model:
    """Depth 1, no BatchNorm: quick to trace, still mixes neighbouring pixels (3x3 convolutions)."""
    keras.utils.set_random_seed(2)
    return build_unetpp(input_channels=channels, filters=(4, 8), depth=1, deep_supervision=False, batch_norm=False)


def bundle_of(tmp_path, model, plan, **kwargs):
    save_bundle(tmp_path, model, plan, **kwargs)
    return load_bundle(tmp_path)


@pytest.fixture(scope="module")
def breast() -> Volume:
    return read_volume(BREAST)


@pytest.fixture(scope="module")
def bundle3(tmp_path_factory):
    """Tiny random UNet++ (depth 2, divisor 4) with 3 context slices, deep supervision heads."""
    return bundle_of(tmp_path_factory.mktemp("b3"), tiny_unetpp(3), mr_plan(target_spacing_mm=(0.8, 0.8)))


def reference_proba(model: keras.Model, volume: Volume, plan: Plan, divisor: int) -> Volume:
    """All slices at once through model.predict (no streaming), padded to ``divisor`` with the
    preprocessed volume's minimum (the background value training pads patches with; the
    predictor's rule for plans with per-volume statistics, which all callers here use)."""
    prepared = preprocess_image(volume, plan)
    x = prepared.slices(0, prepared.n_slices)
    (t, b), (l, r) = padding_for(x.shape[1], divisor), padding_for(x.shape[2], divisor)
    xp = np.pad(x, ((0, 0), (t, b), (l, r), (0, 0)), constant_values=prepared.array.min())
    out = model.predict(xp, batch_size=len(xp), verbose=0)
    out = out[-1] if isinstance(out, list) else out
    return restore(prepared, out[:, t : t + x.shape[1], l : l + x.shape[2], 1])


# --- post-processing (hand-computed) ------------------------------------------------------------
def test_remove_small_lesions_by_volume():
    mask = np.zeros((6, 6, 6), np.uint8)
    mask[0, 0, 0] = 1  # 1 voxel = 2 mm^3 at spacing (1, 1, 2)
    mask[2:4, 2:4, 2:4] = 1  # 8 voxels = 16 mm^3
    mask[5, 5, 4:6] = 2  # 2 voxels, label 2 = 4 mm^3
    out = remove_small_lesions(mask, (1.0, 1.0, 2.0), 0.004)  # 4 mm^3: keeps the 4 and 16 mm^3 lesions
    assert out.dtype == np.uint8
    assert out[0, 0, 0] == 0 and out[2:4, 2:4, 2:4].sum() == 8 and out[5, 5, 4:6].tolist() == [2, 2]
    assert remove_small_lesions(mask, (1.0, 1.0, 2.0), 0.0041).sum() == 8  # only the cube left
    assert remove_small_lesions(mask, (1.0, 1.0, 2.0), 0.0).tolist() == mask.tolist()
    assert mask[0, 0, 0] == 1  # input untouched


def test_remove_small_lesions_can_spare_the_largest():
    mask = np.zeros((6, 6, 6), np.uint8)
    mask[0, 0, 0] = 1  # 2 mm^3 at spacing (1, 1, 2)
    mask[2:4, 2:4, 2:4] = 1  # 16 mm^3
    assert remove_small_lesions(mask, (1.0, 1.0, 2.0), 1.0).sum() == 0
    kept = remove_small_lesions(mask, (1.0, 1.0, 2.0), 1.0, spare_largest=True)
    assert kept.sum() == 8 and kept[2:4, 2:4, 2:4].all()
    one = np.zeros((2, 2, 2), np.uint8)
    one[0, 0, :] = 1  # two voxels of one component; equal-size ties: the first in scan order
    assert remove_small_lesions(one, (1, 1, 1), 5.0, spare_largest=True).sum() == 2
    assert remove_small_lesions(np.zeros((2, 2, 2), np.uint8), (1, 1, 1), 5.0, spare_largest=True).sum() == 0


def test_components_touching_at_a_corner_are_one_lesion():
    mask = np.zeros((3, 3, 3), np.uint8)
    mask[0, 0, 0] = mask[1, 1, 1] = 1  # 26-connected: one lesion of 2 ml at 1 cm voxels
    assert remove_small_lesions(mask, (10, 10, 10), 2.0).sum() == 2
    assert remove_small_lesions(mask, (10, 10, 10), 2.01).sum() == 0


def test_keep_largest_component():
    mask = np.zeros((5, 5, 5), np.uint8)
    mask[0, 0, :2] = 1  # 2 voxels
    mask[3:5, 3:5, 3] = 1  # 4 voxels
    out = keep_largest_component(mask)
    assert out.sum() == 4 and out[3:5, 3:5, 3].all()
    tie = np.zeros((5, 5, 5), np.uint8)
    tie[0, 0, 0] = tie[4, 4, 4] = 1
    assert np.argwhere(keep_largest_component(tie)).tolist() == [[0, 0, 0]]  # first in scan order
    assert keep_largest_component(np.zeros((2, 2, 2))).sum() == 0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: remove_small_lesions(np.zeros((2, 2)), (1, 1, 1), 1), "expected a 3D label array"),
        (lambda: remove_small_lesions(np.zeros((2, 2, 2)), (1, 0, 1), 1), "spacing_mm must be three positive"),
        (lambda: remove_small_lesions(np.zeros((2, 2, 2)), (1, 1, 1), -1), "min_lesion_ml must be a finite number"),
        (lambda: keep_largest_component(np.zeros(4)), "expected a 3D label array"),
    ],
)
def test_postprocess_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- streaming, padding, TTA ---------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [1, 3])
def test_streamed_prediction_equals_one_big_batch(breast, tmp_path, batch_size):
    # context 5 reaches 2 slices back: with batch_size 1 the in-place output must lag behind.
    plan = mr_plan(context_slices=5, divisor=2)
    bundle = bundle_of(tmp_path, small_unetpp(5), plan)
    before = breast.array.copy()
    prob = Predictor(bundle, batch_size=batch_size).predict_proba(breast)
    expected = reference_proba(bundle.model, breast, plan, 2)
    assert prob.array.dtype == np.float32 and prob.same_grid(breast)
    np.testing.assert_allclose(prob.array, expected.array, atol=2e-5)
    assert np.array_equal(breast.array, before)  # the caller's volume is never written


def test_padding_to_the_divisor_for_odd_sizes(bundle3):
    assert padding_for(45, 4) == (1, 2) and padding_for(120, 4) == (0, 0) and padding_for(7, 16) == (4, 5)
    predictor = Predictor(bundle3)
    x = np.random.default_rng(0).normal(size=(2, 45, 121, 3)).astype(np.float32)
    for pad_value in (None, 0.25):
        out = predictor.predict_slices(x, pad_value=pad_value)
        assert out.shape == (2, 45, 121)
        fill = x.min() if pad_value is None else pad_value
        padded = np.pad(x, ((0, 0), (1, 2), (1, 2), (0, 0)), constant_values=fill)  # 48 x 124
        full = bundle3.model.predict(padded, verbose=0)[-1][..., 1]
        np.testing.assert_allclose(out, full[:, 1:46, 1:122], atol=1e-5)


def test_tta_is_the_mean_of_flipped_predictions(bundle3):
    x = np.random.default_rng(1).normal(size=(3, 45, 40, 3)).astype(np.float32)
    plain = Predictor(bundle3, tta=False)
    tta = Predictor(bundle3, tta=True).predict_slices(x)
    flips = [
        plain.predict_slices(x),
        plain.predict_slices(x[:, ::-1])[:, ::-1],
        plain.predict_slices(x[:, :, ::-1])[:, :, ::-1],
        plain.predict_slices(x[:, ::-1, ::-1])[:, ::-1, ::-1],
    ]
    np.testing.assert_allclose(tta, np.mean(flips, axis=0), atol=1e-6)
    assert np.abs(tta - flips[0]).max() > 1e-4  # the random net is not flip-invariant: TTA did something


@keras.saving.register_keras_serializable(package="medseg_tests")
class BatchRecorder(keras.layers.Layer):
    """Identity layer that records the batch size of every call, even inside a tf.function."""

    sizes: list[int] = []

    def call(self, x):
        def record(n):
            BatchRecorder.sizes.append(int(n))
            return n

        n = tf.py_function(record, [tf.shape(x)[0]], tf.int32)
        n.set_shape([])
        return x + tf.cast(n, x.dtype) * 0.0  # depends on the py_function so it always runs

    def compute_output_shape(self, input_shape):
        return input_shape


def test_model_never_sees_more_than_batch_size_slices(breast, tmp_path):
    inputs = keras.Input((None, None, 3))
    x = BatchRecorder()(inputs)
    x = keras.layers.Conv2D(2, 3, padding="same")(x)
    model = keras.Model(inputs, keras.layers.Activation("softmax")(x))
    bundle = bundle_of(tmp_path, model, mr_plan())
    BatchRecorder.sizes.clear()
    Predictor(bundle, batch_size=4).predict_proba(breast)  # 21 slices
    assert BatchRecorder.sizes == [4, 4, 4, 4, 4, 1]
    BatchRecorder.sizes.clear()
    Predictor(bundle, batch_size=8, tta=True).predict_proba(breast)
    assert BatchRecorder.sizes == [8] * 8 + [5] * 4


def test_head_level_uses_the_pruned_head(breast, tmp_path):
    model = tiny_unetpp(3)
    bundle = bundle_of(tmp_path, model, mr_plan(), head_level=1)
    predictor = Predictor(bundle)
    assert len(predictor.model.outputs) == 1 and predictor.model.count_params() < model.count_params()
    x = np.random.default_rng(2).normal(size=(2, 48, 120, 3)).astype(np.float32)
    np.testing.assert_allclose(predictor.predict_slices(x), model.predict(x, verbose=0)[0][..., 1], atol=1e-5)
    # without head_level the deepest head (the full UNet++) is used
    full = Predictor(bundle_of(tmp_path / "full", model, mr_plan()))
    np.testing.assert_allclose(full.predict_slices(x), model.predict(x, verbose=0)[-1][..., 1], atol=1e-5)


def test_head_level_the_model_lacks(tmp_path):
    bundle = bundle_of(tmp_path, tiny_unetpp(3), mr_plan(), head_level=3)  # depth 2: heads 1 and 2
    match = "expected a UNet\\+\\+ with head_3 .bundle head_level., found .*no output 'head_3'"
    with pytest.raises(InputError, match=match):
        Predictor(bundle)


def test_bad_batch_size_and_threshold(bundle3, breast):
    with pytest.raises(ValueError, match="batch_size must be a positive integer, found 0"):
        Predictor(bundle3, batch_size=0)
    predictor = Predictor(bundle3)
    with pytest.raises(ValueError, match=r"threshold must lie in \[0, 1\], found 2"):
        predictor.segment(breast, threshold=2)
    with pytest.raises(ValueError, match="min_lesion_ml must be a finite number >= 0"):
        predictor.segment(breast, min_lesion_ml=-1)
    with pytest.raises(ValueError, match=r"expected slices \(B, H, W, 3\), found shape \(2, 8, 8, 1\)"):
        predictor.predict_slices(np.zeros((2, 8, 8, 1), np.float32))


# --- geometry, odd inputs -------------------------------------------------------------------------
# DICOM input is covered end to end (written file vs SimpleITK) in test_infer_cli.py.
@pytest.mark.parametrize("path", [BREAST, os.path.join(DATA, "nifti", "anatomical.nii")])
def test_output_is_on_the_input_grid(bundle3, path):
    volume = read_volume(path)
    predictor = Predictor(bundle3, batch_size=8)
    seg = predictor.segment(volume, threshold=0.5)
    assert seg.array.dtype == np.uint8 and set(np.unique(seg.array)) <= {0, 1}
    assert seg.shape == volume.shape and np.array_equal(seg.affine, volume.affine)
    assert seg.case_id == volume.case_id


def test_fewer_slices_than_the_context_are_padded(bundle3, breast):
    one = breast.with_array(breast.array[:, :, 7:8])  # a single slice, context 3
    prob = Predictor(bundle3).predict_proba(one)
    assert prob.shape == (45, 120, 1)
    prepared = preprocess_image(one, bundle3.plan)
    x = np.repeat(prepared.array[..., None], 3, axis=-1)  # the slice repeated as its own neighbours
    expected = Predictor(bundle3).predict_slices(x)
    np.testing.assert_allclose(prob.array, restore(prepared, expected).array, atol=1e-5)


def test_modality_mismatch_warns(bundle3, breast, tmp_path, caplog):
    predictor = Predictor(bundle3)  # trained on MR
    ct = breast.with_array(breast.array.astype(np.float32) - 1024.0, modality="CT")
    with caplog.at_level(logging.WARNING, logger="medseg"):
        assert predictor.check_modality(breast) is None  # no header, MR-like intensities
        message = predictor.check_modality(ct)
    assert "trained on MR but this volume is CT (from its header)" in message and message in caplog.text
    guessed = breast.with_array(breast.array.astype(np.float32) - 1024.0)  # air at -1000: looks like CT
    assert "is CT (from its intensities)" in predictor.check_modality(guessed)
    mixed = dataclasses.replace(bundle3, plan=bundle3.plan.replace(modality="MIXED"))  # trained on CT and MR
    assert Predictor(mixed).check_modality(ct) is None


# --- golden: a model computing a known function -----------------------------------------------------
def threshold_model(channels: int, centre: int, k: float = 20.0) -> keras.Model:
    """softmax(k * [1 - x, x]) of the centre channel x: P(lesion) > 0.5 exactly where x > 0.5."""
    inputs = keras.Input((None, None, channels))
    conv = keras.layers.Conv2D(2, 1, name="logits")
    logits = conv(inputs)
    kernel = np.zeros((1, 1, channels, 2), np.float32)
    kernel[0, 0, centre] = [-k, k]
    conv.set_weights([kernel, np.array([k, 0.0], np.float32)])
    return keras.Model(inputs, keras.layers.Activation("softmax", name="head_1")(logits))


@pytest.mark.parametrize("target_spacing", [None, (0.8, 1.0)])
def test_golden_mask_from_a_known_function(tmp_path, target_spacing):
    # A CT-like volume, oblique LPS affine, anisotropic: an ellipsoid of 100 HU in 0 HU.
    shape, spacing = (40, 36, 14), np.array([0.9, 1.2, 3.0])
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1) * spacing
    centre = np.array(shape) / 2 * spacing
    truth = (((ijk - centre) / [11.0, 10.0, 14.0]) ** 2).sum(-1) <= 1.0
    rot = np.array([[0.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])  # LPS-like axes
    affine = np.eye(4)
    affine[:3, :3] = rot * spacing
    affine[:3, 3] = [20.0, -10.0, 5.0]
    volume = Volume(np.where(truth, 100, 0).astype(np.int16), affine, "golden", {"modality": "CT"})
    plan = Plan(
        modality="CT", context_slices=3, divisor=1, patch_size=(32, 32), target_spacing_mm=target_spacing,
        normalization={"kind": "ct_window", "low_hu": 0.0, "high_hu": 100.0},
    )
    bundle = bundle_of(tmp_path, threshold_model(3, centre=1), plan)
    seg = Predictor(bundle, batch_size=5, tta=True).segment(volume)
    pred = seg.array.astype(bool)
    dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    assert dice > 0.99 if target_spacing else dice == 1.0
    assert seg.same_grid(volume)


@pytest.mark.parametrize("slice_axis, context, target_spacing", [(2, 3, None), (0, 5, (0.9, 2.0))])
def test_chunked_preprocessing_equals_whole_volume(breast, tmp_path, slice_axis, context, target_spacing):
    # CT window: voxel-wise, so the predictor preprocesses in chunks; the LPS input flips two axes.
    ct = breast.with_array(breast.array.astype(np.float32) * 4 - 1000.0, modality="CT")
    plan = Plan(
        modality="CT", context_slices=context, divisor=2, patch_size=(32, 32), slice_axis=slice_axis,
        target_spacing_mm=target_spacing, normalization={"kind": "ct_window", "low_hu": -1000.0, "high_hu": 0.0},
    )
    bundle = bundle_of(tmp_path, small_unetpp(context), plan)
    whole = Predictor(bundle, batch_size=2)
    whole.chunk_slices = 10**6
    chunked = Predictor(bundle, batch_size=2)
    chunked.chunk_slices = 5  # -> chunks of 4 input slices, each with its context neighbours
    axis = chunked._chunkable(ct)[0]
    assert ct.shape[axis] > 5 and whole._chunkable(ct) is None
    expected = whole.predict_proba(ct)
    np.testing.assert_allclose(chunked.predict_proba(ct).array, expected.array, atol=2e-5)
    np.testing.assert_array_equal(chunked.segment(ct, threshold=0.5).array, (expected.array >= 0.5).astype(np.uint8))


def test_per_volume_statistics_are_never_chunked(bundle3, breast):
    predictor = Predictor(bundle3)  # MR z-score with per-volume mean/std
    predictor.chunk_slices = 5
    assert predictor._chunkable(breast) is None


# --- events and cancel (issue 21) -----------------------------------------------------------------
def _ct_chunked(breast, tmp_path, threshold=0.5):
    """A CT-window bundle (slice-local steps: chunked) and the breast image as CT (21 slices on axis 2)."""
    ct = breast.with_array(breast.array.astype(np.float32) * 4 - 1000.0, modality="CT")
    plan = Plan(modality="CT", context_slices=3, divisor=2, patch_size=(32, 32),
                normalization={"kind": "ct_window", "low_hu": -1000.0, "high_hu": 0.0})
    return ct, bundle_of(tmp_path, small_unetpp(3), plan, threshold=threshold)


def test_segment_reports_every_model_call_and_ends_at_the_total(breast, tmp_path):
    from medseg.events import ChunkProgress, Recorder

    ct, bundle = _ct_chunked(breast, tmp_path)
    predictor = Predictor(bundle, batch_size=2)
    predictor.chunk_slices = 4  # chunks of 4 input slices: 21 slices -> 5 chunks of 2 batches + 1 of 1 batch
    assert predictor._chunkable(ct) is not None
    rec = Recorder()
    labels = predictor.segment(ct, events=rec)
    done = [e.done for e in rec.of(ChunkProgress)]
    assert done == list(range(1, 12)) and {e.total for e in rec.of(ChunkProgress)} == {11}  # 5 * 2 + 1 batches
    assert rec.kinds()[0] == "run_started" and rec.kinds()[-1] == "finished"
    assert rec[0].settings["case_id"] == ct.case_id and rec[-1].summary["units"] == 11
    np.testing.assert_array_equal(labels.array, Predictor(bundle, batch_size=2).segment(ct).array)
    # Whole volume (per-volume z-score): ceil(21 / 8) = 3 batches, times the 4 test-time flips.
    whole = Predictor(bundle_of(tmp_path / "mr", small_unetpp(3), mr_plan(divisor=2)), batch_size=8, tta=True)
    rec = Recorder()
    whole.segment(breast, events=rec)
    assert [e.done for e in rec.of(ChunkProgress)] == list(range(1, 13)) and rec.of(ChunkProgress)[-1].total == 12


def test_cancel_after_the_first_chunk_raises_and_the_predictor_runs_again(breast, tmp_path):
    from medseg.events import CancelToken, ChunkProgress, Recorder, RunCancelled

    ct, bundle = _ct_chunked(breast, tmp_path)
    predictor = Predictor(bundle, batch_size=2)
    predictor.chunk_slices = 4
    expected = Predictor(bundle, batch_size=2).segment(ct)
    token, rec = CancelToken(), Recorder()

    def sink(event):
        rec(event)
        if isinstance(event, ChunkProgress) and event.done == 2:  # the first chunk's two batches are done
            token.cancel("the viewer closed")

    with pytest.raises(RunCancelled, match="the viewer closed"):
        predictor.segment(ct, events=sink, cancel=token)
    assert rec.kinds()[-1] == "cancelled" and "finished" not in rec.kinds()
    assert [e.done for e in rec.of(ChunkProgress)] == [1, 2]  # stopped before the third model call
    assert rec[-1].reason == "the viewer closed"
    again = predictor.segment(ct)  # no state left by the cancelled call
    np.testing.assert_array_equal(again.array, expected.array)
    assert np.array_equal(again.affine, ct.affine)
    with pytest.raises(RunCancelled):  # a token already cancelled stops before any model call
        predictor.predict_proba(ct, cancel=token)


def test_a_second_predictor_in_the_same_process(breast, tmp_path):
    ct, first = _ct_chunked(breast, tmp_path / "a", threshold=0.5)
    second = bundle_of(tmp_path / "b", tiny_unetpp(3), mr_plan(), threshold=0.3)
    p1 = Predictor(first, batch_size=2)
    a1 = p1.segment(ct).array
    p2 = Predictor(second, batch_size=4)
    b1 = p2.predict_proba(breast).array
    np.testing.assert_array_equal(p1.segment(ct).array, a1)  # the first is unchanged by the second
    np.testing.assert_array_equal(Predictor(second, batch_size=4).predict_proba(breast).array, b1)
    expected = reference_proba(second.model, breast, second.plan, 4)
    np.testing.assert_allclose(b1, expected.array, atol=1e-5)


def test_label_kinds_decode_and_encode_by_hand():
    """What the Predictor asks the label kinds (medseg.io.classes), on values worked out by hand."""
    from medseg.io.classes import BINARY, BITS, CLASSES, ClassSpec, LabelKind

    same = lambda plane: plane  # noqa: E731 - restore onto the input grid: here the identity
    softmax = np.array([[[[0.2, 0.5, 0.3], [0.6, 0.1, 0.3], [0.3, 0.3, 0.4], [0.4, 0.4, 0.2]]]], np.float32)
    decoded = CLASSES.decode(same, softmax)
    np.testing.assert_array_equal(decoded, [[[1, 0, 2, 0]]])  # a tie goes to the lower class
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(CLASSES.class_mask(decoded, 1), [[[False, False, True, False]]])
    spec = ClassSpec.parse(["liver=5", "spleen=1"])
    masks = [CLASSES.class_mask(decoded, k) for k in range(2)]
    np.testing.assert_array_equal(CLASSES.encode(spec, masks), [[[5, 0, 1, 0]]])
    sigmoid = np.array([[[[0.9, 0.2], [0.5, 0.7], [0.1, 0.49]]]], np.float32)  # two regions
    bits = BITS.decode(same, sigmoid)
    np.testing.assert_array_equal(bits, [[[1, 3, 0]]])  # region r is bit r, held at >= 0.5
    regions = ClassSpec.from_dataset_json({"labels": {"background": 0, "whole": [1, 2], "core": 2},
                                           "regions_class_order": [1, 2]})
    masks = [BITS.class_mask(bits, k) for k in range(2)]
    np.testing.assert_array_equal(masks[1], [[[False, True, False]]])
    np.testing.assert_array_equal(BITS.encode(regions, masks), [[[1, 2, 0]]])  # core (2) overwrites whole (1)
    assert not BINARY.decodes_classes and CLASSES.decodes_classes and BITS.decodes_classes
    assert LabelKind.named("bits") is BITS and LabelKind.named(BITS) is BITS


def test_bundle_small_component_choice_is_applied_at_inference(tmp_path):
    """A bundle whose validation chose to drop components below 0.5 ml: the Predictor drops the
    2 x 2 x 2 mm blob (0.008 ml) and keeps the 6.9 ml block; without the choice both stay, and the
    caller's larger --min-lesion-ml still wins."""
    hu = np.zeros((30, 30, 12), np.int16)
    hu[5:17, 5:17, 2:8] = 100   # 12 x 12 x 6 voxels of 2 mm: 6.9 ml
    hu[24:25, 24:25, 9:10] = 100  # one voxel: 0.008 ml
    volume = Volume(hu, np.diag([2.0, 2.0, 2.0, 1.0]), "blobs", {"modality": "CT"})
    plan = Plan(modality="CT", context_slices=3, divisor=1, patch_size=(32, 32), target_spacing_mm=None,
                normalization={"kind": "ct_window", "low_hu": 0.0, "high_hu": 100.0})
    model = threshold_model(3, centre=1)
    small = {"drop": True, "min_component_ml": 0.5, "dsc": 0.7, "dsc_without_small": 0.72, "cases": 1,
             "validation": "held-out cases", "reason": "validation"}
    post = {"largest_component": False, "dsc": 0.7, "dsc_largest_component": 0.6, "cases": 1,
            "validation": "held-out cases", "reason": "validation", "small_components": {"lesion": small}}
    plain = Predictor(bundle_of(tmp_path / "plain", model, plan)).segment(volume, largest_component=False)
    chosen = Predictor(bundle_of(tmp_path / "chosen", model, plan, postprocessing=post))
    dropped = chosen.segment(volume, largest_component=False)
    assert int(plain.array.sum()) == 12 * 12 * 6 + 1
    assert int(dropped.array.sum()) == 12 * 12 * 6 and not dropped.array[24, 24, 9]
    assert int(chosen.segment(volume, min_lesion_ml=10.0, largest_component=False).array.sum()) == 0
    proba = chosen.predict_proba(volume)
    assert int(chosen.labels_from_proba(proba, largest_component=False).array.sum()) == 12 * 12 * 6
    # A learned size above every component (a scan whose field of view cuts the structure): the
    # largest (6.9 ml) stays, the blob goes; the caller's own size drops both, as asked.
    big = {**post, "small_components": {"lesion": {**small, "min_component_ml": 50.0}}}
    cut = Predictor(bundle_of(tmp_path / "cut", model, plan, postprocessing=big))
    spared = cut.segment(volume, largest_component=False)
    assert int(spared.array.sum()) == 12 * 12 * 6 and not spared.array[24, 24, 9]
    assert int(cut.segment(volume, min_lesion_ml=60.0, largest_component=False).array.sum()) == 0
