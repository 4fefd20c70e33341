"""Write a label map as a DICOM RTSTRUCT of its source series (pydicom: highdicom has no RTSTRUCT).

One ROI per class (name, colour, generated AUTOMATIC by the algorithm named), one CLOSED_PLANAR contour
per outline and hole on each source image it crosses, each contour referencing its image. Outlines run
between pixel centres (OpenCV on a 2x upsampled mask), so :func:`.rtstruct.read_rtstruct` gives the
label map back, voxel centres being strictly inside or outside every contour.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from medseg.errors import InputError
from medseg.io.dicomlabels.geometry import frame_indices, frame_view
from medseg.io.dicomlabels.rtstruct import RTSTRUCT_SOP_CLASS
from medseg.io.dicomlabels.seg import PALETTE
from medseg.io.dicomlabels.source import source_headers
from medseg.io.volume import Volume

_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
           "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription",
           "FrameOfReferenceUID", "PositionReferenceIndicator")


def outlines(mask: np.ndarray) -> list[np.ndarray]:
    """Outlines and holes of a 2D mask ``(rows, cols)``: ``(N, 2)`` arrays of (column, row) pixel
    coordinates, a quarter pixel inside the mask's pixels, so that every pixel centre is strictly
    inside (mask) or outside (background) under the even-odd rule."""
    import cv2

    up = np.kron(np.ascontiguousarray(mask, dtype=np.uint8), np.ones((2, 2), dtype=np.uint8))
    found, _ = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    # Upsampled pixel u is centred at original coordinate (u - 0.5) / 2.
    return [(c.reshape(-1, 2).astype(np.float64) - 0.5) / 2.0 for c in found if len(c) >= 3]


def _contours(label: Volume, headers: list, values: list[int], where: Path) -> dict[int, list]:
    """value -> [(source header, (N, 3) LPS points)] of every outline on every source image."""
    out: dict[int, list] = {v: [] for v in values}
    array = np.asarray(label.array)
    for ds in headers:
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        dr, dc = (float(v) for v in ds.PixelSpacing)
        frame = frame_view(array, frame_indices(label.affine, label.shape, ipp, iop, (dr, dc), int(ds.Rows),
                                                int(ds.Columns), where, f"label map slice for {Path(ds.filename).name}"))
        for value in values:
            mask = frame == value
            if not mask.any():
                continue
            for cr in outlines(mask):
                points = ipp + np.outer(cr[:, 0] * dc, iop[:3]) + np.outer(cr[:, 1] * dr, iop[3:])
                out[value].append((ds, points))
    return out


def _image_ref(ds):
    from pydicom.dataset import Dataset

    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return ref


def _references(rt, headers: list) -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as Seq

    first = headers[0]
    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ContourImageSequence = Seq([_image_ref(ds) for ds in headers])
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired, as required)
    study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study.RTReferencedSeriesSequence = Seq([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = first.FrameOfReferenceUID
    frame.RTReferencedStudySequence = Seq([study])
    rt.ReferencedFrameOfReferenceSequence = Seq([frame])


def _roi(rt, number: int, name: str, rgb, contours: list, frame_uid: str, algorithm: str) -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as Seq

    roi = Dataset()
    roi.ROINumber, roi.ReferencedFrameOfReferenceUID, roi.ROIName = number, frame_uid, name[:64]
    roi.ROIGenerationAlgorithm = "AUTOMATIC"
    roi.ROIGenerationDescription = algorithm[:64]
    rt.StructureSetROISequence.append(roi)
    item = Dataset()
    item.ReferencedROINumber, item.ROIDisplayColor = number, [int(c) for c in rgb]
    if contours:  # an empty class: its ROI is listed, without a (then empty, invalid) ContourSequence
        item.ContourSequence = Seq()
    for n, (ds, points) in enumerate(contours, start=1):
        contour = Dataset()
        contour.ContourNumber = n
        contour.ContourImageSequence = Seq([_image_ref(ds)])
        contour.ContourGeometricType = "CLOSED_PLANAR"
        contour.NumberOfContourPoints = len(points)
        contour.ContourData = [f"{v:.4f}".rstrip("0").rstrip(".") for v in points.ravel()]
        item.ContourSequence.append(contour)
    rt.ROIContourSequence.append(item)
    observation = Dataset()
    observation.ObservationNumber, observation.ReferencedROINumber = number, number
    observation.RTROIInterpretedType, observation.ROIInterpreter = "ORGAN", ""
    rt.RTROIObservationsSequence.append(observation)


def _dataset(first, algorithm_name: str, version: str):
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.sequence import Sequence as Seq
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = RTSTRUCT_SOP_CLASS, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    rt = pydicom.Dataset()
    rt.file_meta = meta
    for key in _COPIED:
        rt[key] = first[key] if key in first else pydicom.DataElement(pydicom.datadict.tag_for_keyword(key),
                                                                     pydicom.datadict.dictionary_VR(key), "")
    now = datetime.datetime.now()
    rt.SOPClassUID, rt.SOPInstanceUID = RTSTRUCT_SOP_CLASS, meta.MediaStorageSOPInstanceUID
    rt.Modality, rt.SeriesInstanceUID = "RTSTRUCT", generate_uid()
    rt.SeriesNumber, rt.InstanceNumber = int(first.get("SeriesNumber") or 0) + 2000, 1
    rt.SeriesDescription = f"{algorithm_name} structures"[:64]
    rt.Manufacturer, rt.ManufacturerModelName = "medseg", algorithm_name[:64]
    rt.SoftwareVersions = version[:64]
    rt.StructureSetLabel = algorithm_name[:16]
    rt.StructureSetDate, rt.StructureSetTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    rt.ContentDate, rt.ContentTime = rt.StructureSetDate, rt.StructureSetTime
    rt.InstanceCreationDate, rt.InstanceCreationTime = rt.StructureSetDate, rt.StructureSetTime
    rt.OperatorsName = ""
    rt.StructureSetROISequence, rt.ROIContourSequence, rt.RTROIObservationsSequence = Seq(), Seq(), Seq()
    return rt


def write_rtstruct(label_volume: Volume, source_series_dir: str | os.PathLike, out_path: str | os.PathLike, *,
                   class_names: Mapping[int, str] | Sequence[str], colours: Mapping[int, tuple] | None = None,
                   algorithm_name: str = "medseg", algorithm_version: str | None = None,
                   model_sha256: str | None = None, overwrite: bool = False) -> Path:
    """Write ``label_volume`` as an RTSTRUCT of the series; arguments as
    :func:`~medseg.io.dicomlabels.seg_write.write_dicom_seg` (the model SHA-256 goes into each ROI's
    generation description). Returns ``out_path``; raises InputError as that function does."""
    import medseg
    from medseg.io.atomic import atomic_path, check_output_path

    out_path = check_output_path(out_path, overwrite=overwrite, protect=[label_volume.meta.get("source_path")])
    if not isinstance(class_names, Mapping):
        class_names = {k + 1: str(name) for k, name in enumerate(class_names)}
    source = Path(source_series_dir)
    headers = source_headers(source, label_volume.meta.get("series_uid"))
    array = np.asarray(label_volume.array)
    present = {int(v) for v in np.unique(array) if v != 0}
    values = sorted(present | {int(v) for v in class_names if int(v) > 0})
    contours = _contours(label_volume, headers, values, source)
    version = algorithm_version or medseg.__version__
    rt = _dataset(headers[0], algorithm_name, f"medseg {medseg.__version__}")
    _references(rt, headers)
    described = f"{algorithm_name} {version}" + (f" model sha256 {model_sha256}" if model_sha256 else "")
    for number, value in enumerate(values, start=1):
        rgb = (colours or {}).get(value) or PALETTE[(number - 1) % len(PALETTE)]
        _roi(rt, number, str(class_names.get(value, f"label {value}")), rgb, contours[value],
             headers[0].FrameOfReferenceUID, described)
    with atomic_path(out_path, suffix=".dcm") as tmp:
        rt.save_as(tmp, enforce_file_format=True)
    return out_path
