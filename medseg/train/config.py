"""Training configuration: defaults, config file (YAML/JSON), command-line overrides.

Precedence, lowest first: the defaults of :class:`TrainConfig`, then a config file
(``--config cfg.yaml``), then the command-line flags that were actually given. The effective
configuration is written to ``config.json`` in the run folder; ``--resume RUN_DIR`` reads it back.

A config file is a mapping of :class:`TrainConfig` field names to values, for example::

    epochs: 200
    batch_size: 12          # per replica
    schedule: cosine
    filters: [16, 32, 64, 128, 256]
    plan:                   # overrides of the automatic preprocessing plan (medseg.data.plan.Plan fields)
      context_slices: 3
      patch_size: [128, 128]
    transforms:             # your own registered transforms, added to the model's pipeline
      - {name: ClipStackd, module: my_transforms, args: {keys: image, low: -3, high: 3},
         after: NormalizeIntensityd}
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from medseg.errors import InputError

SCHEDULES = ("poly", "cosine", "constant")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
LOSSES = ("dice_ce", "dice", "ce")
#: Fields that may change when a run is resumed (everything else must match the saved run).
RESUME_MUTABLE = ("epochs", "early_stopping", "val_every", "max_time_s", "max_val_cases", "gpus", "devices",
                  "precision", "workers", "run_eagerly", "images", "labels", "verbose", "debug", "resume")


@dataclass
class TrainConfig:
    """Every choice of a training run; defaults suit lesion segmentation without tuning.

    Attributes:
        images, labels: folders of images and label maps (paired by case id, see
            :func:`medseg.io.dataset.discover_cases`).
        out: parent folder of run folders; a run goes to ``out/<YYYYmmdd-HHMMSS>``.
        run_dir: exact run folder (overrides ``out``); must not hold a previous run.
        resume: run folder to continue (reads its ``config.json`` and last checkpoint).
        epochs: number of epochs; an epoch is ``steps_per_epoch`` optimizer steps.
        steps_per_epoch: optimizer steps per epoch (patches are sampled, so an epoch is a
            fixed number of steps, as in nnU-Net).
        batch_size: patches per replica and step; the global batch is
            ``batch_size * replicas``.
        lr: base learning rate for one replica; scaled linearly with the number of replicas
            (``lr * replicas``, Goyal et al. 2017).
        schedule: ``"poly"`` (``lr * (1 - step/total) ** poly_power``, the user's decay),
            ``"cosine"`` or ``"constant"``; stepped every optimizer step.
        poly_power: exponent of the poly schedule.
        schedule_over: with ``max_time_s``, lay the schedule over the time budget
            (``"budget"``, it ends at the budget) or over ``epochs * steps_per_epoch`` steps
            (``"epochs"``: a truncated schedule, for comparison).
        warmup_epochs: linear warm-up from 0 over this many epochs (helps with large scaled LRs).
        weight_decay: decoupled weight decay of AdamW (0 means plain Adam).
        val_fraction: fraction of patients held out for validation (ignored with ``folds``).
            0 trains on every labelled case and validates on the training cases (labelled so
            everywhere); the model kept is then the last one. A dataset with one labelled case
            is trained this way automatically.
        folds, fold: K-fold cross-validation by patient; train on all folds but ``fold``.
        val_every: validate on whole volumes every N epochs (and after the last epoch).
        early_stopping: stop after this many validations without a better 3D DSC (None: off).
        max_time_s: wall-clock budget in seconds from the start of the run to its last step
            (one final validation may follow); the learning-rate schedule decays over it
            (:mod:`medseg.train.budget`). None: no limit, the schedule follows the epochs.
        gpus: GPU indices to use (None: all visible).
        devices: explicit TensorFlow device names for MirroredStrategy (tests, advanced use).
        precision: ``auto`` | ``float32`` | ``mixed_float16`` | ``mixed_bfloat16``.
        patch_size: training patch (H, W) in plan space (None: from the plan).
        cpu_sizing: with no GPU visible and ``filters``, ``depth``, ``patch_size`` and
            ``batch_size`` left at their defaults, time a few real training steps of candidate
            network widths and take the widest whose step stays near the target
            (:mod:`medseg.train.sizing`); False keeps the paper's network.
        labels_map: several classes at once, ``["liver=5", "spleen=1"]`` (names and label ids;
            :class:`medseg.io.classes.ClassSpec`). None: the ``labels`` of a ``dataset.json`` next
            to the images when it names two or more classes, else binary (any nonzero value).
        map_labels: label values mapped before anything reads the labels, ``"FROM:TO,..."``;
            ``*`` stands for every other value (``"5:1,*:0"``: label 5 is the foreground).
        ignore_label: the label value of unlabelled voxels (partial labels, applied before
            ``map_labels``); None: the label named ``"ignore"`` of a ``dataset.json``, else none.
            They carry no loss, no metric and no sampled patch centre.
        init_from: a bundle's run folder to fine-tune (:mod:`medseg.train.parent`): its
            weights, network, classes and pipeline, on this run's cases, with the fine-tuning
            schedule unless ``lr``/``warmup_epochs`` are given.
        network: the registered network to train (:mod:`medseg.nets.registry`): ``"unetpp"``
            (UNet++, the default) or ``"unet"`` (plain U-Net); recorded in the bundle.
        filters: filters per level (None: ``(32, 64, 128, 256, 512)`` cut to ``depth``).
        depth: network depth (number of down-samplings).
        deep_supervision: train all heads (weighted losses); the bundle keeps the deepest. A
            network of depth 1 has one head: deep supervision is then off. Only for networks
            with deep-supervision heads (UNet++); a plain U-Net ignores it.
        dropout: dropout after each convolution (0: off; BatchNorm regularises enough).
        l2: L2 kernel regularization of each convolution (0: off).
        loss: ``dice_ce`` (default), ``dice`` or ``ce``.
        ce_class_weights: cross-entropy weight of each class, background first (``dice_ce`` and
            ``ce``). None: equal for binary lesion segmentation and nested regions; with several
            classes, the inverse square root of each class's share of the body voxels
            (:func:`medseg.losses.balanced_class_weights`, from the plan), so that a small
            class (the aorta next to the liver) is learned within a CPU budget; the weights used
            are written to the run's config. Give ``1`` for every class for plain cross-entropy.
        seed: seed of the split, weights initialisation and patch sampling.
        workers: parallel calls of the data pipeline (None: tf.data AUTOTUNE).
        max_val_cases: validate on at most this many held-out patients (None: all).
        plan: overrides of the automatic :class:`medseg.data.plan.Plan` fields.
        transforms: a user's own registered transforms added to the model's pipeline, each
            ``{"name", "module", "args", "after" or "before"}`` (:meth:`Pipeline.from_plan`,
            docs/pipeline.md); kept in the bundle and run by inference.
        verbose: Keras progress bar (1), one line per epoch (2) or silent (0).
        run_eagerly: run the training step eagerly (Keras' debugging aid: slow steps, but no
            graph tracing; worth it only for runs of a few steps, such as tests).
        debug: re-raise errors with tracebacks.
    """

    images: str | None = None
    labels: str | None = None
    out: str = "runs"
    run_dir: str | None = None
    resume: str | None = None
    epochs: int = 100
    steps_per_epoch: int = 250
    batch_size: int = 8
    lr: float = 1e-3
    schedule: str = "poly"
    poly_power: float = 0.9
    schedule_over: str = "budget"
    warmup_epochs: int = 0
    weight_decay: float = 0.0
    val_fraction: float = 0.2
    folds: int | None = None
    fold: int | None = None
    val_every: int = 1
    early_stopping: int | None = None
    max_time_s: float | None = None
    gpus: list[int] | None = None
    devices: list[str] | None = None
    precision: str = "auto"
    patch_size: list[int] | None = None
    cpu_sizing: bool = True
    map_labels: str | None = None
    labels_map: list[str] | None = None
    ignore_label: int | None = None
    init_from: str | None = None
    network: str = "unetpp"
    filters: list[int] | None = None
    depth: int = 4
    deep_supervision: bool = True
    dropout: float = 0.0
    l2: float = 0.0
    loss: str = "dice_ce"
    ce_class_weights: list[float] | None = None
    seed: int = 0
    workers: int | None = None
    max_val_cases: int | None = None
    plan: dict[str, Any] = field(default_factory=dict)
    transforms: list[dict[str, Any]] = field(default_factory=list)
    verbose: int = 1
    run_eagerly: bool = False
    debug: bool = False

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str | os.PathLike | None = None) -> "TrainConfig":
        """Build a config from a mapping; unknown keys and wrong types raise :class:`InputError`.

        Args:
            values: field name -> value (``None`` values keep the default).
            source: where the values came from (a file path), named in error messages.
        """
        config = cls()
        config.update(values, source=source)
        return config

    def update(self, values: Mapping[str, Any], *, source: str | os.PathLike | None = None) -> "TrainConfig":
        """Override fields in place with the non-``None`` entries of ``values``; returns self."""
        where = os.fspath(source) if source is not None else "training configuration"
        names = {f.name: f for f in dataclasses.fields(self)}
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise InputError(
                where,
                f"only known settings ({', '.join(sorted(names))})",
                f"unknown setting(s) {', '.join(map(repr, unknown))}",
            )
        hints = typing.get_type_hints(type(self))
        for key, value in values.items():
            if value is None:
                continue
            setattr(self, key, _coerce(key, value, hints[key], where))
        self.validate(source=source)
        return self

    def validate(self, *, source: str | os.PathLike | None = None) -> None:
        """Check value ranges and combinations; raises :class:`InputError` naming the setting."""
        where = os.fspath(source) if source is not None else "training configuration"

        def bad(key: str, expected: str) -> InputError:
            return InputError(where, f"{key} {expected}", repr(getattr(self, key)))

        for key in ("epochs", "steps_per_epoch", "batch_size", "val_every", "depth"):
            if getattr(self, key) < 1:
                raise bad(key, "to be a positive integer")
        if not self.lr > 0:
            raise bad("lr", "to be a positive number")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"to be one of {', '.join(SCHEDULES)}")
        if self.schedule_over not in ("budget", "epochs"):
            raise bad("schedule_over", "to be budget or epochs")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"to be one of {', '.join(PRECISIONS)}")
        if self.loss not in LOSSES:
            raise bad("loss", f"to be one of {', '.join(LOSSES)}")
        from medseg.nets.registry import network_names  # no Keras import: names only

        if self.network not in network_names():
            raise bad("network", f"to be one of {', '.join(network_names())} (registered networks)")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "to be in [0, 1)")
        if self.l2 < 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise InputError(where, "l2, weight_decay and warmup_epochs >= 0",
                             f"{self.l2}, {self.weight_decay}, {self.warmup_epochs}")
        if (self.folds is None) != (self.fold is None):
            raise InputError(where, "folds and fold given together (e.g. --folds 5 --fold 0)",
                             f"folds={self.folds}, fold={self.fold}")
        if self.folds is not None:
            if self.folds < 2 or not 0 <= self.fold < self.folds:
                raise InputError(where, "folds >= 2 and 0 <= fold < folds", f"folds={self.folds}, fold={self.fold}")
        elif not 0.0 <= self.val_fraction < 1.0:
            raise bad("val_fraction", "to be in [0, 1) (0: validate on the training cases)")
        if self.val_fraction == 0 and self.folds is None and self.early_stopping is not None:
            raise InputError(where, "early_stopping only with held-out validation cases (val_fraction > 0)",
                             "val_fraction=0 (validation on the training cases)")
        if self.ce_class_weights is not None and (
                len(self.ce_class_weights) < 2 or any(not 0 <= w < float("inf") for w in self.ce_class_weights)
                or not any(w > 0 for w in self.ce_class_weights)):
            raise bad("ce_class_weights",
                      "to be one finite non-negative number per class (background first), not all 0")
        if self.labels_map is not None:
            from medseg.io.classes import ClassSpec

            try:
                ClassSpec.parse(self.labels_map)
            except InputError as exc:
                raise InputError(where, "labels_map entries NAME=IDS (e.g. liver=5)", str(exc)) from exc
        if self.map_labels is not None or self.ignore_label is not None:
            from medseg.io.labels import parse_label_map, with_ignore

            with_ignore(parse_label_map(self.map_labels) if self.map_labels else None, self.ignore_label)

        if self.patch_size is not None and (len(self.patch_size) != 2 or min(self.patch_size) < 1):
            raise bad("patch_size", "to be two positive integers (H W)")
        if self.patch_size is not None and any(p % 2 ** self.depth for p in self.patch_size):
            raise InputError(where, f"patch_size multiples of 2**depth = {2 ** self.depth}",
                             f"patch_size {list(self.patch_size)} with depth {self.depth}")
        if self.filters is not None and len(self.filters) != self.depth + 1:
            raise InputError(where, f"filters with depth + 1 = {self.depth + 1} values",
                             f"{len(self.filters)} values {list(self.filters)}")
        if self.depth == 1:
            self.deep_supervision = False  # one head: nothing to supervise deeply
        context = self.plan.get("context_slices") if isinstance(self.plan, dict) else None
        if context is not None and (isinstance(context, bool) or not isinstance(context, int) or context < 1
                                    or context % 2 == 0):
            raise InputError(where, "context slices (--context-slices) a positive odd number: the slice itself "
                             "and as many neighbours on each side", repr(context))
        self._validate_run_limits(where)

    def _validate_run_limits(self, where: str) -> None:
        """The limits of a run (early stopping, budget, validation cases), devices, transforms."""
        for key, bad_value, expected in (
                ("early_stopping", self.early_stopping is not None and self.early_stopping < 1,
                 "to be a positive number of validations"),
                ("max_time_s", self.max_time_s is not None and not self.max_time_s > 0,
                 "to be a positive number of seconds"),
                ("max_val_cases", self.max_val_cases is not None and self.max_val_cases < 1,
                 "to be a positive integer")):
            if bad_value:
                raise InputError(where, f"{key} {expected}", repr(getattr(self, key)))
        if self.gpus is not None and self.devices is not None:
            raise InputError(where, "either gpus or devices", f"both gpus={self.gpus} and devices={self.devices}")
        for entry in self.transforms:
            if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
                raise InputError(where, "transforms: a list of {name, module, args, after/before} mappings",
                                 repr(entry))

    # --- derived values -------------------------------------------------------------------
    @property
    def unet_filters(self) -> list[int]:
        """Filters per level: ``filters`` or the paper's ``32 * 2**level`` cut to ``depth + 1``."""
        if self.filters is not None:
            return list(self.filters)
        return [min(32 * 2**level, 512) for level in range(self.depth + 1)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the config as JSON, atomically."""
        from medseg.train.checkpoint import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON config file into a dict.

    Raises:
        InputError: the file is missing, does not parse, or is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "a YAML or JSON config file", "no such file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError: report where and why
        raise InputError(path, "valid YAML or JSON", f"a parse error: {str(exc).splitlines()[0]}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(path, "a mapping of setting names to values", f"a {type(data).__name__}")
    return data


def _coerce(key: str, value: Any, hint: Any, where: str) -> Any:
    """Convert a config value to the field's type (YAML gives ints for floats, lists for tuples)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args and typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)) else hint
    origin = typing.get_origin(base)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise TypeError
        if base is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise TypeError
            return int(float(value))
        if base is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if base is str:
            if not isinstance(value, (str, os.PathLike)):
                raise TypeError
            return os.fspath(value)
        if origin is list:
            (item,) = typing.get_args(base)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise TypeError
            return [_coerce(key, v, item, where) for v in value]
        if origin is dict:
            if not isinstance(value, Mapping):
                raise TypeError
            return dict(value)
    except (TypeError, ValueError) as exc:
        name = getattr(base, "__name__", str(base))
        raise InputError(where, f"{key} of type {name}", f"{value!r}") from exc
    return value


def _frozen_namespace() -> dict[str, Any]:
    def unet_filters(self) -> list[int]:
        return TrainConfig.unet_filters.fget(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> Path:
        return TrainConfig.save(self, path)

    def thawed(self) -> TrainConfig:
        """A :class:`TrainConfig` with the same values (a copy the caller may edit)."""
        return TrainConfig(**self.to_dict())

    return {"unet_filters": property(unet_filters), "to_dict": to_dict, "save": save, "thawed": thawed,
            "__doc__": "A run's resolved configuration: the fields of :class:`TrainConfig`, frozen "
                       "(``dataclasses.replace`` makes a changed copy). ``RunResult.config`` and "
                       "``config.json`` hold it. Made by :func:`freeze`."}


#: The frozen twin of :class:`TrainConfig` (same fields, same order, no defaults: made by :func:`freeze`).
RunConfig = dataclasses.make_dataclass(
    "RunConfig", [(f.name, f.type) for f in dataclasses.fields(TrainConfig)], frozen=True,
    namespace={**_frozen_namespace(), "__module__": __name__})


def freeze(config: "TrainConfig | RunConfig") -> "RunConfig":
    """The frozen copy of ``config`` (its list and dict values copied: nothing is shared)."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig)}
    return RunConfig(**{k: _copy_value(v) for k, v in values.items()})


def _copy_value(value: Any) -> Any:
    if isinstance(value, list):
        return [_copy_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy_value(v) for k, v in value.items()}
    return value
