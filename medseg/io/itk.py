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
        InputError: missing or unreadable file, vector images, images that are not 3D; a stored
            voxel size that is zero, negative or not finite, axis vectors that are zero, parallel
            or not finite, a direction that is not orthonormal (each of which ITK would repair,
            refuse with a bare matrix row, or keep).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "an NRRD/MetaImage file", "no such file" if not path.exists() else "a folder")
    _check_header_spacing(path)
    try:
        img = sitk.ReadImage(str(path))
    except Exception as exc:  # SimpleITK raises RuntimeError with a multi-line ITK message
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = lines[-1] if lines else type(exc).__name__
        raise InputError(path, f"a readable {path.suffix.lstrip('.').upper()} image", f"a file ITK cannot read ({detail})") from exc
    _check_direction(path, img)
    modality = None
    if img.HasMetaDataKey("Modality"):  # MetaImage header field
        modality = _MET_MODALITY.get(img.GetMetaData("Modality").strip())
    if modality is None and img.HasMetaDataKey(_MODALITY_KEY):  # NRRD key/value written by medseg
        modality = img.GetMetaData(_MODALITY_KEY).strip() or None
    return image_to_volume(img, case_id=case_id, meta={"source_path": str(path), "modality": modality}, path=path)


#: Largest departure of ``D.T @ D`` from the identity accepted for a direction matrix ``D``:
#: directions written as text with 6 decimals (DICOM-derived files) are off by ~1e-6; a sheared or
#: scaled matrix by far more (a 1-degree shear gives 0.017).
ORTHONORMAL_TOLERANCE = 1e-3


def _header_fields(path: Path) -> dict[str, str]:
    """The text header's ``key: value`` (NRRD) or ``Key = Value`` (MetaImage) fields, lower-case keys;
    empty for a file whose header is not text (ITK then reports it)."""
    fields: dict[str, str] = {}
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError:
        return fields
    is_nrrd = head.startswith(b"NRRD")
    for raw in head.split(b"\n")[1 if is_nrrd else 0:]:
        line = raw.decode("latin-1").strip()
        if not line and is_nrrd:
            break  # the blank line ends an attached NRRD header
        sep = ":" if is_nrrd else "="
        if sep not in line or line.startswith("#"):
            continue
        key, value = line.split(sep, 1)
        fields[key.strip().lower()] = value.lstrip("=").strip()
        if not is_nrrd and key.strip().lower() == "elementdatafile":
            break  # MetaImage: the data follow
    return fields


def _check_header_spacing(path: Path) -> None:
    """Refuse a stored voxel size that is zero, negative or not finite, before ITK reads the file:
    ITK turns a negative MetaImage ``ElementSpacing`` into a positive one and flips the axis."""
    fields = _header_fields(path)
    for key in ("elementspacing", "elementsize", "spacings"):
        if key not in fields:
            continue
        try:
            values = [float(v) for v in fields[key].split()]
        except ValueError:
            continue  # not numbers ("nan" parses): ITK names the malformed field
        if values and not all(np.isfinite(v) and v > 0 for v in values):
            name = {"elementspacing": "ElementSpacing", "elementsize": "ElementSize", "spacings": "spacings"}[key]
            raise InputError(path, f"positive, finite voxel sizes ({name}, mm)",
                             f"{name} {' '.join(fields[key].split())}",
                             "readers repair such a header differently; fix the file's voxel size")
    _check_header_axes(path, fields)


def _header_axes(fields: dict[str, str]) -> tuple[str, np.ndarray] | None:
    """``(field name, 3x3 matrix whose rows are the stored axis vectors)`` of NRRD ``space
    directions`` or MetaImage ``TransformMatrix``; None when absent or not three 3-vectors."""
    import re

    if "space directions" in fields:
        vectors = re.findall(r"\(([^)]*)\)", fields["space directions"])
        name = "space directions"
    elif "transformmatrix" in fields:
        numbers = fields["transformmatrix"].split()
        vectors = [" ".join(numbers[i:i + 3]) for i in range(0, len(numbers), 3)]
        name = "TransformMatrix"
    else:
        return None
    try:
        rows = np.array([[float(v) for v in vec.replace(",", " ").split()] for vec in vectors], dtype=np.float64)
    except ValueError:
        return None
    return (name, rows) if rows.shape == (3, 3) else None


def _check_header_axes(path: Path, fields: dict[str, str]) -> None:
    """Refuse stored axis vectors that are not finite or span less than 3D (a zero vector, two
    parallel axes): ITK refuses them with a bare matrix row or repairs NaN as 1 mm."""
    axes = _header_axes(fields)
    if axes is None:
        return
    name, rows = axes
    lengths = np.linalg.norm(rows, axis=1)
    if np.all(np.isfinite(rows)) and np.all(lengths > 0) and abs(np.linalg.det(rows)) > 1e-6 * np.prod(lengths):
        return
    raise InputError(path, f"three finite, independent axis vectors ({name})",
                     f"{name} {np.round(rows, 4).tolist()} (lengths {np.round(lengths, 4).tolist()})",
                     "a zero, parallel or non-finite axis; fix the file's geometry")


def _check_direction(path: Path, img: sitk.Image) -> None:
    """Refuse a direction matrix that is not a rotation (its columns unit length and orthogonal).

    ITK stores a non-orthogonal or scaled NRRD ``space directions`` / MetaImage ``TransformMatrix``
    as it is; medseg's geometry (and every viewer) takes the direction for a rotation."""
    n = img.GetDimension()
    d = np.asarray(img.GetDirection(), dtype=np.float64).reshape(n, n)[:3, :3]
    gram = d.T @ d
    if np.all(np.isfinite(d)) and np.max(np.abs(gram - np.eye(3))) <= ORTHONORMAL_TOLERANCE:
        return
    lengths = np.sqrt(np.abs(np.diag(gram)))
    cosines = [gram[0, 1], gram[0, 2], gram[1, 2]] / np.maximum(
        [lengths[0] * lengths[1], lengths[0] * lengths[2], lengths[1] * lengths[2]], 1e-12)
    raise InputError(path, "an orthonormal direction matrix (axes of unit length at right angles)",
                     f"direction {np.round(d, 4).tolist()} (axis lengths {np.round(lengths, 4).tolist()}, "
                     f"cosines between axes {np.round(cosines, 4).tolist()})",
                     "a sheared, scaled or singular direction; resample the image onto an orthogonal grid")


def write_itk(volume: Volume, path: str | os.PathLike) -> None:
    """Write ``volume`` as NRRD or MHA (compressed), LPS+ on disk. Not atomic on its own.

    NRRD also records ``meta["modality"]`` (key ``modality``) so it survives a round trip.
    """
    img = volume_to_image(volume)
    modality = volume.meta.get("modality")
    if modality:
        img.SetMetaData(_MODALITY_KEY, str(modality))
    sitk.WriteImage(img, str(path), True)
