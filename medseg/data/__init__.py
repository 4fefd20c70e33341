"""medseg.data: the Plan (dataset fingerprint), preprocessed-case cache, tf.data pipeline, splits.

Names are imported lazily, so ``import medseg.data`` stays fast and never loads TensorFlow
until :func:`make_dataset` / :func:`dataset_from_folders` is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Plan": "medseg.data.plan",
    "make_plan": "medseg.data.plan",
    "VolumeCache": "medseg.data.cache",
    "BatchMaker": "medseg.data.pipeline",
    "make_dataset": "medseg.data.pipeline",
    "dataset_from_folders": "medseg.data.pipeline",
    "train_val_split": "medseg.data.split",
    "kfold_split": "medseg.data.split",
    "k_fold_splits": "medseg.data.split",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'medseg.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
