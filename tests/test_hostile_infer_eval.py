"""Hostile inputs and faults for medseg-infer and medseg-eval (issue 14): found before the work,
one clear line naming the file, no half result left behind, inputs untouched."""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medseg.cli.evaluate import main as eval_main
from medseg.cli.infer import main as infer_main
from medseg.io import read_volume

from _helpers import digest, no_env_model, run_dir  # noqa: F401  (fixtures)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
NIFTI = DATA / "nifti" / "anatomical.nii"  # 33 x 41 x 25, LAS
NRRD = DATA / "nrrd" / "breast1_image.nrrd"  # 45 x 120 x 21, LPS
LABEL = DATA / "nrrd" / "breast1_label.nrrd"


@pytest.fixture(autouse=True)
def _no_env_model(no_env_model):
    """Every test here runs without the caller's ``MEDSEG_MODEL``."""


def error_lines(err: str, prog: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]


def nifti_like(path: Path, array: np.ndarray, like: Path = NIFTI) -> Path:
    """``array`` saved with the geometry of the real file ``like``."""
    nib.save(nib.Nifti1Image(array, nib.load(like).affine), path)
    return path


def model_must_not_run(monkeypatch):
    from medseg.infer.predictor import Predictor

    def refuse(*args, **kwargs):
        pytest.fail("the model ran on an input that should have been refused first")

    monkeypatch.setattr(Predictor, "segment", refuse)
    monkeypatch.setattr(Predictor, "predict_proba", refuse)


@pytest.fixture()
def read_only(tmp_path):
    """Make a folder read-only: mode 0555, or immutable (chattr +i) for root, who ignores modes."""
    made = []

    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)
        made.append(folder)
        if os.access(folder, os.W_OK):
            if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
                pytest.skip("running as root without chattr: cannot make a read-only folder")
        return folder

    yield make
    for folder in made:
        if shutil.which("chattr"):
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)


def in_small_tmpfs(tmp_path: Path, size_kb: int, script: str, *, fill: bool = False) -> subprocess.CompletedProcess:
    """Run ``script`` (sh) in a private mount namespace where ``tmp_path/mnt`` is a tmpfs of
    ``size_kb`` KiB (filled up first with ``fill``): a real full disk, gone with the process."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    setup = f"mount -t tmpfs -o size={size_kb}k tmpfs {mnt} || exit 97; "
    if fill:
        setup += f"dd if=/dev/zero of={mnt}/fill bs=4096 2>/dev/null; "
    out = subprocess.run(["unshare", "-rm", "sh", "-c", setup + script], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if out.returncode == 97 or "unshare: " in out.stderr:
        pytest.skip(f"cannot mount a private tmpfs here: {out.stderr.strip()[:200]}")
    return out


# --- item 6: NaN and constant images -------------------------------------------------------------
def test_nan_image_is_one_line_naming_the_counts_before_the_model(run_dir, tmp_path, monkeypatch, capsys):
    array = np.asarray(nib.load(NIFTI).dataobj).astype(np.float32)
    array[0:3, 0:3, 0:3] = np.nan  # 27 NaN
    array[5, 5, 5] = np.inf
    array[6, 6, 6] = -np.inf
    source = nifti_like(tmp_path / "nan.nii.gz", array)
    before = digest(source)
    model_must_not_run(monkeypatch)
    out = tmp_path / "out"
    assert infer_main([str(source), "--model", str(run_dir), "-o", str(out)]) == 1
    errors = error_lines(capsys.readouterr().err, "medseg-infer")
    assert errors == [f"medseg-infer: error: {source}: expected an image with finite voxel values, found 27 NaN "
                      f"and 2 infinite voxels (of {array.size}) (replace them, e.g. by the background value, "
                      "before segmenting)"]
    assert "supplied range" not in errors[0]
    assert not out.exists() or not list(out.iterdir())
    assert digest(source) == before


def test_constant_image_is_refused_not_segmented(run_dir, tmp_path, capsys):
    zero = nifti_like(tmp_path / "zero.nii.gz", np.zeros(nib.load(NIFTI).shape, np.int16))
    good = tmp_path / "good.nii"
    shutil.copy(NIFTI, good)
    out = tmp_path / "out"
    assert infer_main([str(zero), str(good), "--model", str(run_dir), "-o", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    line = (f"{zero}: expected an image with varying intensities, found a constant image (every voxel 0) "
            "(nothing to segment: any result would be meaningless; check how the image was exported)")
    assert error_lines(err, "medseg-infer") == [f"medseg-infer: error: {line}"]
    assert "1 of 2 inputs failed" in err
    assert sorted(p.name for p in out.iterdir()) == ["good_seg.nii.gz"]  # no lesion volume of nothing


# --- item 7: outputs checked before the work; both files or neither ------------------------------
def test_read_only_output_folder_is_refused_before_the_model(run_dir, tmp_path, monkeypatch, capsys, read_only):
    import medseg.infer.bundle

    monkeypatch.setattr(medseg.infer.bundle, "load_bundle", lambda *a, **k: pytest.fail("model loaded"))
    folder = read_only(tmp_path / "ro")
    for out, named in ((folder, folder), (folder / "sub" / "x.nii.gz", folder / "sub"), (folder / "new/", folder / "new")):
        assert infer_main([str(NIFTI), "--model", str(run_dir), "-o", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"medseg-infer: error: {named}: expected a writable output folder, found ")
        assert err.count("\n") == 0 and ".tmp" not in err
    assert not list(folder.iterdir())


def test_output_folder_that_is_a_file(run_dir, tmp_path, capsys):
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    assert infer_main([str(NIFTI), "--model", str(run_dir), "-o", f"{blocker}/pred/"]) == 2
    err = capsys.readouterr().err
    assert f"{blocker / 'pred'}: expected an output folder, found a file in its place: {blocker}" in err
    assert blocker.read_text() == "not a folder"


def test_full_disk_is_refused_before_the_model(tmp_path):
    # Real: a tmpfs filled to the last block; --model names nothing, so a later check would say so.
    mnt = tmp_path / "mnt"
    script = f"{sys.executable} -m medseg.cli.infer {NIFTI} --model {tmp_path}/no-model -o {mnt}/out/; echo rc=$?"
    out = in_small_tmpfs(tmp_path, 256, script, fill=True)
    assert "rc=2" in out.stdout, out.stderr
    assert out.stderr.strip() == (f"medseg-infer: error: {mnt / 'out'}: expected a writable output folder, "
                                  "found a full disk (no space left on the device)")


@pytest.mark.slow
def test_full_disk_mid_write_leaves_neither_file(run_dir, tmp_path):
    # 160 KiB: the 64 KiB check and the 34 KB label map fit, the 135 KB probability map does not.
    mnt = tmp_path / "mnt"
    script = (f"{sys.executable} -m medseg.cli.infer {NIFTI} --model {run_dir} -o {mnt}/out/x.nii --probabilities; "
              f"echo rc=$?; echo listing:; ls -A {mnt}/out")
    before = digest(NIFTI)
    out = in_small_tmpfs(tmp_path, 160, script)
    assert "rc=1" in out.stdout, out.stderr
    assert out.stdout.split("listing:")[1].split() == []  # no x.nii without x_prob.nii, no temp file
    errors = error_lines(out.stderr, "medseg-infer")
    assert len(errors) == 1 and f"{mnt}/out/x_prob.nii: No space left on device" in errors[0]
    assert ".tmp" not in errors[0]
    assert digest(NIFTI) == before


def _failing_prob_writer(monkeypatch):
    """The probability map's writer hits a full disk (the label map's writes fine)."""
    import medseg.io.nifti

    real = medseg.io.nifti.write_nifti

    def write(volume, path):
        if volume.array.dtype == np.float32:
            Path(path).write_bytes(b"half a probability map")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(volume, path)

    monkeypatch.setattr(medseg.io.nifti, "write_nifti", write)


def test_probabilities_are_written_with_their_labels_or_not_at_all(run_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = [str(NIFTI), "--model", str(run_dir), "-o", str(out), "--probabilities"]
    assert infer_main(args) == 0
    earlier = {p.name: digest(p) for p in out.iterdir()}
    assert sorted(earlier) == ["anatomical_prob.nii.gz", "anatomical_seg.nii.gz"]
    _failing_prob_writer(monkeypatch)
    assert infer_main(args + ["--overwrite", "--threshold", "0"]) == 1
    errors = error_lines(capsys.readouterr().err, "medseg-infer")
    assert errors == [f"medseg-infer: error: {NIFTI}: {out / 'anatomical_prob.nii.gz'}: No space left on device"]
    # Neither file replaced (the new label map was ready, but not its probabilities), no temp file.
    assert {p.name: digest(p) for p in out.iterdir()} == earlier
    fresh = tmp_path / "fresh"
    assert infer_main([str(NIFTI), "--model", str(run_dir), "-o", str(fresh), "--probabilities"]) == 1
    assert not fresh.exists() or not list(fresh.iterdir())


def test_a_full_disk_stops_the_batch(run_dir, tmp_path, monkeypatch, capsys):
    from medseg.infer.predictor import Predictor

    calls = []
    real = Predictor.predict_proba
    monkeypatch.setattr(Predictor, "predict_proba",  # medseg-infer passes its event subscriber too
                        lambda self, v, **kw: calls.append(v.case_id) or real(self, v, **kw))
    _failing_prob_writer(monkeypatch)
    out = tmp_path / "out"
    assert infer_main([str(NIFTI), str(NRRD), "--model", str(run_dir), "-o", str(out), "--probabilities"]) == 1
    err = capsys.readouterr().err
    assert calls == ["anatomical"]  # the second case is not run: its outputs could not be written either
    assert "medseg-infer: stopped: the outputs cannot be written; 1 input not segmented" in err
    assert f"  - {NRRD}: not segmented (stopped)" in err
    assert not out.exists() or not list(out.iterdir())


def test_atomic_paths_put_the_old_set_back_when_a_move_fails(tmp_path, monkeypatch):
    import medseg.io.atomic as atomic

    a, b = tmp_path / "a_seg.nii.gz", tmp_path / "a_prob.nii.gz"
    a.write_text("old seg")
    b.write_text("old prob")
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == b and ".tmp" in Path(src).name and not Path(src).name.endswith(".old"):
            raise OSError(errno.EIO, "Input/output error", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="Input/output error"):
        with atomic.atomic_paths([a, b]) as (ta, tb):
            ta.write_text("new seg")
            tb.write_text("new prob")
    assert (a.read_text(), b.read_text()) == ("old seg", "old prob")
    assert sorted(os.listdir(tmp_path)) == ["a_prob.nii.gz", "a_seg.nii.gz"]


def test_stale_temporaries_are_only_our_own_of_dead_writers(tmp_path):
    from medseg.io.atomic import remove_stale_temporaries

    target = tmp_path / "case_seg.nii.gz"
    dead_pid = 4194304 + 1  # above Linux's largest pid_max: no such process
    dead = tmp_path / f".case_seg.nii.gz.{dead_pid}-abcd_123.tmp.nii.gz"
    aside = tmp_path / f".case_seg.nii.gz.{dead_pid}-wxyz_789.tmp.nii.gz.old"  # the previous output, moved aside
    mine = tmp_path / f".case_seg.nii.gz.{os.getpid()}-aaaaaaaa.tmp.nii.gz"  # this process writes it now
    others = [tmp_path / ".case_seg.nii.gz.swp", tmp_path / f".other_seg.nii.gz.{dead_pid}-abcd_123.tmp.nii.gz"]
    for path in (dead, mine, *others):
        path.write_bytes(b"partial")
    aside.write_bytes(b"previous output")
    assert remove_stale_temporaries(target) == [dead]
    assert target.read_bytes() == b"previous output"  # put back, as the interrupted writer would have
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["case_seg.nii.gz", mine.name] + [p.name for p in others])


STALL = """
import sys, time
from pathlib import Path
from medseg.io.atomic import atomic_path
with atomic_path(Path(sys.argv[1])) as tmp:
    tmp.write_bytes(b"the first bytes of an output")
    print("writing", flush=True)
    time.sleep(300)
"""


def _writer_killed_mid_write(target: Path) -> Path:
    """A real writer process killed with SIGKILL inside its write: returns the temp file it left."""
    proc = subprocess.Popen([sys.executable, "-c", STALL, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    left = [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.{proc.pid}-")]
    assert len(left) == 1 and left[0].read_bytes() == b"the first bytes of an output" and not target.exists()
    return left[0]


@pytest.mark.slow
def test_stale_temporaries_of_a_killed_writer_are_removed_by_the_next_run(run_dir, tmp_path, caplog):
    logger = logging.getLogger("medseg")
    logger.addHandler(caplog.handler)  # the command's own handler writes to the stderr it first saw
    try:
        with caplog.at_level(logging.INFO, logger="medseg"):
            _stale_temporaries(run_dir, tmp_path, caplog)
    finally:
        logger.removeHandler(caplog.handler)


def _stale_temporaries(run_dir: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "out"
    out.mkdir()
    # A writer still running keeps its temp file (its pid is alive); started first, as a writer
    # started later would itself clean up after the killed one.
    live = subprocess.Popen([sys.executable, "-c", STALL, str(out / "anatomical_seg.nii.gz")],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline().strip() == "writing"
        dead = _writer_killed_mid_write(out / "anatomical_seg.nii.gz")
        other = out / ".notes.txt.swp"  # not ours: kept
        other.write_text("x")
        assert infer_main([str(NIFTI), "--model", str(run_dir), "-o", str(out)]) == 0
        names = sorted(p.name for p in out.iterdir())
        assert not dead.exists() and dead.name not in names
        assert [n for n in names if n.startswith(f".anatomical_seg.nii.gz.{live.pid}-")]
        assert "anatomical_seg.nii.gz" in names and other.exists()
        assert f"removed {dead.name}, left by an interrupted write" in caplog.text
    finally:
        live.kill()
        live.wait(timeout=60)

    # medseg-eval: the report files of a killed run, and a temp file of an older medseg (no pid).
    ref = tmp_path / "ref.nrrd"
    shutil.copy(LABEL, ref)
    ev = tmp_path / "ev"
    ev.mkdir()
    dead_csv = _writer_killed_mid_write(ev / "metrics.csv")
    legacy = ev / ".report.html.k3j_x9az.tmp.html"
    legacy.write_text("<html")
    os.utime(legacy, (time.time() - 3600, time.time() - 3600))
    assert eval_main(["--pred", str(LABEL), "--ref", str(ref), "--out", str(ev), "--quiet", "--no-figures"]) == 0
    assert sorted(p.name for p in ev.iterdir()) == ["metrics.csv", "report.html", "summary.json"]
    assert not dead_csv.exists() and not legacy.exists()


# --- item 9 (CLI side; the bundle side is in test_bundle.py) -----------------------------------------
def test_modified_model_is_refused_unless_accepted(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    with open(run / "model.keras", "ab") as fh:  # still a loadable zip, but not the file trained
        fh.write(b"\n")
    out = tmp_path / "seg.nii.gz"
    assert infer_main([str(NIFTI), "--model", str(run), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"medseg-infer: error: {run / 'model.keras'}: expected the model recorded in "
                          f"{run / 'bundle.json'} (SHA-256 ")
    assert "found another file (SHA-256 " in err and "--accept-modified-model" in err and err.count("\n") == 0
    assert not out.exists()
    assert infer_main([str(NIFTI), "--model", str(run), "-o", str(out), "--accept-modified-model"]) == 0
    assert "not the model recorded in" in capsys.readouterr().err and out.is_file()


def test_truncated_model_is_reported_corrupt(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    data = (run / "model.keras").read_bytes()
    (run / "model.keras").write_bytes(data[:3000])
    assert infer_main([str(NIFTI), "--model", str(run), "-o", str(tmp_path / "seg.nii.gz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"medseg-infer: error: {run / 'model.keras'}: expected a Keras 3 model file (.keras zip), found a "
                   "corrupt or truncated file (not a zip archive, 3000 bytes) (the file is damaged: copy the run "
                   "folder again or retrain)")


# --- medseg-eval ---------------------------------------------------------------------------------
@pytest.fixture()
def pair(tmp_path):
    """pyradiomics' breast lesion mask (real NRRD) as reference, an eroded copy as prediction."""
    from scipy import ndimage

    ref_img = sitk.ReadImage(str(LABEL))
    ref = sitk.GetArrayFromImage(ref_img).astype(bool)
    pred = ndimage.binary_erosion(ref, structure=np.ones((1, 3, 3), bool)).astype(np.uint8)
    pred_img = sitk.GetImageFromArray(pred)
    pred_img.CopyInformation(ref_img)
    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    shutil.copy(LABEL, tmp_path / "ref" / "breast1.nrrd")
    sitk.WriteImage(pred_img, str(tmp_path / "pred" / "breast1_seg.nrrd"))
    return tmp_path


def _eval(root: Path, *extra: str, out: str = "ev") -> int:
    return eval_main(["--pred", str(root / "pred"), "--ref", str(root / "ref"), "--out", str(root / out),
                      "--quiet", "--no-figures", *extra])


def _must_not_evaluate(monkeypatch):
    import medseg.eval.evaluate

    monkeypatch.setattr(medseg.eval.evaluate, "evaluate_folders", lambda *a, **k: pytest.fail("evaluated"))


def test_eval_out_that_is_a_file_or_read_only_is_refused_first(pair, monkeypatch, capsys, read_only):
    _must_not_evaluate(monkeypatch)
    (pair / "ev").write_text("a file")
    assert _eval(pair) == 2
    assert capsys.readouterr().err.strip() == f"medseg-eval: error: {pair / 'ev'}: expected an output folder, found a file"
    folder = read_only(pair / "ro")
    assert _eval(pair, out="ro") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"medseg-eval: error: {folder}: expected a writable output folder, found ")
    assert not list(folder.iterdir()) and (pair / "ev").read_text() == "a file"


def test_eval_rerun_into_the_same_out_needs_overwrite(pair, monkeypatch, capsys):
    assert _eval(pair) == 0
    out = pair / "ev"
    first = {p.name: digest(p) for p in out.iterdir()}
    capsys.readouterr()
    with monkeypatch.context() as m:
        _must_not_evaluate(m)
        assert _eval(pair, "--nsd-tolerance-mm", "3") == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"medseg-eval: error: {out}: expected an output folder without an earlier evaluation, found "
                   "metrics.csv, summary.json, report.html (pass --overwrite to replace them, or choose another --out)")
    assert {p.name: digest(p) for p in out.iterdir()} == first
    assert _eval(pair, "--nsd-tolerance-mm", "3", "--overwrite") == 0
    assert json.loads((out / "summary.json").read_text())["options"]["nsd_tolerance_mm"] == 3.0


def test_eval_same_pred_and_ref_is_refused(pair, capsys):
    ref_dir, ref_file = pair / "ref", pair / "ref" / "breast1.nrrd"
    for same in (ref_dir, ref_file):
        assert eval_main(["--pred", str(same), "--ref", str(same), "--out", str(pair / "ev"), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        what = "folder" if same.is_dir() else "file"
        assert err == (f"medseg-eval: error: {same}: expected predictions different from the references, found the "
                       f"reference {what} itself ({same}) (--pred and --ref name the same data: every score would be "
                       "perfect)")
    assert not (pair / "ev").exists()
    # Predictions that are links to or copies of their references: scored, but said.
    for case in ("breast2", "breast3"):
        shutil.copy(LABEL, pair / "ref" / f"{case}.nrrd")
    os.symlink(pair / "ref" / "breast2.nrrd", pair / "pred" / "breast2.nrrd")
    shutil.copy(LABEL, pair / "pred" / "breast3_seg.nrrd")
    assert _eval(pair) == 0
    err = capsys.readouterr().err
    assert ("medseg-eval: warning: 2 of 3 predictions are their reference file or a copy of it (breast2, breast3): "
            "their scores are perfect by construction; is --pred the right folder?") in err
    assert json.loads((pair / "ev" / "summary.json").read_text())["warnings"][0].startswith("2 of 3 predictions")


def test_eval_label_found_nowhere_warns(pair, capsys):
    assert _eval(pair, "--label", "7") == 0
    warning = ("label 7 occurs in no reference and no prediction (1 case): the scores compare empty masks (DSC NaN); "
               "the references hold the values 0, 1; check --label")
    assert f"medseg-eval: warning: {warning}" in capsys.readouterr().err
    assert json.loads((pair / "ev" / "summary.json").read_text())["warnings"] == [warning]
    assert "<b>Warning:</b> label 7 occurs in no reference" in (pair / "ev" / "report.html").read_text()
    assert _eval(pair, "--label", "1", out="ev1") == 0  # present: no warning
    assert "warning" not in capsys.readouterr().err


def test_eval_probability_map_gets_the_right_advice(pair, capsys):
    from scipy import ndimage

    ref_img = sitk.ReadImage(str(LABEL))
    prob = ndimage.gaussian_filter(sitk.GetArrayFromImage(ref_img).astype(np.float32), 1.0)
    prob_img = sitk.GetImageFromArray(prob)
    prob_img.CopyInformation(ref_img)
    path = pair / "pred" / "breast1_seg.nrrd"
    sitk.WriteImage(prob_img, str(path))
    for extra in ((), ("--label", "1")):  # --label cannot make a probability map a mask
        assert _eval(pair, *extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"medseg-eval: error: {path}: expected a label map (integer values), found a probability "
                              "map (values between 0 and 1, such as ")
        assert "pass the label map, medseg-infer's _seg file, not the _prob file; or threshold the map first" in err
        assert "--label" not in err and err.count("\n") == 0
    assert not (pair / "ev").exists()


def test_eval_one_pair_of_files(pair, capsys):
    from medseg.eval import compute_metrics

    pred, ref = pair / "pred" / "breast1_seg.nrrd", pair / "ref" / "breast1.nrrd"
    out = pair / "one"
    assert eval_main(["--pred", str(pred), "--ref", str(ref), "--images", str(NRRD), "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["case_id"] for r in rows] == ["breast1"]
    p, r = read_volume(pred), read_volume(ref)
    expected = compute_metrics(p.array.astype(bool), r.array.astype(bool), r.spacing_mm)
    assert float(rows[0]["dsc"]) == pytest.approx(expected["dsc"], abs=1e-9) and 0.3 < expected["dsc"] < 1
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 2  # box plots + the image slice
    assert "breast1" in capsys.readouterr().out
    # A file with a folder is a clear error, not "expected a folder".
    assert eval_main(["--pred", str(pair / "pred"), "--ref", str(ref), "--out", str(pair / "x"), "--quiet"]) == 2
    assert (f"{pair / 'pred'}: expected a volume file, as {ref} is one (one prediction, one reference), found a "
            "folder") in capsys.readouterr().err


def test_eval_disk_full_while_writing_the_report_leaves_no_file(pair, capsys, monkeypatch):
    """Fault injection: the disk fills while the third report file is written. One line naming
    that file, exit 2, and none of the three outputs (nor a temporary) is left in --out."""
    import pathlib

    real = pathlib.Path.write_text
    calls = []

    def write_text(self, text, *args, **kwargs):
        calls.append(self.name)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    out = pair / "full"
    code = eval_main(["--pred", str(pair / "pred" / "breast1_seg.nrrd"), "--ref", str(pair / "ref" / "breast1.nrrd"),
                      "--out", str(out), "--no-figures", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("medseg-eval: error:") == 1 and "Traceback" not in err
    assert "report.html" in err and "No space left on device" in err
    assert not out.exists() or not list(out.iterdir())


# --- item 12: benchmarks say what they miss before any work ------------------------------------------
@pytest.mark.parametrize("bench, blocked", [("metrics", "psutil"), ("pipeline", "tensorflow"), ("model", "keras"),
                                            ("train", "tensorflow"), ("infer", "keras")])
def test_benchmarks_name_missing_modules_first(bench, blocked):
    # sys.modules[name] = None makes the module uninstallable for that interpreter, installed or not.
    code = ("import runpy, sys; sys.modules[sys.argv[1]] = None; sys.argv = sys.argv[2:]; "
            "sys.path.insert(0, 'benchmarks'); runpy.run_path(sys.argv[0], run_name='__main__')")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, blocked, f"benchmarks/{bench}.py"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if not line[:5] in ("I0000", "W0000", "E0000")]
    assert len(lines) == 1 and lines[0].startswith(f"{bench}.py: missing module {blocked}")
    assert lines[0].endswith("install -e '.[bench]'") and out.stdout == ""
    assert time.perf_counter() - start < 60  # checked first, not after the work


def test_bench_extra_lists_what_the_benchmarks_import():
    tomllib = pytest.importorskip("tomllib")
    bench = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["bench"]
    names = {re.split(r"[<>=\[ ]", spec)[0].lower() for spec in bench}
    assert {"psutil", "medpy", "surface-distance"} <= names
