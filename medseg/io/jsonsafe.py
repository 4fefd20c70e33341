"""Strict JSON values: what every JSON file medseg writes passes through.

Python's ``json`` writes NaN and infinity as the bare tokens ``NaN`` and ``Infinity``, which the
JSON standard forbids and strict readers (JavaScript's ``JSON.parse``, Go, ``jq``) reject; it
also refuses numpy scalars and arrays and paths. :func:`json_safe` turns all of them into plain
JSON values, so ``json.dumps(json_safe(x), allow_nan=False)`` never fails on them.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

__all__ = ["json_safe"]


def json_safe(value: Any, *, inf_as_text: bool = False) -> Any:
    """``value`` with every part made strict JSON.

    Dicts (keys become ``str``), lists and tuples are converted recursively; numpy arrays become
    nested lists, numpy scalars (and other objects with an ``item()`` method) Python scalars,
    ``os.PathLike`` objects strings. Floats: NaN becomes ``null``; +-inf becomes ``null`` too, or
    ``"inf"``/``"-inf"`` with ``inf_as_text``. Both are JSON every reader accepts; ``null`` is the
    default because files read back as numbers (training state, check reports) would otherwise
    meet a string, while evaluation summaries keep ``"inf"``: an infinite distance (one mask
    empty) means something else than an undefined (NaN) one. Anything else is returned as is.
    """
    if isinstance(value, dict):
        return {str(k): json_safe(v, inf_as_text=inf_as_text) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, inf_as_text=inf_as_text) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist(), inf_as_text=inf_as_text)
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return ("inf" if value > 0 else "-inf") if inf_as_text else None
        return value
    if not isinstance(value, int) and callable(getattr(value, "item", None)):  # numpy scalars
        return json_safe(value.item(), inf_as_text=inf_as_text)
    return value
