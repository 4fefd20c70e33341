"""Budgeted training: the schedule laid over the time budget vs laid over nominal epochs.

The liver task (train patient A, test patient B; :mod:`liver_task`), the same network and the
same wall-clock budget twice:

- ``budget``: medseg's budget mode, the poly schedule decays to 0 exactly at the budget;
- ``epochs``: the schedule laid over the nominal ``epochs x steps_per_epoch`` (100 x 250
  steps, medseg's defaults), truncated by the budget: what ``--max-time-s`` did before.

The network is sized once (the first run's CPU probe) and reused by the second, so both train
the same model. Figures: held-out 3D DSC of each; how far past the budget the last optimizer
step ended (``budget_overshoot_fraction``, goal <= 0.05); last learning rate / peak
(``final_lr_ratio`` of the budget run, goal <= 0.05 for poly); median training step.

    python benchmarks/budget.py [--budget-s 300] [--seeds 1]

With ``--seeds N`` each schedule trains N times (seeds 0..N-1: initialisation and patch order);
a single held-out patient scored after one run is a noisy figure, the mean over seeds less so.

Ends with one JSON line: ``dsc_budget_schedule``, ``dsc_epoch_schedule`` (means over the seeds,
per-seed values beside them), ``budget_overshoot_fraction`` (the largest), ``final_lr_ratio``
(the largest of the budget runs), ``step_s`` (median step of the budget runs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from liver_task import lay_out, require, score_patient_b, train_liver  # benchmarks/ is on sys.path


def run_pair(data, work, budget_s: float, seed: int) -> dict:
    """Both schedules with one seed; the network sized by the first run is reused by the second."""
    runs, network = {}, {}
    for name in ("budget", "epochs"):
        run_dir = work / f"{name}_{seed}"
        result = train_liver(data, run_dir, budget_s, schedule_over=name, seed=seed, **network)
        if not network:
            network = {"filters": list(result.model_config["filters"]), "depth": result.model_config["depth"],
                       "cpu_sizing": False}
        score = score_patient_b(data, run_dir)
        b = result.budget or {}
        runs[name] = {"dsc": score["dsc"], "hd95_mm": score["hd95_mm"], "steps": result.steps,
                      "last_step_s": b.get("last_step_s"), "overshoot_fraction": b.get("overshoot_fraction"),
                      "final_lr": result.final_lr, "peak_lr": result.learning_rate, "step_s": b.get("step_s"),
                      "final_validation_s": result.final_validation_s, "stop_reason": result.stop_reason,
                      "network": network}
        print(f"seed {seed}, {name:>7} schedule: DSC {score['dsc']:.4f}, HD95 {score['hd95_mm']:.1f} mm; "
              f"{result.steps} steps, last step at {b.get('last_step_s', 0):.1f} s of {budget_s:.0f} s, final lr "
              f"{result.final_lr:.2e} (peak {result.learning_rate:.0e}), median step {b.get('step_s', 0):.3f} s",
              flush=True)
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=300.0, help="training budget of each run (s)")
    parser.add_argument("--seeds", type=int, default=1, help="runs per schedule (seeds 0..N-1)")
    args = parser.parse_args(argv)
    require("tensorflow", "SimpleITK")

    work = Path(tempfile.mkdtemp(prefix="medseg-budget-"))
    try:
        data = lay_out(work)
        pairs = [run_pair(data, work, args.budget_s, seed) for seed in range(args.seeds)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    budget_runs = [p["budget"] for p in pairs]
    epoch_runs = [p["epochs"] for p in pairs]
    out = {
        "dsc_budget_schedule": round(statistics.mean(r["dsc"] for r in budget_runs), 4),
        "dsc_epoch_schedule": round(statistics.mean(r["dsc"] for r in epoch_runs), 4),
        "budget_overshoot_fraction": round(max(r["overshoot_fraction"] for p in pairs for r in p.values()), 4),
        "final_lr_ratio": round(max(r["final_lr"] / r["peak_lr"] for r in budget_runs), 5),
        "step_s": round(statistics.median(r["step_s"] for r in budget_runs), 4),
        "dsc_budget_schedule_per_seed": [round(r["dsc"], 4) for r in budget_runs],
        "dsc_epoch_schedule_per_seed": [round(r["dsc"], 4) for r in epoch_runs],
        "budget_s": args.budget_s,
        "seeds": args.seeds,
        "runs": pairs,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
