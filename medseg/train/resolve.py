"""Configuration resolution: what a run will actually use, as new values, never an edit.

:func:`resolve_config` merges the layers (defaults < config file < flags; ``resume`` reads the
run's saved ``config.json`` and takes only the settings allowed to change). The run then settles
the values that need the data or the machine (CPU sizing of the network, automatic cross-entropy
class weights, the run folder) with :func:`settled`, which returns the frozen
:class:`~medseg.train.config.RunConfig` that ``config.json`` and ``RunResult.config`` hold.
The caller's configuration is never modified: ``train(cfg)`` twice is the same run twice.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

from medseg.errors import InputError
from medseg.train.config import RESUME_MUTABLE, RunConfig, TrainConfig, freeze
from medseg.train.rundir import CONFIG_FILE

_PATHS = ("images", "labels", "run_dir", "out")


def resolve_config(config: TrainConfig | RunConfig | Mapping[str, Any]) -> TrainConfig:
    """The effective configuration, a new :class:`TrainConfig`; with ``resume``, the run's saved
    one plus the allowed changes. ``config`` itself is left as it was.

    Raises:
        InputError: ``resume`` is not a run folder, or a setting that shapes the model/data was
            changed on resume.
    """
    if isinstance(config, TrainConfig):
        cfg = copy.deepcopy(config)
    elif isinstance(config, RunConfig):
        cfg = config.thawed()
    else:
        cfg = TrainConfig.from_dict(config)
    if not cfg.resume:
        if not cfg.images or not cfg.labels:
            raise InputError(None, "--images and --labels (or --resume RUN_DIR)",
                             f"images={cfg.images!r}, labels={cfg.labels!r}")
        # Absolute paths in config.json: --resume works from any working folder.
        cfg = dataclasses.replace(cfg, **{n: os.path.abspath(getattr(cfg, n)) for n in _PATHS if getattr(cfg, n)})
        if cfg.init_from:  # fine-tuning: the bundle's network, the fine-tuning learning rate
            from medseg.train.parent import fine_tuning_config

            cfg = fine_tuning_config(cfg)
        return cfg
    return _resumed(cfg)


def _resumed(cfg: TrainConfig) -> TrainConfig:
    """The saved configuration of the run ``cfg.resume`` with ``cfg``'s allowed changes."""
    run_dir = Path(cfg.resume).resolve()
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.is_file():
        raise InputError(run_dir, f"a medseg-train run folder holding {CONFIG_FILE}",
                         "a folder without it" if run_dir.is_dir() else "nothing")
    saved = TrainConfig.from_dict(json.loads(saved_path.read_text(encoding="utf-8")), source=saved_path)
    for name in ("images", "labels"):
        path = getattr(saved, name)
        if path and not os.path.isabs(path) and not os.path.exists(path):
            # A run saved by an older medseg with relative paths: relative to where it ran,
            # which is unknown; the run folder's parent is the usual place.
            candidate = run_dir.parent.parent / path
            if candidate.exists():
                saved = dataclasses.replace(saved, **{name: os.fspath(candidate)})
    defaults = TrainConfig()
    changed = []
    for name in TrainConfig.__dataclass_fields__:
        if name in RESUME_MUTABLE or name in ("run_dir", "out"):
            continue
        mine = getattr(cfg, name)
        if mine != getattr(defaults, name) and mine != getattr(saved, name):
            changed.append(f"{name}={mine!r} (run has {getattr(saved, name)!r})")
    if changed:
        allowed = [n for n in RESUME_MUTABLE if n not in ("resume", "debug", "verbose")]
        raise InputError(run_dir, f"only {', '.join(allowed)} to change on resume", "; ".join(changed))
    updates = {n: getattr(cfg, n) for n in RESUME_MUTABLE if getattr(cfg, n) != getattr(defaults, n)}
    merged = dataclasses.replace(saved, **{**updates, "resume": os.fspath(run_dir), "run_dir": os.fspath(run_dir)})
    merged.validate()  # on the new value: validate may settle deep_supervision for depth 1
    return merged


def cpu_sizing_wanted(cfg, strategy) -> bool:
    """CPU-aware network sizing: no GPU in the strategy, the network and batch left at defaults."""
    if not cfg.cpu_sizing or cfg.resume:
        return False
    defaults = TrainConfig()
    if (cfg.filters is not None or cfg.depth != defaults.depth or cfg.patch_size is not None
            or cfg.batch_size != defaults.batch_size or "patch_size" in cfg.plan):
        return False
    try:
        devices = [str(d).lower() for d in strategy.extended.worker_devices]
    except (AttributeError, RuntimeError):  # the default strategy has no device list: one CPU or GPU
        devices = []
    return not any("gpu" in d for d in devices) and not gpus_visible()


def gpus_visible() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_logical_devices("GPU"))


def sized(cfg: TrainConfig, sizing: Mapping[str, Any]) -> TrainConfig:
    """``cfg`` with the network CPU sizing chose (``sizing["chosen"]``: filters, depth)."""
    return dataclasses.replace(cfg, filters=list(sizing["chosen"]["filters"]), depth=int(sizing["chosen"]["depth"]))


def settled(cfg: TrainConfig, *, ce_class_weights, run_dir: Path) -> RunConfig:
    """The frozen configuration of the run: ``cfg`` with its class weights (recorded in
    ``config.json`` so a resume reuses them) and its run folder."""
    return freeze(dataclasses.replace(cfg, ce_class_weights=ce_class_weights, run_dir=os.fspath(run_dir)))


def replan_budget(cfg, saved_state: dict | None):
    """The budget plan of this invocation (:func:`medseg.train.budget.replan`), None without a budget.

    Raises:
        InputError: a resumed run whose budget is already spent.
    """
    if cfg.max_time_s is None:
        return None
    from medseg.train.budget import replan

    saved = (saved_state or {}).get("budget")
    try:
        return replan(cfg.max_time_s, saved)
    except ValueError as exc:
        raise InputError(cfg.resume or cfg.run_dir, "a budget with time left to train", str(exc)) from exc
