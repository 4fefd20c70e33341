"""medseg.transforms: a model's pipeline of dictionary transforms (:mod:`.pipeline`, :mod:`.dictionary`,
:mod:`.registry`; the random steps run per batch by :mod:`.batch`) over array functions (plan space and back, intensity, lesion-aware sampling,
warps, augmentation). Names are imported lazily."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Prepared": "medseg.transforms.planspace",
    "preprocess_image": "medseg.transforms.preprocess",
    "preprocess_label": "medseg.transforms.preprocess",
    "restore": "medseg.transforms.preprocess",
    "Pipeline": "medseg.transforms.pipeline",
    "register_transform": "medseg.transforms.registry",
    "registered_transforms": "medseg.transforms.registry",
    "MapTransform": "medseg.transforms.base",
    "Randomizable": "medseg.transforms.base",
    "Lambdad": "medseg.transforms.base",
    "PatchBatch": "medseg.transforms.batch",
    "run_random": "medseg.transforms.batch",
    "LabelClassesd": "medseg.transforms.dictionary",
    "PlanSpaced": "medseg.transforms.dictionary",
    "BodyMaskd": "medseg.transforms.dictionary",
    "ContextSlicesd": "medseg.transforms.dictionary",
    "NormalizeIntensityd": "medseg.transforms.dictionary",
    "CTWindowd": "medseg.transforms.dictionary",
    "ZScored": "medseg.transforms.dictionary",
    "PercentileClipd": "medseg.transforms.dictionary",
    "ct_window": "medseg.transforms.intensity",
    "zscore": "medseg.transforms.intensity",
    "percentile_clip": "medseg.transforms.intensity",
    "normalize": "medseg.transforms.intensity",
    "context_slices": "medseg.transforms.slicing",
    "PatchSampler": "medseg.transforms.sampling",
    "RandLesionPatchd": "medseg.transforms.dictionary",
    "render": "medseg.transforms.warp",
    "Augmenter": "medseg.transforms.augment",
    "AugmentConfig": "medseg.transforms.augment",
    "RandJointAugmentd": "medseg.transforms.dictionary",
    "RandEnhancementd": "medseg.transforms.dictionary",
    "Enhancement": "medseg.transforms.enhance",
    "RandContrastPhased": "medseg.transforms.phase",
    "PhaseConfig": "medseg.transforms.phase",
    "ContrastPhase": "medseg.transforms.phase",
    "EnhancementConfig": "medseg.transforms.enhance",
    "check_alignment": "medseg.transforms.augment",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'medseg.transforms' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
