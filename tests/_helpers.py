"""Helpers shared by several test files (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


def lesion_folders(root: Path, cases=("brain1", "brain2")) -> tuple[Path, Path]:
    """``root/images`` and ``root/labels`` holding copies of real NRRD lesion cases (same names)."""
    images, labels = Path(root) / "images", Path(root) / "labels"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for case in cases:
        shutil.copy(DATA / "nrrd" / f"{case}_image.nrrd", images / f"{case}.nrrd")
        shutil.copy(DATA / "nrrd" / f"{case}_label.nrrd", labels / f"{case}.nrrd")
    return images, labels


def tiny_bundle(run: Path) -> Path:
    """A bundle of the smallest UNet++ (depth 1, 3 context slices, MR z-score plan) in ``run``:
    for tests of the commands, whose logic does not depend on the network (each call traces the
    model once; depth, padding and heads are tested in test_predictor.py)."""
    import keras

    from medseg.data.plan import Plan
    from medseg.infer.bundle import save_bundle
    from medseg.nets.unetpp import build_unetpp

    keras.utils.set_random_seed(3)
    model = build_unetpp(input_channels=3, filters=(4, 8), depth=1, deep_supervision=False, batch_norm=False)
    plan = Plan(modality="MR", context_slices=3, divisor=2, patch_size=(32, 32), normalization={"kind": "zscore"})
    save_bundle(run, model, plan, threshold=0.5)
    return run


def digest(path: Path) -> str:
    """SHA-256 of a file (inputs must come out of a command unchanged)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# Fixtures of the medseg-infer/medseg-eval tests; a test file imports the ones it uses.
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny bundle (:func:`tiny_bundle`) shared by the tests of one module."""
    return tiny_bundle(tmp_path_factory.mktemp("runs") / "exp1")


@pytest.fixture()
def no_env_model(monkeypatch):
    """No ``MEDSEG_MODEL`` from the caller's environment: tests name their model."""
    monkeypatch.delenv("MEDSEG_MODEL", raising=False)
