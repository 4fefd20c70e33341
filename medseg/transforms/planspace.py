"""Volume -> plan space and back, as arrays: what :class:`~medseg.transforms.dictionary.PlanSpaced`
and :class:`~medseg.transforms.dictionary.LabelClassesd` run.

``plan_space_image`` reorients (exact), takes the slice axis first and resamples in-plane
(SimpleITK, linear) into one float32 stack, a :class:`Prepared`; ``plan_space_label`` does the
same geometry with nearest neighbour. ``restore`` maps a stack of per-slice predictions back onto
the input volume's own grid: same shape, same affine, same case id and metadata.

The shorthands ``preprocess_image`` / ``preprocess_label`` (a Plan's whole deterministic
pipeline on one volume) live in :mod:`medseg.transforms.preprocess`, above the pipeline.

Example:
    >>> prepared = plan_space_image(volume, "RAS", 2, (0.8, 0.8))
    >>> x = prepared.slices(0, prepared.n_slices)          # (n, H, W, context) float32
    >>> probs = model.predict(x)[..., 1]                   # (n, H, W)
    >>> restore(prepared, probs)                           # Volume on volume's grid
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from nibabel import orientations as nio

from medseg.io.volume import Volume
from medseg.transforms.slicing import context_slices, from_stack, to_stack
from medseg.transforms.spatial import (
    InPlaneGrid,
    Reorientation,
    inplane_grid,
    reorient_array,
    reorientation,
    resample_inplane,
)

__all__ = ["Prepared", "Inverse", "plan_space_image", "plan_space_label", "label_classes", "restore",
           "plan_geometry", "SLAB_SLICES"]


@dataclass(frozen=True, eq=False)
class Inverse:
    """What :func:`restore` needs to go back to the input grid.

    Attributes:
        shape: input array shape.
        affine: input affine (4x4, RAS+ mm), returned unchanged by ``restore``.
        case_id: input case id.
        meta: input metadata.
        reorientation: the exact axis permutation/flip to the Plan orientation.
        slice_axis: array axis (after reorientation) taken as slices.
        grid: the in-plane resampling.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    case_id: str
    meta: dict
    reorientation: Reorientation
    slice_axis: int
    grid: InPlaneGrid

    @property
    def plan_affine(self) -> np.ndarray:
        """4x4 map from plan-space indices ``(slice, h, w)`` to world RAS+ mm."""
        inplane = [a for a in range(3) if a != self.slice_axis]
        m = self.grid.index_matrix()
        p = np.zeros((4, 4))
        p[3, 3] = 1.0
        p[self.slice_axis, 0] = 1.0
        p[inplane[0], 1], p[inplane[0], 3] = m[0, 0], m[0, 2]
        p[inplane[1], 2], p[inplane[1], 3] = m[1, 1], m[1, 2]
        return self.reorientation.output_affine @ p


@dataclass(frozen=True, eq=False)
class Prepared:
    """A volume in plan space.

    Attributes:
        array: float32 ``(n_slices, H, W)``, normalized.
        inverse: geometry needed by :func:`restore`.
        context_slices: channels returned by :meth:`slices` (the Plan's).
        body: optional boolean ``(n_slices, H, W)`` body mask (for sampling inside the body).
    """

    array: np.ndarray
    inverse: Inverse
    context_slices: int = 1
    body: np.ndarray | None = field(default=None, repr=False)

    @property
    def case_id(self) -> str:
        return self.inverse.case_id

    @property
    def n_slices(self) -> int:
        return int(self.array.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def affine(self) -> np.ndarray:
        """4x4 plan-space index ``(slice, h, w)`` -> world RAS+ mm."""
        return self.inverse.plan_affine

    def with_array(self, array: np.ndarray) -> "Prepared":
        """The same record holding ``array`` (same shape: a transform of values, not of geometry).

        Raises:
            ValueError: if the shape differs.
        """
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise ValueError(f"{self.case_id}: a plan-space stack keeps its shape {self.array.shape}, "
                             f"found {array.shape}")
        return dataclasses.replace(self, array=array)

    def replace(self, **changes: Any) -> "Prepared":
        """A copy with fields changed (``body``, ``context_slices``)."""
        return dataclasses.replace(self, **changes)

    def slices(self, start: int, stop: int) -> np.ndarray:
        """Slices ``start..stop-1`` with 2.5D context: float32 ``(stop - start, H, W, context_slices)``.

        Neighbours beyond the first/last slice repeat the edge slice.

        Raises:
            IndexError: unless ``0 <= start <= stop <= n_slices``.
        """
        if not 0 <= start <= stop <= self.n_slices:
            raise IndexError(f"{self.case_id}: slice range [{start}, {stop}) outside [0, {self.n_slices}]")
        return context_slices(self.array, np.arange(start, stop), self.context_slices)


def plan_geometry(volume: Volume, orientation: str, slice_axis: int,
                  target_spacing_mm) -> tuple[Reorientation, InPlaneGrid]:
    """The reorientation and in-plane grid that take ``volume`` to plan space."""
    reo = reorientation(volume.affine, volume.shape, orientation)
    spacing = np.linalg.norm(reo.output_affine[:3, :3], axis=0)
    inplane = [a for a in range(3) if a != slice_axis]
    hw = tuple(reo.output_shape[a] for a in inplane)
    grid = inplane_grid(hw, tuple(spacing[inplane]), target_spacing_mm)
    return reo, grid


#: Slices resampled at a time: resampling's temporaries (a float32 copy of the slab, its
#: edge-padded copy, the result) then take a few MB whatever the volume's length. Resampling is
#: slice by slice, so the result is the same as for the whole stack at once.
SLAB_SLICES = 16


def _to_plan_space(array: np.ndarray, reo: Reorientation, grid: InPlaneGrid, slice_axis: int,
                   nearest: bool) -> np.ndarray:
    stack = to_stack(reorient_array(array, reo), slice_axis)
    stack = np.ascontiguousarray(stack)
    return resample_inplane(stack, grid, nearest=nearest)


def _plan_view(array: np.ndarray, transform: np.ndarray, slice_axis: int) -> np.ndarray:
    """``array`` reoriented by ``transform`` and slice-first: a view (axes permuted/flipped)."""
    return to_stack(nio.apply_orientation(array, transform), slice_axis)


def _image_to_plan_space(array: np.ndarray, reo: Reorientation, grid: InPlaneGrid, slice_axis: int) -> np.ndarray:
    """The float32 plan-space stack ``(n, H', W')`` of ``array``: the only array of its size made.

    The same values as reorienting, copying slice-first and resampling the whole stack (linear),
    but the input is read through a view and cast or resampled slab by slab into the result.
    """
    view = _plan_view(array, reo.transform, slice_axis)
    out = np.empty((view.shape[0], *grid.output_hw), dtype=np.float32)
    for start in range(0, view.shape[0], SLAB_SLICES):
        part = view[start : start + SLAB_SLICES]
        if grid.is_identity:
            out[start : start + SLAB_SLICES] = part  # the cast resample_inplane's astype makes
        else:
            out[start : start + SLAB_SLICES] = resample_inplane(np.ascontiguousarray(part), grid)
    return out


def plan_space_image(volume: Volume, orientation: str, slice_axis: int, target_spacing_mm) -> Prepared:
    """``volume`` reoriented, slice axis first and resampled in-plane (linear): float32 ``(n, H, W)``.

    Intensities are not changed (normalization is a step of its own); ``context_slices`` is 1.
    """
    reo, grid = plan_geometry(volume, orientation, slice_axis, target_spacing_mm)
    raw = np.asarray(volume.array)
    if raw.dtype == np.bool_:
        raw = raw.astype(np.uint8)
    stack = _image_to_plan_space(raw, reo, grid, slice_axis)
    inverse = Inverse(volume.shape, volume.affine.copy(), volume.case_id, dict(volume.meta), reo, slice_axis, grid)
    return Prepared(stack, inverse)


def plan_space_label(volume: Volume, orientation: str, slice_axis: int, target_spacing_mm) -> np.ndarray:
    """A label map in plan space (nearest neighbour): ``(n, H, W)`` with the volume's dtype."""
    reo, grid = plan_geometry(volume, orientation, slice_axis, target_spacing_mm)
    return np.ascontiguousarray(_to_plan_space(np.asarray(volume.array), reo, grid, slice_axis, nearest=True))


def label_classes(array: np.ndarray, num_classes: int, source: Any = "", classes: Any = None,
                  ignore: int | None = None) -> np.ndarray:
    """Label values -> uint8 class indices (or, for nested regions, region bits).

    Float-stored labels are rounded to integers first; the values are then checked by medseg's
    one label rule (:func:`medseg.io.labels.check_label_values`: no NaN, no negative value, and
    with more than 2 classes and no ``classes``, none ``>= num_classes``).

    - ``classes`` None, ``num_classes == 2``: every nonzero value is lesion (1), so masks stored
      as 0/255 or with several lesion codes work unchanged;
    - ``classes`` (a :class:`medseg.io.classes.ClassSpec` or its dict) of named classes: the
      dataset's ids -> class index ``k`` of ``names[k - 1]``; ids of no class are background;
    - ``classes`` of regions: bit ``k`` set where region ``k`` holds (at most 8 regions).

    ``ignore``: the label value of unlabelled voxels (``--ignore-label``); they become
    :data:`medseg.io.classes.IGNORE_INDEX` whatever the kind, the others as above.

    Raises:
        InputError: naming ``source`` (a file or case id), from the label rule.
    """
    from medseg.io.labels import check_label_values

    lab = np.asarray(array)
    if ignore is not None:
        from medseg.io.classes import IGNORE_INDEX

        ignored = lab == ignore
        if ignored.any():
            out = label_classes(np.where(ignored, np.zeros((), lab.dtype), lab), num_classes, source, classes)
            out[ignored] = IGNORE_INDEX
            return out
    if not np.issubdtype(lab.dtype, np.integer):
        lab = np.asarray(lab, dtype=np.float64)
        finite = np.isfinite(lab)
        lab = np.where(finite, np.rint(np.where(finite, lab, 0)), lab)  # NaN/inf stay for the rule to name
    if classes is not None:
        from medseg.io.classes import ClassSpec

        spec = classes if isinstance(classes, ClassSpec) else ClassSpec.from_dict(classes)
        check_label_values(lab, source, num_classes=None)
        lab = lab.astype(np.int64, copy=False)
        if not spec.regions:
            return spec.class_indices(lab)
        bits = np.zeros(lab.shape, np.uint8)
        for k, ids in enumerate(spec.ids):
            bits |= np.isin(lab, ids).astype(np.uint8) << np.uint8(k)
        return bits
    check_label_values(lab, source, num_classes=None if num_classes == 2 else num_classes)
    if num_classes == 2:
        return (lab > 0).astype(np.uint8)
    return lab.astype(np.uint8)


def restore(prepared: Prepared, stack: np.ndarray) -> Volume:
    """Map a plan-space stack back onto the grid of the volume ``prepared`` came from.

    Args:
        prepared: from :func:`preprocess_image`.
        stack: ``(n_slices, H, W)`` in plan space; floats (probabilities) are resampled linearly
            (float32 result), integer/bool (class maps) by nearest neighbour (dtype kept).

    Returns:
        A Volume with exactly the input's shape, affine, case id and metadata. Without in-plane
        resampling its array is a view of ``stack`` (float32 or integer input: no copy of the
        volume, possibly not C-contiguous); with resampling a new C-contiguous array.

    Raises:
        ValueError: if ``stack``'s shape is not ``prepared.array``'s.
    """
    stack = np.asarray(stack)
    if stack.shape != prepared.array.shape:
        raise ValueError(f"{prepared.case_id}: restore expects a stack of shape {prepared.array.shape}, "
                         f"found {stack.shape}")
    inv = prepared.inverse
    nearest = stack.dtype == np.bool_ or np.issubdtype(stack.dtype, np.integer)
    data = stack.astype(np.uint8) if stack.dtype == np.bool_ else stack
    if inv.grid.is_identity:
        # Reorientation and slice-first are axis permutations/flips: undo them as a view.
        back = resample_inplane(data, inv.grid, nearest=nearest, inverse=True)
        array = nio.apply_orientation(from_stack(back, inv.slice_axis), inv.reorientation.inverse_transform)
    else:
        # Resample slab by slab straight into the result, seen through its plan-space view.
        array = np.empty(inv.shape, dtype=data.dtype if nearest else np.float32)
        target = _plan_view(array, inv.reorientation.transform, inv.slice_axis)
        for start in range(0, data.shape[0], SLAB_SLICES):
            part = np.ascontiguousarray(data[start : start + SLAB_SLICES])
            target[start : start + SLAB_SLICES] = resample_inplane(part, inv.grid, nearest=nearest, inverse=True)
    if stack.dtype == np.bool_:
        array = array.astype(bool)
    return Volume(array, inv.affine.copy(), inv.case_id, dict(inv.meta))
