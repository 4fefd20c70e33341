"""Volume -> plan space and back: the one preprocessing path shared by training and inference.

``preprocess_image`` reorients (exact), takes the slice axis first, resamples in-plane to the
Plan's spacing (SimpleITK, linear) and normalizes. ``preprocess_label`` does the same geometry
with nearest neighbour. ``restore`` maps a stack of per-slice predictions back onto the input
volume's own grid: same shape, same affine, same case id and metadata.

Example:
    >>> prepared = preprocess_image(volume, plan)
    >>> x = prepared.slices(0, prepared.n_slices)          # (n, H, W, context) float32
    >>> probs = model.predict(x)[..., 1]                   # (n, H, W)
    >>> restore(prepared, probs)                           # Volume on volume's grid
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from nibabel import orientations as nio

from medseg.io.volume import Volume
from medseg.transforms.intensity import body_mask, normalize_inplace
from medseg.transforms.slicing import context_slices, from_stack, to_stack
from medseg.transforms.spatial import (
    InPlaneGrid,
    Reorientation,
    inplane_grid,
    reorient_array,
    reorientation,
    resample_inplane,
)

__all__ = ["Prepared", "Inverse", "preprocess_image", "preprocess_label", "restore", "plan_geometry", "PlanPreprocessd"]


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

    def slices(self, start: int, stop: int) -> np.ndarray:
        """Slices ``start..stop-1`` with 2.5D context: float32 ``(stop - start, H, W, context_slices)``.

        Neighbours beyond the first/last slice repeat the edge slice.

        Raises:
            IndexError: unless ``0 <= start <= stop <= n_slices``.
        """
        if not 0 <= start <= stop <= self.n_slices:
            raise IndexError(f"{self.case_id}: slice range [{start}, {stop}) outside [0, {self.n_slices}]")
        return context_slices(self.array, np.arange(start, stop), self.context_slices)


def plan_geometry(volume: Volume, plan: Any) -> tuple[Reorientation, InPlaneGrid]:
    """The reorientation and in-plane grid ``plan`` implies for ``volume``."""
    reo = reorientation(volume.affine, volume.shape, plan.orientation)
    spacing = np.linalg.norm(reo.output_affine[:3, :3], axis=0)
    inplane = [a for a in range(3) if a != plan.slice_axis]
    hw = tuple(reo.output_shape[a] for a in inplane)
    grid = inplane_grid(hw, tuple(spacing[inplane]), plan.target_spacing_mm)
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


def preprocess_image(volume: Volume, plan: Any, *, with_body: bool = False) -> Prepared:
    """Reorient, slice-first, resample in-plane (linear) and normalize ``volume``.

    Args:
        volume: the image.
        plan: a :class:`medseg.data.plan.Plan`.
        with_body: also compute the body mask in plan space (``Prepared.body``), used by
            training to draw random patches inside the body.

    Returns:
        :class:`Prepared` with ``array`` float32 ``(n_slices, H, W)``.
    """
    reo, grid = plan_geometry(volume, plan)
    raw = np.asarray(volume.array)
    if raw.dtype == np.bool_:
        raw = raw.astype(np.uint8)
    stack = _image_to_plan_space(raw, reo, grid, plan.slice_axis)
    # Normalization after resampling: the body mask and percentiles are then computed on the
    # exact voxels the network sees, at training and inference alike. The stack is normalized
    # in place and its body statistics are read chunk by chunk (no boolean mask of the volume is
    # made unless training asks for it), so whole-volume preprocessing holds one float32 stack
    # rather than a chain of full-size temporaries.
    body = body_mask(stack, plan.modality) if with_body else None
    array = normalize_inplace(stack, plan.normalization, modality=plan.modality, body=body)
    inverse = Inverse(volume.shape, volume.affine.copy(), volume.case_id, dict(volume.meta), reo,
                      plan.slice_axis, grid)
    return Prepared(np.ascontiguousarray(array, dtype=np.float32), inverse, plan.context_slices,
                    body if with_body else None)


def preprocess_label(volume: Volume, plan: Any) -> np.ndarray:
    """The label map in plan space: uint8 ``(n_slices, H, W)``, nearest neighbour.

    Values are rounded to integers; with ``plan.num_classes == 2`` every nonzero value is lesion
    (1), so masks stored as 0/255 or with several lesion codes work unchanged.

    Raises:
        ValueError: if a value is negative or, with more than 2 classes, ``>= num_classes``.
    """
    lab = np.rint(np.asarray(volume.array, dtype=np.float64)) if not np.issubdtype(
        np.asarray(volume.array).dtype, np.integer) else np.asarray(volume.array)
    if lab.size and lab.min() < 0:
        raise ValueError(f"{volume.case_id}: label values must be >= 0, found minimum {lab.min()}")
    if plan.num_classes == 2:
        lab = (lab > 0).astype(np.uint8)
    else:
        if lab.size and lab.max() >= plan.num_classes:
            raise ValueError(f"{volume.case_id}: label values must be < num_classes={plan.num_classes}, "
                             f"found maximum {lab.max()}")
        lab = lab.astype(np.uint8)
    reo, grid = plan_geometry(volume, plan)
    return np.ascontiguousarray(_to_plan_space(lab, reo, grid, plan.slice_axis, nearest=True), dtype=np.uint8)


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


class PlanPreprocessd:
    """Dictionary transform: ``{"image": Volume, "label": Volume}`` -> plan space.

    ``image`` becomes a :class:`Prepared` (with its body mask) and ``label`` a uint8
    ``(n_slices, H, W)`` stack; ``label`` may be absent (inference).

    Raises:
        KeyError: if the image key is missing.
        ValueError: if the label is not on the image's grid.
    """

    def __init__(self, plan: Any, keys: tuple[str, str] = ("image", "label")):
        self.plan = plan
        self.keys = tuple(keys)

    def __repr__(self) -> str:
        return f"PlanPreprocessd(keys={self.keys})"

    def __call__(self, sample: dict) -> dict:
        image_key, label_key = self.keys
        if image_key not in sample:
            raise KeyError(f"{self!r}: sample has no key {image_key!r} (keys: {sorted(sample)})")
        out = dict(sample)
        image = sample[image_key]
        out[image_key] = preprocess_image(image, self.plan, with_body=True)
        if sample.get(label_key) is not None:
            label = sample[label_key]
            if not image.same_grid(label):
                raise ValueError(f"{image.case_id}: label {label!r} is not on the image's grid {image!r}")
            out[label_key] = preprocess_label(label, self.plan)
        return out
