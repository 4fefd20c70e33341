"""Checks of what a run trains on, before the first step: the labels of the training batches
(exact class indices) and the cross-entropy class weights against the classes' shares.
:class:`medseg.train.diagnostics.Diagnostics` runs them; each returns its findings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medseg.io.labels import label_problems, label_values


def _label_arrays(data, max_batches: int):
    """Label arrays from an array, an ``(x, y)`` pair or a dataset of ``(x, y[, w])``."""
    if isinstance(data, np.ndarray):
        yield data
        return
    if isinstance(data, tuple) and len(data) in (2, 3) and not hasattr(data[0], "element_spec"):
        y = data[1]
        yield np.asarray(y[0] if isinstance(y, (tuple, list)) else y)
        return
    if hasattr(data, "take") and hasattr(data, "element_spec"):
        data = data.take(max_batches).as_numpy_iterator()
    for k, element in enumerate(data):
        if k >= max_batches:
            break
        y = element[1] if isinstance(element, (tuple, list)) else element
        if isinstance(y, dict):
            y = next(iter(y.values()))
        if isinstance(y, (tuple, list)):
            y = y[0]
        yield np.asarray(y)


def check_labels(data, num_classes: int = 2, max_batches: int = 4) -> dict[str, Any]:
    """Check that training labels are exact class indices ``0..num_classes-1``.

    Args:
        data: a label array, an ``(images, labels)`` pair, or an iterable / ``tf.data``
            dataset of ``(images, labels[, weights])`` batches (labels may be a tuple or dict of
            per-head copies; the first is checked).
        num_classes: number of classes including background.
        max_batches: batches read from a dataset.

    Returns:
        ``{"ok": bool, "values": sorted unique values (up to 20), "problems": [str],
        "foreground_fraction": float, "class_fractions": [float] * num_classes}`` (pixel
        fraction of each class index; NaN without pixels). One-hot labels
        ``(..., num_classes)`` of 0/1 count as ok.
    """
    values: set[float] = set()
    fg = total = 0
    counts = np.zeros(max(int(num_classes), 1), np.int64)
    for y in _label_arrays(data, max_batches):
        y = np.asarray(y)
        if y.ndim >= 3 and y.shape[-1] == num_classes and num_classes > 1 and \
                np.isin(np.unique(y), (0, 1)).all() and np.all(y.sum(-1) == 1):
            y = y.argmax(-1)          # one-hot
        values.update(label_values(y))
        fg += int(np.count_nonzero(y > 0))
        total += int(y.size)
        for k in range(counts.size):
            counts[k] += int(np.count_nonzero(y == k))
    distinct = np.unique(np.asarray(list(values))) if values else np.zeros(0)
    found = distinct.tolist()
    problems = []
    # The rule is judged on the distinct values: a value breaks it wherever it occurs.
    for problem in label_problems(distinct, num_classes=num_classes):
        if problem.kind == "nan":
            problems.append("NaN/inf label values (labels computed with a division by zero?): keep labels as "
                            "finite integer class indices")
        elif problem.kind == "non_integer":
            problems.append(
                f"non-integer label values {problem.values} (labels were interpolated or "
                "normalised): resample labels with nearest neighbour and keep them as integers"
            )
        else:
            hint = ("they look like 0/255 masks: divide by 255 or map 255 -> 1"
                    if 255 in problem.values else "map them to 0..num_classes-1")
            problems.append(
                f"label values {problem.values[:5]} outside the classes 0..{num_classes - 1}: {hint}"
            )
    return {
        "ok": not problems,
        "values": found[:20],
        "problems": problems,
        "foreground_fraction": fg / total if total else float("nan"),
        "class_fractions": (counts / total).tolist() if total else [float("nan")] * counts.size,
    }


def check_class_weights(
    class_weights: Sequence[float],
    class_fractions: Sequence[float] | None = None,
    include_background: bool = True,
    foreground: str = "lesion",
) -> str | None:
    """Say whether class weights make the loss favour background over a foreground class (else None).

    Background is favoured over class ``k`` when it enters the loss with at least the weight of
    ``k``, or, given the pixel fraction of each class, when its weighted pixel mass ``w_0 * f_0``
    exceeds ``w_k * f_k`` (what a pixel-averaged cross-entropy or a flattened-batch Dice sees:
    the user's 0.3/0.7 with 5 % lesion pixels gives background 0.285 against 0.035). With two
    classes the sentence speaks of "the <foreground> class" (``foreground``: the one class's
    name, "lesion" by default); with more it names every class ``k`` concerned by its index.

    Returns:
        A sentence naming the numbers, or None if the weights do not favour background.
    """
    w = [float(v) for v in class_weights]
    if not include_background or len(w) < 2:
        return None
    lighter = [k for k in range(1, len(w)) if w[0] >= w[k]]
    if lighter:
        which = f"the {foreground} class" if len(w) == 2 else _class_list(lighter)
        return f"class weights {w} give background (class 0) at least the weight of {which}"
    f = None if class_fractions is None else [float(v) for v in class_fractions]
    if f is None or len(f) != len(w):
        return None
    mass = [wc * fc for wc, fc in zip(w, f)]
    heavier = [k for k in range(1, len(w)) if mass[0] > mass[k]]
    if not heavier:
        return None
    head = f"with class weights {w} and class pixel fractions {[round(v, 4) for v in f]}, background carries "
    if len(w) == 2:
        return head + f"{mass[0] / (mass[0] + mass[1]):.0%} of the weighted pixels"
    return head + ", ".join(f"{mass[0] / (mass[0] + mass[k]):.0%} of the weighted pixels of background and "
                            f"class {k}" for k in heavier)


def _class_list(classes: Sequence[int]) -> str:
    return ("class " if len(classes) == 1 else "classes ") + ", ".join(str(k) for k in classes)
