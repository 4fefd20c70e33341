"""Dataset check and medseg-check: real lesion masks (MANIFEST facts), synthetic broken datasets, CLI."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medseg.cli import check as check_cli
from medseg.cli._common import error_line, run_command
from medseg.data.check import (
    FATAL,
    WARNING,
    apply_label_map,
    check_dataset,
    lesion_statistics,
    parse_label_map,
)
from medseg.errors import DatasetError, InputError
from medseg.io import discover_cases, read_volume, write_volume
from medseg.transforms.slicing import largest_spacing_axis

NRRD = Path(__file__).parent / "data" / "nrrd"

# Independent facts from the data MANIFEST (computed there with SimpleITK).
MANIFEST = {
    "brain1": dict(voxels=4137, ml=16.4, components=2, slices=(7, 25), fg=0.00253),
    "brain2": dict(voxels=453, ml=1.8, components=1, slices=(3, 23), fg=0.00030),
    "breast1": dict(voxels=143, ml=0.13, components=1, slices=(3, 21), fg=0.00126),
}


@pytest.fixture(scope="module")
def real_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    for case in MANIFEST:
        (root / "images" / f"{case}.nrrd").symlink_to(NRRD / f"{case}_image.nrrd")
        (root / "labels" / f"{case}.nrrd").symlink_to(NRRD / f"{case}_label.nrrd")
    return root


@pytest.fixture(scope="module")
def real_report(real_dataset):
    return check_dataset(discover_cases(real_dataset / "images", real_dataset / "labels"))


def test_real_cases_have_no_problem_and_manifest_statistics(real_report):
    assert real_report.problems == []
    assert not real_report.fatal
    for case, facts in MANIFEST.items():
        s = real_report.stats[case]
        assert s["lesion_voxels"] == facts["voxels"]
        assert s["lesion_volume_ml"] == pytest.approx(facts["ml"], abs=0.05 if facts["ml"] > 1 else 0.005)
        assert s["lesion_count"] == facts["components"]
        assert (s["slices_with_lesion"], s["n_slices"]) == facts["slices"]
        assert s["slice_axis"] == 2
        assert s["foreground_fraction"] == pytest.approx(facts["fg"], abs=5e-6)
    t = real_report.totals
    assert t["lesion_count"] == 4
    assert t["slices_with_lesion"] == 13 and t["n_slices"] == 69
    assert t["n_with_lesion"] == 3 and t["n_empty_labels"] == 0


def test_component_count_agrees_with_simpleitk(real_report):
    # SimpleITK's fully connected (26-neighbour) connected components as second oracle, with sizes.
    img = sitk.ReadImage(str(NRRD / "brain1_label.nrrd"))
    cc = sitk.ConnectedComponent(img != 0, True)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(cc)
    sizes_ml = sorted((stats.GetPhysicalSize(lab) / 1000 for lab in stats.GetLabels()), reverse=True)
    np.testing.assert_allclose(real_report.stats["brain1"]["lesion_volumes_ml"], sizes_ml, rtol=1e-9)


def test_lesion_statistics_hand_computed():
    mask = np.zeros((10, 10, 6), bool)
    mask[1:3, 1:3, 1:3] = True  # 8 voxels
    mask[3, 3, 3] = True  # touches the cube only by a corner: same lesion with 26-connectivity
    mask[7:9, 7, 5] = True  # 2 voxels, separate
    s = lesion_statistics(mask, (0.5, 0.5, 2.0))
    assert s["lesion_count"] == 2
    assert s["lesion_voxels"] == 11
    assert s["lesion_volume_ml"] == pytest.approx(11 * 0.5 / 1000)
    assert s["lesion_volumes_ml"] == pytest.approx([9 * 0.5 / 1000, 2 * 0.5 / 1000])
    assert (s["slice_axis"], s["slices_with_lesion"], s["n_slices"]) == (2, 4, 6)  # slices 1, 2, 3, 5
    assert s["slice_fraction"] == pytest.approx(4 / 6)
    assert s["foreground_fraction"] == pytest.approx(11 / 600)
    empty = lesion_statistics(np.zeros((4, 4, 4)), (1, 1, 1))
    assert (empty["lesion_count"], empty["lesion_volume_ml"], empty["lesion_volumes_ml"], empty["slices_with_lesion"]) == (0, 0.0, [], 0)


@pytest.mark.parametrize("spacing, axis", [((0.8, 0.8, 5), 2), ((5, 0.8, 0.8), 0), ((1, 3, 1), 1), ((1, 1, 1), 2), ((2, 2, 1), 1)])
def test_slice_axis_is_the_largest_spacing(spacing, axis):
    assert largest_spacing_axis(spacing) == axis


def test_parse_and_apply_label_map():
    assert parse_label_map("255:1") == {255: 1}
    assert parse_label_map(" 1:0, 2:1 ") == {1: 0, 2: 1}
    np.testing.assert_array_equal(apply_label_map(np.array([0, 1, 2, 255]), {1: 0, 2: 1, 255: 1}), [0, 0, 1, 1])
    for bad in ["255", "a:1", "", "1:2:3"]:
        with pytest.raises(InputError, match=r"expected --map-labels as FROM:TO pairs like '255:1'"):
            parse_label_map(bad)
    with pytest.raises(InputError, match=r"found 1 mapped twice in '1:0,1:1'"):
        parse_label_map("1:0,1:1")
    # "*" stands for every other value: one organ out of a multi-organ map
    assert parse_label_map("5:1,*:0") == {5: 1, "*": 0}
    labels = np.array([0, 5, 3, 5, 117, 1], dtype=np.uint8)
    np.testing.assert_array_equal(apply_label_map(labels, parse_label_map("5:1,*:0")), [0, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(labels, [0, 5, 3, 5, 117, 1])  # input untouched
    np.testing.assert_array_equal(apply_label_map(labels, {"*": 1, 0: 0}), [0, 1, 1, 1, 1, 1])


# --- synthetic broken datasets -------------------------------------------------------------------

SHAPE = (16, 16, 8)
AFFINE = np.diag([0.8, 0.8, 3.0, 1.0])


def _save(path: Path, array, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))


def _lesion(value=1, dtype=np.uint8):
    lab = np.zeros(SHAPE, dtype)
    lab[4:8, 4:8, 2:4] = value
    return lab


@pytest.fixture()
def broken(tmp_path):
    """One case per problem; 'good' is clean."""
    img = np.random.default_rng(0).normal(100, 10, SHAPE).astype(np.float32)
    i, l_ = tmp_path / "images", tmp_path / "labels"
    for case in ["good", "mask255", "half", "empty", "shape", "origin", "spacing", "direction", "multi", "unreadable"]:
        _save(i / f"{case}.nii.gz", img)
    nan_img = img.copy()
    nan_img[0, 0, :3] = np.nan
    nan_img[1, 1, 1] = np.inf
    _save(i / "nan.nii.gz", nan_img)
    _save(l_ / "nan.nii.gz", _lesion())
    _save(l_ / "good.nii.gz", _lesion())
    _save(l_ / "mask255.nii.gz", _lesion(255))
    _save(l_ / "half.nii.gz", _lesion(1, np.float32) * 0.5 + _lesion(1, np.float32) * 0.5 * (np.arange(8) % 2))
    _save(l_ / "empty.nii.gz", np.zeros(SHAPE, np.uint8))
    _save(l_ / "shape.nii.gz", np.pad(_lesion(), ((0, 0), (0, 0), (0, 1))))
    moved = AFFINE.copy()
    moved[:3, 3] = [0, 0, 1.5]
    _save(l_ / "origin.nii.gz", _lesion(), moved)
    _save(l_ / "spacing.nii.gz", _lesion(), np.diag([0.8, 0.8, 2.5, 1.0]))
    _save(l_ / "direction.nii.gz", _lesion(), np.diag([-0.8, 0.8, 3.0, 1.0]))
    multi = _lesion()
    multi[10:12, 10:12, 5] = 2
    _save(l_ / "multi.nii.gz", multi)
    (l_ / "unreadable.nii.gz").write_text("not an image")
    return tmp_path


def _by_case(report):
    out = {}
    for p in report.problems:
        out.setdefault(p.case_id, []).append(p)
    return out


def test_every_problem_is_reported_at_once(broken):
    report = check_dataset(discover_cases(broken / "images", broken / "labels"))
    found = _by_case(report)
    assert report.fatal
    assert "good" not in found
    [p] = found["mask255"]
    assert p.severity == FATAL and p.path.endswith("mask255.nii.gz")
    assert p.message == "label values {0, 255} outside {0, 1}; map them with --map-labels 255:1"
    [p] = found["half"]
    assert p.severity == FATAL and "non-integer voxels (values such as 0.5)" in p.message and "nearest-neighbour" in p.message
    [p] = found["nan"]
    assert p.severity == FATAL and p.message.startswith("image has 4 NaN/inf voxels") and p.path.endswith("images/nan.nii.gz")
    [p] = found["empty"]
    assert (p.severity, p.message) == (WARNING, "empty label (no lesion voxel)")
    [p] = found["shape"]
    assert p.message == "image/label shape mismatch: image (16, 16, 8), label (16, 16, 9)"
    [p] = found["origin"]
    assert p.message == "image/label origin mismatch (RAS mm): image (0, 0, 0), label (0, 0, 1.5) (1.5 mm apart; tolerance 0.01 mm)"
    [p] = found["spacing"]
    # 0.5 mm spacing error over 7 slice steps: the last slice is 3.5 mm off.
    assert p.message == ("image/label spacing mismatch (mm): image (0.8, 0.8, 3), label (0.8, 0.8, 2.5) "
                         "(voxels drift up to 3.5 mm apart; tolerance 0.01 mm)")
    [p] = found["direction"]
    assert p.message.startswith("image/label direction mismatch: image RAS (1, 0, 0, 0, 1, 0, 0, 0, 1), label LAS (-1, 0,")
    [p] = found["multi"]
    assert p.message.startswith("label values {0, 1, 2} outside {0, 1}; medseg segments one foreground class")
    assert "2:1 to merge all into one, or 2:1,*:0 to keep only 2" in p.message
    [p] = found["unreadable"]
    assert p.severity == FATAL and p.path.endswith("labels/unreadable.nii.gz")
    assert p.message.startswith("unreadable label: expected a readable NIfTI file, found a truncated or corrupt")
    [p] = found["(dataset)"]
    assert (p.severity, p.message) == (WARNING, "1 of 7 valid labels are empty (no lesion): they only teach background")
    assert len(report.fatal_problems) == 9 and len(report.warnings) == 2
    # Statistics still come for the valid labels (also when the image/label grid differs).
    assert report.stats["good"]["lesion_count"] == 1 and report.stats["good"]["lesion_voxels"] == 32
    assert report.stats["good"]["lesion_volume_ml"] == pytest.approx(32 * 0.8 * 0.8 * 3 / 1000)
    assert "lesion_count" not in report.stats["mask255"]
    assert report.totals["n_labelled"] == 7  # 11 cases: 3 labels invalid, 1 unreadable


def test_grid_tolerance_counts_the_drift_across_the_volume(tmp_path):
    grid = np.diag([0.5, 0.5, 0.5, 1.0])
    image = (1 + (np.arange(200)[:, None, None] % 2) * np.ones((200, 10, 10))).astype(np.int16)
    label = np.zeros((200, 10, 10), np.uint8)
    label[5, 5, 5] = 1
    for case in "ab":
        _save(tmp_path / "i" / f"{case}.nii.gz", image, grid)
    # a: 0.0002 mm spacing error (< 0.01 mm) drifts 199 * 0.0002 = 0.0398 mm by the last voxel.
    _save(tmp_path / "l" / "a.nii.gz", label, np.diag([0.5002, 0.5, 0.5, 1.0]))
    # b: 0.00002 mm drifts 0.004 mm: accepted.
    _save(tmp_path / "l" / "b.nii.gz", label, np.diag([0.50002, 0.5, 0.5, 1.0]))
    cases = discover_cases(tmp_path / "i", tmp_path / "l")
    assert [(p.case_id, p.message) for p in check_dataset(cases).problems] == [
        ("a", "image/label spacing mismatch (mm): image (0.5, 0.5, 0.5), label (0.5002, 0.5, 0.5) "
              "(voxels drift up to 0.0398 mm apart; tolerance 0.01 mm)")]
    assert not check_dataset(cases, tolerance_mm=0.05).fatal
    # A 0.0005 rad rotation about z (cosines within 1e-3) moves the far voxel by 199 * 0.5 * 0.0005 mm.
    c, s_ = np.cos(5e-4), np.sin(5e-4)
    rotated = grid.copy()
    rotated[:2, :2] = np.array([[c, -s_], [s_, c]]) * 0.5
    _save(tmp_path / "l" / "a.nii.gz", label, rotated)
    [p] = check_dataset(cases).problems
    assert p.message.startswith("image/label direction mismatch: image RAS") and "voxels up to 0.0497 mm apart" in p.message


def test_label_map_fixes_255_masks(broken):
    cases = [c for c in discover_cases(broken / "images", broken / "labels") if c.case_id in ("good", "mask255")]
    report = check_dataset(cases, label_map={255: 1})
    assert report.problems == []
    assert report.stats["mask255"]["lesion_voxels"] == report.stats["good"]["lesion_voxels"] == 32
    # A mapping that leaves other values still fails and says it was applied.
    report = check_dataset(cases, label_map={255: 3})
    assert report.problems[0].message.startswith("label values {0, 3} after --map-labels outside {0, 1}")


def test_raise_if_fatal_lists_all(broken):
    report = check_dataset(discover_cases(broken / "images", broken / "labels"))
    with pytest.raises(DatasetError, match=r"dataset check found 9 fatal problem\(s\)") as info:
        report.raise_if_fatal()
    assert len(info.value.problems) == 9
    assert any(p.startswith("mask255: label values {0, 255}") for p in info.value.problems)
    check_dataset([]).raise_if_fatal()  # nothing fatal: no exception


def test_constant_image_warning_and_images_only(tmp_path):
    _save(tmp_path / "images" / "flat.nii.gz", np.full(SHAPE, 7, np.int16))
    report = check_dataset(discover_cases(tmp_path / "images"))
    assert [(p.severity, p.message) for p in report.problems] == [(WARNING, "image is constant (every voxel 7)")]
    assert report.stats["flat"]["shape"] == list(SHAPE) and "lesion_count" not in report.stats["flat"]


def test_dicom_patient_folders_with_nifti_labels(tmp_path):
    # One DICOM folder per patient; the label was written as NIfTI on the DICOM grid: no mismatch.
    ct5n = NRRD.parent / "dicom" / "pydicom" / "dicomdirtests" / "98892001" / "CT5N"
    patient = tmp_path / "images" / "patA"
    patient.mkdir(parents=True)
    for f in ct5n.iterdir():
        (patient / f.name).symlink_to(f)
    image = read_volume(patient)
    label = np.zeros(image.shape, np.uint8)
    label[4:8, 4:8, 1:3] = 1
    write_volume(image.with_array(label), tmp_path / "labels" / "patA.nii.gz")
    report = check_dataset(discover_cases(tmp_path / "images", tmp_path / "labels"))
    assert report.problems == []
    assert report.stats["patA"]["modality"] == "CT"
    assert (report.stats["patA"]["lesion_voxels"], report.stats["patA"]["slices_with_lesion"]) == (32, 2)


def test_parallel_check_gives_the_same_report(broken, capsys):
    cases = discover_cases(broken / "images", broken / "labels")
    assert check_dataset(cases, workers=1).to_dict() == check_dataset(cases, workers=3, progress=True).to_dict()
    assert "checking" in capsys.readouterr().err  # the progress bar


def test_to_dict_is_strict_json(broken):
    report = check_dataset(discover_cases(broken / "images", broken / "labels"))
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["fatal"] is True and data["ok"] is False
    assert data["n_fatal"] == 9 and data["n_warnings"] == 2 and data["n_cases"] == 11
    assert {"severity", "case_id", "path", "message"} == set(data["problems"][0])
    assert data["cases"]["good"]["lesion_count"] == 1


# --- medseg-check command -----------------------------------------------------------------------

def test_cli_table_and_exit_0(real_dataset, capsys):
    code = check_cli.main(["--images", str(real_dataset / "images"), "--labels", str(real_dataset / "labels")])
    out = capsys.readouterr().out
    assert code == 0
    assert "problems: none" in out and "result: OK" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("brain1"))
    assert row.split()[:3] == ["brain1", "2", "16.413"] and "7/25 (28%)" in row


def test_cli_json_and_exit_1(broken, capsys):
    code = check_cli.main(["--images", str(broken / "images"), "--labels", str(broken / "labels"), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 1
    assert data["fatal"] is True and data["n_fatal"] == 9
    assert data["images"] == str(broken / "images")


def test_cli_map_labels_flag(broken, capsys):
    for case in ["half", "nan", "shape", "origin", "spacing", "direction", "multi", "unreadable", "empty"]:
        (broken / "images" / f"{case}.nii.gz").unlink()
        (broken / "labels" / f"{case}.nii.gz").unlink()
    args = ["--images", str(broken / "images"), "--labels", str(broken / "labels")]
    assert check_cli.main(args) == 1
    assert "--map-labels 255:1" in capsys.readouterr().out
    assert check_cli.main(args + ["--map-labels", "255:1"]) == 0
    assert "result: OK" in capsys.readouterr().out


def test_cli_unpaired_files_are_fatal_problems_with_the_rest(real_dataset, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for f in (real_dataset / "images").iterdir():
        (images / f.name).symlink_to(f.resolve())
    (images / "extra.nii.gz").write_bytes(b"")
    code = check_cli.main(["--images", str(images), "--labels", str(real_dataset / "labels"), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 1
    assert data["problems"] == [{"severity": "fatal", "case_id": "(dataset)", "path": None,
                                 "message": f"image without label: {images / 'extra.nii.gz'}"}]
    assert data["cases"]["brain1"]["lesion_count"] == 2  # the paired cases were still checked


def test_cli_input_errors_exit_2_with_one_line(tmp_path, capsys):
    assert check_cli.main(["--images", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err == f"medseg-check: error: {tmp_path / 'nope'}: expected a folder of images, found no such folder\n"
    with pytest.raises(InputError, match="no such folder"):
        check_cli.main(["--images", str(tmp_path / "nope"), "--debug"])
    capsys.readouterr()
    assert check_cli.main(["--images", str(tmp_path / "nope"), "--json"]) == 2
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["ok"] is False and data["error"].endswith("expected a folder of images, found no such folder")
    assert captured.err.startswith("medseg-check: error: ")


def test_cli_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        check_cli.main(["--images", "x", "--map-labels", "255"])
    assert info.value.code == 2
    assert "argument --map-labels: expected --map-labels as FROM:TO pairs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        check_cli.main([])
    assert info.value.code == 2


def test_cli_does_not_import_tensorflow(real_dataset):
    code = (
        "import sys; from medseg.cli.check import main; "
        f"rc = main(['--images', {str(real_dataset / 'images')!r}, '--labels', {str(real_dataset / 'labels')!r}, '--quiet']); "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TF imported'; sys.exit(rc)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "result: OK" in result.stdout


def test_common_error_line_and_run_command(capsys):
    class Args:
        debug = False

    err = DatasetError("3 unpaired files", ["image without label: a", "label without image: b"])
    assert error_line(err) == "3 unpaired files; image without label: a; label without image: b"
    assert error_line(PermissionError(13, "Permission denied", "/out/seg.nii.gz")) == "/out/seg.nii.gz: Permission denied"

    def fail():
        raise err

    assert run_command("medseg-x", Args(), fail) == 2
    assert capsys.readouterr().err == "medseg-x: error: 3 unpaired files; image without label: a; label without image: b\n"
    assert run_command("medseg-x", Args(), lambda: None) == 0
    assert run_command("medseg-x", Args(), lambda: 1) == 1
    Args.debug = True
    with pytest.raises(DatasetError, match="3 unpaired files"):
        run_command("medseg-x", Args(), fail)
