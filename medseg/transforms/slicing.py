"""2D slices from 3D volumes, 2.5D context channels, and stacking 2D predictions back.

A stack is slice-first ``(n_slices, H, W)``: ``to_stack(array, axis)`` moves the chosen array
axis to the front (a view, no copy) and ``from_stack`` is its exact inverse.
"""

from __future__ import annotations

import numpy as np

from medseg.io.volume import largest_spacing_axis  # the rule lives with the volume record (io: every layer may use it)

__all__ = ["largest_spacing_axis", "to_stack", "from_stack", "context_offsets", "context_slices"]


def to_stack(array: np.ndarray, axis: int) -> np.ndarray:
    """``(…)`` 3D array -> slice-first ``(n, H, W)`` with the two other axes in their original order.

    Raises:
        ValueError: if ``axis`` is not 0, 1 or 2 or the array is not 3D.
    """
    if array.ndim != 3 or axis not in (0, 1, 2):
        raise ValueError(f"expected a 3D array and axis in (0, 1, 2), found shape {array.shape}, axis {axis!r}")
    return np.moveaxis(array, axis, 0)


def from_stack(stack: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of :func:`to_stack`: ``(n, H, W)`` -> the 3D array with the slice axis back at ``axis``."""
    if stack.ndim != 3 or axis not in (0, 1, 2):
        raise ValueError(f"expected a 3D stack and axis in (0, 1, 2), found shape {stack.shape}, axis {axis!r}")
    return np.moveaxis(stack, 0, axis)


def context_offsets(context: int) -> np.ndarray:
    """Slice offsets for ``context`` channels, e.g. 3 -> ``[-1, 0, 1]``.

    Raises:
        ValueError: if ``context`` is not a positive odd integer.
    """
    if int(context) != context or context < 1 or context % 2 == 0:
        raise ValueError(f"context_slices must be a positive odd integer, found {context!r}")
    half = int(context) // 2
    return np.arange(-half, half + 1)


def context_slices(stack: np.ndarray, indices, context: int = 1) -> np.ndarray:
    """Gather slices ``indices`` of ``stack`` with ``context`` neighbouring slices as channels.

    Args:
        stack: ``(n, H, W)``.
        indices: 1D integer slice indices (each in ``[0, n)``).
        context: odd number of channels; channel ``c`` holds slice ``index + c - context // 2``,
            clamped to ``[0, n - 1]`` (edges are padded by repeating the edge slice).

    Returns:
        ``(B, H, W, context)`` float32, channels last.

    Raises:
        IndexError: if an index is outside ``[0, n)``.
    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    n = stack.shape[0]
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"slice indices must lie in [0, {n}), found {idx.min()}..{idx.max()}")
    nb = np.clip(idx[:, None] + context_offsets(context)[None, :], 0, n - 1)
    out = np.asarray(stack)[nb]  # (B, C, H, W)
    return np.ascontiguousarray(np.moveaxis(out, 1, -1), dtype=np.float32)
