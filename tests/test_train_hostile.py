"""medseg-train on hostile inputs (issue 14): one clear line, the documented exit code, checked
before the work where it can be, and no half-made run folder. Real lesion cases (tests/data/nrrd)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.cli.train import main

DATA = Path(__file__).parent / "data"
#: A run of seconds: tiny network, eager steps.
T = ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--patch-size", "32", "32", "--filters", "4",
     "8", "--depth", "1", "--val-every", "1", "--gpus", "cpu", "--precision", "float32", "--run-eagerly",
     "--verbose", "2"]


def lesion_folders(root: Path, cases=("brain1", "brain2")) -> tuple[Path, Path]:
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for case in cases:
        shutil.copy(DATA / "nrrd" / f"{case}_image.nrrd", images / f"{case}.nrrd")
        shutil.copy(DATA / "nrrd" / f"{case}_label.nrrd", labels / f"{case}.nrrd")
    return images, labels


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
    import medseg.train.loop as loop

    images, labels = lesion_folders(tmp_path)

    def broken(*args, **kwargs):
        raise TypeError("simulated bug while building the network")

    monkeypatch.setattr(loop, "build_model", broken)
    code = main(["--images", str(images), "--labels", str(labels), "--run-dir", str(tmp_path / "run"), *T])
    assert code == 1
    line = one_error_line(capsys)
    assert "unexpected TypeError: simulated bug" in line and "--debug" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resume_from_another_working_folder(tmp_path, monkeypatch, capsys):
    from medseg.train.loop import train

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
    from medseg.train.loop import train

    run = tmp_path / "run"
    run.mkdir()
    config = {"images": str(tmp_path / "missing_images"), "labels": str(tmp_path / "missing_labels"),
              "run_dir": str(run), "epochs": 1}
    (run / "config.json").write_text(json.dumps(config))
    before = (run / "config.json").read_bytes()
    with pytest.raises(InputError):
        train(dict(resume=str(run)))
    assert (run / "config.json").read_bytes() == before
