"""Qt-free tests of the correction loop's pieces (medseg.napari.corrections): which slices a paint
event touched, the partial label built from painted and checked slices (hand-built arrays), the
difference of two segmentations, the ignore value and the slice axis of a bundle."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from medseg.errors import InputError
from medseg.napari.corrections import (IGNORE_VALUE, SliceRecord, changed_slices, difference, ignore_value_for,
                                       partial_label, slice_axis_of_bundle, slices_of_paint)


def test_partial_label_keeps_labelled_slices_and_ignores_the_rest():
    data = np.zeros((4, 3, 2), np.uint8)
    data[1, 0, 0] = 5
    data[2, 1, 1] = 5  # slice 2 is neither painted nor checked: its 5 must not survive
    data[3, 2, 0] = 5
    out = partial_label(data, 0, [3, 1], 99, {5: "liver"})
    expected = np.full((4, 3, 2), 99, np.int32)
    expected[1] = [[5, 0], [0, 0], [0, 0]]
    expected[3] = [[0, 0], [0, 0], [5, 0]]
    assert out.dtype == np.int32 and np.array_equal(out, expected)
    assert data[2, 1, 1] == 5 and data[0].sum() == 0  # the input is untouched


def test_partial_label_along_the_last_axis():
    data = np.arange(12, dtype=np.int32).reshape(2, 2, 3) % 2  # values 0 and 1
    out = partial_label(data, 2, {1}, IGNORE_VALUE, {1: "organ"})
    assert np.array_equal(out[:, :, 1], data[:, :, 1])
    assert (out[:, :, [0, 2]] == IGNORE_VALUE).all()


def test_partial_label_refusals_are_one_line():
    data = np.zeros((3, 2, 2), np.uint8)
    with pytest.raises(InputError, match="at least one corrected or checked slice"):
        partial_label(data, 0, [], 99, {5: "liver"})
    with pytest.raises(InputError, match="slice 3"):
        partial_label(data, 0, [3], 99, {5: "liver"})
    data[1, 0, 0] = 2  # painted with a value that names no class of the model
    with pytest.raises(InputError, match=r"value\(s\) 2") as err:
        partial_label(data, 0, [1], 99, {5: "liver"})
    assert "\n" not in str(err.value)
    assert partial_label(data, 0, [0], 99, {5: "liver"})[0].sum() == 0  # slice 0 holds no stray value


def test_slices_of_paint_masked_and_fancy_atoms():
    mask = np.zeros((2, 3, 3), bool)
    mask[1, 0, 0] = True  # only the second slice of the box changed
    masked = SimpleNamespace(slice_key=(slice(4, 6), slice(0, 3), slice(0, 3)), mask=mask, old_values=None,
                             new_value=1)
    whole = SimpleNamespace(slice_key=(slice(7, 9), slice(0, 1), slice(0, 1)), mask=None, old_values=None,
                            new_value=1)
    fancy = ((np.array([0, 0, 2]), np.array([1, 2, 0]), np.array([0, 0, 1])), None, 1)
    assert slices_of_paint([masked], 0) == {5}
    assert slices_of_paint([whole], 0) == {7, 8}
    assert slices_of_paint([fancy], 0) == {0, 2}
    assert slices_of_paint([fancy], 2) == {0, 1}


def test_a_real_labels_layer_paint_event_names_its_slice():
    from napari.layers import Labels

    layer = Labels(np.zeros((6, 16, 16), np.uint8))
    seen: set = set()
    layer.events.paint.connect(lambda event: seen.update(slices_of_paint(event.value, 0)))
    layer.brush_size = 3
    layer.paint((4, 8, 8), 5)
    assert seen == {4} and np.flatnonzero(np.asarray(layer.data).reshape(6, -1).any(1)).tolist() == [4]


def test_changed_slices_and_record():
    original = np.zeros((5, 2, 2), np.uint8)
    data = original.copy()
    data[3, 1, 0] = 5
    assert changed_slices(data, original, 0) == {3}
    assert changed_slices(data, original, 1) == {1}
    assert changed_slices(data, None, 0) == set()
    record = SliceRecord(0, painted={3}, checked={1})
    assert record.labelled() == [1, 3] and record.snapshot() == (0, frozenset({3}), frozenset({1}))


def test_difference_counts_and_agreement():
    before = np.array([[[0, 5, 5, 0]]])
    after = np.array([[[5, 5, 0, 6]]])
    partial = np.array([[[5, 5, 9, 9]]])  # two labelled voxels (9 = ignore)
    diff = difference(before, after, {5: "liver", 6: "spleen"}, 0.5, partial, 9)
    assert diff.changed.tolist() == [[[1, 0, 2, 1]]] and diff.voxels_changed == 3
    assert diff.rows[0] == {"class": "liver", "voxels_before": 2, "voxels_after": 2, "ml_before": 1.0,
                            "ml_after": 1.0, "ml_change": 0.0}
    assert diff.rows[1]["voxels_after"] == 1 and diff.rows[1]["ml_change"] == 0.5
    assert diff.agreement_before == 0.5 and diff.agreement_after == 1.0
    relabelled = difference(np.array([[[5]]]), np.array([[[6]]]), {5: "a", 6: "b"}, 1.0)
    assert relabelled.changed.tolist() == [[[3]]] and relabelled.agreement_before is None


def test_ignore_value_and_slice_axis_of_a_bundle(tmp_path):
    assert ignore_value_for(tmp_path, {5: "liver"}) == IGNORE_VALUE  # no config.json
    (tmp_path / "config.json").write_text(json.dumps({"ignore_label": 255}))
    assert ignore_value_for(tmp_path, {5: "liver"}) == 255  # the run's own, kept for its data
    with pytest.raises(InputError, match="ignore_label 255"):
        ignore_value_for(tmp_path, {255: "odd"})
    assert slice_axis_of_bundle(tmp_path) == 0  # no bundle.json: axial
    (tmp_path / "bundle.json").write_text(json.dumps({"plan": {"orientation": "RAS", "slice_axis": 2}}))
    assert slice_axis_of_bundle(tmp_path) == 0  # S: napari world z
    (tmp_path / "bundle.json").write_text(json.dumps({"plan": {"orientation": "RAS", "slice_axis": 0}}))
    assert slice_axis_of_bundle(tmp_path) == 2  # R: world x (sagittal slices)
    (tmp_path / "bundle.json").write_text(json.dumps({"plan": {"orientation": "LPS", "slice_axis": 1}}))
    assert slice_axis_of_bundle(tmp_path) == 1  # P: world y (coronal slices)
