"""Patient-level splits: train/validation and k folds. No patient is ever on both sides.

Splitting happens on cases (volumes) before any slice or patch is cut, and cases of the same
patient (several series, follow-up scans) are grouped by ``patient_of``, so no patient's slices
can reach both the training and the validation side.

``patient_of`` is ``None`` (each case is its own patient), a callable ``item -> patient id``, or
a regular expression whose first group (or whole match) is the patient id, e.g.
``r"^(.+?)_(?:t1|t2|followup\\d*)$"``.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

__all__ = ["patient_groups", "train_val_split", "kfold_split", "k_fold_splits"]

T = TypeVar("T")


def _item_id(item: Any) -> str:
    return str(getattr(item, "case_id", item))


def _patient_fn(patient_of: Callable[[Any], str] | str | None) -> Callable[[Any], str]:
    if patient_of is None:
        return _item_id
    if callable(patient_of):
        return lambda item: str(patient_of(item))
    pattern = re.compile(patient_of)

    def from_regex(item: Any) -> str:
        cid = _item_id(item)
        m = pattern.search(cid)
        if m is None:
            raise ValueError(f"patient_of pattern {pattern.pattern!r} does not match case id {cid!r}")
        return m.group(1) if m.groups() else m.group(0)

    return from_regex


def patient_groups(items: Sequence[T], patient_of: Callable[[Any], str] | str | None = None) -> dict[str, list[T]]:
    """``{patient id: [items]}`` in first-seen order.

    Raises:
        ValueError: if two items have the same case id (a case listed twice), or a regular
            expression does not match a case id.
    """
    fn = _patient_fn(patient_of)
    seen: set[str] = set()
    groups: dict[str, list[T]] = {}
    for item in items:
        cid = _item_id(item)
        if cid in seen:
            raise ValueError(f"case {cid!r} is listed twice; each case may appear once")
        seen.add(cid)
        groups.setdefault(fn(item), []).append(item)
    return groups


def _shuffled_patients(groups: dict[str, list], seed: int) -> list[str]:
    # Sorting first makes the result independent of the input order; the seed alone decides.
    patients = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(patients))
    return [patients[i] for i in order]


def train_val_split(items: Sequence[T], val_fraction: float = 0.2, *, seed: int = 0,
                    patient_of: Callable[[Any], str] | str | None = None) -> tuple[list[T], list[T]]:
    """Random patient-level train/validation split.

    ``round(n_patients * val_fraction)`` patients (at least 1, at most ``n_patients - 1``) go to
    validation. Items keep their input order within each side.

    Args:
        items: case ids or objects with ``case_id`` (e.g. ``medseg.io.Case``).
        val_fraction: in (0, 1).
        seed: the same seed and patients give the same split.
        patient_of: see module docstring.

    Returns:
        ``(train_items, val_items)``.

    Raises:
        ValueError: fraction outside (0, 1), or fewer than 2 patients.
    """
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, found {val_fraction!r}")
    groups = patient_groups(items, patient_of)
    if len(groups) < 2:
        raise ValueError(f"a train/validation split needs at least 2 patients, found {len(groups)}")
    patients = _shuffled_patients(groups, seed)
    n_val = min(max(1, int(round(len(patients) * val_fraction))), len(patients) - 1)
    val_patients = set(patients[:n_val])
    fn = _patient_fn(patient_of)
    train = [i for i in items if fn(i) not in val_patients]
    val = [i for i in items if fn(i) in val_patients]
    return train, val


def k_fold_splits(items: Sequence[T], k: int = 5, *, seed: int = 0,
                  patient_of: Callable[[Any], str] | str | None = None) -> list[tuple[list[T], list[T]]]:
    """All ``k`` patient-level folds: ``[(train_items, val_items), ...]``.

    Patients are shuffled with ``seed`` and dealt round-robin, so fold sizes differ by at most one
    patient and every patient is validated exactly once.

    Raises:
        ValueError: ``k < 2`` or more folds than patients.
    """
    if int(k) != k or k < 2:
        raise ValueError(f"k must be an integer >= 2, found {k!r}")
    groups = patient_groups(items, patient_of)
    if len(groups) < k:
        raise ValueError(f"{k} folds need at least {k} patients, found {len(groups)}")
    patients = _shuffled_patients(groups, seed)
    fold_of = {p: n % k for n, p in enumerate(patients)}
    fn = _patient_fn(patient_of)
    return [([i for i in items if fold_of[fn(i)] != f], [i for i in items if fold_of[fn(i)] == f])
            for f in range(int(k))]


def kfold_split(items: Sequence[T], k: int, fold: int, *, seed: int = 0,
                patient_of: Callable[[Any], str] | str | None = None) -> tuple[list[T], list[T]]:
    """Fold ``fold`` (0-based) of :func:`k_fold_splits`: ``(train_items, val_items)``.

    Raises:
        ValueError: ``fold`` outside ``[0, k)`` (and see :func:`k_fold_splits`).
    """
    if int(fold) != fold or not 0 <= fold < k:
        raise ValueError(f"fold must be an integer in [0, {k}), found {fold!r}")
    return k_fold_splits(items, k, seed=seed, patient_of=patient_of)[int(fold)]
