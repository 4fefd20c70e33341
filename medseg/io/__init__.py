"""Reading and writing volumes: NIfTI, NRRD/MetaImage and DICOM, all as RAS+ :class:`Volume`.

``read_volume`` and ``write_volume`` choose the format from the path; LPS (DICOM, ITK) to RAS
conversion happens inside this package only. See ``docs/io.md``.
"""

from __future__ import annotations

import os
from pathlib import Path

from medseg.errors import InputError
from medseg.io.dataset import (
    DICOM_SUFFIXES,
    ITK_SUFFIXES,
    NIFTI_SUFFIXES,
    READ_SUFFIXES,
    WRITE_SUFFIXES,
    Case,
    case_id_from_path,
    discover_cases,
    is_dicom_file,
    list_volume_files,
    pair_cases,
    volume_suffix,
)
from medseg.io.volume import Volume

# nibabel, SimpleITK and pydicom are imported by the functions that need them, so that
# `import medseg.io` stays fast (commands answer --help quickly).

__all__ = [
    "Case",
    "READ_SUFFIXES",
    "Volume",
    "WRITE_SUFFIXES",
    "case_id_from_path",
    "discover_cases",
    "list_volume_files",
    "pair_cases",
    "read_volume",
    "write_volume",
    "write_volumes",
]


def _check_folder(path: Path) -> None:
    """A DICOM folder must be listable and hold something, else a clear error (before pydicom runs)."""
    if not os.access(path, os.R_OK | os.X_OK):
        raise InputError(path, "a readable folder", "a folder without read permission")
    try:
        entries = [e for e in os.listdir(path) if not e.startswith(".")]
    except PermissionError as exc:
        raise InputError(path, "a readable folder", "a folder without read permission") from exc
    except OSError as exc:
        raise InputError(path, "a readable folder", f"an unreadable folder ({exc.strerror or exc})") from exc
    if not entries:
        raise InputError(path, "a DICOM series folder (or a NIfTI/NRRD/MHA file)", "an empty folder")


def read_volume(path: str | os.PathLike, *, series_uid: str | None = None, case_id: str | None = None,
                reference=None) -> Volume:
    """Read a 3D image or label map from a file or DICOM folder.

    Formats, chosen by the path: ``.nii``/``.nii.gz`` (nibabel); ``.nrrd``/``.nhdr``/``.mha``/``.mhd``
    (SimpleITK, converted from LPS/z-first); a folder holding one DICOM series or a single DICOM
    file (``.dcm``/``.dicom``/``.ima``, no extension, or any file starting with the DICOM preamble).
    A DICOM SEG or RTSTRUCT file is read as a label map on the grid of the image series it
    references (:func:`medseg.io.dicomlabels.read_label_object`).

    Args:
        path: file or folder.
        series_uid: DICOM only: the SeriesInstanceUID to read when the folder holds several.
        case_id: the Volume's id; default :func:`case_id_from_path` (file name without suffix,
            folder name for DICOM folders; no nnU-Net channel stripping).
        reference: SEG / RTSTRUCT only: the image they label (Volume or path); default the
            series they reference, remembered by dataset pairing or found next to the file.

    Returns:
        Volume ``array[i, j, k]``, RAS+ mm affine; ``meta["source_path"]`` is ``path``,
        ``meta["modality"]`` is ``"CT"``/``"MR"``/... when the format records it, else None.

    Raises:
        InputError: missing path, unknown extension (the message lists the supported ones),
            empty or unreadable folder, corrupt/truncated file, not 3D (4D gives its shape).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "an image file or DICOM folder", "no such file or folder")
    if case_id is None:
        case_id = case_id_from_path(path)
    if path.is_dir():
        _check_folder(path)
        return _read_dicom(path, series_uid=series_uid, case_id=case_id)
    if not os.access(path, os.R_OK):
        raise InputError(path, "a readable file", "a file without read permission")
    suffix = volume_suffix(path)
    if suffix in NIFTI_SUFFIXES:
        from medseg.io.nifti import read_nifti

        return read_nifti(path, case_id=case_id)
    if suffix in ITK_SUFFIXES:
        from medseg.io.itk import read_itk

        return read_itk(path, case_id=case_id)
    if suffix in DICOM_SUFFIXES or is_dicom_file(path):
        # a SEG / RTSTRUCT file is a label map of the series it references
        from medseg.io.dicomlabels import label_object_kind, read_label_object

        if label_object_kind(path) is not None:
            return read_label_object(path, read_image=read_volume, reference=reference, case_id=case_id)
        return _read_dicom(path, series_uid=series_uid, case_id=case_id)
    raise InputError(
        path,
        "a volume file (" + ", ".join(READ_SUFFIXES) + ") or a DICOM file/folder",
        f"unknown file type {path.suffix or '(no extension)'!r} without a DICOM preamble",
    )


def _read_dicom(path: Path, *, series_uid: str | None, case_id: str) -> Volume:
    # Imported lazily: pydicom is only loaded when DICOM is read.
    from medseg.io.dicom import read_dicom

    return read_dicom(path, series_uid=series_uid, case_id=case_id)


def write_volume(volume: Volume, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``volume`` atomically as NIfTI (``.nii``, ``.nii.gz``) or NRRD/MHA (``.nrrd``, ``.mha``).

    The data go to a hidden temp file in the target's folder, then ``os.replace`` moves it into
    place: on any failure the temp file is removed and nothing (new) is left at ``path``. The
    parent folder is created when missing. The dtype is kept (bool -> uint8, float16 -> float32).

    Args:
        volume: the volume to write; geometry comes from ``volume.affine`` (RAS+).
        path: output file; the extension picks the format.
        overwrite: replace an existing file. Writing onto ``volume.meta["source_path"]`` (the
            input it was read from) is refused whatever this says.

    Returns:
        ``path`` as a Path.

    Raises:
        InputError: unsupported extension, existing file without ``overwrite``, the volume's
            own source file, or the writer failed (message says why).
        OSError: disk full, permission denied: naming ``path``, not the temp file.
    """
    return write_volumes([(volume, path)], overwrite=overwrite)[0]


def write_volumes(items, *, overwrite: bool = False) -> list[Path]:
    """Write ``(volume, path)`` pairs that belong together (a label map and its probability map)
    as one set: every file is written to its temp file first, then all are moved into place, so
    a failure leaves none of them (and the previous files, with ``overwrite``, as they were).

    Each pair follows :func:`write_volume`'s rules; every path is checked before anything is written.

    Returns:
        the paths, in order.
    """
    from medseg.io.atomic import atomic_paths, renamed

    items = [(volume, Path(path)) for volume, path in items]
    writers = [_volume_writer(volume, path, overwrite) for volume, path in items]
    paths = [path for _, path in items]
    try:
        with atomic_paths(paths, suffixes=[suffix for suffix, _ in writers]) as temps:
            for (volume, path), (suffix, writer), tmp in zip(items, writers, temps):
                _write_to(writer, volume, tmp, path, suffix)
    except OSError as exc:
        if exc.filename is None or str(exc.filename) in map(str, paths):
            raise
        # A hidden temp file means nothing to the user: name the output instead.
        raise renamed(exc, paths[0] if len(paths) == 1 else paths[0].parent) from exc
    return paths


def _volume_writer(volume: Volume, path: Path, overwrite: bool):
    """(suffix, writer function) for ``path``, after checking the path (nothing written yet)."""
    from medseg.io.atomic import check_output_path

    suffix = volume_suffix(path)
    if suffix not in WRITE_SUFFIXES:
        raise InputError(path, "an output file ending in " + ", ".join(WRITE_SUFFIXES), f"{path.name!r}")
    check_output_path(path, overwrite=overwrite, protect=[volume.meta.get("source_path")])
    if suffix in NIFTI_SUFFIXES:
        from medseg.io.nifti import write_nifti as writer
    else:
        from medseg.io.itk import write_itk as writer
    return suffix, writer


def _write_to(writer, volume: Volume, tmp: Path, path: Path, suffix: str) -> None:
    try:
        writer(volume, tmp)
    except OSError as exc:
        # Disk full / permission: the command prints the OSError, naming the output, not the temp file.
        from medseg.io.atomic import renamed

        raise renamed(exc, path) from exc
    except Exception as exc:  # nibabel/SimpleITK errors (unsupported dtype, ...) as one clear line
        raise InputError(path, f"a writable {suffix} volume", f"{type(exc).__name__}: {exc}") from exc
