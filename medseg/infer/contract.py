"""The typed contract of ``bundle.json``: what inference obeys, parsed in one place.

:class:`BundleInfo` is the checked content of a ``bundle.json`` (no Keras, no model): the class
names, threshold, post-processing choice (:class:`Postprocessing`), how the model was selected
and validated, its training record (:class:`TrainingRecord`) and its status. Format 2 stores
these as named fields; a format-1 bundle (they lived in the free-form ``"extra"``) is read into
the same value by :meth:`BundleInfo.parse`. ``extra`` stays free-form: nothing in inference reads
it. Format 2 layout (besides the keys of format 1, see :mod:`medseg.infer.bundle`)::

    "format_version": 2,
    "status": "complete",                    # or "cancelled": written when a run was cancelled
    "postprocessing": {"largest_component": {"lesion": {"keep": true, "dsc": 0.71, "dsc_largest_component": 0.74,
                       "cases": 3, "validation": "held-out cases", "reason": "mean 3D DSC on ..."}}},   # or null
    "selection": "best",                     # or "last", or null (not recorded)
    "validation": "held-out cases",          # or "training cases", or null
    "training": {"epoch": 12, "val_dsc_3d": 0.74, "val_hd95_mm": 3.2, "train_cases": [...],
                 "val_cases": [...], "map_labels": null},                                       # or null
    "parent": {"path": "/runs/m0", "sha256": "9f2c..."},     # fine-tuned bundles only (--init-from)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from medseg.errors import InputError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from medseg.nets.registry import NetworkSpec

__all__ = ["BundleInfo", "ComponentChoice", "ParentRecord", "Postprocessing", "TrainingRecord", "SELECTION_TEXT",
           "VALIDATIONS", "STATUSES"]

#: How the saved model was chosen, and the sentence medseg-info shows for it (format 1 stored it).
SELECTION_TEXT = {"best": "best mean 3D validation DSC on held-out cases",
                  "last": "last model (validation on the training cases)"}
#: What the model was validated on.
VALIDATIONS = ("held-out cases", "training cases")
#: ``"cancelled"``: written when the training run was cancelled (a valid, if unfinished, model).
STATUSES = ("complete", "cancelled")
TRAINING_KEYS = ("epoch", "val_dsc_3d", "val_hd95_mm", "train_cases", "val_cases", "map_labels")


def _number(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number or null, found {value!r}")
    return float(value)


@dataclass(frozen=True)
class ComponentChoice:
    """The largest-component choice of one class, made on validation
    (:func:`medseg.infer.postprocess.choose_largest_component`).

    Attributes:
        keep: keep only the largest connected component at inference.
        dsc, dsc_largest_component: mean 3D DSC without / with it (None without a usable case).
        cases: validation cases the means are over; ``validation``: on what; ``reason``: one line.
    """

    keep: bool
    dsc: float | None = None
    dsc_largest_component: float | None = None
    cases: int = 0
    validation: str | None = None
    reason: str = ""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, key: str = "keep") -> "ComponentChoice":
        """From format 2 (``keep``) or from ``choose_largest_component``'s dict (``key="largest_component"``)."""
        if not isinstance(d, Mapping) or not isinstance(d.get(key), bool):
            raise ValueError(f"a largest-component choice needs {key!r}: true or false, found {d!r}")
        cases = d.get("cases", 0)
        if isinstance(cases, bool) or not isinstance(cases, int) or cases < 0:
            raise ValueError(f"cases must be an integer >= 0, found {cases!r}")
        return cls(d[key], _number(d.get("dsc"), "dsc"),
                   _number(d.get("dsc_largest_component"), "dsc_largest_component"), cases,
                   None if d.get("validation") is None else str(d["validation"]), str(d.get("reason") or ""))

    def to_dict(self) -> dict[str, Any]:
        return {"keep": self.keep, "dsc": self.dsc, "dsc_largest_component": self.dsc_largest_component,
                "cases": self.cases, "validation": self.validation, "reason": self.reason}


@dataclass(frozen=True)
class Postprocessing:
    """Post-processing chosen at training time, per foreground class name (empty: none chosen:
    every component kept)."""

    largest_component: Mapping[str, ComponentChoice] = field(default_factory=dict)

    def keeps_largest(self, name: str | None = None) -> bool:
        """Keep class ``name``'s largest component only? ``None``: the one class of a one-class model."""
        if name is None and len(self.largest_component) == 1:
            return next(iter(self.largest_component.values())).keep
        choice = self.largest_component.get(name) if name is not None else None
        return bool(choice is not None and choice.keep)

    @property
    def any_kept(self) -> bool:
        return any(c.keep for c in self.largest_component.values())

    @classmethod
    def from_training(cls, post: Mapping[str, Any] | None, names: tuple[str, ...]) -> "Postprocessing":
        """From what training computes (``medseg/train/loop.py`` ``_postprocessing``, format 1's
        ``extra.postprocessing``): one ``choose_largest_component`` dict for a one-class model
        (given to its class ``names[0]``), or ``{"largest_component": {name: bool}, "classes":
        {name: details}}`` for several.

        Raises:
            ValueError: a malformed mapping.
        """
        if not post:
            return cls()
        if not isinstance(post, Mapping):
            raise ValueError(f"postprocessing must be a mapping, found {post!r}")
        choice = post.get("largest_component")
        if isinstance(choice, bool):
            if len(names) != 1:
                raise ValueError(f"one largest-component choice for {len(names)} classes {list(names)}")
            return cls({names[0]: ComponentChoice.from_dict(post, key="largest_component")})
        if not isinstance(choice, Mapping):
            raise ValueError(f"postprocessing.largest_component must be true/false or a mapping, found {choice!r}")
        details = post.get("classes") or {}
        out = {}
        for name, keep in choice.items():
            detail = dict(details.get(name) or {}, largest_component=keep)
            out[str(name)] = ComponentChoice.from_dict(detail, key="largest_component")
        return cls(out)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "Postprocessing":
        """Inverse of :meth:`to_dict` (None: none chosen)."""
        if d is None:
            return cls()
        if not isinstance(d, Mapping) or not isinstance(d.get("largest_component", {}), Mapping):
            raise ValueError(f'postprocessing must be {{"largest_component": {{name: {{...}}}}}}, found {d!r}')
        return cls({str(k): ComponentChoice.from_dict(v) for k, v in d.get("largest_component", {}).items()})

    def to_dict(self) -> dict[str, Any] | None:
        if not self.largest_component:
            return None
        return {"largest_component": {k: c.to_dict() for k, c in self.largest_component.items()}}


@dataclass(frozen=True)
class TrainingRecord:
    """How the saved model was trained (figures of the saved epoch; informative only)."""

    epoch: int | None = None
    val_dsc_3d: float | None = None
    val_hd95_mm: float | None = None
    train_cases: tuple[str, ...] = ()
    val_cases: tuple[str, ...] = ()
    map_labels: Any = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "TrainingRecord | None":
        """From ``{"epoch", "val_dsc_3d", "val_hd95_mm", "train_cases", "val_cases", "map_labels"}``
        (any subset; other keys ignored); None for None or a mapping with none of them.

        Raises:
            ValueError: a value of the wrong type.
        """
        if d is None or not any(k in d for k in TRAINING_KEYS):
            return None
        if not isinstance(d, Mapping):
            raise ValueError(f"training must be a mapping, found {d!r}")
        epoch = d.get("epoch")
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
            raise ValueError(f"training.epoch must be an integer, found {epoch!r}")
        cases = {}
        for key in ("train_cases", "val_cases"):
            value = d.get(key) or ()
            if isinstance(value, str) or not all(isinstance(c, str) for c in value):
                raise ValueError(f"training.{key} must be a list of case ids, found {value!r}")
            cases[key] = tuple(value)
        return cls(epoch, _number(d.get("val_dsc_3d"), "training.val_dsc_3d"),
                   _number(d.get("val_hd95_mm"), "training.val_hd95_mm"), map_labels=d.get("map_labels"), **cases)

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "val_dsc_3d": self.val_dsc_3d, "val_hd95_mm": self.val_hd95_mm,
                "train_cases": list(self.train_cases), "val_cases": list(self.val_cases),
                "map_labels": self.map_labels}


@dataclass(frozen=True)
class ParentRecord:
    """The bundle a fine-tuned bundle started from (``medseg-train --init-from``): its run
    folder as given, and the SHA-256 of its ``model.keras`` when the fine-tuning began."""

    path: str
    sha256: str

    @classmethod
    def from_dict(cls, d: Any) -> "ParentRecord | None":
        """From ``{"path", "sha256"}``; None for None.

        Raises:
            ValueError: not a mapping of two strings, or a SHA-256 that is not 64 hex digits.
        """
        if d is None:
            return None
        if not isinstance(d, Mapping) or not isinstance(d.get("path"), str) or not isinstance(d.get("sha256"), str):
            raise ValueError(f'parent must be {{"path": str, "sha256": str}} or null, found {d!r}')
        digest = d["sha256"].lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"parent.sha256 must be 64 hexadecimal digits, found {d['sha256']!r}")
        return cls(d["path"], digest)

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "sha256": self.sha256}


def check_choice(value: Any, allowed: tuple[str, ...], what: str) -> str | None:
    """``value`` if it is one of ``allowed`` or None; raises ``ValueError`` naming them otherwise."""
    if value is not None and value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, allowed))} or null, found {value!r}")
    return value


def selection_of(text: Any) -> str | None:
    """Format 1's ``extra.selection`` sentence as ``"best"``/``"last"`` (None when not recorded)."""
    if text is None or text in SELECTION_TEXT:
        return text
    for key, sentence in SELECTION_TEXT.items():
        if str(text) == sentence or str(text).startswith(key):
            return key
    return None


@dataclass(frozen=True)
class BundleInfo:
    """The checked content of a ``bundle.json`` (see the module docstring for format 2).

    Attributes:
        format_version: 1 or 2 (as read; a format-1 bundle's typed fields come from ``extra``).
        classes: output class names, index = channel (``("background", "lesion")``).
        threshold: default threshold on the foreground probability, in ``[0, 1]``.
        head_level: deep-supervision head kept at inference, or None.
        input_channels: channels the model takes (2.5D context slices).
        divisor: as recorded (format 2: the network's, else the plan's; format 1: an LCM of
            both). Inference takes the network's (:func:`medseg.infer.bundle.resolve_divisor`).
        network: the ``"network"`` entry (``{"name", "args"}``) or None.
        status: ``"complete"`` or ``"cancelled"``.
        postprocessing, selection (``"best"``/``"last"``/None), validation
            (:data:`VALIDATIONS` or None), training: what training chose and recorded.
        created, versions, model_file, model_sha256: provenance.
        extra: free-form; never read by inference.
        raw: the whole JSON object (plan and pipeline configs among it).
    """

    format_version: int
    classes: tuple[str, ...]
    threshold: float
    head_level: int | None
    input_channels: int
    divisor: int
    network: Mapping[str, Any] | None = None
    status: str = "complete"
    postprocessing: Postprocessing = field(default_factory=Postprocessing)
    selection: str | None = None
    validation: str | None = None
    training: TrainingRecord | None = None
    created: str | None = None
    versions: Mapping[str, str] = field(default_factory=dict)
    model_file: str = "model.keras"
    model_sha256: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)
    #: Format 1 only: how bundles older than ``"network"`` described their UNet++ (extra.network).
    legacy_network: Any = None
    #: The bundle this one was fine-tuned from (``"parent"``, format 2), or None.
    parent: ParentRecord | None = None

    @property
    def foreground(self) -> tuple[str, ...]:
        """Names of the foreground classes (a softmax's ``classes[1:]``; regions have no background)."""
        return tuple(c for c in self.classes if c != "background")

    @classmethod
    def parse(cls, info: Mapping[str, Any], path: str | Path | None = None) -> "BundleInfo":
        """The typed value of a ``bundle.json`` object whose format and required keys were checked
        (:func:`medseg.infer.bundle.read_bundle_info`).

        Raises:
            InputError: naming ``path``, when a typed field is malformed.
        """
        try:
            return cls._parse(info)
        except (ValueError, TypeError, AttributeError) as exc:
            raise InputError(path, "valid bundle settings", str(exc)) from exc

    @classmethod
    def _parse(cls, info: Mapping[str, Any]) -> "BundleInfo":
        version = int(info.get("format_version", 1))
        extra = info.get("extra") or {}
        if not isinstance(extra, Mapping):
            raise ValueError(f"extra must be a JSON object, found {extra!r}")
        classes = tuple(info["classes"])
        names = tuple(c for c in classes if c != "background")
        if version < 2:  # format 1: what inference obeys lived in the free-form extra
            post = Postprocessing.from_training(extra.get("postprocessing"), names)
            selection, validation = selection_of(extra.get("selection")), extra.get("validation")
            validation = validation if validation in VALIDATIONS else None
            training, status = TrainingRecord.from_dict(extra), "complete"
        else:
            post = Postprocessing.from_dict(info.get("postprocessing"))
            selection = check_choice(info.get("selection"), tuple(SELECTION_TEXT), "selection")
            validation = check_choice(info.get("validation"), VALIDATIONS, "validation")
            training = TrainingRecord.from_dict(info.get("training"))
            status = check_choice(info.get("status", "complete"), STATUSES, "status")
        threshold = float(info["threshold"])
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be a number in [0, 1], found {info['threshold']!r}")
        return cls(version, classes, threshold, info.get("head_level"), int(info["input_channels"]),
                   int(info["divisor"]), info.get("network"), status, post, selection, validation, training,
                   info.get("created"), dict(info.get("versions") or {}), str(info.get("model_file", "model.keras")),
                   info.get("model_sha256"), dict(extra), dict(info),
                   extra.get("network") if version < 2 else None,
                   ParentRecord.from_dict(info.get("parent")) if version >= 2 else None)

    def status_note(self) -> str | None:
        """One line for a bundle written when its training run was cancelled (None when complete)."""
        if self.status == "complete":
            return None
        epoch = self.training.epoch if self.training is not None else None
        at = f" (the model of epoch {epoch})" if epoch is not None else ""
        return f"this bundle was written when its training run was cancelled{at}; it is used as it is"

    def typed_fields(self) -> dict[str, Any]:
        """The format-2 keys of the typed fields, JSON-ready."""
        fields = {"status": self.status, "postprocessing": self.postprocessing.to_dict(), "selection": self.selection,
                  "validation": self.validation, "training": None if self.training is None else self.training.to_dict()}
        if self.parent is not None:
            fields["parent"] = self.parent.to_dict()
        return fields


def typed_fields(classes, *, postprocessing=None, selection=None, validation=None, training=None,
                 status: str = "complete", parent=None) -> dict[str, Any]:
    """The format-2 typed fields of :func:`medseg.infer.bundle.save_bundle`'s arguments, checked.

    ``postprocessing``: a :class:`Postprocessing`, or what training computes
    (:meth:`Postprocessing.from_training`); ``selection``: ``"best"``/``"last"``; ``validation``:
    one of :data:`VALIDATIONS`; ``training``: a :class:`TrainingRecord` or its dict; ``status``:
    one of :data:`STATUSES`.

    Raises:
        ValueError: a value outside those.
    """
    names = tuple(c for c in classes if c != "background")
    if not isinstance(postprocessing, Postprocessing):
        postprocessing = Postprocessing.from_training(postprocessing, names)
    unknown = sorted(set(postprocessing.largest_component) - set(names))
    if unknown:
        raise ValueError(f"postprocessing names classes {unknown} that are not among {list(names)}")
    if training is not None and not isinstance(training, TrainingRecord):
        unknown = sorted(set(training) - set(TRAINING_KEYS))
        if unknown:
            raise ValueError(f"training takes the keys {', '.join(TRAINING_KEYS)}, found {', '.join(unknown)}")
        training = TrainingRecord.from_dict(training) or TrainingRecord()
    fields = {"status": check_choice(status, STATUSES, "status") or "complete",
              "postprocessing": postprocessing.to_dict(),
              "selection": check_choice(selection, tuple(SELECTION_TEXT), "selection"),
              "validation": check_choice(validation, VALIDATIONS, "validation"),
              "training": None if training is None else training.to_dict()}
    if parent is not None:  # fine-tuned bundles only: others read exactly as before
        record = parent if isinstance(parent, ParentRecord) else ParentRecord.from_dict(parent)
        fields["parent"] = record.to_dict()
    return fields


# --- the network and pipeline entries (checked without Keras; built on load) ---------------------
def check_network_entry(entry: Any) -> None:
    """``bundle.json``'s ``"network"`` is absent or ``{"name": <registered>, "args": {...}}``
    (checked without Keras; the arguments are checked when the spec is built)."""
    if entry is None:
        return
    from medseg.nets.registry import network_names

    if not isinstance(entry, dict) or not isinstance(entry.get("args", {}), dict):
        raise ValueError(f'network must be {{"name": ..., "args": {{...}}}}, found {entry!r}')
    if entry.get("name") not in network_names():
        raise ValueError(f"unknown network {entry.get('name')!r}; registered networks: {', '.join(network_names())}")


def read_network(info: Mapping[str, Any], bundle_path: Path) -> "NetworkSpec | None":
    """The recorded network (None for bundles written before ``bundle.json`` named it).

    Raises:
        InputError: naming ``bundle.json``, when the spec is invalid (bad arguments).
    """
    if info.get("network") is None:
        return None
    from medseg.nets.registry import NetworkSpec

    try:
        return NetworkSpec.from_dict(info["network"])
    except ValueError as exc:
        raise InputError(bundle_path, "a registered network and its arguments under 'network'", str(exc)) from exc


def read_pipeline(info: Mapping[str, Any], bundle_path: Path):
    """The bundle's pipeline (None for bundles written before pipelines were saved).

    Raises:
        InputError: naming ``bundle.json``, when a step cannot be rebuilt (e.g. a user's transform
            whose module is not importable here).
    """
    config = info.get("pipeline")
    if config is None:
        return None
    from medseg.transforms.pipeline import Pipeline

    try:
        pipeline = Pipeline.from_config(config)
    except (TypeError, ValueError) as exc:
        raise InputError(bundle_path, "a pipeline of registered transforms under 'pipeline'", str(exc)) from exc
    return pipeline
