"""RTSTRUCT (issue 22): contours rasterized by voxel centre on the referenced series' grid (a hand-built
structure set with a hole, an island and overlapping ROIs on the oblique series), RTSTRUCTs made from
B's label map read back, dataset pairing by referenced UIDs."""

from __future__ import annotations

import shutil

import zlib

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from _dicom_labels import OBLIQUE_SERIES, dciodvfy_errors, organ_labels, series_with_uids
from _helpers import no_env_model, run_dir  # noqa: F401  (fixtures)
from medseg.errors import DatasetError, InputError
from medseg.io import discover_cases, pair_cases, read_volume
from medseg.io.dicomlabels import write_dicom_seg, write_rtstruct

RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"


def _sorted_headers(folder):
    """The series' headers sorted along the slice normal (how the standard orders slices)."""
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.iterdir())]

    def along(ds):
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        return float(np.dot([float(v) for v in ds.ImagePositionPatient], np.cross(iop[:3], iop[3:])))

    return sorted(headers, key=along)


def _lps(ds, corners):
    """LPS points of (column, row) pixel coordinates on image ``ds`` (PS3.3 C.7.6.2.1.1)."""
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    dr, dc = (float(v) for v in ds.PixelSpacing)
    ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
    return [ipp + c * dc * iop[:3] + r * dr * iop[3:] for c, r in corners]


def _square(c0, r0, c1, r1, clockwise=False):
    """Corners of the pixels c0..c1 x r0..r1, on pixel edges (half-integer coordinates)."""
    pts = [(c0 - 0.5, r0 - 0.5), (c1 + 0.5, r0 - 0.5), (c1 + 0.5, r1 + 0.5), (c0 - 0.5, r1 + 0.5)]
    return pts[::-1] if clockwise else pts


def _structure_set(headers, rois):
    """A minimal RTSTRUCT: ``rois`` = [(number, name, [(header, points, kind)])]."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = RTSTRUCT, generate_uid(), "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    series = Dataset()
    series.SeriesInstanceUID = headers[0].SeriesInstanceUID
    study = Dataset()
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = headers[0].FrameOfReferenceUID
    frame.RTReferencedStudySequence = Sequence([study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])
    ds.StructureSetROISequence, ds.ROIContourSequence = Sequence(), Sequence()
    for number, name, contours in rois:
        roi = Dataset()
        roi.ROINumber, roi.ROIName = number, name
        ds.StructureSetROISequence.append(roi)
        item = Dataset()
        item.ReferencedROINumber, item.ContourSequence = number, Sequence()
        for _, points, kind in contours:
            contour = Dataset()
            contour.ContourGeometricType = kind
            contour.ContourData = [f"{v:.5f}" for p in points for v in p]
            contour.NumberOfContourPoints = len(points)
            item.ContourSequence.append(contour)
        ds.ROIContourSequence.append(item)
    return ds


def _save(ds, path):
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = RTSTRUCT, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def test_hand_built_rtstruct_with_a_hole_an_island_and_overlap_on_the_oblique_series(tmp_path, caplog):
    headers = _sorted_headers(OBLIQUE_SERIES)
    a, b = headers[10], headers[11]  # slices 10 and 11 (sorted along the oblique normal)
    ring = [(a, _lps(a, _square(100, 80, 119, 99)), "CLOSED_PLANAR"),  # 20 x 20 pixels
            (a, _lps(a, _square(105, 85, 110, 90, clockwise=True)), "CLOSED_PLANAR"),  # hole: 6 x 6
            (a, _lps(a, _square(107, 87, 108, 88)), "CLOSED_PLANAR"),  # island in the hole: 2 x 2
            (a, _lps(a, [(150, 150)]), "POINT")]  # encloses nothing
    body = [(b, _lps(b, _square(50, 50, 199, 199)), "CLOSED_PLANAR")]
    organ = [(b, _lps(b, _square(60, 60, 69, 69)), "CLOSED_PLANAR")]  # inside the body outline
    path = _save(_structure_set(headers, [(1, "Ring", ring), (2, "BODY", body), (7, "Organ", organ)]),
                 tmp_path / "hand.dcm")
    label = read_volume(path, reference=OBLIQUE_SERIES)
    image = read_volume(OBLIQUE_SERIES)
    assert label.same_grid(image) and label.meta["class_names"] == {1: "Ring", 2: "BODY", 7: "Organ"}
    # Hand-computed: array[i, j, k] = (column, row, slice).
    expected = np.zeros(image.shape, dtype=np.uint8)
    expected[100:120, 80:100, 10] = 1
    expected[105:111, 85:91, 10] = 0
    expected[107:109, 87:89, 10] = 1
    expected[50:200, 50:200, 11] = 2
    expected[60:70, 60:70, 11] = 7  # overlap: the smaller ROI keeps it
    assert np.array_equal(label.array, expected)
    assert np.count_nonzero(label.array == 1) == 400 - 36 + 4
    assert "1 contours that are not CLOSED_PLANAR skipped" in caplog.text
    assert "100 voxels belong to several ROIs" in caplog.text


def test_outlines_give_back_every_pixel_of_a_speckled_mask_by_centre_and_even_odd():
    from matplotlib.path import Path as Polygon

    from medseg.io.dicomlabels.rtstruct_write import outlines

    mask = np.random.default_rng(0).random((64, 48)) < 0.5  # holes, islands, corner-only contacts
    rows, cols = np.mgrid[0:64, 0:48]
    centres = np.stack([cols.ravel(), rows.ravel()], axis=1)
    inside = np.zeros(centres.shape[0], dtype=bool)
    polygons = outlines(mask)
    for polygon in polygons:  # matplotlib, not medseg's rasterizer
        inside ^= Polygon(polygon).contains_points(centres)
    assert len(polygons) > 100 and np.array_equal(inside.reshape(mask.shape), mask)


def test_a_contour_off_the_slice_planes_is_one_clear_line(tmp_path):
    headers = _sorted_headers(OBLIQUE_SERIES)
    a, b = headers[3], headers[4]
    tilted = _lps(a, [(10, 10), (40, 10)]) + _lps(b, [(40, 40), (10, 40)])  # spans two slices
    path = _save(_structure_set(headers, [(1, "Tilted", [(a, tilted, "CLOSED_PLANAR")])]), tmp_path / "t.dcm")
    with pytest.raises(InputError, match=r"contour 1 of ROI 'Tilted' in one slice plane.*spread over 1\.0"):
        read_volume(path, reference=OBLIQUE_SERIES)
    between = [p + 0.5 * (np.asarray(_lps(b, [(0, 0)])[0]) - _lps(a, [(0, 0)])[0]) for p in _lps(a, _square(5, 5, 9, 9))]
    path = _save(_structure_set(headers, [(1, "Between", [(a, between, "CLOSED_PLANAR")])]), tmp_path / "m.dcm")
    with pytest.raises(InputError, match="around index 3.5"):
        read_volume(path, reference=OBLIQUE_SERIES)


@pytest.fixture(scope="module")
def b_series(tmp_path_factory):
    return series_with_uids(tmp_path_factory.mktemp("rt") / "b")


def test_rtstruct_from_b_label_map_reads_back_the_same_voxels(b_series, tmp_path):
    image = read_volume(b_series)
    labels = organ_labels(image)
    path = write_rtstruct(labels, b_series, tmp_path / "rt.dcm", class_names={5: "Liver", 1: "Spleen"})
    back = read_volume(path, reference=b_series)
    assert back.meta["class_names"] == {1: "Spleen", 2: "Liver"}
    for number, value in ((1, 1), (2, 5)):
        got, want = back.array == number, labels.array == value
        dsc = 2 * np.count_nonzero(got & want) / (np.count_nonzero(got) + np.count_nonzero(want))
        assert dsc >= 0.98 and np.array_equal(got, want)  # outlines between pixel centres: exact here
    ds = pydicom.dcmread(path)
    src = pydicom.dcmread(next(b_series.iterdir()), stop_before_pixels=True)
    assert (ds.PatientID, ds.StudyInstanceUID, ds.FrameOfReferenceUID) == (src.PatientID, src.StudyInstanceUID,
                                                                          src.FrameOfReferenceUID)
    refs = {r.ReferencedSOPInstanceUID for c in ds.ROIContourSequence[1].ContourSequence
            for r in c.ContourImageSequence}
    assert refs <= {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in b_series.iterdir()}
    if shutil.which("dciodvfy"):
        assert dciodvfy_errors(path) == []


def test_dataset_pairs_labels_by_referenced_series_not_by_name(b_series, tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    shutil.copytree(b_series, images / "patient_b")
    image = read_volume(images / "patient_b")
    labels.mkdir()
    write_rtstruct(organ_labels(image), images / "patient_b", labels / "zz_structures.dcm",
                   class_names={5: "Liver", 1: "Spleen"})
    cases = discover_cases(images, labels)
    assert [(c.case_id, c.image_path, c.label_path) for c in cases] == [
        ("patient_b", images / "patient_b", labels / "zz_structures.dcm")]
    # Read as the trainer and the checker read it: by path alone.
    assert read_volume(cases[0].label_path).same_grid(image)
    # A label object whose series is not among the images is one line naming the series.
    lost = _structure_set(_sorted_headers(OBLIQUE_SERIES), [(1, "Ring", [])])
    _save(lost, labels / "aa_lost.dcm")
    cases, problems = pair_cases(images, labels)
    assert [c.case_id for c in cases] == ["patient_b"]
    assert problems == [f"label without image: {labels / 'aa_lost.dcm'} (references series "
                        f"{_sorted_headers(OBLIQUE_SERIES)[0].SeriesInstanceUID}, which no image folder holds)"]
    with pytest.raises(DatasetError):
        discover_cases(images, labels)


def test_medseg_check_on_series_with_seg_labels(b_series, tmp_path, capsys, monkeypatch):
    from medseg.cli.check import main as check
    from medseg.io.dicomlabels import names

    monkeypatch.setattr(names, "_IDS", {})  # the names this test registers stay in this test

    images, labels = tmp_path / "images", tmp_path / "labels"
    shutil.copytree(b_series, images / "b")
    labels.mkdir()
    image = read_volume(images / "b")
    write_dicom_seg(organ_labels(image), images / "b", labels / "seg.dcm", class_names={5: "Liver", 1: "Spleen"})
    code = check(["--images", str(images), "--labels", str(labels), "--labels-map", "liver=Liver", "spleen=Spleen"])
    out = capsys.readouterr().out
    assert code == 0, out
    # The liver and spleen voxel counts of B's reference label map (tests/data/README.md), found by name.
    ids = [1000 + zlib.crc32(name) % 64000 for name in (b"liver", b"spleen")]  # the names' ids
    assert f"liver={ids[0]}, spleen={ids[1]}" in out
    rows = {line.split()[1]: line.split()[2] for line in out.splitlines() if line.startswith("  b ")}
    assert rows == {"liver": "366708", "spleen": "130634"}


def test_medseg_eval_of_a_folder_of_rtstruct_predictions(b_series, tmp_path):
    import csv

    from medseg.cli.evaluate import main as evaluate
    from medseg.io import write_volume

    image = read_volume(b_series)
    liver = organ_labels(image, ids=(5,))
    liver = liver.with_array((liver.array > 0).astype(np.uint8))
    (tmp_path / "pred").mkdir()
    shutil.copytree(b_series, tmp_path / "series" / "b")  # next to the predictions: found by UID
    write_rtstruct(liver, tmp_path / "series" / "b", tmp_path / "pred" / "b.dcm", class_names=["liver"])
    write_dicom_seg(liver, tmp_path / "series" / "b", tmp_path / "pred" / "c.dcm", class_names=["liver"])
    shrunk = liver.array.copy()
    shrunk[:, :, :10] = 0  # the SEG's reference: half the liver's slices, so its DSC is known and < 1
    write_volume(liver, tmp_path / "ref" / "b.nii.gz")
    write_volume(liver.with_array(shrunk), tmp_path / "ref" / "c.nii.gz")
    assert evaluate(["--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "--out", str(tmp_path / "o"),
                     "--no-figures"]) == 0
    rows = {r["case_id"]: float(r["dsc"]) for r in csv.DictReader((tmp_path / "o" / "metrics.csv").open())}
    kept = np.count_nonzero(shrunk)
    assert rows == {"b": 1.0, "c": pytest.approx(2 * kept / (kept + np.count_nonzero(liver.array)))}


@pytest.mark.slow
def test_medseg_infer_rtstruct_reads_back_as_its_nifti(b_series, run_dir, tmp_path, no_env_model):  # noqa: F811
    from _dicom_labels import cropped_series
    from medseg.cli.infer import main as infer
    from medseg.infer.bundle import load_bundle
    from medseg.infer.predictor import Predictor

    source = cropped_series(tmp_path / "ct", b_series, 200, 260, 64)
    probability = Predictor(load_bundle(run_dir)).predict_proba(read_volume(source)).array
    common = ["--model", str(run_dir), "--threshold", f"{float(np.quantile(probability, 0.6)):.6f}"]
    assert infer([str(source), "-o", str(tmp_path / "nii"), *common]) == 0
    assert infer([str(source), "-o", str(tmp_path / "rt"), "--format", "rtstruct", *common]) == 0
    expected = np.asarray(read_volume(tmp_path / "nii" / "ct_seg.nii.gz").array)
    assert 0.05 < expected.mean() < 0.95
    rt = tmp_path / "rt" / "ct_seg.dcm"
    assert pydicom.dcmread(rt).Modality == "RTSTRUCT"
    back = read_volume(rt, reference=source)
    assert back.meta["class_names"] == {1: "lesion"}
    # Outlines between pixel centres: the same voxels, even in an untrained model's speckle.
    assert np.array_equal(back.array == 1, expected == 1)
