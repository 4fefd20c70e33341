"""medseg-check per class: hand-counted voxels, components and slices of synthetic label maps."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.cli import check as check_cli
from medseg.data.check import check_dataset, class_statistics
from medseg.io import discover_cases
from medseg.io.classes import ClassSpec

SHAPE = (12, 12, 8)
# Spacing 1 x 1 x 2 mm: the slice axis is 2 (largest spacing), a voxel is 2 mm^3 = 0.002 mL.
AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])
VOXEL_ML = 0.002


def _save(path: Path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), AFFINE), str(path))


def _c1():
    """liver (id 1): two 2x2x2 cubes, slices 1-2 and 5-6; tumour (ids 2, 3): 3x2 in slice 3 (id 2)
    under 3x2 in slice 4 (id 3), one component; unlisted: id 7 x 5, id 9 x 2."""
    lab = np.zeros(SHAPE, np.uint8)
    lab[1:3, 1:3, 1:3] = 1
    lab[6:8, 6:8, 5:7] = 1
    lab[8:11, 1:3, 3] = 2
    lab[8:11, 1:3, 4] = 3
    lab[0, 6:11, 7] = 7
    lab[11, 10:12, 0] = 9
    return lab


def _c2():
    """liver: two voxels touching by a corner only (one 26-connected component, slices 0 and 1);
    no tumour; id 7 x 3."""
    lab = np.zeros(SHAPE, np.uint8)
    lab[5, 5, 0] = 1
    lab[6, 6, 1] = 1
    lab[0, 0:3, 7] = 7
    return lab


@pytest.fixture()
def dataset(tmp_path):
    img = np.random.default_rng(0).normal(0, 1, SHAPE).astype(np.float32)
    for case, lab in (("c1", _c1()), ("c2", _c2())):
        _save(tmp_path / "images" / f"{case}.nii.gz", img)
        _save(tmp_path / "labels" / f"{case}.nii.gz", lab)
    return tmp_path


SPEC = ClassSpec.parse(["liver=1", "tumour=2,3"])


def _args(root: Path, *extra: str) -> list[str]:
    return ["--images", str(root / "images"), "--labels", str(root / "labels"), *extra]


def test_class_statistics_hand_counted():
    s = class_statistics(_c1(), (1.0, 1.0, 2.0), SPEC)
    assert (s["slice_axis"], s["n_slices"], s["n_voxels"]) == (2, 8, 12 * 12 * 8)
    liver, tumour = s["classes"]["liver"], s["classes"]["tumour"]
    assert (liver["voxels"], liver["components"], liver["slices"]) == (16, 2, 4)
    assert liver["volume_ml"] == pytest.approx(16 * VOXEL_ML)
    assert liver["slice_fraction"] == pytest.approx(4 / 8)
    assert (tumour["voxels"], tumour["components"], tumour["slices"]) == (12, 1, 2)
    assert s["unlisted_ids"] == {7: 5, 9: 2}
    c2 = class_statistics(_c2(), (1.0, 1.0, 2.0), SPEC)["classes"]
    assert (c2["liver"]["voxels"], c2["liver"]["components"], c2["liver"]["slices"]) == (2, 1, 2)
    assert c2["tumour"] == {"voxels": 0, "volume_ml": 0.0, "components": 0, "slices": 0, "slice_fraction": 0.0}


def test_absent_class_and_unlisted_ids_are_warned(dataset):
    report = check_dataset(discover_cases(dataset / "images", dataset / "labels"), classes=SPEC,
                           classes_source="--labels-map")
    assert not report.fatal
    assert [p.message for p in report.warnings] == [
        "class 'tumour' (label ids 2, 3) is absent from 1 of 2 labels: c2",
        "2 label ids belong to no class and count as background: 7 (8 voxels in 2 cases), 9 (2 voxels in 1 case)",
    ]
    t = report.totals
    assert t["classes"]["liver"] | {"volume_ml": 0} == {
        "voxels": 18, "volume_ml": 0, "components": 3, "slices": 6, "n_slices": 16, "n_present": 2,
        "absent_cases": []}
    assert t["classes"]["tumour"]["absent_cases"] == ["c2"] and t["classes"]["tumour"]["n_present"] == 1
    assert t["unlisted_ids"] == {7: {"voxels": 8, "cases": ["c1", "c2"]}, 9: {"voxels": 2, "cases": ["c1"]}}
    # No any-nonzero lesion statistics in the per-class report: no "lesion_count" anywhere.
    assert "lesion_count" not in report.stats["c1"] and "lesion_count" not in t


def test_class_absent_everywhere_is_fatal(dataset, capsys):
    code = check_cli.main(_args(dataset, "--labels-map", "liver=1", "spleen=4"))
    out = capsys.readouterr().out
    assert code == 1
    fatal = next(line for line in out.splitlines() if line.strip().startswith("FATAL"))
    assert ("class 'spleen' (label ids 4) is absent from every one of the 2 valid labels: there is nothing "
            "to learn for it; check its ids; ids found in no class: 2, 3, 7, 9") in fatal


def test_cli_text_table_and_json(dataset, capsys):
    assert check_cli.main(_args(dataset, "--labels-map", "liver=1", "tumour=2,3")) == 0
    out = capsys.readouterr().out
    assert "class ids (from --labels-map): liver=1, tumour=2,3" in out
    rows = [line.split() for line in out.splitlines()]
    assert ["c1", "liver", "16", "0.032", "2", "4/8", "(50%)"] in rows
    assert ["c1", "tumour", "12", "0.024", "1", "2/8", "(25%)"] in rows
    assert ["c2", "tumour", "0", "0.000", "0", "0/8", "(0%)"] in rows
    assert ["total", "liver", "18", "0.036", "3", "6/16", "(38%)", "in", "2/2", "labels"] in rows
    assert "WARNING  (dataset)  class 'tumour' (label ids 2, 3) is absent from 1 of 2 labels: c2" in out
    assert "result: OK (2 warnings)" in out

    assert check_cli.main(_args(dataset, "--labels-map", "liver=1", "tumour=2,3", "--json")) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["classes"] == {"names": ["liver", "tumour"], "ids": [[1], [2, 3]], "source": "--labels-map"}
    assert data["cases"]["c1"]["classes"]["liver"]["components"] == 2
    assert data["cases"]["c1"]["unlisted_ids"] == {"7": 5, "9": 2}
    assert data["totals"]["classes"]["tumour"]["absent_cases"] == ["c2"]


def test_map_labels_applies_before_the_classes(dataset, capsys):
    # 9 -> 0 and 7 -> 3: id 7 joins the tumour, no id is left outside the classes.
    check_cli.main(_args(dataset, "--labels-map", "liver=1", "tumour=2,3", "--map-labels", "9:0,7:3", "--json"))
    data = json.loads(capsys.readouterr().out)
    assert data["totals"]["unlisted_ids"] == {}
    assert data["cases"]["c2"]["classes"]["tumour"]["voxels"] == 3
    assert [p["message"] for p in data["problems"]] == []


def test_dataset_json_regions_found_in_the_parent_folder(tmp_path, capsys):
    # whole = ids {1, 2}, core = id 2 (nested regions, nnU-Net regions_class_order).
    lab = np.zeros(SHAPE, np.uint8)
    lab[0:4, 0:4, 0:2] = 1          # 32 voxels, slices 0-1
    lab[1:3, 1:3, 1] = 2            # 4 of them are core
    lab[9, 9, 6] = 2                # a separate core voxel, slice 6
    _save(tmp_path / "images" / "r1.nii.gz", np.ones(SHAPE, np.float32) + lab)
    _save(tmp_path / "labels" / "r1.nii.gz", lab)
    (tmp_path / "dataset.json").write_text(json.dumps({
        "labels": {"background": 0, "whole": [1, 2], "core": 2}, "regions_class_order": [1, 2]}))
    assert check_cli.main(_args(tmp_path, "--json")) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["classes"]["regions"] is True and data["classes"]["source"] == str(tmp_path / "dataset.json")
    regions = data["cases"]["r1"]["classes"]
    assert {k: regions["whole"][k] for k in ("voxels", "components", "slices")} == {
        "voxels": 33, "components": 2, "slices": 3}
    assert {k: regions["core"][k] for k in ("voxels", "components", "slices")} == {
        "voxels": 5, "components": 2, "slices": 2}
    assert data["problems"] == []
    assert check_cli.main(_args(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "region ids (from" in out and "whole=1,2, core=2" in out
    assert ["r1", "core", "5", "0.010", "2", "2/8", "(25%)"] in [line.split() for line in out.splitlines()]


def test_binary_spec_keeps_the_binary_report_and_one_class_dataset_json_names_it(dataset, capsys):
    cases = discover_cases(dataset / "images", dataset / "labels")
    binary = check_dataset(cases).to_dict()
    assert check_dataset(cases, classes=ClassSpec.binary()).to_dict() == binary
    assert "classes" not in binary and binary["fatal"]        # ids 2, 3, 7, 9 are outside {0, 1}
    # One foreground label in dataset.json: that class, by its name; its id 1 is the class, the
    # other ids are background (a warning), as for several classes.
    (dataset / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1}}))
    assert check_cli.main(_args(dataset)) == 0
    out = capsys.readouterr().out
    assert f"class ids (from {dataset / 'dataset.json'}): liver=1" in out and "lesion" not in out
    rows = [line.split() for line in out.splitlines()]
    # liver of c1: two 2x2x2 cubes (16 voxels, 2 components, slices 1, 2, 5, 6); c2: two voxels
    # touching by a corner (1 component, slices 0, 1).
    assert ["c1", "liver", "16", "0.032", "2", "4/8", "(50%)"] in rows
    assert ["c2", "liver", "2", "0.004", "1", "2/8", "(25%)"] in rows
    assert ["total", "liver", "18", "0.036", "3", "6/16", "(38%)", "in", "2/2", "labels"] in rows
    assert ("4 label ids belong to no class and count as background: 2 (6 voxels in 1 case), "
            "3 (6 voxels in 1 case), 7 (8 voxels in 2 cases), 9 (2 voxels in 1 case)") in out


def test_explicit_dataset_json_and_class_errors(dataset, tmp_path, capsys):
    spec_file = tmp_path / "elsewhere.json"
    spec_file.write_text(json.dumps({"labels": {"background": 0, "liver": 1, "tumour": [2, 3]}}))
    assert check_cli.main(_args(dataset, "--dataset-json", str(spec_file))) == 0
    assert f"class ids (from {spec_file}): liver=1, tumour=2,3" in capsys.readouterr().out
    # Bad entries and both sources at once: usage errors (exit 2), one line.
    assert check_cli.main(_args(dataset, "--labels-map", "liver")) == 2
    assert "expected --labels-map entries NAME=IDS" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        check_cli.main(_args(dataset, "--labels-map", "liver=1", "--dataset-json", str(spec_file)))
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_interpolated_labels_stay_fatal_with_classes(tmp_path):
    lab = _c1().astype(np.float32)
    lab[0, 0, 0] = 0.5
    _save(tmp_path / "images" / "c1.nii.gz", np.zeros(SHAPE, np.float32) + 1)
    _save(tmp_path / "labels" / "c1.nii.gz", lab)
    report = check_dataset(discover_cases(tmp_path / "images", tmp_path / "labels"), classes=SPEC)
    assert [p.message[:45] for p in report.fatal_problems] == ["label has 1 non-integer voxels (values such a"]
    assert "classes" not in report.stats["c1"]
