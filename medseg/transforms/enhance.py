"""Simulated contrast enhancement of CT patches (training augmentation for several classes).

A contrast agent brightens organs and vessels by amounts that depend on the organ and the
phase (the aorta by 100-250 HU in the arterial phase, liver and spleen by 40-110 HU in the
portal venous one) and leaves fat and air alone. A network trained on unenhanced patients
learns the absolute HU of each organ and, on an enhanced patient, labels the brighter organs
background or the wrong organ. Two changes teach it that these intensities move:

- **per class**: with probability ``class_prob`` per patch, each labelled class present in the
  patch (of those named in ``classes``) is shifted by its own offset drawn from
  ``class_shift_hu``; the offset field is blurred by ``sigma_px`` so that no intensity step
  marks the label's edge exactly (a step there would be a shortcut the network could learn);
- **soft tissue**: with probability ``tissue_prob`` per patch, everything above
  ``tissue_ramp_hu[1]`` is brightened by one offset from ``tissue_shift_hu``, ramping from 0 at
  ``tissue_ramp_hu[0]`` (fat) so that fat and air stay where they are.

Patches are CT-window images (values in [0, 1] over ``[low_hu, high_hu]``) and come back
clipped to [0, 1], as the window clips real HU. Masks are class indices ``(B, H, W)``; every
context channel is shifted with the centre slice's classes.

Example:
    >>> enh = Enhancement(EnhancementConfig(), window_hu=(-241, 315), classes=(1, 2, 3, 4))
    >>> params = enh.draw(images.shape[0], rng)
    >>> enh.apply(images, masks, params)               # in place
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["EnhancementConfig", "EnhancementParams", "Enhancement"]


@dataclass(frozen=True)
class EnhancementConfig:
    """Probabilities and HU ranges of the simulated enhancement (see the module docstring).

    ``classes``: names of the classes shifted on their own (None: every named class); a lesion
    whose contrast to its organ is the signal can be left out and then moves only with the soft
    tissue.

    Raises:
        ValueError: a probability outside [0, 1], a range with low > high, a ramp that does not
            rise, a negative blur, or unknown keys (in :meth:`from_dict`).
    """

    class_prob: float = 0.5
    class_shift_hu: tuple[float, float] = (-60.0, 150.0)
    tissue_prob: float = 0.5
    tissue_shift_hu: tuple[float, float] = (0.0, 100.0)
    tissue_ramp_hu: tuple[float, float] = (-100.0, 0.0)
    sigma_px: float = 1.5
    classes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("class_prob", "tissue_prob"):
            v = float(getattr(self, name))
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"EnhancementConfig.{name} must lie in [0, 1], found {getattr(self, name)!r}")
            object.__setattr__(self, name, v)
        for name in ("class_shift_hu", "tissue_shift_hu", "tissue_ramp_hu"):
            pair = getattr(self, name)
            try:
                lo, hi = (float(v) for v in pair)
            except (TypeError, ValueError):
                raise ValueError(f"EnhancementConfig.{name} must be (low, high) in HU, found {pair!r}") from None
            if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi or (name == "tissue_ramp_hu" and lo >= hi):
                raise ValueError(f"EnhancementConfig.{name} must be finite (low, high) with low "
                                 f"{'<' if name == 'tissue_ramp_hu' else '<='} high, found {pair!r}")
            object.__setattr__(self, name, (lo, hi))
        if not float(self.sigma_px) >= 0.0:
            raise ValueError(f"EnhancementConfig.sigma_px must be >= 0, found {self.sigma_px!r}")
        object.__setattr__(self, "sigma_px", float(self.sigma_px))
        if self.classes is not None:
            if isinstance(self.classes, str):
                raise ValueError(f"EnhancementConfig.classes must be a list of class names, found {self.classes!r}")
            object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))

    def to_dict(self) -> dict:
        """JSON-ready (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EnhancementConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown enhancement settings {unknown}; known: {sorted(names)}")
        return cls(**dict(data))


@dataclass(frozen=True, eq=False)
class EnhancementParams:
    """One batch's draws: ``tissue_hu`` ``(B,)`` and ``class_hu`` ``(B, num_classes)`` (column 0,
    the background, and classes not shifted stay 0)."""

    tissue_hu: np.ndarray
    class_hu: np.ndarray

    def as_dict(self) -> dict[str, list]:
        return {"tissue_hu": self.tissue_hu.round(2).tolist(), "class_hu": self.class_hu.round(2).tolist()}


class Enhancement:
    """Draws and applies :class:`EnhancementConfig` to CT-window patches.

    Args:
        config: the settings.
        window_hu: ``(low_hu, high_hu)`` of the CT window the patches were normalized with.
        classes: class indices (1..K) shifted on their own.
        num_classes: outputs including the background (default ``max(classes) + 1``).

    Raises:
        ValueError: a window that does not rise, or a class index < 1.
    """

    def __init__(self, config: EnhancementConfig, window_hu: Sequence[float], classes: Sequence[int],
                 num_classes: int | None = None):
        low, high = (float(v) for v in window_hu)
        if not high > low:
            raise ValueError(f"the CT window must rise, found {window_hu!r}")
        self.classes = tuple(int(c) for c in classes)
        if any(c < 1 for c in self.classes):
            raise ValueError(f"shifted classes are indices >= 1 (0 is the background), found {self.classes}")
        self.config = config
        self.window_hu = (low, high)
        self.low_hu, self.span_hu = low, high - low
        self.num_classes = int(num_classes) if num_classes is not None else max(self.classes, default=0) + 1

    def draw(self, batch: int, rng: np.random.Generator) -> EnhancementParams:
        """Offsets for ``batch`` patches (0 where a patch is left alone)."""
        c = self.config
        tissue = np.where(rng.random(batch) < c.tissue_prob, rng.uniform(*c.tissue_shift_hu, size=batch), 0.0)
        shifted = rng.random(batch) < c.class_prob
        offsets = rng.uniform(*c.class_shift_hu, size=(batch, self.num_classes))
        class_hu = np.zeros((batch, self.num_classes))
        if self.classes:
            cols = np.asarray(self.classes)
            class_hu[:, cols] = np.where(shifted[:, None], offsets[:, cols], 0.0)
        return EnhancementParams(tissue, class_hu)

    def apply(self, images: np.ndarray, masks: np.ndarray, params: EnhancementParams) -> np.ndarray:
        """Shift ``images`` ``(B, H, W, C)`` float32 in place by ``params``; ``masks`` ``(B, H, W)``
        class indices. Returns ``images``."""
        c = self.config
        lo = (c.tissue_ramp_hu[0] - self.low_hu) / self.span_hu
        width = (c.tissue_ramp_hu[1] - c.tissue_ramp_hu[0]) / self.span_hu
        for b in range(images.shape[0]):
            brighten_tissue(images[b], params.tissue_hu[b] / self.span_hu, lo, width)
            table = (params.class_hu[b] / self.span_hu).astype(np.float32)
            add_class_field(images[b], masks[b], table, c.sigma_px)
        return images


def brighten_tissue(x: np.ndarray, shift: float, lo: float, width: float) -> None:
    """``x`` ``(H, W, C)`` in window units, in place: ``+ shift`` above fat, ramping from 0 at ``lo``
    to ``shift`` at ``lo + width`` (window units), so that fat and air stay where they are."""
    if shift:
        x += shift * np.clip((x - lo) / width, 0.0, 1.0)


def add_class_field(x: np.ndarray, mask: np.ndarray, table: np.ndarray, sigma_px: float) -> None:
    """``x`` ``(H, W, C)`` in place: ``+ table[class]`` per pixel of ``mask`` ``(H, W)`` (classes past
    the table's end count as its last), blurred by ``sigma_px`` so no step marks a label's edge,
    then clipped to [0, 1] as the CT window clips real HU."""
    from scipy.ndimage import gaussian_filter

    if table.any():
        field = table[np.minimum(mask, table.size - 1)]
        if sigma_px > 0:
            field = gaussian_filter(field, sigma_px, mode="nearest")
        x += field[..., None]
    np.clip(x, 0.0, 1.0, out=x)
