"""The Volume record: validation messages and geometry derived from the affine (hand-computed values)."""

import numpy as np
import pytest

from medseg.io import Volume


def _oblique_affine():
    # Rotation of 30 degrees about x, spacing (0.5, 1.0, 3.0), origin (10, -20, 30).
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.5, 1.0, 3.0])
    affine[:3, 3] = [10, -20, 30]
    return affine, rot


def test_geometry_is_derived_from_the_affine():
    affine, rot = _oblique_affine()
    vol = Volume(np.zeros((4, 5, 6), np.int16), affine, "p1", {"modality": "CT"})
    np.testing.assert_allclose(vol.spacing_mm, [0.5, 1.0, 3.0])
    np.testing.assert_allclose(vol.origin_mm, [10, -20, 30])
    np.testing.assert_allclose(vol.direction, rot, atol=1e-12)
    assert vol.shape == (4, 5, 6)
    assert vol.voxel_volume_ml == pytest.approx(0.5 * 1.0 * 3.0 / 1000)
    # Voxel (2, 0, 1): origin + 2 * 0.5 * x + 1 * 3 * rotated z = (11, -20 - 1.5, 30 + 3 * cos30).
    np.testing.assert_allclose(vol.world_of([2, 0, 1])[0], [11, -20 - 3 * np.sin(np.pi / 6), 30 + 3 * np.cos(np.pi / 6)])


@pytest.mark.parametrize(
    "diag, codes", [((1, 1, 1), "RAS"), ((-1, -1, 1), "LPS"), ((-1, 1, 1), "LAS")]
)
def test_orientation_codes(diag, codes):
    vol = Volume(np.zeros((2, 2, 2)), np.diag([*diag, 1.0]))
    assert vol.orientation == codes


def test_with_array_keeps_id_and_meta_without_sharing_it():
    vol = Volume(np.zeros((2, 3, 4)), np.eye(4), "case7", {"modality": "MR", "source_path": "/in.nii"})
    seg = vol.with_array(np.ones((2, 3, 4), np.uint8), kind="prediction")
    assert seg.case_id == "case7"
    assert seg.meta == {"modality": "MR", "source_path": "/in.nii", "kind": "prediction"}
    assert "kind" not in vol.meta
    np.testing.assert_array_equal(seg.affine, vol.affine)
    moved = vol.with_array(vol.array, affine=np.diag([2.0, 2, 2, 1]))
    np.testing.assert_allclose(moved.spacing_mm, [2, 2, 2])


def test_same_grid_tolerances():
    a = Volume(np.zeros((3, 3, 3)), np.eye(4))
    shifted = np.eye(4)
    shifted[0, 3] = 5e-4
    assert a.same_grid(Volume(np.zeros((3, 3, 3)), shifted))
    shifted[0, 3] = 0.1
    assert not a.same_grid(Volume(np.zeros((3, 3, 3)), shifted))
    assert not a.same_grid(Volume(np.zeros((3, 3, 4)), np.eye(4)))


def test_repr_shows_shape_spacing_orientation_dtype():
    text = repr(Volume(np.zeros((4, 5, 6), np.float32), np.diag([-0.5, -0.5, 2.0, 1]), "brain1"))
    assert text == "Volume(case_id='brain1', shape=(4, 5, 6), spacing_mm=(0.5, 0.5, 2), orientation=LPS, dtype=float32)"


@pytest.mark.parametrize(
    "array, affine, match",
    [
        (np.zeros((4, 5)), np.eye(4), r"expected a 3D array, found shape \(4, 5\) \(2D\)"),
        (np.zeros((2, 2, 2, 2)), np.eye(4), r"found shape \(2, 2, 2, 2\) \(4D\)"),
        (np.zeros((2, 2, 2)), np.eye(3), r"affine must have shape \(4, 4\), found \(3, 3\)"),
        (np.zeros((2, 2, 2)), np.diag([1, np.nan, 1, 1]), "affine has non-finite values"),
        (np.zeros((2, 2, 2)), np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1.0]]),
         r"last row must be \[0, 0, 0, 1\], found \[0.0, 0.0, 1.0, 1.0\]"),
        (np.zeros((2, 2, 2)), np.diag([1, 0, 1, 1.0]), r"spacing must be positive .* found spacing \[1.0, 0.0, 1.0\]"),
    ],
)
def test_construction_validates_with_clear_messages(array, affine, match):
    with pytest.raises(ValueError, match=match):
        Volume(array, affine, "bad")
