"""Lesion-aware sampling: fractions, component balance, jitter, body, borders, no-lesion volumes, rendering."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medseg.transforms.dictionary import RandLesionPatchd
from medseg.transforms.sampling import Centres, PatchSampler, SampleSource, build_index
from medseg.transforms.warp import SpatialParams, render


def source(label: np.ndarray, image: np.ndarray | None = None, body=None, pad=0.0, case_id="c") -> SampleSource:
    image = np.random.default_rng(0).random(label.shape, dtype=np.float32) if image is None else image
    return SampleSource(image.astype(np.float32), label.astype(np.uint8), build_index(label, body), pad, case_id)


def two_lesions(shape=(10, 96, 96)) -> np.ndarray:
    """A big lesion (5 x 20 x 20 = 2000 voxels) and a single-voxel one."""
    lab = np.zeros(shape, np.uint8)
    lab[2:7, 10:30, 10:30] = 1
    lab[8, 80, 70] = 1
    return lab


def test_build_index_components_and_body():
    lab = two_lesions()
    idx = build_index(lab, max_per_component=100)
    assert idx.n_components == 2
    np.testing.assert_array_equal(idx.component_voxels, [2000, 1])
    np.testing.assert_array_equal(idx.offsets, [0, 100, 101])  # big one subsampled to 100
    assert np.all(lab[tuple(idx.coords.T)] == 1)
    np.testing.assert_array_equal(idx.coords[100], [8, 80, 70])
    body = np.zeros(lab.shape, bool)
    body[:, 40:60, 40:60] = True
    idx = build_index(lab, body, max_body=500)
    assert 0 < len(idx.body) <= 500 and body[tuple(idx.body.T)].all()
    empty = build_index(np.zeros((3, 8, 8)))
    assert empty.n_components == 0 and empty.coords.shape == (0, 3) and len(empty.body) == 0


def test_lesion_fraction_per_batch_and_statistics():
    src = source(two_lesions())
    sampler = PatchSampler([src], (32, 32), lesion_fraction=0.3)
    rng = np.random.default_rng(0)
    for _ in range(20):  # B * f = 3 exactly: every batch has 3 lesion-centred patches
        assert sampler.draw(10, rng).lesion.sum() == 3
    # B * f = 2.5: 2 or 3, 3 half the time.
    counts = [PatchSampler([src], (32, 32), lesion_fraction=0.25).draw(10, rng).lesion.sum() for _ in range(2000)]
    assert set(counts) == {2, 3} and np.mean(counts) == pytest.approx(2.5, abs=0.05)
    centres = sampler.draw(200, rng)
    _, masks = render([src], centres, (32, 32))
    has_lesion = masks.reshape(200, -1).any(1)
    assert has_lesion[centres.lesion].all()  # every lesion-centred patch shows lesion
    # Random patches rarely do (the lesions cover a small part of the 10 slices).
    assert has_lesion[~centres.lesion].mean() < 0.5


def test_component_first_balances_small_lesions():
    src = source(two_lesions())
    sampler = PatchSampler([src], (32, 32), lesion_fraction=1.0, jitter=0)
    c = sampler.draw(2000, np.random.default_rng(1))
    small = (c.slice == 8) & (c.h == 80) & (c.w == 70)
    # Voxel sampling would pick the 1-voxel lesion 1 time in 2001; component-first half the time.
    assert small.mean() == pytest.approx(0.5, abs=0.04)


def test_jitter_keeps_lesion_inside_and_is_bounded():
    lab = np.zeros((3, 64, 64), np.uint8)
    lab[1, 30, 40] = 1
    src = source(lab)
    sampler = PatchSampler([src], (32, 32), lesion_fraction=1.0)
    assert sampler.jitter == (8, 8)
    c = sampler.draw(500, np.random.default_rng(2))
    assert np.abs(c.h - 30).max() == 8 and np.abs(c.w - 40).max() == 8  # uniform in [-8, 8]
    _, masks = render([src], c, (32, 32))
    assert masks.reshape(500, -1).sum(1).min() == 1


def test_no_lesion_volumes():
    empty = source(np.zeros((4, 40, 40), np.uint8), case_id="empty")
    only_empty = PatchSampler([empty], (16, 16), lesion_fraction=0.9)
    c = only_empty.draw(8, np.random.default_rng(0))
    assert not c.lesion.any()
    with_lesion = source(two_lesions(), case_id="les")
    mixed = PatchSampler([empty, with_lesion], (16, 16), lesion_fraction=0.5)
    c = mixed.draw(400, np.random.default_rng(0))
    assert np.all(c.case[c.lesion] == 1)  # lesion-centred patches only from the case with lesion
    # Random patches: drawn per slice, so case 1 (10 slices) about 10/14 of the time.
    assert (c.case[~c.lesion] == 1).mean() == pytest.approx(10 / 14, abs=0.08)


def test_random_patches_inside_body_or_inside_image():
    lab = np.zeros((2, 100, 100), np.uint8)
    body = np.zeros(lab.shape, bool)
    body[:, 60:70, 20:30] = True
    src = source(lab, body=body)
    c = PatchSampler([src], (16, 16), lesion_fraction=0.0, jitter=0).draw(300, np.random.default_rng(0))
    assert body[c.slice, c.h, c.w].all()
    c = PatchSampler([src], (16, 16), lesion_fraction=0.0, inside_body=False).draw(300, np.random.default_rng(0))
    assert (c.h - 8).min() >= 0 and (c.h - 8 + 16).max() <= 100  # windows inside the image
    assert (c.w - 8).min() >= 0 and (c.w - 8 + 16).max() <= 100


def test_border_patches_padded():
    image = np.arange(2 * 6 * 5, dtype=np.float32).reshape(2, 6, 5)
    lab = np.zeros((2, 6, 5), np.uint8)
    lab[1, 0, 0] = 1
    src = source(lab, image=image, pad=-7.0)
    c = Centres(np.array([0]), np.array([1]), np.array([0]), np.array([0]), np.array([True]))
    images, masks = render([src], c, (8, 8))
    # Window rows -4..3, cols -4..3: the image's top-left 4 x 4 block lands at [4:8, 4:8].
    expected = np.full((8, 8), -7.0, np.float32)
    expected[4:, 4:] = image[1, :4, :4]
    np.testing.assert_array_equal(images[0, ..., 0], expected)
    expected_mask = np.zeros((8, 8), np.uint8)
    expected_mask[4, 4] = 1
    np.testing.assert_array_equal(masks[0], expected_mask)
    # A volume smaller than the patch is padded on every side.
    c = PatchSampler([src], (16, 16), lesion_fraction=0.0, inside_body=False).draw(5, np.random.default_rng(0))
    images, _ = render([src], c, (16, 16))
    assert (images == -7.0).reshape(5, -1).sum(1).min() == 16 * 16 - 30


def test_context_channels_repeat_edge_slices():
    image = np.broadcast_to(np.arange(4, dtype=np.float32)[:, None, None], (4, 8, 8)).copy()
    src = source(np.zeros((4, 8, 8), np.uint8), image=image)
    c = Centres(np.zeros(2, int), np.array([0, 3]), np.full(2, 4), np.full(2, 4), np.zeros(2, bool))
    images, _ = render([src], c, (8, 8), context_slices=5)
    np.testing.assert_array_equal(images[:, 0, 0, :], [[0, 0, 0, 1, 2], [1, 2, 3, 3, 3]])


def _params(B, flip_h=False, flip_w=False, k=0, angle=0.0, scale=1.0):
    return SpatialParams(np.full(B, flip_h), np.full(B, flip_w), np.full(B, k), np.full(B, float(angle)),
                         np.full(B, float(scale)))


def backends():
    try:
        import cv2  # noqa: F401

        return ["numpy", "cv2"]
    except ImportError:
        return ["numpy"]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("flip_h, flip_w, k", [(fh, fw, k) for fh in (0, 1) for fw in (0, 1) for k in range(4)])
def test_discrete_ops_match_numpy_in_both_paths(flip_h, flip_w, k, backend):
    rng = np.random.default_rng(3)
    image = rng.random((1, 40, 40), dtype=np.float32)
    src = source((image > 0.7).astype(np.uint8), image=image)
    c = Centres(np.array([0]), np.array([0]), np.array([20]), np.array([21]), np.array([False]))
    plain, plain_mask = render([src], c, (16, 16), spatial=_params(1, flip_h, flip_w, k), backend=backend)
    window = image[0, 12:28, 13:29]
    expected = np.rot90(window[::-1 if flip_h else 1, ::-1 if flip_w else 1], k)
    np.testing.assert_array_equal(plain[0, ..., 0], expected)
    # The interpolating path with an (almost) identity warp gives the same patch.
    warped, warped_mask = render([src], c, (16, 16), spatial=_params(1, flip_h, flip_w, k, scale=1 + 1e-7),
                                 backend=backend)
    np.testing.assert_allclose(warped[0, ..., 0], expected, atol=1e-4)
    np.testing.assert_array_equal(warped_mask, plain_mask)


@pytest.mark.parametrize("backend", backends())
def test_rotation_matches_scipy_affine_transform(backend):
    rng = np.random.default_rng(4)
    image = ndimage.gaussian_filter(rng.random((1, 80, 80)), 2).astype(np.float32)
    src = source(np.zeros((1, 80, 80), np.uint8), image=image)
    c = Centres(np.array([0]), np.array([0]), np.array([40]), np.array([40]), np.array([False]))
    angle, scale = 12.0, 1.2
    out, _ = render([src], c, (32, 32), spatial=_params(1, angle=angle, scale=scale), backend=backend)
    t = np.deg2rad(angle)
    m = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]) / scale
    centre_out = np.array([15.5, 15.5])
    centre_in = np.array([40 - 16 + 15.5] * 2)
    oracle = ndimage.affine_transform(image[0].astype(np.float64), m, offset=centre_in - m @ centre_out,
                                      output_shape=(32, 32), order=1)
    np.testing.assert_allclose(out[0, ..., 0], oracle, atol=1e-5)


def test_errors():
    src = source(two_lesions())
    with pytest.raises(ValueError, match="at least one source"):
        PatchSampler([], (16, 16))
    with pytest.raises(ValueError, match="two positive integers"):
        PatchSampler([src], (0, 16))
    with pytest.raises(ValueError, match=r"lesion_fraction must lie in \[0, 1\]"):
        PatchSampler([src], (16, 16), lesion_fraction=-0.1)
    with pytest.raises(ValueError, match="jitter must be >= 0 and < half"):
        PatchSampler([src], (16, 16), jitter=8)
    c = Centres(np.array([0]), np.array([0]), np.array([8]), np.array([8]), np.array([False]))
    with pytest.raises(ValueError, match="odd 90-degree rotations need a square patch"):
        render([src], c, (16, 32), spatial=_params(1, k=1))
    with pytest.raises(ValueError, match="backend must be 'cv2' or 'numpy'"):
        render([src], c, (16, 16), backend="torch")


def test_rand_lesion_patchd_dict_transform():
    lab = two_lesions()
    image = np.random.default_rng(0).random(lab.shape, dtype=np.float32)
    t = RandLesionPatchd(patch_size=(32, 32), num_samples=4, lesion_fraction=0.5, context_slices=3, seed=5)
    out = t({"image": image, "label": lab, "case_id": "x"})
    assert out["image"].shape == (4, 32, 32, 3) and out["label"].shape == (4, 32, 32)
    assert t.last_params["lesion"] == [True, True, False, False]
    again = RandLesionPatchd(patch_size=(32, 32), num_samples=4, context_slices=3).set_random_state(5)(
        {"image": image, "label": lab})
    np.testing.assert_array_equal(again["image"], out["image"])
    with pytest.raises(KeyError, match="sample has no key 'label'"):
        t({"image": image})
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        RandLesionPatchd(num_samples=0)
    with pytest.raises(ValueError, match="differ in shape"):
        t({"image": image, "label": lab[:2]})


@pytest.mark.parametrize("backend", backends())
def test_warped_patch_outside_volume_reads_padding(backend):
    image = np.ones((1, 20, 20), np.float32)
    lab = np.ones((1, 20, 20), np.uint8)
    src = source(lab, image=image, pad=-3.0)
    c = Centres(np.array([0]), np.array([0]), np.array([0]), np.array([0]), np.array([False]))
    out, mask = render([src], c, (16, 16), spatial=_params(1, angle=5.0), backend=backend)
    # The top-left quadrant lies outside the volume, the bottom-right inside.
    assert np.all(out[0, :5, :5, 0] == -3.0) and np.all(mask[0, :5, :5] == 0)
    assert np.all(out[0, -4:, -4:, 0] == 1.0) and np.all(mask[0, -4:, -4:] == 1)
