"""A Plan's deterministic preprocessing of one volume, and the plan-space arrays it yields.

``preprocess_image`` / ``preprocess_label`` run a Plan's whole deterministic pipeline
(:meth:`medseg.transforms.pipeline.Pipeline.from_plan`) on one volume; ``restore`` maps a stack
of per-slice predictions back onto the volume's own grid. The array functions themselves live
in :mod:`medseg.transforms.planspace` (below the pipeline, so no import circle) and are
re-exported here under their old names.

Example:
    >>> prepared = preprocess_image(volume, plan)
    >>> x = prepared.slices(0, prepared.n_slices)          # (n, H, W, context) float32
    >>> probs = model.predict(x)[..., 1]                   # (n, H, W)
    >>> restore(prepared, probs)                           # Volume on volume's grid
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medseg.io.volume import Volume
from medseg.transforms.pipeline import Pipeline
from medseg.transforms.planspace import (
    SLAB_SLICES,
    Inverse,
    Prepared,
    label_classes,
    plan_geometry,
    plan_space_image,
    plan_space_label,
    restore,
)

__all__ = ["Prepared", "Inverse", "plan_space_image", "plan_space_label", "label_classes", "restore",
           "plan_geometry", "preprocess_image", "preprocess_label", "SLAB_SLICES"]


def preprocess_image(volume: Volume, plan: Any, *, with_body: bool = False) -> Prepared:
    """``volume`` through the deterministic pipeline of ``plan`` (:meth:`Pipeline.from_plan`).

    Args:
        volume: the image.
        plan: a :class:`medseg.data.plan.Plan`.
        with_body: run the training-only steps too (``Prepared.body``, the body mask the patch
            sampler centres random patches in).

    Returns:
        :class:`Prepared` with ``array`` float32 ``(n_slices, H, W)``.
    """
    return Pipeline.from_plan(plan).prepare(volume, training=with_body)


def preprocess_label(volume: Volume, plan: Any) -> np.ndarray:
    """The label map through ``plan``'s pipeline: uint8 class indices ``(n_slices, H, W)``.

    Raises:
        ValueError: from :func:`label_classes`.
    """
    return Pipeline.from_plan(plan).preprocess({"label": volume})["label"]
