"""Label maps: the value mapping (``--map-labels``) and the value rule every command applies.

``"255:1"`` maps 255 to 1 and keeps other values; ``"5:1,*:0"`` maps 5 to 1 and every other
value to 0 (one organ out of a multi-organ label map, e.g. liver = 5 in TotalSegmentator's).
The mapping is applied when a label map is read, before it is checked, fingerprinted, cached,
validated against or scored, so training, validation and evaluation see the same labels.

The value rule (:func:`label_problems`, :func:`check_label_values`): a label map holds class
indices, so every value is finite, integral, >= 0 and, when the number of classes is known,
below it. ``medseg-check`` reports every breach, training diagnostics warn, ``medseg-eval``
refuses the file; all three judge with these functions.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Union

import numpy as np

from medseg.errors import InputError

__all__ = [
    "OTHERS",
    "LabelProblem",
    "apply_label_map",
    "check_label_values",
    "with_ignore",
    "format_label_map",
    "label_problems",
    "label_values",
    "parse_label_map",
]

#: Key of the mapping that stands for "every value not listed".
OTHERS = "*"

LabelMap = Mapping[Union[int, str], int]

_FORMAT = "--map-labels as FROM:TO pairs like '255:1', '1:0,2:1' or '5:1,*:0' (* = every other value)"


def parse_label_map(text: str) -> dict:
    """Parse ``"255:1"``, ``"1:0,2:1"`` or ``"5:1,*:0"`` into ``{255: 1}``, ``{1: 0, 2: 1}``,
    ``{5: 1, "*": 0}``.

    Raises:
        InputError: malformed text, non-integer values, or a value mapped twice.
    """
    mapping: dict = {}
    for item in str(text).replace(" ", "").split(","):
        if not item:
            continue
        src, sep, dst = item.partition(":")
        try:
            if not sep:
                raise ValueError(item)
            key = OTHERS if src == OTHERS else int(src)
            value = int(dst)
        except ValueError as exc:
            raise InputError(None, _FORMAT, repr(text)) from exc
        if key in mapping:
            raise InputError(None, "each label value mapped once in --map-labels", f"{key} mapped twice in {text!r}")
        mapping[key] = value
    if not mapping:
        raise InputError(None, _FORMAT, repr(text))
    return mapping


def with_ignore(mapping: LabelMap | None, ignore: int | None) -> dict | None:
    """``mapping`` with the ignore value kept as it is (``{ignore: ignore}``), so that ``*`` never
    swallows it: ``--ignore-label`` is applied before ``--map-labels``. None when both are None.

    Raises:
        InputError: the mapping maps the ignore value, or maps another value onto it.
    """
    if ignore is None:
        return dict(mapping) if mapping else None
    mapping = dict(mapping or {})
    onto = sorted(k for k, v in mapping.items() if v == ignore and k != ignore)
    if mapping.get(ignore, ignore) != ignore or onto:
        found = f"{ignore}:{mapping[ignore]}" if mapping.get(ignore, ignore) != ignore else f"{onto[0]}:{ignore}"
        raise InputError(None, f"--map-labels leaving the ignore value {ignore} (--ignore-label) alone",
                         f"{found} in {format_label_map(mapping)!r}")
    mapping[ignore] = ignore
    return mapping


def format_label_map(mapping: LabelMap | None) -> str | None:
    """Inverse of :func:`parse_label_map` (``*`` last)."""
    if not mapping:
        return None
    items = [f"{k}:{v}" for k, v in mapping.items() if k != OTHERS]
    if OTHERS in mapping:
        items.append(f"{OTHERS}:{mapping[OTHERS]}")
    return ",".join(items)


def apply_label_map(array: np.ndarray, label_map: LabelMap | None) -> np.ndarray:
    """``array`` with each value ``k`` of ``label_map`` replaced by ``label_map[k]`` (simultaneously);
    values not listed become ``label_map["*"]`` when given, else are kept. The input is not modified."""
    if not label_map:
        return array
    others = label_map.get(OTHERS)
    if others is not None:
        out = np.full(array.shape, others, dtype=np.result_type(array.dtype, np.min_scalar_type(others)))
    else:
        out = array.copy()
    for src, dst in label_map.items():
        if src == OTHERS:
            continue
        hit = array == src
        if not hit.any():  # e.g. an ignore value above the dtype's range (uint8 labels, ignore 32767)
            continue
        if not np.can_cast(np.min_scalar_type(dst), out.dtype):  # widen only for values that occur
            out = out.astype(np.result_type(out.dtype, np.min_scalar_type(dst)))
        out[hit] = dst
    return out


# ----------------------------------------------------------------------------------- value rule
#: Expected text of the errors about values that are no integers.
_INTEGER_LABELS = "a label map (integer values)"
#: Hints of :func:`check_label_values`, by problem (``"probability"``: non-integer values in [0, 1]).
DEFAULT_HINTS = {
    "nan": "labels are class indices: resample them with nearest-neighbour interpolation and save them as integers",
    "non_integer": "an interpolated mask? resample labels with nearest-neighbour interpolation",
    "probability": "an interpolated mask or a probability map? resample labels with nearest-neighbour "
                   "interpolation, threshold probabilities (e.g. >= 0.5)",
    "outside": "map them to class indices, e.g. --map-labels 255:1",
}


class LabelProblem(NamedTuple):
    """One way a label array breaks the value rule (see :func:`label_problems`).

    Attributes:
        kind: ``"nan"`` (NaN/inf voxels), ``"non_integer"`` (finite voxels with a fractional part)
            or ``"outside"`` (integral values that are no class index: negative, or
            ``>= num_classes``).
        count: voxels concerned.
        values: the offending values, sorted (``non_integer``: up to 5 examples across their
            range; ``nan``: empty).
        probability: ``non_integer`` only: every finite value lies in [0, 1] (a probability map,
            or an interpolated 0/1 mask).
        expected, found: texts of the :class:`~medseg.errors.InputError` that refuses the file.
    """

    kind: str
    count: int
    values: list
    probability: bool
    expected: str
    found: str


def _shown(values: list, limit: int = 10) -> str:
    return ", ".join(f"{v:g}" for v in values[:limit]) + (", ..." if len(values) > limit else "")


def _distinct(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values of a 1D array; one ``bincount`` pass for integers of a small range."""
    if values.dtype.kind in "biu" and values.size:
        low, high = int(values.min()), int(values.max())
        if high - low < 1 << 16:
            counts = np.bincount((values.astype(np.int64) - low).ravel(), minlength=high - low + 1)
            return (np.flatnonzero(counts) + low).astype(values.dtype)
    return np.unique(values)


def label_values(array: np.ndarray, limit: int | None = None) -> list:
    """Sorted distinct values of a label array: Python ints for bool/integer arrays, else floats.

    Only the voxels outside {0, 1} are sorted (labels are mostly binary; ``np.unique`` over a
    CT-sized volume takes seconds). NaN comes last, once. ``limit`` keeps the smallest values.
    """
    array = np.asarray(array)
    if array.size == 0:
        return []
    other = (array != 0) & (array != 1)  # NaN too
    extra = _distinct(array[other].ravel())
    nonzero = int(np.count_nonzero(array))
    ones = nonzero - int(np.count_nonzero(other))
    present = [v for v, here in ((0, nonzero < array.size), (1, ones > 0)) if here]
    if array.dtype.kind == "f":
        values = np.union1d(np.asarray(present, dtype=array.dtype), extra).tolist()
    else:
        values = sorted(set(present) | {int(v) for v in extra.tolist()})
    return values if limit is None else values[:limit]


def _examples(values: np.ndarray, n: int = 5) -> list:
    """Up to ``n`` distinct values spread over the range of ``values`` (at most 100 000 are sorted)."""
    step = max(1, values.size // 100_000)
    distinct = np.unique(values[::step])
    if distinct.size > n:
        distinct = distinct[np.linspace(0, distinct.size - 1, n).round().astype(int)]
    return distinct.tolist()


def _inspect(array: np.ndarray, num_classes: int | None) -> tuple[list[LabelProblem], list | None]:
    """(problems, sorted distinct values of its finite integral voxels) of a label array."""
    array = np.asarray(array)
    problems: list[LabelProblem] = []
    integral = array
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        n_bad = int(array.size - np.count_nonzero(finite))
        if n_bad:
            problems.append(LabelProblem("nan", n_bad, [], False, _INTEGER_LABELS, f"{n_bad} NaN/inf voxels"))
        fractional = finite & (array != np.trunc(array))
        n_frac = int(np.count_nonzero(fractional))
        if n_frac:
            examples = _examples(array[fractional])
            good = array[finite]
            probability = bool(good.min() >= 0 and good.max() <= 1)
            found = (f"a probability map (values between 0 and 1, such as {examples[len(examples) // 2]:.3g})"
                     if probability else f"{n_frac} non-integer voxels (values such as {_shown(examples)})")
            problems.append(LabelProblem("non_integer", n_frac, examples, probability, _INTEGER_LABELS, found))
        if problems:
            integral = array[finite & ~fractional]
    values = label_values(integral)
    outside = [v for v in values if v < 0 or (num_classes is not None and v >= num_classes)]
    if outside:
        bad = integral < 0
        if num_classes is not None:
            bad |= integral >= num_classes
        count = int(np.count_nonzero(bad))
        if num_classes == 2:
            expected, found = "a binary mask with values {0, 1}", f"other values: {_shown(outside)}"
        elif num_classes is not None:
            expected, found = f"class indices 0..{num_classes - 1}", f"other values: {_shown(outside)}"
        else:
            expected, found = "a label map of class indices (values >= 0)", f"negative values: {_shown(outside)}"
        problems.append(LabelProblem("outside", count, outside, False, expected, found))
    return problems, values


def label_problems(array: np.ndarray, *, num_classes: int | None = None) -> list[LabelProblem]:
    """Every breach of the value rule in ``array``, in the order NaN/inf, non-integer, outside.

    Args:
        array: label map of any shape and dtype (bool arrays always pass).
        num_classes: classes including background; None: any integer >= 0 is a class index.

    Returns:
        :class:`LabelProblem` list, empty for a valid label map. Integral voxels of a float array
        with NaN or fractional voxels are still judged for values outside the classes.
    """
    return _inspect(array, num_classes)[0]


def check_label_values(
    array: np.ndarray,
    path=None,
    *,
    num_classes: int | None = None,
    hints: Mapping[str, str] | None = None,
) -> list:
    """Refuse a label map that breaks the value rule; return its sorted distinct values.

    Args:
        array: label map of any shape and dtype.
        path: file named in the error.
        num_classes: classes including background (2: values must be 0 and 1); None: any
            integer >= 0.
        hints: advice by problem (``"nan"``, ``"non_integer"``, ``"probability"``,
            ``"outside"``) replacing :data:`DEFAULT_HINTS`; the caller knows its remedies
            (``--label N``, ``--map-labels``).

    Raises:
        InputError: naming ``path``, what was expected and the first problem found.
    """
    problems, values = _inspect(array, num_classes)
    if problems:
        p = problems[0]
        key = "probability" if p.probability else p.kind
        hint = (hints or {}).get(key, DEFAULT_HINTS[key])
        raise InputError(path, p.expected, p.found, hint)
    return values
