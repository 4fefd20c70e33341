"""medseg.transforms: preprocessing (Plan space and back), dictionary transforms, lesion-aware
patch sampling and joint augmentation. Names are imported lazily."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Prepared": "medseg.transforms.preprocess",
    "preprocess_image": "medseg.transforms.preprocess",
    "preprocess_label": "medseg.transforms.preprocess",
    "restore": "medseg.transforms.preprocess",
    "PlanPreprocessd": "medseg.transforms.preprocess",
    "Compose": "medseg.transforms.compose",
    "MapTransform": "medseg.transforms.compose",
    "Randomizable": "medseg.transforms.compose",
    "Lambdad": "medseg.transforms.compose",
    "Orientationd": "medseg.transforms.spatial",
    "Spacingd": "medseg.transforms.spatial",
    "NormalizeIntensityd": "medseg.transforms.intensity",
    "CTWindowd": "medseg.transforms.intensity",
    "ZScored": "medseg.transforms.intensity",
    "PercentileClipd": "medseg.transforms.intensity",
    "ct_window": "medseg.transforms.intensity",
    "zscore": "medseg.transforms.intensity",
    "percentile_clip": "medseg.transforms.intensity",
    "normalize": "medseg.transforms.intensity",
    "context_slices": "medseg.transforms.slicing",
    "PatchSampler": "medseg.transforms.sampling",
    "RandLesionPatchd": "medseg.transforms.sampling",
    "render": "medseg.transforms.sampling",
    "Augmenter": "medseg.transforms.augment",
    "AugmentConfig": "medseg.transforms.augment",
    "RandJointAugmentd": "medseg.transforms.augment",
    "check_alignment": "medseg.transforms.augment",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'medseg.transforms' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
