"""Independent geometry checks shared by the napari tests and benchmarks/napari_plugin.py:
napari's world position of a layer's voxels against SimpleITK's physical points (no medseg code)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def sitk_image(path: Path):
    """SimpleITK's own reading of ``path`` (a DICOM series folder: GDCM's sorted file names)."""
    import SimpleITK as sitk

    path = Path(path)
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        return reader.Execute()
    return sitk.ReadImage(str(path))


def chosen_indices(shape, n: int = 12, seed: int = 0) -> np.ndarray:
    """The 8 corners plus ``n`` random voxels of a data array of ``shape`` (data indices)."""
    rng = np.random.default_rng(seed)
    corners = np.array([[a, b, c] for a in (0, shape[0] - 1) for b in (0, shape[1] - 1) for c in (0, shape[2] - 1)])
    return np.concatenate([corners, rng.integers(0, shape, size=(n, 3))])


def world_matches_sitk(layer, image, atol_mm: float = 1e-3) -> tuple[bool, str]:
    """For chosen voxels of ``layer`` (napari): its world point, reversed to (x, y, z), is an LPS
    physical point of SimpleITK's ``image`` at an integer index holding the same value.

    Returns ``(ok, why-not)``.
    """
    import SimpleITK as sitk

    array = sitk.GetArrayViewFromImage(image)  # (z, y, x)
    for d in chosen_indices(layer.data.shape):
        world = np.asarray(layer.data_to_world(d), dtype=np.float64)
        lps = tuple(float(v) for v in world[::-1])
        index = np.asarray(image.TransformPhysicalPointToContinuousIndex(lps))
        if np.max(np.abs(index - np.round(index))) > 1e-3:
            return False, f"voxel {d.tolist()} at world {world.tolist()} is SimpleITK index {index.tolist()}"
        i, j, k = (int(v) for v in np.round(index))
        back = np.asarray(image.TransformIndexToPhysicalPoint((i, j, k)))
        if np.max(np.abs(back - np.asarray(lps))) > atol_mm:
            return False, f"voxel {d.tolist()}: world {lps} vs SimpleITK {back.tolist()}"
        if layer.data[tuple(d)] != array[k, j, i]:
            return False, f"voxel {d.tolist()}: value {layer.data[tuple(d)]} vs SimpleITK's {array[k, j, i]}"
    return True, ""


def same_geometry(written, source, atol: float = 1e-4) -> tuple[bool, str]:
    """Spacing, origin, direction and size of two SimpleITK images equal (within ``atol``)."""
    checks = {"size": (written.GetSize(), source.GetSize()), "spacing": (written.GetSpacing(), source.GetSpacing()),
              "origin": (written.GetOrigin(), source.GetOrigin()),
              "direction": (written.GetDirection(), source.GetDirection())}
    for what, (a, b) in checks.items():
        if not np.allclose(a, b, atol=atol):
            return False, f"{what} {a} != {b}"
    return True, ""
