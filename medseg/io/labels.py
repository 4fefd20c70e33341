"""Label-value mapping (``--map-labels``), the one rule every command applies to label maps.

``"255:1"`` maps 255 to 1 and keeps other values; ``"5:1,*:0"`` maps 5 to 1 and every other
value to 0 (one organ out of a multi-organ label map, e.g. liver = 5 in TotalSegmentator's).
The mapping is applied when a label map is read, before it is checked, fingerprinted, cached,
validated against or scored, so training, validation and evaluation see the same labels.
"""

from __future__ import annotations

from typing import Mapping, Union

import numpy as np

from medseg.errors import InputError

__all__ = ["OTHERS", "parse_label_map", "apply_label_map", "format_label_map"]

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
        if src != OTHERS:
            out[array == src] = dst
    return out
