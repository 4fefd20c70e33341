"""Where a medseg :class:`~medseg.io.Volume` sits in napari's world, and back (no napari import).

The convention, stated once for the whole plugin: **napari's world axes are (z, y, x) in
millimetres of DICOM's patient frame LPS**, i.e. world axis 0 runs towards the patient's
Superior, axis 1 towards Posterior, axis 2 towards the patient's Left. A world point is
SimpleITK's ``TransformIndexToPhysicalPoint`` reversed, so napari's default 2D view of a CT is
the radiological axial view: anterior at the top, the patient's right on the screen's left,
slider = slice height.

A layer's data is the volume's array with its axes permuted (and flipped, as numpy views) so
that data axis ``a`` is the voxel axis nearest world axis ``a``; the layer's ``affine`` then
holds the rest (spacing, origin, the obliqueness of the direction), so an oblique series and a
label map of it stored in another axis order land on the same world points, voxel for voxel.
:func:`volume_of_layer` undoes it exactly (no interpolation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medseg.errors import InputError
from medseg.io.volume import Volume

__all__ = ["WORLD_AXES", "WORLD_FROM_RAS", "LayerGeometry", "display_of", "volume_of_layer", "world_of_ras",
           "ras_of_world", "same_world", "GEOMETRY_KEY"]

#: Names of napari's world axes in the plugin's convention (see the module docstring).
WORLD_AXES = ("z (S, mm)", "y (P, mm)", "x (L, mm)")
#: 4x4: RAS+ (x, y, z) mm -> napari world (z_S, y_P, x_L) mm. Its own inverse's transpose.
WORLD_FROM_RAS = np.array([[0.0, 0.0, 1.0, 0.0], [0.0, -1.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
RAS_FROM_WORLD = np.linalg.inv(WORLD_FROM_RAS)
#: Key of a layer's ``metadata`` that holds its scan's geometry (:meth:`LayerGeometry.to_metadata`).
GEOMETRY_KEY = "medseg"


def world_of_ras(points_ras: np.ndarray) -> np.ndarray:
    """RAS+ mm points ``(N, 3)`` -> napari world ``(N, 3)`` (z_S, y_P, x_L)."""
    p = np.atleast_2d(np.asarray(points_ras, dtype=np.float64))
    return p @ WORLD_FROM_RAS[:3, :3].T


def ras_of_world(points_world: np.ndarray) -> np.ndarray:
    """napari world ``(N, 3)`` -> RAS+ mm ``(N, 3)``."""
    p = np.atleast_2d(np.asarray(points_world, dtype=np.float64))
    return p @ RAS_FROM_WORLD[:3, :3].T


@dataclass(frozen=True)
class LayerGeometry:
    """How a layer's data relates to its scan's voxels and to the world.

    Attributes:
        scan_affine: the scan's 4x4 RAS+ voxel-to-world matrix (as read, :class:`Volume`'s).
        scan_shape: the scan's array shape ``(i, j, k)``.
        axes: data axis ``a`` is scan axis ``axes[a]``.
        flipped: data axis ``a`` runs backwards along its scan axis.
        world_affine: 4x4 data index -> napari world (z_S, y_P, x_L) mm: the layer's ``affine``.
    """

    scan_affine: np.ndarray
    scan_shape: tuple[int, int, int]
    axes: tuple[int, int, int]
    flipped: tuple[bool, bool, bool]
    world_affine: np.ndarray

    @property
    def data_shape(self) -> tuple[int, int, int]:
        return tuple(self.scan_shape[a] for a in self.axes)  # type: ignore[return-value]

    def to_data(self, array: np.ndarray) -> np.ndarray:
        """A scan-ordered array ``(i, j, k)`` as the layer's data (a numpy view, no copy)."""
        out = np.transpose(np.asarray(array), self.axes)
        for a, flip in enumerate(self.flipped):
            if flip:
                out = np.flip(out, axis=a)
        return out

    def to_scan(self, data: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_data` (a view)."""
        out = np.asarray(data)
        for a, flip in enumerate(self.flipped):
            if flip:
                out = np.flip(out, axis=a)
        return np.transpose(out, np.argsort(self.axes))

    def scan_grid(self) -> Volume:
        """An empty-valued stand-in Volume with the scan's grid (for pairing and reorienting)."""
        return Volume(np.broadcast_to(np.zeros((), np.uint8), self.scan_shape), self.scan_affine)

    def to_metadata(self, **extra) -> dict:
        """JSON-friendly dict stored under ``layer.metadata["medseg"]``: the full geometry
        (affine, shape, spacing, origin, direction, orientation in RAS+ and LPS) and ``extra``."""
        grid = Volume(np.zeros((1, 1, 1), np.uint8), self.scan_affine)
        lps = np.diag([-1.0, -1.0, 1.0])
        out = {
            "scan_affine_ras": self.scan_affine.tolist(),
            "scan_shape": list(self.scan_shape),
            "data_axes": list(self.axes),
            "data_flipped": list(self.flipped),
            "world_affine": self.world_affine.tolist(),
            "world_axes": list(WORLD_AXES),
            "spacing_mm": grid.spacing_mm.tolist(),
            "origin_ras_mm": grid.origin_mm.tolist(),
            "origin_lps_mm": (lps @ grid.origin_mm).tolist(),
            "direction_ras": grid.direction.tolist(),
            "direction_lps": (lps @ grid.direction).tolist(),
            "orientation": grid.orientation,
        }
        out.update(extra)
        return out

    @classmethod
    def from_metadata(cls, meta: dict | None) -> "LayerGeometry | None":
        """The geometry a layer's ``metadata`` holds (None when it holds none)."""
        g = (meta or {}).get(GEOMETRY_KEY)
        if not isinstance(g, dict) or "scan_affine_ras" not in g:
            return None
        return cls(np.asarray(g["scan_affine_ras"], dtype=np.float64), tuple(int(s) for s in g["scan_shape"]),
                   tuple(int(a) for a in g["data_axes"]), tuple(bool(f) for f in g["data_flipped"]),
                   np.asarray(g["world_affine"], dtype=np.float64))


def display_of(volume: Volume) -> LayerGeometry:
    """The layer geometry of ``volume``: data axes nearest the world axes, positive steps.

    For world axis ``a`` the scan axis with the largest component along it is chosen
    (nibabel's ``io_orientation``, which resolves oblique directions to a permutation); the
    data runs along that axis in the world axis's positive direction.
    """
    from nibabel.orientations import io_orientation

    to_world = WORLD_FROM_RAS @ volume.affine  # scan index -> napari world
    ornt = io_orientation(to_world)  # per scan axis: (world axis, +1/-1)
    axes = [0, 0, 0]
    flipped = [False, False, False]
    for scan_axis, (world_axis, sign) in enumerate(ornt):
        axes[int(world_axis)] = scan_axis
        flipped[int(world_axis)] = bool(sign < 0)
    # data index d -> scan index v: v[axes[a]] = d[a], or n - 1 - d[a] when flipped
    index = np.zeros((4, 4))
    index[3, 3] = 1.0
    for a, (src, flip) in enumerate(zip(axes, flipped)):
        index[src, a] = -1.0 if flip else 1.0
        index[src, 3] = volume.shape[src] - 1.0 if flip else 0.0
    return LayerGeometry(volume.affine.copy(), volume.shape, tuple(axes), tuple(flipped), to_world @ index)


def volume_of_layer(data: np.ndarray, world_affine: np.ndarray, geometry: LayerGeometry | None = None, *,
                    name: str = "layer", case_id: str = "", meta: dict | None = None) -> Volume:
    """A layer's data as a medseg Volume on its scan's grid (array order and affine as read).

    Args:
        data: the layer's 3D data.
        world_affine: the layer's full data -> world matrix (napari's ``affine`` composed with
            ``scale``/``translate``/...), 4x4, in the plugin's world convention.
        geometry: the scan's (from the layer's metadata); None: the Volume keeps the data's
            axis order, with the affine the world transform implies.
        name: the layer's name, for errors.

    Raises:
        InputError: the data are not 3D, or the layer no longer lies on its scan's grid (moved,
            resized or resampled since it was read).
    """
    data = np.asarray(data)
    if data.ndim != 3:
        raise InputError(None, f"a 3D layer ({name!r})", f"{data.ndim}D data of shape {data.shape}")
    volume = Volume(data, RAS_FROM_WORLD @ np.asarray(world_affine, dtype=np.float64), case_id, meta or {})
    if geometry is None:
        return volume
    on_scan = volume.onto_grid_of(geometry.scan_grid())
    if on_scan is None:
        raise InputError(None, f"layer {name!r} on the grid of its scan (shape {geometry.data_shape}, its world "
                         "transform when read)", f"shape {data.shape} with another world transform: it was "
                         "moved or resampled")
    return on_scan


def same_world(a: np.ndarray, b: np.ndarray, atol: float = 1e-4) -> bool:
    """Two 4x4 data -> world matrices equal within ``atol`` (mm and direction cosines)."""
    return bool(np.allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), atol=atol))
