"""DICOM SEG: read one as a label map on its image's grid; write a label map as one (highdicom).

Reading uses pydicom only (the frames' own plane positions, :mod:`.geometry`), so the tests can check
it against highdicom's reader. Writing uses highdicom, which builds the IOD (functional groups,
dimension index, derivation references); medseg chooses what goes in it.

Rules of the reader:

- BINARY segments: each frame is put where its PlanePositionSequence says, on the referenced image's
  grid (any slice order, axis order or flip); a frame off that grid is one clear error.
- FRACTIONAL segmentations are refused (one line): a label map holds one class per voxel, and
  thresholding a probability is a decision medseg does not take silently.
- Overlapping segments: the voxel goes to the segment with fewer voxels (the more specific structure:
  a tumour inside its organ, an organ inside a body outline); the overlap is logged.
- Label values: the segment number, or the id of ``--labels-map NAME=SegmentLabel`` (:mod:`.names`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from medseg.errors import InputError
from medseg.io.dicomlabels.geometry import frame_indices, frame_view
from medseg.io.dicomlabels.names import named_id
from medseg.io.volume import Volume

log = logging.getLogger(__name__)

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
#: A colour per segment (RGB), cycled: distinct on a grey CT, as 3D Slicer's first colours.
PALETTE = ((241, 214, 145), (216, 101, 79), (128, 174, 128), (111, 184, 210), (183, 156, 220),
           (221, 130, 101), (144, 238, 144), (192, 104, 88), (220, 245, 20), (78, 63, 0))


def _item(ds, keyword: str):
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _frame_geometry(shared, per_frame):
    """(IPP, IOP, PixelSpacing) of one frame: per-frame groups first, then the shared ones."""
    found = {}
    for group in (per_frame, shared):
        if group is None:
            continue
        for seq, key in (("PlanePositionSequence", "ImagePositionPatient"),
                         ("PlaneOrientationSequence", "ImageOrientationPatient"),
                         ("PixelMeasuresSequence", "PixelSpacing")):
            item = _item(group, seq)
            if key not in found and item is not None and key in item:
                found[key] = [float(v) for v in item[key]]
    return found.get("ImagePositionPatient"), found.get("ImageOrientationPatient"), found.get("PixelSpacing")


def segment_names(ds) -> dict[int, str]:
    """Segment number -> SegmentLabel of a SEG dataset."""
    return {int(item.SegmentNumber): str(item.get("SegmentLabel", "") or f"segment {item.SegmentNumber}")
            for item in ds.get("SegmentSequence", [])}


def read_seg(ds, path: Path, reference: Volume, case_id: str) -> Volume:
    """The label map of SEG dataset ``ds`` (read from ``path``) on ``reference``'s grid.

    Returns:
        Volume with ``reference``'s affine and shape, uint8 (uint16 when a value exceeds 255) label
        values (0 background), ``meta["class_names"]`` = {value: segment label}.

    Raises:
        InputError: a fractional SEG, a SEG without frames' positions, a frame off the grid.
    """
    kind = str(ds.get("SegmentationType", "")).upper()
    if kind != "BINARY":
        raise InputError(path, "a BINARY DICOM SEG (one class per voxel)",
                         f"SegmentationType {kind or '<missing>'}",
                         "medseg does not threshold fractional segments; convert the SEG to binary first")
    names = segment_names(ds)
    values = {n: (named_id(name) or n) for n, name in names.items()}
    pixels = ds.pixel_array
    pixels = pixels[None] if pixels.ndim == 2 else pixels
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or [None] * len(pixels)
    frames = []
    for f, (group, frame) in enumerate(zip(per_frame, pixels)):
        ident = _item(group, "SegmentIdentificationSequence") if group is not None else None
        ident = ident or _item(shared, "SegmentIdentificationSequence")
        ipp, iop, spacing = _frame_geometry(shared, group)
        if ident is None or ipp is None or iop is None or spacing is None:
            raise InputError(path, "SEG frames with a segment number and a plane position, orientation and "
                             "pixel spacing", f"frame {f + 1} without them")
        frames.append((int(ident.ReferencedSegmentNumber), ipp, iop, spacing, frame))
    counts: dict[int, int] = {}
    for number, *_, frame in frames:
        counts[number] = counts.get(number, 0) + int(np.count_nonzero(frame))
    dtype = np.uint8 if max(values.values(), default=0) <= 255 else np.uint16
    out = np.zeros(reference.shape, dtype=dtype)
    overlap = 0
    # Largest segment first: a smaller one painted later wins where they overlap.
    for number, ipp, iop, spacing, frame in sorted(frames, key=lambda fr: -counts[fr[0]]):
        view = frame_view(out, frame_indices(reference.affine, reference.shape, ipp, iop, spacing, frame.shape[0],
                                             frame.shape[1], path, f"SEG frame of segment {number}"))
        on = frame > 0
        value = values.get(number, number)
        overlap += int(np.count_nonzero((view[on] != 0) & (view[on] != value)))
        view[on] = value
    if overlap:
        log.warning("%s: %d voxels belong to several segments; each went to the smallest segment", path, overlap)
    return Volume(out, reference.affine.copy(), case_id, label_meta("SEG", ds, path, reference, names, values))


def label_meta(modality: str, ds, path, reference: Volume, names: dict, values: dict) -> dict:
    """The ``meta`` of a label map read from a SEG or RTSTRUCT: where it came from, the image it
    lies on, and ``class_names`` {label value: segment / ROI name}."""
    return {"modality": modality, "source_path": str(path), "series_uid": str(ds.get("SeriesInstanceUID", "")),
            "reference_path": reference.meta.get("source_path"),
            "class_names": {values.get(n, n): name for n, name in names.items()}}
