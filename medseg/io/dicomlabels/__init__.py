"""DICOM label objects: DICOM SEG and RTSTRUCT as label maps, and a label map written as either.

A SEG or RTSTRUCT references the image series it was drawn on by UIDs; it has no grid of its own that
a label map could use. Reading one therefore needs that series (the *reference*): given by the
caller (the paired image, as the dataset check, the plan and training pass it), or found near the
file by its SeriesInstanceUID (:func:`find_referenced_series`). Nothing is remembered between calls. Its label map is then on exactly the grid ``read_volume`` gives the
series. See ``docs/dicom.md``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from medseg.errors import InputError
from medseg.io.dicomlabels.names import NAMED_ID_BASE, named_id, named_ids
from medseg.io.dicomlabels.rtstruct import RTSTRUCT_SOP_CLASS
from medseg.io.dicomlabels.seg import SEG_SOP_CLASS
from medseg.io.volume import Volume

__all__ = ["LABEL_SOP_CLASSES", "NAMED_ID_BASE", "find_referenced_series", "label_object_kind", "named_id",
           "named_ids", "read_label_object", "referenced_series", "write_dicom_seg",
           "write_rtstruct"]

log = logging.getLogger(__name__)

LABEL_SOP_CLASSES = {SEG_SOP_CLASS: "SEG", RTSTRUCT_SOP_CLASS: "RTSTRUCT"}
#: Folders probed for the referenced series: the file's folder, its subfolders, its parent's
#: subfolders and theirs (``labels/x.dcm`` next to ``images/x/``), at most this many.
SEARCH_LIMIT = 2000
#: Environment variable: more folders (``os.pathsep``-separated) searched for referenced series.
SEARCH_ENV = "MEDSEG_DICOM_PATH"
_VOLUME_ENDINGS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".raw", ".json", ".csv", ".txt", ".md")
_GRIDS: dict[tuple, Volume] = {}


def write_dicom_seg(*args, **kwargs):
    """:func:`medseg.io.dicomlabels.seg_write.write_dicom_seg` (imported when called: highdicom is heavy)."""
    from medseg.io.dicomlabels.seg_write import write_dicom_seg as write

    return write(*args, **kwargs)


def write_rtstruct(*args, **kwargs):
    """:func:`medseg.io.dicomlabels.rtstruct_write.write_rtstruct`."""
    from medseg.io.dicomlabels.rtstruct_write import write_rtstruct as write

    return write(*args, **kwargs)


def label_object_kind(path: str | os.PathLike) -> str | None:
    """``"SEG"`` or ``"RTSTRUCT"`` for a DICOM file holding one, else None (header read only)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["SOPClassUID"])
    except Exception:  # not parseable: the image reader reports it
        return None
    return LABEL_SOP_CLASSES.get(str(ds.get("SOPClassUID", "")))


def referenced_series(ds) -> tuple[str, set[str]]:
    """(SeriesInstanceUID, SOP Instance UIDs) of the images a SEG or RTSTRUCT dataset references."""
    series, instances = "", set()
    if "ReferencedSeriesSequence" in ds:  # SEG
        for item in ds.ReferencedSeriesSequence:
            series = series or str(item.get("SeriesInstanceUID", ""))
            instances |= {str(r.ReferencedSOPInstanceUID) for r in item.get("ReferencedInstanceSequence", [])}
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):  # RTSTRUCT
        for study in frame.get("RTReferencedStudySequence", []):
            for item in study.get("RTReferencedSeriesSequence", []):
                series = series or str(item.get("SeriesInstanceUID", ""))
                instances |= {str(r.ReferencedSOPInstanceUID) for r in item.get("ContourImageSequence", [])}
    return series, instances


def _series_uid_of_folder(folder: Path, probe: int = 3) -> set[str]:
    """SeriesInstanceUIDs of the first few DICOM files directly in ``folder`` (cheap probe)."""
    import pydicom

    from medseg.io.dicom import is_dicom_file

    found: set[str] = set()
    try:
        entries = sorted((e for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".")),
                         key=lambda e: e.name)
    except OSError:
        return found
    tried = 0
    for entry in entries:
        if tried >= probe:
            break
        if not is_dicom_file(entry.path):
            continue
        tried += 1
        try:
            ds = pydicom.dcmread(entry.path, stop_before_pixels=True, force=True,
                                 specific_tags=["SeriesInstanceUID", "SOPClassUID"])
        except Exception:
            continue
        if str(ds.get("SOPClassUID", "")) not in LABEL_SOP_CLASSES:
            found.add(str(ds.get("SeriesInstanceUID", "")))
    return found


def _candidate_folders(path: Path):
    """Folders that may hold the referenced series, nearest first (see :func:`find_referenced_series`)."""
    seen = set()
    roots = [(path.parent, 1)]
    if path.parent.parent != path.parent:
        roots.append((path.parent.parent, 2))
    roots += [(Path(p), 2) for p in os.environ.get(SEARCH_ENV, "").split(os.pathsep) if p]
    for root, depth in roots:
        queue = [(root, 0)]
        while queue:
            folder, level = queue.pop(0)
            real = os.path.realpath(folder)
            if real in seen:
                continue
            seen.add(real)
            yield folder
            if level < depth:
                try:
                    subs = sorted(e.path for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
                except OSError:
                    subs = []
                queue.extend((Path(s), level + 1) for s in subs)


def find_referenced_series(path: str | os.PathLike, series_uid: str) -> Path:
    """The folder (near ``path``) holding the image series ``series_uid``.

    Searched: ``path``'s folder and its subfolders, then its parent's subfolders and their
    subfolders, then each folder of ``$MEDSEG_DICOM_PATH`` (``os.pathsep``-separated) and two levels
    of subfolders, in name order (:data:`SEARCH_LIMIT` folders at most).

    Raises:
        InputError: not found (one line naming the series UID and where medseg looked).
    """
    path = Path(path)
    for n, folder in enumerate(_candidate_folders(path)):
        if n >= SEARCH_LIMIT:
            break
        if series_uid in _series_uid_of_folder(folder):
            return folder
    raise InputError(
        path, f"its referenced image series (SeriesInstanceUID {series_uid}) in {path.parent} or the folders next "
        "to it", "no such series there",
        f"put the series' folder next to the file, name the folder holding it in ${SEARCH_ENV}, or pass the "
        "image (read_volume(..., reference=IMAGE))",
    )


def _grid(reference: str | os.PathLike, series_uid: str | None, read_image) -> Volume:
    """The reference image's grid (geometry and meta; the array is not kept), cached by path and
    mtime; ``read_image`` is :func:`medseg.io.read_volume` (given, so this package does not import
    the one that dispatches to it)."""
    p = Path(reference)
    key = (os.path.realpath(p), p.stat().st_mtime_ns, series_uid)
    if key not in _GRIDS:
        image = read_image(p, series_uid=series_uid if p.is_dir() else None)
        zeros = np.broadcast_to(np.zeros((), dtype=np.uint8), image.shape)  # no memory: only the shape is used
        _GRIDS.clear()
        _GRIDS[key] = Volume(zeros, image.affine, image.case_id, image.meta)
    return _GRIDS[key]


def read_label_object(path: str | os.PathLike, *, read_image, reference: Volume | str | os.PathLike | None = None,
                      case_id: str | None = None) -> Volume:
    """The label map of a DICOM SEG or RTSTRUCT file, on its referenced image's grid.

    Args:
        path: the SEG or RTSTRUCT file.
        read_image: reads the reference image when it is a path (``medseg.io.read_volume``, which
            calls this function: use it rather than calling this directly).
        reference: the image (a Volume, or the path of its series folder / file). Default: the series
            else found near ``path`` by its SeriesInstanceUID.
        case_id: the Volume's id (default the file name without ``.dcm``).

    Returns:
        Volume on the reference's grid (same affine and shape as ``read_volume(reference)``),
        integer label values, ``meta["class_names"]`` {value: segment/ROI name}.

    Raises:
        InputError: not a SEG/RTSTRUCT, the referenced series is not found, a reference Volume of
            another series, a fractional SEG, frames or contours off the image's grid.
    """
    import pydicom

    from medseg.io.suffixes import case_id_from_path

    path = Path(path)
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:
        raise InputError(path, "a readable DICOM SEG or RTSTRUCT file", f"{type(exc).__name__}: {exc}") from exc
    kind = LABEL_SOP_CLASSES.get(str(ds.get("SOPClassUID", "")))
    if kind is None:
        raise InputError(path, "a DICOM SEG or RTSTRUCT file", f"SOP Class {ds.get('SOPClassUID', '<none>')}")
    series_uid, _ = referenced_series(ds)
    if reference is None:
        if not series_uid:
            raise InputError(path, f"a {kind} that names its referenced series", "no referenced SeriesInstanceUID")
        reference = find_referenced_series(path, series_uid)
    if not isinstance(reference, Volume):
        reference = _grid(reference, series_uid or None, read_image)
    elif reference.meta.get("series_uid") and series_uid and reference.meta["series_uid"] != series_uid:
        raise InputError(path, f"a reference image of series {series_uid}",
                         f"an image of series {reference.meta['series_uid']}")
    case_id = case_id if case_id is not None else case_id_from_path(path)
    if kind == "SEG":
        from medseg.io.dicomlabels.seg import read_seg

        return read_seg(ds, path, reference, case_id)
    from medseg.io.dicomlabels.rtstruct import read_rtstruct

    return read_rtstruct(ds, path, reference, case_id)


def label_objects_in(folder: str | os.PathLike) -> dict[Path, str]:
    """SEG / RTSTRUCT files directly in ``folder`` -> the SeriesInstanceUID each references."""
    import pydicom

    from medseg.io.dicom import is_dicom_file

    found: dict[Path, str] = {}
    if not os.path.isdir(folder) or not os.access(folder, os.R_OK | os.X_OK):
        return found  # the caller's folder checks report it
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith(".") or entry.name.lower().endswith(_VOLUME_ENDINGS) or not entry.is_file():
            continue
        if not is_dicom_file(entry.path):
            continue
        if label_object_kind(entry.path) is None:
            continue
        ds = pydicom.dcmread(entry.path, stop_before_pixels=True, force=True)
        found[Path(entry.path)] = referenced_series(ds)[0]
    return found


def pair_by_reference(images: dict[str, Path], objects: dict[Path, str]) -> tuple[list[tuple[str, Path, Path]],
                                                                                    list[str]]:
    """Pair label objects with image series folders by the SeriesInstanceUID they reference.

    Args:
        images: case id -> image (DICOM series folders take part; other images pair with nothing).
        objects: :func:`label_objects_in`'s answer.

    Returns:
        ``([(case id, image, label object)], problems)``: one line per label object whose series is
        not among the images (naming the UID), per image without a label object, per image labelled twice.
    """
    by_uid: dict[str, str] = {}
    for cid, image in images.items():
        if image.is_dir():
            for uid in _series_uid_of_folder(image):
                by_uid.setdefault(uid, cid)
    pairs, problems, used = [], [], {}
    for label, uid in objects.items():
        cid = by_uid.get(uid)
        if cid is None:
            problems.append(f"label without image: {label} (references series {uid or '<none>'}, "
                            "which no image folder holds)")
        elif cid in used:
            problems.append(f"two labels for image {images[cid]}: {used[cid]} and {label}")
        else:
            used[cid] = label
            pairs.append((cid, images[cid], label))
    problems += [f"image without label: {images[cid]}" for cid in sorted(set(images) - set(used))]
    return sorted(pairs), problems
