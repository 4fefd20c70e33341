"""The model bundle: a run folder holding ``model.keras`` and ``bundle.json``.

``bundle.json`` records everything inference needs besides the weights, so a model always meets
new images with the preprocessing it was trained with::

    {
      "format": "medseg-bundle", "format_version": 2,
      "model_file": "model.keras", "model_sha256": "...",
      "status": "complete",                # or "cancelled" (a run cancelled before its end)
      "plan": {...},                       # medseg.data.plan.Plan.to_dict()
      "classes": ["background", "lesion"],
      "threshold": 0.5,                    # on the foreground probability
      "network": {"name": "unetpp", "args": {...}},   # medseg.nets.registry.NetworkSpec.to_dict()
      "head_level": null,                  # deep-supervision head kept at inference (UNet++: 1..4)
      "divisor": 16,                       # a record of the network's size multiple (see below)
      "input_channels": 3,                 # = plan.context_slices (2.5D)
      "postprocessing": {...} | null,      # typed fields: medseg.infer.contract (BundleInfo)
      "selection": "best" | "last" | null,
      "validation": "held-out cases" | "training cases" | null,
      "training": {"epoch": ..., "val_dsc_3d": ..., ...} | null,
      "versions": {"medseg": ..., "tensorflow": ..., "keras": ..., "numpy": ...},
      "created": "2026-01-01T12:00:00+00:00",
      "extra": {...},                      # free-form; nothing in inference reads it
      "pipeline": {"format": 1, "transforms": [{"name": "PlanSpaced", "module": ..., "args": {...}}, ...]}
                                           # medseg.transforms.pipeline.Pipeline.to_config()
    }

``medseg.train`` writes bundles through :func:`save_bundle`; ``medseg.infer`` reads them with
:func:`load_bundle`; :class:`~medseg.infer.contract.BundleInfo` is the typed value of
``bundle.json``, parsed in one place (format-1 bundles, whose post-processing, selection and
validation lived in ``"extra"``, load into the same value). ``network`` (a registered builder and
its arguments) gives the output to run and the size multiple: the network's divisor is the one
source (:func:`resolve_divisor`); ``"divisor"`` records it for readers without Keras. A bundle
without ``network`` (written before the key existed, or saved without a declaration) falls back
to the registered network that recognizes the model
(:func:`medseg.nets.registry.recognize_network`), else the model runs as saved.

Importing this module has no side effects (Keras and TensorFlow are imported inside the functions).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from medseg.errors import InputError
from medseg.infer.contract import (BundleInfo, Postprocessing, check_network_entry, read_network, read_pipeline,
                                   typed_fields)
from medseg.infer.model_file import check_model_file, load_model, sha256, versions, warn_on_version_change

if TYPE_CHECKING:  # pragma: no cover - typing only
    import keras

    from medseg.data.plan import Plan
    from medseg.nets.registry import NetworkSpec

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
BUNDLE_FILE = "bundle.json"
FORMAT = "medseg-bundle"
FORMAT_VERSION = 2


@dataclass(frozen=True, eq=False)
class Bundle:
    """A loaded model bundle.

    Attributes:
        run_dir: the folder the bundle was read from.
        model: the Keras model as saved (all deep-supervision heads, if any).
        plan: preprocessing plan the model was trained with.
        classes: class names, index = class label (``("background", "lesion")``).
        threshold: default threshold on the foreground probability, in ``[0, 1]``.
        head_level: deep-supervision head used at inference (a pruned UNet++), or None for the
            network's final output.
        divisor: slice height and width are padded to a multiple of this before the model;
            None (default): :func:`resolve_divisor` of ``network`` and ``plan``.
        input_channels: channels the model expects (2.5D context slices).
        info: the whole ``bundle.json`` content, as read (versions, created, extra, ...).
        network: the network that built the model (recorded, or recognized for a bundle without
            one), or None for a model no registered network built (it runs as saved).
        pipeline: the model's :class:`medseg.transforms.pipeline.Pipeline` (``bundle.json``
            ``"pipeline"``), or None for a bundle written before pipelines were saved.
        contract: the typed ``bundle.json`` (post-processing, selection, status...), or None for a
            bundle built in memory (no post-processing chosen, status complete).
    """

    run_dir: Path
    model: "keras.Model"
    plan: "Plan"
    classes: tuple[str, ...] = ("background", "lesion")
    threshold: float = 0.5
    head_level: int | None = None
    divisor: int | None = None
    input_channels: int = 1
    info: Mapping[str, Any] = field(default_factory=dict)
    network: "NetworkSpec | None" = None
    pipeline: Any = None
    contract: BundleInfo | None = None

    def __post_init__(self) -> None:
        if self.divisor is None:
            object.__setattr__(self, "divisor", resolve_divisor(self.network, self.plan))

    @property
    def postprocessing(self) -> Postprocessing:
        """The post-processing chosen at training time (none for a bundle built in memory)."""
        return self.contract.postprocessing if self.contract is not None else Postprocessing()

    @property
    def status(self) -> str:
        """``"complete"``, or ``"cancelled"`` for a bundle written when its training run was cancelled."""
        return self.contract.status if self.contract is not None else "complete"

    @property
    def model_path(self) -> Path:
        return self.run_dir / MODEL_FILE

    def inference_pipeline(self):
        """The deterministic steps inference runs: the saved pipeline's, or (bundles written before
        pipelines were saved) those the Plan implies, which are what such a model was trained with."""
        from medseg.transforms.pipeline import Pipeline

        pipeline = self.pipeline if self.pipeline is not None else Pipeline.from_plan(self.plan)
        return pipeline.without_random()

    def __repr__(self) -> str:
        return (
            f"Bundle(run_dir={str(self.run_dir)!r}, classes={self.classes}, threshold={self.threshold}, "
            f"head_level={self.head_level}, divisor={self.divisor}, input_channels={self.input_channels}, "
            f"network={getattr(self.network, 'name', None)!r}, modality={getattr(self.plan, 'modality', None)!r})"
        )


# --- helpers ---------------------------------------------------------------------------------
def _model_input_channels(model: "keras.Model") -> int:
    shape = model.inputs[0].shape if getattr(model, "inputs", None) else model.input_shape
    channels = shape[-1]
    if channels is None:
        raise ValueError(f"model {model.name!r} has an undefined channel dimension in its input shape {tuple(shape)}")
    return int(channels)


def _model_output_classes(model: "keras.Model") -> int | None:
    """Channels of the model's (first) output: the number of classes; None if undefined."""
    channels = model.outputs[0].shape[-1]
    return None if channels is None else int(channels)


def _check_model_fits(model: "keras.Model", plan: "Plan", classes: Sequence[str]) -> int:
    """The model's input channels, checked against ``plan.context_slices`` and its output classes
    against ``classes``; raises ``ValueError`` naming the mismatch."""
    channels = _model_input_channels(model)
    context = int(getattr(plan, "context_slices", channels))
    if channels != context:
        raise ValueError(
            f"model {model.name!r} takes {channels} input channels but the plan has context_slices={context}"
        )
    n_out = _model_output_classes(model)
    if n_out is not None and n_out != len(classes):
        raise ValueError(
            f"model {model.name!r} outputs {n_out} classes but {len(classes)} class names were given: {list(classes)}"
        )
    return channels


def _network_of(model: "keras.Model", network: "NetworkSpec | None") -> "NetworkSpec | None":
    """``network`` checked against the model's outputs; without one, the legacy fallback for
    bundles written before ``bundle.json`` named its network (or models saved without a
    declaration): the registered network that recognizes the model, or None when none does.

    Raises:
        ValueError: the model's outputs are not the ones ``network`` declares.
    """
    if network is not None:
        network.check_model(model)
        return network
    from medseg.nets.registry import recognize_network

    return recognize_network(model)


def _check_settings(classes: Sequence[str], threshold: float, head_level: int | None) -> None:
    if len(classes) < 2 or not all(isinstance(c, str) and c for c in classes):
        raise ValueError(f"classes must be at least two non-empty names, found {list(classes)!r}")
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise ValueError(f"threshold must be a number in [0, 1], found {threshold!r}")
    if head_level is not None and (isinstance(head_level, bool) or not isinstance(head_level, int) or head_level < 1):
        raise ValueError(f"head_level must be None or an integer >= 1, found {head_level!r}")


# --- public API ------------------------------------------------------------------------------
def resolve_divisor(network: "NetworkSpec | None", plan: "Plan", recorded: int | None = None,
                    format_version: int = FORMAT_VERSION) -> int:
    """The multiple slice height and width are padded to before the model: the one rule.

    The network's (:attr:`NetworkSpec.divisor`, ``2**depth`` for the U-Nets) is the source; a
    model no registered network built takes the plan's (training's patch multiple). A format-1
    bundle keeps what inference used for it then (the LCM of its recorded divisor, the network's
    and the plan's), so old bundles segment exactly as before.
    """
    plan_divisor = int(getattr(plan, "divisor", 1) or 1)
    if format_version < 2:  # LEGACY: format 1 bundles
        return math.lcm(int(recorded or 1), network.divisor if network is not None else 1, plan_divisor)
    return int(network.divisor) if network is not None else plan_divisor


def save_bundle(
    run_dir: str | os.PathLike,
    model: "keras.Model",
    plan: "Plan",
    *,
    classes: Sequence[str] = ("background", "lesion"),
    pipeline: Any = None,
    network: "NetworkSpec | None" = None,
    threshold: float = 0.5,
    head_level: int | None = None,
    postprocessing: Any = None,
    selection: str | None = None,
    validation: str | None = None,
    training: Mapping[str, Any] | None = None,
    status: str = "complete",
    extra: Mapping[str, Any] | None = None,
    parent: Mapping[str, str] | None = None,
) -> Path:
    """Write ``model.keras`` and ``bundle.json`` (format 2) into ``run_dir`` (created if missing).

    Both files are written to temporary files in ``run_dir`` and moved into place together
    (:func:`medseg.io.atomic.atomic_paths`): a ``bundle.json`` always sits next to the model it
    describes (its SHA-256 is recorded, and :func:`load_bundle` refuses another model), and a
    crash never leaves a half-written file or a new model under an old description. Existing
    files are replaced: a run folder holds the latest bundle of its run.

    Args:
        run_dir: the run folder.
        model: Keras model taking ``(B, H, W, plan.context_slices)`` float32 and returning softmax
            probabilities ``(B, H, W, num_classes)`` (or a list of such heads).
        plan: the preprocessing plan the model was trained with.
        classes: class names, index = label; ``len(classes)`` must equal the model's classes.
        pipeline: the model's :class:`medseg.transforms.pipeline.Pipeline` (saved under
            ``"pipeline"``; default: the one ``plan`` implies).
        network: the :class:`~medseg.nets.registry.NetworkSpec` that built ``model``, recorded
            under ``"network"``; None records none: inference then recognizes the model as a
            registered network built it, or runs it as saved.
        threshold: default threshold on the foreground probability, in ``[0, 1]``.
        head_level: deep-supervision head to keep at inference (a pruned UNet++), or None.
        postprocessing: the largest-component choice made on validation: a
            :class:`~medseg.infer.contract.Postprocessing`, or what training computes (one
            ``choose_largest_component`` dict for one class; ``{"largest_component": {name: bool},
            "classes": {name: details}}`` for several). None: none chosen.
        selection: ``"best"`` (best validation) or ``"last"`` (last epoch), or None.
        validation: ``"held-out cases"`` or ``"training cases"``, or None.
        training: ``{"epoch", "val_dsc_3d", "val_hd95_mm", "train_cases", "val_cases", "map_labels"}``.
        status: ``"complete"``, or ``"cancelled"`` for a bundle written when the run was cancelled.
        extra: free-form JSON-serializable information; nothing in inference reads it.
        parent: ``{"path", "sha256"}`` of the bundle this model was fine-tuned from, or None.

    Returns:
        Path of the written ``bundle.json``.

    Raises:
        ValueError: if the settings are invalid, the model's input channels differ from
            ``plan.context_slices``, its outputs from those ``network`` declares, or ``extra`` is
            not JSON-serializable.
    """
    _check_settings(classes, threshold, head_level)
    run_dir = Path(run_dir)
    channels = _check_model_fits(model, plan, classes)
    plan_dict = plan.to_dict()
    divisor = resolve_divisor(_network_of(model, network), plan)
    try:
        extra_dict = json.loads(json.dumps(dict(extra or {}), allow_nan=True))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"extra must be JSON-serializable: {exc}") from exc
    typed = typed_fields(classes, postprocessing=postprocessing, selection=selection, validation=validation,
                         training=training, status=status, parent=parent)
    typed["pipeline"] = _pipeline_config(pipeline, plan, channels, model)
    if network is not None:
        typed["network"] = network.to_dict()
    return _write(run_dir, model, lambda digest: {
        **_bundle_info(digest, plan_dict, classes, threshold, head_level, divisor, channels, extra_dict), **typed})


def _write(run_dir: Path, model: "keras.Model", info_of) -> Path:
    """``model.keras`` and ``bundle.json`` (``info_of(model sha256)``) moved into place together."""
    run_dir.mkdir(parents=True, exist_ok=True)
    from medseg.io.atomic import atomic_paths

    bundle_path = run_dir / BUNDLE_FILE
    # atomic_paths' temp names keep the ".keras" suffix, which Keras insists on.
    with atomic_paths([run_dir / MODEL_FILE, bundle_path]) as (tmp_model, tmp_info):
        model.save(tmp_model, overwrite=True)
        tmp_info.write_text(json.dumps(info_of(sha256(tmp_model)), indent=2) + "\n", encoding="utf-8")
    log.debug("wrote bundle %s", bundle_path)
    return bundle_path


def _pipeline_config(pipeline: Any, plan: "Plan", channels: int, model: "keras.Model") -> dict:
    """The saved form of ``pipeline`` (default: the one ``plan`` implies), checked against the model."""
    from medseg.transforms.pipeline import Pipeline

    if pipeline is None:
        pipeline = Pipeline.from_plan(plan)
    if pipeline.context_slices != channels:
        raise ValueError(f"model {model.name!r} takes {channels} input channels but the pipeline feeds "
                         f"{pipeline.context_slices} context slices")
    try:
        return pipeline.to_config()
    except TypeError as exc:
        raise ValueError(f"the pipeline cannot be saved with the model: {exc}") from exc


def _bundle_info(sha256: str, plan_dict: dict, classes, threshold, head_level, divisor: int, channels: int,
                 extra_dict: dict) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_file": MODEL_FILE,
        "model_sha256": sha256,
        "plan": plan_dict,
        "classes": list(classes),
        "threshold": float(threshold),
        "head_level": head_level,
        "divisor": divisor,
        "input_channels": channels,
        "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "extra": extra_dict,
    }


def read_bundle_info(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``bundle.json`` of ``run_dir`` without loading the model (fast, no TensorFlow).

    Raises:
        InputError: if the folder or ``bundle.json`` is missing, not JSON, or lacks required keys.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        if run_dir.name == BUNDLE_FILE and run_dir.is_file():
            run_dir = run_dir.parent
        else:
            what = "a file" if run_dir.exists() else "nothing"
            raise InputError(run_dir, f"a run folder holding {MODEL_FILE} and {BUNDLE_FILE}", what)
    path = run_dir / BUNDLE_FILE
    if not path.is_file():
        raise InputError(path, "the bundle description written by medseg-train (save_bundle)", "no such file")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, "a JSON bundle description", f"unreadable content ({exc})") from exc
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = f"format {info.get('format')!r}" if isinstance(info, dict) else f"a JSON {type(info).__name__}"
        raise InputError(path, f"a JSON object with format {FORMAT!r}", found)
    version = info.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise InputError(
            path, f"bundle format_version <= {FORMAT_VERSION}", f"{version!r}",
            "written by a newer medseg? upgrade medseg",
        )
    missing = [k for k in ("plan", "classes", "threshold", "divisor", "input_channels") if k not in info]
    if missing:
        expected = "the keys plan, classes, threshold, divisor, input_channels"
        raise InputError(path, expected, f"{', '.join(missing)} missing")
    try:
        _check_settings(info["classes"], info["threshold"], info.get("head_level"))
        if not isinstance(info["divisor"], int) or info["divisor"] < 1:
            raise ValueError(f"divisor must be a positive integer, found {info['divisor']!r}")
        if not isinstance(info["input_channels"], int) or info["input_channels"] < 1:
            raise ValueError(f"input_channels must be a positive integer, found {info['input_channels']!r}")
        check_network_entry(info.get("network"))
    except ValueError as exc:
        raise InputError(path, "valid bundle settings", str(exc)) from exc
    BundleInfo.parse(info, path)  # the typed fields: one clear error here, not at first use
    info["_run_dir"] = str(run_dir)
    return info


def read_bundle_contract(run_dir: str | os.PathLike) -> tuple[Path, BundleInfo]:
    """``(run folder, typed bundle.json)`` of ``run_dir`` without loading the model (no TensorFlow).

    Raises:
        InputError: as :func:`read_bundle_info`.
    """
    info = read_bundle_info(run_dir)
    folder = Path(info.pop("_run_dir"))
    return folder, BundleInfo.parse(info, folder / BUNDLE_FILE)


def load_bundle(run_dir: str | os.PathLike, *, accept_modified: bool = False) -> Bundle:
    """Load a bundle written by :func:`save_bundle`.

    Args:
        run_dir: run folder (or its ``bundle.json``).
        accept_modified: load a ``model.keras`` whose SHA-256 differs from the one ``bundle.json``
            recorded (weights replaced after training), with a warning, instead of refusing it.

    Returns:
        The :class:`Bundle` (model compiled=False: inference only).

    Raises:
        InputError: naming the file, if ``bundle.json`` or ``model.keras`` is missing or corrupt,
            ``model.keras`` is not the model ``bundle.json`` describes (SHA-256) and
            ``accept_modified`` is False, the plan or network is invalid, or the model does not
            match the bundle (input channels, the network's outputs).
    """
    info = read_bundle_info(run_dir)
    run_dir = Path(info.pop("_run_dir"))
    bundle_path = run_dir / BUNDLE_FILE
    contract = BundleInfo.parse(info, bundle_path)
    from medseg.data.plan import Plan

    try:
        plan = Plan.from_dict(info["plan"])
    except (TypeError, ValueError, KeyError) as exc:
        found = f"{type(exc).__name__}: {exc}"
        raise InputError(bundle_path, "a valid preprocessing plan under 'plan'", found) from exc
    pipeline = read_pipeline(info, bundle_path)
    declared = read_network(info, bundle_path)

    model_path = run_dir / info.get("model_file", MODEL_FILE)
    if not model_path.is_file():
        raise InputError(model_path, "the Keras model of the bundle", "no such file")
    check_model_file(model_path, info.get("model_sha256"), bundle_path, accept_modified)
    model = load_model(model_path)

    channels = _model_input_channels(model)
    if channels != info["input_channels"]:
        raise InputError(
            model_path, f"a model taking {info['input_channels']} input channels (bundle.json)", f"{channels} channels"
        )
    if channels != plan.context_slices:
        raise InputError(
            bundle_path, f"plan.context_slices equal to the model's {channels} input channels",
            f"context_slices={plan.context_slices}",
        )
    if pipeline is not None and pipeline.context_slices != channels:
        raise InputError(bundle_path, f"a pipeline feeding the model's {channels} input channels",
                         f"{pipeline.context_slices} context slices")
    classes = _model_output_classes(model)
    if classes is not None and classes != len(info["classes"]):
        raise InputError(
            bundle_path, f"{classes} class names (the model's output channels)",
            f"{len(info['classes'])}: {info['classes']}",
        )
    try:
        network = _network_of(model, declared)
    except ValueError as exc:
        raise InputError(model_path, f"the model of network {declared.name!r} (bundle.json)", str(exc)) from exc
    warn_on_version_change(info.get("versions") or {}, bundle_path)
    return Bundle(
        run_dir=run_dir,
        model=model,
        plan=plan,
        classes=tuple(info["classes"]),
        threshold=float(info["threshold"]),
        head_level=info.get("head_level"),
        # The network's: a hand-edited "divisor" cannot make the slices too small for it.
        divisor=resolve_divisor(network, plan, contract.divisor, contract.format_version),
        input_channels=channels,
        info=info,
        pipeline=pipeline,
        network=network,
        contract=contract,
    )
