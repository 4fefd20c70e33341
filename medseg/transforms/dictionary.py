"""Dictionary transforms: MONAI-style wrappers over the array functions of this package.

Each takes and returns a sample ``{"image": ..., "label": ..., ...}`` (a new mapping; the
caller's is not modified, except that intensity transforms overwrite a :class:`Prepared` stack,
which belongs to the pipeline run that made it). The random ones work on a batch of patches
(:class:`~medseg.transforms.batch.PatchBatch`) and are what training calls, in the pipeline's
order, through :func:`medseg.transforms.batch.run_random`. Every class here is registered by name
(:mod:`medseg.transforms.registry`) and rebuilt from ``get_config()``, so a model's pipeline
(:class:`medseg.transforms.pipeline.Pipeline`) is saved with it.

What a model's pipeline holds, in order (built from the Plan by ``Pipeline.from_plan``):

==========================  =====================================================================
``LabelClassesd``           label values -> class indices (binary: every nonzero value is 1)
``PlanSpaced``              reorient, slice axis first, resample in-plane: Volume -> ``Prepared``
                            ``(n, H, W)`` float32 (image, linear) / uint8 (label, nearest);
                            the only step inference inverts (:meth:`PlanSpaced.invert`)
``BodyMaskd``               training only: the body mask the patch sampler centres patches in
``NormalizeIntensityd``     CT window / z-score / percentiles (the Plan's ``normalization``)
``ContextSlicesd``          2.5D: the number of neighbouring slices fed as channels
``RandLesionPatchd``        random, training: lesion-aware patch centres (the patches are cut
                            when a step first reads them)
``RandEnhancementd``        random, training, CT with several classes: simulated contrast
                            enhancement (each class's HU shifted on its own, soft tissue
                            brightened; :mod:`~medseg.transforms.enhance`)
``RandJointAugmentd``       random, training: flips, rotations, scaling (image and mask
                            together, folded into the cut), then gamma, noise, brightness,
                            contrast (image only)
==========================  =====================================================================

Array functions live apart: :mod:`~medseg.transforms.spatial`, :mod:`~medseg.transforms.intensity`,
:mod:`~medseg.transforms.planspace`, :mod:`~medseg.transforms.sampling`,
:mod:`~medseg.transforms.warp`, :mod:`~medseg.transforms.augment`, :mod:`~medseg.transforms.enhance`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from medseg.io.classes import BINARY, BITS, LabelKind
from medseg.io.classes.kinds import MAX_REGIONS_WITH_IGNORE
from medseg.transforms.augment import AugmentConfig, Augmenter
from medseg.transforms.base import Lambdad, MapTransform, Randomizable
from medseg.transforms.batch import PatchBatch
from medseg.transforms.enhance import Enhancement, EnhancementConfig
from medseg.transforms.intensity import body_mask, check_normalization, normalize, normalize_inplace
from medseg.transforms.planspace import Prepared, label_classes, plan_space_image, plan_space_label, restore
from medseg.transforms.registry import register_transform
from medseg.transforms.sampling import PatchSampler, SampleSource, build_index
from medseg.transforms.slicing import context_offsets
from medseg.transforms.spatial import inplane_grid, reorientation

__all__ = [
    "LabelClassesd",
    "PlanSpaced",
    "BodyMaskd",
    "NormalizeIntensityd",
    "CTWindowd",
    "ZScored",
    "PercentileClipd",
    "ContextSlicesd",
    "RandLesionPatchd",
    "RandEnhancementd",
    "RandJointAugmentd",
    "Lambdad",
]


# --- the steps of a model's pipeline ------------------------------------------------------------
@register_transform
class LabelClassesd(MapTransform):
    """Label values -> uint8 class indices (:func:`medseg.transforms.planspace.label_classes`).

    With ``num_classes == 2`` and no ``classes`` every nonzero value is the lesion (masks stored
    as 0/255 or with several lesion codes work unchanged); with ``classes``
    (:meth:`medseg.io.classes.ClassSpec.to_dict`) the dataset's ids become class indices, or
    region bits for nested regions.

    Raises:
        InputError: NaN, negative values, or values ``>= num_classes`` (names the file).
    """

    slice_local = True

    def __init__(self, keys="label", num_classes: int = 2, allow_missing_keys: bool = True,
                 classes: Mapping[str, Any] | None = None, ignore: int | None = None):
        super().__init__(keys, allow_missing_keys)
        # The label value of unlabelled voxels (--ignore-label): IGNORE_INDEX after this step.
        self.ignore = None if ignore is None else int(ignore)
        if int(num_classes) != num_classes or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, found {num_classes!r}")
        self.num_classes = int(num_classes)
        self.classes = None
        if classes is not None:
            from medseg.io.classes import ClassSpec

            spec = ClassSpec.from_dict(classes)
            if spec.num_classes != self.num_classes:
                raise ValueError(f"num_classes {num_classes} does not fit the classes {list(spec.names)}")
            if spec.regions and len(spec.names) > 8:
                raise ValueError(f"at most 8 nested regions (one bit each), found {len(spec.names)}")
            if spec.regions and self.ignore is not None and len(spec.names) > MAX_REGIONS_WITH_IGNORE:
                raise ValueError(f"at most {MAX_REGIONS_WITH_IGNORE} nested regions with an ignore value, "
                                 f"found {len(spec.names)}")
            self.classes = spec.to_dict()

    def __repr__(self) -> str:
        named = f", classes={self.classes['names']}" if self.classes else ""
        return f"LabelClassesd(keys={self.keys}, num_classes={self.num_classes}{named})"

    def get_config(self) -> dict:
        config = {"keys": list(self.keys), "num_classes": self.num_classes,
                  "allow_missing_keys": self.allow_missing_keys}
        if self.classes is not None:  # binary pipelines read exactly as before classes existed
            config["classes"] = self.classes
        if self.ignore is not None:  # likewise pipelines without an ignore value
            config["ignore"] = self.ignore
        return config

    @property
    def regions(self) -> bool:
        """True when the labels become region bits (nested regions), not class indices."""
        return LabelKind.of(self.classes) is BITS

    def apply(self, value, key):
        source = value.meta.get("source_path") or value.case_id
        return value.with_array(label_classes(np.asarray(value.array), self.num_classes, source, self.classes,
                                              self.ignore))


@register_transform
class PlanSpaced(MapTransform):
    """Volumes -> plan space: reorient to ``orientation`` (exact), put ``slice_axis`` first and
    resample in-plane to ``target_spacing_mm`` (SimpleITK; linear for ``image_keys``, nearest for
    the others). Images become a :class:`Prepared` float32 ``(n, H, W)``, labels a uint8 stack.

    Each slice is resampled on its own, so the result of a sub-volume equals the matching slices
    of the whole (``slice_local``). :meth:`invert` maps a plan-space stack back onto the input's
    exact grid (same shape, affine, case id, metadata).

    Raises:
        ValueError: bad orientation codes, slice axis or spacing (at construction).
    """

    slice_local = True

    def __init__(self, keys=("image", "label"), orientation: str = "RAS", slice_axis: int = 2,
                 target_spacing_mm: Sequence[float] | None = None, image_keys=("image",),
                 allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        reorientation(np.eye(4), (1, 1, 1), orientation)  # validates the axis codes now
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, found {slice_axis!r}")
        if target_spacing_mm is not None:
            inplane_grid((2, 2), (1.0, 1.0), target_spacing_mm)  # validates the target
            target_spacing_mm = tuple(float(v) for v in target_spacing_mm)
        self.orientation = str(orientation).upper()
        self.slice_axis = int(slice_axis)
        self.target_spacing_mm = target_spacing_mm
        self.image_keys = (image_keys,) if isinstance(image_keys, str) else tuple(image_keys)

    def __repr__(self) -> str:
        return (f"PlanSpaced(keys={self.keys}, orientation={self.orientation!r}, slice_axis={self.slice_axis}, "
                f"target_spacing_mm={self.target_spacing_mm})")

    def apply(self, value, key):
        if key in self.image_keys:
            return plan_space_image(value, self.orientation, self.slice_axis, self.target_spacing_mm)
        return plan_space_label(value, self.orientation, self.slice_axis, self.target_spacing_mm)

    def invert(self, prepared: Prepared, stack: np.ndarray):
        """``stack`` ``(n, H, W)`` in plan space -> Volume on ``prepared``'s input grid (see :func:`restore`)."""
        return restore(prepared, stack)

    def input_slice_axis(self, volume) -> tuple[int, bool]:
        """(axis of ``volume``'s array that becomes the slice axis, whether it is reversed)."""
        reo = reorientation(volume.affine, volume.shape, self.orientation)
        # transform[i] = (output axis, +1/-1) of input axis i (nibabel orientation transform).
        axis = int(np.flatnonzero(reo.transform[:, 0] == self.slice_axis)[0])
        return axis, bool(reo.transform[axis, 1] < 0)


@register_transform
class BodyMaskd(MapTransform):
    """Training only: ``Prepared.body``, the body mask in plan space (patches are centred in it).

    Computed before normalization, on the resampled intensities, as the normalization's own body
    statistics are.
    """

    slice_local = True
    training_only = True

    def __init__(self, keys="image", modality: str = "MR", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.modality = str(modality)

    def __repr__(self) -> str:
        return f"BodyMaskd(keys={self.keys}, modality={self.modality!r})"

    def apply(self, value, key):
        return value.replace(body=body_mask(value.array, self.modality))


@register_transform
class ContextSlicesd(MapTransform):
    """2.5D: the model sees ``context_slices`` neighbouring slices as channels
    (:meth:`Prepared.slices`; the edges repeat the edge slice). Copies nothing."""

    slice_local = True

    def __init__(self, keys="image", context_slices: int = 1, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.context_slices = int(context_offsets(context_slices).size)

    def __repr__(self) -> str:
        return f"ContextSlicesd(keys={self.keys}, context_slices={self.context_slices})"

    def apply(self, value, key):
        return value.replace(context_slices=self.context_slices) if isinstance(value, Prepared) else value


# --- intensity ----------------------------------------------------------------------------------
@register_transform
class NormalizeIntensityd(MapTransform):
    """Apply a ``Plan.normalization`` dictionary to Volumes, :class:`Prepared` stacks or arrays.

    A :class:`Prepared` stack is normalized in place (with its body mask when it has one): the
    whole-volume path then holds one float32 stack. It is ``slice_local`` when the normalization
    needs no statistics of the volume (CT window, fixed z-score or percentile values).

    Raises:
        ValueError: from :func:`check_normalization`, at construction.
    """

    def __init__(self, keys, normalization: Mapping[str, Any], modality: str = "MR", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.normalization = check_normalization(normalization)
        self.modality = modality

    def __repr__(self) -> str:
        return f"{type(self).__name__}(keys={self.keys}, normalization={self.normalization})"

    @property
    def slice_local(self) -> bool:  # type: ignore[override]
        norm = self.normalization
        kind = norm["kind"]
        return (kind == "ct_window"
                or (kind == "zscore" and all(norm.get(k) is not None for k in ("mean", "std", "clip_low", "clip_high")))
                or (kind == "percentile" and norm.get("low") is not None and norm.get("high") is not None))

    def get_config(self) -> dict:
        return {"keys": list(self.keys), "normalization": self.normalization, "modality": self.modality,
                "allow_missing_keys": self.allow_missing_keys}

    def apply(self, value, key):
        if isinstance(value, Prepared):
            return value.with_array(normalize_inplace(value.array, self.normalization, modality=self.modality,
                                                      body=value.body))
        if hasattr(value, "with_array"):
            return value.with_array(normalize(value.array, self.normalization, modality=self.modality))
        return normalize(value, self.normalization, modality=self.modality)


@register_transform
class CTWindowd(NormalizeIntensityd):
    """Clip to ``[low_hu, high_hu]`` and scale to [0, 1]."""

    def __init__(self, keys, low_hu: float = -1000.0, high_hu: float = 400.0, allow_missing_keys: bool = False):
        super().__init__(keys, {"kind": "ct_window", "low_hu": low_hu, "high_hu": high_hu}, "CT", allow_missing_keys)

    def get_config(self) -> dict:
        return {"keys": list(self.keys), "low_hu": self.normalization["low_hu"],
                "high_hu": self.normalization["high_hu"], "allow_missing_keys": self.allow_missing_keys}


@register_transform
class ZScored(NormalizeIntensityd):
    """Per-volume z-score over the body after clipping to the body's ``clip_percentiles``."""

    def __init__(self, keys, clip_percentiles=(0.5, 99.5), modality: str = "MR", allow_missing_keys: bool = False):
        super().__init__(keys, {"kind": "zscore", "clip_percentiles": list(clip_percentiles)}, modality,
                         allow_missing_keys)

    def get_config(self) -> dict:
        return {"keys": list(self.keys), "clip_percentiles": list(self.normalization["clip_percentiles"]),
                "modality": self.modality, "allow_missing_keys": self.allow_missing_keys}


@register_transform
class PercentileClipd(NormalizeIntensityd):
    """Clip to the body's ``low_pct``/``high_pct`` percentiles and scale to [0, 1]."""

    def __init__(self, keys, low_pct: float = 0.5, high_pct: float = 99.5, modality: str = "MR",
                 allow_missing_keys: bool = False):
        super().__init__(keys, {"kind": "percentile", "low_pct": low_pct, "high_pct": high_pct}, modality,
                         allow_missing_keys)

    def get_config(self) -> dict:
        return {"keys": list(self.keys), "low_pct": self.normalization["low_pct"],
                "high_pct": self.normalization["high_pct"], "modality": self.modality,
                "allow_missing_keys": self.allow_missing_keys}


# --- random, training: called per batch by medseg.transforms.batch.run_random ----------------
def _require(step: Any, sample: Mapping, keys: Sequence[str]) -> None:
    for key in keys:
        if key not in sample:
            raise KeyError(f"{step!r}: sample has no key {key!r} (keys: {sorted(map(str, sample))})")


@register_transform
class RandLesionPatchd(Randomizable):
    """Lesion-aware patches (like MONAI's ``RandCropByPosNegLabeld``): the first random step.

    On a training batch (:class:`~medseg.transforms.batch.PatchBatch` with its cache's sampler)
    it draws the batch's patch centres and leaves them as a pending cut. On one plan-space
    sample (``sample[keys[0]]`` a float ``(n, H, W)`` stack or a
    :class:`~medseg.transforms.planspace.Prepared`, ``sample[keys[1]]`` the uint8 label) it makes
    a batch of ``num_samples`` patches of that case the same way. Either way the result holds
    ``image`` ``(B, ph, pw, context)`` float32, ``label`` ``(B, ph, pw)`` uint8 and
    ``"patch_centres"``; ``last_params`` the centres.

    Raises:
        KeyError: if the sample lacks a key (names key and transform).
        ValueError: if ``num_samples < 1`` (and see :class:`PatchSampler`).
    """

    def __init__(self, keys: tuple[str, str] = ("image", "label"), patch_size: tuple[int, int] = (256, 256), *,
                 num_samples: int = 4, lesion_fraction: float = 0.5, context_slices: int = 1,
                 inside_body: bool = True, seed: int | None = None, label_kind: LabelKind | str = BINARY):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, found {num_samples!r}")
        self.label_kind = LabelKind.named(label_kind)
        self.keys = tuple(keys)
        self.patch_size = tuple(int(v) for v in patch_size)
        self.num_samples = int(num_samples)
        self.lesion_fraction = float(lesion_fraction)
        self.context_slices = int(context_offsets(context_slices).size)
        self.inside_body = inside_body
        self.rng = np.random.default_rng(seed)
        self.last_params: dict | None = None

    def __repr__(self) -> str:
        return (f"RandLesionPatchd(keys={self.keys}, patch_size={self.patch_size}, num_samples={self.num_samples}, "
                f"lesion_fraction={self.lesion_fraction})")

    def get_config(self) -> dict:
        return {"keys": list(self.keys), "patch_size": list(self.patch_size), "num_samples": self.num_samples,
                "lesion_fraction": self.lesion_fraction, "context_slices": self.context_slices,
                "inside_body": self.inside_body,
                # binary pipelines read exactly as before classes existed; the kind is saved by name
                **({} if self.label_kind is BINARY else {"label_kind": self.label_kind.name})}

    def sampler(self, sources: Sequence[SampleSource]) -> PatchSampler:
        """The batch sampler of these settings over cached cases (built once per cache)."""
        return PatchSampler(sources, self.patch_size, lesion_fraction=self.lesion_fraction,
                            inside_body=self.inside_body)

    def _one_case(self, batch: PatchBatch) -> None:
        """Make ``batch`` draw ``num_samples`` patches of the one plan-space case it holds."""
        _require(self, batch, self.keys)
        image, label = batch[self.keys[0]], np.asarray(batch[self.keys[1]])
        body = getattr(image, "body", None)
        stack = np.asarray(getattr(image, "array", image), dtype=np.float32)
        if stack.shape != label.shape:
            raise ValueError(f"{self!r}: image {stack.shape} and label {label.shape} differ in shape")
        src = SampleSource(stack, label.astype(np.uint8, copy=False),
                           build_index(label, body, label_kind=self.label_kind),
                           float(stack.min()) if stack.size else 0.0, str(getattr(image, "case_id", "")))
        batch.sources, batch.sampler, batch.size = [src], self.sampler([src]), self.num_samples

    def __call__(self, sample: Mapping) -> PatchBatch:
        batch = PatchBatch.of(sample, self.rng)
        if batch.sampler is None:
            self._one_case(batch)
        centres = batch.sampler.draw(batch.size, self.rng)
        batch.cut(self.keys, centres, self.patch_size, self.context_slices, self.label_kind)
        self.last_params = batch.params["centres"] = centres.as_dict()
        batch["patch_centres"] = self.last_params
        return batch


@register_transform
class RandEnhancementd(Randomizable):
    """Simulated contrast enhancement of CT-window patches (:class:`medseg.transforms.enhance.Enhancement`)
    of ``sample[keys[0]]`` (images ``(B, H, W, C)`` in [0, 1]) by the class indices of
    ``sample[keys[1]]`` (``(B, H, W)``).

    On a batch whose patches are not cut yet it runs as soon as they are (its draws are made
    then), so it acts where the cut puts the labels; on ready patches it runs at once. A plain
    dict is not modified (its images are copied).

    Args:
        window_hu: ``(low_hu, high_hu)`` of the pipeline's CT window.
        classes: indices (1..K) of the classes shifted on their own.
        num_classes: outputs including the background.
        config: an :class:`~medseg.transforms.enhance.EnhancementConfig` or a dict of its fields.

    Raises:
        KeyError: if the sample lacks a key (names key and transform).
        ValueError: bad settings (see :class:`~medseg.transforms.enhance.EnhancementConfig`), or
            patches not shaped ``(B, H, W, C)`` / ``(B, H, W)``.
    """

    def __init__(self, keys: Sequence[str] = ("image", "label"), *, window_hu: Sequence[float],
                 classes: Sequence[int], num_classes: int, config: EnhancementConfig | Mapping | None = None,
                 seed: int | None = None):
        self.keys = tuple(keys)
        if isinstance(config, Mapping):
            config = EnhancementConfig.from_dict(config)
        self.enhancement = Enhancement(config or EnhancementConfig(), window_hu, classes, num_classes)
        self.rng = np.random.default_rng(seed)
        self.last_params: dict | None = None

    def __repr__(self) -> str:
        return f"RandEnhancementd(keys={self.keys}, classes={list(self.enhancement.classes)})"

    def get_config(self) -> dict:
        e = self.enhancement
        return {"keys": list(self.keys), "window_hu": list(e.window_hu), "classes": list(e.classes),
                "num_classes": e.num_classes, "config": e.config.to_dict()}

    def _apply(self, batch: PatchBatch) -> None:
        images, masks = batch[self.keys[0]], np.asarray(batch[self.keys[1]])
        if images.ndim != 4 or masks.shape != images.shape[:3]:
            raise ValueError(f"{self!r}: images (B, H, W, C) and masks (B, H, W) expected, found "
                             f"{images.shape} and {masks.shape}")
        params = self.enhancement.draw(images.shape[0], self.rng)
        batch[self.keys[0]] = self.enhancement.apply(images, masks, params)
        self.last_params = batch.params["enhancement"] = params.as_dict()

    def __call__(self, sample: Mapping) -> PatchBatch:
        _require(self, sample, self.keys)
        batch = PatchBatch.of(sample, self.rng, copy_arrays=True)
        if not batch.pending:
            batch[self.keys[0]] = np.asarray(batch[self.keys[0]], dtype=np.float32)
        batch.at_cut(self._apply)
        return batch


@register_transform
class RandJointAugmentd(Randomizable):
    """Joint augmentation of ``sample[keys[0]]`` (images ``(B, H, W, C)``) and ``sample[keys[1]]``
    (masks ``(B, H, W)``): the spatial change (image and mask together), then the intensity change.

    On a batch whose patches are not cut yet the spatial change is folded into the cut (one
    interpolation from the case); on ready patches they are warped
    (:meth:`~medseg.transforms.augment.Augmenter.augment`). Either way it draws the spatial, then
    the intensity parameters from its generator.

    Raises:
        KeyError: if the sample lacks a key (names key and transform).
    """

    def __init__(self, keys: Sequence[str] = ("image", "label"), config: AugmentConfig | Mapping | None = None,
                 seed: int | None = None, label_kind: LabelKind | str = BINARY):
        self.label_kind = LabelKind.named(label_kind)
        self.keys = tuple(keys)
        if isinstance(config, Mapping):
            config = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
        self.augmenter = Augmenter(config)
        self.rng = np.random.default_rng(seed)
        self.last_params: dict | None = None

    def __repr__(self) -> str:
        return f"RandJointAugmentd(keys={self.keys})"

    @property
    def config(self) -> AugmentConfig:
        return self.augmenter.config

    def get_config(self) -> dict:
        # binary pipelines read exactly as before classes existed; the kind is saved by name
        return {"keys": list(self.keys), "config": self.config.to_dict(),
                **({} if self.label_kind is BINARY else {"label_kind": self.label_kind.name})}

    def __call__(self, sample: Mapping) -> PatchBatch:
        _require(self, sample, self.keys)
        batch = PatchBatch.of(sample, self.rng)
        aug, image_key, label_key = self.augmenter, self.keys[0], self.keys[1]
        if batch.pending:
            ph, pw = batch.patch_size
            spatial = aug.draw_spatial(batch.size, self.rng, square=ph == pw)
            batch.fold_spatial(spatial)
            intensity = aug.draw_intensity(batch.size, self.rng, ph * pw * batch.channels)
            images = batch[image_key]  # cut now, warped on the way
            aug.apply_intensity(images, intensity)
            params = {"spatial": spatial.as_dict(), "intensity": intensity.as_dict()}
        else:
            images, masks, params = aug.augment(batch[image_key], batch[label_key], self.rng,
                                                label_kind=self.label_kind)
            batch[image_key], batch[label_key] = images, masks
        batch.params.update(params)
        self.last_params = params
        return batch
