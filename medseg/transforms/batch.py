"""One training batch as the random steps see it, and the one executor that runs them in order.

:func:`run_random` calls every random step of a pipeline, in its saved order, on one
:class:`PatchBatch`, each step on a shallow copy of itself whose generator is the batch's own
(``np.random.default_rng([seed, i])`` for batch ``i``): so batch ``i`` is a pure function of
``(seed, i)`` and parallel builders never share a generator. The same steps, called directly on
a sample, run this same code (a plain dict becomes a batch).

A batch is the mapping ``{"image": (B, H, W, C) float32, "label": (B, H, W) uint8, ...}``. The
patch sampler (``RandLesionPatchd``) leaves a *pending cut*: the patch centres on the cached
cases, not yet cut. The patches are cut the first time a step reads ``"image"`` or ``"label"``.
Until then a step may put its work into the cut, which changes no result but saves a pass:

- ``RandJointAugmentd`` folds its spatial change into the cut (one interpolation from the case,
  no border padding inside the volume); after the cut it warps the ready patches instead;
- ``RandEnhancementd`` runs on the patches as soon as they are cut (it changes intensities by
  class, so it acts where the cut puts the labels).

A step that reads the patches (a user's step) therefore sees them exactly as the steps before
it left them, and none of the steps after it.
"""

from __future__ import annotations

import copy
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from medseg.io.classes import LabelKind
from medseg.transforms.sampling import Centres, PatchSampler, SampleSource
from medseg.transforms.warp import SpatialParams, render

__all__ = ["PatchBatch", "run_random"]


@dataclass
class _Cut:
    """Where the patches of a pending cut come from (see :func:`medseg.transforms.warp.render`)."""

    keys: tuple[str, str]
    centres: Centres
    patch_size: tuple[int, int]
    context_slices: int
    label_kind: LabelKind
    spatial: SpatialParams | None = None


class PatchBatch(MutableMapping):
    """The patches of one batch (see the module docstring), cut lazily.

    Args:
        rng: the batch's generator (steps run by :func:`run_random` draw from it).
        size: patches in the batch (``B``).
        sources: the cases a pending cut reads (plan space, :class:`SampleSource`).
        sampler: the patch sampler over ``sources`` (built once per cache).
        after_patch: passed on to :func:`medseg.transforms.warp.render` (the disk cache's
            release of each patch's pages).

    Attributes:
        params: what the steps drew (``"centres"``, ``"spatial"``, ``"intensity"``, ``"enhancement"``).
    """

    def __init__(self, rng: np.random.Generator, size: int, *, sources: Sequence[SampleSource] = (),
                 sampler: PatchSampler | None = None, after_patch: Callable | None = None):
        self.rng = rng
        self.size = int(size)
        self.sources = sources
        self.sampler = sampler
        self.after_patch = after_patch
        self.params: dict[str, Any] = {}
        self._data: dict[str, Any] = {}
        self._cut: _Cut | None = None
        self._at_cut: list[Callable[["PatchBatch"], None]] = []

    @classmethod
    def of(cls, sample: Mapping[str, Any], rng: np.random.Generator, *, copy_arrays: bool = False) -> "PatchBatch":
        """``sample`` as a batch (itself when it is one): ready patches, the caller's dict untouched.

        ``copy_arrays``: copy the entries that are arrays (for steps that change them in place).
        """
        if isinstance(sample, PatchBatch):
            return sample
        batch = cls(rng, 0)
        for key, value in sample.items():
            batch._data[key] = np.array(value, copy=True) if copy_arrays and isinstance(value, np.ndarray) else value
        return batch

    # --- the pending cut ---------------------------------------------------------------------
    @property
    def pending(self) -> bool:
        """True while the patches are drawn but not cut."""
        return self._cut is not None

    @property
    def patch_size(self) -> tuple[int, int]:
        return self._cut.patch_size if self._cut is not None else tuple(self._first_array().shape[1:3])

    @property
    def channels(self) -> int:
        return self._cut.context_slices if self._cut is not None else int(self._first_array().shape[3])

    def _first_array(self) -> np.ndarray:
        return np.asarray(next(v for v in self._data.values() if isinstance(v, np.ndarray)))

    def cut(self, keys: tuple[str, str], centres: Centres, patch_size: tuple[int, int], context_slices: int,
            label_kind: LabelKind) -> None:
        """Patches of ``sources`` at ``centres``, to be cut into ``keys`` (image, label) when first read."""
        self._cut = _Cut(tuple(keys), centres, tuple(int(v) for v in patch_size), int(context_slices),
                         LabelKind.named(label_kind))
        self.size = len(centres)
        for key in keys:
            self._data.pop(key, None)

    def fold_spatial(self, spatial: SpatialParams) -> None:
        """Apply ``spatial`` while cutting (pending cut only)."""
        if self._cut is None:
            raise RuntimeError("the patches are cut already; warp them instead")
        self._cut.spatial = spatial

    def at_cut(self, step: Callable[["PatchBatch"], None]) -> None:
        """Run ``step(batch)`` on the patches as soon as they are cut (now, if they are)."""
        if self._cut is None:
            step(self)
        else:
            self._at_cut.append(step)

    def _render(self) -> None:
        cut, self._cut = self._cut, None
        images, masks = render(self.sources, cut.centres, cut.patch_size, cut.context_slices, cut.spatial,
                               after_patch=self.after_patch, label_kind=cut.label_kind)
        self._data[cut.keys[0]], self._data[cut.keys[1]] = images, masks
        steps, self._at_cut = self._at_cut, []
        for step in steps:
            step(self)

    # --- mapping -------------------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        if self._cut is not None and key in self._cut.keys:
            self._render()
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if self._cut is not None and key in self._cut.keys:
            self._render()
        self._data[key] = value

    def __delitem__(self, key: str) -> None:
        if self._cut is not None and key in self._cut.keys:
            self._render()
        del self._data[key]

    def __iter__(self) -> Iterator[str]:
        keys = list(self._data)
        if self._cut is not None:
            keys += [k for k in self._cut.keys if k not in self._data]
        return iter(keys)

    def __len__(self) -> int:
        return len(list(iter(self)))

    def __contains__(self, key: object) -> bool:
        return key in self._data or (self._cut is not None and key in self._cut.keys)

    def __repr__(self) -> str:
        state = "pending cut" if self.pending else "cut"
        return f"PatchBatch(size={self.size}, keys={list(self)}, {state})"

    def absorb(self, out: Mapping[str, Any], step: Any, keys: tuple[str, str] = ("image", "label")) -> "PatchBatch":
        """Take a step's result (a new mapping, e.g. a user's ``dict(sample)``) into this batch.

        Raises:
            ValueError: naming the step, when it changed the batch's shapes.
            TypeError: when it returned no mapping.
        """
        if out is self:
            return self
        if not isinstance(out, Mapping):
            raise TypeError(f"random step {step!r} must return the sample mapping, found {type(out).__name__}")
        before = {k: np.shape(self[k]) for k in keys if k in self}
        images = np.asarray(out[keys[0]], dtype=np.float32)
        masks = np.asarray(out[keys[1]], dtype=np.uint8)
        if (images.shape, masks.shape) != (before.get(keys[0]), before.get(keys[1])):
            raise ValueError(f"random step {type(step).__name__} must keep the batch shapes {before.get(keys[0])} / "
                             f"{before.get(keys[1])}, found {images.shape} / {masks.shape}")
        self._data = {k: v for k, v in out.items()}
        self._data[keys[0]], self._data[keys[1]] = images, masks
        return self


def run_random(steps: Sequence[Any], batch: PatchBatch) -> PatchBatch:
    """Run the random ``steps`` in order on ``batch`` (the one executor; see the module docstring).

    Each step is called as ``step(batch)`` on a shallow copy of it whose ``rng`` is ``batch.rng``
    (the step object itself is never changed, so parallel builders may share it). The patches
    are cut at the end if no step read them.

    Raises:
        Whatever a step raises, with a note naming the step (Python >= 3.11).
    """
    for t in steps:
        step = copy.copy(t)
        step.set_random_state(rng=batch.rng)
        try:
            out = step(batch)
        except Exception as exc:
            if hasattr(exc, "add_note"):
                exc.add_note(f"while applying the random step {t!r} to a training batch")
            raise
        batch = batch.absorb(out, t)
    if batch.pending:
        batch._render()
    return batch
