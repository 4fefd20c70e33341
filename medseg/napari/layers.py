"""medseg Volumes as napari layer data tuples, and the class names and colours of label maps.

No napari import here: a layer is ``(data, kwargs, "image" | "labels")``, what npe2 readers and
sample-data functions return and ``viewer._add_layer_from_data`` accepts.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from medseg.io.volume import Volume
from medseg.napari.geometry import GEOMETRY_KEY, WORLD_AXES, display_of

__all__ = ["LayerTuple", "classes_of_spec", "classes_of_predictor", "classes_near", "image_layer", "label_layer",
           "labels_kwargs", "is_label_map", "volume_ml_per_class", "CLASSES_KEY"]

LayerTuple = tuple[np.ndarray, dict, str]
#: ``metadata["medseg"]["classes"]``: ``{label id (str): class name}``.
CLASSES_KEY = "classes"
#: Colour of label values that name no known class (painted by hand with a new id): visible.
_UNKNOWN_COLOUR = "#ffff00"
#: Words of a file name (split at ``_ - .``) that mark an integer volume as a label map.
_LABEL_WORDS = frozenset({"seg", "segmentation", "label", "labels", "mask", "pred", "prediction"})


def _plain_meta(meta: Mapping[str, Any]) -> dict:
    from medseg.io.jsonsafe import json_safe

    return json_safe({k: v for k, v in meta.items() if k != "dicom_headers"})


def _kwargs(volume: Volume, name: str, extra: Mapping[str, Any]) -> tuple[np.ndarray, dict]:
    geometry = display_of(volume)
    source = volume.meta.get("source_path")
    meta = geometry.to_metadata(case_id=volume.case_id, source_path=None if source is None else str(source),
                                volume_meta=_plain_meta(volume.meta), **extra)
    kwargs = {"name": name, "affine": geometry.world_affine, "axis_labels": WORLD_AXES, "units": ("mm",) * 3,
              "metadata": {GEOMETRY_KEY: meta, "source_path": meta["source_path"]}}
    return geometry.to_data(volume.array), kwargs


def image_layer(volume: Volume, name: str | None = None) -> LayerTuple:
    """An Image layer of ``volume`` in world mm (:mod:`medseg.napari.geometry`); a CT opens in a
    soft-tissue window (-160..240 HU), anything else at its 0.5-99.5 percentiles."""
    data, kwargs = _kwargs(volume, name or volume.case_id or "scan", {})
    if str(volume.meta.get("modality") or "").upper() == "CT":
        kwargs["contrast_limits"] = (-160.0, 240.0)
    else:
        sample = np.asarray(volume.array)[:: max(1, volume.shape[0] // 64), :: max(1, volume.shape[1] // 64)]
        lo, hi = np.percentile(sample, [0.5, 99.5]) if sample.size else (0.0, 1.0)
        kwargs["contrast_limits"] = (float(lo), float(hi) if hi > lo else float(lo) + 1.0)
    kwargs["colormap"] = "gray"
    return data, kwargs, "image"


def labels_kwargs(classes: Mapping[int, str] | None) -> dict:
    """``colormap`` and ``features`` of a Labels layer naming ``classes`` ({id: name}): the same
    colours per class as medseg-eval's report figures; values of no class drawn yellow."""
    if not classes:
        return {}
    from medseg.eval.figures import class_colours

    colours = class_colours(list(classes.values()))
    colormap: dict[Any, Any] = {None: _UNKNOWN_COLOUR, 0: "transparent"}
    colormap.update({int(i): colours[name] for i, name in classes.items()})
    features = {"index": [0, *[int(i) for i in classes]], "class": ["background", *classes.values()]}
    return {"colormap": colormap, "features": features}


def label_layer(volume: Volume, name: str | None = None, classes: Mapping[int, str] | None = None,
                **extra) -> LayerTuple:
    """A Labels layer of the integer label map ``volume``, class names and colours from ``classes``."""
    array = np.asarray(volume.array)
    if array.dtype == bool or array.dtype.kind == "f":
        array = array.astype(np.uint8 if (array.size == 0 or array.max() < 256) else np.int32)
    volume = volume.with_array(array)
    named = {int(k): str(v) for k, v in (classes or {}).items()}
    data, kwargs = _kwargs(volume, name or volume.case_id or "labels",
                           {CLASSES_KEY: {str(k): v for k, v in named.items()}, **extra})
    kwargs.update(labels_kwargs(named))
    # A copy in the layer's own axis order: napari paints into it, never into the Volume read
    # (which the image layer or a caller may share), and brush strokes write contiguous memory.
    return np.ascontiguousarray(data), kwargs, "labels"


def classes_of_spec(spec) -> dict[int, str]:
    """``{label id written: name}`` of a :class:`medseg.io.classes.ClassSpec` (None: {})."""
    if spec is None:
        return {}
    out = {}
    for k, name in enumerate(spec.names):
        if spec.regions:
            out[int(spec.region_order[k])] = name
        else:
            out[int(spec.ids[k][0]) if spec.ids[k] else 1] = name
    return out


def classes_of_predictor(predictor) -> dict[int, str]:
    """The label ids a :class:`medseg.infer.Predictor` writes, with their class names."""
    spec = predictor.classes
    if spec is None:
        return {1: predictor.class_names[0]}
    return classes_of_spec(spec)


def _classes_of_bundle(run_dir: Path) -> dict[int, str]:
    from medseg.io.classes import ClassSpec

    info = json.loads((run_dir / "bundle.json").read_text(encoding="utf-8"))
    named = ((info.get("pipeline") or {}).get("config") or {}).get("classes") or (info.get("plan") or {}).get("classes")
    if isinstance(named, Mapping) and named.get("names"):
        return classes_of_spec(ClassSpec.from_dict(named))
    names = [c for c in info.get("classes", []) if c != "background"]
    return {1: names[-1]} if names else {}


def classes_near(path: Path) -> tuple[dict[int, str], str | None]:
    """Class names of the label map at ``path`` and where they came from (None: nowhere).

    Looked for, in order: a ``dataset.json`` in the file's folder or the one above it (nnU-Net's
    ``labelsTr/``), a ``bundle.json`` there (a prediction written inside its run folder), the
    bundle named by ``$MEDSEG_MODEL`` for a ``*_seg`` prediction (medseg-infer's default model).
    An unreadable candidate is skipped (the names are a convenience; the data still open).
    """
    from medseg.errors import MedsegError
    from medseg.io.classes import ClassSpec

    folders = [path.parent, path.parent.parent] if path.is_file() else [path, path.parent]
    for folder in folders:
        candidate = folder / "dataset.json"
        if candidate.is_file():
            try:
                return classes_of_spec(ClassSpec.from_dataset_json(candidate)) or {}, str(candidate)
            except MedsegError:
                continue
    runs = [f for f in folders if (f / "bundle.json").is_file()]
    if not runs and _stem(path).endswith("_seg") and os.environ.get("MEDSEG_MODEL"):
        runs = [Path(os.environ["MEDSEG_MODEL"])]
    for run in runs:
        try:
            return _classes_of_bundle(run), str(run / "bundle.json")
        except (OSError, ValueError, KeyError, TypeError, MedsegError):
            continue
    return {}, None


def _stem(path: Path) -> str:
    from medseg.io.dataset import volume_suffix

    name = path.name
    suffix = volume_suffix(path)
    return name[: len(name) - len(suffix)] if suffix and name.endswith(suffix) else path.stem


def is_label_map(volume: Volume, path: Path) -> bool:
    """A label map rather than an image: a DICOM SEG/RTSTRUCT, or integer voxels in a file in a
    ``labels*`` folder (nnU-Net's ``labelsTr``) or whose name holds one of :data:`_LABEL_WORDS`
    between underscores (``case_seg.nii.gz``, medseg-infer's output; ``brain1_label.nrrd``)."""
    if "class_names" in volume.meta:  # DICOM SEG / RTSTRUCT read as a label map
        return True
    if np.asarray(volume.array).dtype.kind not in "iub":
        return False
    words = set(re.split(r"[_\-. ]+", _stem(path).lower()))
    return path.parent.name.lower().startswith("labels") or bool(words & _LABEL_WORDS)


def volume_ml_per_class(labels: np.ndarray, voxel_ml: float, classes: Mapping[int, str]) -> dict[str, float]:
    """``{class name: volume in mL}`` for each of ``classes`` ({id: name}) in ``labels``."""
    counts = np.bincount(np.asarray(labels).ravel().astype(np.int64, copy=False))
    return {name: float((counts[i] if i < counts.size else 0) * voxel_ml) for i, name in classes.items()}
