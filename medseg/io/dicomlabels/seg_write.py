"""Write a label map as one DICOM SEG (highdicom) that references its source image series.

One BINARY segment per class (name, colour, SNOMED CT codes where medseg knows the structure, the
algorithm's name, version and model SHA-256), the patient and study of the source images, a new
series. Frames are taken from the label map where each source image lies (its own plane position),
so a label map in any axis order or flip of the series' voxels gives the same SEG.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from medseg.errors import InputError
from medseg.io.dicomlabels.geometry import frame_indices, frame_view
from medseg.io.dicomlabels.seg import PALETTE
from medseg.io.dicomlabels.seg_save import save_seg
from medseg.io.dicomlabels.source import source_headers
from medseg.io.volume import Volume

#: SNOMED CT codes of structures medseg's tasks name: (code, meaning); anything else is "Tissue".
_SNOMED = {"liver": ("10200004", "Liver"), "spleen": ("78961009", "Spleen"), "kidney": ("64033007", "Kidney"),
           "aorta": ("15825003", "Aorta"), "pancreas": ("15776009", "Pancreas"),
           "stomach": ("69695003", "Stomach"), "lesion": ("52988006", "Lesion"), "tumour": ("108369006", "Neoplasm"),
           "tumor": ("108369006", "Neoplasm"), "brain": ("12738006", "Brain")}
_ANATOMY = ("123037004", "Anatomical Structure")
_ALTERED = ("49755003", "Morphologically Altered Structure")


def _codes(name: str):
    from pydicom.sr.coding import Code

    key = name.lower().split()[0].split("_")[0] if name.strip() else ""
    code, meaning = _SNOMED.get(key, ("85756007", "Tissue"))
    category = _ALTERED if code in ("52988006", "108369006") else _ANATOMY
    return Code(category[0], "SCT", category[1]), Code(code, "SCT", meaning)


def _placements(label: Volume, headers: list, where: Path) -> list:
    """Where each source image's pixels lie in ``label``'s array (multi-frame sources: per frame)."""
    out = []
    for ds in headers:
        ipp, iop, spacing = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"), ds.get("PixelSpacing")
        if ipp is None or iop is None or spacing is None:
            raise InputError(where, "source images with ImagePositionPatient, ImageOrientationPatient and "
                             "PixelSpacing", f"{Path(ds.filename).name} without them")
        out.append(frame_indices(label.affine, label.shape, ipp, iop, spacing, int(ds.Rows), int(ds.Columns),
                                 where, f"label map slice for {Path(ds.filename).name}"))
    return out


def _descriptions(values: Sequence[int], class_names: Mapping[int, str], colours, algorithm):
    import highdicom as hd

    out = []
    for number, value in enumerate(values, start=1):
        name = str(class_names.get(value, f"label {value}"))
        category, kind = _codes(name)
        rgb = colours.get(value) if colours is not None else None
        rgb = rgb if rgb is not None else PALETTE[(number - 1) % len(PALETTE)]
        out.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name, segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, display_color=hd.color.CIELabColor.from_rgb(*rgb)))
    return out


def write_dicom_seg(label_volume: Volume, source_series_dir: str | os.PathLike, out_path: str | os.PathLike, *,
                    class_names: Mapping[int, str] | Sequence[str], colours: Mapping[int, tuple] | None = None,
                    algorithm_name: str = "medseg", algorithm_version: str | None = None,
                    model_sha256: str | None = None, overwrite: bool = False,
                    omit_empty_frames: bool = True) -> Path:
    """Write ``label_volume`` (values 0 background, ``v > 0`` a class) as a DICOM SEG of the series.

    Args:
        label_volume: a label map on the series' voxels (any axis order/flip of them).
        source_series_dir: the image series (folder, or one multi-frame file) it was made from.
        out_path: the ``.dcm`` file to write (atomically).
        class_names: label value -> segment name (a sequence: value ``k + 1`` is ``class_names[k]``);
            values present but unnamed are called ``"label <v>"``. Every named value gets a segment,
            present or not.
        colours: label value -> (r, g, b) 0..255; default :data:`~medseg.io.dicomlabels.seg.PALETTE`.
        algorithm_name, algorithm_version, model_sha256: the Algorithm Identification of each
            segment (version default: medseg's).
        omit_empty_frames: leave out frames without any segment pixel (smaller; some viewers want
            every frame: pass False).

    Returns:
        ``out_path`` as a Path.

    Raises:
        InputError: blank UIDs in the source (an anonymized series: see :func:`.source.source_headers`),
            a label map not on the series' grid, an existing output without ``overwrite``.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    import medseg
    from medseg.io.atomic import atomic_path, check_output_path

    out_path = check_output_path(out_path, overwrite=overwrite, protect=[label_volume.meta.get("source_path")])
    if not isinstance(class_names, Mapping):
        class_names = {k + 1: str(name) for k, name in enumerate(class_names)}
    source = Path(source_series_dir)
    headers = source_headers(source, label_volume.meta.get("series_uid"))
    pixels, values = _segment_numbers(np.asarray(label_volume.array), class_names, source,
                                      _placements(label_volume, headers, source))
    present = bool(pixels.size) and int(pixels.max()) > 0
    version = algorithm_version or medseg.__version__
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=version,
        parameters={"model_sha256": model_sha256} if model_sha256 else None)
    series_number = int(headers[0].get("SeriesNumber") or 0) + 1000
    seg = hd.seg.Segmentation(
        source_images=headers, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_descriptions(values, class_names, colours, algorithm),
        series_instance_uid=hd.UID(), series_number=series_number, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="medseg", manufacturer_model_name=algorithm_name, software_versions=f"medseg {medseg.__version__}",
        device_serial_number="0", series_description=f"{algorithm_name} segmentation"[:64],
        content_label="MEDSEG", content_description=f"{algorithm_name} {version} automatic segmentation"[:64],
        omit_empty_frames=omit_empty_frames and present)
    with atomic_path(out_path, suffix=".dcm") as tmp:
        save_seg(seg, tmp)
    return out_path


def _segment_numbers(labels: np.ndarray, class_names: Mapping[int, str], where: Path, placements=None):
    """``(pixels, values)``: the segment number of each frame pixel (0 none, ``k`` for ``values[k - 1]``)
    and the label values that get a segment (named values, present or not, and present unnamed ones),
    sorted.

    ``labels``: the label map's array; ``placements``: the frames' :func:`.geometry.frame_indices` in it
    (None: ``labels`` is ``(frames, rows, cols)`` itself). ``pixels`` is ``(frames, rows, cols)``,
    C-contiguous: highdicom copies each segment's frame in C order per segment, which from a transposed
    view (medseg's arrays are [column, row, slice]) would be a strided copy per segment and frame. Each
    frame is gathered once, through a lookup (value -> segment number, unnamed values -> a sentinel)
    unless the values already are the segment numbers; a second pass only when unnamed values are
    present. The integer and sign checks see the whole array.
    """
    if labels.dtype.kind not in "ui":
        if not np.array_equal(labels, np.round(labels)):
            raise InputError(where, "a label map of integer class values", f"{labels.dtype} values with fractions")
        labels = labels.astype(np.int64)
    low = int(labels.min()) if labels.size and labels.dtype.kind == "i" else 0
    if low < 0:
        raise InputError(where, "a label map of values >= 0", f"the value {low}")
    top = int(labels.max()) if labels.size else 0
    frames = list(labels) if placements is None else [frame_view(labels, p) for p in placements]
    values = sorted({int(v) for v in class_names if int(v) > 0})
    if values == list(range(1, len(values) + 1)) and top <= len(values) and labels.dtype in (np.uint8, np.uint16):
        return _gathered(frames, None), values  # already the segment numbers (a binary or class-index label map)
    if top < 1 << 16 and len(values) < (1 << 16) - 1:
        pixels = _gathered(frames, _lookup(values, top))
        if not pixels.size or int(pixels.max()) <= len(values):  # the sentinel (unnamed value) is absent
            return pixels, values
    raw = _gathered(frames, None)
    present = {int(v) for v in np.unique(raw) if v != 0}  # unnamed values present: each gets a segment
    values = sorted(present | set(values))
    return _gathered(frames, _lookup(values, top)), values


def _gathered(frames: list, lookup: np.ndarray | None) -> np.ndarray:
    """The 2D ``frames`` (views of any layout, one shape) as one C-contiguous ``(frames, rows, cols)``
    array, each value through ``lookup`` (indices ``0..len(lookup) - 1``) where given."""
    out = np.empty((len(frames), *frames[0].shape), dtype=frames[0].dtype if lookup is None else lookup.dtype)
    for frame, view in zip(out, frames):
        if lookup is None:
            frame[...] = view
        else:  # clip: no bounds check (every value is within the table) and no buffered output
            np.take(lookup, view, out=frame, mode="clip")
    return out


def _lookup(values: Sequence[int], top: int) -> np.ndarray:
    """Label value -> segment number table for values ``0..max(top, values)``; values not in ``values``
    (but 0) map to a sentinel above every segment number."""
    dtype = np.uint8 if len(values) < 255 else np.uint16
    lookup = np.full(max([top, *values]) + 1, np.iinfo(dtype).max, dtype=dtype)
    lookup[0] = 0
    lookup[list(values)] = np.arange(1, len(values) + 1)
    return lookup
