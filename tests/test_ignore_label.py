"""Partial labels (``--ignore-label V``): the label step, warps, sampling, losses and metrics, the
fingerprint, and the commands medseg-check, medseg-train and medseg-eval.

The loss tests are hand-built: a label map whose ignore value covers some columns gives exactly
the loss of the same map (and predictions) cropped to its labelled columns, the independent
answer. The command-line tests run the real commands on small synthetic NIfTI volumes.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.errors import InputError
from medseg.io.classes import BINARY, BITS, CLASSES, IGNORE_INDEX

from test_train import TINY, synthetic_dataset

V = 9  # the ignore value of the label maps below


# --- the label step and the kinds -------------------------------------------------------------------
def test_sentinel_is_one_value_everywhere():
    from medseg.losses import _overlap

    assert _overlap.IGNORE_INDEX == IGNORE_INDEX == 255


def test_label_step_marks_ignored_voxels_before_the_classes():
    from medseg.io.classes import ClassSpec
    from medseg.transforms.planspace import label_classes

    lab = np.array([[0, 1, V], [5, V, 2]])
    assert label_classes(lab, 2, ignore=V).tolist() == [[0, 1, 255], [1, 255, 1]]
    spec = ClassSpec.parse(["liver=5", "spleen=1"])
    assert label_classes(lab, 3, classes=spec, ignore=V).tolist() == [[0, 2, 255], [1, 255, 0]]
    regions = ClassSpec.parse(["whole=1,2", "core=2"])
    assert label_classes(lab, 3, classes=regions, ignore=V).tolist() == [[0, 1, 255], [0, 255, 3]]
    # Without an ignore value V is a label value like any other (binary: lesion).
    assert label_classes(lab, 2).tolist() == [[0, 1, 1], [1, 1, 1]]


def test_eight_regions_take_no_ignore_value():
    from medseg.transforms.dictionary import LabelClassesd

    classes = {"names": [f"r{i}" for i in range(8)], "ids": [[i + 1] for i in range(8)], "regions": True,
               "region_order": list(range(1, 9))}
    LabelClassesd(num_classes=9, classes=classes)
    with pytest.raises(ValueError, match="at most 7 nested regions with an ignore value"):
        LabelClassesd(num_classes=9, classes=classes, ignore=V)


@pytest.mark.parametrize("kind", [BINARY, CLASSES, BITS])
def test_warp_carries_the_ignore_mask_like_a_label(kind):
    label = np.zeros((6, 6), np.uint8)
    label[1:3, 1:3] = 1
    label[:, 4:] = IGNORE_INDEX
    shift = lambda plane: np.roll(plane, 1, axis=0)  # noqa: E731  (an exact "warp")
    out = kind.warp_labelled(shift, label)
    assert (out == IGNORE_INDEX).sum() == 12 and (out[:, 4:] == IGNORE_INDEX).all()
    assert np.array_equal(out[:, :4] > 0, np.roll(label, 1, axis=0)[:, :4] > 0)
    plain = label.copy()
    plain[:, 4:] = 0  # no ignore value: the kind's own warp, unchanged
    assert np.array_equal(kind.warp_labelled(shift, plain), kind.warp(shift, plain))


def test_sampling_index_leaves_ignored_voxels_out():
    from medseg.transforms.sampling import build_index

    label = np.zeros((6, 16, 16), np.uint8)
    label[1, 4:8, 4:8] = 1
    label[3:] = IGNORE_INDEX
    index = build_index(label, np.ones(label.shape, bool), label_kind=BINARY, max_body=500)
    assert index.n_components == 1 and set(index.coords[:, 0]) == {1}
    assert index.body.shape[0] > 0 and set(np.unique(index.body[:, 0])) <= {0, 1, 2}


# --- losses and metrics: the loss of the labelled part alone ---------------------------------------
def _case(seed: int = 0, classes: int = 3):
    rng = np.random.default_rng(seed)
    probs = rng.random((2, 8, 8, classes)).astype(np.float32)
    probs /= probs.sum(-1, keepdims=True)
    label = rng.integers(0, classes, (2, 8, 8)).astype(np.float32)
    label[0, 0, :] = 1  # every class present in the kept part
    partial = label.copy()
    partial[:, :, 5:] = IGNORE_INDEX
    return probs, label, partial


@pytest.mark.parametrize("name", ["DiceCELoss", "DiceLoss", "GeneralizedDiceLoss", "FocalTverskyLoss", "batch"])
def test_loss_with_ignore_equals_loss_of_the_cropped_map(name):
    import medseg.losses as losses

    loss = losses.DiceCELoss(batch_dice=True) if name == "batch" else getattr(losses, name)()
    probs, label, partial = _case()
    ignored = np.asarray(loss.call(partial, probs))
    cropped = np.asarray(loss.call(label[:, :, :5], probs[:, :, :5]))
    np.testing.assert_allclose(ignored, cropped, rtol=1e-6, atol=1e-7)
    assert not np.allclose(ignored, np.asarray(loss.call(label, probs)))  # the ignored part did count before


def test_ce_class_weights_keep_their_rule_under_ignore():
    from medseg.losses import DiceCELoss

    probs, label, partial = _case(1)
    loss = DiceCELoss(ce_class_weights=[1.0, 4.0, 9.0])
    np.testing.assert_allclose(np.asarray(loss.call(partial, probs)),
                               np.asarray(loss.call(label[:, :, :5], probs[:, :, :5])), rtol=1e-6)


def test_all_ignored_sample_has_zero_loss():
    from medseg.losses import DiceCELoss

    probs, label, partial = _case(2)
    partial[1] = IGNORE_INDEX
    values = np.asarray(DiceCELoss().call(partial, probs))
    assert values[1] == 0.0 and np.isfinite(values[0])


def test_region_loss_with_ignore_equals_loss_of_the_cropped_map():
    from medseg.losses.regions import RegionDiceBCELoss, multi_hot_from_bits

    rng = np.random.default_rng(3)
    bits = rng.integers(0, 4, (2, 8, 8))
    probs = rng.random((2, 8, 8, 2)).astype(np.float32)
    partial = bits.copy()
    partial[:, :, 5:] = IGNORE_INDEX
    loss = RegionDiceBCELoss()
    np.testing.assert_allclose(np.asarray(loss.call(multi_hot_from_bits(partial, 2), probs)),
                               np.asarray(loss.call(multi_hot_from_bits(bits[:, :, :5], 2), probs[:, :, :5])),
                               rtol=1e-6)


def test_training_dice_counts_labelled_pixels_only():
    from medseg.losses.metrics import ForegroundDice, MeanClassDice

    probs, label, partial = _case(4)
    for make in (lambda: ForegroundDice(class_id=2), lambda: MeanClassDice(3)):
        a, b = make(), make()
        a.update_state(partial, probs)
        b.update_state(label[:, :, :5], probs[:, :, :5])
        assert float(a.result()) == pytest.approx(float(b.result()), abs=1e-7)


_DISTRIBUTED = """
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import numpy as np
from medseg.losses import DiceCELoss
rng = np.random.default_rng(5)
probs = rng.random((4, 8, 8, 3)).astype(np.float32)
probs /= probs.sum(-1, keepdims=True)
label = rng.integers(0, 3, (4, 8, 8)).astype(np.float32)
label[:, :, 5:] = 255
label[3] = 255  # one sample without labelled pixel
out = {}
for batch in (False, True):
    loss = DiceCELoss(batch_dice=batch)
    single = float(np.mean(np.asarray(loss.call(label, probs))))
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    ds = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((label, probs)).batch(4))

    @tf.function
    def step(y, p):
        # Keras' sum_over_batch_size under a strategy: each replica's sum / the global batch.
        return strategy.run(lambda yy, pp: tf.reduce_sum(loss.call(yy, pp)) / 4.0, args=(y, p))

    y, p = next(iter(ds))
    out[str(batch)] = [single, float(strategy.reduce(tf.distribute.ReduceOp.SUM, step(y, p), axis=None))]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_ignore_under_tf_distribute_matches_one_device():
    """Two replicas (2 logical CPUs, in a fresh process): the single-device loss, per-sample and
    with the batch Dice pooled across the replicas."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _DISTRIBUTED], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for single, replicas in json.loads(done.stdout.strip().splitlines()[-1]).values():
        assert replicas == pytest.approx(single, rel=1e-6)


# --- the plan's fingerprint ----------------------------------------------------------------------------
def test_fingerprint_counts_labelled_voxels_only(tmp_path):
    from medseg.data.plan import make_plan
    from medseg.io import Volume

    rng = np.random.default_rng(0)
    image = rng.normal(0, 1, (32, 32, 6)).astype(np.float32) + 100
    label = np.zeros(image.shape, np.int16)
    label[8:16, 8:16, :] = 1
    partial = label.copy()
    partial[:, :, 3:] = V
    pair = (Volume(image, np.eye(4), "a"), Volume(partial, np.eye(4), "a"))
    plan = make_plan([pair], overrides={"ignore_label": V})
    entry = plan.fingerprint["cases"][0]
    assert entry["labelled_fraction"] == pytest.approx(0.5)
    assert entry["lesion"]["voxels"] == 8 * 8 * 3  # V is no lesion, though it is nonzero
    assert entry["lesion"]["fraction"] == pytest.approx(8 * 8 * 3 / (32 * 32 * 3))
    assert plan.ignore_label == V and plan.to_dict()["ignore_label"] == V
    assert "ignore_label" not in make_plan([(pair[0], Volume(label, np.eye(4), "a"))]).to_dict()


# --- the commands --------------------------------------------------------------------------------------
def partial_dataset(root: Path, all_ignore: bool = False) -> tuple[Path, Path]:
    """The synthetic lesion dataset with case0's label unlabelled (V) outside its lesion's slices
    and in a band beside the lesion."""
    images, labels = synthetic_dataset(root, n_cases=3)
    path = labels / "case0.nii.gz"
    img = nib.load(path)
    lab = np.asarray(img.dataobj).astype(np.uint8)
    keep = np.any(lab, axis=(0, 1))
    lab[:, :, ~keep] = V
    lab[40:] = V  # and an unlabelled region beside the lesion in the labelled slices
    if all_ignore:
        lab[:] = V
    nib.save(nib.Nifti1Image(lab, img.affine), path)
    return images, labels


def test_check_reports_labelled_fraction_and_slices(tmp_path, capsys):
    from medseg.cli.check import main

    images, labels = partial_dataset(tmp_path)
    assert main(["--images", str(images), "--labels", str(labels), "--ignore-label", str(V), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    case0 = report["cases"]["case0"]
    lab = np.asarray(nib.load(labels / "case0.nii.gz").dataobj)
    assert case0["labelled_fraction"] == pytest.approx(float(np.mean(lab != V)))
    assert case0["labelled_slices"] == int(np.any(lab != V, axis=(0, 1)).sum()) < case0["n_slices"] == 8
    assert report["cases"]["case1"]["labelled_fraction"] == 1.0 and report["ignore_label"] == V
    # Without the flag V is a label value outside {0, 1}: fatal.
    assert main(["--images", str(images), "--labels", str(labels)]) == 1
    assert "outside {0, 1}" in capsys.readouterr().out
    # The text report says which voxels are labelled.
    assert main(["--images", str(images), "--labels", str(labels), "--ignore-label", str(V)]) == 0
    assert "labelled voxels (value 9 = unlabelled" in capsys.readouterr().out


def test_ignore_value_survives_the_star_of_map_labels(tmp_path, capsys):
    from medseg.cli.check import main

    images, labels = partial_dataset(tmp_path)
    args = ["--images", str(images), "--labels", str(labels), "--ignore-label", str(V), "--json"]
    assert main(args + ["--map-labels", "1:1,*:0"]) == 0
    assert json.loads(capsys.readouterr().out)["cases"]["case0"]["labelled_fraction"] < 1.0
    assert main(args + ["--map-labels", f"{V}:1"]) == 2
    assert f"leaving the ignore value {V}" in capsys.readouterr().err


def test_all_ignore_label_is_refused_like_an_empty_one(tmp_path, capsys):
    from medseg.cli.check import main as check
    from medseg.cli.train import main as train

    images, labels = partial_dataset(tmp_path, all_ignore=True)
    assert check(["--images", str(images), "--labels", str(labels), "--ignore-label", str(V)]) == 1
    out = capsys.readouterr().out
    assert "FATAL" in out and f"only the ignore value {V}" in out
    code = train(["--images", str(images), "--labels", str(labels), "--ignore-label", str(V),
                  "--out", str(tmp_path / "runs"), "--quiet"])
    assert code == 2 and f"only the ignore value {V}" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_dataset_json_ignore_label(tmp_path):
    from medseg.io.classes import ClassSpec

    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"labels": {"background": 0, "liver": 1, "spleen": 2, "ignore": 3}}))
    assert ClassSpec.dataset_ignore_label(path) == 3
    assert ClassSpec.from_dataset_json(path).names == ("liver", "spleen")
    path.write_text(json.dumps({"labels": {"background": 0, "ignore": [3, 4]}}))
    with pytest.raises(InputError, match="ignore"):
        ClassSpec.dataset_ignore_label(path)


@pytest.mark.slow
def test_train_and_eval_with_ignore_label(tmp_path, capsys):
    """medseg-train --ignore-label trains (validation on labelled voxels only), medseg-eval scores
    labelled voxels only and says so in the terminal, CSV, JSON and HTML."""
    from medseg.cli.evaluate import main as evaluate
    from medseg.cli.train import main as train

    images, labels = partial_dataset(tmp_path)
    args = ["--images", str(images), "--labels", str(labels), "--ignore-label", str(V), "--run-dir",
            str(tmp_path / "run"), "--filters", "4", "8", "16", "--depth", "2", "--patch-size", "32", "32",
            "--batch-size", "2", "--steps-per-epoch", "2", "--epochs", "1", "--precision", "float32",
            "--run-eagerly", "--val-fraction", "0"]
    assert train(args) == 0
    out = capsys.readouterr().out
    assert f"label value {V} = unlabelled" in out
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["ignore_label"] == V
    # The diagnostics judge the labelled pixels of the first batch: no "label values" warning.
    warnings = json.loads((tmp_path / "run" / "warnings.json").read_text())["warnings"]
    assert not [w for w in warnings if w.get("kind") == "labels"], warnings
    bundle = json.loads((tmp_path / "run" / "bundle.json").read_text())
    label_step = next(t for t in bundle["pipeline"]["transforms"] if t["name"] == "LabelClassesd")
    assert label_step["args"]["ignore"] == V

    # medseg-eval: a prediction perfect on the labelled voxels and wrong on the unlabelled ones.
    ref = nib.load(labels / "case0.nii.gz")
    lab = np.asarray(ref.dataobj)
    pred = np.where(lab == V, 1, lab).astype(np.uint8)
    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    nib.save(nib.Nifti1Image(pred, ref.affine), tmp_path / "pred" / "case0.nii.gz")
    nib.save(ref, tmp_path / "ref" / "case0.nii.gz")
    assert evaluate(["--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "--out",
                     str(tmp_path / "eval"), "--ignore-label", str(V), "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert "labelled voxels only" in out and "labelled" in out.splitlines()[1]
    csv = (tmp_path / "eval" / "metrics.csv").read_text().splitlines()
    header, row = csv[0].split(","), csv[1].split(",")
    assert "labelled_fraction" in header
    assert float(row[header.index("dsc")]) == 1.0
    assert float(row[header.index("labelled_fraction")]) == pytest.approx(float(np.mean(lab != V)))
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["options"]["ignore_label"] == V and summary["options"]["scored"] == "labelled voxels only"
    assert "labelled voxels only" in (tmp_path / "eval" / "report.html").read_text()
    # Without the flag the unlabelled voxels are label values: refused (outside {0, 1}).
    assert evaluate(["--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "--out",
                     str(tmp_path / "eval2"), "--no-figures"]) == 2
    # An all-ignore reference is refused.
    nib.save(nib.Nifti1Image(np.full(lab.shape, V, np.uint8), ref.affine), tmp_path / "ref" / "case0.nii.gz")
    assert evaluate(["--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "--out",
                     str(tmp_path / "eval3"), "--ignore-label", str(V), "--no-figures"]) == 2
    assert f"only the ignore value {V}" in capsys.readouterr().err


def test_component_rules_on_partial_labels_run_before_the_unlabelled_voxels_are_masked():
    """One organ through 5 slices, labelled on slices 0 and 4 only: masking first would make two
    components and 'keep the largest' would drop one labelled slab (DSC 2/3); the rules run on the
    whole prediction, as inference applies them, so both DSCs are 1."""
    from medseg.train.validation import score_case

    pred = np.zeros((10, 10, 5), bool)
    pred[2:8, 2:8, :] = True
    pred[2:8, 2:5, 4] = False           # slab 4 smaller than slab 0: masking first would keep slab 0 only
    labelled = np.zeros(pred.shape, bool)
    labelled[..., [0, 4]] = True
    ref = pred & labelled
    row = score_case(pred, ref, (1.0, 1.0, 1.0), min_component_ml=0.001, labelled=labelled)
    assert row["dsc"] == 1.0 and row["dsc_largest_component"] == 1.0 and row["dsc_without_small"] == 1.0
    masked_first = score_case(pred & labelled, ref, (1.0, 1.0, 1.0))
    assert masked_first["dsc_largest_component"] == pytest.approx(2 * 36 / (36 + 54))
