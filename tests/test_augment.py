"""Joint augmentation: image/mask alignment (Dice 1), exact discrete ops, intensity values, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.transforms.augment import (
    AugmentConfig,
    Augmenter,
    IntensityParams,
    check_alignment,
)
from medseg.transforms.dictionary import RandJointAugmentd
from medseg.transforms.batch import PatchBatch, run_random

HEAVY = AugmentConfig(rotate_prob=1.0, max_rotate_deg=30, scale_prob=1.0, elastic_prob=0.5)


@pytest.mark.parametrize("backend", ["numpy", "cv2"])
@pytest.mark.parametrize("config", [AugmentConfig(), HEAVY, AugmentConfig.flips_only()], ids=["default", "heavy", "flips"])
def test_image_equal_to_mask_stays_equal(config, backend, monkeypatch):
    """The issue's proof of alignment: every augmented pair has Dice 1, over many seeds."""
    from medseg.transforms import warp as sampling

    if backend == "cv2":
        pytest.importorskip("cv2")
    monkeypatch.setattr(sampling, "_BACKEND", backend)
    aug = Augmenter(config)
    for seed in range(8):
        # 2.5D: 2 channels (warped one by one) and 3 or 5 (grouped four to an OpenCV call).
        assert check_alignment(aug, n=32, size=48, channels=(2, 3, 5)[seed % 3], seed=seed) == 1.0


def test_check_alignment_catches_misalignment():
    def image_only_flip(images, masks, rng):  # what ImageDataGenerator.flow(x, y) amounts to
        return images[:, ::-1], masks

    assert check_alignment(image_only_flip, n=32) < 0.5

    def soft_masks(images, masks, rng):
        return images, masks * 0.5

    assert check_alignment(soft_masks, n=4) == 0.0


def test_masks_stay_binary_and_intensity_only_touches_image():
    rng = np.random.default_rng(0)
    masks = (rng.random((16, 32, 32)) > 0.8).astype(np.uint8)
    images = rng.random((16, 32, 32, 1), dtype=np.float32)
    out_images, out_masks = Augmenter(HEAVY)(images, masks, rng=1)
    assert out_masks.dtype == np.uint8 and set(np.unique(out_masks)) <= {0, 1}
    intensity_only = AugmentConfig.none().__class__(flip_prob=0, rot90=False, rotate_prob=0, scale_prob=0,
                                                   gamma_prob=1, noise_prob=1, brightness_prob=1, contrast_prob=1)
    out_images, out_masks = Augmenter(intensity_only)(images, masks, rng=1)
    np.testing.assert_array_equal(out_masks, masks)
    assert not np.allclose(out_images, images)


def test_flips_and_rot90_are_exact_and_reported():
    rng = np.random.default_rng(2)
    images = rng.random((12, 16, 16, 3), dtype=np.float32)
    masks = (images[..., 0] > 0.5).astype(np.uint8)
    aug = Augmenter(AugmentConfig.flips_only())
    out_images, out_masks = aug(images, masks, rng=3)
    sp = aug.last_params["spatial"]
    assert any(sp["flip_h"]) and any(sp["rot90"])
    for b in range(12):
        fh, fw, k = sp["flip_h"][b], sp["flip_w"][b], sp["rot90"][b]
        expected = np.rot90(images[b][::-1 if fh else 1, ::-1 if fw else 1], k)
        np.testing.assert_array_equal(out_images[b], expected)
        np.testing.assert_array_equal(out_masks[b], np.rot90(masks[b][::-1 if fh else 1, ::-1 if fw else 1], k))
    # Non-square patches get only even quarter turns.
    out, _ = aug(images[:, :, :8], masks[:, :, :8], rng=4)
    assert out.shape == (12, 16, 8, 3) and all(k % 2 == 0 for k in aug.last_params["spatial"]["rot90"])


def test_determinism_given_seed():
    rng = np.random.default_rng(5)
    images = rng.random((8, 24, 24, 1), dtype=np.float32)
    masks = (images[..., 0] > 0.6).astype(np.uint8)
    a1, m1 = Augmenter(HEAVY)(images, masks, rng=np.random.default_rng(9))
    a2, m2 = Augmenter(HEAVY)(images, masks, rng=np.random.default_rng(9))
    a3, _ = Augmenter(HEAVY)(images, masks, rng=np.random.default_rng(10))
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(m1, m2)
    assert not np.array_equal(a1, a3)


def _params(B, brightness=1.0, contrast=1.0, gamma=1.0, noise=0.0):
    return IntensityParams(np.full(B, brightness), np.full(B, contrast), np.full(B, gamma), np.full(B, noise),
                           np.zeros(B, int), np.ones(B))


@pytest.mark.parametrize("backend", ["numpy", "cv2"])
def test_intensity_hand_values(backend, monkeypatch):
    from medseg.transforms import warp as sampling

    if backend == "cv2":
        pytest.importorskip("cv2")
    monkeypatch.setattr(sampling, "_BACKEND", backend)
    aug = Augmenter()
    x = np.array([0.0, 0.5, 1.0, 2.0], np.float32).reshape(1, 2, 2, 1)
    # gamma 2 on the patch rescaled to [0, 1] ([0, .25, .5, 1]) -> [0, .0625, .25, 1], back to [0, 2].
    out = aug.apply_intensity(x.copy(), _params(1, gamma=2.0))
    np.testing.assert_allclose(out.ravel(), [0, 0.125, 0.5, 2.0], rtol=1e-6)
    # brightness 2 then contrast 0.5 about the mean: 2x = [0, 1, 2, 4], mean 1.75 -> (2x - 1.75) / 2 + 1.75.
    out = aug.apply_intensity(x.copy(), _params(1, brightness=2.0, contrast=0.5))
    np.testing.assert_allclose(out.ravel(), [0.875, 1.375, 1.875, 2.875], rtol=1e-6)
    # Noise: zero patch + N(0, 0.1) -> std 0.1.
    z = np.zeros((1, 128, 128, 1), np.float32)
    out = aug.apply_intensity(z, _params(1, noise=0.1))
    assert out.std() == pytest.approx(0.1, rel=0.05) and abs(out.mean()) < 0.005


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"flip_prob": 1.5}, r"flip_prob must lie in \[0, 1\]"),
        ({"scale_range": (1.2, 0.8)}, "scale_range must be"),
        ({"gamma_range": (0.0, 1.0)}, "gamma_range must be"),
        ({"noise_std": (-0.1, 0.1)}, "noise_std must be"),
        ({"elastic_grid": 1}, "elastic_grid >= 2"),
    ],
)
def test_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AugmentConfig(**kwargs)


def test_shape_mismatch_and_dict_transform():
    images = np.zeros((2, 8, 8, 1), np.float32)
    with pytest.raises(ValueError, match=r"expected images \(B, H, W, C\) and masks \(B, H, W\)"):
        Augmenter()(images, np.zeros((2, 8, 4)), rng=0)
    t = RandJointAugmentd(config=AugmentConfig.flips_only(), seed=1)
    masks = np.zeros((2, 8, 8), np.uint8)
    masks[:, 0, 0] = 1
    out = t({"image": images + masks[..., None], "label": masks, "case_id": "p7"})
    assert out["label"].shape == (2, 8, 8) and t.last_params["spatial"]["flip_h"] is not None
    np.testing.assert_array_equal(out["image"][..., 0], out["label"])
    with pytest.raises(KeyError, match="sample has no key 'label'"):
        t({"image": images})
    # Run by the executor, the failure keeps its type and gets a note naming the step.
    with pytest.raises(KeyError, match="sample has no key 'label'") as info:
        run_random([t], PatchBatch.of({"image": images, "case_id": "p7"}, np.random.default_rng(0)))
    assert any("RandJointAugmentd(keys=('image', 'label'))" in n for n in info.value.__notes__)


def test_elastic_moves_pixels_smoothly():
    rng = np.random.default_rng(6)
    images = np.zeros((4, 32, 32, 1), np.float32)
    images[:, 8:24, 8:24] = 1
    masks = images[..., 0].astype(np.uint8)
    cfg = AugmentConfig(flip_prob=0, rot90=False, rotate_prob=0, scale_prob=0, elastic_prob=1.0, elastic_px=3.0,
                        gamma_prob=0, noise_prob=0, brightness_prob=0, contrast_prob=0)
    out_images, out_masks = Augmenter(cfg)(images, masks, rng=rng)
    assert not np.array_equal(out_masks, masks)  # the square was deformed
    assert abs(int(out_masks.sum()) - int(masks.sum())) < 0.3 * masks.sum()  # but not destroyed
    np.testing.assert_array_equal(out_images[..., 0] > 0.5, out_masks.astype(bool))


def test_warp_backend_env_override(monkeypatch):
    from medseg.transforms import warp

    monkeypatch.setattr(warp, "_BACKEND", None)
    monkeypatch.setenv("MEDSEG_WARP_BACKEND", "numpy")
    assert warp.warp_backend() == "numpy"
    monkeypatch.setattr(warp, "_BACKEND", None)
    monkeypatch.delenv("MEDSEG_WARP_BACKEND")
    try:
        import cv2  # noqa: F401

        expected = "cv2"
    except ImportError:
        expected = "numpy"
    assert warp.warp_backend() == expected
