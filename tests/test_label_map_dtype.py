"""apply_label_map with values outside the label array's dtype (an ignore value above uint8's range,
as the napari fine-tune widget writes for partial labels): absent values are no error, present
ones widen the array instead of overflowing."""

import numpy as np

from medseg.io.labels import apply_label_map, with_ignore


def test_an_absent_ignore_value_beyond_uint8_keeps_the_labels():
    labels = np.array([0, 5, 7, 5], np.uint8)
    out = apply_label_map(labels, with_ignore({5: 1, "*": 0}, 32767))
    assert out.tolist() == [0, 1, 0, 1] and out.dtype == np.uint8


def test_a_present_value_beyond_the_dtype_widens_it():
    labels = np.array([0, 1, 2], np.uint8)
    out = apply_label_map(labels, {1: 300, 2: -1})
    assert out.tolist() == [0, 300, -1] and out.dtype.kind == "i"
    assert labels.tolist() == [0, 1, 2]  # the input is not modified
