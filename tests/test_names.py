"""Issue 21 item 8: a run with one class names it. ``--labels-map liver=5`` is a binary-kind spec
named "liver" (its voxels: id 5; every other id background; it writes 5), "lesion" stays the default
(every nonzero value, writes 1); the check and the evaluation report the class by its name.

Independent answers: hand-written label arrays and their expected maps; the liver voxel count of
patient A from the data set's manifest (41,692, tests/data/README.md); ``--map-labels 5:1,*:0``
applied by :func:`medseg.io.labels.apply_label_map` as the other way to the same labels.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.io.classes import BINARY, BITS, CLASSES, ClassSpec, LabelKind

ROOT = Path(__file__).resolve().parents[1]
PATIENT_A = ROOT / "tests" / "data" / "totalsegmentator" / "example_seg_fast_force_split.nii.gz"


# --- the spec -------------------------------------------------------------------------------------
def test_one_named_class_is_binary_kind_with_its_ids():
    liver = ClassSpec.parse(["liver=5"])
    assert liver.kind is BINARY and liver.is_binary and not liver.any_nonzero
    assert (liver.names, liver.ids, liver.num_classes, liver.num_outputs) == (("liver",), ((5,),), 2, 2)
    assert liver.output_names == ("background", "liver")
    label = np.array([0, 5, 1, 6, 5, 255])
    # The label step: id 5 -> 1, every other id (other organs, 255) -> background.
    np.testing.assert_array_equal(liver.class_indices(label), [0, 1, 0, 0, 1, 0])
    np.testing.assert_array_equal(liver.mask(label, 0), [False, True, False, False, True, False])
    # A prediction writes the class's first id.
    written = liver.label_ids(np.array([0, 1, 1, 0]))
    np.testing.assert_array_equal(written, [0, 5, 5, 0])
    assert written.dtype == np.uint8
    two_ids = ClassSpec.parse(["tumour=2,3"])
    np.testing.assert_array_equal(two_ids.class_indices(np.array([0, 1, 2, 3])), [0, 0, 1, 1])
    np.testing.assert_array_equal(two_ids.label_ids(np.array([0, 1])), [0, 2])


def test_the_default_binary_spec_is_lesion_every_nonzero_value_writing_1():
    lesion = ClassSpec.binary()
    assert lesion.names == ("lesion",) and lesion.any_nonzero and lesion.kind is BINARY
    assert lesion.lesions == ("lesion",)
    label = np.array([0, 1, 3, 255])
    np.testing.assert_array_equal(lesion.class_indices(label), [0, 1, 1, 1])
    np.testing.assert_array_equal(lesion.mask(label, 0), [False, True, True, True])
    np.testing.assert_array_equal(lesion.label_ids(np.array([0, 1, 1])), [0, 1, 1])
    assert ClassSpec.from_dict(lesion.to_dict()) == lesion


def test_kinds_of_specs_and_of_their_saved_form():
    liver = ClassSpec.parse(["liver=5"])
    organs = ClassSpec.parse(["liver=5", "spleen=1"])
    one_region = ClassSpec.from_dataset_json({"labels": {"background": 0, "whole": [1, 2]},
                                              "regions_class_order": [2]})
    assert (organs.kind, one_region.kind) == (CLASSES, BITS)
    for spec in (liver, organs, one_region, ClassSpec.binary()):
        assert LabelKind.of(spec.to_dict()) is spec.kind is LabelKind.of(spec)
    assert LabelKind.of(None) is BINARY
    # The reports' words for them.
    assert (BINARY.count_text(1), CLASSES.count_text(3), BITS.count_text(1), BITS.count_text(2)) == (
        "1 class", "3 classes", "1 region", "2 regions")
    assert (CLASSES.ids_meaning, BITS.ids_meaning) == ("label ids", "each the union of its label ids")


def test_a_one_label_dataset_json_names_it():
    spec = ClassSpec.from_dataset_json({"labels": {"background": 0, "liver": [5, 6]}})
    assert spec.names == ("liver",) and spec.ids == ((5, 6),) and spec.kind is BINARY
    np.testing.assert_array_equal(spec.class_indices(np.array([0, 5, 6, 7])), [0, 1, 1, 0])
    assert ClassSpec.from_dataset_json({"labels": {"background": 0}}) is None


# --- the label step on patient A -----------------------------------------------------------------
def test_liver_label_step_equals_map_labels_5_to_1_on_patient_a():
    """The pipeline's label output of patient A: ``--labels-map liver=5`` (raw ids into a one-class
    plan) and ``--map-labels 5:1,*:0`` (mapped ids into the binary plan) are the same array."""
    from medseg.data.plan import Plan
    from medseg.io import read_volume
    from medseg.io.labels import apply_label_map, parse_label_map
    from medseg.transforms.pipeline import Pipeline

    raw = read_volume(PATIENT_A)
    spec = ClassSpec.parse(["liver=5"])
    named = Pipeline.from_plan(Plan(patch_size=(16, 16), num_classes=spec.num_classes, classes=spec.to_dict()))
    binary = Pipeline.from_plan(Plan(patch_size=(16, 16)))
    mapped = raw.with_array(apply_label_map(np.asarray(raw.array), parse_label_map("5:1,*:0")))
    a = np.asarray(named.preprocess({"label": raw})["label"])
    b = np.asarray(binary.preprocess({"label": mapped})["label"])
    assert a.dtype == b.dtype == np.uint8 and a.shape == b.shape
    np.testing.assert_array_equal(a, b)
    assert int(a.sum()) == 41692  # the manifest's liver voxels: nothing resampled, every liver voxel 1



def test_liver_plan_equals_the_binary_plan_on_patient_a():
    """``make_plan`` on patient A: a one-class named spec fits the same window, patch, spacing and
    (no) enhancement or kept orientation as the binary run on the mapped labels."""
    from medseg.data.plan import make_plan
    from medseg.io import read_volume
    from medseg.io.labels import apply_label_map, parse_label_map

    raw = read_volume(PATIENT_A)
    img = read_volume(PATIENT_A.parent / "example_ct.nii.gz")
    spec = ClassSpec.parse(["liver=5"])
    named = make_plan([(img, raw)], overrides={"classes": spec.to_dict()}, seed=0)
    mapped = raw.with_array(apply_label_map(np.asarray(raw.array), parse_label_map("5:1,*:0")))
    binary = make_plan([(img, mapped)], seed=0)
    assert named.classes == spec.to_dict() and binary.classes is None
    # The name tells which structure it is (issue 23): the liver's contrast phases (at most 130 HU)
    # fit the default window; the unnamed lesion gets none unless asked, and then a window that keeps
    # an arterial vessel (550 HU + 100), as it may be one.
    assert (named.normalization["low_hu"], named.normalization["high_hu"]) == (-1000.0, 400.0)  # the default window
    assert (binary.normalization["low_hu"], binary.normalization["high_hu"]) == (-1000.0, 400.0)
    assert list(named.contrast_phases["targets"]) == ["liver"] and binary.contrast_phases is None
    asked = make_plan([(img, mapped)], overrides={"contrast_phases": "on"}, seed=0)
    assert list(asked.contrast_phases["targets"]) == ["lesion"] and asked.normalization["high_hu"] == 650.0
    off = dict(seed=0, overrides={"contrast_phases": None})
    assert (make_plan([(img, mapped)], **off).normalization
            == make_plan([(img, raw)], **{**off, "overrides": {"classes": spec.to_dict(), "contrast_phases": None}})
            .normalization)
    assert named.enhancement is None and binary.enhancement is None
    assert named.keep_orientation is False and binary.keep_orientation is False
    for key in ("patch_size", "target_spacing_mm", "slice_axis", "orientation", "num_classes", "divisor"):
        assert getattr(named, key) == getattr(binary, key), key


# --- check and evaluation ------------------------------------------------------------------------
def _save(path: Path, array, spacing=(1.0, 1.0, 2.0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.diag([*spacing, 1.0])), str(path))


@pytest.fixture()
def organs(tmp_path):
    """One case: liver (5) a 4x4x2 block (32 voxels), spleen (1) a 2x2x2 cube; the prediction has
    the liver block shifted by one voxel along axis 0 (overlap 24: DSC 2*24/64 = 0.75)."""
    ref = np.zeros((12, 12, 6), np.uint8)
    ref[2:6, 2:6, 1:3] = 5
    ref[8:10, 8:10, 3:5] = 1
    pred = np.zeros_like(ref)
    pred[3:7, 2:6, 1:3] = 5
    _save(tmp_path / "images" / "c1.nii.gz", np.ones(ref.shape, np.float32))
    _save(tmp_path / "labels" / "c1.nii.gz", ref)
    _save(tmp_path / "pred" / "c1.nii.gz", pred)
    return tmp_path


def test_check_names_the_one_class(organs, capsys):
    from medseg.cli import check as check_cli

    code = check_cli.main(["--images", str(organs / "images"), "--labels", str(organs / "labels"),
                           "--labels-map", "liver=5"])
    out = capsys.readouterr().out
    assert code == 0 and "lesion" not in out
    assert "class ids (from --labels-map): liver=5" in out
    rows = [line.split() for line in out.splitlines()]
    # 32 voxels of 2 mm^3 = 0.064 mL, one component, slices 1 and 2 of 6.
    assert ["c1", "liver", "32", "0.064", "1", "2/6", "(33%)"] in rows
    assert "1 label ids belong to no class and count as background: 1 (8 voxels in 1 case)" in out


def test_eval_names_the_one_class(organs, capsys):
    from medseg.cli.evaluate import main

    out_dir = organs / "eval"
    assert main(["--pred", str(organs / "pred"), "--ref", str(organs / "labels"), "--out", str(out_dir),
                 "--labels-map", "liver=5", "--quiet", "--no-figures"]) == 0
    printed = capsys.readouterr().out
    assert "lesion" not in printed.split("report:")[0]
    table = [line.split() for line in printed.splitlines()]
    assert table[0][:3] == ["case", "class", "DSC"] and table[1][:3] == ["c1", "liver", "0.750"]
    assert any(line.startswith("liver: mean DSC 0.7500") for line in printed.splitlines())
    row = next(csv.DictReader((out_dir / "metrics.csv").open()))
    assert (row["class"], float(row["dsc"]), float(row["vol_ref_ml"])) == ("liver", 0.75, 0.064)
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["classes"] == {"liver": {"ids": [5], "lesion_wise": False}}
    assert "1 class (label ids)" in (out_dir / "report.html").read_text()


def test_liver_pipeline_equals_the_binary_pipeline_but_for_its_label_step():
    """The two plans of patient A give the same steps with the same arguments (the label kind of
    the random steps included: binary), except the label step, which maps the liver's id 5 to 1."""
    from medseg.data.plan import make_plan
    from medseg.io import read_volume
    from medseg.io.labels import apply_label_map, parse_label_map
    from medseg.transforms.pipeline import Pipeline

    raw = read_volume(PATIENT_A)
    img = read_volume(PATIENT_A.parent / "example_ct.nii.gz")
    spec = ClassSpec.parse(["liver=5"])
    named = Pipeline.from_plan(make_plan([(img, raw)], overrides={"classes": spec.to_dict()}, seed=0))
    mapped = raw.with_array(apply_label_map(np.asarray(raw.array), parse_label_map("5:1,*:0")))
    binary = Pipeline.from_plan(make_plan([(img, mapped)], seed=0))
    assert named.label_kind is BINARY and binary.label_kind is BINARY
    a, b = named.to_config()["transforms"], binary.to_config()["transforms"]
    # Since issue 23 the liver's name also brings its contrast phases (the unnamed class has none).
    assert [t["name"] for t in a if t["name"] != "RandContrastPhased"] == [t["name"] for t in b]
    assert "RandContrastPhased" in [t["name"] for t in a]
    differ = [t["name"] for t, u in zip([t for t in a if t["name"] != "RandContrastPhased"], b) if t != u]
    assert differ == ["LabelClassesd"], differ
