"""Dataset discovery: pairing rules on synthetic folders (empty files are enough: nothing is read)."""

import json
import os
from pathlib import Path

import pytest

from medseg.errors import DatasetError, InputError
from medseg.io import Case, case_id_from_path, discover_cases, list_volume_files, pair_cases

DATA = Path(__file__).parent / "data"
CT5N = DATA / "dicom" / "pydicom" / "dicomdirtests" / "98892001" / "CT5N"


def touch(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


def dicom_folder(path: Path) -> Path:
    """A patient folder holding a real (tiny) DICOM series, via symlinks."""
    path.mkdir(parents=True)
    for f in sorted(CT5N.iterdir()):
        (path / f.name).symlink_to(f)
    return path


@pytest.mark.parametrize(
    "name, images, expected",
    [
        ("brain1.nii.gz", False, "brain1"),
        ("brain1.NII.GZ", False, "brain1"),
        ("liver_3.nii", False, "liver_3"),
        ("a.b.nrrd", False, "a.b"),
        ("x.mha", False, "x"),
        ("x.mhd", False, "x"),
        ("ct.dcm", False, "ct"),
        ("case_0000.nii.gz", False, "case_0000"),
        ("case_0000.nii.gz", True, "case"),
        ("case_0001.nii.gz", True, "case_0001"),  # other channels are kept (discovery refuses them)
        ("_0000.nii.gz", True, "_0000"),
        ("1.2.840.113619", False, "1.2.840.113619"),  # DICOM UID-like name without extension
    ],
)
def test_case_id_from_path(name, images, expected):
    assert case_id_from_path(Path("/data") / name, images=images) == expected


def test_case_id_of_a_folder_is_its_name(tmp_path):
    (tmp_path / "patient.nii.gz").mkdir()  # a folder keeps its whole name
    assert case_id_from_path(tmp_path / "patient.nii.gz") == "patient.nii.gz"


def test_identical_names_sorted_and_noise_ignored(tmp_path):
    images = touch(tmp_path / "images", "b.nii.gz", "a.nrrd", "c.mha", ".hidden.nii.gz", "._a.nrrd",
                   "README.md", "c.raw", "notes.txt", "dataset.csv")
    labels = touch(tmp_path / "labels", "a.nrrd", "b.nii.gz", "c.mha", ".DS_Store")
    (images / "not_dicom").mkdir()
    touch(images / "not_dicom", "readme.txt")
    cases = discover_cases(images, labels)
    assert cases == [
        Case("a", images / "a.nrrd", labels / "a.nrrd"),
        Case("b", images / "b.nii.gz", labels / "b.nii.gz"),
        Case("c", images / "c.mha", labels / "c.mha"),
    ]


def test_nnunet_channel_suffix(tmp_path):
    images = touch(tmp_path / "imagesTr", "case_001_0000.nii.gz", "case_002_0000.nii.gz")
    labels = touch(tmp_path / "labelsTr", "case_001.nii.gz", "case_002.nii.gz")
    cases = discover_cases(images, labels)
    assert [(c.case_id, c.image_path.name, c.label_path.name) for c in cases] == [
        ("case_001", "case_001_0000.nii.gz", "case_001.nii.gz"),
        ("case_002", "case_002_0000.nii.gz", "case_002.nii.gz"),
    ]


def test_identical_names_win_over_channel_suffix(tmp_path):
    # Patients numbered with 4 digits, labels named identically: no suffix stripping.
    images = touch(tmp_path / "i", "p_0000.nii.gz", "p_0001.nii.gz", "p_0002.nii.gz")
    labels = touch(tmp_path / "l", "p_0000.nii.gz", "p_0001.nii.gz", "p_0002.nii.gz")
    assert [c.case_id for c in discover_cases(images, labels)] == ["p_0000", "p_0001", "p_0002"]
    assert list(list_volume_files(images, images=True)) == ["p_0000", "p_0001", "p_0002"]


def test_multichannel_is_refused(tmp_path):
    images = touch(tmp_path / "i", "a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz")
    labels = touch(tmp_path / "l", "a.nii.gz", "b.nii.gz")
    with pytest.raises(DatasetError, match="multichannel cases are not supported") as info:
        discover_cases(images, labels)
    assert info.value.problems == ["a: a_0000.nii.gz, a_0001.nii.gz", "b: b_0000.nii.gz, b_0001.nii.gz"]
    with pytest.raises(DatasetError, match=r"multichannel nnU-Net images \(channels 0000, 0001 per case\)"):
        list_volume_files(images, images=True)
    with pytest.raises(DatasetError, match="multichannel nnU-Net images"):
        discover_cases(images)


def test_list_volume_files_strips_channel_only_for_images(tmp_path):
    folder = touch(tmp_path / "f", "x_0000.nii.gz", "y_0000.nrrd")
    assert list(list_volume_files(folder, images=True)) == ["x", "y"]
    assert list(list_volume_files(folder)) == ["x_0000", "y_0000"]


def test_images_only(tmp_path):
    images = touch(tmp_path / "imagesTs", "z_0000.nii.gz", "a_0000.nii.gz")
    assert discover_cases(images) == [Case("a", images / "a_0000.nii.gz", None), Case("z", images / "z_0000.nii.gz", None)]


def test_unpaired_files_are_listed_in_one_error(tmp_path):
    images = touch(tmp_path / "i", "a.nii.gz", "b.nii.gz", "c.nii.gz", "d_0000.nii.gz")
    labels = touch(tmp_path / "l", "a.nii.gz", "x.nii.gz", "y.nrrd")
    with pytest.raises(DatasetError, match=r"5 unpaired files between .*i and .*l") as info:
        discover_cases(images, labels)
    assert info.value.problems == [
        f"image without label: {images / 'b.nii.gz'}",
        f"image without label: {images / 'c.nii.gz'}",
        f"image without label: {images / 'd_0000.nii.gz'}",
        f"label without image: {labels / 'x.nii.gz'}",
        f"label without image: {labels / 'y.nrrd'}",
    ]
    cases, problems = pair_cases(images, labels)
    assert [c.case_id for c in cases] == ["a"] and len(problems) == 5


def test_duplicate_ids_are_refused(tmp_path):
    images = touch(tmp_path / "i", "a.nii.gz", "a.nrrd", "b.nii")
    with pytest.raises(DatasetError, match="several files share one case id") as info:
        discover_cases(images)
    assert info.value.problems == ["a: a.nii.gz, a.nrrd"]


def _msd(tmp_path, training, where="parent"):
    root = tmp_path / "Task02_Heart"
    images = touch(root / "imagesTr", "la_003.nii.gz", "la_004.nii.gz", "._la_003.nii.gz")
    labels = touch(root / "labelsTr", "la_003.nii.gz", "la_004.nii.gz")
    touch(root / "imagesTs", "la_001.nii.gz")
    spec = {"name": "LeftAtrium", "training": training, "test": ["./imagesTs/la_001.nii.gz"]}
    target = root if where == "parent" else images
    (target / "dataset.json").write_text(json.dumps(spec))
    return root, images, labels


@pytest.mark.parametrize("where", ["parent", "images"])
def test_msd_dataset_json(tmp_path, where):
    training = [{"image": "./imagesTr/la_004.nii.gz", "label": "./labelsTr/la_004.nii.gz"},
                {"image": "./imagesTr/la_003.nii.gz", "label": "./labelsTr/la_003.nii.gz"}]
    if where == "images":
        training = [{"image": "./la_004.nii.gz", "label": "../labelsTr/la_004.nii.gz"},
                    {"image": "./la_003.nii.gz", "label": "../labelsTr/la_003.nii.gz"}]
    root, images, labels = _msd(tmp_path, training, where)
    cases = discover_cases(images, labels)
    assert [(c.case_id, c.image_path, c.label_path) for c in cases] == [
        ("la_003", images / "la_003.nii.gz", labels / "la_003.nii.gz"),
        ("la_004", images / "la_004.nii.gz", labels / "la_004.nii.gz"),
    ]


def test_dataset_json_pairs_files_with_different_names(tmp_path):
    root = tmp_path / "ds"
    images = touch(root / "imagesTr", "scan_a.nii.gz")
    labels = touch(root / "labelsTr", "mask_a.nii.gz")
    (root / "dataset.json").write_text(json.dumps(
        {"training": [{"image": "./imagesTr/scan_a.nii.gz", "label": "./labelsTr/mask_a.nii.gz"}]}))
    assert discover_cases(images, labels) == [Case("scan_a", images / "scan_a.nii.gz", labels / "mask_a.nii.gz")]
    # Without the json the names do not pair.
    (root / "dataset.json").unlink()
    with pytest.raises(DatasetError, match="2 unpaired files"):
        discover_cases(images, labels)


def test_dataset_json_nnunet_v1_channel_files(tmp_path):
    root = tmp_path / "Task05"
    images = touch(root / "imagesTr", "p_1_0000.nii.gz")
    labels = touch(root / "labelsTr", "p_1.nii.gz")
    (root / "dataset.json").write_text(json.dumps(
        {"training": [{"image": "./imagesTr/p_1.nii.gz", "label": "./labelsTr/p_1.nii.gz"}]}))
    assert discover_cases(images, labels) == [Case("p_1", images / "p_1_0000.nii.gz", labels / "p_1.nii.gz")]
    touch(images, "p_1_0001.nii.gz")
    with pytest.raises(DatasetError, match=r"multichannel case p_1 \(p_1_0000, p_1_0001, ...\) is not supported"):
        discover_cases(images, labels)


def test_dataset_json_missing_files_are_listed(tmp_path):
    training = [{"image": "./imagesTr/la_003.nii.gz", "label": "./labelsTr/la_003.nii.gz"},
                {"image": "./imagesTr/la_009.nii.gz", "label": "./labelsTr/la_009.nii.gz"},
                {"image": "./imagesTr/la_004.nii.gz", "label": "./labelsTr/gone.nii.gz"},
                "not a dict"]
    root, images, labels = _msd(tmp_path, training)
    with pytest.raises(DatasetError, match="3 entries of 'training' cannot be used") as info:
        discover_cases(images, labels)
    assert any("la_009.nii.gz: listed in dataset.json, file not found" in p for p in info.value.problems)
    assert any("label " in p and "gone.nii.gz not found" in p for p in info.value.problems)
    assert any("training[3]: expected" in p for p in info.value.problems)


def test_dataset_json_without_training_list_falls_back_to_names(tmp_path):
    root = tmp_path / "Dataset001"
    images = touch(root / "imagesTr", "c_0000.nii.gz")
    labels = touch(root / "labelsTr", "c.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1},
                                                   "numTraining": 1, "file_ending": ".nii.gz"}))
    assert [c.case_id for c in discover_cases(images, labels)] == ["c"]


def test_dataset_json_for_another_folder_is_ignored(tmp_path):
    training = [{"image": "./imagesTr/la_003.nii.gz", "label": "./labelsTr/la_003.nii.gz"}]
    root, images, labels = _msd(tmp_path, training)
    test_images = root / "imagesTs"
    test_labels = touch(root / "labelsTs", "la_001.nii.gz")
    assert [c.case_id for c in discover_cases(test_images, test_labels)] == ["la_001"]


def test_bad_dataset_json(tmp_path):
    images = touch(tmp_path / "imagesTr", "a.nii.gz")
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(InputError, match=r"dataset.json: expected a valid dataset.json, found unreadable JSON"):
        discover_cases(images)


def test_one_dicom_folder_per_patient(tmp_path):
    images = tmp_path / "images"
    dicom_folder(images / "patB")
    dicom_folder(images / "patA")
    labels = touch(tmp_path / "labels", "patA.nii.gz", "patB.nrrd")
    (images / "empty_notes").mkdir()
    cases = discover_cases(images, labels)
    assert cases == [Case("patA", images / "patA", labels / "patA.nii.gz"),
                     Case("patB", images / "patB", labels / "patB.nrrd")]


def test_dicom_labels_may_be_folders_too(tmp_path):
    images = tmp_path / "images"
    dicom_folder(images / "p1")
    labels = tmp_path / "labels"
    dicom_folder(labels / "p1")
    assert discover_cases(images, labels) == [Case("p1", images / "p1", labels / "p1")]


def test_loose_dicom_slices_are_refused(tmp_path):
    images = dicom_folder(tmp_path / "series")
    with pytest.raises(InputError, match=r"series: expected one subfolder per patient .*found 5 DICOM files of 1 series directly in the folder"):
        discover_cases(images)


def test_single_file_dicom_volumes_are_cases(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ["emri_small.dcm", "eCT_Supplemental.dcm"]:  # enhanced multi-frame: one file, one volume
        (images / name).symlink_to(DATA / "dicom" / "pydicom_data" / name)
    labels = touch(tmp_path / "labels", "emri_small.nii.gz", "eCT_Supplemental.nii.gz")
    assert discover_cases(images, labels) == [
        Case("eCT_Supplemental", images / "eCT_Supplemental.dcm", labels / "eCT_Supplemental.nii.gz"),
        Case("emri_small", images / "emri_small.dcm", labels / "emri_small.nii.gz"),
    ]


def test_missing_empty_and_locked_folders(tmp_path, monkeypatch):
    with pytest.raises(InputError, match=r"nope: expected a folder of images, found no such folder"):
        discover_cases(tmp_path / "nope")
    touch(tmp_path, "file.nii.gz")
    with pytest.raises(InputError, match=r"file.nii.gz: expected a folder of images, found a file"):
        discover_cases(tmp_path / "file.nii.gz")
    empty = touch(tmp_path / "empty", "README.md", ".DS_Store")
    with pytest.raises(InputError, match=r"empty: expected images: volume files .*found none \(1 other entries ignored\)"):
        discover_cases(empty)
    images = touch(tmp_path / "images", "a.nii.gz")
    with pytest.raises(InputError, match=r"labels: expected a folder of labels, found no such folder"):
        discover_cases(images, tmp_path / "labels")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == images else real_access(p, mode))
    with pytest.raises(InputError, match=r"images: expected a readable folder of images, found a folder without read permission"):
        discover_cases(images)


def test_labels_folder_must_differ_from_images(tmp_path):
    images = touch(tmp_path / "images", "a.nii.gz")
    with pytest.raises(InputError, match=r"images: expected a labels folder different from the images folder, found the images folder itself"):
        discover_cases(images, tmp_path / "." / "images")


def test_listing_denied(tmp_path, monkeypatch):
    images = touch(tmp_path / "images", "a.nii.gz")
    real_listdir = os.listdir

    def deny(p="."):
        if Path(p) == images:
            raise PermissionError(13, "Permission denied", str(p))
        return real_listdir(p)

    monkeypatch.setattr(os, "listdir", deny)
    with pytest.raises(InputError, match="found a folder without read permission"):
        list_volume_files(images)
