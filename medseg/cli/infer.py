"""``medseg-infer``: segment volumes with a trained model bundle.

Examples::

    medseg-infer patient.nii.gz                      # -> ./patient_seg.nii.gz, latest model in ./runs
    medseg-infer dicom/patient7/ --model runs/exp1 -o p7_seg.nrrd
    medseg-infer imagesTs/ -o pred/ --tta --probabilities --min-lesion-ml 0.1

INPUT is a volume file (NIfTI, NRRD, MHA), a DICOM series folder or a folder of such volumes (batch mode).
Every check that needs no model (inputs exist, outputs are free, no output would replace an input, every
output folder can be written) runs before the model is loaded, so a typo costs nothing. A file that cannot
be read in a batch, or whose voxels cannot be segmented (NaN, inf, one constant value), is reported on one
line and skipped; the command ends with the list of failures and exit code 1. A case's label map and
probability map are written together or not at all. A scan unlike the training scans gets one warning line
(medseg.infer.range_check).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from medseg.cli._common import (EXIT_FAILED, EXIT_OK, add_common_args, error_line, import_tensorflow_quietly,
                                run_command, setup_logging)
from medseg.errors import InputError, MedsegError
from medseg.io.atomic import check_writable_folder, same_file

PROG = "medseg-infer"
#: Environment variable naming the default model bundle (a run folder).
MODEL_ENV = "MEDSEG_MODEL"
#: Where medseg-train writes its runs by default (TrainConfig.out).
DEFAULT_RUNS_DIR = "runs"
SEG_SUFFIX, PROB_SUFFIX, DEFAULT_EXT = "_seg", "_prob", ".nii.gz"
# Kept here (not imported from medseg.io) so that --help does not import nibabel.
_WRITE_EXTS = (".nii.gz", ".nii", ".nrrd", ".mha")
_READ_EXTS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".dicom", ".ima")


@dataclass(frozen=True)
class Job:
    """One case to segment: where it comes from and where its outputs go."""

    case_id: str
    source: Path
    seg_path: Path
    prob_path: Path | None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Segment lesions in 3D CT/MR volumes with a model trained by medseg-train. Writes a label "
            "volume (0 background, 1 lesion; a multi-class model writes the dataset's label ids) on exactly "
            "the input's grid (shape, spacing, origin, direction)."
        ),
        epilog=(
            f"Model: --model, else ${MODEL_ENV}, else the newest run in ./{DEFAULT_RUNS_DIR}/ holding a bundle.json. "
            "Outputs are written atomically; inputs are never overwritten."
        ),
    )
    parser.add_argument(
        "inputs", nargs="*", metavar="INPUT",
        help="volume file (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd), DICOM series folder, or folder of volumes",
    )
    parser.add_argument("--model", metavar="RUN_DIR", help="run folder holding model.keras and bundle.json")
    parser.add_argument("--show-pipeline", action="store_true",
                        help="print the model's network and preprocessing pipeline (as medseg-info does) and exit")
    parser.add_argument(
        "--accept-modified-model", action="store_true",
        help="use a model.keras whose SHA-256 differs from the one bundle.json recorded (refused by default)",
    )
    parser.add_argument(
        "-o", "--out", metavar="OUT",
        help=(
            "output file (one input; .nii.gz, .nii, .nrrd or .mha) or folder "
            f"(default: ./<case>{SEG_SUFFIX}{DEFAULT_EXT})"
        ),
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (never an input)")
    parser.add_argument(
        "--tta", action="store_true",
        help="test-time augmentation: average over the in-plane flips the model was trained with (4x slower); "
             "refused for a model that kept the orientation (classes on opposite sides of the body)"
    )
    parser.add_argument(
        "--probabilities", action="store_true",
        help=f"also write the foreground probability map <case>{PROB_SUFFIX}{DEFAULT_EXT} (float32)",
    )
    parser.add_argument(
        "--threshold", type=_unit_float, metavar="T", help="probability threshold in [0, 1] (default: the bundle's)"
    )
    parser.add_argument(
        "--min-lesion-ml", type=_non_negative_float, default=0.0, metavar="V",
        help="remove connected lesions smaller than V ml (default 0: keep all)",
    )
    parser.add_argument("--largest-component", dest="largest_component", action="store_const", const=True,
                        help="keep only the largest connected component (default: the bundle's choice, made on "
                        "validation at training time)")
    parser.add_argument("--all-components", dest="largest_component", action="store_const", const=False,
                        help="keep every connected component, whatever the bundle chose")
    parser.add_argument(
        "--batch-size", type=_positive_int, default=8, metavar="N", help="slices per model call (default 8)"
    )
    # the output format
    parser.add_argument(
        "--format", choices=("nifti", "dicom-seg", "rtstruct"), default="nifti",
        help="nifti: a label volume (the extension of -o chooses NIfTI, NRRD or MHA; default); dicom-seg / "
             "rtstruct (DICOM series inputs): <case>_seg.dcm, a DICOM SEG / RTSTRUCT referencing the series, "
             "stored as a new series of its study",
    )
    add_common_args(parser)
    return parser


def _number(text: str, convert, ok, expected: str):
    """``convert(text)`` when ``ok`` of it holds, else argparse's error naming ``expected``."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, found {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, found {text}")
    return value


def _unit_float(text: str) -> float:
    return _number(text, float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")


def _non_negative_float(text: str) -> float:
    return _number(text, float, lambda v: 0.0 <= v < float("inf"), "a finite number >= 0")


def _positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "a positive integer")


# --- model discovery ---------------------------------------------------------------------------
def find_model(
    explicit: str | os.PathLike | None = None, *, environ=None, cwd: str | os.PathLike | None = None
) -> tuple[Path, str]:
    """The run folder to use and how it was chosen.

    Order: ``explicit`` (``--model``), then ``$MEDSEG_MODEL``, then the run under ``./runs/``
    (medseg-train's default output folder; its subfolders and their subfolders) whose
    ``bundle.json`` was written last.

    Returns:
        ``(run_dir, how)`` with ``how`` one of ``"--model"``, ``"$MEDSEG_MODEL"``, ``"latest run in ./runs"``.

    Raises:
        InputError: no model given and none found under ``./runs``.
    """
    environ = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else Path(cwd)
    if explicit:
        return Path(explicit), "--model"
    if environ.get(MODEL_ENV):
        return Path(environ[MODEL_ENV]), f"${MODEL_ENV}"
    runs = cwd / DEFAULT_RUNS_DIR
    candidates = []
    if runs.is_dir():
        for pattern in ("*/bundle.json", "*/*/bundle.json"):
            for bundle_json in runs.glob(pattern):
                try:
                    candidates.append((bundle_json.stat().st_mtime, str(bundle_json.parent)))
                except OSError:  # vanished meanwhile
                    continue
    if not candidates:
        raise InputError(
            runs,
            f"a model: --model RUN_DIR, ${MODEL_ENV}, or a run folder with bundle.json under ./{DEFAULT_RUNS_DIR}/",
            "none" if runs.is_dir() else "no such folder",
            "train one with medseg-train or pass --model",
        )
    return Path(max(candidates)[1]), f"latest run in ./{DEFAULT_RUNS_DIR}"


# --- inputs and outputs ------------------------------------------------------------------------
def _lower_name(path: Path) -> str:
    return path.name.lower()


def _write_ext(path: Path) -> str | None:
    name = _lower_name(path)
    return next((ext for ext in _WRITE_EXTS if name.endswith(ext)), None)


def _looks_like_file_name(path: Path) -> bool:
    name = _lower_name(path)
    return any(name.endswith(ext) for ext in _READ_EXTS)


def _is_dicom_series_folder(folder: Path) -> bool:
    """True when ``folder`` itself is one volume: DICOM files of one series lie directly in it.

    A folder of single-file DICOM volumes (enhanced multi-frame, one file per patient) is a
    folder of cases instead; a folder mixing several multi-file series is handed to
    ``read_volume``, whose error names the series.
    """
    from medseg.io.dicom import is_dicom_folder, list_dicom_series

    if not is_dicom_folder(folder):
        return False

    try:
        series = list_dicom_series(folder)
    except InputError:
        return True  # an unreadable file: reading the folder reports it as this case's failure
    return len(series) <= 1 or any(s.n_files > 1 for s in series)


def expand_inputs(inputs: list[str]) -> list[tuple[str, Path]]:
    """``(case_id, path)`` of every volume named by the INPUT arguments, in order.

    A file or a DICOM series folder is one case; another folder contributes each volume in it
    (:func:`medseg.io.list_volume_files`, nnU-Net ``_0000`` suffixes dropped from the ids).

    Raises:
        InputError: missing inputs (all listed), a folder without volumes, a case id given twice.
    """
    from medseg.io import case_id_from_path, list_volume_files

    cases: list[tuple[str, Path]] = []
    missing = [s for s in inputs if not Path(s).exists()]
    if missing:
        raise InputError(", ".join(missing), "existing volume files or folders", "no such file or folder")
    for text in inputs:
        path = Path(text)
        if path.is_dir() and not _is_dicom_series_folder(path):
            cases.extend(list_volume_files(path, images=True).items())
        else:
            cases.append((case_id_from_path(path), path))
    seen: dict[str, Path] = {}
    clashes = []
    for case_id, path in cases:
        if case_id in seen:
            clashes.append(f"{case_id} ({seen[case_id]} and {path})")
        seen[case_id] = path
    if clashes:
        raise InputError(
            None, "one input per case id (outputs are named after it)", "the same case id twice: " + "; ".join(clashes)
        )
    return cases


def prob_path_for(seg_path: Path) -> Path:
    """``x_seg.nii.gz`` -> ``x_prob.nii.gz``; any other name gets ``_prob`` before its extension."""
    ext = _write_ext(seg_path) or DEFAULT_EXT
    stem = seg_path.name[: len(seg_path.name) - len(ext)]
    if stem.endswith(SEG_SUFFIX):
        stem = stem[: -len(SEG_SUFFIX)]
    return seg_path.with_name(f"{stem}{PROB_SUFFIX}{ext}")


def plan_outputs(
    cases: list[tuple[str, Path]], out: str | None, *, probabilities: bool, overwrite: bool, cwd: Path | None = None
) -> list[Job]:
    """Output paths of every case, checked before any work starts.

    ``out`` None: ``<cwd>/<case>_seg.nii.gz``. With one case, ``out`` ending in a writable volume
    extension is the output file; otherwise ``out`` is a folder (created when missing).

    Raises:
        InputError: ``out`` is a file name but there are several inputs, or has an extension
            medseg cannot write; an output would replace an input; outputs exist without
            ``overwrite`` (all listed); an output folder cannot be written (read-only, no
            permission, full disk).
    """
    cwd = Path.cwd() if cwd is None else cwd
    out_path = Path(out) if out else None
    as_file = False
    if out_path is not None and not out_path.is_dir() and not str(out).endswith(("/", os.sep)):
        if _write_ext(out_path):
            as_file = True
        elif _looks_like_file_name(out_path) or out_path.is_file():
            expected = "an output ending in " + ", ".join(_WRITE_EXTS) + " or a folder"
            raise InputError(out_path, expected, f"{out_path.name!r}")
    if as_file and len(cases) > 1:
        raise InputError(
            out_path, f"an output folder for {len(cases)} inputs", "a file name",
            "give a folder with -o, e.g. -o predictions/",
        )
    folder = cwd if out_path is None else out_path
    jobs = []
    for case_id, source in cases:
        seg = out_path if as_file else folder / f"{case_id}{SEG_SUFFIX}{DEFAULT_EXT}"
        jobs.append(Job(case_id, source, seg, prob_path_for(seg) if probabilities else None))

    sources = [job.source for job in jobs]
    outputs = [p for job in jobs for p in (job.seg_path, job.prob_path) if p is not None]
    onto_inputs = [str(p) for p in outputs if any(same_file(p, s) for s in sources)]
    if onto_inputs:
        raise InputError(
            onto_inputs[0], "an output path different from every input", "an input file",
            "medseg-infer never overwrites an input; choose another -o"
            + (f" ({len(onto_inputs)} such outputs)" if len(onto_inputs) > 1 else ""),
        )
    folders = [str(p) for p in outputs if p.is_dir()]
    if folders:
        raise InputError(folders[0], "an output file path", "an existing folder")
    if not overwrite:
        existing = [str(p) for p in outputs if p.exists()]
        if existing:
            shown = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
            raise InputError(
                None, "outputs that do not exist yet", f"existing files {shown}", "pass --overwrite to replace them"
            )
    # Found now, not after the model has run on every case.
    for parent in dict.fromkeys(p.parent for p in outputs):
        check_writable_folder(parent)
    return jobs


# --- the command -------------------------------------------------------------------------------
def _run(args: argparse.Namespace) -> int:
    cases = expand_inputs(args.inputs)
    jobs = plan_outputs(cases, args.out, probabilities=args.probabilities, overwrite=args.overwrite)
    run_dir, how = find_model(args.model)

    import_tensorflow_quietly(args.debug)
    from medseg.infer.bundle import load_bundle
    from medseg.infer.range_check import range_note

    bundle = load_bundle(run_dir, accept_modified=args.accept_modified_model)
    events = _printer()
    saved = bundle.contract.created or "at an unknown time"
    _say(events, f"{PROG}: using model {run_dir.resolve()} ({how}; {bundle.plan.modality} model saved {saved})")
    for note in (bundle.contract.status_note(), range_note(bundle.plan)):  # once per run
        if note:
            _say(events, f"{PROG}: note: {note}")

    from medseg.infer.predictor import Predictor

    predictor = Predictor(bundle, batch_size=args.batch_size, tta=args.tta)
    if args.largest_component is None and _postprocessing_text(predictor):
        _say(events, f"{PROG}: post-processing: largest connected component kept {_postprocessing_text(predictor)}; "
             "--all-components keeps every component)")
    failures: list[str] = []
    progress = _progress(jobs, args)
    events = _printer(progress)
    for n, job in enumerate(progress):
        if hasattr(progress, "set_postfix_str"):
            progress.set_postfix_str(job.case_id)
        try:
            message = _segment_one(predictor, job, args, events)
            if not args.quiet:
                _say(events, message, "stdout")
        except (MedsegError, OSError, ValueError, RuntimeError) as exc:
            # One bad file (corrupt, truncated, 4D, unreadable) must not stop a batch.
            if args.debug:
                raise
            line = f"{job.source}: {error_line(exc)}" if str(job.source) not in str(exc) else error_line(exc)
            _say(events, f"{PROG}: error: {line}")
            failures.append(line)
            if _output_exhausted(exc) and n + 1 < len(jobs):
                # The disk filled up (or went read-only) meanwhile: every later case would fail alike.
                left = len(jobs) - n - 1
                _say(events, f"{PROG}: stopped: the outputs cannot be written; "
                     f"{left} input{'s' if left > 1 else ''} not segmented")
                failures.extend(f"{j.source}: not segmented (stopped)" for j in jobs[n + 1:])
                break
    if failures and len(jobs) > 1:
        events = _printer()
        _say(events, f"{PROG}: {len(failures)} of {len(jobs)} inputs failed:")
        for line in failures:
            _say(events, f"  - {line}")
    return EXIT_FAILED if failures else EXIT_OK


def _postprocessing_text(predictor) -> str | None:
    """How the bundle's largest-component choice is told, up to the closing ``;``; None when it keeps none."""
    post = predictor.bundle.postprocessing
    kept = [name for name in predictor.class_names if post.keeps_largest(name)]
    if not kept:
        return None
    if not predictor.multiclass:
        return f"(the bundle's choice: {post.largest_component[kept[0]].reason}"
    return f"for {', '.join(kept)} (the bundle's choice, made on validation"


def _printer(progress=None):
    """The command's subscriber (:class:`medseg.events.Printer`); above a progress bar it prints
    as ``tqdm.write`` does (bar cleared, line printed, bar redrawn)."""
    from medseg.events import Message, Printer
    printer = Printer()
    if not hasattr(progress, "external_write_mode"):
        return printer

    def sink(event) -> None:
        if isinstance(event, Message):
            with progress.external_write_mode(file=sys.stdout if event.stream == "stdout" else sys.stderr):
                printer(event)

    return sink


def _say(events, text: str, stream: str = "stderr") -> None:
    from medseg.events import Message
    events(Message(text, stream=stream))


def _output_exhausted(exc: BaseException) -> bool:
    """True for an output error that every later case would hit too (full disk, read-only)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", -1)):
            return True
        exc = exc.__cause__
    return False


def _progress(jobs: list[Job], args: argparse.Namespace):
    if len(jobs) < 2 or args.quiet or not sys.stderr.isatty():  # a log file gets plain lines
        return jobs
    from tqdm import tqdm

    return tqdm(jobs, desc=PROG, unit="case", file=sys.stderr, dynamic_ncols=True)


def _segment_one(predictor, job: Job, args: argparse.Namespace, events=None) -> str:
    from medseg.infer.predictor import check_image
    from medseg.infer.range_check import report_range
    from medseg.io import read_volume

    start = time.perf_counter()
    volume = read_volume(job.source, case_id=job.case_id)
    check_image(volume, job.source)  # NaN or a constant image: refused before the model runs
    post = dict(threshold=args.threshold, min_lesion_ml=args.min_lesion_ml, largest_component=args.largest_component)
    if job.prob_path is None or predictor.multiclass:
        # Labels only: thresholded part by part, no float volume of the input's size is kept.
        # Several classes: the argmax labels, and the foreground probability as a second pass.
        labels = predictor.segment(volume, **post, events=events)
        probability = predictor.predict_proba(volume, events=events) if job.prob_path is not None else None
    else:
        probability = predictor.predict_proba(volume, events=events)
        labels = predictor.labels_from_proba(probability, **post)
        report_range(predictor, volume, labels, events)  # as segment() does
    written = _write_outputs(job, labels, probability, args, predictor)
    return f"{job.case_id}: {_volumes_text(predictor, labels)} -> {written} ({time.perf_counter() - start:.1f} s)"


def _write_outputs(job: Job, labels, probability, args: argparse.Namespace, predictor=None) -> str:
    """Write a case's outputs, both or neither (the one place that writes: an output format is
    chosen here); returns what was written, as the case's line names it."""
    from medseg.io import write_volumes

    outputs = [(labels, job.seg_path)] + ([(probability, job.prob_path)] if probability is not None else [])
    if getattr(args, "format", "nifti") != "nifti":  # DICOM SEG / RTSTRUCT beside the series
        from medseg.io.dicomlabels.infer_output import write_infer_output

        return str(write_infer_output(args.format, labels, job.source, job.seg_path, predictor, outputs[1:],
                                      overwrite=args.overwrite))
    write_volumes(outputs, overwrite=args.overwrite)  # both files or neither
    return str(job.seg_path) + (f" and {job.prob_path}" if job.prob_path is not None else "")


def _volumes_text(predictor, labels) -> str:
    """``lesion 12.30 ml`` (a one-class model: its class name), or for several classes
    ``liver 1520.11 ml, spleen 210.40 ml, ...``."""
    import numpy as np

    spec = predictor.classes
    if not predictor.multiclass:  # one class, named by the bundle ("lesion" by default)
        return f"{predictor.class_names[0]} {np.count_nonzero(labels.array) * labels.voxel_volume_ml:.2f} ml"
    counts = np.bincount(np.asarray(labels.array).ravel().astype(np.int64))
    parts = []
    for k, (name, ids) in enumerate(zip(spec.names, spec.ids)):
        written = spec.region_order[k] if spec.regions else ids[0]  # the id the model writes for it
        voxels = int(counts[written]) if written < counts.size else 0
        parts.append(f"{name} {voxels * labels.voxel_volume_ml:.2f} ml")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``medseg-infer``; returns the exit code (0 ok, 1 some inputs failed, 2 usage/input error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.inputs and not args.show_pipeline:
        parser.error("the following arguments are required: INPUT")
    setup_logging(args)
    return run_command(PROG, args, lambda: _show_pipeline(args) if args.show_pipeline else _run(args))


def _show_pipeline(args: argparse.Namespace) -> int:
    from medseg.cli.info import describe_bundle, format_text

    run_dir, how = find_model(args.model)
    print(f"{PROG}: model {run_dir.resolve()} ({how})", file=sys.stderr)
    print(format_text(describe_bundle(run_dir)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
