"""Where the pixels of one DICOM frame lie on a medseg grid (a :class:`~medseg.io.volume.Volume`).

The centre of pixel (row ``r``, column ``c``) of a frame is ``IPP + c * dc * X + r * dr * Y`` (LPS, mm;
``X, Y`` from ImageOrientationPatient, ``PixelSpacing = [dr, dc]``, PS3.3 C.7.6.2.1.1). Mapped through
the inverse of the grid's RAS+ affine it is a voxel index; a frame belongs to the grid when every pixel
centre lands on a voxel centre (within :data:`INDEX_TOLERANCE` voxels), which holds for any slice order,
axis order or flip of the same voxels. The label readers scatter frames with these indices and the SEG
writer gathers them, so both agree with the image reader by construction, not by file order.
"""

from __future__ import annotations

import numpy as np

from medseg.errors import InputError

#: Largest distance, in voxels, between a frame's pixel centre and the voxel centre it is put on: the
#: slice-position jitter read_dicom accepts (NONUNIFORM_FRACTION), e.g. 0.07 mm on 7 mm slices.
INDEX_TOLERANCE = 0.1
_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def lps_to_index(affine_ras: np.ndarray, points_lps: np.ndarray) -> np.ndarray:
    """Continuous voxel indices ``(N, 3)`` of LPS points ``(N, 3)`` (mm) on a grid with RAS+ ``affine_ras``."""
    ras = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3) * _LPS_TO_RAS
    inverse = np.linalg.inv(affine_ras)
    return ras @ inverse[:3, :3].T + inverse[:3, 3]


def frame_indices(affine_ras: np.ndarray, shape, ipp, iop, spacing, rows: int, cols: int, where,
                  what: str = "frame") -> tuple:
    """Where one frame's pixels lie on the grid: a placement for :func:`frame_view` (basic slicing,
    so reading and writing a frame cost a view, not index arrays).

    Args:
        affine_ras, shape: the grid (RAS+ affine, 3D shape).
        ipp, iop, spacing: the frame's ImagePositionPatient (3), ImageOrientationPatient (6) and
            PixelSpacing ``[row spacing, column spacing]``, LPS mm.
        where: path named in errors; what: how errors call the frame (``"SEG frame 3"``).

    Raises:
        InputError: the frame's pixels do not fall on the grid's voxel centres (another spacing,
            a tilted plane, a shift of part of a voxel) or fall outside the grid.
    """
    iop = np.asarray(iop, dtype=np.float64)
    dr, dc = (float(v) for v in spacing)
    # lps_to_index's map as one matrix (inverted once): index = linear @ lps + shift.
    inverse = np.linalg.inv(affine_ras)
    linear = inverse[:3, :3] * _LPS_TO_RAS
    origin = linear @ np.asarray(ipp, dtype=np.float64) + inverse[:3, 3]
    steps = np.stack([linear @ (iop[:3] * dc), linear @ (iop[3:6] * dr)])
    exact = np.round(steps)
    # np.allclose's test (|a - b| <= atol + 1e-5 |b|) without its per-call overhead.
    if not (np.all(np.abs(steps - exact) <= INDEX_TOLERANCE / max(rows, cols, 1) + 1e-5 * np.abs(exact))
            and np.array_equal(np.abs(exact).sum(axis=1), [1, 1])
            and np.all(np.abs(origin - np.round(origin)) <= INDEX_TOLERANCE + 1e-5 * np.abs(np.round(origin)))):
        raise InputError(
            where, f"a {what} on the referenced image's voxel grid",
            f"a plane at index {np.round(origin, 3).tolist()} with steps {np.round(steps, 3).tolist()} per pixel "
            "(another spacing, orientation or a shift of part of a voxel)",
        )
    return _plane(np.round(origin).astype(np.int64), exact.astype(np.int64), rows, cols, shape, where, what)


def _plane(start, steps, rows: int, cols: int, shape, where, what: str) -> tuple:
    """Basic-slicing index of the frame's voxels (a view, no copy) and whether to transpose it to
    (rows, cols): each frame axis runs along one grid axis, forwards or backwards."""
    axis_c, axis_r = int(np.argmax(np.abs(steps[0]))), int(np.argmax(np.abs(steps[1])))
    if axis_c == axis_r:
        raise InputError(where, f"a {what} with rows and columns along two axes", f"steps {steps.tolist()}")
    index: list = [int(start[a]) for a in range(3)]
    for axis, n in ((axis_c, cols), (axis_r, rows)):
        step = int(steps[0 if axis == axis_c else 1][axis])
        first, last = int(start[axis]), int(start[axis]) + step * (n - 1)
        if min(first, last) < 0 or max(first, last) >= shape[axis]:
            raise InputError(where, f"a {what} inside the referenced image",
                             f"voxel index {min(first, last)}..{max(first, last)} on axis {axis} of a grid of "
                             f"shape {list(shape)}")
        stop = last + step
        index[axis] = slice(first, None if stop < 0 else stop, step)
    fixed = 3 - axis_c - axis_r
    if not 0 <= index[fixed] < shape[fixed]:
        raise InputError(where, f"a {what} inside the referenced image",
                         f"slice {index[fixed]} on axis {fixed} of a grid of shape {list(shape)}")
    return tuple(index), axis_c < axis_r


def frame_view(array: np.ndarray, placement: tuple) -> np.ndarray:
    """The ``(rows, cols)`` view of ``array`` at a frame's :func:`frame_indices` placement (writable)."""
    index, transpose = placement
    view = array[index]
    return view.T if transpose else view
