"""What a :class:`~medseg.infer.predictor.Predictor` runs and refuses: the bundle's single-output
model, test-time flips, slice padding to the network's multiple, images no model can segment.

Split from :mod:`medseg.infer.predictor` (which re-exports these names).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from medseg.errors import InputError
from medseg.infer.bundle import Bundle

if TYPE_CHECKING:  # pragma: no cover - typing only
    import keras

    from medseg.io.volume import Volume

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


def flip(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
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


def modality_mismatch(plan, volume: "Volume") -> str | None:
    """The warning for ``volume`` when it looks like another modality than ``plan``'s (None when
    it matches, the plan is of several modalities, or the volume's modality cannot be told)."""
    from medseg.transforms.intensity import guess_modality

    expected = str(getattr(plan, "modality", "") or "").upper()
    if not expected or expected == "MIXED":  # a model trained on several modalities: no claim
        return None
    found = guess_modality(volume)
    if not found or found == expected:
        return None
    source = volume.meta.get("source_path") or volume.case_id or "<volume>"
    how = "header" if volume.meta.get("modality") else "intensities"
    return (f"{source}: the model was trained on {expected} but this volume is {found} (from its {how}); "
            "the segmentation is likely wrong")
