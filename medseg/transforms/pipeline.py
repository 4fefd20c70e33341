"""A model's preprocessing: one ordered list of dictionary transforms, saved with the model.

The deterministic steps come first and run in training (once per case, then cached) and at
inference; the random steps follow and run per batch of patches in training only. Inference
maps the predictions back with the exact inverse of the geometric step. The same objects do
both, read back from the bundle (``bundle.json`` ``"pipeline"``), so a model always meets new
images with the preprocessing it was trained with::

    training     Volume ─ deterministic steps ─▶ Prepared (cached) ─ random steps ─▶ batches
    inference    Volume ─ deterministic steps ─▶ Prepared ─ model ─▶ stack ─ inverse ─▶ Volume

Example:
    >>> pipeline = Pipeline.from_plan(plan)                # LabelClassesd, PlanSpaced, ...
    >>> prepared = pipeline.prepare(volume)                # (n, H, W) float32 in plan space
    >>> probs = pipeline.restore(prepared, stack)          # Volume on volume's grid
    >>> Pipeline.from_config(pipeline.to_config())         # JSON round trip
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Protocol, Sequence

import numpy as np

from medseg.io.classes import ClassSpec, LabelKind
from medseg.io.volume import Volume
from medseg.transforms.augment import AugmentConfig, Augmenter
from medseg.transforms.base import Randomizable, case_id_of
from medseg.transforms.dictionary import (BodyMaskd, ContextSlicesd, LabelClassesd, NormalizeIntensityd, PlanSpaced,
                                          RandEnhancementd, RandJointAugmentd, RandLesionPatchd)
from medseg.transforms.registry import transform_config, transform_from_config

__all__ = ["Pipeline", "PIPELINE_FORMAT", "Recipe"]

PIPELINE_FORMAT = 1


def _name(t: Any) -> str:
    return getattr(type(t), "registered_name", type(t).__name__)


def _is_random(t: Any) -> bool:
    return isinstance(t, Randomizable)


class Recipe(Protocol):
    """What :meth:`Pipeline.from_plan` reads of a plan (a :class:`medseg.data.plan.Plan` is one):
    typed here so the pipeline needs no import of the plan's module."""

    num_classes: int
    classes: Mapping[str, Any] | None
    orientation: str
    slice_axis: int
    target_spacing_mm: Sequence[float] | None
    modality: str
    normalization: Mapping[str, Any]
    context_slices: int
    patch_size: Sequence[int]
    lesion_fraction: float
    keep_orientation: bool
    enhancement: Mapping[str, Any] | None

    def enhanced_class_indices(self) -> list[int]: ...


class Pipeline:
    """Ordered dictionary transforms: deterministic ones, then random ones (training only).

    Args:
        transforms: transform objects (registered, see :mod:`medseg.transforms.registry`).

    Raises:
        ValueError: a deterministic transform after a random one, more than one geometric step
            (a transform with an ``invert`` method), or more than one patch sampler.
    """

    def __init__(self, transforms: Iterable[Any]):
        self.transforms = list(transforms)
        first_random = next((i for i, t in enumerate(self.transforms) if _is_random(t)), len(self.transforms))
        late = [_name(t) for t in self.transforms[first_random:] if not _is_random(t)]
        if late:
            raise ValueError(f"deterministic transforms must come before the random ones; found {late} after "
                             f"{_name(self.transforms[first_random])}")
        self.deterministic = self.transforms[:first_random]
        self.random = self.transforms[first_random:]
        geometric = [t for t in self.deterministic if hasattr(t, "invert")]
        if len(geometric) > 1:
            raise ValueError(f"a pipeline has one invertible geometric step, found {[_name(t) for t in geometric]}")
        self.geometry = geometric[0] if geometric else None
        samplers = [t for t in self.random if isinstance(t, RandLesionPatchd)]
        if len(samplers) > 1:
            raise ValueError(f"a pipeline has at most one patch sampler, found {[_name(t) for t in samplers]}")
        self.patches = samplers[0] if samplers else None
        if self.patches is not None and self.random[0] is not self.patches:
            # The random steps run on the batch the sampler draws: none can come before it.
            raise ValueError(f"the random steps run on the patches {_name(self.patches)} draws, so it comes first; "
                             f"found {[_name(t) for t in self.random[:self.random.index(self.patches)]]} before it")

    # --- construction ----------------------------------------------------------------------------
    @classmethod
    def from_plan(cls, plan: Recipe, *, augment: Any = True, extra: Sequence[Any] = (), inside_body: bool = True,
                  lesion_fraction: float | None = None) -> "Pipeline":
        """The pipeline a :class:`medseg.data.plan.Plan` implies, plus a user's own transforms.

        Args:
            plan: the fitted Plan (orientation, slice axis, spacing, normalization, patch, ...).
            augment: True (the default recipe; without flips and quarter turns when the plan's
                ``keep_orientation``), False/None (no augmentation step), an ``AugmentConfig``
                or a dict of its fields (taken as given). A plan's ``enhancement`` adds
                ``RandEnhancementd`` before it (not with False/None).
            extra: transforms (objects or ``{"name", "module", "args", "after"/"before"}``
                entries) inserted after the step named by ``after``/``before``; by default a
                deterministic one goes after ``NormalizeIntensityd`` and a random one at the end.
            inside_body: random patches centred inside the body.
            lesion_fraction: overrides ``plan.lesion_fraction``.
        """
        kind = LabelKind.of(plan.classes)
        steps: list[Any] = [
            LabelClassesd("label", num_classes=plan.num_classes, allow_missing_keys=True, classes=plan.classes,
                          ignore=getattr(plan, "ignore_label", None)),
            PlanSpaced(("image", "label"), orientation=plan.orientation, slice_axis=plan.slice_axis,
                       target_spacing_mm=plan.target_spacing_mm, allow_missing_keys=True),
            BodyMaskd("image", modality=plan.modality, allow_missing_keys=True),
            NormalizeIntensityd("image", plan.normalization, modality=plan.modality, allow_missing_keys=True),
            ContextSlicesd("image", context_slices=plan.context_slices, allow_missing_keys=True),
            RandLesionPatchd(("image", "label"), tuple(plan.patch_size), context_slices=plan.context_slices,
                             lesion_fraction=plan.lesion_fraction if lesion_fraction is None else lesion_fraction,
                             inside_body=inside_body, label_kind=kind),
        ]
        config = _augment_config(augment)
        if augment is True and plan.keep_orientation:
            # Classes on opposite sides of the body: a mirrored patch swaps their places, and
            # reoriented volumes never show a mirrored or upside-down body.
            config = dataclasses.replace(config, flip_prob=0.0, rot90=False)
        enhancement = plan.enhancement
        if config is not None and enhancement is not None:
            window = plan.normalization
            steps.append(RandEnhancementd(("image", "label"), window_hu=(window["low_hu"], window["high_hu"]),
                                          classes=plan.enhanced_class_indices(), num_classes=plan.num_classes,
                                          config=enhancement))
        if config is not None:
            steps.append(RandJointAugmentd(("image", "label"), config=config, label_kind=kind))
        for item in extra:
            _insert(steps, item)
        return cls(steps)

    def to_config(self) -> dict:
        """``{"format": 1, "transforms": [{"name", "module", "args"}, ...]}`` (JSON-ready)."""
        return {"format": PIPELINE_FORMAT, "transforms": [transform_config(t) for t in self.transforms]}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Pipeline":
        """Inverse of :meth:`to_config`.

        Raises:
            ValueError: malformed config, a newer format, or a transform that cannot be rebuilt.
        """
        if not isinstance(config, Mapping) or not isinstance(config.get("transforms"), list):
            raise ValueError(f"a pipeline config is a mapping with a 'transforms' list, found {config!r:.200}")
        if int(config.get("format", PIPELINE_FORMAT)) > PIPELINE_FORMAT:
            raise ValueError(f"pipeline format {config['format']} is newer than this medseg reads ({PIPELINE_FORMAT})")
        return cls(transform_from_config(entry) for entry in config["transforms"])

    def without_random(self) -> "Pipeline":
        """The deterministic steps only (what inference runs)."""
        return Pipeline(self.deterministic)

    # --- running ---------------------------------------------------------------------------------
    def preprocess(self, sample: Mapping[str, Any], *, training: bool = False) -> dict:
        """Run the deterministic steps on ``sample`` (``{"image": Volume, "label": Volume}``; either
        may be absent); ``training`` also runs the training-only ones (the body mask).

        Raises:
            Whatever a step raises, unchanged (the built-in steps name the case; commands turn
            ``InputError``/``ValueError`` into one line), with a note naming the step and case.
        """
        out = dict(sample)
        for t in self.deterministic:
            if getattr(t, "training_only", False) and not training:
                continue
            try:
                out = t(out)
            except Exception as exc:
                if hasattr(exc, "add_note"):  # Python >= 3.11: tracebacks show the step
                    exc.add_note(f"while applying {t!r} to {case_id_of(out)}")
                raise
        return out

    def prepare(self, volume: Any, *, training: bool = False):
        """One image through the deterministic steps: a :class:`~medseg.transforms.preprocess.Prepared`.

        Raises:
            TypeError: if the steps do not end in plan space (no geometric step).
        """
        prepared = self.preprocess({"image": volume}, training=training).get("image")
        if not hasattr(prepared, "inverse"):
            raise TypeError(f"{self!r} does not take images to plan space (no PlanSpaced step)")
        return prepared

    def restore(self, prepared: Any, stack: np.ndarray):
        """A plan-space stack ``(n, H, W)`` back on the grid ``prepared`` came from (the geometric
        step's exact inverse): a Volume with the input's shape, affine, case id and metadata."""
        if self.geometry is None:
            raise TypeError(f"{self!r} has no geometric step to invert")
        return self.geometry.invert(prepared, stack)

    # --- facts inference relies on ---------------------------------------------------------------
    @property
    def context_slices(self) -> int:
        """Channels of the model input (2.5D neighbouring slices): the ``ContextSlicesd`` step's, else 1."""
        for t in self.deterministic:
            if hasattr(t, "context_slices") and not _is_random(t):
                return int(t.context_slices)
        return 1

    def _named_classes(self) -> Mapping[str, Any] | None:
        """The label step's ``classes`` (None: binary, or no label step)."""
        labels = [t for t in self.deterministic if hasattr(t, "classes") and hasattr(t, "num_classes")]
        return labels[0].classes if labels else None

    @property
    def label_kind(self) -> LabelKind:
        """The :class:`~medseg.io.classes.LabelKind` the label steps make (binary when they name
        no classes; class indices; region bits for nested regions)."""
        return LabelKind.of(self._named_classes())

    @property
    def augmenter(self) -> Augmenter | None:
        """The joint augmentation's :class:`~medseg.transforms.augment.Augmenter` (its config says
        which flips and turns training showed), or None without one."""
        joint = [t for t in self.random if isinstance(t, RandJointAugmentd)]
        return joint[0].augmenter if joint else None

    @property
    def classes(self) -> ClassSpec:
        """The :class:`medseg.io.classes.ClassSpec` of the label step (binary when it names none)."""
        spec = self._named_classes()
        return ClassSpec.binary() if spec is None else ClassSpec.from_dict(spec)

    @property
    def chunkable(self) -> bool:
        """True when every inference step is ``slice_local``: a long volume may then be preprocessed
        chunk by chunk (plus context) with exactly the result of the whole volume."""
        return all(getattr(t, "slice_local", False) for t in self.deterministic
                   if not getattr(t, "training_only", False))

    def background(self, raw_value: float) -> float:
        """The preprocessed value of a raw intensity: the intensity steps on one voxel.

        For chunked inference, which must know the padding value (the preprocessed minimum)
        before it has preprocessed the whole volume. Valid for ``slice_local`` steps: they map
        each voxel on its own, and linear resampling never goes below the input's minimum.
        """
        sample = {"image": Volume(np.full((1, 1, 1), raw_value, dtype=np.float32), np.eye(4), "background")}
        for t in self.deterministic:
            if t is self.geometry or getattr(t, "training_only", False):
                continue
            sample = t(sample)
        return float(np.asarray(sample["image"].array).reshape(-1)[0])

    # --- showing ---------------------------------------------------------------------------------
    def describe(self) -> list[str]:
        """One line per step: number, name, arguments, and when it runs."""
        lines = []
        for i, t in enumerate(self.transforms, 1):
            when = ("random, training" if _is_random(t) else "training only" if getattr(t, "training_only", False)
                    else "training + inference")
            if t is self.geometry:
                when += "; inverted onto the input grid at inference"
            args = ", ".join(f"{k}={v!r}" for k, v in t.get_config().items())
            lines.append(f"{i}. {_name(t)}({args})  [{when}]")
        return lines

    def __len__(self) -> int:
        return len(self.transforms)

    def __repr__(self) -> str:
        return "Pipeline([" + ", ".join(_name(t) for t in self.transforms) + "])"


def _augment_config(augment: Any) -> AugmentConfig | None:
    if augment is None or augment is False:
        return None
    if augment is True:
        return AugmentConfig()
    if isinstance(augment, Augmenter):
        return augment.config
    if isinstance(augment, AugmentConfig):
        return augment
    if isinstance(augment, Mapping):
        return AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in augment.items()})
    raise TypeError(f"augment must be True/False, an AugmentConfig or a dict, found {type(augment).__name__}")


def _insert(steps: list, item: Any) -> None:
    """Insert a user's transform (object or config entry) where its ``after``/``before`` says."""
    after = before = None
    if isinstance(item, Mapping):
        unknown = sorted(set(item) - {"name", "module", "args", "after", "before"})
        if unknown:
            raise ValueError(f"transform entry {item.get('name')!r}: unknown keys {unknown} "
                             f"(known: name, module, args, after, before)")
        after, before = item.get("after"), item.get("before")
        if after and before:
            raise ValueError(f"transform entry {item['name']!r}: give 'after' or 'before', not both")
        item = transform_from_config(item)
    names = [_name(t) for t in steps]
    anchor = after or before
    if anchor:
        if anchor not in names:
            raise ValueError(f"{_name(item)}: no step named {anchor!r} to insert it next to; steps: {names}")
        index = names.index(anchor) + (1 if after else 0)
    elif _is_random(item):
        index = len(steps)
    else:
        index = names.index("NormalizeIntensityd") + 1
    steps.insert(index, item)
