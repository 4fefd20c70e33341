"""DICOM SEG (issue 22): written by medseg (highdicom), read back by highdicom and by medseg, placed on
the source grid, validated by dciodvfy, scored by medseg-eval; patient B's blank UIDs refused."""

from __future__ import annotations

import csv
import shutil

import zlib

import numpy as np
import pydicom
import pytest

from _dicom_labels import (B_LABELS, B_SERIES, OBLIQUE_SERIES, cropped_series, dciodvfy_errors, highdicom_frames, highdicom_labels,
                           oblique_labels, organ_labels, reversed_series, series_with_uids, with_new_uids)
from _helpers import no_env_model, run_dir  # noqa: F401  (fixtures)
from medseg.errors import InputError
from medseg.io import read_volume, write_volume
from medseg.io.dicomlabels import write_dicom_seg

NAMES = {5: "Liver", 1: "Spleen"}


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """Patient B given UIDs, the same stored in reverse slice order, and the oblique MR series."""
    root = tmp_path_factory.mktemp("series")
    b = series_with_uids(root / "b")
    return {"b": b, "reversed": reversed_series(root / "b_reversed", b), "oblique": OBLIQUE_SERIES}


def _labels(name, image):
    return oblique_labels(image) if name == "oblique" else organ_labels(image)


@pytest.mark.parametrize("name", ["b", "reversed", "oblique"])
def test_written_seg_read_by_highdicom_equals_the_label_map(series, name, tmp_path):
    image = read_volume(series[name])
    labels = _labels(name, image)
    values = sorted(int(v) for v in np.unique(labels.array) if v)
    assert len(values) == 2 and all(np.count_nonzero(labels.array == v) > 1000 for v in values)
    nifti = write_volume(labels, tmp_path / "labels.nii.gz")
    seg = write_dicom_seg(labels, series[name], tmp_path / "seg.dcm",
                          class_names=NAMES if name != "oblique" else ["tissue", "block"])
    # highdicom numbers the segments 1.. in the order of the label values.
    expected = np.zeros(labels.shape, dtype=np.uint8)
    for number, value in enumerate(values, start=1):
        expected[np.asarray(labels.array) == value] = number
    assert np.array_equal(highdicom_frames(seg, series[name]), expected)  # frame by source image
    if name != "oblique":  # highdicom's volume, placed by highdicom on the NIfTI's grid
        assert np.array_equal(highdicom_labels(seg, nifti), expected)
    # medseg's own reader (pydicom, frame by frame) gives the label map back on the image's grid.
    back = read_volume(seg, reference=series[name])
    assert back.same_grid(image)
    for number, value in enumerate(values, start=1):
        assert np.array_equal(back.array == number, np.asarray(labels.array) == value)


def test_reversed_series_really_is_stored_the_other_way(series):
    b, rev = read_volume(series["b"]), read_volume(series["reversed"])
    assert b.orientation == "LPS" and rev.orientation == "RPI"  # columns and slices run the other way
    assert np.array_equal(rev.onto_grid_of(b).array, b.array)  # the same voxels in the world


def _need_dciodvfy():
    if shutil.which("dciodvfy"):
        return
    if shutil.which("apt-get"):
        pytest.fail("dciodvfy is missing although apt-get is available: install Debian's dicom3tools "
                    "(scripts/test does so when run as root)")
    pytest.skip("dciodvfy (Debian dicom3tools) is not installed and apt-get is unavailable to install it")


@pytest.mark.parametrize("name", ["b", "oblique"])
def test_dciodvfy_finds_no_error_in_the_written_seg(series, name, tmp_path):
    _need_dciodvfy()
    source = series[name]
    image = read_volume(source)
    seg = write_dicom_seg(_labels(name, image), source, tmp_path / "seg.dcm", class_names=NAMES,
                          model_sha256="0" * 64)
    if name == "oblique":
        # Its UIDs have the illegal root 0.0.0.0: the only errors are where the SEG repeats them.
        errors = dciodvfy_errors(seg)
        assert errors and all("Illegal root for UID" in line and '"0.0.0.0.' in line for line in errors)
        source = with_new_uids(tmp_path / "oblique", source)
        seg = write_dicom_seg(_labels(name, read_volume(source)), source, tmp_path / "seg.dcm", class_names=NAMES,
                              overwrite=True)
    assert dciodvfy_errors(seg) == []
    # The validator does report errors: a SEG missing a required attribute is caught.
    ds = pydicom.dcmread(seg)
    del ds.SegmentSequence[0].SegmentLabel
    ds.save_as(tmp_path / "broken.dcm")
    assert any("SegmentLabel" in line.replace(" ", "") for line in dciodvfy_errors(tmp_path / "broken.dcm"))


def test_patient_b_as_shipped_is_one_clear_line(tmp_path):
    image = read_volume(B_SERIES)
    with pytest.raises(InputError) as info:
        write_dicom_seg(organ_labels(image), B_SERIES, tmp_path / "seg.dcm", class_names=NAMES)
    message = str(info.value)
    assert "\n" not in message and str(B_SERIES) in message
    assert "blank SOPClassUID, SOPInstanceUID" in message and "20 of 20 files" in message
    assert "give the images their UIDs" in message and "--format nifti" in message
    assert not (tmp_path / "seg.dcm").exists() and list(tmp_path.iterdir()) == []


def test_seg_attributes_reference_the_source_and_keep_patient_and_study(series, tmp_path):
    image = read_volume(series["b"])
    labels = organ_labels(image)
    labels.array[:, :, 15:] = 0  # five slices without any segment
    seg_path = write_dicom_seg(labels, series["b"], tmp_path / "seg.dcm", class_names=NAMES,
                               colours={5: (200, 100, 50)}, model_sha256="ab" * 32, algorithm_version="9.9")
    seg = pydicom.dcmread(seg_path)
    src = pydicom.dcmread(next(series["b"].iterdir()), stop_before_pixels=True)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
    assert (seg.PatientID, seg.StudyInstanceUID) == (src.PatientID, src.StudyInstanceUID)
    assert seg.SeriesInstanceUID != src.SeriesInstanceUID and seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Spleen", "Liver"]  # value order: 1, 5
    liver = seg.SegmentSequence[1]
    algorithm = liver.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("medseg", "9.9")
    assert algorithm.AlgorithmParameters == "model_sha256=" + "ab" * 32
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # SNOMED CT liver
    rgb = [int(v) for v in liver.RecommendedDisplayCIELabValue]
    assert len(rgb) == 3 and rgb != [int(v) for v in seg.SegmentSequence[0].RecommendedDisplayCIELabValue]
    # Only frames holding a segment are stored (omit_empty_frames): a frame per segment and slice.
    expected = sum(int(np.any(labels.array[:, :, k] == v)) for v in (1, 5) for k in range(20))
    assert int(seg.NumberOfFrames) == expected <= 2 * 15


def test_reading_a_seg_finds_its_series_next_to_it_or_says_which_is_missing(series, tmp_path, monkeypatch):
    root = tmp_path / "study"
    shutil.copytree(series["b"], root / "images" / "b")
    (root / "labels").mkdir()
    image = read_volume(root / "images" / "b")
    seg = write_dicom_seg(organ_labels(image), root / "images" / "b", root / "labels" / "x.dcm", class_names=NAMES)
    back = read_volume(seg)  # no reference given: found by SeriesInstanceUID in ../images/b
    assert back.same_grid(image) and back.meta["class_names"] == {1: "Spleen", 2: "Liver"}
    assert back.case_id == "x" and back.meta["reference_path"] == str(root / "images" / "b")
    shutil.move(root / "images", tmp_path / "elsewhere")
    with pytest.raises(InputError, match=r"referenced image series \(SeriesInstanceUID [0-9.]+\).*no such series"
                                         r".*MEDSEG_DICOM_PATH"):
        read_volume(seg)
    monkeypatch.setenv("MEDSEG_DICOM_PATH", str(tmp_path / "elsewhere"))
    assert read_volume(seg).meta["reference_path"] == str(tmp_path / "elsewhere" / "b")
    with pytest.raises(InputError, match="an image of series"):
        read_volume(seg, reference=read_volume(series["reversed"]))


def _hand_seg(series_dir, tmp_path, pixel_array, kind="BINARY", names=("big", "small")):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(f) for f in sorted(series_dir.iterdir())]
    sources.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    algorithm = hd.AlgorithmIdentificationSequence(name="hand", family=codes.cid7162.ArtificialIntelligence,
                                                   version="1")
    descriptions = [hd.seg.SegmentDescription(n + 1, name, codes.SCT.Tissue, codes.SCT.Tissue,
                                              hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm)
                    for n, name in enumerate(names)]
    seg = hd.seg.Segmentation(sources, pixel_array, kind, descriptions, hd.UID(), 5, hd.UID(), 1, "t", "t", "1", "1",
                              max_fractional_value=255)
    seg.save_as(tmp_path / "hand.dcm")
    return tmp_path / "hand.dcm", sources


def test_overlapping_segments_go_to_the_smaller_one_and_fractional_is_refused(series, tmp_path, caplog):
    image = read_volume(series["b"])
    masks = np.zeros((20, 512, 512, 2), dtype=bool)
    masks[5:10, 100:200, 100:300, 0] = True  # big: 5 x 100 x 200
    masks[6:8, 150:160, 120:140, 1] = True  # small, inside big: 2 x 10 x 20
    path, sources = _hand_seg(series["b"], tmp_path, masks)
    label = read_volume(path, reference=image)
    assert np.count_nonzero(label.array == 2) == 2 * 10 * 20
    assert np.count_nonzero(label.array == 1) == 5 * 100 * 200 - 2 * 10 * 20
    assert "belong to several segments" in caplog.text
    # Position check, by hand: frame f of the sorted sources is slice f (B is stored LPS, ascending z),
    # row r is j and column c is i.
    assert label.array[120, 150, 6] == 2 and label.array[119, 150, 6] == 1 and label.array[120, 150, 8] == 1
    (tmp_path / "f").mkdir()
    fractional, _ = _hand_seg(series["b"], tmp_path / "f", masks[..., :1].astype(np.float32) * 0.5,
                              kind="FRACTIONAL", names=("p",))
    with pytest.raises(InputError, match="expected a BINARY DICOM SEG.*found SegmentationType FRACTIONAL"):
        read_volume(fractional, reference=image)


def test_labels_map_by_segment_name(series, tmp_path, monkeypatch):
    from medseg.io.classes import ClassSpec
    from medseg.io.dicomlabels import names

    monkeypatch.setattr(names, "_IDS", {})  # the names this test registers stay in this test

    image = read_volume(series["b"])
    labels = organ_labels(image)
    seg = write_dicom_seg(labels, series["b"], tmp_path / "seg.dcm", class_names=NAMES)
    spec = ClassSpec.parse(["liver=liver", "spleen=1"])  # by name (any case) and by segment number
    back = read_volume(seg, reference=image)
    assert np.array_equal(spec.mask(back.array, 0), labels.array == 5)
    assert np.array_equal(spec.mask(back.array, 1), labels.array == 1)
    liver = 1000 + zlib.crc32(b"liver") % 64000  # the name's id: CRC-32 of its lower-case form
    assert spec.ids[0] == (liver,) and back.meta["class_names"] == {liver: "Liver", 1: "Spleen"}


@pytest.mark.slow
def test_medseg_infer_dicom_seg_equals_its_nifti_and_eval_scores_it_alike(series, run_dir, tmp_path, capsys,
                                                                       no_env_model):  # noqa: F811
    from medseg.cli.evaluate import main as evaluate
    from medseg.cli.infer import main as infer
    from medseg.infer.bundle import load_bundle, read_bundle_info
    from medseg.infer.predictor import Predictor

    source = cropped_series(tmp_path / "study" / "ct", series["b"], 200, 260, 96)  # liver and ribs, 96 x 96 x 20
    image = read_volume(source)
    probability = Predictor(load_bundle(run_dir)).predict_proba(image).array
    threshold = float(np.quantile(probability, 0.7))  # an untrained model: pick a threshold that segments
    common = ["--model", str(run_dir), "--threshold", f"{threshold:.6f}"]
    out = tmp_path / "study" / "pred"  # next to the series: medseg-eval finds the SEG's images there
    assert infer([str(source), "-o", str(tmp_path / "nii"), *common]) == 0
    assert infer([str(source), "-o", str(out), "--format", "dicom-seg", *common]) == 0
    nifti, seg = tmp_path / "nii" / "ct_seg.nii.gz", out / "ct_seg.dcm"
    assert str(seg) in capsys.readouterr().out and not (out / "ct_seg.nii.gz").exists()
    expected = np.asarray(read_volume(nifti).array)
    assert 0.05 < expected.mean() < 0.95
    assert np.array_equal(highdicom_labels(seg, nifti), expected)
    ds = pydicom.dcmread(seg)
    algorithm = ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmParameters == "model_sha256=" + read_bundle_info(run_dir)["model_sha256"]
    assert ds.SegmentSequence[0].SegmentLabel == "lesion"

    # medseg-eval: the SEG as prediction scores as its NIfTI does, against soft tissue (> 0 HU).
    ref_path = write_volume(image.with_array((np.asarray(image.array) > 0).astype(np.uint8)),
                            tmp_path / "ref" / "ct.nii.gz")
    dsc = {}
    for kind, pred in (("nifti", nifti), ("seg", seg)):
        assert evaluate(["--pred", str(pred), "--ref", str(ref_path), "--out", str(tmp_path / kind),
                         "--no-figures"]) == 0
        dsc[kind] = float(next(csv.DictReader((tmp_path / kind / "metrics.csv").open()))["dsc"])
    assert dsc["seg"] == dsc["nifti"] and 0 < dsc["nifti"] < 1


def test_medseg_infer_dicom_seg_of_patient_b_as_shipped_is_one_clear_line(run_dir, tmp_path, capsys,
                                                                          no_env_model):  # noqa: F811
    from medseg.cli.infer import main as infer

    code = infer([str(B_SERIES), "-o", str(tmp_path), "--format", "dicom-seg", "--model", str(run_dir)])
    err = capsys.readouterr().err
    assert code == 1 and list(tmp_path.iterdir()) == []
    lines = [line for line in err.splitlines() if line.startswith("medseg-infer: error")]
    assert len(lines) == 1 and "blank SOPClassUID" in lines[0] and "give the images their UIDs" in lines[0]


def test_nifti_input_with_dicom_format_is_refused(run_dir, tmp_path, capsys, no_env_model):  # noqa: F811
    from medseg.cli.infer import main as infer

    code = infer([str(B_LABELS), "-o", str(tmp_path / "o"), "--format", "dicom-seg", "--model", str(run_dir)])
    assert code == 1 and "expected a DICOM series for --format dicom-seg" in capsys.readouterr().err


def test_names_in_labels_map_get_ids_of_their_own(monkeypatch):
    from medseg.io.classes import ClassSpec
    from medseg.io.dicomlabels import names

    monkeypatch.setattr(names, "_IDS", {})
    import zlib

    def expected(name):  # independent: CRC-32 of the lower-case, single-spaced name
        return 1000 + zlib.crc32(name.encode()) % 64000

    spec = ClassSpec.parse(["liver=Liver", "tumour=Liver Tumor, tumor", "spleen=1"])
    assert spec.ids == ((expected("liver"),), (expected("liver tumor"), expected("tumor")), (1,))
    assert ClassSpec.parse(["organ=LIVER"]).ids == ((expected("liver"),),)  # the same name, any case: the same id
    assert names.named_id("liver  tumor") == expected("liver tumor") and names.named_id("kidney") is None
    # Not the order names were met: another process asking for them the other way round agrees.
    monkeypatch.setattr(names, "_IDS", {})
    assert ClassSpec.parse(["spleen=Spleen", "liver=Liver"]).ids == ((expected("spleen"),), (expected("liver"),))
    assert all(1000 <= i < 65000 for v in spec.ids[:2] for i in v)
    for bad in ("liver=x", "liver=5x", "liver=Liver,"):
        with pytest.raises(InputError, match="--labels-map entries NAME=IDS"):
            ClassSpec.parse([bad])


def test_segment_numbers_of_named_absent_and_unnamed_values(tmp_path):
    from medseg.io.dicomlabels.seg_write import _segment_numbers

    labels = np.array([[[0, 5, 1], [9, 5, 0]]], dtype=np.uint8)
    # Named 1, 5 and 7 (7 absent: a segment all the same); 9 present but unnamed: a segment of its own.
    pixels, values = _segment_numbers(labels, {5: "liver", 1: "spleen", 7: "kidney"}, tmp_path)
    assert values == [1, 5, 7, 9]
    assert pixels.tolist() == [[[0, 2, 1], [4, 2, 0]]]
    # Every present value named: no second pass, the same numbering.
    pixels, values = _segment_numbers(labels, {5: "a", 1: "b", 9: "c"}, tmp_path)
    assert values == [1, 5, 9] and pixels.tolist() == [[[0, 2, 1], [3, 2, 0]]]
    # Values already 1..N (a class-index label map): the values themselves.
    index = np.array([[[0, 1], [2, 0]]], dtype=np.uint8)
    pixels, values = _segment_numbers(index, {1: "a", 2: "b"}, tmp_path)
    assert pixels.tolist() == index.tolist() and values == [1, 2]
    # Frames placed in a bigger array, transposed (as medseg's [column, row, slice] arrays hold them):
    # gathered C-contiguous, (frame, row, column).
    volume = np.zeros((3, 2, 2), dtype=np.uint8)  # [column, row, slice]
    volume[2, 0, 1], volume[0, 1, 0] = 5, 9
    placements = [((slice(None), slice(None), k), True) for k in (0, 1)]
    pixels, values = _segment_numbers(volume, {5: "a", 9: "b"}, tmp_path, placements)
    assert values == [5, 9] and pixels.flags.c_contiguous
    assert pixels.tolist() == [[[0, 0, 0], [2, 0, 0]], [[0, 0, 1], [0, 0, 0]]]
    # ... unless a value above N is present: it gets a segment (3 here).
    pixels, values = _segment_numbers(np.array([[[0, 1, 3]]], dtype=np.uint16), {1: "a", 2: "b"}, tmp_path)
    assert values == [1, 2, 3] and pixels.tolist() == [[[0, 1, 3]]]
    # Large values (uint16, int64, whole floats) map the same way.
    big = np.array([[[0, 60000, 300]]], dtype=np.int64)
    pixels, values = _segment_numbers(big, {300: "a"}, tmp_path)
    assert values == [300, 60000] and pixels.tolist() == [[[0, 2, 1]]]
    pixels, values = _segment_numbers(np.array([[[0.0, 2.0]]]), {2: "a"}, tmp_path)
    assert values == [2] and pixels.tolist() == [[[0, 1]]]
    with pytest.raises(InputError, match="integer class values"):
        _segment_numbers(np.array([[[0.5]]]), {1: "a"}, tmp_path)
    with pytest.raises(InputError, match="values >= 0"):
        _segment_numbers(np.array([[[-1, 2]]], dtype=np.int16), {2: "a"}, tmp_path)


def test_fast_save_writes_the_bytes_pydicom_writes_and_leaves_pydicom_settings(series, tmp_path):
    """The SEG writer's save (ambiguous VRs corrected once, items marked as in the file's encoding, the
    per-frame items encoded by medseg with each shared item once) gives byte for byte what pydicom's
    own save_as gives, for sources with raw elements (read from files): patient B (JPEG 2000, a
    character set) and the oblique MR (none); with two segments on one plane (the frames share that
    plane's source image item); and it leaves pydicom's validation mode and the dataset as they were."""
    import highdicom as hd
    from pydicom import config

    from medseg.io.dicomlabels.seg_save import save_seg
    from medseg.io.dicomlabels.source import source_headers

    for name in ("b", "oblique"):
        headers = source_headers(series[name])
        pixels = np.zeros((len(headers), int(headers[0].Rows), int(headers[0].Columns)), dtype=np.uint8)
        pixels[1, 2:5, 3:9], pixels[1, 9, 9], pixels[2, 7, 7] = 1, 2, 2
        code = hd.sr.CodedConcept("85756007", "SCT", "Tissue")
        descriptions = [hd.seg.SegmentDescription(
            segment_number=n, segment_label=f"s{n}", segmented_property_category=code, segmented_property_type=code,
            algorithm_type="MANUAL") for n in (1, 2)]
        seg = hd.seg.Segmentation(
            source_images=headers, pixel_array=pixels, segmentation_type="BINARY",
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=1,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="m", manufacturer_model_name="m",
            software_versions="1", device_serial_number="0")
        seg.save_as(tmp_path / "plain.dcm")
        mode = config.settings.writing_validation_mode
        per_frame = seg.PerFrameFunctionalGroupsSequence
        save_seg(seg, tmp_path / "fast.dcm")
        assert config.settings.writing_validation_mode == mode
        assert seg.PerFrameFunctionalGroupsSequence is per_frame
        assert (tmp_path / "fast.dcm").read_bytes() == (tmp_path / "plain.dcm").read_bytes()
        back = pydicom.dcmread(tmp_path / "fast.dcm")
        assert back.NumberOfFrames == 3
        sources = [item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                   for item in back.PerFrameFunctionalGroupsSequence]
        assert len(set(sources)) == 2  # plane 1 referenced by both segments: the shared item, written twice
