"""What an image is, before it is normalized: its modality (from its header, else guessed from
its intensities: CT only) and whether it has air around the body (a crop inside the body has none).

Re-exported by :mod:`medseg.transforms.intensity`, where the modality guess was first defined.
"""

from __future__ import annotations

import numpy as np

__all__ = ["KNOWN_MODALITIES", "CT_FAT_HU", "CT_FAT_SHARE", "BACKGROUND_SHARE", "guess_modality",
           "looks_like_ct_without_air", "has_background"]

#: Header modalities taken at their word; others (``OT``, ``SEG``, ...) are guessed from intensities.
KNOWN_MODALITIES = ("CT", "MR", "PT", "US")


def guess_modality(volume) -> str | None:
    """Modality of a Volume: from its header (``meta["modality"]`` in :data:`KNOWN_MODALITIES`),
    else guessed from intensities.

    The guess only recognises CT, by its air (stored at about -1000 HU: 1st percentile below
    -900) or, in a scan cropped around the region of interest with no air around it, by its fat
    (:func:`looks_like_ct_without_air`); anything else returns None ("cannot tell"). It reads a
    strided view of about 100 000 voxels, so it never copies the volume whatever its memory layout.
    """
    modality = str(volume.meta.get("modality") or "").upper()
    modality = "MR" if modality == "MRI" else modality
    if modality in KNOWN_MODALITIES:
        return modality
    array = np.asarray(volume.array)
    if array.size == 0:
        return None
    step = max(1, round((array.size / 100_000) ** (1 / 3)))
    sample = array[::step, ::step, ::step] if array.ndim == 3 else array.ravel()[:: step ** 3]
    return "CT" if np.percentile(sample, 1) < -900 or looks_like_ct_without_air(sample) else None


#: HU of fat (about -100): a CT cropped inside the body still holds some.
CT_FAT_HU = (-150.0, -50.0)
#: Share of a cropped CT's voxels in the fat range for it to count as CT (abdominal crops hold
#: 5-30 %; an MR or PET volume holds no negative values at all).
CT_FAT_SHARE = 0.02


def looks_like_ct_without_air(values: np.ndarray) -> bool:
    """A CT cropped inside the body (no air around it): at least :data:`CT_FAT_SHARE` of the
    voxels at fat's HU (:data:`CT_FAT_HU`), nothing below -1100 HU beyond stray voxels (air and
    the padding scanners store at -1024 are caught by the air rule), and tissue above fat too."""
    v = np.asarray(values, dtype=np.float32).ravel()
    if v.size == 0:
        return False
    fat = np.count_nonzero((v >= CT_FAT_HU[0]) & (v <= CT_FAT_HU[1])) / v.size
    p1, p50 = np.percentile(v, [1, 50])
    return bool(fat >= CT_FAT_SHARE and p1 >= -1100 and p50 > CT_FAT_HU[1])


#: The darker Otsu class is air (background) when its median lies within this share of the
#: intensity range above the floor (0 for magnitude images such as MR, else the minimum) up to
#: the 99th percentile: air is near the scanner's floor; in a crop inside the body the darker
#: class is a tissue (muscle under fat, grey matter under white), well above it.
BACKGROUND_SHARE = 0.1


def has_background(values: np.ndarray, threshold: float) -> bool:
    """Does the image hold air around the body, given Otsu's ``threshold`` of ``values``?
    (See :data:`BACKGROUND_SHARE`; :func:`medseg.transforms.intensity.body_mask` asks.)"""
    v = np.asarray(values, dtype=np.float64)
    dark = v[v <= threshold]
    if dark.size == 0:
        return False
    floor, high = min(float(v.min()), 0.0), float(np.percentile(v, 99))
    return high <= floor or float(np.median(dark)) - floor <= BACKGROUND_SHARE * (high - floor)
