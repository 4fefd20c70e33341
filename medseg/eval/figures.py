"""Figures of an evaluation report: the per-patient slice with the largest disagreement and the
box plots of the metrics, as base64 PNG (matplotlib's Agg backend) for the self-contained HTML page.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import numpy as np

from medseg.eval import catalog
from medseg.eval.aggregate import scored_value

_fmt = catalog.format_value


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png_b64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def largest_disagreement_slice(pred: np.ndarray, ref: np.ndarray, spacing_mm) -> tuple[int, int]:
    """``(axis, index)`` of the slice with most disagreeing voxels, across the coarsest axis.

    Falls back to the slice with the largest reference (then prediction) area when the masks agree,
    and to the middle slice when both are empty.
    """
    return busiest_slice((pred != ref, ref, pred), spacing_mm)


def busiest_slice(candidates, spacing_mm) -> tuple[int, int]:
    """``(axis, index)`` of the slice across the coarsest axis holding most nonzero voxels of the
    first 3D array of ``candidates`` with any; the middle slice when all are empty."""
    from medseg.io.volume import largest_spacing_axis

    axis = largest_spacing_axis(spacing_mm)
    other = tuple(a for a in range(3) if a != axis)
    for candidate in candidates:
        counts = np.count_nonzero(candidate, axis=other)
        if counts.any():
            return axis, int(np.argmax(counts))
    return axis, candidates[0].shape[axis] // 2


def _zoom_window(masks: list[np.ndarray], spacing_2d: np.ndarray, margin_mm: float = 25.0):
    """(r0, r1, c0, c1) around the True pixels of the slices, with a margin; None when empty."""
    union = np.logical_or.reduce(masks)
    if not union.any():
        return None
    rows = np.flatnonzero(union.any(axis=1))
    cols = np.flatnonzero(union.any(axis=0))
    pad_r = int(np.ceil(margin_mm / spacing_2d[0]))
    pad_c = int(np.ceil(margin_mm / spacing_2d[1]))
    return (
        max(rows[0] - pad_r, 0), min(rows[-1] + 1 + pad_r, union.shape[0]),
        max(cols[0] - pad_c, 0), min(cols[-1] + 1 + pad_c, union.shape[1]),
    )


def case_figure_png(case_id: str, pred: np.ndarray, ref: np.ndarray, spacing_mm, *, image=None, dsc=math.nan) -> str:
    """Base64 PNG of the slice with the largest disagreement, outlines of reference and prediction.

    The slice is taken across the coarsest axis (the acquisition's slice axis for anisotropic
    scans); reference in green, prediction in red, on the image (1st-99th percentile window of
    the slice) or on a black background. Left: the whole slice (the zoomed region framed in
    yellow); right: a zoom on the outlines with a 25 mm margin. Pixels keep their physical
    aspect ratio; the slice's first remaining array axis runs left to right.
    """
    axis, index = largest_disagreement_slice(pred, ref, spacing_mm)
    title = f"{case_id}: array axis {axis}, slice {index}; DSC {_fmt(dsc)}\ngreen: reference, red: prediction"
    return outline_figure_png(title, axis, index, spacing_mm, [(ref, "#00e000", None), (pred, "#ff3030", None)],
                              image=image)


def slice_take(axis: int, index: int) -> tuple:
    """The index tuple of slice ``index`` across ``axis`` of a 3D array."""
    take = [slice(None)] * 3
    take[axis] = index
    return tuple(take)


def outline_figure_png(title: str, axis: int, index: int, spacing_mm, layers, *, image=None, legend=None) -> str:
    """Base64 PNG of one slice: outlines of 3D masks on the image, whole slice and zoom.

    Args:
        title: the figure's title.
        axis, index: the slice (:func:`busiest_slice`).
        spacing_mm: voxel size of the masks' axes.
        layers: ``(mask, colour, linestyle)`` per outline, drawn in order; ``mask`` a 3D array
            (or the 2D slice already taken), ``linestyle`` None for matplotlib's default.
        image: 3D image under the outlines (1st-99th percentile window of the slice); None: black.
        legend: matplotlib handles shown as a legend below the panels (None: no legend).
    """
    from matplotlib.patches import Rectangle

    plt = _pyplot()
    take = slice_take(axis, index)
    horiz, vert = [a for a in range(3) if a != axis]
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    # Displayed arrays are (vertical, horizontal) = the slice transposed.
    shown = [np.asarray(m if np.ndim(m) == 2 else m[take], dtype=bool).T for m, _, _ in layers]
    if image is not None:
        background = np.asarray(image[take], dtype=np.float64).T
        finite = background[np.isfinite(background)]
        low, high = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
    else:
        background = np.zeros(shown[0].shape)
        low, high = 0.0, 1.0
    window = _zoom_window(shown, np.array([spacing[vert], spacing[horiz]]))
    fig, axes = plt.subplots(1, 2, figsize=(6.0, 3.2), dpi=90)
    try:
        for ax, zoomed in zip(axes, (False, True)):
            ax.imshow(background, cmap="gray", origin="lower", vmin=low, vmax=max(high, low + 1e-6),
                      aspect=spacing[vert] / spacing[horiz], interpolation="nearest")
            for mask, (_, colour, style) in zip(shown, layers):
                if mask.any() and not mask.all():
                    extra = {} if style is None else {"linestyles": style}
                    ax.contour(mask.astype(np.float32), levels=[0.5], colors=colour, linewidths=1.0, **extra)
            ax.set_xticks([])
            ax.set_yticks([])
            if window is not None:
                r0, r1, c0, c1 = window
                if zoomed:
                    ax.set_xlim(c0 - 0.5, c1 - 0.5)
                    ax.set_ylim(r0 - 0.5, r1 - 0.5)
                else:
                    ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fill=False,
                                           edgecolor="#ffd700", linewidth=0.8))
        fig.suptitle(title, fontsize=8)
        if legend:
            fig.legend(handles=legend, loc="lower center", ncol=min(len(legend), 4), fontsize=7,
                       bbox_to_anchor=(0.5, -0.02), frameon=False)
        return _png_b64(fig)
    finally:
        plt.close(fig)


def class_colours(names) -> dict[str, str]:
    """Class name -> ``"#rrggbb"``, distinct per class: matplotlib's tab10 up to 10 classes, tab20
    up to 20, evenly spaced hues beyond."""
    from matplotlib import colormaps
    from matplotlib.colors import hsv_to_rgb, to_hex

    names = list(names)
    if len(names) <= 20:
        cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
        return {name: to_hex(cmap(k)) for k, name in enumerate(names)}
    # Alternate brightness so neighbouring hues stay apart.
    return {name: to_hex(hsv_to_rgb((k / len(names), 0.85, 1.0 if k % 2 else 0.7))) for k, name in enumerate(names)}


def class_figure_png(case: dict, masks, spec, *, image=None) -> str:
    """Base64 PNG of a case's slice with the most disagreeing voxels over all classes: per class,
    the reference outline solid and the prediction dashed in the class's colour, with a legend of
    the classes on the slice (:func:`outline_figure_png`).

    Args:
        case: the record (:func:`~medseg.eval.evaluate.evaluate_case`) for the title's DSCs.
        masks: :class:`~medseg.eval.evaluate.CaseMasks` of the case (label maps).
        spec: the classes.
        image: the image on the reference grid, or None.
    """
    from matplotlib.lines import Line2D

    from medseg.eval.evaluate import class_masks

    spacing = masks.ref_volume.spacing_mm
    if spec.regions:
        pred, ref = spec.region_masks(masks.pred), spec.region_masks(masks.ref)
        differ, ref_any, pred_any = (pred != ref).any(axis=-1), ref.any(axis=-1), pred.any(axis=-1)
    else:
        # Class indices: a voxel disagrees when its class differs.
        pred, ref = spec.class_indices(masks.pred), spec.class_indices(masks.ref)
        differ, ref_any, pred_any = pred != ref, ref > 0, pred > 0
    axis, index = busiest_slice((differ, ref_any, pred_any), spacing)
    take = slice_take(axis, index)
    colours = class_colours(spec.names)
    layers, legend, dscs = [], [], []
    pred_slices = dict(class_masks(spec, masks.pred[take]))
    for name, ref_slice in class_masks(spec, masks.ref[take]):
        layers += [(ref_slice, colours[name], "solid"), (pred_slices[name], colours[name], "dashed")]
        if ref_slice.any() or pred_slices[name].any():
            legend.append(Line2D([], [], color=colours[name], linewidth=2, label=name))
            dscs.append(f"{name} {_fmt(case['classes'][name]['metrics']['dsc'], 2)}")
    legend += [Line2D([], [], color="#bbbbbb", linestyle=style, label=text)
               for style, text in (("solid", "reference"), ("dashed", "prediction"))]
    shown = dscs[:6] + (["..."] if len(dscs) > 6 else [])  # the title stays one line
    title = f"{case['case_id']}: array axis {axis}, slice {index}\nDSC " + ", ".join(shown or ["-"])
    return outline_figure_png(title, axis, index, spacing, layers, image=image, legend=legend)


def _image_on_grid(path: Path, ref_volume) -> np.ndarray:
    """The image of a case on the reference grid; display only, so another grid is resampled
    nearest-neighbour."""
    from medseg.eval.evaluate import resample_nearest
    from medseg.io import read_volume

    image = read_volume(path)
    aligned = image.onto_grid_of(ref_volume)
    return aligned.array if aligned is not None else resample_nearest(image, ref_volume)


def draw_case(case: dict, options) -> str:
    """Base64 PNG (:func:`case_figure_png`) of one record of :func:`~medseg.eval.evaluate.evaluate_case`.

    Records hold numbers only, so the masks (and the image) are read again with the same checks.
    """
    from medseg.eval.evaluate import CasePair, read_case

    def path(key: str) -> Path | None:
        return None if case.get(key) is None else Path(case[key])

    pair = CasePair(case["case_id"], Path(case["ref_path"]), path("pred_path"), path("image_path"))
    masks = read_case(pair, options)
    image = None if pair.image_path is None else _image_on_grid(pair.image_path, masks.ref_volume)
    if options.classes is not None:
        return class_figure_png(case, masks, options.classes, image=image)
    return case_figure_png(pair.case_id, masks.pred, masks.ref, masks.ref_volume.spacing_mm, image=image,
                           dsc=case["metrics"]["dsc"])


def case_figures(result, workers: int = 1) -> dict[str, str]:
    """Case id -> base64 PNG of each case of ``result`` ({} when ``result.options.figures`` is off).

    ``workers`` > 1 draws in that many processes (spawned clean, as the evaluation's).
    """
    cases = result.cases
    if not result.options.figures or not cases:
        return {}
    if workers <= 1 or len(cases) == 1:
        pngs = [draw_case(case, result.options) for case in cases]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(int(workers), len(cases)), mp_context=ctx) as pool:
            pngs = list(pool.map(draw_case, cases, [result.options] * len(cases)))
    return {case["case_id"]: png for case, png in zip(cases, pngs)}


def boxplot_png(cases: list[dict], empty_distance: str) -> str:
    """Base64 PNG: one box plot per metric (values after the empty-mask policy), points overlaid."""
    plt = _pyplot()
    shown = catalog.plot_metrics()
    keys = [m.key for m in shown]
    ncols = 3
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.6 * nrows), dpi=90)
    rng = np.random.default_rng(0)  # jitter only; fixed so reports are reproducible
    try:
        for ax, m in zip(np.ravel(axes), shown):
            key = m.key
            values = np.asarray([scored_value(c, key, empty_distance) for c in cases], dtype=np.float64)
            values = values[np.isfinite(values)]
            if values.size:
                ax.boxplot(values, widths=0.5, showfliers=False)
                ax.scatter(1 + rng.uniform(-0.12, 0.12, values.size), values, s=10, color="#1f77b4", alpha=0.7)
            else:
                ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(f"{m.label}  (n={values.size})", fontsize=9)
            ax.set_xticks([])
            ax.tick_params(labelsize=8)
        for ax in np.ravel(axes)[len(keys):]:
            ax.axis("off")
        fig.tight_layout()
        return _png_b64(fig)
    finally:
        plt.close(fig)

