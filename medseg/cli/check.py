"""``medseg-check``: check a dataset (pairing, geometry, label values, NaN) and show lesion statistics.

Exit codes: 0 no fatal problem (warnings allowed), 1 at least one fatal problem, 2 usage or
input error (missing folder, ...; with ``--json`` stdout then holds ``{"ok": false, "error": ...}``).
Never imports TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import sys

from medseg.cli._common import EXIT_FAILED, EXIT_OK, add_common_args, error_line, run_command, setup_logging

PROG = "medseg-check"


def _label_map_arg(text: str) -> dict[int, int]:
    from medseg.data.check import parse_label_map
    from medseg.errors import InputError

    try:
        return parse_label_map(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Check a segmentation dataset before training and report every problem at once: unpaired "
            "files, unreadable files, image/label grid mismatch, label values outside {0, 1}, interpolated "
            "labels, NaN/inf, empty labels. Prints lesion statistics per case and in total, or per class "
            "(by name) with --labels-map / a dataset.json naming classes."
        ),
        epilog="exit status: 0 no fatal problem, 1 fatal problems found, 2 usage/input error",
    )
    parser.add_argument("--images", required=True, metavar="DIR",
                        help="folder of images (.nii.gz, .nrrd, .mha, ... or one DICOM folder per patient)")
    parser.add_argument("--labels", metavar="DIR",
                        help="folder of label masks (same names, or nnU-Net case_0000 <-> case); "
                             "omit to check images only")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    parser.add_argument("--map-labels", type=_label_map_arg, metavar="FROM:TO[,FROM:TO]",
                        help="map label values before checking, e.g. 255:1 for {0, 255} masks")
    parser.add_argument("--ignore-label", type=int, metavar="V",
                        help="label value of unlabelled voxels (partial labels), judged before --map-labels; "
                             "default: the label named \"ignore\" of the dataset.json, if any")
    named = parser.add_mutually_exclusive_group()
    named.add_argument("--labels-map", nargs="+", metavar="NAME=IDS",
                       help="report per class: named classes and their label ids, e.g. liver=5 spleen=1 "
                            "(tumour=2,3 for several ids); ids of no class count as background")
    named.add_argument("--dataset-json", metavar="PATH",
                       help="nnU-Net/MSD dataset.json whose labels (and regions_class_order) name the classes; "
                            "default: the dataset.json of the images folder or its parent, if it names one or more")
    parser.add_argument("--tolerance-mm", type=float, default=0.01, metavar="MM",
                        help="largest distance between where image and label put the same voxel (origin shift, "
                             "or drift from a spacing/direction difference), default 0.01 mm")
    add_common_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    return run_command(PROG, args, lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from medseg.data.check import check_dataset
    from medseg.errors import MedsegError
    from medseg.io import pair_cases

    try:
        classes, source, ignore = _classes(args)
        cases, unpaired = pair_cases(args.images, args.labels)
        report = check_dataset(cases, label_map=args.map_labels, tolerance_mm=args.tolerance_mm,
                               extra_problems=unpaired, progress=not args.quiet and sys.stderr.isatty(),
                               classes=classes, classes_source=source, ignore=ignore)
    except MedsegError as exc:
        if args.json:  # a JSON consumer still gets JSON; stderr gets the usual one line
            json.dump({"ok": False, "fatal": True, "error": error_line(exc),
                       "images": args.images, "labels": args.labels}, sys.stdout, indent=2)
            sys.stdout.write("\n")
        raise
    if args.json:
        out = report.to_dict()
        out["images"], out["labels"] = args.images, args.labels
        json.dump(out, sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
    else:
        print(f"{PROG}: images {args.images}" + (f", labels {args.labels}" if args.labels else ", no labels"))
        print(report.format_text())
    return EXIT_FAILED if report.fatal else EXIT_OK


def _classes(args: argparse.Namespace):
    """(ClassSpec or None, its source, the ignore value or None): ``--labels-map``, else ``--dataset-json``, else the
    dataset.json pairing would use (images folder or its parent); one class is reported by its
    name too; None: binary labels (every nonzero value the lesion)."""
    from pathlib import Path

    from medseg.io.classes import ClassSpec
    from medseg.io.dataset import find_dataset_json  # the one rule for where dataset.json lies

    path = Path(args.dataset_json) if args.dataset_json else find_dataset_json(Path(args.images))
    ignore = args.ignore_label if args.ignore_label is not None else ClassSpec.dataset_ignore_label(path)
    if args.labels_map:
        return ClassSpec.parse(args.labels_map), "--labels-map", ignore
    spec = None if path is None else ClassSpec.from_dataset_json(path)
    return spec, None if spec is None else str(path), ignore


if __name__ == "__main__":
    sys.exit(main())
