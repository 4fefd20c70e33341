"""NRRD / MetaImage (``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``) reading and writing with SimpleITK.

SimpleITK works in LPS+ world coordinates with z-first arrays
(``GetArrayFromImage(img)[k, j, i]``). medseg's :class:`~medseg.io.Volume` is RAS+ with
``array[i, j, k]``. The conversion, in both directions, is::

    array_ijk   = GetArrayFromImage(img).transpose(2, 1, 0)
    affine[:3, :3] = F @ D_lps @ diag(spacing)      F = diag(-1, -1, 1)
    affine[:3, 3]  = F @ origin_lps

where ``D_lps`` is ``img.GetDirection()`` as a row-major 3x3 (column n = direction of index n).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medseg.errors import InputError
from medseg.io.suffixes import ITK_SUFFIXES, ITK_WRITE_SUFFIXES  # noqa: F401 (re-exported)
from medseg.io.volume import Volume

ITK_READ_SUFFIXES = ITK_SUFFIXES

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
#: NRRD key/value pair (``modality:=CT``) that carries ``meta["modality"]``; MetaImage has no free keys.
_MODALITY_KEY = "modality"
_MET_MODALITY = {"MET_MOD_CT": "CT", "MET_MOD_MR": "MR", "MET_MOD_NM": "NM", "MET_MOD_US": "US"}


def affine_from_itk(spacing, origin, direction) -> np.ndarray:
    """4x4 RAS+ voxel->world affine from ITK (LPS+) spacing, origin and row-major direction."""
    spacing = np.asarray(spacing, dtype=np.float64)
    n = spacing.size
    d_lps = np.asarray(direction, dtype=np.float64).reshape(n, n)[:3, :3]
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ d_lps @ np.diag(spacing[:3])
    affine[:3, 3] = _LPS_TO_RAS @ np.asarray(origin, dtype=np.float64)[:3]
    return affine


def itk_geometry(volume: Volume) -> tuple[tuple, tuple, tuple]:
    """(spacing, origin, row-major direction) in ITK's LPS+ convention for ``volume``."""
    spacing = volume.spacing_mm
    d_lps = _LPS_TO_RAS @ volume.direction
    origin_lps = _LPS_TO_RAS @ volume.origin_mm
    return tuple(map(float, spacing)), tuple(map(float, origin_lps)), tuple(map(float, d_lps.ravel()))


def image_to_volume(img: sitk.Image, *, case_id: str = "", meta: dict | None = None,
                    path: str | os.PathLike | None = None) -> Volume:
    """Convert a 3D scalar ``sitk.Image`` (a 4D one with a single time point is squeezed) to a Volume."""
    size = tuple(img.GetSize())
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(path, "a scalar (one value per voxel) image",
                         f"{img.GetNumberOfComponentsPerPixel()} components per voxel ({img.GetPixelIDTypeAsString()})")
    if img.GetDimension() == 4 and size[3] == 1:
        spacing, origin, direction = img.GetSpacing(), img.GetOrigin(), img.GetDirection()
        img = img[:, :, :, 0]
        affine = affine_from_itk(spacing, origin, direction)
    elif img.GetDimension() != 3:
        hint = "split the series into 3D volumes" if img.GetDimension() > 3 else ""
        raise InputError(path, "a 3D image", f"a {img.GetDimension()}D image of size {size}", hint)
    else:
        affine = affine_from_itk(img.GetSpacing(), img.GetOrigin(), img.GetDirection())
    array = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    try:
        return Volume(array, affine, case_id, dict(meta or {}))
    except ValueError as exc:
        raise InputError(path, "an image with a valid geometry", str(exc)) from exc


def volume_to_image(volume: Volume) -> sitk.Image:
    """Convert a Volume to a ``sitk.Image`` (LPS+, same voxels); bool -> uint8, float16 -> float32."""
    array = np.asarray(volume.array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    img = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    spacing, origin, direction = itk_geometry(volume)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def read_itk(path: str | os.PathLike, *, case_id: str = "") -> Volume:
    """Read a 3D NRRD/MetaImage file with SimpleITK into a RAS+ ``array[i, j, k]`` Volume.

    Raises:
        InputError: missing or unreadable file, vector images, images that are not 3D.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "an NRRD/MetaImage file", "no such file" if not path.exists() else "a folder")
    try:
        img = sitk.ReadImage(str(path))
    except Exception as exc:  # SimpleITK raises RuntimeError with a multi-line ITK message
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = lines[-1] if lines else type(exc).__name__
        raise InputError(path, f"a readable {path.suffix.lstrip('.').upper()} image", f"a file ITK cannot read ({detail})") from exc
    modality = None
    if img.HasMetaDataKey("Modality"):  # MetaImage header field
        modality = _MET_MODALITY.get(img.GetMetaData("Modality").strip())
    if modality is None and img.HasMetaDataKey(_MODALITY_KEY):  # NRRD key/value written by medseg
        modality = img.GetMetaData(_MODALITY_KEY).strip() or None
    return image_to_volume(img, case_id=case_id, meta={"source_path": str(path), "modality": modality}, path=path)


def write_itk(volume: Volume, path: str | os.PathLike) -> None:
    """Write ``volume`` as NRRD or MHA (compressed), LPS+ on disk. Not atomic on its own.

    NRRD also records ``meta["modality"]`` (key ``modality``) so it survives a round trip.
    """
    img = volume_to_image(volume)
    modality = volume.meta.get("modality")
    if modality:
        img.SetMetaData(_MODALITY_KEY, str(modality))
    sitk.WriteImage(img, str(path), True)
