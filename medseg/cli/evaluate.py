"""``medseg-eval``: score a folder of predicted masks against reference masks, patient by patient.

Example::

    medseg-eval --pred runs/r1/pred --ref data/labelsTs --images data/imagesTs --out runs/r1/eval

writes ``metrics.csv``, ``summary.json`` and ``report.html`` into ``--out`` and prints the
per-patient table. ``--pred`` and ``--ref`` may also be one prediction file and its reference
file. ``--labels-map liver=5 spleen=1`` or ``--dataset-json dataset.json`` scores each class (or
nested region) on its own: ``metrics.csv`` in long form (one row per case and class). ``--out``
is checked before any work: a folder that can be written, without the outputs of an earlier
evaluation unless ``--overwrite``. Definitions: docs/eval.md.
"""

from __future__ import annotations

import argparse
import logging
import sys

from medseg.cli._common import add_common_args, run_command, setup_logging
from medseg.components import CONNECTIVITIES, LESION_CONNECTIVITY

PROG = "medseg-eval"
log = logging.getLogger("medseg.eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Per-patient evaluation of segmentations: DSC, Jaccard, HD, HD95, ASSD, MASD, NSD, "
        "volumes, lesion-wise detection; writes metrics.csv, summary.json and report.html.",
    )
    parser.add_argument("--pred", required=True,
                        help="folder of predicted masks, one file per case id (or one predicted mask file)")
    parser.add_argument("--ref", required=True,
                        help="folder of reference masks, one file per case id (or the reference file of --pred)")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the metrics.csv, summary.json and report.html of an earlier evaluation in --out")
    parser.add_argument(
        "--images", help="folder of images (nnU-Net _0000 names allowed), drawn under the outlines; "
        "one image file with one --pred/--ref pair"
    )
    parser.add_argument(
        "--resample-pred", action="store_true",
        help="resample predictions on another grid onto the reference grid (nearest neighbour) instead of refusing",
    )
    parser.add_argument("--label", type=int, help="evaluate the voxels equal to this label (default: masks must be 0/1)")
    parser.add_argument("--map-labels", metavar="FROM:TO[,FROM:TO]",
                        help="map the reference label values first, as medseg-train does: e.g. 5:1,*:0 scores "
                        "label 5 of a multi-organ reference against 0/1 predictions (* = every other value)")
    parser.add_argument("--ignore-label", type=int, metavar="V",
                        help="reference value of unlabelled voxels (partial labels), judged before --map-labels: "
                        "only the labelled voxels are scored; default: the label named \"ignore\" of --dataset-json")
    parser.add_argument(
        "--labels-map", nargs="+", metavar="NAME=IDS",
        help="score these classes one by one, e.g. liver=5 spleen=1 tumour=2,3 (a class is the union of its "
        "ids; overlapping ids make nested regions); ids of no class are background",
    )
    parser.add_argument(
        "--dataset-json", metavar="PATH",
        help="take the classes from an nnU-Net / MSD dataset.json: its labels (name -> id or ids) and "
        "regions_class_order; one foreground label is scored as that named class",
    )
    parser.add_argument(
        "--lesion-classes", nargs="+", metavar="NAME",
        help="classes also scored lesion-wise (connected components); default none with several classes "
        "(the binary evaluation always is)",
    )
    parser.add_argument(
        "--empty-distance", choices=("worst", "exclude"), default="worst",
        help="in the statistics, an infinite distance (one mask empty) becomes the image diagonal (worst, "
        "default) or is left out (exclude); the counts are reported either way",
    )
    parser.add_argument(
        "--missing", choices=("score", "error"), default="score",
        help="a reference without prediction file is scored as a miss (score, default) or is an error",
    )
    parser.add_argument("--workers", type=int, default=1, help="patients evaluated in parallel processes (default 1)")
    parser.add_argument("--connectivity", type=int, choices=sorted(CONNECTIVITIES), default=LESION_CONNECTIVITY,
                        help=f"connectivity of lesion components (default {LESION_CONNECTIVITY}, as medseg-check, "
                        "training and post-processing count lesions)")
    parser.add_argument(
        "--min-overlap-fraction", type=float, default=0.0,
        help="a reference lesion is detected when the prediction covers at least this fraction of it "
        "(default 0: one voxel of overlap)",
    )
    parser.add_argument(
        "--nsd-tolerance-mm", type=float, default=1.0, help="tolerance of the normalized surface Dice (mm)"
    )
    parser.add_argument(
        "--percentile", type=float, default=95.0, help="percentile of the robust Hausdorff distance (default 95)"
    )
    parser.add_argument("--no-figures", action="store_true", help="skip the per-patient slice figures (faster)")
    add_common_args(parser)
    return parser


def _run(args: argparse.Namespace) -> int:
    from medseg.eval.evaluate import EvalOptions, evaluate_folders
    from medseg.eval.report import check_report_folder, format_table, write_report

    from medseg.eval.report_text import labelled_note
    from medseg.io.classes import ClassSpec
    from medseg.io.labels import parse_label_map

    from medseg.io.labels import with_ignore

    ignore = args.ignore_label if args.ignore_label is not None else ClassSpec.dataset_ignore_label(args.dataset_json)
    with_ignore(parse_label_map(args.map_labels) if args.map_labels else None, ignore)  # refuses a mapping of V
    options = EvalOptions(
        classes=_classes(args),
        label=args.label,
        ignore_label=ignore,
        map_labels=parse_label_map(args.map_labels) if args.map_labels else None,
        resample_pred=args.resample_pred,
        connectivity=args.connectivity,
        min_overlap_fraction=args.min_overlap_fraction,
        nsd_tolerance_mm=args.nsd_tolerance_mm,
        percentile=args.percentile,
        figures=not args.no_figures,
    )
    check_report_folder(args.out, overwrite=args.overwrite)  # before minutes of work, not after
    result = evaluate_folders(
        args.pred,
        args.ref,
        images_dir=args.images,
        options=options,
        missing=args.missing,
        empty_distance=args.empty_distance,
        workers=args.workers,
        progress=not args.quiet and sys.stderr.isatty(),  # no \r-animated bar in a log file
    )
    paths = write_report(result, args.out, workers=args.workers)
    if labelled_note(options):
        print(f"{PROG}: {labelled_note(options)}")
    print(format_table(result.cases, options.classes))
    policy = result.summary["policy"]
    if options.classes is not None:
        from medseg.eval.report_classes import mean_over_classes_text

        print(mean_over_classes_text(result.summary))
        print(f"(empty-distance policy: {policy['empty_distance']}; missing {policy['n_missing_prediction']})")
    else:
        from medseg.eval import catalog

        stats = result.summary["metrics"]
        means = ", ".join(m.headline_text(stats[m.key]["mean"]) for m in catalog.headline_metrics())
        print(
            f"{means} (empty-distance policy: {policy['empty_distance']}; both empty {policy['n_both_empty']}, "
            f"one empty {policy['n_pred_empty_only'] + policy['n_ref_empty_only']}, "
            f"missing {policy['n_missing_prediction']})"
        )
    print(f"report: {paths['html']}")
    for warning in result.warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    return 0


def _classes(args: argparse.Namespace):
    """The :class:`~medseg.io.classes.ClassSpec` of ``--labels-map`` / ``--dataset-json`` (with
    ``--lesion-classes``); None for the binary evaluation.

    Raises:
        InputError: malformed entries, unreadable dataset.json, unknown lesion classes.
    """
    from medseg.io.classes import ClassSpec

    lesions = tuple(args.lesion_classes or ())
    if args.labels_map:
        return ClassSpec.parse(args.labels_map, lesions=lesions)
    if args.dataset_json:
        spec = ClassSpec.from_dataset_json(args.dataset_json, lesions=lesions)
        if spec is None and lesions:
            log.info("%s names no foreground label: binary evaluation, lesion-wise as always; "
                     "--lesion-classes is not needed", args.dataset_json)
        return spec
    return None


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.labels_map and args.dataset_json:
        parser.error("--labels-map and --dataset-json both name the classes: pass one")
    if (args.labels_map or args.dataset_json) and args.label is not None:
        parser.error("--label picks one foreground value; with --labels-map / --dataset-json each class names its ids")
    if args.lesion_classes and not (args.labels_map or args.dataset_json):
        parser.error("--lesion-classes names classes of --labels-map or --dataset-json (the binary evaluation "
                     "always counts lesions)")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, found {args.workers}")
    if not 0.0 <= args.min_overlap_fraction <= 1.0:
        parser.error(f"--min-overlap-fraction must be in [0, 1], found {args.min_overlap_fraction}")
    if not args.nsd_tolerance_mm >= 0:
        parser.error(f"--nsd-tolerance-mm must be >= 0, found {args.nsd_tolerance_mm}")
    if not 0.0 <= args.percentile <= 100.0:
        parser.error(f"--percentile must be in [0, 100], found {args.percentile}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``medseg-eval``; returns the exit code (0 ok, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    setup_logging(args)
    return run_command(PROG, args, lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
