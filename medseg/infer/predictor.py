"""Volume inference: a bundle's model applied slice by slice to a whole 3D volume.

:class:`Predictor` runs the deterministic steps of the bundle's pipeline (the objects training
ran: :class:`medseg.transforms.pipeline.Pipeline`), runs the model on batches of slices while
streaming through the volume, and maps the foreground probabilities back onto the input's exact
grid with the pipeline's inverse. Nothing here depends on a step or a network by name.

Memory, whatever the number of slices:

- only one batch of slices exists at a time (padded to the network's multiple);
- the probabilities overwrite the preprocessed slices a few slices behind the batch being read
  (later batches never look further back for their 2.5D context), so no second stack exists;
- with slice-local steps only (e.g. a CT window or a fixed z-score) the volume is preprocessed, predicted
  and restored in chunks of ``chunk_slices`` input slices (plus their context): the result is the
  same as for the whole volume, and peak memory is the input, the output and one chunk.
  Per-volume statistics (MR z-score) need the whole volume preprocessed at once.
"""

from __future__ import annotations

import collections
import logging
import math
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from medseg.errors import InputError
from medseg.infer.bundle import Bundle
from medseg.infer.postprocess import keep_largest_component, remove_small_lesions
from medseg.transforms.intensity import guess_modality

if TYPE_CHECKING:  # pragma: no cover - typing only
    import keras

    from medseg.io.volume import Volume

log = logging.getLogger(__name__)

#: Default chunk length (input slices) for streamed preprocessing: 32 slices of 512 x 512 take
#: about 150 MB of temporaries, whatever the volume's length (4 batches of 8 per chunk).
CHUNK_SLICES = 32
#: Test-time augmentation: in-plane flips of a (B, H, W, C) batch, as array axes to reverse.
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (1,), (2,), (1, 2))


def tta_flips(bundle: Bundle) -> tuple[tuple[int, ...], ...]:
    """The flips of :data:`TTA_FLIPS` the bundle's model saw in training: all four after mirroring
    augmentation; the original and the 180-degree turn (both axes) after quarter turns without
    mirroring; the original alone without either (a plan that keeps the orientation). Bundles
    written before pipelines were saved trained with the full recipe."""
    from medseg.transforms.augment import Augmenter

    if bundle.pipeline is None:
        return TTA_FLIPS
    joint = [t.augmenter.config for t in bundle.pipeline.random if isinstance(getattr(t, "augmenter", None), Augmenter)]
    if not joint:
        return ((),)
    config = joint[0]
    if config.flip_prob > 0:
        return TTA_FLIPS
    return ((), (1, 2)) if config.rot90 else ((),)


def _flip(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    return np.flip(x, axis=axes) if axes else x


def inference_model(bundle: Bundle) -> "keras.Model":
    """The single-output model a :class:`Predictor` runs, as the bundle's network declares it
    (:meth:`medseg.nets.registry.NetworkSpec.inference_model`).

    Without ``bundle.head_level``: the network's final output (a deep-supervision model reduced to
    it, sharing its layers and weights). With it: that deep-supervision head, where the network
    has heads (a UNet++ is pruned to it: smaller, faster, same output as the full model's head).
    A bundle built without a network (``Bundle(network=None)``) gets the one the registry
    recognizes; a model no registered network built runs its last output.

    Raises:
        InputError: if the bundle asks for a head or output the model does not have.
    """
    from medseg.nets.registry import recognize_network, select_output

    model = bundle.model
    network = bundle.network if bundle.network is not None else recognize_network(model)
    if network is None:
        if bundle.head_level is not None:
            raise InputError(bundle.model_path, "a model of a registered network (bundle head_level)",
                             f"outputs {list(model.output_names)} that no registered network declares")
        return select_output(model, model.output_names[-1])
    try:
        return network.inference_model(model, head=bundle.head_level)
    except ValueError as exc:
        expected = network.describe_head(bundle.head_level)
        if bundle.head_level is not None:
            expected += " (bundle head_level)"
        raise InputError(bundle.model_path, expected, str(exc)) from exc


def padding_for(size: int, divisor: int) -> tuple[int, int]:
    """(before, after) padding bringing ``size`` up to the next multiple of ``divisor``, centred.

    Example:
        >>> padding_for(45, 16)   # 45 -> 48
        (1, 2)
    """
    total = (-int(size)) % int(divisor)
    return total // 2, total - total // 2


def check_image(volume: "Volume", path=None) -> None:
    """Refuse an image no model can segment meaningfully, before the model runs.

    Non-finite voxels (NaN, inf) break the normalization (or silently spread NaN); a constant
    image (every voxel one value, e.g. an all-zero export) holds nothing to segment, yet a model
    still returns a "lesion" for it. Costs two reductions over the array, no temporaries.

    Args:
        volume: the image.
        path: named in the error (default: the volume's ``source_path`` or case id).

    Raises:
        InputError: naming the file: the number of NaN and infinite voxels, or the constant value.
    """
    array = volume.array
    if array.size == 0:
        return
    source = path if path is not None else volume.meta.get("source_path") or volume.case_id
    low, high = array.min(), array.max()
    if not (np.isfinite(low) and np.isfinite(high)):
        n_nan, n_inf = int(np.count_nonzero(np.isnan(array))), int(np.count_nonzero(np.isinf(array)))
        raise InputError(
            source, "an image with finite voxel values",
            f"{n_nan} NaN and {n_inf} infinite voxels (of {array.size})",
            "replace them, e.g. by the background value, before segmenting",
        )
    if low == high:
        raise InputError(
            source, "an image with varying intensities",
            f"a constant image (every voxel {float(low):g})",
            "nothing to segment: any result would be meaningless; check how the image was exported",
        )


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
        self.bundle = bundle
        self.plan = bundle.plan
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
        self.divisor = math.lcm(int(bundle.divisor), int(getattr(self.plan, "divisor", 1) or 1))
        self.num_classes = int(self.model.outputs[0].shape[-1])
        #: Input slices preprocessed at a time when the normalization is voxel-wise (see _parts).
        self.chunk_slices = CHUNK_SLICES
        self._forward = self._compile()
        self._forward_classes: Callable[[np.ndarray], Any] | None = None
        #: The named classes (medseg.io.classes.ClassSpec); several classes are segmented by
        #: the argmax of their probabilities and written with the dataset's label ids.
        self.classes = self.pipeline.classes
        self.multiclass = self.pipeline.label_kind in ("classes", "bits")
        self.regions = self.pipeline.label_kind == "bits"

    def __repr__(self) -> str:
        return (
            f"Predictor(model={self.model.name!r}, run_dir={str(self.bundle.run_dir)!r}, batch_size={self.batch_size}, "
            f"tta={self.tta}, divisor={self.divisor}, context_slices={self.context_slices})"
        )

    # --- the model call ----------------------------------------------------------------------
    def _compile(self) -> Callable[[np.ndarray], Any]:
        """A compiled function (B, Hp, Wp, C) float32 -> (B, Hp, Wp) foreground probability.

        ``tf.function`` with ``reduce_retracing`` (what ``model.predict`` uses): one graph per
        slice size, a generic one after the first retrace, and no Python overhead per layer.
        """
        import tensorflow as tf

        model = self.model

        regions = self.pipeline.label_kind == "bits"

        def forward(x):
            probs = tf.cast(model(x, training=False), tf.float32)
            if regions:  # one sigmoid per region: the probability that some region holds
                return tf.reduce_max(probs, axis=-1)
            # Foreground = every class but the background: P(lesion) for the usual 2 classes.
            return tf.reduce_sum(probs[..., 1:], axis=-1)

        return tf.function(forward, reduce_retracing=True)

    def _compile_classes(self) -> Callable[[np.ndarray], Any]:
        """As :meth:`_compile`, returning every class's probability ``(B, Hp, Wp, num_classes)``."""
        import tensorflow as tf

        model = self.model
        return tf.function(lambda x: tf.cast(model(x, training=False), tf.float32), reduce_retracing=True)

    def predict_slices(self, x: np.ndarray, *, pad_value: float | None = None, per_class: bool = False) -> np.ndarray:
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
            xi = _flip(x, axes)
            if padded is not None:
                padded[:, top : top + h, left : left + w] = xi
                xi = padded
            else:
                xi = np.ascontiguousarray(xi)
            p = np.asarray(forward(xi))[:, top : top + h, left : left + w]
            p = _flip(p, axes)
            total = p.copy() if total is None else total + p
        out = total if len(self.flips) == 1 else total / np.float32(len(self.flips))
        return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)

    # --- volumes -----------------------------------------------------------------------------
    def check_modality(self, volume: "Volume") -> str | None:
        """Warn (log) when ``volume`` looks like another modality than the model was trained on.

        Returns:
            The warning text, or None when the modality matches or cannot be told.
        """
        expected = str(getattr(self.plan, "modality", "") or "").upper()
        if not expected or expected == "MIXED":  # a model trained on several modalities: no claim
            return None
        found = guess_modality(volume)
        if not found or found == expected:
            return None
        source = volume.meta.get("source_path") or volume.case_id or "<volume>"
        how = "header" if volume.meta.get("modality") else "intensities"
        message = (
            f"{source}: the model was trained on {expected} but this volume is {found} (from its {how}); "
            "the segmentation is likely wrong"
        )
        log.warning(message)
        return message

    def predict_proba(self, volume: "Volume") -> "Volume":
        """Foreground probability map of ``volume`` on its exact grid.

        Args:
            volume: the image; any orientation and spacing (the Plan's preprocessing is applied).
                A volume with fewer slices than the 2.5D context is padded by repeating its edge
                slices.

        Returns:
            float32 :class:`Volume` in ``[0, 1]`` with the input's shape, affine, case id and meta.
        """
        self.check_modality(volume)
        out: np.ndarray | None = None
        for index, probs in self._parts(volume):
            if index is None:  # the whole volume in one part: no copy
                out = probs
                break
            if out is None:
                out = np.empty(volume.shape, dtype=np.float32)
            out[index] = probs
        return volume.with_array(out)

    # --- streaming machinery ---------------------------------------------------------------------
    def _stream(self, prepared, start: int, stop: int, protect: np.ndarray, pad_value: float,
                per_class: bool = False) -> np.ndarray:
        """Predict plan-space slices ``[start, stop)`` of ``prepared`` batch by batch.

        Returns a stack shaped like ``prepared.array`` whose slices ``[start, stop)`` hold the
        foreground probabilities (other slices: unspecified). The probabilities overwrite the
        preprocessed slices once no later batch needs them as context (the next batch looks back
        ``context_slices // 2`` slices), so no second stack is allocated. Only done on our own
        writable float32 copy, never on memory shared with ``protect`` (the caller's volume).
        ``per_class``: every class's probability, in a new ``(n, H, W, num_classes)`` stack.
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
            pending.append((begin, self.predict_slices(prepared.slices(begin, end), pad_value=pad_value,
                                                       per_class=per_class)))
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
        if self.regions:  # one sigmoid per region, each thresholded on the input grid: region bits
            bits = None
            for r in range(stack.shape[-1]):
                held = self.pipeline.restore(prepared, np.ascontiguousarray(stack[..., r])).array >= np.float32(0.5)
                part = held.astype(np.uint8) << np.uint8(r)
                bits = part if bits is None else bits | part
            return bits
        best = self.pipeline.restore(prepared, np.ascontiguousarray(stack[..., 0])).array
        best = np.array(best, dtype=np.float32)  # our own, writable
        classes = np.zeros(best.shape, np.uint8)
        for c in range(1, stack.shape[-1]):
            p = self.pipeline.restore(prepared, np.ascontiguousarray(stack[..., c])).array
            take = p > best
            classes[take] = c
            np.maximum(best, p, out=best)
        return classes

    def _parts(self, volume: "Volume", per_class: bool = False):
        """Yield ``(index, probabilities)`` covering ``volume``: ``index`` None for the whole volume,
        else a tuple of slices into the input array (chunks along the input's slice axis).
        ``per_class``: uint8 class indices (argmax) instead of foreground probabilities.

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
            stack = self._stream(prepared, 0, prepared.n_slices, volume.array, background, per_class)
            yield None, self._restore(prepared, stack)
            return
        axis, flipped = chunking
        background = self._background(volume)
        n = volume.shape[axis]
        reach = self.context_slices // 2
        # Whole batches per chunk: the model sees the same batch sizes as without chunks.
        size = max(self.batch_size, self.chunk_slices // self.batch_size * self.batch_size)
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
            stack = self._stream(prepared, begin, begin + (last - first), volume.array, background, per_class)
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
        if min_lesion_ml > 0:
            mask = remove_small_lesions(mask, probability.spacing_mm, min_lesion_ml)
        if self._largest(largest_component):
            mask = keep_largest_component(mask)
        return probability.with_array(mask)

    def segment(
        self,
        volume: "Volume",
        *,
        threshold: float | None = None,
        min_lesion_ml: float = 0.0,
        largest_component: bool | None = None,
    ) -> "Volume":
        """Label volume (``uint8``, 0 background, 1 lesion) of ``volume`` on its exact grid.

        The same labels as :meth:`predict_proba` followed by :meth:`labels_from_proba`, but the
        probabilities are thresholded part by part, so no float volume of the input's size is
        kept when the preprocessing runs in chunks.
        """
        t = self.check_post_settings(threshold, min_lesion_ml)  # fail before the expensive part
        self.check_modality(volume)
        if self.multiclass:
            return self._segment_classes(volume, min_lesion_ml, largest_component)
        mask = np.empty(volume.shape, dtype=bool)
        for index, probs in self._parts(volume):
            np.greater_equal(probs, t, out=mask if index is None else mask[index])
            del probs
        labels = mask.view(np.uint8)  # bool -> uint8 without a copy
        if min_lesion_ml > 0:
            labels = remove_small_lesions(labels, volume.spacing_mm, min_lesion_ml)
        if self._largest(largest_component):
            labels = keep_largest_component(labels)
        return volume.with_array(labels)

    def _segment_classes(self, volume: "Volume", min_lesion_ml: float, largest_component: bool | None) -> "Volume":
        """Several classes: the argmax class per voxel (nested regions: each region's sigmoid at
        0.5), post-processed class by class, written with the dataset's label ids
        (``ClassSpec.label_ids``; regions: ``ClassSpec.resolve_regions``, later regions win)."""
        parts = np.empty(volume.shape, dtype=np.uint8)
        for index, part in self._parts(volume, per_class=True):
            if index is None:
                parts = part
                break
            parts[index] = part
        spec = self.classes
        masks = [(parts >> np.uint8(k) & 1).astype(bool) if self.regions else parts == k + 1
                 for k in range(len(spec.names))]
        for k, name in enumerate(spec.names):
            keep = self._largest(largest_component, name)
            if (keep or min_lesion_ml > 0) and masks[k].any():
                cleaned = masks[k].view(np.uint8)
                if min_lesion_ml > 0:
                    cleaned = remove_small_lesions(cleaned, volume.spacing_mm, min_lesion_ml)
                if keep:
                    cleaned = keep_largest_component(cleaned)
                masks[k] = cleaned > 0
        if self.regions:
            return volume.with_array(spec.resolve_regions(np.stack(masks, axis=-1)))
        classes = np.zeros(volume.shape, np.uint8)
        for k, mask in enumerate(masks, 1):
            classes[mask] = k
        return volume.with_array(spec.label_ids(classes))

    @property
    def largest_component_default(self) -> bool:
        """The bundle's post-processing choice: keep the largest component when training's
        validation showed it helps (``bundle.json`` ``extra.postprocessing``); False otherwise."""
        return self._largest(None)

    def _largest(self, largest_component: bool | None, class_name: str | None = None) -> bool:
        """Keep only the largest component? The caller's choice, else the bundle's (per class for
        several classes: ``extra.postprocessing.largest_component`` maps class names to choices)."""
        if largest_component is not None:
            return bool(largest_component)
        extra = (getattr(self.bundle, "info", None) or {}).get("extra") or {}
        choice = (extra.get("postprocessing") or {}).get("largest_component", False)
        if isinstance(choice, Mapping):
            return bool(choice.get(class_name, False))
        return bool(choice)
