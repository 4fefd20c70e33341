"""Volume inference: a bundle's model applied slice by slice to a whole 3D volume.

:class:`Predictor` runs the deterministic steps of the bundle's pipeline (the objects training ran:
:class:`medseg.transforms.pipeline.Pipeline`), runs the model on batches of slices while streaming through
the volume, and maps the foreground probabilities back onto the input's exact grid with the pipeline's
inverse. Nothing here depends on a step or a network by name. :meth:`Predictor.segment` compares each scan
with the training range (:mod:`medseg.infer.range_check`).

Memory, whatever the number of slices: one batch of slices exists at a time (padded to the
network's multiple); the probabilities overwrite the preprocessed slices a few slices behind the
batch being read (no second stack); with slice-local steps only (a CT window, a fixed z-score) the
volume is preprocessed, predicted and restored in chunks of ``chunk_slices`` input slices (plus
their context), with the same result as whole, so peak memory is the input, the output and one
chunk. Per-volume statistics (MR z-score) need the whole volume preprocessed at once.
"""

from __future__ import annotations

import collections
import logging
import math
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from medseg.errors import InputError
from medseg.events import CancelToken, EventSink
from medseg.infer.bundle import Bundle
from medseg.infer.postprocess import clean_mask
from medseg.infer.progress import Progress
from medseg.infer.range_check import report_range
from medseg.infer.slices import (TTA_FLIPS, check_image, flip, inference_model, modality_mismatch, padding_for,
                                 tta_flips)
from medseg.io.classes import LabelKind

if TYPE_CHECKING:  # pragma: no cover - typing only
    import keras

    from medseg.io.volume import Volume

log = logging.getLogger(__name__)

__all__ = ["CHUNK_SLICES", "TTA_FLIPS", "Predictor", "check_image", "inference_model", "padding_for", "tta_flips"]

#: Default chunk length (input slices) for streamed preprocessing: 32 slices of 512 x 512 take
#: about 150 MB of temporaries, whatever the volume's length (4 batches of 8 per chunk).
CHUNK_SLICES = 32


class Predictor:
    """Segment 3D volumes with a bundle's model.

    Args:
        bundle: a loaded :class:`medseg.infer.bundle.Bundle`.
        batch_size: slices per model call (peak memory grows with it, not with the volume).
        tta: test-time augmentation: average the probabilities of the original and the in-plane
            flipped slices the model was trained on (:func:`tta_flips`: H, W and both, 4 model
            calls per batch; only both, the 180-degree turn, after turns without mirroring).

    Raises:
        ValueError: if ``batch_size`` is not a positive integer.
        InputError: ``tta`` for a model trained without flips or turns (every flip would show it
            images it never saw).

    Example:
        >>> predictor = Predictor(load_bundle("runs/unetpp"), batch_size=8)   # doctest: +SKIP
        >>> mask = predictor.segment(read_volume("case.nii.gz"), min_lesion_ml=0.1)   # doctest: +SKIP
        >>> write_volume(mask, "case_seg.nii.gz")   # doctest: +SKIP
    """

    def __init__(self, bundle: Bundle, *, batch_size: int = 8, tta: bool = False):
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, found {batch_size!r}")
        self.bundle, self.plan = bundle, bundle.plan
        #: The deterministic steps of the model's pipeline (bundle.json "pipeline"; bundles written
        #: before it existed get the pipeline their Plan implies, which is what they ran).
        self.pipeline = bundle.inference_pipeline()
        self.batch_size = int(batch_size)
        self.tta = bool(tta)
        #: The flips averaged: the original alone without ``tta``.
        self.flips = tta_flips(bundle) if self.tta else ((),)
        if self.tta and len(self.flips) == 1:
            why = (" (its plan keeps the orientation: its classes lie on opposite sides of the body)"
                   if getattr(self.plan, "keep_orientation", False) else "")
            raise InputError(bundle.run_dir, "a model trained with flips or 180-degree turns (test-time "
                             "augmentation averages over those)", f"a model trained without either{why}",
                             "run without --tta (tta=False)")
        self.model = inference_model(bundle)
        self.context_slices = int(self.pipeline.context_slices)
        self.divisor = int(bundle.divisor)  # the network's (medseg.infer.bundle.resolve_divisor)
        self.num_classes = int(self.model.outputs[0].shape[-1])
        #: Input slices preprocessed at a time when the normalization is voxel-wise (see _parts).
        self.chunk_slices = CHUNK_SLICES
        #: What the labels hold (medseg.io.classes.LabelKind): decides decoding and post-processing.
        self.kind = LabelKind.named(self.pipeline.label_kind)
        self._forward = self._compile()
        self._forward_classes: Callable[[np.ndarray], Any] | None = None
        #: The named classes (medseg.io.classes.ClassSpec); several classes are segmented by
        #: the argmax of their probabilities and written with the dataset's label ids.
        self.classes = self.pipeline.classes
        #: Segmentation decodes every class's probability (argmax, region bits), not a threshold.
        self.multiclass = self.kind.decodes_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        """The foreground classes' names: the bundle's class name for a one-class model
        (``"lesion"`` by default), the named classes (regions) otherwise."""
        if self.multiclass:
            return tuple(self.classes.names)
        return tuple(c for c in self.bundle.classes if c != "background")[-1:] or ("lesion",)

    def __repr__(self) -> str:
        return (f"Predictor(model={self.model.name!r}, run_dir={str(self.bundle.run_dir)!r}, batch_size={self.batch_size}, "
                f"tta={self.tta}, divisor={self.divisor}, context_slices={self.context_slices})")

    # --- the model call ----------------------------------------------------------------------
    def _compile(self) -> Callable[[np.ndarray], Any]:
        """A compiled function (B, Hp, Wp, C) float32 -> (B, Hp, Wp) foreground probability.

        ``tf.function`` with ``reduce_retracing`` (what ``model.predict`` uses): one graph per
        slice size, a generic one after the first retrace, and no Python overhead per layer.
        """
        import tensorflow as tf

        model, kind = self.model, self.kind

        def forward(x):
            # Softmax: every class but the background (P(lesion) for two); regions: the largest sigmoid.
            return kind.foreground(tf.cast(model(x, training=False), tf.float32))

        return tf.function(forward, reduce_retracing=True)

    def _compile_classes(self) -> Callable[[np.ndarray], Any]:
        """As :meth:`_compile`, returning every class's probability ``(B, Hp, Wp, num_classes)``."""
        import tensorflow as tf

        model = self.model
        return tf.function(lambda x: tf.cast(model(x, training=False), tf.float32), reduce_retracing=True)

    def predict_slices(self, x: np.ndarray, *, pad_value: float | None = None, per_class: bool = False,
                       on_call: Callable[[], None] | None = None) -> np.ndarray:
        """Foreground probabilities of one batch of preprocessed slices.

        Pads the slices to a multiple of the network's divisor (centred), runs the model once per
        TTA variant, crops back and averages.

        Args:
            x: ``(B, H, W, context_slices)`` float32 in plan space (:meth:`predict_proba` streams
                batches of ``batch_size``).
            pad_value: value of the padding, in plan space. Training pads patches that reach past
                the image with the case's background (the minimum of its preprocessed volume), so
                the volume methods pass that; None uses the minimum of ``x``.
            per_class: every class's probability ``(B, H, W, num_classes)`` instead of the
                foreground's (multi-class models).
            on_call: called after each model call (one per test-time flip): progress.

        Returns:
            ``(B, H, W)`` float32 in ``[0, 1]``.

        Raises:
            ValueError: if ``x`` is not 4D with ``context_slices`` channels.
        """
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[-1] != self.context_slices:
            raise ValueError(
                f"expected slices (B, H, W, {self.context_slices}), found shape {x.shape}"
            )
        b, h, w, _ = x.shape
        (top, bottom), (left, right) = padding_for(h, self.divisor), padding_for(w, self.divisor)
        padded = None
        if top or bottom or left or right:
            fill = float(x.min()) if pad_value is None else float(pad_value)
            padded = np.full((b, h + top + bottom, w + left + right, x.shape[-1]), fill, dtype=np.float32)
        total = None
        if per_class and self._forward_classes is None:
            self._forward_classes = self._compile_classes()
        forward = self._forward_classes if per_class else self._forward
        for axes in self.flips:
            xi = flip(x, axes)
            if padded is not None:
                padded[:, top : top + h, left : left + w] = xi
                xi = padded
            else:
                xi = np.ascontiguousarray(xi)
            p = np.asarray(forward(xi))[:, top : top + h, left : left + w]
            p = flip(p, axes)
            total = p.copy() if total is None else total + p
            if on_call is not None:
                on_call()
        out = total if len(self.flips) == 1 else total / np.float32(len(self.flips))
        return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)

    # --- volumes -----------------------------------------------------------------------------
    def check_modality(self, volume: "Volume") -> str | None:
        """Warn (log) when ``volume`` looks like another modality than the model was trained on.

        Returns:
            The warning text, or None when the modality matches or cannot be told.
        """
        message = modality_mismatch(self.plan, volume)
        if message is not None:
            log.warning(message)
        return message

    def predict_proba(self, volume: "Volume", *, events: EventSink | None = None,
                      cancel: CancelToken | None = None) -> "Volume":
        """Foreground probability map of ``volume`` on its exact grid.

        Args:
            volume: the image; any orientation and spacing (the Plan's preprocessing is applied).
                A volume with fewer slices than the 2.5D context is padded by repeating its edge
                slices.
            events, cancel: as for :meth:`segment`.

        Returns:
            float32 :class:`Volume` in ``[0, 1]`` with the input's shape, affine, case id and meta.

        Raises:
            RunCancelled: ``cancel`` was cancelled (checked between batches of slices).
        """
        self.check_modality(volume)

        def work(progress: Progress) -> "Volume":
            out: np.ndarray | None = None
            for index, probs in self._parts(volume, progress=progress):
                if index is None:  # the whole volume in one part: no copy
                    out = probs
                    break
                if out is None:
                    out = np.empty(volume.shape, dtype=np.float32)
                out[index] = probs
            return volume.with_array(out)

        return self._run(volume, "probabilities", events, cancel, work)

    def _run(self, volume: "Volume", output: str, events: EventSink | None, cancel: CancelToken | None, work):
        """``work(progress)`` reported as one run (:class:`Progress`): the Predictor keeps no state of it."""
        progress = Progress(events, cancel, str(volume.case_id or ""), len(self.flips))
        settings = {"case_id": progress.case_id, "model": str(self.bundle.run_dir), "output": output,
                    "shape": tuple(int(n) for n in volume.shape), "tta": self.tta, "batch_size": self.batch_size}
        return progress.run(settings, work, lambda result: {"shape": settings["shape"]})

    # --- streaming machinery ---------------------------------------------------------------------
    def _stream(self, prepared, start: int, stop: int, protect: np.ndarray, pad_value: float,
                per_class: bool = False, progress: Progress | None = None) -> np.ndarray:
        """Predict plan-space slices ``[start, stop)`` of ``prepared`` batch by batch.

        Returns a stack shaped like ``prepared.array`` whose slices ``[start, stop)`` hold the
        foreground probabilities (other slices: unspecified). The probabilities overwrite the
        preprocessed slices once no later batch needs them as context (the next batch looks back
        ``context_slices // 2`` slices), so no second stack is allocated. Only done on our own
        writable float32 copy, never on memory shared with ``protect`` (the caller's volume).
        ``per_class``: every class's probability, in a new ``(n, H, W, num_classes)`` stack.
        ``progress``: checked for a cancel before each batch, told of each model call.
        """
        stack = prepared.array
        in_place = (not per_class and stack.dtype == np.float32 and stack.flags.writeable
                    and not np.shares_memory(stack, protect))
        shape = stack.shape + ((self.num_classes,) if per_class else ())
        out = stack if in_place else np.empty(shape, dtype=np.float32)
        reach = self.context_slices // 2 if in_place else 0
        pending: collections.deque[tuple[int, np.ndarray]] = collections.deque()

        def flush(limit: int) -> None:
            # Write the pending probabilities of slices < limit.
            while pending:
                first, probs = pending[0]
                k = min(len(probs), limit - first)
                if k <= 0:
                    return
                out[first : first + k] = probs[:k]
                if k == len(probs):
                    pending.popleft()
                else:
                    pending[0] = (first + k, probs[k:])
                    return

        for begin in range(start, stop, self.batch_size):
            end = min(begin + self.batch_size, stop)
            if progress is not None:
                progress.check()
            pending.append((begin, self.predict_slices(prepared.slices(begin, end), pad_value=pad_value,
                                                       per_class=per_class,
                                                       on_call=None if progress is None else progress.step)))
            flush(end - reach)
        flush(stop)
        return out

    def _chunkable(self, volume: "Volume") -> tuple[int, bool] | None:
        """(input axis that becomes the plan's slice axis, flipped?) when chunks give exact results.

        Chunks are exact when every inference step of the pipeline is ``slice_local`` (geometry:
        reorientation is a permutation, resampling is in-plane only; normalization: CT window or
        fixed values). Per-volume statistics (MR z-score) need the whole volume: None.
        """
        if not self.pipeline.chunkable or self.pipeline.geometry is None:
            return None
        axis, flipped = self.pipeline.geometry.input_slice_axis(volume)
        if volume.shape[axis] <= self.chunk_slices:
            return None
        return axis, flipped

    def _background(self, volume: "Volume") -> float:
        """The preprocessed volume's minimum without preprocessing it all (chunked path): the
        pipeline's value steps applied to the raw minimum (see :meth:`Pipeline.background`)."""
        return self.pipeline.background(float(np.min(volume.array)))

    def _restore(self, prepared, stack: np.ndarray) -> np.ndarray:
        """A plan-space stack back on the input grid: probabilities ``(n, H, W)``, or, from every
        class's ``(n, H, W, C)``, the uint8 class of largest probability on the input grid (each
        class restored linearly, then the argmax: two float volumes at a time, not C)."""
        if stack.ndim == 3:
            return self.pipeline.restore(prepared, stack).array
        # Classes: the argmax of the restored probabilities; regions: each sigmoid at 0.5.
        return self.kind.decode(lambda plane: self.pipeline.restore(prepared, plane).array, stack)

    def _parts(self, volume: "Volume", per_class: bool = False, progress: Progress | None = None):
        """Yield ``(index, probabilities)`` covering ``volume``: ``index`` None for the whole volume,
        else a tuple of slices into the input array (chunks along the input's slice axis).
        ``per_class``: uint8 decoded labels (:meth:`LabelKind.decode`) instead of foreground
        probabilities. ``progress`` learns the number of batches before the first model call.

        Chunks keep peak memory independent of the number of slices: only ``chunk_slices``
        slices (plus their 2.5D context) are preprocessed at a time.
        """
        from medseg.io.volume import Volume

        chunking = self._chunkable(volume)
        voxelwise = self.pipeline.chunkable
        if chunking is None:
            prepared = self.pipeline.prepare(volume)
            # The background value the training cache pads with: the preprocessed minimum.
            # Voxel-wise normalizations take it from the raw minimum, as chunks must (the two
            # differ only by resampling), so results never depend on the chunk length.
            background = (
                self._background(volume) if voxelwise else float(prepared.array.min()) if prepared.array.size else 0.0
            )
            if progress is not None:
                progress.expect(math.ceil(prepared.n_slices / self.batch_size))
            stack = self._stream(prepared, 0, prepared.n_slices, volume.array, background, per_class, progress)
            yield None, self._restore(prepared, stack)
            return
        axis, flipped = chunking
        background = self._background(volume)
        n = volume.shape[axis]
        reach = self.context_slices // 2
        # Whole batches per chunk: the model sees the same batch sizes as without chunks.
        size = max(self.batch_size, self.chunk_slices // self.batch_size * self.batch_size)
        if progress is not None:  # a chunk's plan slices are its input slices (slice-local steps)
            progress.expect(sum(math.ceil((min(f + size, n) - f) / self.batch_size) for f in range(0, n, size)))
        for first in range(0, n, size):
            last = min(first + size, n)
            low, high = max(0, first - reach), min(n, last + reach)  # context from the neighbours
            part = [slice(None)] * 3
            part[axis] = slice(low, high)
            affine = volume.affine.copy()
            affine[:3, 3] += volume.affine[:3, axis] * low  # voxel `low` is the sub-volume's first
            sub = Volume(volume.array[tuple(part)], affine, volume.case_id, volume.meta)
            prepared = self.pipeline.prepare(sub)
            # Plan slices of input indices [first, last): reversed when the axis is flipped.
            begin = (high - last) if flipped else (first - low)
            stack = self._stream(prepared, begin, begin + (last - first), volume.array, background, per_class,
                                 progress)
            restored = self._restore(prepared, stack)
            keep, target = [slice(None)] * 3, [slice(None)] * 3
            keep[axis], target[axis] = slice(first - low, last - low), slice(first, last)
            yield tuple(target), restored[tuple(keep)]
            del prepared, stack, restored, sub

    def check_post_settings(self, threshold: float | None = None, min_lesion_ml: float = 0.0) -> float:
        """Validate post-processing settings; returns the threshold to use (the bundle's if None).

        Raises:
            ValueError: if ``threshold`` is outside ``[0, 1]`` or ``min_lesion_ml`` is negative.
        """
        t = self.bundle.threshold if threshold is None else float(threshold)
        if not (math.isfinite(t) and 0.0 <= t <= 1.0):
            raise ValueError(f"threshold must lie in [0, 1], found {threshold!r}")
        if not (math.isfinite(min_lesion_ml) and min_lesion_ml >= 0):
            raise ValueError(f"min_lesion_ml must be a finite number >= 0, found {min_lesion_ml!r}")
        return t

    def labels_from_proba(
        self,
        probability: "Volume",
        *,
        threshold: float | None = None,
        min_lesion_ml: float = 0.0,
        largest_component: bool | None = None,
    ) -> "Volume":
        """Threshold a probability map and post-process it into a ``uint8`` label volume.

        Args:
            probability: output of :meth:`predict_proba`.
            threshold: lesion where probability ``>= threshold``; None uses the bundle's.
            min_lesion_ml: remove connected lesions smaller than this (ml); 0 keeps all.
            largest_component: keep only the largest connected component; None: the bundle's
                choice (:attr:`largest_component_default`).

        Returns:
            ``uint8`` :class:`Volume` (0 background, 1 lesion) on the probability map's grid.

        Raises:
            ValueError: if ``threshold`` is outside ``[0, 1]`` or ``min_lesion_ml`` is negative.
        """
        t = self.check_post_settings(threshold, min_lesion_ml)
        mask = np.greater_equal(probability.array, t).view(np.uint8)  # bool -> uint8 without a copy
        return probability.with_array(clean_mask(mask, probability.spacing_mm, keep_largest=self._largest(
            largest_component), **self._min_ml(min_lesion_ml)))

    def segment(
        self,
        volume: "Volume",
        *,
        threshold: float | None = None,
        min_lesion_ml: float = 0.0,
        largest_component: bool | None = None,
        events: EventSink | None = None,
        cancel: CancelToken | None = None,
    ) -> "Volume":
        """Label volume (``uint8``, 0 background, 1 lesion) of ``volume`` on its exact grid.

        The same labels as :meth:`predict_proba` followed by :meth:`labels_from_proba`, but the
        probabilities are thresholded part by part, so no float volume of the input's size is
        kept when the preprocessing runs in chunks.

        Args:
            events: receives :class:`~medseg.events.RunStarted`, a
                :class:`~medseg.events.ChunkProgress` per model call (a batch of slices, per
                test-time flip: ``done`` of ``total``), then ``Finished`` (or ``Cancelled`` /
                ``Failed``), on the calling thread.
            cancel: checked between batches of slices; once cancelled the call emits
                ``Cancelled`` and raises :class:`~medseg.events.RunCancelled`, returning nothing.
                The predictor keeps no state of the call: the next call runs as if none came before.
        """
        t = self.check_post_settings(threshold, min_lesion_ml)  # fail before the expensive part
        self.check_modality(volume)
        def work(progress: Progress) -> "Volume":
            labels = (self._segment_classes(volume, min_lesion_ml, largest_component, progress) if self.multiclass
                      else self._segment_binary(volume, t, min_lesion_ml, largest_component, progress))
            report_range(self, volume, labels, events)  # the scan against the training range: a warning event
            return labels

        return self._run(volume, "labels", events, cancel, work)

    def _segment_binary(self, volume: "Volume", t: float, min_lesion_ml: float, largest_component: bool | None,
                        progress: Progress) -> "Volume":
        """One class: the foreground probability at ``t``, part by part, then post-processed."""
        mask = np.empty(volume.shape, dtype=bool)
        for index, probs in self._parts(volume, progress=progress):
            np.greater_equal(probs, t, out=mask if index is None else mask[index])
            del probs
        labels = clean_mask(mask.view(np.uint8), volume.spacing_mm, keep_largest=self._largest(largest_component),
                            **self._min_ml(min_lesion_ml))  # bool -> uint8 view: no copy
        # A named class writes its own label id (``liver=5`` -> 5); the default lesion writes 1.
        spec = self.classes
        return volume.with_array(labels if spec is None else spec.label_ids(labels))

    def _segment_classes(self, volume: "Volume", min_lesion_ml: float, largest_component: bool | None,
                         progress: Progress | None = None) -> "Volume":
        """Several classes: the argmax class per voxel (nested regions: each region's sigmoid at
        0.5), post-processed class by class, written with the dataset's label ids
        (``ClassSpec.label_ids``; regions: ``ClassSpec.resolve_regions``, later regions win)."""
        parts = np.empty(volume.shape, dtype=np.uint8)
        for index, part in self._parts(volume, per_class=True, progress=progress):
            if index is None:
                parts = part
                break
            parts[index] = part
        spec = self.classes
        masks = [self.kind.class_mask(parts, k) for k in range(len(spec.names))]
        for k, name in enumerate(spec.names):
            keep, size_rule = self._largest(largest_component, name), self._min_ml(min_lesion_ml, name)
            if (keep or size_rule["min_ml"] > 0) and masks[k].any():
                masks[k] = clean_mask(masks[k].view(np.uint8), volume.spacing_mm, keep_largest=keep, **size_rule) > 0
        return volume.with_array(self.kind.encode(spec, masks))

    @property
    def largest_component_default(self) -> bool:
        """The bundle's post-processing choice: keep the largest component when training's
        validation showed it helps (``bundle.postprocessing``); False otherwise."""
        return self._largest(None)

    def _min_ml(self, min_lesion_ml: float, class_name: str | None = None) -> dict:
        """``clean_mask``'s size rule: components below ``min_ml`` (ml) are dropped, the caller's
        size or the bundle's, the larger; the bundle's learned rule spares the largest component
        (``spare_largest``: it never empties a class), a size the caller asks for does not."""
        learned = self.bundle.postprocessing.min_component_ml(class_name)
        return {"min_ml": max(float(min_lesion_ml), learned), "spare_largest": learned > float(min_lesion_ml)}

    def _largest(self, largest_component: bool | None, class_name: str | None = None) -> bool:
        """Keep only the largest component? The caller's choice, else the bundle's for class
        ``class_name`` (None: the one class of a one-class model)."""
        if largest_component is not None:
            return bool(largest_component)
        return self.bundle.postprocessing.keeps_largest(class_name)
