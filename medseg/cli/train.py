"""``medseg-train``: train a lesion segmenter (UNet++ by default) on folders of images and labels.

Thin wrapper around :func:`medseg.train.train`; TensorFlow is imported only after the
arguments are parsed, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import logging
import sys

from medseg.cli._common import add_common_args, import_tensorflow_quietly, run_command, setup_logging

EPILOG = """\
examples:
  medseg-train --images data/images --labels data/labels
  medseg-train --images imgs --labels labs --epochs 200 --batch-size 12 --schedule cosine --gpus 0,1
  medseg-train --images imgs --labels labs --folds 5 --fold 2 --config my.yaml
  medseg-train --images imgs --labels labs --network unet   # a plain U-Net instead of UNet++
  medseg-train --resume runs/20260101-120000          # continue after an interruption
  medseg-train --images imgs --labels labs --max-time-s 300 --map-labels 5:1,*:0

Budget mode (--max-time-s S): S seconds of wall clock from start-up to the last optimizer step,
kept to the step (one final whole-volume validation follows and its time is reported). The
learning rate decays over the budget, reaching its end value at S, whatever the epochs say;
--epochs stays an upper limit. On a CPU with the network left at its defaults, a short probe of
real steps picks the network width (see plan.json, fingerprint.cpu_sizing). Example, one labelled
CT (liver = label 5 of a multi-organ map), 5 minutes on a laptop CPU:
  medseg-train --images imagesTr --labels labelsTr --map-labels 5:1,*:0 --max-time-s 300
With one labelled case (or --val-fraction 0) validation runs on the training cases, says so,
and the model kept is the last one.

Precedence: defaults < --config file (YAML or JSON, TrainConfig field names) < flags.
--batch-size is per replica: the global batch is batch size x replicas, and --lr is scaled
by the number of replicas (linear scaling). Under TF_CONFIG the run is multi-worker.
The run folder (default runs/<timestamp>) holds model.keras + bundle.json (best model by
mean 3D validation DSC), config.json, plan.json, history.csv, curves.png, warnings.json,
tensorboard/ and checkpoints/ (for --resume).
"""


def _gpus(text: str) -> list[int]:
    text = text.strip()
    if text.lower() in ("", "none", "cpu"):
        return []
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated GPU indices such as 0,1, found {text!r}")


def _add_correction_args(group) -> None:
    """Partial labels and fine-tuning (learning from corrections)."""
    group.add_argument("--ignore-label", type=int, metavar="V",
                       help="label value of unlabelled voxels (partial labels: no loss, no metric, no patch "
                            "centre), applied before --map-labels; default: the label named \"ignore\" of a "
                            "dataset.json")
    group.add_argument("--init-from", metavar="RUN_DIR",
                       help="fine-tune the bundle in RUN_DIR on these cases: its weights, network, classes and "
                            "pipeline, the fine-tuning schedule (docs/train.md); the new bundle records its parent")


def _add_split_args(s) -> None:
    """Split and validation flags."""
    s.add_argument("--val-fraction", type=float,
                   help="fraction of patients held out (default 0.2 from 5 labelled cases on, else 0); 0: train on all, "
                        "validate on the training cases")
    s.add_argument("--folds", type=int, help="K of patient-level K-fold cross-validation")
    s.add_argument("--fold", type=int, help="fold held out (0..K-1), with --folds")
    s.add_argument("--val-every", type=int, help="validate on whole volumes every N epochs (default 1)")
    s.add_argument("--max-val-cases", type=int, help="validate on at most N patients")
    s.add_argument("--selection", choices=("last", "best"), help="model kept: last (default, the final one) or best")
    s.add_argument("--early-stopping", type=int, metavar="PATIENCE",
                   help="stop after PATIENCE validations without a better 3D DSC (default: off)")


def build_parser() -> argparse.ArgumentParser:
    from medseg.nets.registry import network_names  # names only: no Keras import

    p = argparse.ArgumentParser(
        prog="medseg-train",
        description="Train a lesion segmenter, UNet++ by default (dataset check, plan, patient split, "
        "whole-volume 3D validation, resumable checkpoints, multi-GPU/multi-worker).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = p.add_argument_group("data")
    d.add_argument("--images", help="folder of images (NIfTI, NRRD, MHA, DICOM folders)")
    d.add_argument("--labels", help="folder of label maps, paired with the images by case id")
    d.add_argument("--map-labels", metavar="FROM:TO[,FROM:TO]",
                   help="map label values first, e.g. 255:1, or 5:1,*:0 to train on label 5 alone (* = all others)")
    d.add_argument("--labels-map", nargs="+", metavar="NAME=IDS",
                   help="several classes at once, e.g. liver=5 spleen=1 stomach=6 aorta=52 (default: the labels of "
                        "a dataset.json next to the images when it names 2 or more; else binary: any nonzero value)")
    _add_correction_args(d)
    d.add_argument("--out", help="parent folder of run folders (default: runs)")
    d.add_argument("--run-dir", help="exact run folder instead of OUT/<timestamp>")
    d.add_argument("--config", help="YAML or JSON file of settings (TrainConfig field names)")
    d.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    _add_split_args(p.add_argument_group("split and validation"))
    t = p.add_argument_group("optimization")
    t.add_argument("--epochs", type=int, help="epochs (default 100)")
    t.add_argument("--max-time-s", type=float,
                   help="wall-clock budget in seconds, kept to the step; the learning rate decays over it")
    t.add_argument("--steps-per-epoch", type=int, help="optimizer steps per epoch (default 250)")
    t.add_argument("--batch-size", type=int, help="patches per replica and step (default 8)")
    t.add_argument("--lr", type=float, help="learning rate of one replica (default 1e-3, scaled by replicas)")
    t.add_argument("--schedule", choices=("poly", "cosine", "constant"), help="learning-rate decay (default poly)")
    t.add_argument("--schedule-over", choices=("budget", "epochs"),
                   help="with --max-time-s: decay over the budget (default) or over epochs x steps (truncated)")
    t.add_argument("--warmup-epochs", type=int, help="linear warm-up epochs (default 0)")
    t.add_argument("--loss", choices=("dice_ce", "dice", "ce"), help="segmentation loss (default dice_ce)")
    t.add_argument("--ce-class-weights", type=float, nargs="+", metavar="W",
                   help="cross-entropy weight per class, background first (default: equal for one class; "
                        "with several, inverse square root of each class's share of the body)")
    t.add_argument("--seed", type=int, help="seed of split, initialisation and sampling (default 0)")
    m = p.add_argument_group("model and input")
    m.add_argument("--patch-size", type=int, nargs=2, metavar=("H", "W"), help="training patch (default: from the plan)")
    m.add_argument("--network", choices=network_names(),
                   help="registered network to train: unetpp (UNet++, default) or unet (plain U-Net)")
    m.add_argument("--filters", type=int, nargs="+", help="filters per level (depth + 1 values)")
    m.add_argument("--depth", type=int, help="network depth: number of down-samplings (default 4)")
    m.add_argument("--context-slices", type=int, help="2.5D input: odd number of neighbouring slices (plan)")
    m.add_argument("--no-enhancement", dest="enhancement", action="store_false", default=None,
                   help="several CT classes: without issue 13's enhancement (plan; off with contrast phases)")
    m.add_argument("--contrast-phases", action=argparse.BooleanOptionalAction, default=None,
                   help="CT: simulated contrast phases (plan; default on for classes named after a structure "
                        "the phase table knows, e.g. aorta, liver; off for an unnamed class such as --map-labels')")
    m.add_argument("--keep-orientation", action=argparse.BooleanOptionalAction, default=None,
                   help="never mirror or quarter-turn training patches (default: when named classes lie on "
                        "opposite sides of the body, e.g. liver and spleen; plan)")
    m.add_argument("--no-cpu-sizing", dest="cpu_sizing", action="store_const", const=False,
                   help="on a CPU, keep the paper's network instead of timing a few steps to size it")
    m.add_argument("--no-deep-supervision", dest="deep_supervision", action="store_const", const=False,
                   help="train the deepest head only")
    m.add_argument("--dropout", type=float, help="dropout after each convolution (default 0)")
    m.add_argument("--l2", type=float, help="L2 kernel regularization (default 0)")
    h = p.add_argument_group("hardware")
    h.add_argument("--gpus", type=_gpus, help="GPU indices, e.g. 0,1 (default: all visible); 'cpu' for none")
    h.add_argument("--precision", choices=("auto", "float32", "mixed_float16", "mixed_bfloat16"),
                   help="auto: float16 on GPUs with compute capability >= 7, bfloat16 on CPUs with native "
                   "bf16, else float32")
    h.add_argument("--workers", type=int, help="parallel data-pipeline calls (default: autotune)")
    p.add_argument("--run-eagerly", dest="run_eagerly", action="store_const", const=True,
                   help="run training steps eagerly (debugging: no graph tracing, slower steps)")
    p.add_argument("--verbose", type=int, choices=(0, 1, 2), help="1: progress bar, 2: one line per epoch, 0: silent")
    add_common_args(p)
    return p


def config_from_args(args: argparse.Namespace):
    """The effective :class:`TrainConfig` of parsed arguments (config file, then flags)."""
    from medseg.train.config import TrainConfig, load_config_file

    cfg = TrainConfig()
    if args.config:
        cfg.update(load_config_file(args.config), source=args.config)
    flags = {
        key: getattr(args, key)
        for key in ("images", "labels", "out", "run_dir", "resume", "val_fraction", "folds", "fold", "val_every",
                    "max_val_cases", "selection", "early_stopping", "max_time_s", "epochs", "steps_per_epoch", "batch_size", "lr", "schedule",
                    "warmup_epochs", "schedule_over", "loss", "ce_class_weights", "seed", "patch_size", "network",
                    "filters", "depth",
                    "deep_supervision",
                    "dropout", "l2", "gpus", "precision", "workers", "verbose", "run_eagerly", "map_labels",
                    "labels_map", "cpu_sizing", "ignore_label", "init_from")
    }
    if args.debug:
        flags["debug"] = True
    cfg.update(flags, source="command line")
    if args.context_slices is not None:
        cfg.plan = dict(cfg.plan, context_slices=args.context_slices)
    if args.enhancement is False:
        cfg.plan = dict(cfg.plan, enhancement=None)
    if args.contrast_phases is not None:
        cfg.plan = dict(cfg.plan, contrast_phases="on" if args.contrast_phases else None)
    if args.keep_orientation is not None:
        cfg.plan = dict(cfg.plan, keep_orientation=args.keep_orientation)
    if (args.context_slices is not None or args.enhancement is False or args.contrast_phases is not None
            or args.keep_orientation is not None):
        cfg.validate(source="command line")
    if args.quiet and args.verbose is None:
        cfg.verbose = 0
    elif args.verbose is None and cfg.verbose == 1 and not sys.stdout.isatty():
        cfg.verbose = 2  # a log file gets one plain line per epoch, no progress-bar escapes
    return cfg


STOP_REASONS = {"epochs": "all epochs done", "budget": "time budget spent", "early_stopping": "early stopping"}


def done_line(result) -> str:
    """The last line of a run: epochs and steps, why it stopped, the schedule's end, the model kept."""
    parts = [f"medseg-train: done, {result.epochs_completed} epochs ({result.steps} steps), "
             f"stopped: {STOP_REASONS.get(result.stop_reason, result.stop_reason or 'unknown')}"]
    if result.budget:
        b = result.budget
        parts.append(f"last step at {b.get('last_step_s', 0):.0f} s of a {b.get('max_time_s', 0):.0f} s budget"
                     + (f", then the final validation ({result.final_validation_s:.0f} s)"
                        if result.final_validation_s else ""))
    if result.final_lr is not None:
        parts.append(f"lr at the last step {result.final_lr:.2e} (schedule end 0, peak {result.learning_rate:.2e})")
    if result.best_epoch == 0:
        parts.append("no validation score")
    elif result.validation == "training cases":
        parts.append(f"last model kept, 3D DSC {result.best_dsc:.4f} on the training cases")
    else:
        parts.append(f"best 3D validation DSC {result.best_dsc:.4f} at epoch {result.best_epoch}")
    return "; ".join(parts) + f"; bundle in {result.run_dir}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.resume and not (args.images and args.labels):
        parser.error("--images and --labels are required (or --resume RUN_DIR)")
    setup_logging(args)
    if not args.debug:
        # RunKeeper prints one summary line per epoch with the same loss split; the diagnostics'
        # own per-epoch info line would repeat it (its warnings still show).
        logging.getLogger("medseg.train.diagnostics").setLevel(logging.WARNING)

    def run() -> int:
        cfg = config_from_args(args)
        import_tensorflow_quietly(args.debug)
        from medseg.events import Message, Printer
        from medseg.train import train

        # Every line of the run is a Message event; the command prints by subscribing.
        printer = Printer(verbose=bool(cfg.verbose))
        result = train(cfg, events=printer)
        printer(Message(done_line(result)))
        return 0

    return run_command("medseg-train", args, run)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
