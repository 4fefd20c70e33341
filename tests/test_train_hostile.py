"""medseg-train on hostile inputs (issue 14): one clear line, the documented exit code, checked
before the work where it can be, and no half-made run folder. Real lesion cases (tests/data/nrrd)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.cli.train import main

from _helpers import lesion_folders

#: A run of seconds: tiny network, eager steps.
T = ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--patch-size", "32", "32", "--filters", "4",
     "8", "--depth", "1", "--val-every", "1", "--gpus", "cpu", "--precision", "float32", "--run-eagerly",
     "--verbose", "2"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("medseg-train: error:")]
    assert len(lines) == 1 and "Traceback" not in "\n".join(err), err
    return lines[0]


@pytest.mark.slow
def test_depth_one_with_default_deep_supervision_trains(tmp_path, capsys):
    images, labels = lesion_folders(tmp_path)
    assert main(["--images", str(images), "--labels", str(labels), "--run-dir", str(tmp_path / "run"), *T]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["deep_supervision"] is False
    assert (tmp_path / "run" / "bundle.json").is_file()


def test_every_label_empty_is_refused_before_anything_is_written(tmp_path, capsys):
    from medseg.data.check import check_dataset
    from medseg.io import discover_cases

    images, labels = lesion_folders(tmp_path)
    for path in labels.iterdir():  # same files, no foreground left
        import SimpleITK as sitk

        img = sitk.ReadImage(str(path))
        empty = sitk.GetImageFromArray(np.zeros(sitk.GetArrayFromImage(img).shape, np.uint8))
        empty.CopyInformation(img)
        sitk.WriteImage(empty, str(path))
    report = check_dataset(discover_cases(images, labels))
    assert report.fatal and any("every one of the 2 valid labels is empty" in p.message for p in report.problems)
    assert main(["--images", str(images), "--labels", str(labels), "--run-dir", str(tmp_path / "run"), *T]) == 2
    assert "nothing to learn" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_huge_patch_is_refused_before_the_run_folder(tmp_path, capsys):
    images, labels = lesion_folders(tmp_path)
    args = [a if a != "32" else "100000" for a in T]
    assert main(["--images", str(images), "--labels", str(labels), "--run-dir", str(tmp_path / "run"), *args]) == 2
    line = one_error_line(capsys)
    assert "--patch-size" in line and "100000 x 100000" in line and "GiB" in line
    assert not (tmp_path / "run").exists()


def test_even_context_slices_is_refused_at_once(tmp_path, capsys):
    images, labels = lesion_folders(tmp_path)
    assert main(["--images", str(images), "--labels", str(labels), "--run-dir", str(tmp_path / "run"),
                 "--context-slices", "2", *T]) == 2
    line = one_error_line(capsys)
    assert "--context-slices" in line and "positive odd number" in line and "Plan." not in line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_labels_0_255_the_suggested_flag_is_accepted_by_medseg_train(tmp_path, capsys):
    images, labels = lesion_folders(tmp_path)
    for path in labels.iterdir():
        import SimpleITK as sitk

        img = sitk.ReadImage(str(path))
        out = sitk.GetImageFromArray((sitk.GetArrayFromImage(img) > 0).astype(np.uint8) * 255)
        out.CopyInformation(img)
        sitk.WriteImage(out, str(path))
    run = tmp_path / "run"
    assert main(["--images", str(images), "--labels", str(labels), "--run-dir", str(run), *T]) == 2
    line = one_error_line(capsys)
    assert "--map-labels 255:1" in line
    assert main(["--images", str(images), "--labels", str(labels), "--run-dir", str(run), "--map-labels", "255:1",
                 *T]) == 0
    assert json.loads((run / "config.json").read_text())["map_labels"] == "255:1"


def test_run_folder_inside_the_data_is_refused(tmp_path, capsys):
    images, labels = lesion_folders(tmp_path)
    for run in (images, images / "run"):
        assert main(["--images", str(images), "--labels", str(labels), "--run-dir", str(run), *T]) == 2
        assert "outside the --images folder" in one_error_line(capsys)
    assert sorted(p.name for p in images.iterdir()) == ["brain1.nrrd", "brain2.nrrd"]


def test_a_failure_after_the_run_folder_was_made_removes_it(tmp_path, capsys, monkeypatch):
    import medseg.train.assembly as assembly

    images, labels = lesion_folders(tmp_path)

    def broken(*args, **kwargs):
        raise TypeError("simulated bug while building the network")

    monkeypatch.setattr(assembly, "build_model", broken)
    code = main(["--images", str(images), "--labels", str(labels), "--run-dir", str(tmp_path / "run"), *T])
    assert code == 1
    line = one_error_line(capsys)
    assert "unexpected TypeError: simulated bug" in line and "--debug" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resume_from_another_working_folder(tmp_path, monkeypatch, capsys):
    from medseg.train import train

    monkeypatch.chdir(tmp_path)
    images, labels = lesion_folders(tmp_path / "data")
    rel = os.path.relpath
    assert main(["--images", rel(images), "--labels", rel(labels), "--run-dir", "run", *T]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert all(os.path.isabs(saved[k]) for k in ("images", "labels", "run_dir"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = train(dict(resume=str(tmp_path / "run"), epochs=2, verbose=0))
    assert result.epochs_completed == 2


def test_config_is_not_rewritten_by_a_failed_resume(tmp_path):
    from medseg.errors import InputError
    from medseg.train import train

    run = tmp_path / "run"
    run.mkdir()
    config = {"images": str(tmp_path / "missing_images"), "labels": str(tmp_path / "missing_labels"),
              "run_dir": str(run), "epochs": 1}
    (run / "config.json").write_text(json.dumps(config))
    before = (run / "config.json").read_bytes()
    with pytest.raises(InputError):
        train(dict(resume=str(run)))
    assert (run / "config.json").read_bytes() == before


# --- item 2: the disk of the run folder -------------------------------------------------------------
def in_small_tmpfs(tmp_path: Path, size_kb: int, script: str) -> subprocess.CompletedProcess:
    """Run ``script`` (sh) in a private mount namespace where ``tmp_path/mnt`` is a tmpfs of
    ``size_kb`` KiB: a real small disk, gone with the process (as in test_hostile_infer_eval.py)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size={size_kb}k tmpfs {mnt} || exit 97; "
                          + script], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if out.returncode == 97 or "unshare: " in out.stderr:
        pytest.skip(f"cannot mount a private tmpfs here: {out.stderr.strip()[:200]}")
    return out


def test_run_folder_without_room_is_refused_before_training(tmp_path):
    images, labels = lesion_folders(tmp_path)
    mnt = tmp_path / "mnt"
    train = " ".join([sys.executable, "-m", "medseg.cli.train", "--images", str(images), "--labels", str(labels),
                      "--run-dir", f"{mnt}/run", *T])
    # 1 MiB: room for the write check and the small JSON files, not for the outputs (about 4 MB).
    # Then the same disk filled up: the write check refuses it before anything else.
    script = (f"{train}; echo rc=$?; ls -A {mnt}; echo filled; dd if=/dev/zero of={mnt}/fill bs=4096 2>/dev/null; "
              f"{train}; echo rc=$?; ls -A {mnt}")
    out = in_small_tmpfs(tmp_path, 1024, script)
    first, second = out.stdout.split("filled")
    assert first.split()[-1] == "rc=2" and second.split()[-2:] == ["rc=2", "fill"], out.stdout + out.stderr
    room, full = out.stderr.strip().splitlines()
    assert re.fullmatch(rf"medseg-train: error: {mnt}/run: expected a run folder with room for the run's outputs: "
                        r"about \d+\.\d MB \(2 checkpoints of weights \+ optimizer state, model.keras, history, "
                        r"curves\), found 1\.\d MB free on its disk \(free space, or pass another --run-dir\)",
                        room), room
    assert full == (f"medseg-train: error: {mnt}/run: expected a writable run folder, found a full disk (no space "
                    "left on the device)")
    assert "epoch 1" not in out.stdout  # refused before model.fit


def test_disk_space_needed_counts_three_checkpoints_two_models_and_what_a_resume_has():
    import keras

    from medseg.train.rundir import RUN_FILES_MARGIN, disk_space_needed

    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(100)])  # 1100 float32 weights
    weights = 1100 * 4
    assert disk_space_needed(model) == 3 * 3 * weights + 2 * weights + RUN_FILES_MARGIN
    assert disk_space_needed(model, existing=2 * 3 * weights + weights) == 3 * weights + weights + RUN_FILES_MARGIN
    assert disk_space_needed(model, existing=10**9) == 3 * weights + weights + RUN_FILES_MARGIN


@pytest.fixture()
def own_log_handler():
    """The command's log handler on this test's stderr (it keeps the stream it first saw, which an
    earlier test's capture may have closed)."""
    import logging

    logger = logging.getLogger("medseg")

    def drop():
        for handler in [h for h in logger.handlers if getattr(h, "_medseg_cli", False)]:
            logger.removeHandler(handler)

    drop()
    yield
    drop()


@pytest.mark.slow
def test_disk_full_at_a_checkpoint_ends_the_run_in_one_line_and_keeps_the_last(tmp_path, capsys, monkeypatch,
                                                                                own_log_handler):
    import medseg.train.checkpoint as checkpoint

    real = checkpoint.write_weights

    def write(model, path):
        if path.parent.name.startswith("epoch-0002"):  # another process filled the disk
            path.write_bytes(b"the first blocks of a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(model, path)

    monkeypatch.setattr(checkpoint, "write_weights", write)
    images, labels = lesion_folders(tmp_path)
    run = tmp_path / "run"
    args = [a if a != "1" else "2" for a in T[:2]] + T[2:]  # --epochs 2
    assert main(["--images", str(images), "--labels", str(labels), "--run-dir", str(run), *args]) == 2
    assert one_error_line(capsys) == (
        f"medseg-train: error: {run}/checkpoints/epoch-0002/state.weights.h5: expected room on its disk for the "
        "run's outputs, found a full disk (no space left on the device) (training stopped in epoch 2; checkpoint "
        f"epoch-0001 is complete: free space, then continue with --resume {run})")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-0001", "latest"]
    monkeypatch.setattr(checkpoint, "write_weights", real)
    assert main(["--resume", str(run), "--verbose", "2"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "epoch-0001 (epoch 1" in out and "epoch 2/2" in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-0001", "epoch-0002", "latest"]


#: medseg-train whose checkpoint of epoch 2 finds the disk filled by "another process" (argv[1]).
FILL_BEFORE_EPOCH_2 = """
import os, sys
from medseg.cli._common import import_tensorflow_quietly
import_tensorflow_quietly()  # as medseg-train does, before the import below needs TensorFlow
import medseg.train.callbacks as callbacks
from medseg.cli.train import main

real = callbacks.save_checkpoint

def save(run_dir, model, state, **kwargs):
    if state["epoch"] == 2:
        fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT)
        for block in (65536, 4096, 1):
            try:
                while True:
                    os.write(fd, bytes(block))
            except OSError:
                pass
        os.close(fd)
    return real(run_dir, model, state, **kwargs)

callbacks.save_checkpoint = save
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_disk_filled_during_training_is_one_line_no_crash_and_resumable(tmp_path):
    # A real full disk (HDF5 writing onto it crashed the interpreter: exit 139 after dozens of
    # h5py tracebacks); 8 MiB pass the space check, then the disk is filled before epoch 2's checkpoint.
    images, labels = lesion_folders(tmp_path)
    mnt = tmp_path / "mnt"
    run = mnt / "run"
    args = " ".join([a if a != "1" else "2" for a in T[:2]] + T[2:])
    script = (f"{sys.executable} -c '{FILL_BEFORE_EPOCH_2}' {mnt}/fill --images {images} --labels {labels} "
              f"--run-dir {run} {args}; echo rc=$?; ls -A {run}/checkpoints; rm {mnt}/fill; "
              f"{sys.executable} -m medseg.cli.train --resume {run} --verbose 2; echo rc=$?; ls -A {run}/checkpoints")
    out = in_small_tmpfs(tmp_path, 8192, script)
    assert "Traceback" not in out.stderr and "Exception ignored" not in out.stderr, out.stderr
    first, resumed = out.stdout.split("rc=2\n")
    assert first.count("epoch 1/2") == 1 and "epoch 2/2" not in first
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]  # besides the info lines
    assert len(errors) == 1 and errors[0].startswith(f"medseg-train: error: {run}/checkpoints/epoch-0002"), errors
    assert errors[0].endswith("found a full disk (no space left on the device) (training stopped in epoch 2; "
                              f"checkpoint epoch-0001 is complete: free space, then continue with --resume {run})")
    assert resumed.split("\n")[:2] == ["epoch-0001", "latest"]  # no half checkpoint left
    assert "epoch 2/2" in resumed and "rc=0" in resumed and resumed.split()[-3:] == ["epoch-0001", "epoch-0002",
                                                                                    "latest"]
