"""The plugin's writer contribution: a Labels layer to NIfTI / NRRD / MHA on its scan's grid.

The grid comes from, in order: the layer's own ``metadata["medseg"]`` (a layer the reader or the
segment widget made), else an Image layer of the current viewer read by medseg with the same
data shape and world transform (a layer painted from scratch with napari's "new labels" button
copies both from the image). Without either the write is refused with one line: a label map
written with an identity affine would overlay no scan, and the error would surface much later.
The file is written by :func:`medseg.io.write_volume` (atomic; the scan's own file is protected).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from medseg.errors import InputError
from medseg.napari.geometry import GEOMETRY_KEY, LayerGeometry, same_world, volume_of_layer

__all__ = ["write_labels", "labels_volume", "world_affine_of", "grid_from_layers"]


def world_affine_of(meta: Mapping[str, Any], ndim: int = 3) -> np.ndarray:
    """A layer's full data -> world 4x4 matrix from its layer-data ``meta`` (napari's ``affine``
    after ``scale``/``translate``/``rotate``/``shear``, as napari composes them)."""
    from napari.utils.transforms import Affine

    inner = Affine(scale=meta.get("scale", np.ones(ndim)), translate=meta.get("translate", np.zeros(ndim)),
                   rotate=meta.get("rotate"), shear=meta.get("shear"), ndim=ndim)
    outer = meta.get("affine")
    outer_matrix = np.eye(ndim + 1) if outer is None else np.asarray(getattr(outer, "affine_matrix", outer))
    return outer_matrix @ inner.affine_matrix


def grid_from_layers(shape: Sequence[int], world: np.ndarray, layers) -> tuple[LayerGeometry, Any] | None:
    """``(geometry, layer)`` of the first medseg-read layer in ``layers`` whose data have ``shape``
    and whose world transform equals ``world``; None when there is none."""
    for layer in layers:
        geometry = LayerGeometry.from_metadata(getattr(layer, "metadata", None))
        if geometry is None or tuple(layer.data.shape[:3]) != tuple(shape):
            continue
        if same_world(world_affine_of(_layer_meta(layer)), world):
            return geometry, layer
    return None


def _layer_meta(layer) -> dict:
    return {"affine": layer.affine.affine_matrix, "scale": layer.scale, "translate": layer.translate,
            "rotate": layer.rotate, "shear": layer.shear}


def _viewer_layers():
    try:
        from napari import current_viewer
    except ImportError:  # pragma: no cover - napari is there whenever napari calls us
        return []
    viewer = current_viewer()
    return [] if viewer is None else list(viewer.layers)


def labels_volume(data: Any, meta: Mapping[str, Any], layers=None):
    """The Labels layer ``(data, meta)`` as a medseg Volume on its scan's grid.

    Args:
        layers: where to look for a matching image layer when the layer carries no geometry
            (default: the current viewer's layers).

    Raises:
        InputError: no grid can be found (says why), the data are not 3D, or the layer was
            moved or resampled off its scan's grid.
    """
    name = str(meta.get("name") or "labels")
    data = np.asarray(data)
    if data.ndim != 3:
        raise InputError(None, f"a 3D Labels layer ({name!r})", f"{data.ndim}D data of shape {data.shape}")
    world = world_affine_of(meta)
    own = dict(meta.get("metadata") or {})
    geometry = LayerGeometry.from_metadata(own)
    if geometry is None:
        found = grid_from_layers(data.shape, world, _viewer_layers() if layers is None else layers)
        if found is None:
            raise InputError(None, f"a scan for Labels layer {name!r}: its own medseg geometry (a layer medseg read "
                             "or segmented) or an image layer read by medseg with the same shape and position",
                             f"neither (shape {data.shape}); refusing to write it without a grid (an identity "
                             "affine would overlay no scan)", "open the scan with the medseg reader and paint on a "
                             "labels layer made from it")
        geometry, image = found
        own = dict(image.metadata)
    info = own.get(GEOMETRY_KEY, {})
    meta_in = dict(info.get("volume_meta") or {})
    # meta_in["source_path"]: the file the layer (or its scan) was read from: write_volume refuses it
    return volume_of_layer(data, world, geometry, name=name, case_id=str(info.get("case_id") or name), meta=meta_in)


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 single-layer writer: ``data`` of a Labels layer to ``path`` (``.nii``, ``.nii.gz``,
    ``.nrrd``, ``.mha``) on its scan's grid; returns ``[path]``.

    Raises:
        InputError: one line, when no grid is found, the extension is not one medseg writes,
            or the path is the file the layer (or its scan) was read from. napari shows it as a
            notification.
    """
    from medseg.io import write_volume

    volume = labels_volume(data, meta)
    array = np.asarray(volume.array)
    if array.dtype.kind not in "iub":
        array = np.rint(array).astype(np.int32)
    if array.dtype.itemsize > 2 and array.size and int(array.max()) < 65536 and int(array.min()) >= 0:
        array = array.astype(np.uint16 if array.max() > 255 else np.uint8)  # napari paints int32/uint8
    volume = volume.with_array(np.ascontiguousarray(array))
    target = Path(path)
    # overwrite: napari's save dialog has asked already; the source file stays protected.
    write_volume(volume, target, overwrite=True)
    return [str(target)]
