"""Scans at the extremes of clinical resolution (issue 23, item 3): 0.7 mm and 5 mm slices, and
in-plane spacing unlike the plan's, go to the plan's spacing and back onto their own grid
exactly, and a prediction written for them has the input's shape, spacing, origin and direction.

Independent answers: a linear ramp is reproduced exactly by linear resampling (in the interior,
where no edge value is repeated); the geometry is compared with what nibabel reads back."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.data.plan import Plan
from medseg.io import Volume, read_volume, write_volume
from medseg.transforms.planspace import plan_space_image, plan_space_label, restore

from _helpers import no_env_model, run_dir  # noqa: F401  (fixtures)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

#: (in-plane spacing, slice spacing) mm, and an oblique LPS direction: the extremes of CT.
EXTREMES = [((0.7, 0.7), 0.7), ((0.7, 0.7), 5.0), ((1.6, 1.6), 5.0), ((0.6, 0.9), 0.7)]
PLAN_SPACING = (0.8, 0.8)


def _rotation(degrees: float) -> np.ndarray:
    t = np.radians(degrees)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])


def scan(inplane, slice_mm, shape=(40, 36, 9)) -> Volume:
    """An LPS-stored (as DICOM) oblique volume holding a ramp along its first two axes."""
    affine = np.eye(4)
    affine[:3, :3] = _rotation(12) @ np.diag([-1.0, -1.0, 1.0]) @ np.diag([inplane[0], inplane[1], slice_mm])
    affine[:3, 3] = [101.3, -57.25, -412.5]
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    return Volume(3.0 * i + 2.0 * j + 0.0 * k, affine, "scan")


@pytest.mark.parametrize("inplane, slice_mm", EXTREMES)
def test_to_plan_spacing_and_back_is_the_same_grid(inplane, slice_mm):
    volume = scan(inplane, slice_mm)
    prepared = plan_space_image(volume, "RAS", 2, PLAN_SPACING)
    # In plan space the in-plane spacing is the plan's; slices are kept (2.5D), at their own spacing.
    plan_spacing = np.linalg.norm(prepared.affine[:3, :3], axis=0)
    np.testing.assert_allclose(plan_spacing, [slice_mm, *PLAN_SPACING], rtol=0.02)
    assert prepared.n_slices == volume.shape[2]
    back = restore(prepared, prepared.array)
    assert back.shape == volume.shape
    np.testing.assert_array_equal(back.affine, volume.affine)  # exactly: the input's own affine
    # Values: a ramp is linear, so linear resampling there and back reproduces it in the interior.
    inner = (slice(3, -3), slice(3, -3), slice(None))
    np.testing.assert_allclose(back.array[inner], volume.array[inner], atol=1e-3)


@pytest.mark.parametrize("inplane, slice_mm", EXTREMES)
def test_labels_to_plan_space_and_back_keep_a_block(inplane, slice_mm):
    """Nearest neighbour both ways: a block of 8 x 8 voxels comes back on the same voxels, but
    for a rim of one voxel where the two grids' centres fall on either side of its edge."""
    volume = scan(inplane, slice_mm)
    label = np.zeros(volume.shape, np.uint8)
    label[10:26, 12:28, 2:7] = 1
    lab = volume.with_array(label)
    stack = plan_space_label(lab, "RAS", 2, PLAN_SPACING)
    prepared = plan_space_image(volume, "RAS", 2, PLAN_SPACING)
    back = restore(prepared, stack)
    assert back.shape == volume.shape and back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.affine, volume.affine)
    assert np.all(back.array[11:25, 13:27, 2:7] == 1)
    assert back.array[:9].sum() == 0 and back.array[27:].sum() == 0 and back.array[..., :2].sum() == 0


@pytest.mark.slow
@pytest.mark.parametrize("inplane, slice_mm", [((0.7, 0.7), 0.7), ((0.7, 0.7), 5.0)])
def test_prediction_written_for_extreme_inputs_has_their_geometry(tmp_path, run_dir, no_env_model,  # noqa: F811
                                                                  inplane, slice_mm):
    from medseg.cli.infer import main

    volume = scan(inplane, slice_mm, shape=(48, 44, 7))
    source = write_volume(volume, tmp_path / "scan.nii.gz")
    out = tmp_path / "pred.nii.gz"
    assert main([str(source), "--model", str(run_dir), "-o", str(out), "--quiet"]) == 0
    written = nib.load(out)  # read back by nibabel, not by medseg
    original = nib.load(source)
    assert written.shape == original.shape == volume.shape
    np.testing.assert_allclose(written.affine, original.affine, atol=1e-4)
    np.testing.assert_allclose(written.header.get_zooms(), [*inplane, slice_mm], atol=1e-5)
    pred = read_volume(out)
    assert pred.same_grid(read_volume(source), atol_mm=1e-4, atol_dir=1e-6)
    np.testing.assert_allclose(pred.origin_mm, volume.origin_mm, atol=1e-4)
    np.testing.assert_allclose(pred.direction, volume.direction, atol=1e-6)
