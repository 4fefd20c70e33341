"""Lesion-aware 2D patch sampling from slice-first volumes: where each patch comes from.

:class:`PatchSampler` draws the *centres*; :func:`medseg.transforms.warp.render` cuts the
patches out (with the spatial augmentation folded in).

Sampling rule (per batch of ``B``):

- ``floor(B * lesion_fraction)`` patches (plus one more with probability equal to the remainder)
  are *lesion-centred*: pick a case among those with lesion, then one of its lesions (connected
  component) uniformly, then a voxel of that lesion uniformly, then shift the centre by a uniform
  jitter of at most ``jitter`` pixels. With several foreground classes (or regions) a class is
  picked first, uniformly, then a case holding it and one of its components there: a class
  present in few cases or as small structures gets the same share as a large one. Choosing the component first keeps a 10-voxel metastasis
  as likely as a 10 000-voxel primary; sampling voxels would almost never pick the small one.
- The others are *random*: a slice drawn uniformly over all slices of all cases, centred on a
  random body voxel (``inside_body=True``, the default; air-only patches teach nothing) or
  anywhere such that the patch lies inside the image.
- Patches that reach past the image border are padded: image with the case's background value,
  label with 0. Volumes without lesion only give random patches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from medseg.io.classes import BINARY, LabelKind, without_ignore

__all__ = [
    "LesionIndex",
    "build_index",
    "SampleSource",
    "Centres",
    "PatchSampler",
]


@dataclass(frozen=True, eq=False)
class LesionIndex:
    """Where the lesions and the body of one case are, compactly (kept for every case in RAM).

    Attributes:
        coords: int32 ``(K, 3)`` ``(slice, h, w)`` lesion voxels, grouped by component; at most
            ``max_per_component`` random voxels per component.
        offsets: int64 ``(n_components + 1,)``; component ``c`` is ``coords[offsets[c]:offsets[c+1]]``.
        body: int32 ``(M, 3)`` random body voxels (empty: the whole image counts as body).
        component_voxels: int64 ``(n_components,)`` full size of each component.
        component_class: int64 ``(n_components,)`` the class (1-based; region ``k`` is ``k + 1``)
            each component belongs to; all 1 for binary labels.
    """

    coords: np.ndarray
    offsets: np.ndarray
    body: np.ndarray
    component_voxels: np.ndarray
    component_class: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.component_class is None:  # binary, or a cache written before classes existed
            object.__setattr__(self, "component_class", np.ones(self.n_components, np.int64))

    @property
    def n_components(self) -> int:
        return int(len(self.offsets) - 1)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"coords": self.coords, "offsets": self.offsets, "body": self.body,
                "component_voxels": self.component_voxels, "component_class": self.component_class}

    @classmethod
    def from_arrays(cls, arrays: Any) -> "LesionIndex":
        keys = getattr(arrays, "files", None) or list(arrays)
        parts = [np.asarray(arrays[k]) for k in ("coords", "offsets", "body", "component_voxels")]
        return cls(*parts, np.asarray(arrays["component_class"]) if "component_class" in keys else None)


def _component_voxels(mask: np.ndarray, rng: np.random.Generator, max_per_component: int):
    """Flat voxel indices of each component of ``mask`` (subsampled), and the full sizes."""
    from medseg.components import label_components

    comps, n = label_components(mask)
    flat = np.flatnonzero(comps)
    ids = comps.ravel()[flat]
    order = np.argsort(ids, kind="stable")
    flat, ids = flat[order], ids[order]
    counts = np.bincount(ids, minlength=n + 1)[1:]
    starts = np.concatenate([[0], np.cumsum(counts)])
    keep = []
    for c in range(n):
        seg = flat[starts[c]:starts[c + 1]]
        if seg.size > max_per_component:
            seg = np.sort(rng.choice(seg, max_per_component, replace=False))
        keep.append(seg)
    return keep, counts


def build_index(
    label: np.ndarray,
    body: np.ndarray | None = None,
    *,
    max_per_component: int = 2048,
    max_body: int = 4096,
    seed: int = 0,
    label_kind: LabelKind | str = BINARY,
) -> LesionIndex:
    """Index the lesions (3D connected components, :mod:`medseg.components`) and sample body voxels.

    Args:
        label: ``(n, H, W)`` of ``label_kind``: binary (nonzero is lesion), class indices (the
            components of each class apart) or region bits (each region apart).
        body: optional boolean ``(n, H, W)`` body mask.
        max_per_component: voxels kept per component (memory stays small for big lesions).
        max_body: body voxels kept.
        seed: seeds the subsampling.
        label_kind: a :class:`~medseg.io.classes.LabelKind` or its saved name; its
            :meth:`~medseg.io.classes.LabelKind.masks` splits the label into classes.
    """
    rng = np.random.default_rng(seed)
    lab = np.asarray(label)
    keep, sizes, classes = [], [], []
    for cls_id, mask in LabelKind.named(label_kind).labelled_masks(lab):
        parts, counts = _component_voxels(mask, rng, max_per_component)
        keep += parts
        sizes.append(counts)
        classes.append(np.full(len(parts), cls_id, np.int64))
    kept_counts = np.array([k.size for k in keep], dtype=np.int64)
    kept = np.concatenate(keep) if keep else np.zeros(0, np.int64)
    coords = np.stack(np.unravel_index(kept, lab.shape), axis=1).astype(np.int32) if kept.size else \
        np.zeros((0, 3), np.int32)
    offsets = np.concatenate([[0], np.cumsum(kept_counts)]).astype(np.int64)
    body_coords = np.zeros((0, 3), np.int32)
    ignored = without_ignore(lab)[1]
    if ignored is not None:
        # Partial labels: random patches are centred on labelled voxels (of the body) only, so
        # they come from the labelled slices and regions.
        body = ~ignored if body is None else np.asarray(body, dtype=bool) & ~ignored
    if body is not None:
        b = np.asarray(body, dtype=bool)
        # Rejection sampling: np.flatnonzero on a 26 M-voxel mask would allocate 200 MB.
        cand = rng.integers(0, b.size, size=8 * max_body)
        cand = cand[b.ravel()[cand]][:max_body]
        if ignored is not None and cand.size < max_body // 4:
            # A few labelled slices are too rare a target for rejection sampling: draw exactly.
            inside = np.flatnonzero(b)
            cand = rng.choice(inside, min(max_body, inside.size), replace=False) if inside.size else inside
        if cand.size:
            body_coords = np.stack(np.unravel_index(cand, b.shape), axis=1).astype(np.int32)
    component_voxels = np.concatenate(sizes).astype(np.int64) if sizes else np.zeros(0, np.int64)
    component_class = np.concatenate(classes) if classes else np.zeros(0, np.int64)
    return LesionIndex(coords, offsets, body_coords, component_voxels, component_class)


@dataclass(frozen=True, eq=False)
class SampleSource:
    """One case in plan space, as the sampler sees it.

    Attributes:
        image: float32 ``(n, H, W)`` (ndarray or memory-mapped).
        label: uint8 ``(n, H, W)``.
        index: its :class:`LesionIndex`.
        pad_value: image value for padding outside the volume (its background).
        case_id: for messages.
    """

    image: np.ndarray
    label: np.ndarray
    index: LesionIndex
    pad_value: float = 0.0
    case_id: str = ""


@dataclass(frozen=True, eq=False)
class Centres:
    """Patch centres of one batch (all ``(B,)`` int arrays; ``lesion`` bool: lesion-centred)."""

    case: np.ndarray
    slice: np.ndarray
    h: np.ndarray
    w: np.ndarray
    lesion: np.ndarray

    def __len__(self) -> int:
        return int(self.case.size)

    def as_dict(self) -> dict[str, list]:
        return {k: getattr(self, k).tolist() for k in ("case", "slice", "h", "w", "lesion")}


class PatchSampler:
    """Draws lesion-aware patch centres over a list of :class:`SampleSource` (see module docstring).

    Args:
        sources: the cases.
        patch_size: (H, W) of the patches.
        lesion_fraction: expected fraction of lesion-centred patches per batch, in [0, 1].
        jitter: maximal shift (pixels) of a lesion-centred patch's centre from the lesion voxel,
            per axis; default a quarter of the patch, so the lesion is never at a fixed position
            and always inside the patch.
        inside_body: centre random patches on body voxels when the case has a body sample.

    Raises:
        ValueError: no sources, bad patch size, fraction outside [0, 1], or jitter >= patch / 2.
    """

    def __init__(self, sources: Sequence[SampleSource], patch_size: tuple[int, int], *,
                 lesion_fraction: float = 0.5, jitter: tuple[int, int] | int | None = None,
                 inside_body: bool = True):
        self.sources = list(sources)
        if not self.sources:
            raise ValueError("PatchSampler needs at least one source volume, found none")
        ph, pw = (int(v) for v in patch_size)
        if ph < 1 or pw < 1:
            raise ValueError(f"patch_size must be two positive integers, found {patch_size!r}")
        self.patch_size = (ph, pw)
        if not 0.0 <= float(lesion_fraction) <= 1.0:
            raise ValueError(f"lesion_fraction must lie in [0, 1], found {lesion_fraction!r}")
        self.lesion_fraction = float(lesion_fraction)
        if jitter is None:
            jitter = (ph // 4, pw // 4)
        elif np.isscalar(jitter):
            jitter = (int(jitter), int(jitter))
        self.jitter = tuple(int(j) for j in jitter)
        if any(j < 0 or 2 * j >= p for j, p in zip(self.jitter, self.patch_size)):
            raise ValueError(f"jitter must be >= 0 and < half the patch {self.patch_size}, found {self.jitter}")
        self.inside_body = bool(inside_body)
        self.n_slices = np.array([s.image.shape[0] for s in self.sources], dtype=np.int64)
        self._slice_cum = np.cumsum(self.n_slices)
        self.lesion_cases = np.array([i for i, s in enumerate(self.sources) if s.index.n_components > 0],
                                     dtype=np.int64)
        # Several foreground classes: a lesion-centred patch picks a class first, so a rare class
        # gets its share of patches (then a case holding it, then one of its components there).
        present = sorted({int(c) for s in self.sources for c in np.unique(s.index.component_class)})
        self.classes = np.array(present, dtype=np.int64)
        self._class_cases = {c: np.array([i for i, s in enumerate(self.sources)
                                          if np.any(s.index.component_class == c)], dtype=np.int64) for c in present}
        self._class_components = {(c, i): np.flatnonzero(self.sources[i].index.component_class == c)
                                  for c in present for i in self._class_cases[c]}

    def n_lesion_patches(self, batch_size: int, rng: np.random.Generator) -> int:
        """``floor(B * f)`` plus one with probability ``frac(B * f)``; 0 when no case has a lesion."""
        if self.lesion_cases.size == 0:
            return 0
        expected = batch_size * self.lesion_fraction
        base = int(np.floor(expected))
        return base + int(rng.random() < expected - base)

    def draw(self, batch_size: int, rng: np.random.Generator) -> Centres:
        """Centres of one batch; lesion-centred ones first.

        All random numbers of the batch are drawn in a few vectorised calls; the loops only look
        up coordinates.
        """
        B = int(batch_size)
        n_les = self.n_lesion_patches(B, rng)
        ph, pw = self.patch_size
        jh, jw = self.jitter
        case = np.empty(B, np.int64)
        sl = np.empty(B, np.int64)
        hh = np.empty(B, np.int64)
        ww = np.empty(B, np.int64)
        u = rng.random((B, 4))  # case / component / voxel (or slice / row / column) choices
        jitter = np.stack([rng.integers(-jh, jh + 1, B), rng.integers(-jw, jw + 1, B)], axis=1)
        if n_les and self.classes.size > 1:
            self._draw_by_class(n_les, u, rng.random(n_les), jitter, case, sl, hh, ww)
        elif n_les:
            chosen = self.lesion_cases[(u[:n_les, 0] * self.lesion_cases.size).astype(np.int64)]
            for b, c in enumerate(chosen):
                idx = self.sources[int(c)].index
                comp = int(u[b, 1] * idx.n_components)
                lo, hi = int(idx.offsets[comp]), int(idx.offsets[comp + 1])
                s, h, w = idx.coords[lo + int(u[b, 2] * (hi - lo))]
                case[b], sl[b], hh[b], ww[b] = c, s, h + jitter[b, 0], w + jitter[b, 1]
        if B > n_les:
            flat_slices = (u[n_les:, 0] * self._slice_cum[-1]).astype(np.int64)
            cases = np.searchsorted(self._slice_cum, flat_slices, side="right")
            for b, c, g in zip(range(n_les, B), cases, flat_slices):
                src = self.sources[int(c)]
                n, H, W = src.image.shape
                case[b] = c
                body = src.index.body
                if self.inside_body and body.shape[0]:
                    s, h, w = body[int(u[b, 1] * body.shape[0])]
                    sl[b], hh[b], ww[b] = s, h + jitter[b, 0], w + jitter[b, 1]
                else:
                    sl[b] = g - (self._slice_cum[c] - n)
                    hh[b] = _uniform_centre(H, ph, u[b, 2])
                    ww[b] = _uniform_centre(W, pw, u[b, 3])
        return Centres(case, sl, hh, ww, np.arange(batch_size) < n_les)


    def _draw_by_class(self, n_les: int, u: np.ndarray, u_class: np.ndarray, jitter: np.ndarray,
                       case: np.ndarray, sl: np.ndarray, hh: np.ndarray, ww: np.ndarray) -> None:
        """Lesion-centred centres with several classes: class, case holding it, component, voxel,
        each uniform (``u_class`` picks the class; ``u`` columns 0-2 the rest)."""
        for b in range(n_les):
            c = int(self.classes[int(u_class[b] * self.classes.size)])
            cases = self._class_cases[c]
            i = int(cases[int(u[b, 0] * cases.size)])
            comps = self._class_components[(c, i)]
            comp = int(comps[int(u[b, 1] * comps.size)])
            idx = self.sources[i].index
            lo, hi = int(idx.offsets[comp]), int(idx.offsets[comp + 1])
            s, h, w = idx.coords[lo + int(u[b, 2] * (hi - lo))]
            case[b], sl[b], hh[b], ww[b] = i, s, h + jitter[b, 0], w + jitter[b, 1]


def _uniform_centre(size: int, patch: int, u: float) -> int:
    """Centre (index of patch pixel ``patch // 2``) of a window that lies inside ``size`` when it
    can, from a uniform number ``u`` in [0, 1)."""
    if size >= patch:
        return int(u * (size - patch + 1)) + patch // 2
    # Image smaller than the patch: the image lies somewhere inside the patch.
    return int(u * (patch - size + 1)) + size - patch + patch // 2
