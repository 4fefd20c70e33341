"""File names of volumes: the format suffixes medseg reads and writes, and a case's id from its path.

A leaf of ``medseg.io`` (imports only ``medseg.io.dicom``'s suffixes), so the readers, the dataset
discovery and the DICOM label objects share one rule without importing each other.
"""

from __future__ import annotations

import os
from pathlib import Path

from medseg.io.dicom import DICOM_SUFFIXES

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
#: Every file suffix :func:`medseg.io.read_volume` understands (besides DICOM folders).
READ_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + DICOM_SUFFIXES
#: Only single-file ITK formats are written: a detached header (.nhdr/.mhd) plus data file cannot
#: be replaced atomically as one unit.
ITK_WRITE_SUFFIXES = (".nrrd", ".mha")
#: Every file suffix :func:`medseg.io.write_volume` writes.
WRITE_SUFFIXES = NIFTI_SUFFIXES + ITK_WRITE_SUFFIXES


def volume_suffix(path: str | os.PathLike) -> str:
    """The lower-case format suffix of ``path``: ``".nii.gz"``, ``".nrrd"``, ... or ``""``/other."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def case_id_from_path(path: str | os.PathLike, *, images: bool = False) -> str:
    """Case id of a volume file or DICOM folder.

    The file name without its format suffix (``brain1.nii.gz`` -> ``brain1``); a folder's name;
    with ``images=True`` a trailing nnU-Net channel suffix ``_0000`` is dropped
    (``case_0000.nii.gz`` -> ``case``). Other channel numbers are kept (multichannel is refused
    by discovery).
    """
    path = Path(path)
    name = path.name
    suffix = volume_suffix(path)
    if suffix in READ_SUFFIXES and not path.is_dir():
        name = name[: -len(suffix)]
    if images and name.endswith("_0000") and len(name) > 5:
        name = name[:-5]
    return name
