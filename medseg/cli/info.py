"""``medseg-info RUN_DIR``: what a trained model is and what it does to an image, from its bundle.

Prints the network (registered builder and arguments), classes, threshold and post-processing,
how it was trained and validated, and the model's pipeline step by step: which steps run at
inference, which only in training, and which one is inverted to put the prediction back on the
input's grid. ``--json`` prints the same as one JSON object. Reads ``bundle.json`` only: no
TensorFlow, no model loading (a second or less).

Exit codes: 0 shown, 2 not a run folder / unreadable bundle.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Mapping

from medseg.cli._common import EXIT_OK, add_common_args, run_command, setup_logging

PROG = "medseg-info"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Show a trained model's network, classes, training record and preprocessing pipeline "
                    "(read from its bundle.json; nothing is loaded or run).",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run folder holding model.keras and bundle.json")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_common_args(parser)
    return parser


def pipeline_lines(info: Mapping[str, Any]) -> list[str]:
    """The bundle's pipeline, one line per step (``Pipeline.describe``).

    A bundle written before pipelines were saved shows the pipeline its Plan implies (what it ran);
    a step that cannot be rebuilt here (a user's module not importable) is listed as saved, with
    the reason, instead of failing.
    """
    from medseg.data.plan import Plan
    from medseg.transforms.pipeline import Pipeline

    config = info.get("pipeline")
    if config is None:
        lines = Pipeline.from_plan(Plan.from_dict(info["plan"])).describe()
        return lines + ["(not saved in this bundle, which predates saved pipelines: the steps its plan implies)"]
    try:
        return Pipeline.from_config(config).describe()
    except (TypeError, ValueError) as exc:
        entries = config.get("transforms", []) if isinstance(config, Mapping) else []
        lines = [f"{i}. {e.get('name')}({e.get('args')}) from {e.get('module')}" for i, e in enumerate(entries, 1)]
        return lines + [f"(cannot be rebuilt here: {exc})"]


def _network_line(info: Mapping[str, Any]) -> str:
    network = info.get("network")
    if isinstance(network, Mapping):
        args = ", ".join(f"{k}={v!r}" for k, v in (network.get("args") or {}).items())
        return f"{network.get('name')}({args})"
    legacy = (info.get("extra") or {}).get("network")
    return f"unetpp {legacy} (recorded before networks were named in bundles)" if legacy else "not recorded"


def describe_bundle(run_dir: str | Path) -> dict[str, Any]:
    """Everything ``medseg-info`` shows, as a JSON-ready dict (``pipeline`` as text lines)."""
    from medseg.infer.bundle import read_bundle_info

    info = read_bundle_info(run_dir)
    folder = Path(info.pop("_run_dir"))
    extra = info.get("extra") or {}
    post = (extra.get("postprocessing") or {})
    return {
        "run_dir": str(folder.resolve()),
        "model_file": info.get("model_file"),
        "model_sha256": info.get("model_sha256"),
        "created": info.get("created"),
        "versions": info.get("versions"),
        "network": _network_line(info),
        "classes": info["classes"],
        "threshold": info["threshold"],
        "head_level": info.get("head_level"),
        "input_channels": info["input_channels"],
        "divisor": info["divisor"],
        "modality": (info.get("plan") or {}).get("modality"),
        "largest_component": bool(post.get("largest_component", False)),
        "training": {k: extra.get(k) for k in ("epoch", "val_dsc_3d", "val_hd95_mm", "validation", "selection",
                                               "train_cases", "val_cases", "map_labels") if k in extra},
        "pipeline": pipeline_lines(info),
    }


def format_text(d: Mapping[str, Any]) -> str:
    """The human-readable form of :func:`describe_bundle`."""
    training = d["training"]
    dsc = training.get("val_dsc_3d")
    lines = [
        f"model      {d['run_dir']}/{d['model_file']} (saved {d['created']}; sha256 {str(d['model_sha256'])[:12]}...)",
        f"network    {d['network']}; input {d['input_channels']} channel(s), sizes padded to a multiple of "
        f"{d['divisor']}" + (f"; head {d['head_level']}" if d["head_level"] else ""),
        f"classes    {', '.join(d['classes'])}; threshold {d['threshold']:g}; keep largest component: "
        f"{'yes' if d['largest_component'] else 'no'}",
        f"modality   {d['modality']}",
    ]
    if training:
        lines.append(f"trained    epoch {training.get('epoch')}, validation 3D DSC "
                     f"{'n/a' if dsc is None else f'{dsc:.3f}'} ({training.get('validation', 'held-out cases')}); "
                     f"kept: {training.get('selection', 'best')}")
    versions = d.get("versions") or {}
    if versions:
        lines.append("versions   " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    lines.append("pipeline   (training: every step in order, per case then per batch; inference: the steps "
                 "marked 'inference', then the inverse)")
    lines += [f"  {line}" for line in d["pipeline"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    return run_command(PROG, args, lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    d = describe_bundle(args.run_dir)
    print(json.dumps(d, indent=2) if args.json else format_text(d))
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
