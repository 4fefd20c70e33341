"""The parent bundle of a fine-tuning run (``medseg-train --init-from RUN_DIR``): what it keeps.

A fine-tuning run starts from the bundle's weights and keeps what they mean: its network (the
``"network"`` entry, rebuilt with the same arguments), its classes (a ``--labels-map`` or
``dataset.json`` naming others is refused in one line), its preprocessing (the bundle's plan
and saved pipeline: the deterministic steps are the parent's, whatever the new cases would fit;
only the label step takes the run's ``--ignore-label``) and its ``--map-labels`` unless another
is given. The schedule is a fine-tuning one: peak learning rate :data:`FINETUNE_LR`, warm-up
:data:`FINETUNE_WARMUP_STEPS` steps (none; both chosen by measurement, docs/train.md), decaying
over ``--max-time-s`` like any budgeted run; a ``--lr`` or ``--warmup-epochs`` other than the
defaults replaces them. The new bundle records its parent: path and SHA-256 of its
``model.keras`` (:class:`medseg.infer.contract.ParentRecord`).

:func:`medseg.train.finetune.finetune` is the library call a viewer makes on top of it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from medseg.errors import InputError

from medseg.train.schedule import FINETUNE_LR, FINETUNE_WARMUP_STEPS

__all__ = ["FINETUNE_LR", "FINETUNE_WARMUP_STEPS", "fine_tuning_config", "parent_plan", "parent_pipeline",
           "parent_record", "load_parent_weights", "bundle_classes", "check_classes"]

#: Network arguments a training configuration sets (TrainConfig field of each).
_NETWORK_FIELDS = {"filters": "filters", "depth": "depth", "deep_supervision": "deep_supervision",
                   "dropout": "dropout", "l2": "l2"}


def _contract(init_from):
    from medseg.infer.bundle import read_bundle_contract

    return read_bundle_contract(init_from)


def fine_tuning_config(cfg):
    """``cfg`` (a :class:`~medseg.train.config.TrainConfig`, not modified) settled for fine-tuning
    the bundle ``cfg.init_from``: its network settings, no CPU sizing, the fine-tuning learning
    rate unless one was given, the parent's ``map_labels`` unless one was given.

    Raises:
        InputError: naming the bundle: no recorded network, a network the settings cannot rebuild,
            or other context slices than the bundle's.
    """
    from medseg.nets.registry import NetworkSpec
    from medseg.train.config import TrainConfig

    folder, info = _contract(cfg.init_from)
    where = folder / "bundle.json"
    if not info.network:
        raise InputError(where, "a bundle that records its network ('network' in bundle.json, format 2)",
                         "no 'network' entry")
    spec = NetworkSpec.from_dict(info.network)
    changes: dict[str, Any] = {"init_from": os.fspath(folder.resolve()), "network": spec.name, "cpu_sizing": False}
    for arg, name in _NETWORK_FIELDS.items():
        if arg in spec.args:
            value = spec.args[arg]
            changes[name] = list(value) if isinstance(value, (list, tuple)) else value
    defaults = TrainConfig()
    if cfg.lr == defaults.lr:
        changes["lr"] = FINETUNE_LR
    if cfg.map_labels is None and info.training is not None and info.training.map_labels:
        changes["map_labels"] = info.training.map_labels
    context = (cfg.plan or {}).get("context_slices")
    if context is not None and context != info.input_channels:
        raise InputError(where, f"--context-slices {info.input_channels}, the input channels of the bundle's model",
                         f"--context-slices {context}")
    settled = dataclasses.replace(cfg, **changes)
    from medseg.train.assembly import network_spec

    rebuilt = network_spec(settled).to_dict()
    if rebuilt["name"] != spec.name or dict(rebuilt["args"]) != dict(spec.to_dict()["args"]):
        raise InputError(where, f"a network the training settings rebuild exactly ({rebuilt})", str(spec.to_dict()))
    return settled


def bundle_classes(init_from):
    """The :class:`~medseg.io.classes.ClassSpec` of the bundle's plan."""
    from medseg.data.plan import Plan

    _, info = _contract(init_from)
    return Plan.from_dict(info.raw["plan"]).class_spec


def check_classes(cfg, given) -> None:
    """Refuse classes (``labels_map`` or a dataset.json) other than the bundle's, in one line."""
    if given is None:
        return
    parent = bundle_classes(cfg.init_from)
    if given.to_dict() != parent.to_dict() and not (given.any_nonzero and parent.any_nonzero):
        raise InputError(Path(cfg.init_from) / "bundle.json",
                         f"the classes of the bundle being fine-tuned ({', '.join(parent.output_names)})",
                         f"{', '.join(given.output_names)} (--labels-map or dataset.json)")


def parent_plan(cfg, ignore_label):
    """The bundle's plan (its deterministic steps kept), with the run's ignore value."""
    from medseg.data.plan import Plan

    _, info = _contract(cfg.init_from)
    return Plan.from_dict(info.raw["plan"]).replace(ignore_label=ignore_label)


def parent_pipeline(cfg, plan):
    """The bundle's saved pipeline (else the one its plan implies), its label step taking the
    run's ignore value (``plan.ignore_label``)."""
    from medseg.transforms.pipeline import Pipeline

    _, info = _contract(cfg.init_from)
    config = info.raw.get("pipeline")
    if config is None:
        return Pipeline.from_plan(plan, extra=cfg.transforms)
    config = {**config, "transforms": [dict(t, args=dict(t.get("args") or {})) for t in config["transforms"]]}
    for step in config["transforms"]:
        if step.get("name") == "LabelClassesd":
            step["args"].pop("ignore", None)
            if plan.ignore_label is not None:
                step["args"]["ignore"] = plan.ignore_label
    return Pipeline.from_config(config)


def parent_record(cfg) -> dict | None:
    """``{"path", "sha256"}`` of the bundle a fine-tuning run started from (None otherwise): the
    SHA-256 of its ``model.keras`` as read now."""
    if not getattr(cfg, "init_from", None):
        return None
    from medseg.infer.model_file import sha256

    folder, info = _contract(cfg.init_from)
    return {"path": os.fspath(folder.resolve()), "sha256": sha256(folder / info.model_file)}


def load_parent_weights(model, cfg) -> None:
    """Give ``model`` (built from :func:`fine_tuning_config`'s settings) the bundle's weights.

    Raises:
        InputError: naming the bundle's model, when its weights do not fit ``model``.
    """
    from medseg.infer.bundle import load_bundle

    bundle = load_bundle(cfg.init_from)
    weights = bundle.model.get_weights()
    shapes = [tuple(w.shape) for w in model.get_weights()]
    if [tuple(w.shape) for w in weights] != shapes:
        raise InputError(bundle.model_path, f"a model of the network being trained ({len(shapes)} weight arrays)",
                         f"{len(weights)} weight arrays of other shapes")
    model.set_weights(weights)
