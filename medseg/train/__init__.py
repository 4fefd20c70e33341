"""medseg.train: end-to-end training of the UNet++ lesion segmenter (``medseg-train``).

``train(config) -> RunResult`` runs everything (dataset check, split, plan, model, distributed
``fit`` with whole-volume 3D validation, checkpoints, bundle); see ``docs/train.md``.

Importing this package is light: TensorFlow/Keras load only when ``train`` or a module that
needs them is used (so ``medseg-train --help`` stays fast).
"""

from medseg.train.config import TrainConfig, load_config_file

__all__ = ["TrainConfig", "load_config_file", "train", "RunResult"]


def __getattr__(name):
    if name in ("train", "RunResult"):
        from medseg.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'medseg.train' has no attribute {name!r}")
