"""``medseg-info RUN_DIR``: what a trained model is and what it does to an image, from its bundle.

Prints the network (registered builder and arguments), classes, threshold and post-processing,
how it was trained, selected and validated, whether its run was cancelled, and the model's pipeline step by step: which steps run at
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


def _network_line(contract) -> str:
    network = contract.network
    if isinstance(network, Mapping):
        args = ", ".join(f"{k}={v!r}" for k, v in (network.get("args") or {}).items())
        return f"{network.get('name')}({args})"
    legacy = contract.legacy_network
    return f"unetpp {legacy} (recorded before networks were named in bundles)" if legacy else "not recorded"


def _largest_component(contract) -> bool | dict[str, bool]:
    """The largest-component choice: yes/no for a one-class model, per class for several."""
    post, names = contract.postprocessing, contract.foreground
    if len(names) == 1:
        return post.keeps_largest(names[0])
    return {name: post.keeps_largest(name) for name in names}


def describe_bundle(run_dir: str | Path) -> dict[str, Any]:
    """Everything ``medseg-info`` shows, as a JSON-ready dict (``pipeline`` as text lines), from
    the typed ``bundle.json`` (:class:`medseg.infer.contract.BundleInfo`)."""
    from medseg.infer.bundle import read_bundle_contract

    folder, contract = read_bundle_contract(run_dir)
    training = contract.training.to_dict() if contract.training is not None else {}
    training.update({k: v for k, v in (("validation", contract.validation), ("selection", contract.selection))
                     if v is not None})
    return {
        "run_dir": str(folder.resolve()),
        "model_file": contract.model_file,
        "model_sha256": contract.model_sha256,
        "created": contract.created,
        "versions": dict(contract.versions),
        "format_version": contract.format_version,
        "status": contract.status,
        "network": _network_line(contract),
        "classes": list(contract.classes),
        "threshold": contract.threshold,
        "head_level": contract.head_level,
        "input_channels": contract.input_channels,
        "divisor": contract.divisor,
        "modality": (contract.raw.get("plan") or {}).get("modality"),
        "largest_component": _largest_component(contract),
        "postprocessing": contract.postprocessing.to_dict(),
        "training": training,
        "pipeline": pipeline_lines(contract.raw),
        **({"parent": contract.parent.to_dict()} if contract.parent is not None else {}),
    }


def _yes_no(choice: bool | Mapping[str, bool]) -> str:
    if isinstance(choice, Mapping):
        kept = [name for name, keep in choice.items() if keep]
        return ", ".join(kept) if kept else "no"
    return "yes" if choice else "no"


def format_text(d: Mapping[str, Any]) -> str:
    """The human-readable form of :func:`describe_bundle`."""
    from medseg.infer.contract import SELECTION_TEXT

    training = d["training"]
    dsc = training.get("val_dsc_3d")
    lines = [
        f"model      {d['run_dir']}/{d['model_file']} (saved {d['created']}; sha256 {str(d['model_sha256'])[:12]}...)",
        f"network    {d['network']}; input {d['input_channels']} channel(s), sizes padded to a multiple of "
        f"{d['divisor']}" + (f"; head {d['head_level']}" if d["head_level"] else ""),
        f"classes    {', '.join(d['classes'])}; threshold {d['threshold']:g}; keep largest component: "
        f"{_yes_no(d['largest_component'])}",
        f"modality   {d['modality']}",
    ]
    if d.get("status", "complete") != "complete":
        lines.append(f"status     {d['status']}: the training run was cancelled before its end; the model "
                     "is the one saved then, and it runs")
    if training:
        selection = SELECTION_TEXT.get(training.get("selection", "best"), training.get("selection"))
        lines.append(f"trained    epoch {training.get('epoch')}, validation 3D DSC "
                     f"{'n/a' if dsc is None else f'{dsc:.3f}'} ({training.get('validation', 'held-out cases')}); "
                     f"kept: {selection}")
    if d.get("parent"):
        lines.append(f"fine-tuned from {d['parent']['path']} (its model's sha256 {d['parent']['sha256'][:12]}...)")
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
