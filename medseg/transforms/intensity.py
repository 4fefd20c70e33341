"""Intensity normalization: CT window, z-score over the body, percentile clipping.

Every public function but :func:`normalize_inplace` (which overwrites a float32 array the caller
owns, for whole-volume preprocessing) is pure (array in, float32 array out). :func:`normalize` applies the
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

from medseg.transforms.modality import KNOWN_MODALITIES, guess_modality, has_background  # noqa: F401 (re-exported)

__all__ = [
    "ct_window",
    "zscore",
    "percentile_clip",
    "body_mask",
    "otsu_threshold",
    "normalize",
    "normalize_inplace",
    "needs_body",
    "NORMALIZATION_KINDS",
    "check_normalization",
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
    return _ct_window_(np.array(array, dtype=np.float32), low, high)


def _ct_window_(x: np.ndarray, low: float, high: float) -> np.ndarray:
    # In place on a float32 array the caller owns; the same float32 operations as
    # ``(clip(x, low, high) - low) / (high - low)``, so the result is bit-identical.
    np.clip(x, low, high, out=x)
    np.subtract(x, low, out=x)
    np.divide(x, high - low, out=x)
    return x


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


def body_mask(array: np.ndarray, modality: str = "MR", background: str = "otsu") -> np.ndarray:
    """Boolean mask of the body (everything but the surrounding air).

    CT: ``HU > -500``. Other modalities: above Otsu's threshold, computed on a subsample for
    speed; with ``background="detect"`` (what new plans record, :data:`BODY_BACKGROUNDS`) only
    when the image has a background (:func:`~medseg.transforms.modality.has_background`): an image cropped inside the body
    (no air around it) is then all body, where Otsu would split its tissues in two and the
    normalization statistics would depend on the field of view. ``"otsu"`` (plans written before)
    always thresholds. If the result is empty (a constant image) every voxel counts as body.
    """
    x = np.asarray(array)
    mask = x > _body_threshold(x, modality, background)
    if not mask.any():
        mask = np.ones(x.shape, dtype=bool)
    return mask


#: How the body of a non-CT image is found: ``"otsu"`` (always Otsu's threshold, plans before
#: issue 23) or ``"detect"`` (Otsu's only when the image has air around the body).
BODY_BACKGROUNDS = ("otsu", "detect")


def _body_threshold(x: np.ndarray, modality: str, background: str = "otsu") -> float:
    """:func:`body_mask` is ``x > _body_threshold(x, modality, background)`` (all voxels where that is empty)."""
    if str(modality).upper() == "CT":
        return CT_BODY_HU
    flat = x.ravel()
    step = max(1, flat.size // 1_000_000)
    sample = flat[::step]
    threshold = otsu_threshold(sample)
    return threshold if background == "otsu" or has_background(sample, threshold) else -np.inf


def _region(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if mask is None:
        return x.ravel()
    values = x[np.asarray(mask, dtype=bool)]
    return values if values.size else x.ravel()


#: Voxels read at a time when the region's values are streamed (16 MB of float32).
_CHUNK_VOXELS = 1 << 22


def _region_chunks(x: np.ndarray, body: np.ndarray | None, threshold: float | None):
    """The values of ``_region(x, mask)`` chunk by chunk, in the same (C) order, without copying them all.

    The mask is ``body``, else ``x > threshold`` (evaluated when the chunks are read), else all
    voxels; an empty mask means all voxels, as in :func:`body_mask` and :func:`_region`.
    ``x`` must be C-contiguous.

    Returns:
        ``(make_chunks, n)``: ``make_chunks()`` returns a new iterator over 1D float32 chunks
        (views of ``x`` for all voxels, copies otherwise), ``n`` the number of values.
    """
    flat = x.reshape(-1)
    starts = range(0, flat.size, _CHUNK_VOXELS)
    select = None
    if body is not None:
        mask = np.asarray(body, dtype=bool)
        if mask.shape != x.shape:  # whatever numpy makes of it (an IndexError, mostly)
            region = _region(x, mask)
            return (lambda: iter((region,))), int(region.size)
        mask = mask.reshape(-1)

        def select(i: int, chunk: np.ndarray) -> np.ndarray:
            return mask[i : i + _CHUNK_VOXELS]
    elif threshold is not None:
        def select(i: int, chunk: np.ndarray) -> np.ndarray:
            return chunk > threshold
    if select is not None:
        n = sum(int(np.count_nonzero(select(i, flat[i : i + _CHUNK_VOXELS]))) for i in starts)
        if n:
            def selected():
                for i in starts:
                    chunk = flat[i : i + _CHUNK_VOXELS]
                    yield chunk[select(i, chunk)]
            return selected, n
    return (lambda: (flat[i : i + _CHUNK_VOXELS] for i in starts)), int(flat.size)


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
    low, high = _percentiles(_region(x, mask), x, (low_pct, high_pct))
    return _clip_scale_(np.array(x, dtype=np.float32), low, high, scale)


def _percentiles(region: np.ndarray, x: np.ndarray, pcts) -> tuple[float, float]:
    """``np.percentile(region, pcts)`` (linear) where ``region`` holds values of ``x``.

    A region that is a fresh copy (``x[mask]``) is partitioned in place rather than copied again;
    the result only depends on the values, so it is the same as without overwriting. A view of
    ``x`` is copied by numpy as usual (``x`` is never reordered).
    """
    owned = not np.may_share_memory(region, x)
    low, high = np.percentile(region, list(pcts), overwrite_input=owned)
    return float(low), float(high)


def _clip_scale_(x: np.ndarray, low: float, high: float, scale: bool) -> np.ndarray:
    # In place on a float32 array the caller owns (same float32 operations as out-of-place).
    np.clip(x, low, high, out=x)
    if not scale:
        return x
    if high <= low:
        x[...] = 0.0
        return x
    np.subtract(x, low, out=x)
    np.divide(x, high - low, out=x)
    return x


def _mean_std(region: np.ndarray) -> tuple[float, float]:
    """:func:`_mean_std_chunks` of all values of the float32 array ``region``."""
    return _mean_std_chunks(lambda: iter((region.reshape(-1),)), int(region.size))


def _mean_std_chunks(make_chunks, n: int) -> tuple[float, float]:
    """float64 mean and standard deviation (``ddof=0``) of the ``n`` float32 values that
    ``make_chunks()`` yields (read twice); NaN, NaN if ``n == 0``.

    numpy's float64 sums of blocks of at most ``_CHUNK_VOXELS`` values: ``np.add.reduce(...,
    dtype=float64)`` casts in small buffers, and the squared deviations take one block's float64
    temporary, where ``np.std`` would subtract the mean into a float64 copy of all values (twice
    their float32 size). Equal to ``values.astype(float64).mean()`` / ``.std()`` up to float64
    rounding (another summation order), far below float32 precision.
    """
    if n == 0:  # an empty volume: numpy's mean/std of nothing, without its warning
        return float("nan"), float("nan")

    def blocks():
        for chunk in make_chunks():
            for i in range(0, chunk.size, _CHUNK_VOXELS):
                yield chunk[i : i + _CHUNK_VOXELS]

    mean = sum(float(np.add.reduce(block, dtype=np.float64)) for block in blocks()) / n
    squares = 0.0
    for block in blocks():
        d = np.subtract(block, mean, dtype=np.float64)
        squares += float(np.add.reduce(np.square(d, out=d)))
    return mean, float(np.sqrt(squares / n))


def _sort_keys(values: np.ndarray) -> np.ndarray:
    """uint32 keys in the order of the float32 ``values`` (NaN excluded)."""
    u = values.view(np.uint32)
    return np.where(u >> 31, ~u, u | np.uint32(0x80000000))


def _from_sort_key(key: int) -> np.float32:
    u = key & 0x7FFFFFFF if key >> 31 else ~key & 0xFFFFFFFF
    return np.array(u, dtype=np.uint32).view(np.float32)[()]


def _order_statistics(make_chunks, ranks) -> dict[int, np.float32]:
    """The values of 0-based ``ranks`` in the ascending order of the values ``make_chunks()`` yields.

    Exact, in two passes over the chunks (a radix select on the float32 bit patterns: a histogram
    of the top 16 bits, then of the low 16 bits inside the buckets holding the ranks), with
    memory of one chunk: no copy of all values. NaN must not occur.
    """
    top = np.zeros(1 << 16, dtype=np.int64)
    for chunk in make_chunks():
        top += np.bincount(_sort_keys(chunk) >> 16, minlength=1 << 16)
    below = np.cumsum(top)
    bucket = {r: int(np.searchsorted(below, r, side="right")) for r in ranks}
    low = {b: np.zeros(1 << 16, dtype=np.int64) for b in set(bucket.values())}
    for chunk in make_chunks():
        keys = _sort_keys(chunk)
        high = keys >> 16
        for b, hist in low.items():
            hist += np.bincount(keys[high == b] & 0xFFFF, minlength=1 << 16)
    out = {}
    for r, b in bucket.items():
        inside = r - (int(below[b - 1]) if b else 0)
        k = int(np.searchsorted(np.cumsum(low[b]), inside, side="right"))
        out[r] = _from_sort_key((b << 16) | k)
    return out


def _percentiles_chunks(make_chunks, n: int, pcts) -> tuple[float, float]:
    """``np.percentile(values, pcts)`` (linear) of the ``n`` float32 values ``make_chunks()`` yields.

    Bit-identical to numpy without its copy of the values: numpy's result is its linear
    interpolation between the values of ranks ``floor(v)`` and ``floor(v) + 1`` (``v = (n - 1) q``,
    the maximum where ``v >= n - 1``) with weight ``v - floor(v)``; these values are found by
    :func:`_order_statistics` and numpy's own ``quantile`` interpolates between them (on the two
    values with ``q`` = the weight, the same operations). NaN values fall back to numpy's percentile.

    Why not ``np.percentile``: it needs all values in one array, i.e. a float32 copy of the body
    next to the volume. ``benchmarks/infer.py`` runs both in the same run (MR z-score, 512 x 512,
    peak RSS growth from 100 to 400 slices): 491.8 MB with this selection, 604.0 MB with
    ``np.percentile`` on a body copy (+112 MB, the peak at 400 slices 1378 vs 1492 MB).
    """
    if any(np.isnan(chunk).any() for chunk in make_chunks()):
        return _percentiles(np.concatenate(list(make_chunks())), np.empty(0), pcts)
    virtual = (n - 1) * np.true_divide(list(pcts), 100)  # as np.percentile computes it
    previous = np.floor(virtual)
    ranks = set()
    for v, p in zip(virtual, previous):
        ranks.update((n - 1,) if v >= n - 1 else (int(p), int(p) + 1))
    value = _order_statistics(make_chunks, sorted(ranks))
    out = []
    for v, p in zip(virtual, previous):
        if v >= n - 1:
            pair, weight = (value[n - 1], value[n - 1]), 1.0
        else:
            pair, weight = (value[int(p)], value[int(p) + 1]), v - p
        out.append(float(np.quantile(np.array(pair, dtype=np.float32), np.array([weight]))[0]))
    return out[0], out[1]


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
        mean, std = _fill_stats(mean, std, _region(x, mask))
    std = float(std) if float(std) > 0 else 1.0
    out = np.subtract(x, np.float32(mean))  # a new float32 array: the input is left alone
    np.divide(out, np.float32(std), out=out)
    return out


def _fill_stats(mean: float | None, std: float | None, region: np.ndarray, make_chunks=None,
                n: int = 0) -> tuple[float, float]:
    """``mean``/``std``, the missing ones taken from ``region`` (or the values ``make_chunks()`` yields)."""
    if make_chunks is None:
        region_mean, region_std = _mean_std(region)
    else:
        region_mean, region_std = _mean_std_chunks(make_chunks, n)
    return (region_mean if mean is None else mean), (region_std if std is None else std)


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
        _check_background(spec)
    elif kind == "percentile":
        spec.setdefault("low_pct", 0.5)
        spec.setdefault("high_pct", 99.5)
        spec.setdefault("low", None)
        spec.setdefault("high", None)
        if not 0 <= spec["low_pct"] < spec["high_pct"] <= 100:
            raise ValueError(f"normalization 'percentile' needs 0 <= low_pct < high_pct <= 100, found {spec!r}")
        _check_background(spec)
    else:
        raise ValueError(f"normalization kind must be one of {NORMALIZATION_KINDS}, found {kind!r}")
    return spec


def _check_background(spec: dict) -> None:
    """``spec["background"]``: how the body is found (:data:`BODY_BACKGROUNDS`); absent, "otsu"
    (a plan written before it existed normalizes exactly as it did), and left absent then."""
    if spec.get("background", "otsu") not in BODY_BACKGROUNDS:
        raise ValueError(f"normalization background must be one of {BODY_BACKGROUNDS}, found {spec['background']!r}")


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
    return normalize_inplace(np.array(array, dtype=np.float32, order="C"), spec, modality=modality, body=body)


def needs_body(spec: Mapping[str, Any]) -> bool:
    """True when :func:`normalize` with ``spec`` uses the body mask (per-volume body statistics).

    Raises:
        ValueError: from :func:`check_normalization`.
    """
    spec = check_normalization(spec)
    if spec["kind"] == "percentile":
        return spec["low"] is None or spec["high"] is None
    if spec["kind"] == "zscore":
        return spec["region"] == "body" and any(spec[k] is None for k in ("mean", "std", "clip_low", "clip_high"))
    return False


def normalize_inplace(
    x: np.ndarray, spec: Mapping[str, Any], *, modality: str = "MR", body: np.ndarray | None = None
) -> np.ndarray:
    """:func:`normalize` overwriting ``x``, a C-contiguous float32 array the caller owns; returns ``x``.

    The same values as :func:`normalize`, with no temporary of the volume's order of size: the
    body (or all) voxels are read chunk by chunk (``_CHUNK_VOXELS``) for the percentiles (an exact
    selection, :func:`_percentiles_chunks`, not numpy's partitioned copy) and for the float64
    mean/std (numpy's float64 sums per chunk, not a float64 copy), and without ``body`` no boolean
    mask of ``x``'s size is made. Whole-volume preprocessing thus peaks at about one float32
    volume plus one chunk.

    Raises:
        TypeError: if ``x`` is not a writable C-contiguous float32 ndarray.
        ValueError: from :func:`check_normalization`.
    """
    if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.writeable and x.flags.c_contiguous):
        found = (type(x).__name__ if not isinstance(x, np.ndarray) else
                 f"{x.dtype} array (writeable={x.flags.writeable}, C-contiguous={x.flags.c_contiguous})")
        raise TypeError(f"normalize_inplace needs a writable C-contiguous float32 ndarray, found {found}")
    spec = check_normalization(spec)
    kind = spec["kind"]
    if kind == "ct_window":
        return _ct_window_(x, float(spec["low_hu"]), float(spec["high_hu"]))
    if kind == "percentile" and spec["low"] is not None and spec["high"] is not None:
        return _clip_scale_(x, float(spec["low"]), float(spec["high"]), True)
    if not needs_body(spec):  # z-score over all voxels, or with every value fixed
        make_chunks, n = _region_chunks(x, None, None)
    else:
        # The body of the voxels as given: the threshold is taken before x is overwritten, and
        # the chunks are read below before x is.
        make_chunks, n = _region_chunks(x, body, None if body is not None else _body_threshold(
            x, modality, spec.get("background", "otsu")))

    def percentiles(pcts) -> tuple[float, float]:
        if n == 0:  # numpy's error for an empty volume
            return _percentiles(x.ravel(), x, pcts)
        return _percentiles_chunks(make_chunks, n, pcts)

    if kind == "percentile":
        low, high = percentiles((spec["low_pct"], spec["high_pct"]))
        return _clip_scale_(x, low, high, True)
    # zscore: clip to the region's percentiles, then (x - mean) / std over the clipped region.
    lo, hi = spec["clip_low"], spec["clip_high"]
    if lo is None or hi is None:
        plo, phi = percentiles(spec["clip_percentiles"])
        lo = plo if lo is None else lo
        hi = phi if hi is None else hi
    lo32, hi32 = np.float32(lo), np.float32(hi)
    mean, std = spec["mean"], spec["std"]
    if (mean is None or std is None) and needs_body(spec):
        # The body is picked from the unclipped voxels (clipping could lift air above the body
        # threshold), then clipped chunk by chunk: the values and order of clip(x)[body].
        def clipped():
            return (np.clip(chunk, lo32, hi32) for chunk in make_chunks())

        mean, std = _fill_stats(mean, std, None, clipped, n)
        np.clip(x, lo32, hi32, out=x)
    else:
        np.clip(x, lo32, hi32, out=x)
        if mean is None or std is None:
            mean, std = _fill_stats(mean, std, x.ravel())
    std = float(std) if float(std) > 0 else 1.0
    np.subtract(x, np.float32(mean), out=x)
    np.divide(x, np.float32(std), out=x)
    return x
