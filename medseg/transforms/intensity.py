"""Intensity normalization: CT window, z-score over the body, percentile clipping.

Every function is pure (array in, float32 array out). :func:`normalize` applies the
``Plan.normalization`` dictionary, which is the only record of what was done, so inference
repeats exactly the training-time operation:

- ``{"kind": "ct_window", "low_hu": -1000, "high_hu": 400}``: clip to [low, high] HU, scale to [0, 1].
- ``{"kind": "zscore", "mean": m, "std": s, "clip_low": a, "clip_high": b}``: clip to [a, b],
  then ``(x - m) / s``. A ``None`` mean/std is computed per volume over the body mask (MR: the
  scanner's intensity scale differs between scans, so a dataset-wide mean is meaningless); a
  ``None`` clip bound is the per-volume body percentile ``clip_percentiles`` (default 0.5 / 99.5).
- ``{"kind": "percentile", "low_pct": 0.5, "high_pct": 99.5}``: clip to the volume's body
  percentiles and scale to [0, 1]; fixed ``"low"``/``"high"`` values override the percentiles.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

__all__ = [
    "ct_window",
    "zscore",
    "percentile_clip",
    "body_mask",
    "otsu_threshold",
    "normalize",
    "NORMALIZATION_KINDS",
    "check_normalization",
    "NormalizeIntensityd",
    "CTWindowd",
    "ZScored",
    "PercentileClipd",
]

NORMALIZATION_KINDS = ("ct_window", "zscore", "percentile")

#: HU above which a CT voxel belongs to the body (air is -1000, fat about -100).
CT_BODY_HU = -500.0


def ct_window(array: np.ndarray, low_hu: float, high_hu: float) -> np.ndarray:
    """Clip to ``[low_hu, high_hu]`` and scale linearly to [0, 1].

    Example:
        ``ct_window([-1200, -1000, -300, 400, 900], -1000, 400)`` -> ``[0, 0, 0.5, 1, 1]``.

    Raises:
        ValueError: if ``high_hu <= low_hu``.
    """
    low, high = float(low_hu), float(high_hu)
    if not high > low:
        raise ValueError(f"CT window needs high_hu > low_hu, found low_hu={low}, high_hu={high}")
    x = np.asarray(array, dtype=np.float32)
    return ((np.clip(x, low, high) - low) / (high - low)).astype(np.float32)


def otsu_threshold(array: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (maximal between-class variance) on a ``bins``-bin histogram."""
    x = np.asarray(array, dtype=np.float64).ravel()
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(x, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)[:-1].astype(np.float64)
    w1 = x.size - w0
    s0 = np.cumsum(hist * centres)[:-1]
    m0 = s0 / np.maximum(w0, 1)
    m1 = (float(np.sum(hist * centres)) - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    # Between two well-separated modes every threshold in the gap is optimal: take the middle
    # of that plateau rather than the first bin, so the mask does not hug the darker mode.
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float((edges[1:][best[0]] + edges[1:][best[-1]]) / 2)


def body_mask(array: np.ndarray, modality: str = "MR") -> np.ndarray:
    """Boolean mask of the body (everything but the surrounding air).

    CT: ``HU > -500``. Other modalities: above Otsu's threshold, computed on a subsample for
    speed. If the result is empty (a constant image) every voxel counts as body.
    """
    x = np.asarray(array)
    if str(modality).upper() == "CT":
        mask = x > CT_BODY_HU
    else:
        flat = x.ravel()
        step = max(1, flat.size // 1_000_000)
        mask = x > otsu_threshold(flat[::step])
    if not mask.any():
        mask = np.ones(x.shape, dtype=bool)
    return mask


def _region(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if mask is None:
        return x.ravel()
    values = x[np.asarray(mask, dtype=bool)]
    return values if values.size else x.ravel()


def percentile_clip(
    array: np.ndarray,
    low_pct: float = 0.5,
    high_pct: float = 99.5,
    *,
    mask: np.ndarray | None = None,
    scale: bool = True,
) -> np.ndarray:
    """Clip to the ``low_pct``/``high_pct`` percentiles (of ``array[mask]``), optionally scaled to [0, 1].

    Percentiles use numpy's default (linear) method. A constant region scales to 0.

    Raises:
        ValueError: unless ``0 <= low_pct < high_pct <= 100``.
    """
    if not 0 <= low_pct < high_pct <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, found low={low_pct}, high={high_pct}")
    x = np.asarray(array, dtype=np.float32)
    low, high = np.percentile(_region(x, mask), [low_pct, high_pct])
    return _clip_scale(x, float(low), float(high), scale)


def _clip_scale(x: np.ndarray, low: float, high: float, scale: bool) -> np.ndarray:
    out = np.clip(x, low, high)
    if not scale:
        return out.astype(np.float32)
    if high <= low:
        return np.zeros_like(x, dtype=np.float32)
    return ((out - low) / (high - low)).astype(np.float32)


def zscore(
    array: np.ndarray,
    *,
    mean: float | None = None,
    std: float | None = None,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """``(x - mean) / std``; a missing mean/std is computed over ``array[mask]`` (or all voxels).

    A zero standard deviation (constant region) is replaced by 1 so the result stays finite.
    """
    x = np.asarray(array, dtype=np.float32)
    if mean is None or std is None:
        region = _region(x, mask).astype(np.float64)
        mean = float(region.mean()) if mean is None else mean
        std = float(region.std()) if std is None else std
    std = float(std) if float(std) > 0 else 1.0
    return ((x - np.float32(mean)) / np.float32(std)).astype(np.float32)


def check_normalization(spec: Mapping[str, Any]) -> dict:
    """Validate a ``Plan.normalization`` dictionary and return a copy with defaults filled in.

    Raises:
        ValueError: unknown ``kind``, missing window bounds, or bad percentiles.
    """
    if not isinstance(spec, Mapping) or "kind" not in spec:
        raise ValueError(f"normalization must be a dict with a 'kind' in {NORMALIZATION_KINDS}, found {spec!r}")
    spec = dict(spec)
    kind = spec["kind"]
    if kind == "ct_window":
        if spec.get("low_hu") is None or spec.get("high_hu") is None:
            raise ValueError(f"normalization 'ct_window' needs 'low_hu' and 'high_hu', found {spec!r}")
        if not float(spec["high_hu"]) > float(spec["low_hu"]):
            raise ValueError(f"normalization 'ct_window' needs high_hu > low_hu, found {spec!r}")
    elif kind == "zscore":
        for key in ("mean", "std", "clip_low", "clip_high"):
            spec.setdefault(key, None)
        spec.setdefault("clip_percentiles", [0.5, 99.5])
        spec.setdefault("region", "body")
        lo, hi = spec["clip_percentiles"]
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"normalization 'zscore' clip_percentiles must be 0 <= low < high <= 100, found {spec!r}")
        if spec["region"] not in ("body", "all"):
            raise ValueError(f"normalization 'zscore' region must be 'body' or 'all', found {spec['region']!r}")
    elif kind == "percentile":
        spec.setdefault("low_pct", 0.5)
        spec.setdefault("high_pct", 99.5)
        spec.setdefault("low", None)
        spec.setdefault("high", None)
        if not 0 <= spec["low_pct"] < spec["high_pct"] <= 100:
            raise ValueError(f"normalization 'percentile' needs 0 <= low_pct < high_pct <= 100, found {spec!r}")
    else:
        raise ValueError(f"normalization kind must be one of {NORMALIZATION_KINDS}, found {kind!r}")
    return spec


def normalize(
    array: np.ndarray, spec: Mapping[str, Any], *, modality: str = "MR", body: np.ndarray | None = None
) -> np.ndarray:
    """Apply a ``Plan.normalization`` dictionary to ``array``; returns float32 of the same shape.

    Args:
        array: intensities (HU for CT).
        spec: see the module docstring.
        modality: used to compute the body mask when ``body`` is not given and one is needed.
        body: optional precomputed body mask (same shape).

    Raises:
        ValueError: from :func:`check_normalization`.
    """
    spec = check_normalization(spec)
    kind = spec["kind"]
    if kind == "ct_window":
        return ct_window(array, spec["low_hu"], spec["high_hu"])
    x = np.asarray(array, dtype=np.float32)
    if kind == "percentile":
        if spec["low"] is not None and spec["high"] is not None:
            return _clip_scale(x, float(spec["low"]), float(spec["high"]), True)
        mask = body if body is not None else body_mask(x, modality)
        return percentile_clip(x, spec["low_pct"], spec["high_pct"], mask=mask)
    # zscore
    needs_region = any(spec[k] is None for k in ("mean", "std", "clip_low", "clip_high"))
    mask = None
    if needs_region and spec["region"] == "body":
        mask = body if body is not None else body_mask(x, modality)
    lo, hi = spec["clip_low"], spec["clip_high"]
    if lo is None or hi is None:
        plo, phi = np.percentile(_region(x, mask), spec["clip_percentiles"])
        lo = float(plo) if lo is None else lo
        hi = float(phi) if hi is None else hi
    x = np.clip(x, np.float32(lo), np.float32(hi))
    return zscore(x, mean=spec["mean"], std=spec["std"], mask=mask)


# --- dictionary transforms ---------------------------------------------------------------------
from medseg.transforms.compose import MapTransform  # noqa: E402  (compose imports nothing from here)


class NormalizeIntensityd(MapTransform):
    """Apply a ``Plan.normalization`` dictionary to Volumes (or arrays) under ``keys``.

    Raises:
        ValueError: from :func:`check_normalization`, at construction.
    """

    def __init__(self, keys, normalization: Mapping[str, Any], modality: str = "MR", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.normalization = check_normalization(normalization)
        self.modality = modality

    def __repr__(self) -> str:
        return f"{type(self).__name__}(keys={self.keys}, normalization={self.normalization})"

    def apply(self, value, key):
        if hasattr(value, "with_array"):
            return value.with_array(normalize(value.array, self.normalization, modality=self.modality))
        return normalize(value, self.normalization, modality=self.modality)


class CTWindowd(NormalizeIntensityd):
    """Clip to ``[low_hu, high_hu]`` and scale to [0, 1]."""

    def __init__(self, keys, low_hu: float = -1000.0, high_hu: float = 400.0, allow_missing_keys: bool = False):
        super().__init__(keys, {"kind": "ct_window", "low_hu": low_hu, "high_hu": high_hu}, "CT", allow_missing_keys)


class ZScored(NormalizeIntensityd):
    """Per-volume z-score over the body after clipping to the body's ``clip_percentiles``."""

    def __init__(self, keys, clip_percentiles=(0.5, 99.5), modality: str = "MR", allow_missing_keys: bool = False):
        super().__init__(keys, {"kind": "zscore", "clip_percentiles": list(clip_percentiles)}, modality,
                         allow_missing_keys)


class PercentileClipd(NormalizeIntensityd):
    """Clip to the body's ``low_pct``/``high_pct`` percentiles and scale to [0, 1]."""

    def __init__(self, keys, low_pct: float = 0.5, high_pct: float = 99.5, modality: str = "MR",
                 allow_missing_keys: bool = False):
        super().__init__(keys, {"kind": "percentile", "low_pct": low_pct, "high_pct": high_pct}, modality,
                         allow_missing_keys)
