"""Cutting patches and warping them: the spatial half of joint augmentation.

:func:`render` cuts the patches whose centres :class:`medseg.transforms.sampling.PatchSampler`
drew, with flips / 90-degree rotations folded into the copy and, for the patches that get a small
rotation / scaling / elastic warp, one bilinear gather straight from the source slice (so rotated
corners hold real image, not padding). Image and mask go through the same arithmetic, so they
cannot drift apart (:func:`medseg.transforms.augment.check_alignment` proves it). Vectorised numpy,
or OpenCV when importable (:func:`warp_backend`); see ``benchmarks/pipeline.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from medseg.io.classes import BINARY, LabelKind
from medseg.transforms.sampling import Centres, SampleSource
from medseg.transforms.slicing import context_offsets

__all__ = ["SpatialParams", "identity_spatial", "render", "warp_backend"]


@dataclass(frozen=True, eq=False)
class SpatialParams:
    """Per-patch spatial augmentation of one batch (all arrays have length ``B``).

    Attributes:
        flip_h, flip_w: bool, mirror along patch rows / columns.
        rot90: int in 0..3, counter-clockwise quarter turns (``np.rot90``).
        angle_deg: small rotation (0 = none).
        scale: zoom factor (> 1 shows a smaller region, enlarged; 1 = none).
        elastic: optional float32 ``(B, 2, gh, gw)`` coarse displacement grids in pixels, or None;
            ``elastic_on`` (bool ``(B,)``) says which patches use theirs.
    """

    flip_h: np.ndarray
    flip_w: np.ndarray
    rot90: np.ndarray
    angle_deg: np.ndarray
    scale: np.ndarray
    elastic: np.ndarray | None = None
    elastic_on: np.ndarray | None = None

    def warped(self) -> np.ndarray:
        """Which patches need interpolation (rotation, scaling or elastic)."""
        w = (self.angle_deg != 0) | (self.scale != 1)
        if self.elastic_on is not None:
            w = w | self.elastic_on
        return w

    def as_dict(self) -> dict[str, list]:
        d = {k: getattr(self, k).tolist() for k in ("flip_h", "flip_w", "rot90", "angle_deg", "scale")}
        if self.elastic_on is not None:
            d["elastic_on"] = self.elastic_on.tolist()
        return d


def identity_spatial(batch_size: int) -> SpatialParams:
    """No spatial change for ``batch_size`` patches."""
    z = np.zeros(batch_size, bool)
    return SpatialParams(z, z.copy(), np.zeros(batch_size, np.int64), np.zeros(batch_size), np.ones(batch_size))


def _discrete_matrix(flip_h: bool, flip_w: bool, k: int) -> np.ndarray:
    """2x2 matrix taking output offsets (dy, dx) to pre-flip/rotation offsets, matching numpy's
    ``np.rot90(x[::fh, ::fw], k)`` on a patch centred at its middle."""
    # np.rot90(a, 1)[i, j] = a[j, n - 1 - i]: output offset (dy, dx) reads input offset (dx, -dy).
    r = np.array([[0, 1], [-1, 0]])
    m = np.linalg.matrix_power(r, int(k) % 4)
    f = np.diag([-1 if flip_h else 1, -1 if flip_w else 1])
    return f @ m


def _planes(src: SampleSource, s: int, offsets: np.ndarray) -> list[np.ndarray]:
    n = src.image.shape[0]
    return [src.image[min(max(s + o, 0), n - 1)] for o in offsets]


def _crop(plane: np.ndarray, h0: int, w0: int, ph: int, pw: int, pad: float) -> np.ndarray:
    """``plane[h0:h0+ph, w0:w0+pw]`` as a view when inside, else a padded copy."""
    H, W = plane.shape
    if h0 >= 0 and w0 >= 0 and h0 + ph <= H and w0 + pw <= W:
        return plane[h0:h0 + ph, w0:w0 + pw]
    out = np.full((ph, pw), pad, dtype=plane.dtype)
    a0, a1 = max(h0, 0), min(h0 + ph, H)
    b0, b1 = max(w0, 0), min(w0 + pw, W)
    if a1 > a0 and b1 > b0:
        out[a0 - h0:a1 - h0, b0 - w0:b1 - w0] = plane[a0:a1, b0:b1]
    return out


def _orient(view: np.ndarray, flip_h: bool, flip_w: bool, k: int, fast: bool = False) -> np.ndarray:
    """``np.rot90(view[::fh, ::fw], k)`` as a view when possible.

    A half turn is a double flip. With ``fast`` (OpenCV present), odd quarter turns use
    ``cv2.rotate``, 7x faster than numpy's strided transposed copy; flipping rows before a quarter
    turn equals flipping columns after it (and vice versa).
    """
    k = int(k) % 4
    if k == 2:
        flip_h, flip_w, k = not flip_h, not flip_w, 0
    if k == 0:
        return view[::-1 if flip_h else 1, ::-1 if flip_w else 1]
    if fast and view.dtype in (np.float32, np.uint8) and _cv2_layout(view):
        import cv2

        turned = cv2.rotate(view, cv2.ROTATE_90_COUNTERCLOCKWISE if k == 1 else cv2.ROTATE_90_CLOCKWISE)
        return turned[::-1 if flip_w else 1, ::-1 if flip_h else 1]
    return np.rot90(view[::-1 if flip_h else 1, ::-1 if flip_w else 1], k)


def _bilinear(plane: np.ndarray, corners: tuple[np.ndarray, ...], fy: np.ndarray, fx: np.ndarray,
              invalid: np.ndarray | None, pad: float) -> np.ndarray:
    """Bilinear values from the flat indices of the four corners and the fractions ``fy, fx``.

    All arithmetic is float32 in one fixed order, so an image equal to its mask interpolates to
    exactly the mask's values (the alignment guarantee).
    """
    flat = plane.reshape(-1) if plane.flags.c_contiguous else np.ascontiguousarray(plane).reshape(-1)
    a, b, c, d = (flat.take(i).astype(np.float32, copy=False) for i in corners)
    b -= a
    b *= fx
    a += b  # top edge
    d -= c
    d *= fx
    c += d  # bottom edge
    c -= a
    c *= fy
    a += c
    if invalid is not None:
        a[invalid] = np.float32(pad)
    return a


def _warp_coords(ph: int, pw: int, centre: tuple[float, float], matrix: np.ndarray,
                 disp: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    oy = (np.arange(ph, dtype=np.float32) - np.float32((ph - 1) / 2))[:, None]
    ox = (np.arange(pw, dtype=np.float32) - np.float32((pw - 1) / 2))[None, :]
    m = matrix.astype(np.float32)
    cy = np.float32(centre[0]) + m[0, 0] * oy + m[0, 1] * ox
    cx = np.float32(centre[1]) + m[1, 0] * oy + m[1, 1] * ox
    if disp is not None:
        cy = cy + disp[0]
        cx = cx + disp[1]
    return cy, cx


def _upsample_grid(grid: np.ndarray, ph: int, pw: int) -> np.ndarray:
    """Smooth (Gaussian-weighted) upsampling of a coarse ``(2, gh, gw)`` grid to ``(2, ph, pw)``."""
    def basis(n_out: int, n_in: int) -> np.ndarray:
        pos = np.linspace(0, n_in - 1, n_out)[:, None]
        w = np.exp(-0.5 * ((pos - np.arange(n_in)[None, :]) / 0.6) ** 2)
        return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)

    uh, uw = basis(ph, grid.shape[1]), basis(pw, grid.shape[2])
    return np.einsum("hi,cij,wj->chw", uh, grid.astype(np.float32), uw, optimize=True)


def warp_backend() -> str:
    """``"cv2"`` when OpenCV is importable (about 5x faster warps), else ``"numpy"``.

    ``MEDSEG_WARP_BACKEND=numpy`` forces the numpy implementation.
    """
    global _BACKEND
    if _BACKEND is None:
        _BACKEND = "numpy"
        if os.environ.get("MEDSEG_WARP_BACKEND", "").lower() != "numpy":
            try:
                import cv2  # noqa: F401

                _BACKEND = "cv2"
            except ImportError:
                pass
    return _BACKEND


_BACKEND: str | None = None


def _warp_numpy(out_image, out_mask, planes, label_plane, centre, matrix, disp, pad,
                label_kind: LabelKind = BINARY) -> None:
    """Bilinear warp in numpy; points outside the plane read ``pad`` (image) / 0 (mask)."""
    ph, pw = out_mask.shape
    yy, xx = _warp_coords(ph, pw, centre, matrix, disp)
    H, W = label_plane.shape
    valid = (yy >= 0) & (yy <= H - 1) & (xx >= 0) & (xx <= W - 1)
    if H < 2 or W < 2:  # a one-pixel-wide plane: repeat it so the 2x2 neighbourhood exists
        widen = ((0, 2 - min(H, 2)), (0, 2 - min(W, 2)))
        planes = [np.pad(p, widen, mode="edge") for p in planes]
        label_plane = np.pad(label_plane, widen, mode="edge")
        H, W = label_plane.shape
    # float32 throughout (a float64 detour would double the cost of this hot loop).
    y0f = np.floor(yy)
    np.clip(y0f, 0, H - 2, out=y0f)
    x0f = np.floor(xx)
    np.clip(x0f, 0, W - 2, out=x0f)
    fy = yy - y0f
    np.clip(fy, 0, 1, out=fy)
    fx = xx - x0f
    np.clip(fx, 0, 1, out=fx)
    i00 = y0f.astype(np.intp)
    i00 *= W
    i00 += x0f.astype(np.intp)
    corners = (i00, i00 + 1, i00 + W, i00 + (W + 1))
    invalid = None if valid.all() else ~valid
    for c, plane in enumerate(planes):
        out_image[:, :, c] = _bilinear(plane, corners, fy, fx, invalid, pad)
    out_mask[...] = label_kind.warp_labelled(lambda p: _bilinear(p, corners, fy, fx, invalid, 0.0), label_plane)


def _cv2_layout(a: np.ndarray) -> bool:
    """Whether OpenCV can read ``a`` in place: positive row stride, packed pixels and channels."""
    packed = a.itemsize * (a.shape[2] if a.ndim == 3 else 1)
    return a.strides[0] > 0 and a.strides[1] == packed and (a.ndim == 2 or a.strides[2] == a.itemsize)


def _cv2_ready(window: np.ndarray) -> np.ndarray:
    """float32 with unit column stride (OpenCV reads row-strided views without a copy)."""
    if window.dtype == np.float32 and window.strides[1] == 4 and window.strides[0] > 0:
        return window
    return np.ascontiguousarray(window, dtype=np.float32)


def _warp_cv2(out_image, out_mask, planes, label_plane, centre, matrix, disp, pad,
              label_kind: LabelKind = BINARY) -> None:
    """The same warp with OpenCV (bilinear; agrees with :func:`_warp_numpy` to about 1e-5).

    Image planes and the mask are cut to one window around the sampled points (padded outside
    the volume) and warped with the same matrix, the mask as float32: identical arithmetic, so
    an image equal to its mask still thresholds to exactly the mask.
    """
    import cv2

    ph, pw = out_mask.shape
    half = np.array([(ph - 1) / 2, (pw - 1) / 2])
    corners = np.array([[-1, -1], [-1, 1], [1, -1], [1, 1]]) * half
    pts = np.asarray(centre) + corners @ np.asarray(matrix).T
    margin = 2 + (float(np.abs(disp).max()) if disp is not None else 0.0)
    y_lo, x_lo = (int(np.floor(v - margin)) for v in pts.min(axis=0))
    y_hi, x_hi = (int(np.ceil(v + margin)) for v in pts.max(axis=0))
    wh, ww = y_hi - y_lo + 1, x_hi - x_lo + 1
    # Mask first, then the image channels, one single-channel call each: OpenCV's single-channel
    # float path is exact, its multi-channel path quantizes positions to 1/32 pixel (and merging
    # channels first was measured slower than separate calls).
    flags = cv2.INTER_LINEAR
    if disp is None:
        m = np.asarray(matrix, dtype=np.float64)
        cy, cx = centre[0] - y_lo, centre[1] - x_lo
        # OpenCV is x-first and maps destination (x, y) to source (x, y) with WARP_INVERSE_MAP.
        affine = np.array([[m[1, 1], m[1, 0], cx - m[1, 1] * half[1] - m[1, 0] * half[0]],
                           [m[0, 1], m[0, 0], cy - m[0, 1] * half[1] - m[0, 0] * half[0]]])

        def warp_one(src):
            return cv2.warpAffine(np.ascontiguousarray(src, dtype=np.float32), affine, (pw, ph),
                                  flags=flags | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
    else:
        yy, xx = _warp_coords(ph, pw, centre, matrix, disp)
        map_y, map_x = yy - np.float32(y_lo), xx - np.float32(x_lo)

        def warp_one(src):
            return cv2.remap(np.ascontiguousarray(src, dtype=np.float32), map_x, map_y, flags,
                             borderMode=cv2.BORDER_REPLICATE)
    out_mask[...] = label_kind.warp_labelled(warp_one, _crop(label_plane, y_lo, x_lo, wh, ww, 0))
    for c, p in enumerate(planes):
        out_image[:, :, c] = warp_one(_cv2_ready(_crop(p, y_lo, x_lo, wh, ww, pad)))


def _label_from(interp, label: np.ndarray, kind: "LabelKind | str") -> np.ndarray:
    """The warped label: ``interp`` (the warp of one float plane) applied to the label's parts,
    as its kind says (:meth:`medseg.io.classes.LabelKind.warp`)."""
    return LabelKind.named(kind).warp_labelled(interp, label)


def render(
    sources: Sequence[SampleSource],
    centres: Centres,
    patch_size: tuple[int, int],
    context_slices: int = 1,
    spatial: SpatialParams | None = None,
    *,
    channel_offsets: Sequence[int] | None = None,
    backend: str | None = None,
    after_patch: Any = None,
    label_kind: LabelKind | str = BINARY,
) -> tuple[np.ndarray, np.ndarray]:
    """Cut the patches of one batch, applying the spatial augmentation in the same pass.

    Args:
        sources: the cases ``centres.case`` indexes.
        centres: from :meth:`PatchSampler.draw`.
        patch_size: (H, W).
        context_slices: odd number of neighbouring slices as channels (edges repeat).
        spatial: per-patch flips / rot90 / rotation / scaling / elastic, or None for none.
        channel_offsets: slice offsets of the channels, overriding ``context_slices`` (any count,
            e.g. ``[0, 1]`` for a two-channel source stored as two slices).
        backend: ``"cv2"`` or ``"numpy"`` for warped patches (default :func:`warp_backend`).
        after_patch: optional ``after_patch(case, first_slice, last_slice)`` called once a patch
            is cut (the disk cache uses it to hand the slices' pages back at once).
        label_kind: the :class:`~medseg.io.classes.LabelKind` of the labels (or its saved name):
            how a warped patch's label is made (:meth:`~medseg.io.classes.LabelKind.warp`; flips
            and quarter turns copy labels exactly anyway).

    Returns:
        ``images`` float32 ``(B, H, W, context_slices)`` and ``masks`` uint8 ``(B, H, W)`` (labels
        of the source's kind). A warped patch is sampled bilinearly from the source slice; its
        binary mask is the bilinearly interpolated mask thresholded at 0.5, exactly as an image
        equal to the mask would be.

    Raises:
        ValueError: if a 90-degree rotation is asked for a non-square patch, or the backend is unknown.
    """
    label_kind = LabelKind.named(label_kind)
    backend = warp_backend() if backend is None else backend
    if backend not in ("cv2", "numpy"):
        raise ValueError(f"backend must be 'cv2' or 'numpy', found {backend!r}")
    ph, pw = (int(v) for v in patch_size)
    B = len(centres)
    sp = spatial if spatial is not None else identity_spatial(B)
    if ph != pw and np.any(sp.rot90 % 2 == 1):
        raise ValueError(f"odd 90-degree rotations need a square patch, found patch_size {patch_size}")
    offs = context_offsets(context_slices) if channel_offsets is None else np.asarray(channel_offsets, dtype=np.int64)
    images = np.empty((B, ph, pw, offs.size), np.float32)
    masks = np.empty((B, ph, pw), np.uint8)
    warped = sp.warped()
    fast = backend == "cv2"
    for b in range(B):
        src = sources[int(centres.case[b])]
        s, ch, cw = int(centres.slice[b]), int(centres.h[b]), int(centres.w[b])
        planes = _planes(src, s, offs)
        label_plane = src.label[s]
        fh, fw, k = bool(sp.flip_h[b]), bool(sp.flip_w[b]), int(sp.rot90[b])
        if not warped[b]:
            h0, w0 = ch - ph // 2, cw - pw // 2
            for c, plane in enumerate(planes):
                images[b, :, :, c] = _orient(_crop(plane, h0, w0, ph, pw, src.pad_value), fh, fw, k, fast)
            masks[b] = _orient(_crop(label_plane, h0, w0, ph, pw, 0), fh, fw, k, fast)
        else:
            _warp_patch(images[b], masks[b], planes, label_plane, (ch, cw), sp, b, backend, src.pad_value, label_kind)
        if after_patch is not None:
            n = src.image.shape[0]
            after_patch(int(centres.case[b]), max(0, s + int(offs.min())), min(n - 1, s + int(offs.max())))
    return images, masks


def _warp_patch(out_image, out_mask, planes, label_plane, centre_px, sp: SpatialParams, b: int, backend: str,
                pad: float, label_kind: LabelKind = BINARY) -> None:
    """Warp one patch (rotation / scaling / elastic, flips and rot90 folded in) from its source."""
    ph, pw = out_mask.shape
    ch, cw = centre_px
    fh, fw, k = bool(sp.flip_h[b]), bool(sp.flip_w[b]), int(sp.rot90[b])
    # Output offset o (from the patch middle) reads source point centre + A @ D @ o, where D
    # is the flip/rot90 part and A the rotation+scaling; the middle of an unwarped patch is
    # (ch - ph // 2 + (ph - 1) / 2), so with A = I this is exactly the crop above.
    theta = np.deg2rad(float(sp.angle_deg[b]))
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    matrix = rot / float(sp.scale[b]) @ _discrete_matrix(fh, fw, k)
    centre = (ch - ph // 2 + (ph - 1) / 2, cw - pw // 2 + (pw - 1) / 2)
    disp = None
    if sp.elastic is not None and sp.elastic_on is not None and sp.elastic_on[b]:
        disp = _upsample_grid(sp.elastic[b], ph, pw)
    if backend == "cv2":
        _warp_cv2(out_image, out_mask, planes, label_plane, centre, matrix, disp, pad, label_kind)
    else:
        _warp_numpy(out_image, out_mask, planes, label_plane, centre, matrix, disp, pad, label_kind)


