"""The training batches of the default pipelines, pinned: the same seed gives bit-identical batches.

The digests were computed with the batch maker before the random steps ran through one executor
(commit c396279); a refactor of the random half must leave them unchanged. Both warp backends
are pinned (OpenCV and numpy), with the default augmentation (rotations and scaling included, so
every label kind's warp is exercised) and with enhancement for the CT classes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medseg.data.cache import VolumeCache
from medseg.data.pipeline import BatchMaker
from medseg.data.plan import Plan
from medseg.io.classes import ClassSpec
from medseg.transforms import warp
from medseg.transforms.enhance import EnhancementConfig

CT_WINDOW = {"kind": "ct_window", "low_hu": -1000.0, "high_hu": 400.0}
ORGANS = ClassSpec.parse(["liver=5", "aorta=52"])
REGIONS = ClassSpec.from_dict({"names": ["whole", "core"], "ids": [[5, 52], [52]], "regions": True,
                               "region_order": [5, 52]})


def _plans() -> dict:
    common = dict(target_spacing_mm=None, patch_size=(32, 32), lesion_fraction=0.5)
    return {
        "binary": (Plan(modality="MR", normalization={"kind": "zscore"}, context_slices=3, **common), "binary"),
        "classes": (Plan(modality="CT", normalization=CT_WINDOW, classes=ORGANS.to_dict(), num_classes=3,
                         enhancement=EnhancementConfig().to_dict(), **common), "classes"),
        "regions": (Plan(modality="MR", normalization={"kind": "zscore"}, classes=REGIONS.to_dict(),
                         num_classes=REGIONS.num_classes, **common), "bits"),
    }


def _arrays(kind: str) -> list:
    rng = np.random.default_rng(21)
    out = []
    for i in range(3):
        image = rng.random((7, 48, 44), dtype=np.float32)
        label = np.zeros(image.shape, np.uint8)
        if i:  # case 0 has no foreground
            label[2:5, 8:20, 10:22] = 1
            label[3, 30:38, 25:33] = 2 if kind != "binary" else 1
            if kind == "bits":
                label[3, 12:16, 12:16] = 3   # the core inside the whole
        out.append((f"c{i}", image, label))
    return out


def _digest(plan: Plan, kind: str, backend: str, monkeypatch) -> str:
    monkeypatch.setattr(warp, "_BACKEND", backend)
    cache = VolumeCache.from_arrays(_arrays(kind), plan, body_threshold=0.3, label_kind=kind)
    maker = BatchMaker(cache, plan, batch_size=6, seed=5)
    steps = [type(t).__name__ for t in maker.pipeline.random]
    assert steps == ["RandLesionPatchd"] + (["RandEnhancementd"] if plan.enhancement else []) + ["RandJointAugmentd"]
    h = hashlib.sha256()
    for i in range(4):
        images, masks = maker.batch(i)
        assert images.dtype == np.float32 and masks.dtype == np.int32
        h.update(images.tobytes())
        h.update(masks.tobytes())
    return h.hexdigest()


EXPECTED = {
    ("binary", "cv2"): "6f81bc37ed7777ba26801d7b5618bf5e2571c4134a3099723cedb77dd0395f17",
    ("binary", "numpy"): "3a177eec6f37f1357e1d59bf647fd1d4218b9943ef63dc140bc3b4c11bdfa55a",
    ("classes", "cv2"): "eb934cab8e8af6746cdc07434970b59a8737b1e7feeb8c0a8cec202163ec8d01",
    ("classes", "numpy"): "6d08f67cb9b7c5602d518ed46c38ac68410971e49e05bb2cc404bdabb18a883d",
    ("regions", "cv2"): "58a3e5d6145518984d2a88f5c5fef4af9af2f41975fe50b2ebd09311677b212a",
    ("regions", "numpy"): "64b29302be25bd9ae44b8c6245101521b9fe6dd0e1d0a5a6bc120c993cc49715",
}


#: numpy picks its SIMD kernels by CPU, and its AVX-512 ones (sin/cos of the rotation angles among
#: them) round differently from the AVX2 ones the pins were made with: on an AVX-512 machine the
#: numpy warp's batches differ in the last bits. They are computed in a child process whose numpy
#: is held to AVX2 (x86-64-v3, which every machine here has), so the pins hold on every CPU.
_AVX2_ONLY = {"NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL "
                                          "AVX512_ICL AVX512_SPR"}


def _digest_on_avx2(name: str, backend: str) -> str:
    here = Path(__file__).resolve().parent
    code = (f"import sys; sys.path.insert(0, {str(here)!r}); import pytest, test_batch_digests as t; "
            f"plan, kind = t._plans()[{name!r}]; print(t._digest(plan, kind, {backend!r}, pytest.MonkeyPatch()))")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **_AVX2_ONLY}, cwd=here.parent,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("backend", ["cv2", "numpy"])
@pytest.mark.parametrize("name", ["binary", "classes", "regions"])
def test_default_batches_are_unchanged(name, backend, monkeypatch):
    if backend == "cv2":
        pytest.importorskip("cv2")
        plan, kind = _plans()[name]
        assert _digest(plan, kind, backend, monkeypatch) == EXPECTED[name, backend]
    else:
        assert _digest_on_avx2(name, backend) == EXPECTED[name, backend]


def test_ct_binary_batches_with_contrast_phases_are_pinned(monkeypatch):
    """The binary CT recipe since issue 23 (simulated contrast phases, window [-1000, 650] HU), pinned
    with the OpenCV warp (the numpy backend's digests depend on the machine's floating point)."""
    pytest.importorskip("cv2")
    from medseg.transforms.phase import PhaseConfig

    monkeypatch.setattr(warp, "_BACKEND", "cv2")
    plan = Plan(modality="CT", normalization={"kind": "ct_window", "low_hu": -1000.0, "high_hu": 650.0},
                contrast_phases=PhaseConfig.for_classes(["lesion"]).to_dict(), target_spacing_mm=None,
                patch_size=(32, 32), lesion_fraction=0.5)
    cache = VolumeCache.from_arrays(_arrays("binary"), plan, body_threshold=0.3, label_kind="binary")
    maker = BatchMaker(cache, plan, batch_size=6, seed=5)
    assert [type(t).__name__ for t in maker.pipeline.random] == ["RandLesionPatchd", "RandContrastPhased",
                                                                 "RandJointAugmentd"]
    h = hashlib.sha256()
    for i in range(4):
        images, masks = maker.batch(i)
        h.update(images.tobytes())
        h.update(masks.tobytes())
    assert maker.last_params["contrast_phase"]["phase"]  # the step drew (and recorded) its phases
    assert h.hexdigest() == CT_PHASES_DIGEST


CT_PHASES_DIGEST = "34d0b7668e192830b81329d1bfcd87701bf368952b6bb07627130c5d7e2ba5b5"
