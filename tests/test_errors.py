"""medseg's input errors: message shape and survival through pickling (process pools)."""

import pickle

import pytest

from medseg.errors import DatasetError, InputError, MedsegError


def test_input_error_message_and_pickle():
    err = InputError("/d/a.nii.gz", "a gzip-compressed NIfTI file", "a truncated gzip stream", "re-export it")
    assert str(err) == "/d/a.nii.gz: expected a gzip-compressed NIfTI file, found a truncated gzip stream (re-export it)"
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is InputError and str(back) == str(err) and back.path == "/d/a.nii.gz"
    assert isinstance(back, MedsegError) and isinstance(back, ValueError)
    with pytest.raises(InputError, match=r"^/d/a.nii.gz: expected"):
        raise back


def test_dataset_error_lists_problems_and_pickles():
    err = DatasetError("2 unpaired files", ["a.nii.gz: no label", "b.nii.gz: no image"])
    assert str(err) == "2 unpaired files\n  - a.nii.gz: no label\n  - b.nii.gz: no image"
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and back.problems == err.problems
    with pytest.raises(DatasetError, match="unpaired"):
        raise back
