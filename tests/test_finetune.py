"""Fine-tuning (``medseg-train --init-from RUN_DIR``, :func:`medseg.train.finetune.finetune`): the
run starts from the parent's exact weights, keeps its network, classes, plan and pipeline, uses
the fine-tuning schedule, records its parent (path and SHA-256) and refuses other classes.

Tiny models on the synthetic lesion volumes of tests/test_train.py: seconds per run.
"""

from __future__ import annotations

import hashlib
import json

import keras
import numpy as np
import pytest

from medseg.errors import InputError

from test_train import TINY, synthetic_dataset

pytestmark = pytest.mark.slow


class FirstWeights(keras.callbacks.Callback):
    """The model's weights before its first training step."""

    def on_train_begin(self, logs=None):
        self.weights = [np.array(w) for w in self.model.get_weights()]


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A tiny binary bundle trained on 3 synthetic cases (every case trains, last model kept)."""
    from medseg.train import train

    root = tmp_path_factory.mktemp("parent")
    images, labels = synthetic_dataset(root, n_cases=3)
    result = train(dict(TINY, images=str(images), labels=str(labels), run_dir=str(root / "run"), val_fraction=0,
                        seed=1))
    return root, images, labels, result


def test_fine_tuned_run_starts_from_the_parents_exact_weights(parent, tmp_path):
    from medseg.infer.bundle import load_bundle
    from medseg.train import train
    from medseg.train.schedule import FINETUNE_LR

    root, images, labels, _ = parent
    first = FirstWeights()
    # Other network settings and seed on purpose: the bundle's network is rebuilt, its weights loaded.
    result = train(dict(TINY, images=str(images), labels=str(labels), run_dir=str(tmp_path / "child"),
                        val_fraction=0, seed=7, filters=[8, 16, 32], init_from=str(root / "run")),
                   callbacks=[first])
    parent_weights = load_bundle(root / "run").model.get_weights()
    assert len(first.weights) == len(parent_weights)
    assert all(np.array_equal(a, b) for a, b in zip(first.weights, parent_weights))
    child = load_bundle(tmp_path / "child")
    assert not all(np.array_equal(a, b) for a, b in zip(child.model.get_weights(), parent_weights))  # it trained

    cfg = result.config
    assert (cfg.filters, cfg.depth, cfg.network) == ([4, 8, 16], 2, "unetpp") and cfg.cpu_sizing is False
    assert cfg.lr == FINETUNE_LR
    info = json.loads((tmp_path / "child" / "bundle.json").read_text())
    digest = hashlib.sha256((root / "run" / "model.keras").read_bytes()).hexdigest()
    assert info["parent"] == {"path": str((root / "run").resolve()), "sha256": digest}
    assert child.contract.parent.sha256 == digest
    # The parent's plan and pipeline: same deterministic steps.
    parent_info = json.loads((root / "run" / "bundle.json").read_text())
    assert info["plan"] == parent_info["plan"]
    assert info["pipeline"] == parent_info["pipeline"]
    assert "parent" not in parent_info  # bundles trained from scratch read as before
    from medseg.cli.info import describe_bundle, format_text

    assert f"fine-tuned from {(root / 'run').resolve()}" in format_text(describe_bundle(tmp_path / "child"))


def test_fine_tuning_schedule(monkeypatch):
    from medseg.train import schedule as schedule_module
    from medseg.train.assembly import make_schedule
    from medseg.train.config import TrainConfig

    cfg = TrainConfig(init_from="somewhere", lr=3e-4, epochs=1, steps_per_epoch=100)
    schedule = make_schedule(cfg, 3e-4)
    assert schedule.warmup_steps == schedule_module.FINETUNE_WARMUP_STEPS == 0  # measured: none (docs/train.md)
    assert float(schedule(0)) == pytest.approx(3e-4)  # the peak rate from the first step
    monkeypatch.setattr(schedule_module, "FINETUNE_WARMUP_STEPS", 10)
    warm = make_schedule(cfg, 3e-4)
    assert warm.warmup_steps == 10 and float(warm(0)) == pytest.approx(3e-5)
    assert make_schedule(TrainConfig(), 1e-3).warmup_steps == 0  # from scratch: never
    assert make_schedule(TrainConfig(init_from="x", warmup_epochs=1, steps_per_epoch=7), 1e-3).warmup_steps == 7


def test_other_classes_are_refused_in_one_line(parent, tmp_path):
    from medseg.train import train

    root, images, labels, _ = parent
    with pytest.raises(InputError) as err:
        train(dict(TINY, images=str(images), labels=str(labels), run_dir=str(tmp_path / "child"),
                   labels_map=["tumour=1", "edema=2"], init_from=str(root / "run")))
    text = str(err.value)
    assert "\n" not in text and "background, lesion" in text and "tumour" in text
    assert not (tmp_path / "child").exists()


def test_other_context_slices_are_refused(parent, tmp_path):
    from medseg.train import train

    root, images, labels, _ = parent
    with pytest.raises(InputError, match="input channels of the bundle's model"):
        train(dict(TINY, images=str(images), labels=str(labels), run_dir=str(tmp_path / "child"),
                   plan={"context_slices": 3}, init_from=str(root / "run")))


def test_cli_init_from_with_ignore_label(parent, tmp_path, capsys):
    from medseg.cli.train import main

    root, images, labels, _ = parent
    args = ["--images", str(images), "--labels", str(labels), "--init-from", str(root / "run"), "--run-dir",
            str(tmp_path / "child"), "--ignore-label", "9", "--batch-size", "2", "--steps-per-epoch", "2",
            "--epochs", "1", "--precision", "float32", "--run-eagerly", "--val-fraction", "0", "--max-time-s", "120"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"fine-tuning {(root / 'run').resolve()}" in out
    info = json.loads((tmp_path / "child" / "bundle.json").read_text())
    step = next(t for t in info["pipeline"]["transforms"] if t["name"] == "LabelClassesd")
    assert step["args"]["ignore"] == 9 and info["plan"]["ignore_label"] == 9
    assert info["parent"]["path"] == str((root / "run").resolve())


def test_finetune_library_call_with_a_partial_case(parent, tmp_path):
    """What a viewer calls: the bundle, its training data, one corrected case (labels on two
    slices, the rest unlabelled), a budget; events in order; the training data untouched."""
    from medseg.events import Finished, RunStarted
    from medseg.io import read_volume
    from medseg.train.finetune import finetune

    root, images, labels, _ = parent
    before = sorted(p.name for p in labels.iterdir())
    image = read_volume(images / "case0.nii.gz")
    full = np.asarray(read_volume(labels / "case0.nii.gz").array)
    partial = np.full(full.shape, 255, np.uint8)
    partial[:, :, 3:5] = full[:, :, 3:5]
    label = image.with_array(partial)
    seen = []
    result = finetune(root / "run", images=images, labels=labels, image=image, label=label, budget_s=60,
                      ignore_label=255, run_dir=tmp_path / "ft", events=seen.append, case_id="corrected",
                      steps_per_epoch=2, epochs=1, batch_size=2, run_eagerly=True, precision="float32")
    assert any(isinstance(e, RunStarted) for e in seen)
    assert isinstance(seen[-1], Finished)
    assert "corrected" in result.train_cases and len(result.train_cases) == 4
    assert sorted(p.name for p in labels.iterdir()) == before
    assert json.loads((tmp_path / "ft" / "bundle.json").read_text())["parent"]["path"] == str((root / "run").resolve())
    # The next correction of the same scan: the data the bundle names by default, the earlier
    # correction replaced by the new one (its label written as given).
    partial[:, :, 2] = full[:, :, 2]
    again = finetune(tmp_path / "ft", image=image, label=image.with_array(partial), ignore_label=255,
                     run_dir=tmp_path / "ft2", steps_per_epoch=2, epochs=1, batch_size=2, run_eagerly=True,
                     precision="float32")
    assert sorted(again.train_cases) == sorted(result.train_cases)
    written = np.asarray(read_volume(tmp_path / "ft2" / "data" / "labels" / "corrected.nii.gz").array)
    assert np.array_equal(written, partial)
    assert json.loads((tmp_path / "ft2" / "bundle.json").read_text())["parent"]["path"] == str(tmp_path / "ft")


def test_finetune_failure_leaves_no_folder(parent, tmp_path):
    from medseg.io import read_volume
    from medseg.train.finetune import finetune

    root, images, labels, _ = parent
    image = read_volume(images / "case1.nii.gz")
    label = image.with_array(np.full(image.shape, 255, np.uint8))  # nothing labelled: refused
    with pytest.raises(Exception, match="only the ignore value 255"):
        finetune(root / "run", images=images, labels=labels, image=image, label=label, ignore_label=255,
                 run_dir=tmp_path / "ft")
    assert not (tmp_path / "ft").exists()


def test_finetune_cancel_leaves_a_cancelled_bundle(parent, tmp_path):
    from medseg.events import CancelToken, Cancelled, RunCancelled
    from medseg.io import read_volume
    from medseg.train.finetune import finetune

    root, images, labels, _ = parent
    image = read_volume(images / "case1.nii.gz")
    label = read_volume(labels / "case1.nii.gz")
    token, seen = CancelToken(), []
    token.cancel()
    with pytest.raises(RunCancelled):
        finetune(root / "run", images=images, labels=labels, image=image, label=label, run_dir=tmp_path / "ft",
                 events=seen.append, cancel=token, steps_per_epoch=2, epochs=1, batch_size=2, run_eagerly=True,
                 precision="float32")
    assert isinstance(seen[-1], Cancelled)
    assert json.loads((tmp_path / "ft" / "bundle.json").read_text())["status"] == "cancelled"
