"""Several labels at once (issue 13): the class spec, the label step, class-balanced sampling,
class-aware warps, and the binary path left exactly as it was.

Independent answers: hand-written label arrays and their expected class maps, counts of drawn
patch classes against the uniform share, and the binary pipeline's config written out in full.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from medseg.data.plan import Plan
from medseg.errors import InputError
from medseg.io.classes import BINARY, CLASSES, ClassSpec
from medseg.transforms.pipeline import Pipeline
from medseg.transforms.sampling import Centres, PatchSampler, SampleSource, build_index
from medseg.transforms.warp import SpatialParams, _label_from, render

ORGANS = ["liver=5", "spleen=1", "stomach=6", "aorta=52"]


# --- the spec ----------------------------------------------------------------------------------------
def test_parse_classes_and_map_ids():
    spec = ClassSpec.parse(ORGANS)
    assert spec.names == ("liver", "spleen", "stomach", "aorta") and spec.num_classes == 5 and not spec.regions
    label = np.array([0, 5, 1, 6, 52, 7, 2, 5])
    np.testing.assert_array_equal(spec.class_indices(label), [0, 1, 2, 3, 4, 0, 0, 1])
    np.testing.assert_array_equal(spec.label_ids(np.array([0, 1, 2, 3, 4])), [0, 5, 1, 6, 52])
    assert ClassSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    two = ClassSpec.parse(["kidney=1", "tumour=2,3"])  # a class may own several ids
    np.testing.assert_array_equal(two.class_indices(np.array([0, 1, 2, 3])), [0, 1, 2, 2])


@pytest.mark.parametrize("bad", [["liver"], ["liver=x"], ["1liver=5"], ["liver=0"], ["a=1", "a=2"],
                                 ["background=1"]])
def test_parse_errors_name_the_entry(bad):
    with pytest.raises(InputError):
        ClassSpec.parse(bad)


def test_dataset_json_classes_regions_and_binary():
    spec = ClassSpec.from_dataset_json({"labels": {"background": 0, "liver": 1, "tumour": 2}})
    assert spec.names == ("liver", "tumour") and spec.ids == ((1,), (2,))
    # One foreground label: a binary spec named by it (its id is the class, others background).
    one = ClassSpec.from_dataset_json({"labels": {"background": 0, "liver": 1}})
    assert one.names == ("liver",) and one.ids == ((1,),) and one.kind is BINARY and not one.any_nonzero
    # No foreground label: the binary zero-configuration case.
    assert ClassSpec.from_dataset_json({"labels": {"background": 0}}) is None
    assert ClassSpec.from_dataset_json({"name": "no labels"}) is None
    brats = {"labels": {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3},
             "regions_class_order": [1, 2, 3]}
    regions = ClassSpec.from_dataset_json(brats)
    assert regions.regions and regions.region_order == (1, 2, 3)
    label = np.array([0, 1, 2, 3])
    masks = regions.region_masks(label)
    np.testing.assert_array_equal(masks.astype(int), [[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]])
    # nnU-Net's rule: each region in order writes its id where predicted; later ones win.
    np.testing.assert_array_equal(regions.resolve_regions(masks), label)
    with pytest.raises(InputError, match="ids"):
        ClassSpec.from_dataset_json({"labels": {"background": 0, "a": "one", "b": 2}})


# --- the label step ------------------------------------------------------------------------------------
def test_label_step_maps_ids_to_classes_and_binary_config_is_unchanged():
    from medseg.io.volume import Volume

    spec = ClassSpec.parse(ORGANS)
    plan = Plan(patch_size=(16, 16), num_classes=5, classes=spec.to_dict())
    vol = Volume(np.array([0, 5, 1, 6, 52, 99]).reshape(1, 2, 3), np.eye(4), "p")
    out = Pipeline.from_plan(plan).preprocess({"label": vol})["label"]
    assert sorted(np.unique(out).tolist()) == [0, 1, 2, 3, 4] and out.dtype == np.uint8
    assert Pipeline.from_plan(plan).label_kind is CLASSES
    # The binary pipeline's first and patch steps read exactly as before classes existed.
    binary = Pipeline.from_plan(Plan(patch_size=(16, 16))).to_config()["transforms"]
    assert binary[0]["args"] == {"keys": ["label"], "num_classes": 2, "allow_missing_keys": True}
    assert "label_kind" not in binary[5]["args"] and "classes" not in Plan(patch_size=(16, 16)).to_dict()
    with pytest.raises(ValueError, match="does not fit its classes"):
        Plan(patch_size=(16, 16), num_classes=3, classes=spec.to_dict())


def test_regions_become_bits():
    from medseg.transforms.preprocess import label_classes

    regions = ClassSpec.from_dataset_json({"labels": {"background": 0, "whole": [1, 2, 3], "core": [2, 3],
                                                      "enhancing": 3}, "regions_class_order": [1, 2, 3]})
    bits = label_classes(np.array([0, 1, 2, 3]), 4, "p", regions.to_dict())
    np.testing.assert_array_equal(bits, [0b000, 0b001, 0b011, 0b111])


# --- sampling and warps ----------------------------------------------------------------------------------
def _source(label: np.ndarray, kind: str) -> SampleSource:
    return SampleSource(np.zeros(label.shape, np.float32), label.astype(np.uint8),
                        build_index(label, label_kind=kind), 0.0, "c")


def test_sampler_gives_a_rare_class_its_share():
    """Class 1: twenty big blobs over two cases; class 2: one voxel in one case. Lesion-centred
    patches split about evenly between the classes (uniform over classes first)."""
    a = np.zeros((20, 64, 64), np.uint8)
    b = np.zeros((20, 64, 64), np.uint8)
    for k in range(10):
        a[k * 2, 5:20, 5:20] = 1
        b[k * 2, 30:50, 30:50] = 1
    b[19, 60, 60] = 2
    sources = [_source(a, "classes"), _source(b, "classes")]
    assert sources[1].index.component_class.tolist().count(2) == 1
    sampler = PatchSampler(sources, (16, 16), lesion_fraction=1.0, jitter=0)
    rng = np.random.default_rng(0)
    drawn = []
    for _ in range(50):
        c = sampler.draw(40, rng)
        drawn += [int(sources[i].label[s, h, w]) for i, s, h, w in zip(c.case, c.slice, c.h, c.w)]
    share = drawn.count(2) / len(drawn)
    assert len(drawn) == 2000 and 0.45 < share < 0.55 and set(drawn) == {1, 2}


def test_binary_sampling_is_unchanged_by_classes():
    """A binary source draws exactly the centres of the single-class rule, written out here:
    remainder draw, then (B, 4) uniforms, then the jitter; case, component, voxel from columns 0-2."""
    lab = np.zeros((6, 40, 40), np.uint8)
    lab[1, 5:9, 5:9] = 1
    lab[4, 30, 30] = 1
    src = _source(lab, "binary")
    assert src.index.component_class.tolist() == [1, 1]
    B = 8
    c = PatchSampler([src], (16, 16), lesion_fraction=1.0).draw(B, np.random.default_rng(3))
    rng = np.random.default_rng(3)
    rng.random()
    u = rng.random((B, 4))
    jitter = np.stack([rng.integers(-4, 5, B), rng.integers(-4, 5, B)], axis=1)
    idx = src.index
    for b in range(B):
        comp = int(u[b, 1] * idx.n_components)
        lo, hi = int(idx.offsets[comp]), int(idx.offsets[comp + 1])
        s, h, w = idx.coords[lo + int(u[b, 2] * (hi - lo))]
        assert (c.slice[b], c.h[b], c.w[b]) == (s, h + jitter[b, 0], w + jitter[b, 1])


def test_class_warp_never_invents_a_class_between_two_others():
    label = np.zeros((1, 32, 32), np.uint8)
    label[0, :, :16] = 1
    label[0, :, 16:] = 3
    src = SampleSource(label.astype(np.float32), label, build_index(label, label_kind="classes"), 0.0, "c")
    B = 6
    spatial = SpatialParams(np.zeros(B, bool), np.zeros(B, bool), np.zeros(B, np.int64),
                            np.array([7.0, 13, 21, 33, 45, 60]), np.array([1.0, 1.1, 0.9, 1.2, 1.0, 0.85]))
    centres = Centres(np.zeros(B, np.int64), np.zeros(B, np.int64), np.full(B, 16), np.full(B, 16), np.ones(B, bool))
    for backend in ("numpy", "cv2"):
        _, masks = render([src], centres, (24, 24), spatial=spatial, backend=backend, label_kind="classes")
        assert set(np.unique(masks).tolist()) <= {0, 1, 3} and {1, 3} <= set(np.unique(masks).tolist())
        _, binary_masks = render([src], centres, (24, 24), spatial=spatial, backend=backend)
        assert 2 not in binary_masks and binary_masks.max() == 1  # binary: thresholded as ever


def test_label_from_each_kind_by_hand():
    identity = lambda plane: np.asarray(plane, dtype=np.float32)  # noqa: E731  (no warp: parts come back)
    lab = np.array([[0, 1, 3], [3, 3, 0]], np.uint8)
    np.testing.assert_array_equal(_label_from(identity, lab, "classes"), lab)
    np.testing.assert_array_equal(_label_from(identity, lab > 0, "binary"), lab > 0)
    bits = np.array([[0, 1, 3], [7, 2, 0]], np.uint8)
    np.testing.assert_array_equal(_label_from(identity, bits, "bits"), bits)
    half = lambda plane: np.asarray(plane, dtype=np.float32) * 0.5 + 0.25  # noqa: E731
    # Blurred towards 0.5: class weights 0.75 beat background 0.25; bits 0.75 > 0.5 survive.
    np.testing.assert_array_equal(_label_from(half, lab, "classes"), lab)
    np.testing.assert_array_equal(_label_from(half, bits, "bits"), bits)


# --- end to end on the TotalSegmentator patients ----------------------------------------------------
@pytest.mark.slow
def test_four_organs_train_infer_and_score_per_class(tmp_path):
    """Four organs of patient A train a tiny softmax model for a few steps; its bundle names the
    classes, medseg-infer's engine writes patient B's map in the dataset's label ids on B's grid,
    and each organ's DSC by medseg's metric equals a plain numpy Dice."""
    import importlib.util
    from pathlib import Path

    from medseg.data.plan import load_pair
    from medseg.eval import compute_metrics
    from medseg.infer.bundle import load_bundle
    from medseg.infer.predictor import Predictor
    from medseg.io import Case
    from medseg.train import train

    repo = Path(__file__).resolve().parents[1]
    spec_ = importlib.util.spec_from_file_location("prep", repo / "scripts" / "prepare_sample_data.py")
    prep = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(prep)
    data = prep.prepare_liver(tmp_path / "liver", repo / "tests" / "data" / "totalsegmentator")
    run = tmp_path / "run"
    import keras

    class StartingBias(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.bias = [layer.bias.numpy() for layer in self.model.layers if layer.name.endswith("_logits")]

    start = StartingBias()
    result = train(dict(images=str(data / "imagesTr"), labels=str(data / "labelsTr"), run_dir=str(run),
                        labels_map=ORGANS, filters=[4, 8], depth=1, patch_size=[64, 64], batch_size=4,
                        steps_per_epoch=3, epochs=1, verbose=0, precision="float32", run_eagerly=True,
                        cpu_sizing=False), callbacks=[start])
    info = json.loads((run / "bundle.json").read_text())
    assert info["classes"] == ["background", "liver", "spleen", "stomach", "aorta"]
    assert info["plan"]["classes"]["ids"] == [[5], [1], [6], [52]] and info["plan"]["num_classes"] == 5
    assert info["pipeline"]["transforms"][0]["args"]["classes"]["names"] == ["liver", "spleen", "stomach", "aorta"]
    assert set(info["postprocessing"]["largest_component"]) == {"liver", "spleen", "stomach", "aorta"}
    assert {"val_dsc_liver", "val_dsc_aorta"} <= set(result.history[-1])
    # Class balance, from patient A's files by plain numpy: each organ's share of the body (HU >
    # -500) gives the cross-entropy weights, the organs' 5/95 HU percentiles the CT window.
    from medseg.io import read_volume
    from medseg.losses import balanced_class_weights

    ct = np.asarray(read_volume(data / "imagesTr" / "patientA.nii.gz").array)
    organs = np.asarray(read_volume(data / "labelsTr" / "patientA.nii.gz").array)
    shares = [np.sum(organs == v) / np.sum(ct > -500) for v in (5, 1, 6, 52)]
    weights = json.loads((run / "config.json").read_text())["ce_class_weights"]
    assert weights == pytest.approx(balanced_class_weights(shares), abs=1e-4)
    assert weights[0] == 1.0 and weights[1] < weights[2] < weights[3] < weights[4]   # rarer, heavier
    # every head started at the class priors of those shares: softmax(bias) = [1 - sum, *shares]
    priors = np.array([1 - sum(shares), *shares])
    assert start.bias  # one head per deep-supervision level
    for bias in start.bias:
        np.testing.assert_allclose(np.exp(bias) / np.exp(bias).sum(), priors, rtol=0.02)
    p5, p95 = np.percentile(ct[np.isin(organs, (5, 1, 6, 52))], [5, 95])
    window = info["plan"]["normalization"]
    assert window["kind"] == "ct_window"
    # The top: p95 + 250 HU, raised to the aorta's brightest arterial target (550 HU, docs/train.md's
    # phase table) + 100 HU so a simulated arterial aorta stays inside the window (issue 23).
    assert window["low_hu"] == pytest.approx(p5 - 250, abs=8)
    assert window["high_hu"] == pytest.approx(max(p95 + 250, 650.0), abs=8)
    # training simulated the contrast phases in that window (issue 13's enhancement is off with them)
    steps = {t["name"]: t["args"] for t in info["pipeline"]["transforms"]}
    assert steps["RandContrastPhased"]["window_hu"] == [window["low_hu"], window["high_hu"]]
    assert "RandEnhancementd" not in steps and steps["RandContrastPhased"]["num_classes"] == 5
    # The organs lie on opposite sides of A's body (shares from nibabel's RAS copy by numpy: the
    # organ's voxels past the body's mean left-right position), so patches kept the orientation.
    import nibabel as nib

    ras_ct = np.asarray(nib.as_closest_canonical(nib.load(data / "imagesTr" / "patientA.nii.gz")).dataobj)
    ras_organs = np.asarray(nib.as_closest_canonical(nib.load(data / "labelsTr" / "patientA.nii.gz")).dataobj)
    centre = np.nonzero(ras_ct > -500)[0].mean()
    sides = {name: float(np.mean(np.nonzero(ras_organs == v)[0] > centre))
             for name, v in zip(("liver", "spleen", "stomach", "aorta"), (5, 1, 6, 52))}
    case = info["plan"]["fingerprint"]["cases"][0]
    assert case["class_side_shares"] == pytest.approx(sides, abs=0.01)
    # RAS axis 0 runs toward the patient's right: liver right; spleen, stomach and aorta left
    assert info["plan"]["fingerprint"]["lateral_classes"] == {
        n: "right" if v >= 0.8 else "left" for n, v in sides.items() if v >= 0.8 or v <= 0.2}
    assert set(info["plan"]["fingerprint"]["lateral_classes"].values()) == {"left", "right"}
    assert info["plan"]["keep_orientation"] is True
    assert steps["RandJointAugmentd"]["config"]["flip_prob"] == 0.0 and not steps["RandJointAugmentd"]["config"]["rot90"]
    image, label = load_pair(Case("patientB", data / "imagesTs" / "patientB", data / "labelsTs" / "patientB.nii.gz"))
    seg = Predictor(load_bundle(run)).segment(image)
    assert seg.shape == image.shape and np.array_equal(seg.affine, image.affine)
    pred, ref = np.asarray(seg.array), np.asarray(label.array)
    assert set(np.unique(pred).tolist()) <= {0, 5, 1, 6, 52}
    for value in (5, 1, 6, 52):
        p, r = pred == value, ref == value
        expected = 2 * np.sum(p & r) / (p.sum() + r.sum()) if p.sum() + r.sum() else np.nan
        got = compute_metrics(p, r, image.spacing_mm)["dsc"]
        assert got == pytest.approx(expected, abs=1e-9, nan_ok=True)


def _nested_spheres(root, n_cases: int = 4, shape=(48, 48, 12), seed: int = 0):
    """MR-like volumes with nested spheres: whole (ids 1-3) ⊃ core (2-3) ⊃ enhancing (3), each
    brighter than the one around it, and a dataset.json declaring the regions (BraTS-style)."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    images, labels = root / "imagesTr", root / "labelsTr"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    i, j, k = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    for n in range(n_cases):
        c = [rng.uniform(20, 28), rng.uniform(20, 28), rng.uniform(5, 7)]
        r2 = (i - c[0]) ** 2 + (j - c[1]) ** 2 + (2.5 * (k - c[2])) ** 2
        label = np.where(r2 <= 4 ** 2, 3, np.where(r2 <= 8 ** 2, 2, np.where(r2 <= 13 ** 2, 1, 0))).astype(np.uint8)
        image = 50 + 100 * label + rng.normal(0, 10, shape)
        nib.save(nib.Nifti1Image(image.astype(np.float32), np.diag([1.0, 1.0, 2.5, 1.0])), images / f"c{n}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.diag([1.0, 1.0, 2.5, 1.0])), labels / f"c{n}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "labels": {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3},
        "regions_class_order": [1, 2, 3]}))
    return images, labels


@pytest.mark.slow
def test_nested_regions_train_and_the_written_map_resolves_them(tmp_path):
    """Region training (sigmoid per region, Dice + BCE) on nested spheres learns all three, and
    the written map resolves them in nnU-Net's order: enhancing 3 inside core 2 inside whole 1."""
    from medseg.infer.bundle import load_bundle
    from medseg.infer.predictor import Predictor
    from medseg.io import read_volume
    from medseg.train import train

    images, labels = _nested_spheres(tmp_path)
    run = tmp_path / "run"
    train(dict(images=str(images), labels=str(labels), run_dir=str(run), network="unet", filters=[8, 16, 32],
               depth=2, patch_size=[48, 48], batch_size=8, steps_per_epoch=60, epochs=6, verbose=0, lr=3e-3,
               precision="float32", cpu_sizing=False, val_fraction=0.25, seed=1))
    info = json.loads((run / "bundle.json").read_text())
    assert info["classes"] == ["whole", "core", "enhancing"] and info["plan"]["classes"]["regions"] is True
    bundle = load_bundle(run)
    assert bundle.model.outputs[0].shape[-1] == 3
    held_out = json.loads((run / "split.json").read_text())["val"][0]
    image, ref = read_volume(images / f"{held_out}.nii.gz"), read_volume(labels / f"{held_out}.nii.gz").array
    seg = np.asarray(Predictor(bundle).segment(image).array)
    assert set(np.unique(seg).tolist()) <= {0, 1, 2, 3} and seg.shape == ref.shape
    for ids in ((1, 2, 3), (2, 3), (3,)):  # each region's DSC, from the written map
        p, r = np.isin(seg, ids), np.isin(ref, ids)
        assert 2 * np.sum(p & r) / (p.sum() + r.sum()) > 0.8, ids


def test_joint_augmentation_step_keeps_class_indices():
    """RandJointAugmentd on its own (a user's script) warps class labels as classes."""
    from medseg.transforms.augment import AugmentConfig
    from medseg.transforms.dictionary import RandJointAugmentd

    masks = np.zeros((6, 32, 32), np.uint8)
    masks[:, :, :16], masks[:, :, 16:] = 1, 3
    images = masks.astype(np.float32)[..., None]
    heavy = AugmentConfig(rotate_prob=1.0, scale_prob=1.0, gamma_prob=0, noise_prob=0, brightness_prob=0,
                          contrast_prob=0)
    out = RandJointAugmentd(config=heavy, seed=0, label_kind="classes")({"image": images, "label": masks})["label"]
    assert set(np.unique(out).tolist()) <= {0, 1, 3} and {1, 3} <= set(np.unique(out).tolist())
    assert "label_kind" in RandJointAugmentd(label_kind="classes").get_config()
    assert "label_kind" not in RandJointAugmentd().get_config()
