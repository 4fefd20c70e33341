"""medseg.train: end-to-end training of a segmenter, UNet++ by default (``medseg-train``).

``train(config, *, events=None, cancel=None) -> RunResult`` runs everything (dataset check,
split, plan, model, distributed ``fit`` with whole-volume 3D validation, checkpoints, bundle);
see ``docs/train.md`` and :mod:`medseg.train.run` for the modules and the rule each one holds.

Importing this package is light: TensorFlow/Keras load only when ``train`` or a module that
needs them is used (so ``medseg-train --help`` stays fast).
"""

from medseg.train.config import RunConfig, TrainConfig, load_config_file

__all__ = ["TrainConfig", "RunConfig", "load_config_file", "train", "RunResult"]


def __getattr__(name):
    if name in ("train", "RunResult"):
        from medseg.train import run

        return getattr(run, name)
    raise AttributeError(f"module 'medseg.train' has no attribute {name!r}")
