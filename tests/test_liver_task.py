"""The demo's liver task on the real TotalSegmentator files (tests/data/totalsegmentator).

Patient A: non-contrast abdomen CT (NIfTI, RAS, 3 mm) and its 117-class label map; patient B:
a 20-file contrast-enhanced CT DICOM series (LPS) and its label map stored LAS. Liver = 5.
Independent answers: the liver voxel counts of the data set's manifest (41,692 and 366,708; tests/data/README.md),
SimpleITK's own resampling for the LAS/LPS pairing, and a plain numpy Dice.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "data" / "totalsegmentator"


def _prep_module():
    spec = importlib.util.spec_from_file_location("prepare_sample_data", ROOT / "scripts" / "prepare_sample_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def liver(tmp_path_factory) -> Path:
    return _prep_module().prepare_liver(tmp_path_factory.mktemp("liver") / "data", SOURCE)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_layout_copies_the_checked_files_and_keeps_the_dicom_series_whole(liver):
    prep = _prep_module()
    assert _sha(liver / "imagesTr" / "patientA.nii.gz") == prep.TOTALSEG_SHA256["example_ct.nii.gz"]
    assert _sha(liver / "labelsTr" / "patientA.nii.gz") == prep.TOTALSEG_SHA256["example_seg_fast_force_split.nii.gz"]
    assert _sha(liver / "labelsTs" / "patientB.nii.gz") == prep.TOTALSEG_SHA256["example_seg_dicom.nii.gz"]
    series = sorted((liver / "imagesTs" / "patientB").iterdir())
    assert len(series) == 20
    for path in series:
        assert _sha(path) == prep.TOTALSEG_SHA256[f"example_ct_dicom/{path.name}"]
    # idempotent: a second call leaves the layout as it is
    before = {p: p.stat().st_mtime_ns for p in liver.rglob("*") if p.is_file()}
    prep.prepare_liver(liver, SOURCE)
    assert before == {p: p.stat().st_mtime_ns for p in liver.rglob("*") if p.is_file()}


def test_a_modified_file_is_refused_and_nothing_is_laid_out(tmp_path):
    prep = _prep_module()
    source = tmp_path / "src"
    shutil.copytree(SOURCE, source)
    victim = source / "example_ct_dicom" / sorted(p.name for p in (source / "example_ct_dicom").iterdir())[3]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match=f"{victim.name} has an unexpected SHA-256"):
        prep.prepare_liver(tmp_path / "out", source)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out-*"))


def test_liver_label_extraction_matches_the_manifest(liver):
    from medseg.data.plan import load_pair
    from medseg.io import Case, read_volume
    from medseg.io.labels import parse_label_map

    five = parse_label_map("5:1,*:0")
    a_image, a_label = load_pair(Case("patientA", liver / "imagesTr" / "patientA.nii.gz",
                                      liver / "labelsTr" / "patientA.nii.gz", label_map=five))
    assert set(np.unique(a_label.array)) == {0, 1} and int(a_label.array.sum()) == 41_692
    assert a_label.same_grid(a_image)
    # B: the DICOM series read as LPS, the label LAS; load_pair brings the label onto the image grid.
    b_image, b_label = load_pair(Case("patientB", liver / "imagesTs" / "patientB",
                                      liver / "labelsTs" / "patientB.nii.gz", label_map=five))
    raw = read_volume(liver / "labelsTs" / "patientB.nii.gz")
    assert b_image.orientation == "LPS" and raw.orientation == "LAS"
    assert b_label.same_grid(b_image) and int(b_label.array.sum()) == 366_708
    # the raw file is untouched: still the 117-class map
    assert raw.array.max() > 5


def test_check_command_with_a_label_map(liver, capsys):
    from medseg.cli.check import main

    assert main(["--images", str(liver / "imagesTr"), "--labels", str(liver / "labelsTr"),
                 "--map-labels", "5:1,*:0"]) == 0
    out = capsys.readouterr().out
    assert "patientA" in out and "result: OK" in out
    # without the map the 117-class labels are refused, with the fix named
    assert main(["--images", str(liver / "imagesTr"), "--labels", str(liver / "labelsTr")]) != 0
    assert ",*:0 to keep only" in capsys.readouterr().out


def _sitk_dice_after_reorientation(pred_path: Path, ref_path: Path, label: int) -> float:
    """Independent answer: SimpleITK resamples the reference onto the prediction's grid
    (nearest neighbour, identity transform), then a plain numpy Dice."""
    import SimpleITK as sitk

    pred = sitk.ReadImage(str(pred_path))
    ref = sitk.Resample(sitk.ReadImage(str(ref_path)), pred, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    p = sitk.GetArrayFromImage(pred) > 0
    r = sitk.GetArrayFromImage(ref) == label
    return float(2 * np.logical_and(p, r).sum() / (p.sum() + r.sum()))


def test_eval_pairs_an_LAS_label_map_with_an_LPS_prediction_by_geometry(liver, tmp_path):
    """A prediction on the DICOM's LPS grid (what medseg-infer writes for patient B), scored
    against the LAS label map: the same DSC as after an explicit SimpleITK reorientation."""
    from scipy import ndimage

    from medseg.cli.evaluate import main
    from medseg.io import read_volume, write_volume

    image = read_volume(liver / "imagesTs" / "patientB")
    ref = read_volume(liver / "labelsTs" / "patientB.nii.gz").onto_grid_of(image)
    # An imperfect prediction: the liver eroded, plus a false blob far from it.
    pred = ndimage.binary_erosion(ref.array == 5, iterations=3)
    pred[10:30, 10:30, 2:6] = True
    (tmp_path / "pred").mkdir()
    pred_path = tmp_path / "pred" / "patientB_seg.nii.gz"
    write_volume(image.with_array(pred.astype(np.uint8)), pred_path)
    assert read_volume(pred_path).orientation == "LPS"
    out = tmp_path / "eval"
    assert main(["--pred", str(tmp_path / "pred"), "--ref", str(liver / "labelsTs"), "--map-labels", "5:1,*:0",
                 "--out", str(out), "--no-figures", "--quiet"]) == 0
    import csv

    [row] = list(csv.DictReader(open(out / "metrics.csv")))
    expected = _sitk_dice_after_reorientation(pred_path, liver / "labelsTs" / "patientB.nii.gz", 5)
    assert 0.5 < expected < 0.99
    assert float(row["dsc"]) == pytest.approx(expected, abs=1e-12)
    assert row.get("resampled") in ("False", "false", "0")
