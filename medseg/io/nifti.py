"""NIfTI (``.nii``, ``.nii.gz``) reading and writing with nibabel.

NIfTI already uses medseg's convention (``array[i, j, k]``, RAS+ mm affine), so no axis flips
happen here. The header stores the affine as float32 (``srow_*``, quaternion), so a geometry
survives a write -> read round trip to float32 precision (about 1e-7 relative: < 0.0001 mm at
500 mm from the origin).
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.errors import InputError
from medseg.io.suffixes import NIFTI_SUFFIXES  # noqa: F401 (re-exported)
from medseg.io.volume import Volume


#: NIfTI has no modality field; medseg writes ``modality=CT`` into the 80-byte ``descrip`` text.
_MODALITY_RE = re.compile(r"\bmodality=([A-Za-z0-9]+)")
#: NIfTI xform codes (``NIFTI_XFORM_*``): 1 scanner anatomical, 2 aligned anatomical.
_XFORM_SCANNER = 1


def _gzip_failure(path: Path) -> str | None:
    """Why a gzip file cannot be decompressed, or None if it decompresses (only on the error path)."""
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 24):
                pass
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _describe_failure(path: Path, exc: BaseException) -> str:
    if isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile)) or "end-of-stream" in str(exc):
        return f"a truncated or corrupt compressed file ({type(exc).__name__}: {exc})"
    if path.name.lower().endswith(".gz"):
        why = _gzip_failure(path)
        if why is not None:
            return f"a truncated or corrupt compressed file ({why})"
    short = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, nib.filebasedimages.ImageFileError) or "header" in short.lower():
        try:
            with open(path, "rb") as fh:
                magic = fh.read(2)
        except OSError:
            magic = b""
        if magic == b"\x1f\x8b" and not path.name.lower().endswith(".gz"):
            return "a gzip-compressed file without the .gz suffix (rename it to .nii.gz)"
        return f"no valid NIfTI header ({short})"
    match = re.match(r"Expected (\d+) bytes, got (\d+) bytes", short)
    if match:
        return f"a truncated file ({match.group(2)} of the {match.group(1)} data bytes the header announces)"
    return f"an unreadable file ({type(exc).__name__}: {short})"


def read_nifti(path: str | os.PathLike, *, case_id: str = "") -> Volume:
    """Read a 3D NIfTI-1/2 image.

    The affine is nibabel's best affine (sform when its code is set, else qform). Stored scaling
    (``scl_slope``/``scl_inter``) is applied; without scaling the on-disk dtype is kept.
    A 4D file whose 4th axis has length 1 (and 5D with trailing singleton axes) is squeezed to 3D.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        case_id: the Volume's case id.

    Returns:
        Volume with ``meta`` ``source_path``, ``modality`` (from ``modality=XX`` in ``descrip``,
            as medseg writes it; else None: NIfTI has no modality field),
        ``nifti_sform_code`` and ``nifti_qform_code``.

    Raises:
        InputError: missing, truncated or non-NIfTI file; a 2D image; a real 4D series
            (the message gives its shape); ``pixdim[1:4]`` zero, negative or not finite, or a
            singular or non-finite affine (:func:`_check_header_geometry`).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "a NIfTI file", "no such file" if not path.exists() else "a folder")
    try:
        img = nib.load(str(path), mmap=False)
        shape = tuple(int(s) for s in img.shape)
    except Exception as exc:  # nibabel raises many types; the user needs one clear line
        raise InputError(path, "a readable NIfTI file", _describe_failure(path, exc)) from exc

    # Trailing singleton axes (4D with one time point) carry no data: drop them.
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        kind = f"a {len(img.shape)}D image of shape {tuple(img.shape)}"
        hint = "split the series into 3D volumes (one file per time point/channel)" if len(shape) > 3 else ""
        raise InputError(path, "a 3D image", kind, hint)

    try:
        slope, inter = img.header.get_slope_inter()
        if slope is None and inter is None:
            array = np.asarray(img.dataobj)
        else:
            array = img.get_fdata(dtype=np.float32)
    except Exception as exc:
        raise InputError(path, "a readable NIfTI file", _describe_failure(path, exc)) from exc
    array = array.reshape(shape)
    if not array.dtype.isnative:
        # Big-endian files (old scanners, Analyze heritage): same values, native byte order for numpy/TF.
        array = array.astype(array.dtype.newbyteorder("="))

    _check_header_geometry(path, img, len(shape))
    header = img.header
    match = _MODALITY_RE.search(bytes(header["descrip"]).decode("latin-1"))
    meta = {
        "source_path": str(path),
        "modality": match.group(1) if match else None,
        "nifti_sform_code": int(header["sform_code"]),
        "nifti_qform_code": int(header["qform_code"]),
    }
    try:
        return Volume(array, np.asarray(img.affine, dtype=np.float64), case_id, meta)
    except ValueError as exc:
        raise InputError(path, "a NIfTI file with a valid affine", str(exc)) from exc


def _raw_header(path: Path, img) -> "nib.Nifti1Header":
    """The header as stored: ``nib.load`` repairs it (a zero pixdim becomes 1 mm, a negative one
    its absolute value) and says so only in a log line; medseg refuses such files instead."""
    from nibabel.openers import ImageOpener

    with ImageOpener(str(path)) as fh:
        return type(img.header).from_fileobj(fh, check=False)


def _check_header_geometry(path: Path, img, ndim: int) -> None:
    """Refuse a geometry the header cannot truly hold, on one line naming the file.

    - ``pixdim[1..3]`` (the voxel size, mm) zero, negative or not finite: nibabel reads 0 as 1 mm
      and -2 as 2 mm, ITK reads NaN as 1 mm, so readers disagree and none is right;
    - the affine in use (sform when its code is set, else qform, else pixdim) not finite or
      singular (a voxel axis of zero length, or two axes along one line).

    A sheared sform is a true affine (gantry tilt) and stays accepted; the qform is a rotation by
    construction.
    """
    raw = _raw_header(path, img)
    pixdim = np.asarray(raw["pixdim"], dtype=np.float64)[1 : 1 + min(ndim, 3)]
    if not (np.all(np.isfinite(pixdim)) and np.all(pixdim > 0)):
        shown = "[" + ", ".join(f"{v:g}" for v in pixdim) + "]"
        raise InputError(path, "a NIfTI header with positive, finite voxel sizes (pixdim[1:4], mm)",
                         f"pixdim {shown}", "readers repair such a header differently; fix the file's voxel size")
    source = "sform" if int(raw["sform_code"]) > 0 else "qform" if int(raw["qform_code"]) > 0 else "pixdim"
    affine = np.asarray(img.affine, dtype=np.float64)
    linear = affine[:3, :3]
    if not np.all(np.isfinite(affine)):
        raise InputError(path, f"a finite voxel-to-world affine ({source})",
                         f"non-finite values {np.round(affine[:3], 4).tolist()}")
    lengths = np.linalg.norm(linear, axis=0)
    # Relative test: a singular matrix has det ~0 against the product of its column lengths.
    if np.any(lengths <= 0) or abs(np.linalg.det(linear)) <= 1e-6 * float(np.prod(lengths)):
        raise InputError(path, f"an invertible voxel-to-world affine ({source})",
                         f"a singular one {np.round(affine[:3], 4).tolist()} "
                         f"(voxel axis lengths {np.round(lengths, 4).tolist()} mm)")


def _has_shear(affine: np.ndarray) -> bool:
    rzs = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return not np.allclose(rzs.T @ rzs, np.eye(3), atol=1e-6)


def write_nifti(volume: Volume, path: str | os.PathLike) -> None:
    """Write ``volume`` to ``path`` (not atomic on its own: use :func:`medseg.io.write_volume`).

    The affine goes into both the sform and the qform (code taken from ``meta`` when the volume
    came from a NIfTI, else 1 = scanner), so nibabel, ITK and FSL read the same geometry. An
    affine with shear (e.g. gantry tilt) cannot be a qform; then only the sform is set.
    Units are millimetres. The array dtype is kept (bool -> uint8, float16 -> float32).
    """
    array = np.asarray(volume.array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    img = nib.Nifti1Image(array, volume.affine, dtype=array.dtype)
    header = img.header
    meta = volume.meta
    sform_code = int(meta.get("nifti_sform_code") or _XFORM_SCANNER)
    qform_code = int(meta.get("nifti_qform_code") or sform_code)
    img.set_sform(volume.affine, code=sform_code)
    if _has_shear(volume.affine):
        img.set_qform(None, code=0)
    else:
        img.set_qform(volume.affine, code=qform_code)
    header.set_xyzt_units("mm", "sec")
    modality = meta.get("modality")
    if modality:
        header["descrip"] = f"modality={modality}".encode("ascii", "replace")[:79]
    # No scaling: the values written are the values held.
    header.set_slope_inter(1.0, 0.0)
    nib.save(img, str(path))
