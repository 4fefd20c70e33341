"""Label kinds: what a label map holds after the pipeline's label step, and what each stage does
with it (:class:`LabelKind`; one instance each: :data:`BINARY`, :data:`CLASSES`, :data:`BITS`).

The only module that decides by kind: no comparison with a kind's name happens elsewhere
(``tests/test_label_kind_rule.py``). It imports nothing of :mod:`medseg.io.classes.spec`, whose
``ClassSpec.kind`` it serves; methods that need a spec take it as an argument.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    from medseg.io.classes.spec import ClassSpec

__all__ = ["LabelKind", "BINARY", "CLASSES", "BITS", "LABEL_KINDS", "IGNORE_INDEX", "MAX_REGIONS_WITH_IGNORE",
           "without_ignore"]

#: The value an unlabelled voxel (``--ignore-label V``) takes in the label step's output, whatever
#: the kind: no class index (at most 254 classes), no region bits (at most 7 regions with an ignore
#: value: 255 would be all 8 bits). Losses and metrics skip it (``medseg.losses._overlap``); warps
#: carry it like a label (:meth:`LabelKind.warp_labelled`); the sampling index leaves it out.
IGNORE_INDEX = 255
#: Nested regions with an ignore value: bit 7 stays free, so :data:`IGNORE_INDEX` is no region set.
MAX_REGIONS_WITH_IGNORE = 7


def without_ignore(label: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``(label with its ignored voxels made 0, bool mask of them)``; ``(label, None)`` when it holds none."""
    label = np.asarray(label)
    if label.dtype.kind not in "iu" or not label.size or int(label.max()) < IGNORE_INDEX:
        return label, None
    ignored = label == IGNORE_INDEX
    if not ignored.any():
        return label, None
    return np.where(ignored, np.zeros((), label.dtype), label), ignored


class LabelKind(ABC):
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

    # --- naming ---------------------------------------------------------------------------------------
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
        if not isinstance(classes, Mapping):  # a ClassSpec: it knows its kind
            return classes.kind
        if classes.get("regions"):
            return BITS
        if "names" not in classes:  # a bare {"regions": False}: no class count to tell one class apart
            return CLASSES
        # ClassSpec.kind's rule on its saved form: one class (not a region) is binary.
        return BINARY if len(classes["names"]) == 1 else CLASSES

    # --- transforms -----------------------------------------------------------------------------------
    @abstractmethod
    def warp(self, interp, label: np.ndarray) -> np.ndarray:
        """The warped label: ``interp`` (the warp of one float32 plane) applied to its parts."""

    @abstractmethod
    def masks(self, label: np.ndarray):
        """``(index, bool mask)`` of each foreground class (region) present, apart; binary: one, 1."""

    def warp_labelled(self, interp, label: np.ndarray) -> np.ndarray:
        """:meth:`warp`, with the unlabelled voxels (:data:`IGNORE_INDEX`) carried as one more
        label: interpolated and thresholded at 0.5 on their own, they win where they land (the
        warp of a label map without them is :meth:`warp`'s, unchanged)."""
        plain, ignored = without_ignore(label)
        if ignored is None:
            return self.warp(interp, label)
        out = np.asarray(self.warp(interp, plain)).astype(np.uint8)
        out[interp(ignored.astype(np.float32)) > np.float32(0.5)] = IGNORE_INDEX
        return out

    def labelled_masks(self, label: np.ndarray):
        """:meth:`masks` of the labelled voxels only (unlabelled ones are no class)."""
        return self.masks(without_ignore(label)[0])

    # --- inference ------------------------------------------------------------------------------------
    def foreground(self, probs):
        """Foreground probability ``(...)`` from the network's ``(..., C)`` output (NumPy or TF):
        every softmax channel but the background (P(lesion) for the usual two)."""
        return _sum_from_1(probs)

    # --- reports --------------------------------------------------------------------------------------
    #: What the reports call one foreground (and several), and what its label ids mean.
    noun: str = "class"
    plural: str = "classes"
    ids_meaning: str = "label ids"

    def count_text(self, n: int) -> str:
        """``"1 class"``, ``"3 classes"``, ``"2 regions"``."""
        return f"{n} {self.noun if n == 1 else self.plural}"

    # --- inference: decoding --------------------------------------------------------------------------
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

    # --- training -------------------------------------------------------------------------------------
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

    # --- inference: decoding --------------------------------------------------------------------------
    # One lesion class: segmentation thresholds the foreground probability (bundle threshold).
    decodes_classes = False

    # --- training -------------------------------------------------------------------------------------
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

    # --- training -------------------------------------------------------------------------------------
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

    # --- reports --------------------------------------------------------------------------------------
    noun = "region"
    plural = "regions"
    ids_meaning = "each the union of its label ids"

    # --- inference: decoding --------------------------------------------------------------------------
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

    # --- training -------------------------------------------------------------------------------------
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
