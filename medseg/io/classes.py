"""What the label values mean: named classes, or nested regions, of a dataset.

The nnU-Net / Medical Segmentation Decathlon convention, from ``dataset.json`` ``"labels"`` or
``--labels-map name=ids`` on the commands:

- classes (softmax): ``{"background": 0, "liver": 5, "spleen": 1}``: each name owns one or more
  label ids, no id belongs to two classes; class index ``k`` (1-based, background 0) is the
  ``k``-th name;
- regions (sigmoid, nested): ``{"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}``
  with ``"regions_class_order": [1, 2, 3]``: a region is the union of its ids, regions may
  overlap; a prediction writes, for each region in order, its id from ``regions_class_order``
  where the region is predicted, later regions overwriting earlier ones (nnU-Net's rule).

Binary lesion segmentation (every nonzero value is the lesion) is :meth:`ClassSpec.binary`, the
zero-configuration case. One named class (``--labels-map liver=5``, or a ``dataset.json`` with one
foreground label) is binary too (:data:`BINARY`: softmax over background + the class, exactly as
``--map-labels 5:1,*:0`` trains) but keeps its name and ids: its voxels are those of its ids,
every other id is background, and a prediction writes its first id (5); the default binary spec
writes 1.

Example:
    >>> spec = ClassSpec.parse(["liver=5", "spleen=1"])
    >>> spec.names, spec.ids
    (('liver', 'spleen'), ((5,), (1,)))
    >>> spec.class_indices(np.array([0, 5, 1, 7]))
    array([0, 1, 2, 0], dtype=uint8)
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from medseg.errors import InputError

__all__ = ["ClassSpec", "ANY_NONZERO", "LabelKind", "BINARY", "CLASSES", "BITS", "LABEL_KINDS"]

#: The ids of the binary lesion class: every nonzero value.
ANY_NONZERO = ()

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
_FORMAT = "--labels-map entries NAME=IDS such as liver=5 or tumour=2,3 (ids: integers > 0, comma-separated)"


# --- dicomseg helper: class ids by DICOM SEG segment / RTSTRUCT ROI name ----------------------------
def _ids_by_segment_name(text: str) -> tuple[int, ...]:
    """Label ids of ``--labels-map liver=Liver`` (segment / ROI names, comma-separated): the ids that
    :mod:`medseg.io.dicomlabels.names` gives those names, which SEG / RTSTRUCT readers then write;
    ``()`` when ``text`` is not a list of names."""
    from medseg.io.dicomlabels.names import named_ids

    try:
        return named_ids(text) or ()
    except ValueError as exc:  # two names of the entry would share an id
        raise InputError(None, "segment names with label ids of their own", str(exc)) from None
# --- end dicomseg helper


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
                values = _ids_by_segment_name(text)  # dicomseg helper: liver=Liver names a SEG segment / ROI
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


class LabelKind:
    """What a label map holds after the pipeline's label step, and what each stage does with it.

    Three kinds, one instance each (:data:`BINARY`, :data:`CLASSES`, :data:`BITS`); compare them
    by identity (``kind is BITS``) or ask them; their ``name`` is only for saved configs:

    - ``binary``: 0/1 lesion masks (every nonzero label value); softmax over background + lesion;
    - ``classes``: class indices ``0..K`` (0 background); softmax over ``K + 1`` channels;
    - ``bits``: nested regions, region ``r`` is bit ``r`` of a uint8 (at most 8); one sigmoid each.

    Every decision that depends on the kind lives in a method here, so a new kind (an ignore
    value, instances) is one subclass, not an edit of every stage.
    """

    name: str = ""
    activation: str = "softmax"

    def __repr__(self) -> str:
        return f"LabelKind({self.name!r})"

    def __reduce__(self):  # the singletons survive pickling (process pools) as themselves
        return (LabelKind.named, (self.name,))

    # --- naming --------------------------------------------------------------------------------
    @staticmethod
    def named(name: "str | LabelKind") -> "LabelKind":
        """The kind saved as ``name`` (a kind is returned as it is).

        Raises:
            ValueError: naming the kinds there are.
        """
        if isinstance(name, LabelKind):
            return name
        try:
            return _KINDS[name]
        except (KeyError, TypeError):
            raise ValueError(f"label_kind must be one of {LABEL_KINDS}, found {name!r}") from None

    @staticmethod
    def of(classes: "ClassSpec | Mapping[str, Any] | None") -> "LabelKind":
        """The kind of a :class:`ClassSpec`, of its ``to_dict()`` form, or binary for None."""
        if classes is None:
            return BINARY
        if isinstance(classes, ClassSpec):
            return classes.kind
        if "names" not in classes:  # a bare {"regions": ...}: no class count to tell one class apart
            return BITS if classes.get("regions") else CLASSES
        return ClassSpec.from_dict(classes).kind

    # --- transforms ----------------------------------------------------------------------------
    def warp(self, interp, label: np.ndarray) -> np.ndarray:
        """The warped label: ``interp`` (the warp of one float32 plane) applied to its parts."""
        raise NotImplementedError

    def masks(self, label: np.ndarray):
        """``(index, bool mask)`` of each foreground class (region) present, apart; binary: one, 1."""
        raise NotImplementedError

    # --- inference -------------------------------------------------------------------------------
    def foreground(self, probs):
        """Foreground probability ``(...)`` from the network's ``(..., C)`` output (NumPy or TF)."""
        raise NotImplementedError

    # --- eval helper ---------------------------------------------------------------------------
    #: What the reports call one foreground (and several), and what its label ids mean.
    noun: str = "class"
    plural: str = "classes"
    ids_meaning: str = "label ids"

    def count_text(self, n: int) -> str:
        """``"1 class"``, ``"3 classes"``, ``"2 regions"``."""
        return f"{n} {self.noun if n == 1 else self.plural}"

    # --- infer helper ---
    #: Segmentation decodes every class's probability (argmax, region bits) rather than
    #: thresholding the foreground probability.
    decodes_classes: bool = True

    def decode(self, restore, probs: np.ndarray) -> np.ndarray:
        """uint8 decoded labels on the input grid from plan-space probabilities ``(n, H, W, C)``:
        the class of largest probability (ties: the lower class), each channel put back by
        ``restore`` (plan-space ``(n, H, W)`` float32 -> input grid) one at a time, so only two
        float volumes exist at once."""
        best = np.array(restore(np.ascontiguousarray(probs[..., 0])), dtype=np.float32)  # our own, writable
        out = np.zeros(best.shape, np.uint8)
        for c in range(1, probs.shape[-1]):
            p = restore(np.ascontiguousarray(probs[..., c]))
            take = p > best
            out[take] = c
            np.maximum(best, p, out=best)
        return out

    def class_mask(self, decoded: np.ndarray, k: int) -> np.ndarray:
        """bool mask of foreground class (region) ``k`` (0-based) in :meth:`decode`'s labels."""
        return decoded == k + 1

    def encode(self, spec: "ClassSpec", masks: Sequence[np.ndarray]) -> np.ndarray:
        """The label map written for the classes' masks (``spec.names`` order), with the
        dataset's label ids (:meth:`ClassSpec.label_ids`; later masks win overlaps)."""
        classes = np.zeros(np.shape(masks[0]), np.uint8)
        for k, mask in enumerate(masks, 1):
            classes[mask] = k
        return spec.label_ids(classes)

    # --- train helper ---
    #: Two or more named classes under one softmax: their body shares set the cross-entropy
    #: class weights and the heads' starting bias (medseg.train.assembly).
    balances_classes: bool = False
    #: Cross-entropy class weights apply (one per softmax channel).
    takes_ce_class_weights: bool = True
    #: Validation scores each named class apart (``dsc_<name>``...); False: one foreground.
    per_class: bool = True

    def loss(self, loss: str = "dice_ce", ce_class_weights=None):
        """The per-sample training loss named ``loss`` (``"dice_ce"``, ``"dice"``, ``"ce"``)."""
        from medseg.losses import DiceCELoss, DiceLoss

        if loss == "dice":
            return DiceLoss()
        if loss == "ce":
            return DiceCELoss(dice_weight=0.0, ce_weight=1.0, name="ce_loss", ce_class_weights=ce_class_weights)
        return DiceCELoss(ce_class_weights=ce_class_weights)

    def training_metrics(self, spec: "ClassSpec") -> list:
        """Keras metrics of the final output during training (Dice per class, foreground share)."""
        from medseg.losses.metrics import dice_metrics

        return dice_metrics(2, None)

    def diagnostic_classes(self, spec: "ClassSpec") -> int:
        """Distinct label values a training batch may hold (the diagnostics' label check)."""
        return spec.num_classes

    def diagnostic_names(self, spec: "ClassSpec"):
        """Class names the diagnostics report per class (None: one foreground)."""
        return None

    def target_map(self, spec: "ClassSpec"):
        """``(images, masks) -> (images, targets)`` for the training batches, None: masks as they are."""
        return None


class _Binary(LabelKind):
    name = "binary"

    def warp(self, interp, label):
        # The mask interpolated like the image and thresholded at 0.5: the alignment guarantee.
        return interp(label) > np.float32(0.5)

    def masks(self, label):
        yield 1, label > 0

    def foreground(self, probs):
        return _sum_from_1(probs)

    # --- infer helper ---
    # One lesion class: segmentation thresholds the foreground probability (bundle threshold).
    decodes_classes = False

    # --- train helper ---
    per_class = False


class _Classes(LabelKind):
    name = "classes"

    def warp(self, interp, label):
        # One-hot planes interpolated, each pixel taking the class of largest weight (background
        # first on ties): no class index between two others is ever made up.
        values = np.unique(label)
        best = interp((label == 0).astype(np.float32))
        out = np.zeros(best.shape, np.uint8)
        for c in values[values > 0]:
            weight = interp((label == c).astype(np.float32))
            take = weight > best
            out[take] = c
            np.maximum(best, weight, out=best)
        return out

    def masks(self, label):
        for c in np.unique(label):
            if c > 0:
                yield int(c), label == c

    def foreground(self, probs):
        return _sum_from_1(probs)

    # --- train helper ---
    balances_classes = True

    def training_metrics(self, spec):
        from medseg.losses.metrics import dice_metrics

        return dice_metrics(len(spec.names) + 1, list(spec.names))

    def diagnostic_names(self, spec):
        return list(spec.names)


class _Bits(LabelKind):
    name = "bits"
    activation = "sigmoid"

    def warp(self, interp, label):
        # Each region bit interpolated and thresholded at 0.5 on its own.
        present = _bits_present(label)
        out = None
        for bit in range(8):
            if present >> bit & 1:
                part = (interp(((label >> bit) & 1).astype(np.float32)) > np.float32(0.5)).astype(np.uint8) << bit
                out = part if out is None else out | part
        return out if out is not None else interp(np.zeros(label.shape, np.float32)) > 1

    def masks(self, label):
        present = _bits_present(label)
        for bit in range(8):
            if present >> bit & 1:
                yield bit + 1, (label >> bit & 1).astype(bool)

    def foreground(self, probs):
        # One sigmoid per region: the probability that some region holds.
        if isinstance(probs, np.ndarray):
            return probs.max(axis=-1)
        import tensorflow as tf

        return tf.reduce_max(probs, axis=-1)

    # --- eval helper ---------------------------------------------------------------------------
    noun = "region"
    plural = "regions"
    ids_meaning = "each the union of its label ids"

    # --- infer helper ---
    def decode(self, restore, probs):
        # One sigmoid per region, each put back and thresholded at 0.5 on the input grid: bit r.
        bits = None
        for r in range(probs.shape[-1]):
            held = restore(np.ascontiguousarray(probs[..., r])) >= np.float32(0.5)
            part = held.astype(np.uint8) << np.uint8(r)
            bits = part if bits is None else bits | part
        return bits

    def class_mask(self, decoded, k):
        return (decoded >> np.uint8(k) & 1).astype(bool)

    def encode(self, spec, masks):
        # Nested regions: each writes its region_order id, later regions overwriting earlier ones.
        return spec.resolve_regions(np.stack(masks, axis=-1))

    # --- train helper ---
    takes_ce_class_weights = False

    def loss(self, loss="dice_ce", ce_class_weights=None):
        # Regions overlap: Dice + binary cross-entropy per region, no background channel.
        from medseg.losses.regions import RegionDiceBCELoss

        return RegionDiceBCELoss(dice_weight=0.0 if loss == "ce" else 1.0, bce_weight=0.0 if loss == "dice" else 1.0)

    def training_metrics(self, spec):
        return []  # multi-hot targets: scored by the whole-volume validation, region by region

    def diagnostic_classes(self, spec):
        return 2 ** len(spec.names)  # region bits until the batches turn them multi-hot

    def target_map(self, spec):
        from medseg.losses.regions import multi_hot_from_bits

        n_regions = len(spec.names)
        return lambda images, masks: (images, multi_hot_from_bits(masks, n_regions))


def _bits_present(label: np.ndarray) -> int:
    values = np.unique(label)
    return int(np.bitwise_or.reduce(values.astype(np.uint8))) if values.size else 0


def _sum_from_1(probs):
    """Every channel but the background: P(lesion) for the usual two."""
    if isinstance(probs, np.ndarray):
        return probs[..., 1:].sum(axis=-1)
    import tensorflow as tf

    return tf.reduce_sum(probs[..., 1:], axis=-1)


#: The kinds, one instance each.
BINARY: LabelKind = _Binary()
CLASSES: LabelKind = _Classes()
BITS: LabelKind = _Bits()
_KINDS = {k.name: k for k in (BINARY, CLASSES, BITS)}
#: Their saved names.
LABEL_KINDS = tuple(_KINDS)
