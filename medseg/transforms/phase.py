"""Simulated contrast phases of CT patches: a training step for one class as for several.

The same patient looks different in each contrast phase (``docs/train.md`` has the table and its
sources): the aorta is about 40 HU without contrast, 250-550 HU in an arterial (angiography)
scan, 140-220 HU in a portal-venous one and 100-160 HU in a delayed one; the liver goes from about
55 to 110 HU; fat, air and bone stay where they are. A network trained on the phase its scans
came in learns those absolute intensities and misses the structure in another phase.

:class:`ContrastPhase` moves each labelled structure to the intensity it has in a phase drawn
per patch (with probability ``prob``): the structure's median HU in the patch is set to a target
drawn from its phase range (:data:`PHASE_HU`, by the class's name; a name the table does not
know, such as the binary ``lesion`` class, gets the ``enhancing`` row, which spans vessels and
parenchyma), whatever phase the training scan itself was in, so a model trained on non-contrast
scans sees enhanced structures and the reverse. The body's soft tissue (everything above fat,
ramping from ``tissue_ramp_hu[0]``) is shifted by one offset from ``tissue_shift_hu`` per patch;
the per-class offset field is blurred by ``sigma_px`` so that no intensity step marks the label's
edge exactly (a shortcut the network could learn). Patches are CT-window images (values in [0, 1]
over ``window_hu``) and come back clipped to [0, 1], as the window clips real HU.

Example:
    >>> cfg = PhaseConfig.for_classes(["aorta"])            # targets of the aorta by phase
    >>> phase = ContrastPhase(cfg, window_hu=(-1000, 650), num_classes=2)
    >>> params = phase.draw(images.shape[0], rng)
    >>> phase.apply(images, masks, params)                   # in place
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from medseg.transforms.base import Randomizable
from medseg.transforms.batch import PatchBatch
from medseg.transforms.enhance import add_class_field, brighten_tissue
from medseg.transforms.registry import register_transform

__all__ = ["PHASES", "PHASE_HU", "PHASE_WINDOW_MARGIN_HU", "UNNAMED_REAL_TOP_HU", "PhaseConfig", "ContrastPhase",
           "RandContrastPhased", "phase_row", "window_top_hu"]

#: The phases a scan may come in, in the order of the table's columns.
PHASES = ("native", "arterial", "portal_venous", "delayed")

#: Mean HU of each structure by phase, ``(low, high)``: the ranges targets are drawn from.
#: Sources and reasoning in docs/train.md ("Contrast phases"); the row is found by the class's
#: name (:func:`phase_row`). ``enhancing``: any structure of unknown kind (the binary ``lesion``
#: class): enhancing soft tissue (parenchyma, lesions, portal-venous vessels) from native to a
#: strongly enhanced 250 HU. Not the vessels' 250-550 HU arterial range: moving an unnamed liver
#: or tumour to 550 HU in an eighth of the patches taught the look of bone and vessels as the class
#: (docs/train.md, measured); a vessel gets its range by its name (``--labels-map aorta=52``).
PHASE_HU: dict[str, dict[str, tuple[float, float]]] = {
    "aorta": {"native": (30, 55), "arterial": (250, 550), "portal_venous": (140, 220), "delayed": (100, 160)},
    "artery": {"native": (30, 55), "arterial": (200, 500), "portal_venous": (130, 200), "delayed": (90, 150)},
    "vein": {"native": (30, 55), "arterial": (50, 120), "portal_venous": (140, 220), "delayed": (100, 160)},
    "liver": {"native": (40, 65), "arterial": (55, 85), "portal_venous": (90, 130), "delayed": (75, 100)},
    "spleen": {"native": (35, 55), "arterial": (80, 150), "portal_venous": (100, 135), "delayed": (85, 110)},
    "kidney": {"native": (25, 45), "arterial": (130, 220), "portal_venous": (140, 220), "delayed": (100, 160)},
    "pancreas": {"native": (35, 50), "arterial": (100, 150), "portal_venous": (80, 115), "delayed": (60, 85)},
    "enhancing": {"native": (20, 65), "arterial": (60, 250), "portal_venous": (80, 200), "delayed": (60, 160)},
}

#: HU an unnamed structure may really reach (an arterial vessel under ``--map-labels``): the window
#: keeps it (:func:`window_top_hu`) although its simulated targets stop at the ``enhancing`` row's.
UNNAMED_REAL_TOP_HU = 550.0

#: Name fragments -> table row (first match wins; names are lower-cased, ``-`` and spaces as ``_``).
_ROWS = (("aort", "aorta"), ("vena_cava", "vein"), ("ivc", "vein"), ("portal", "vein"), ("vein", "vein"),
         ("iliac_vena", "vein"), ("arter", "artery"), ("iliac", "artery"), ("liver", "liver"), ("hepat", "liver"),
         ("spleen", "spleen"), ("splen", "spleen"), ("kidney", "kidney"), ("renal", "kidney"),
         ("pancrea", "pancreas"))

#: HU kept above the highest phase target when the plan's CT window is chosen: a structure at its
#: brightest simulated value stays below the window's top, so it never looks like clipped bone.
PHASE_WINDOW_MARGIN_HU = 100.0


def phase_row(name: str) -> str:
    """The :data:`PHASE_HU` row of a class name (``"aorta"`` -> ``"aorta"``, ``"kidney_left"`` ->
    ``"kidney"``, ``"lesion"`` or an unknown name -> ``"enhancing"``)."""
    key = str(name).lower().replace("-", "_").replace(" ", "_")
    return next((row for fragment, row in _ROWS if fragment in key), "enhancing")


def window_top_hu(targets: Mapping[str, Any]) -> float:
    """The HU a CT window must keep for classes with these phase targets (name -> ranges): the
    highest target, or :data:`UNNAMED_REAL_TOP_HU` where a class has no row of its own (an unnamed
    structure may be an arterial vessel in a real scan), plus :data:`PHASE_WINDOW_MARGIN_HU`."""
    tops = [hi for phases in targets.values() for _, hi in phases.values()]
    if any(phase_row(name) == "enhancing" for name in targets):
        tops.append(UNNAMED_REAL_TOP_HU)
    return max(tops, default=0.0) + PHASE_WINDOW_MARGIN_HU


def _pair(name: str, value: Any) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"PhaseConfig.{name} must be (low, high) in HU, found {value!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
        raise ValueError(f"PhaseConfig.{name} must be finite (low, high) with low <= high, found {value!r}")
    return lo, hi


@dataclass(frozen=True)
class PhaseConfig:
    """Settings of the simulated phases (see the module docstring).

    ``targets``: class name -> ``{phase: (low_hu, high_hu)}`` for each class moved on its own (in
    class order; every phase of :data:`PHASES` given). ``prob``: share of patches given a phase.

    Raises:
        ValueError: a probability outside [0, 1], a range with low > high, a ramp that does not
            rise, a negative blur, a phase missing from a target, or unknown keys (in :meth:`from_dict`).
    """

    targets: Mapping[str, Mapping[str, tuple[float, float]]]
    prob: float = 0.5
    tissue_shift_hu: tuple[float, float] = (-20.0, 40.0)
    tissue_ramp_hu: tuple[float, float] = (-100.0, 0.0)
    sigma_px: float = 1.5
    min_pixels: int = 4

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.prob) <= 1.0:
            raise ValueError(f"PhaseConfig.prob must lie in [0, 1], found {self.prob!r}")
        object.__setattr__(self, "prob", float(self.prob))
        for name in ("tissue_shift_hu", "tissue_ramp_hu"):
            object.__setattr__(self, name, _pair(name, getattr(self, name)))
        if not self.tissue_ramp_hu[0] < self.tissue_ramp_hu[1]:
            raise ValueError(f"PhaseConfig.tissue_ramp_hu must rise, found {self.tissue_ramp_hu!r}")
        if not float(self.sigma_px) >= 0.0:
            raise ValueError(f"PhaseConfig.sigma_px must be >= 0, found {self.sigma_px!r}")
        object.__setattr__(self, "sigma_px", float(self.sigma_px))
        if int(self.min_pixels) != self.min_pixels or self.min_pixels < 1:
            raise ValueError(f"PhaseConfig.min_pixels must be a positive integer, found {self.min_pixels!r}")
        object.__setattr__(self, "min_pixels", int(self.min_pixels))
        if not isinstance(self.targets, Mapping):
            raise ValueError(f"PhaseConfig.targets must map class names to phase ranges, found {self.targets!r}")
        targets = {}
        for cls, phases in self.targets.items():
            if not isinstance(phases, Mapping) or sorted(phases) != sorted(PHASES):
                raise ValueError(f"PhaseConfig.targets[{cls!r}] must give a (low, high) HU range for each of "
                                 f"{list(PHASES)}, found {phases!r}")
            targets[str(cls)] = {p: _pair(f"targets[{cls!r}][{p!r}]", phases[p]) for p in PHASES}
        object.__setattr__(self, "targets", targets)

    @classmethod
    def for_classes(cls, names: Sequence[str], **settings: Any) -> "PhaseConfig":
        """The default settings with each named class's :data:`PHASE_HU` row as its targets."""
        return cls(targets={str(n): dict(PHASE_HU[phase_row(n)]) for n in names}, **settings)

    @property
    def top_hu(self) -> float:
        """The highest target of any class in any phase (the plan's window keeps it unclipped)."""
        return max((hi for phases in self.targets.values() for _, hi in phases.values()), default=0.0)

    def to_dict(self) -> dict:
        """JSON-ready (tuples become lists)."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        d["targets"] = {c: {p: list(r) for p, r in phases.items()} for c, phases in self.targets.items()}
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PhaseConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown contrast-phase settings {unknown}; known: {sorted(names)}")
        if "targets" not in data:
            raise ValueError("contrast-phase settings need 'targets' (class name -> phase ranges)")
        return cls(**dict(data))


@dataclass(frozen=True, eq=False)
class PhaseParams:
    """One batch's draws: ``phase`` ``(B,)`` index into :data:`PHASES` or -1 (patch left alone),
    ``tissue_hu`` ``(B,)``, ``target_hu`` ``(B, num_classes)`` (column 0, the background, unused)."""

    phase: np.ndarray
    tissue_hu: np.ndarray
    target_hu: np.ndarray

    def as_dict(self) -> dict[str, list]:
        return {"phase": [PHASES[p] if p >= 0 else None for p in self.phase.tolist()],
                "tissue_hu": self.tissue_hu.round(2).tolist(), "target_hu": self.target_hu.round(2).tolist()}


class ContrastPhase:
    """Draws and applies :class:`PhaseConfig` to CT-window patches.

    Args:
        config: the settings; its ``targets`` are the classes 1..K in order.
        window_hu: ``(low_hu, high_hu)`` of the CT window the patches were normalized with.
        num_classes: outputs including the background (default ``len(targets) + 1``).

    Raises:
        ValueError: a window that does not rise, or more targets than foreground classes.
    """

    def __init__(self, config: PhaseConfig, window_hu: Sequence[float], num_classes: int | None = None):
        low, high = (float(v) for v in window_hu)
        if not high > low:
            raise ValueError(f"the CT window must rise, found {window_hu!r}")
        self.config = config
        self.window_hu = (low, high)
        self.low_hu, self.span_hu = low, high - low
        n_targets = len(config.targets)
        self.num_classes = int(num_classes) if num_classes is not None else n_targets + 1
        if n_targets > self.num_classes - 1:
            raise ValueError(f"{n_targets} classes with phase targets but {self.num_classes - 1} foreground classes")
        # (num_classes, phases, 2): the target range of class k in phase p; the background unused.
        self.ranges = np.zeros((self.num_classes, len(PHASES), 2))
        for k, phases in enumerate(config.targets.values(), start=1):
            self.ranges[k] = [phases[p] for p in PHASES]
        self.moved = np.arange(self.num_classes) <= n_targets
        self.moved[0] = False

    def draw(self, batch: int, rng: np.random.Generator) -> PhaseParams:
        """A phase (or none), a tissue offset and a target HU per class, for ``batch`` patches."""
        c = self.config
        on = rng.random(batch) < c.prob
        phase = np.where(on, rng.integers(0, len(PHASES), size=batch), -1)
        tissue = np.where(on, rng.uniform(*c.tissue_shift_hu, size=batch), 0.0)
        u = rng.random((batch, self.num_classes))
        r = self.ranges[:, np.maximum(phase, 0)].transpose(1, 0, 2)  # (B, K, 2)
        target = np.where(on[:, None] & self.moved[None], r[..., 0] + u * (r[..., 1] - r[..., 0]), 0.0)
        return PhaseParams(phase, tissue, target)

    def apply(self, images: np.ndarray, masks: np.ndarray, params: PhaseParams) -> np.ndarray:
        """Shift ``images`` ``(B, H, W, C)`` float32 in place by ``params``; ``masks`` ``(B, H, W)``
        class indices of the centre slice. Returns ``images``."""
        c = self.config
        lo = (c.tissue_ramp_hu[0] - self.low_hu) / self.span_hu
        width = (c.tissue_ramp_hu[1] - c.tissue_ramp_hu[0]) / self.span_hu
        centre = images.shape[-1] // 2
        for b in range(images.shape[0]):
            if params.phase[b] < 0:
                continue
            x = images[b]
            brighten_tissue(x, params.tissue_hu[b] / self.span_hu, lo, width)
            table = np.zeros(self.num_classes, np.float32)
            for k in np.flatnonzero(self.moved):
                inside = masks[b] == k
                if np.count_nonzero(inside) < c.min_pixels:
                    continue
                now_hu = float(np.median(x[..., centre][inside])) * self.span_hu + self.low_hu
                table[k] = (params.target_hu[b, k] - now_hu) / self.span_hu
            add_class_field(x, masks[b], table, c.sigma_px)
        return images


@register_transform
class RandContrastPhased(Randomizable):
    """Simulated contrast phases of CT-window patches (:class:`ContrastPhase`) of ``sample[keys[0]]``
    (images ``(B, H, W, C)`` in [0, 1]) by the class indices of ``sample[keys[1]]`` (``(B, H, W)``).

    On a batch whose patches are not cut yet it runs as soon as they are; on ready patches at
    once. A plain dict is not modified (its images are copied).

    Args:
        window_hu: ``(low_hu, high_hu)`` of the pipeline's CT window.
        num_classes: outputs including the background.
        config: a :class:`PhaseConfig` or a dict of its fields.

    Raises:
        KeyError: if the sample lacks a key.
        ValueError: bad settings, or patches not shaped ``(B, H, W, C)`` / ``(B, H, W)``.
    """

    def __init__(self, keys: Sequence[str] = ("image", "label"), *, window_hu: Sequence[float], num_classes: int,
                 config: PhaseConfig | Mapping, seed: int | None = None):
        self.keys = tuple(keys)
        if isinstance(config, Mapping):
            config = PhaseConfig.from_dict(config)
        self.phase = ContrastPhase(config, window_hu, num_classes)
        self.rng = np.random.default_rng(seed)
        self.last_params: dict | None = None

    def __repr__(self) -> str:
        return f"RandContrastPhased(keys={self.keys}, classes={list(self.phase.config.targets)})"

    def get_config(self) -> dict:
        p = self.phase
        return {"keys": list(self.keys), "window_hu": list(p.window_hu), "num_classes": p.num_classes,
                "config": p.config.to_dict()}

    def _apply(self, batch: PatchBatch) -> None:
        images, masks = batch[self.keys[0]], np.asarray(batch[self.keys[1]])
        if images.ndim != 4 or masks.shape != images.shape[:3]:
            raise ValueError(f"{self!r}: images (B, H, W, C) and masks (B, H, W) expected, found "
                             f"{images.shape} and {masks.shape}")
        params = self.phase.draw(images.shape[0], self.rng)
        batch[self.keys[0]] = self.phase.apply(images, masks, params)
        self.last_params = batch.params["contrast_phase"] = params.as_dict()

    def __call__(self, sample: Mapping) -> PatchBatch:
        missing = [k for k in self.keys if k not in sample]
        if missing:
            raise KeyError(f"{self!r}: the sample has no {missing} (keys: {sorted(sample)})")
        batch = PatchBatch.of(sample, self.rng, copy_arrays=True)
        if not batch.pending:
            batch[self.keys[0]] = np.asarray(batch[self.keys[0]], dtype=np.float32)
        batch.at_cut(self._apply)
        return batch
