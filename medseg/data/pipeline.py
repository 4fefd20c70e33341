"""Training batches for Keras: lesion-aware patches, joint augmentation, ``tf.data``.

Batch ``i`` is a pure function of ``(seed, i)``: its generator is
``np.random.default_rng([seed, i])``. So the stream is the same whatever the number of parallel
workers, and a resumed run that starts at ``start_batch = epoch * steps_per_epoch`` sees exactly
the batches the uninterrupted run would have seen.

Example (a user with their own Keras model)::

    from medseg.data import dataset_from_folders

    ds, plan = dataset_from_folders("imagesTr", "labelsTr", batch_size=16)
    model.fit(ds, steps_per_epoch=250, epochs=100)     # ds yields (image, mask) forever

Each element is ``(images float32 (B, H, W, C), masks int32 (B, H, W))``; masks are class indices.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Iterator

import numpy as np

from medseg.data.cache import VolumeCache
from medseg.transforms.batch import PatchBatch, run_random
from medseg.transforms.pipeline import Pipeline

__all__ = ["BatchMaker", "make_dataset", "dataset_from_folders", "default_workers"]

log = logging.getLogger(__name__)


def default_workers() -> int:
    """Parallel batch builders: a quarter of the CPU cores, 1 to 4.

    Batches are built by Python code holding the GIL between numpy/OpenCV calls, so threads
    beyond a few contend instead of helping; on a 2-core machine two builders were measured
    2x slower than one (``benchmarks/pipeline.py``). Prefetching overlaps the GPU either way.
    """
    return max(1, min(4, (os.cpu_count() or 1) // 4))


class BatchMaker:
    """Builds numpy training batches from a :class:`VolumeCache`: the random steps of the model's
    pipeline, run per batch in their saved order (no TensorFlow needed).

    Batch ``i`` starts as a :class:`~medseg.transforms.batch.PatchBatch` over the cached cases
    with the generator ``np.random.default_rng([seed, i])``; :func:`~medseg.transforms.batch.run_random`
    then calls each random step on it, in order: the pipeline's ``RandLesionPatchd`` draws the
    patch centres, ``RandEnhancementd`` and ``RandJointAugmentd`` draw and apply their changes
    (the spatial one folded into the cut), a user's step gets ``{"image": (B, H, W, C),
    "label": (B, H, W), ...}`` as the steps before it left it.

    Args:
        cache: the preprocessed cases.
        plan: the Plan (used to build the pipeline when ``pipeline`` is None).
        batch_size: patches per batch.
        seed: batch ``i`` uses ``np.random.default_rng([seed, i])``.
        augment: with ``pipeline`` None: True (default recipe), False/None, an
            :class:`~medseg.transforms.augment.Augmenter`, an ``AugmentConfig`` or a dict of its fields.
        lesion_fraction: with ``pipeline`` None, overrides ``plan.lesion_fraction``.
        inside_body: with ``pipeline`` None, random patches centred inside the body.
        release_pages: with a disk cache, drop the memory-mapped pages of each patch's slices as
            soon as it is cut, so resident memory stays flat however large the data.
        pipeline: the model's pipeline (default: the cache's, with the arguments above).

    Raises:
        ValueError: if ``batch_size < 1`` or the pipeline has no patch sampler.
    """

    def __init__(self, cache: VolumeCache, plan: Any, *, batch_size: int = 16, seed: int = 0, augment: Any = True,
                 lesion_fraction: float | None = None, inside_body: bool = True, release_pages: bool = True,
                 pipeline: Pipeline | None = None):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, found {batch_size!r}")
        if pipeline is None:
            pipeline = Pipeline.from_plan(plan, augment=augment, lesion_fraction=lesion_fraction,
                                          inside_body=inside_body)
        if pipeline.patches is None:
            raise ValueError(f"{pipeline!r} has no patch sampler (RandLesionPatchd) to draw training patches")
        self.cache = cache
        self.pipeline = pipeline
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        patches = pipeline.patches
        self.patch_size = tuple(int(v) for v in patches.patch_size)
        self.context_slices = int(patches.context_slices)
        self.sampler = patches.sampler(cache.sources)
        self.release_pages = bool(release_pages) and any(cache.on_disk)
        self.last_params: dict | None = None

    @property
    def augmenter(self):
        """The pipeline's :attr:`~medseg.transforms.pipeline.Pipeline.augmenter` (None without one)."""
        return self.pipeline.augmenter

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(index)])

    def batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch number ``index``: ``(images float32 (B, H, W, C), masks int32 (B, H, W))``."""
        images, masks = self.batch_uint8(index)
        return images, masks.astype(np.int32)

    def batch_uint8(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`batch` with uint8 masks (a quarter of the bytes to hand to TensorFlow)."""
        index = int(index)
        after = self.cache.release_slices if self.release_pages else None
        batch = PatchBatch(self.rng(index), self.batch_size, sources=self.cache.sources, sampler=self.sampler,
                           after_patch=after)
        batch = run_random(self.pipeline.random, batch)
        self.last_params = {"index": index, **batch.params}
        return batch["image"], batch["label"]

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        i = 0
        while True:
            yield self.batch(i)
            i += 1


def make_dataset(cases_or_cache: VolumeCache | Iterable[Any], plan: Any, *, batch_size: int = 16, seed: int = 0,
                 augment: Any = True, start_batch: int = 0, num_batches: int | None = None,
                 num_parallel_calls: int | None = None, prefetch: int | None = None,
                 cache: str = "auto", cache_dir: str | os.PathLike | None = None,
                 lesion_fraction: float | None = None, inside_body: bool = True, pipeline: Any = None):
    """A ``tf.data.Dataset`` of ``(images (B, H, W, C) float32, masks (B, H, W) int32)``.

    Args:
        cases_or_cache: a :class:`VolumeCache`, or cases to build one from (see
            :class:`VolumeCache`; ``cache`` and ``cache_dir`` are passed on).
        plan: the :class:`medseg.data.plan.Plan`.
        batch_size: patches per element.
        seed: stream seed (deterministic: same seed, same batches, any parallelism).
        augment: see :class:`BatchMaker`.
        start_batch: index of the first batch (resume: ``epoch * steps_per_epoch``).
        num_batches: number of batches, or None for an endless stream (use ``steps_per_epoch``).
        num_parallel_calls: parallel batch builders (default :func:`default_workers`).
        prefetch: batches prefetched (default ``tf.data.AUTOTUNE``).
        lesion_fraction: overrides ``plan.lesion_fraction``.
        inside_body: random patches centred inside the body.
        pipeline: the model's :class:`~medseg.transforms.pipeline.Pipeline` (default: built from
            ``plan`` and the arguments above); its deterministic steps fill the cache, its random
            steps make the batches.

    Returns:
        The dataset; ``dataset.batch_maker`` is the underlying :class:`BatchMaker` (its
        ``last_params`` holds what the last built batch drew).
    """
    import tensorflow as tf

    if not isinstance(cases_or_cache, VolumeCache):
        cases_or_cache = VolumeCache(cases_or_cache, plan, mode=cache, cache_dir=cache_dir, seed=seed,
                                     pipeline=pipeline)
    maker = BatchMaker(cases_or_cache, plan, batch_size=batch_size, seed=seed, augment=augment,
                       lesion_fraction=lesion_fraction, inside_body=inside_body, pipeline=pipeline)
    ph, pw = maker.patch_size
    stop = start_batch + num_batches if num_batches is not None else 2 ** 62
    image_shape = (maker.batch_size, ph, pw, maker.context_slices)
    mask_shape = (maker.batch_size, ph, pw)

    def build(index):
        images, masks = tf.numpy_function(maker.batch_uint8, [index], (tf.float32, tf.uint8), stateful=False)
        return tf.ensure_shape(images, image_shape), tf.cast(tf.ensure_shape(masks, mask_shape), tf.int32)

    autotune = tf.data.AUTOTUNE
    ds = tf.data.Dataset.range(int(start_batch), int(stop))
    ds = ds.map(build, num_parallel_calls=num_parallel_calls or default_workers(), deterministic=True)
    ds = ds.prefetch(prefetch if prefetch is not None else autotune)
    ds.batch_maker = maker  # type: ignore[attr-defined]
    return ds


def dataset_from_folders(images: str | os.PathLike, labels: str | os.PathLike | None = None, *, plan: Any = None,
                         plan_overrides: dict | None = None, batch_size: int = 16, seed: int = 0, augment: Any = True,
                         cache: str = "auto", cache_dir: str | os.PathLike | None = None, **kwargs: Any):
    """Folders of volumes -> ``(tf.data.Dataset, Plan)`` in one call.

    Args:
        images: folder of images (NIfTI, NRRD, MHA, DICOM folders; nnU-Net ``_0000`` names work).
        labels: folder of lesion masks (default: pairs found by :func:`medseg.io.discover_cases`,
            e.g. ``dataset.json``).
        plan: a Plan to use (e.g. ``Plan.load("plan.json")``); default: fitted on these cases.
        plan_overrides: fields to override when fitting (``{"patch_size": (128, 128)}``, ...).
        batch_size, seed, augment, cache, cache_dir, **kwargs: see :func:`make_dataset`.

    Raises:
        DatasetError: unpaired files (all listed) or no labelled case.
    """
    from medseg.data.plan import make_plan
    from medseg.errors import DatasetError
    from medseg.io import discover_cases

    cases = [c for c in discover_cases(images, labels) if c.label_path is not None]
    if not cases:
        raise DatasetError(f"no labelled cases found in {images}" + (f" and {labels}" if labels else ""), [])
    if plan is None:
        plan = make_plan(cases, overrides=plan_overrides, seed=seed)
    ds = make_dataset(cases, plan, batch_size=batch_size, seed=seed, augment=augment, cache=cache,
                      cache_dir=cache_dir, **kwargs)
    return ds, plan
