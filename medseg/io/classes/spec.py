"""Class specs: which label ids each named class (or nested region) stands for; the rules and examples
are in the package docstring (:mod:`medseg.io.classes`)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from medseg.errors import InputError
from medseg.io.classes.kinds import BINARY, BITS, CLASSES, LabelKind

__all__ = ["ClassSpec", "ANY_NONZERO"]

#: The ids of the binary lesion class: every nonzero value.
ANY_NONZERO = ()
#: dataset.json's label name of unlabelled voxels (nnU-Net v2).
IGNORE_NAME = "ignore"

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
_FORMAT = "--labels-map entries NAME=IDS such as liver=5 or tumour=2,3 (ids: integers > 0, comma-separated)"


# class ids by DICOM SEG segment / RTSTRUCT ROI name ----------------------------
def _ids_by_segment_name(text: str) -> tuple[int, ...]:
    """Label ids of ``--labels-map liver=Liver`` (segment / ROI names, comma-separated): the ids that
    :mod:`medseg.io.dicomlabels.names` gives those names, which SEG / RTSTRUCT readers then write;
    ``()`` when ``text`` is not a list of names."""
    from medseg.io.dicomlabels.names import named_ids

    try:
        return named_ids(text) or ()
    except ValueError as exc:  # two names of the entry would share an id
        raise InputError(None, "segment names with label ids of their own", str(exc)) from None


@dataclass(frozen=True)
class ClassSpec:
    """Named foreground classes (or regions) and the label ids each stands for.

    Attributes:
        names: foreground names in order (background excluded); class index ``k + 1`` is ``names[k]``.
        ids: label ids of each name; ``()`` (:data:`ANY_NONZERO`) for the default binary class
            (every nonzero value, :meth:`binary`).
        regions: True for nested regions (sigmoid outputs, overlapping ids).
        region_order: with regions, the id written where region ``k`` is predicted.
        lesions: names evaluated lesion-wise (connected components); default all for the binary
            spec, none otherwise.
    """

    names: tuple[str, ...]
    ids: tuple[tuple[int, ...], ...]
    regions: bool = False
    region_order: tuple[int, ...] | None = None
    lesions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.names or len(self.names) != len(self.ids):
            raise ValueError(f"a class spec needs one id list per name, found {self.names} and {self.ids}")
        if len(set(self.names)) != len(self.names) or "background" in self.names:
            raise ValueError(f"class names must be distinct and not 'background', found {list(self.names)}")
        unknown = sorted(set(self.lesions) - set(self.names))
        if unknown:
            raise ValueError(f"lesion classes {unknown} are not among the classes {list(self.names)}")
        if self.any_nonzero:
            return
        if any(not ids or min(ids) < 1 for ids in self.ids):
            raise ValueError(f"every class needs label ids > 0, found {dict(zip(self.names, self.ids))}")
        if self.regions:
            order = self.region_order
            if order is None or len(order) != len(self.names):
                raise ValueError(f"regions need regions_class_order with one id per region ({len(self.names)}), "
                                 f"found {order}")
        else:
            seen: dict[int, str] = {}
            for name, ids in zip(self.names, self.ids):
                for i in ids:
                    if i in seen:
                        raise ValueError(f"label id {i} belongs to both {seen[i]!r} and {name!r}; overlapping "
                                         f"classes are regions (dataset.json regions_class_order)")
                    seen[i] = name

    # --- construction ----------------------------------------------------------------------------
    @classmethod
    def binary(cls, name: str = "lesion") -> "ClassSpec":
        """One class, every nonzero value, named ``name`` (the default, "lesion"); lesion-wise."""
        return cls((name,), (ANY_NONZERO,), lesions=(name,))

    @classmethod
    def parse(cls, items: Iterable[str], *, lesions: Sequence[str] = ()) -> "ClassSpec":
        """From ``["liver=5", "tumour=2,3"]`` (``--labels-map``). Overlapping ids make regions, in
        the order given, each writing its last id. One entry is a named binary spec (:data:`BINARY`).

        Raises:
            InputError: malformed entries, repeated names, ids <= 0.
        """
        names, ids = [], []
        for item in items:
            name, sep, text = str(item).partition("=")
            try:
                values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
            except ValueError:
                values = _ids_by_segment_name(text)  # liver=Liver names a SEG segment / ROI
            if not sep or not _NAME.match(name) or not values:
                raise InputError(None, _FORMAT, repr(item))
            if ids and any(set(values) & set(v) for v in ids) and not text.replace(",", "").replace(" ", "").isdigit():
                # Shared numeric ids make nested regions; a segment name never means that.
                raise InputError(None, "segment names of their own in each --labels-map entry",
                                 f"{item!r} shares a label id with an earlier entry")
            names.append(name)
            ids.append(values)
        return cls._checked(names, ids, None, lesions, "--labels-map")

    @classmethod
    def from_dataset_json(cls, source: str | os.PathLike | Mapping[str, Any], *,
                          lesions: Sequence[str] = ()) -> "ClassSpec | None":
        """From a ``dataset.json`` (path or its content): its ``labels`` (names -> id or ids) and
        ``regions_class_order``. One foreground label is a named binary spec (``{"background": 0,
        "liver": 1}``: "liver", id 1); None when it names no foreground label (then every nonzero
        value is the lesion, as without a ``dataset.json``).

        Raises:
            InputError: naming the file, when ``labels`` is malformed.
        """
        path = None
        data = source
        if not isinstance(source, Mapping):
            path = Path(source)
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise InputError(path, "a readable dataset.json", str(exc)) from exc
        labels = data.get("labels") if isinstance(data, Mapping) else None
        if not labels:
            return None
        if not isinstance(labels, Mapping):
            raise InputError(path, "dataset.json labels as a mapping of names to ids", repr(labels)[:200])
        names, ids = [], []
        for name, value in labels.items():
            if name == IGNORE_NAME:
                continue  # unlabelled voxels (dataset_ignore_label), no class
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise InputError(path, "dataset.json label ids as integers or lists of integers", f"{name}: {value!r}")
            if values == [0]:
                continue  # background
            names.append(str(name))
            ids.append(tuple(values))
        order = data.get("regions_class_order")
        if not names and order is None:
            return None
        return cls._checked(names, ids, order, lesions, path or "dataset.json")

    @staticmethod
    def dataset_ignore_label(source: str | os.PathLike | Mapping[str, Any] | None) -> int | None:
        """The ignore value of a ``dataset.json`` (path or content): its label named ``"ignore"``
        (nnU-Net v2's convention: unlabelled voxels), or None.

        Raises:
            InputError: naming the file, when that value is not one integer.
        """
        if source is None:
            return None
        data = source if isinstance(source, Mapping) else json.loads(Path(source).read_text(encoding="utf-8"))
        labels = data.get("labels") if isinstance(data, Mapping) else None
        value = labels.get(IGNORE_NAME) if isinstance(labels, Mapping) else None
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(None if isinstance(source, Mapping) else source,
                             'dataset.json label "ignore" as one integer label value', repr(value))
        return value

    @classmethod
    def _checked(cls, names, ids, order, lesions, where) -> "ClassSpec":
        regions = order is not None or len({i for v in ids for i in v}) < sum(len(v) for v in ids)
        if regions and order is None:
            order = [v[-1] for v in ids]
        try:
            return cls(tuple(names), tuple(tuple(v) for v in ids), regions,
                       None if order is None else tuple(int(o) for o in order), tuple(lesions))
        except ValueError as exc:
            raise InputError(where, "named classes with their label ids", str(exc)) from exc

    # --- facts -------------------------------------------------------------------------------
    @property
    def any_nonzero(self) -> bool:
        """The default binary spec (:meth:`binary`): every nonzero label value is the class, and
        label maps must hold 0 and 1 only (else ``--map-labels``)."""
        return len(self.names) == 1 and self.ids[0] == ANY_NONZERO

    @property
    def is_binary(self) -> bool:
        """One foreground under a two-channel softmax (:data:`BINARY`): the default spec or one
        named class (not a region)."""
        return len(self.names) == 1 and not self.regions

    @property
    def kind(self) -> "LabelKind":
        """How this spec's labels are encoded after the label step (:class:`LabelKind`): binary
        for one class (named or not), nested-region bits, else class indices."""
        return BINARY if self.is_binary else (BITS if self.regions else CLASSES)

    @property
    def num_classes(self) -> int:
        """Background + the named classes (or regions): the label step's class count."""
        return len(self.names) + 1

    @property
    def num_outputs(self) -> int:
        """Network output channels: background + classes (softmax), or one per region (sigmoid)."""
        return len(self.names) if self.regions else len(self.names) + 1

    @property
    def output_names(self) -> tuple[str, ...]:
        """Names of the output channels (``bundle.json`` ``classes``)."""
        return self.names if self.regions else ("background", *self.names)

    def mask(self, label: np.ndarray, k: int) -> np.ndarray:
        """Where ``names[k]`` holds in a label map of the dataset's ids (default binary: nonzero)."""
        label = np.asarray(label)
        return label > 0 if self.any_nonzero else np.isin(label, self.ids[k])

    # --- applying ----------------------------------------------------------------------------
    def class_indices(self, label: np.ndarray) -> np.ndarray:
        """Label ids -> uint8 class indices (0 background, ``k`` for ``names[k - 1]``); ids of no
        class are background (one named class: 1 where its ids are); the default binary spec: 1 for
        every nonzero value. Classes only (regions: :meth:`region_masks`)."""
        label = np.asarray(label)
        if self.any_nonzero:
            return (label > 0).astype(np.uint8)
        if self.regions:
            raise ValueError("a region spec has no class indices: use region_masks")
        lut_size = int(max(max(v) for v in self.ids)) + 1
        lut = np.zeros(lut_size, np.uint8)
        for k, ids in enumerate(self.ids, 1):
            lut[list(ids)] = k
        out = np.zeros(label.shape, np.uint8)
        inside = (label >= 0) & (label < lut_size)
        out[inside] = lut[label[inside].astype(np.int64)]
        return out

    def region_masks(self, label: np.ndarray) -> np.ndarray:
        """Label ids -> bool ``(*shape, R)``: region ``k`` where the label is one of its ids."""
        label = np.asarray(label)
        return np.stack([np.isin(label, ids) for ids in self.ids], axis=-1)

    def label_ids(self, classes: np.ndarray) -> np.ndarray:
        """Class indices (softmax argmax) -> the dataset's label ids (each class its first id: one
        named class ``liver=5`` writes 5); the default binary spec: 1 for the lesion."""
        if self.any_nonzero:
            return np.asarray(classes, dtype=np.uint8)
        lut = np.array([0] + [v[0] for v in self.ids])
        return lut[np.asarray(classes)].astype(np.min_scalar_type(int(lut.max())))

    def resolve_regions(self, masks: np.ndarray) -> np.ndarray:
        """Predicted region masks ``(*shape, R)`` -> one label map: each region in order writes its
        ``region_order`` id where predicted (later regions overwrite earlier ones)."""
        masks = np.asarray(masks, dtype=bool)
        order = self.region_order or tuple(v[-1] for v in self.ids)
        out = np.zeros(masks.shape[:-1], np.min_scalar_type(int(max(order))))
        for k, value in enumerate(order):
            out[masks[..., k]] = value
        return out

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"names": list(self.names), "ids": [list(v) for v in self.ids]}
        if self.regions:
            d["regions"], d["region_order"] = True, list(self.region_order or ())
        if self.lesions:
            d["lesions"] = list(self.lesions)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ClassSpec":
        order = d.get("region_order")
        return cls(tuple(d["names"]), tuple(tuple(v) for v in d["ids"]), bool(d.get("regions", False)),
                   None if order is None else tuple(order), tuple(d.get("lesions", ())))
