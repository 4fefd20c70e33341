"""Four organs at once on the liver task's patients: A trains, B (contrast CT, DICOM) is scored.

    python benchmarks/multiclass.py [--budget-s 300] [--seed 0]

Liver (5), spleen (1), stomach (6) and aorta (52) of TotalSegmentator's label maps, the organs
present in both patients. medseg-train runs on patient A with ``--labels-map liver=5 spleen=1
stomach=6 aorta=52`` (softmax over 5 classes started at the class priors, class-balanced
lesion-aware sampling, the classes' CT window, class-weighted cross-entropy, simulated contrast
enhancement, patches that keep the body's orientation: the organs lie on opposite sides) under a
``--budget-s`` training budget (CPU sizing picks the network, as for a user); patient B is
segmented by the bundle (what medseg-infer writes: the dataset's label ids) and each organ is
scored in 3D with medseg's metrics against B's label map. The peer, in the same run, is the same
recipe trained binary on the liver alone (``--map-labels 5:1,*:0``) under the same budget:
``dsc_liver_binary`` (does sharing the network with three more organs cost the liver?).

The last line printed is one JSON object with ``dsc_liver``, ``dsc_spleen``, ``dsc_stomach``,
``dsc_aorta``, ``dsc_mean`` (the four organs' mean) and ``dsc_liver_binary``, plus HD95 per
organ, the same DSCs with test-time flips (``dsc_<organ>_tta``, ``dsc_mean_tta``: ``medseg-infer
--tta``; null when the model kept the orientation, as the four organs' does: it saw no flips and
``--tta`` refuses it), each organ's DSC on patient A itself (``fit_dsc_<organ>_patient_a``: learned, versus
carried over to B), the steps each run made and the network it chose. Goal (issue 13): ``dsc_liver >= 0.80``
and ``dsc_mean >= 0.6``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from liver_task import lay_out, require, score_patient_b, train_liver, warm_imports  # noqa: E402

ORGANS = {"liver": 5, "spleen": 1, "stomach": 6, "aorta": 52}


def score_organs(data: Path, run_dir: Path) -> dict:
    """Segment patient B with the bundle and score each organ (DSC, HD95) against B's labels."""
    import numpy as np

    from medseg.data.plan import load_pair
    from medseg.eval import compute_metrics
    from medseg.infer.bundle import load_bundle
    from medseg.infer.predictor import Predictor, tta_flips
    from medseg.io import Case

    image, label = load_pair(Case("patientB", data / "imagesTs" / "patientB", data / "labelsTs" / "patientB.nii.gz"))
    predictor = Predictor(load_bundle(run_dir))
    warm_imports()
    t0 = time.perf_counter()
    pred = np.asarray(predictor.segment(image).array)
    infer_s = time.perf_counter() - t0
    ref = np.asarray(label.array)
    out = {"infer_s": round(infer_s, 2)}
    for name, value in ORGANS.items():
        m = compute_metrics(pred == value, ref == value, image.spacing_mm)
        out[f"dsc_{name}"] = round(float(m["dsc"]), 4)
        out[f"hd95_mm_{name}"] = round(float(m["hd95_mm"]), 2)
    out["dsc_mean"] = round(float(np.mean([out[f"dsc_{n}"] for n in ORGANS])), 4)
    # medseg-infer --tta: the mean probability over the in-plane flips the model was trained with;
    # None for a model that kept the orientation (no flips in training: --tta is refused).
    bundle = load_bundle(run_dir)
    if len(tta_flips(bundle)) == 1:
        out.update({f"dsc_{n}_tta": None for n in ORGANS}, dsc_mean_tta=None)
        return out
    pred = np.asarray(Predictor(bundle, tta=True).segment(image).array)
    for name, value in ORGANS.items():
        out[f"dsc_{name}_tta"] = round(float(compute_metrics(pred == value, ref == value, image.spacing_mm)["dsc"]), 4)
    out["dsc_mean_tta"] = round(float(np.mean([out[f"dsc_{n}_tta"] for n in ORGANS])), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=300.0, help="training budget of each run (s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    require("tensorflow", "SimpleITK")
    print(f"multiclass: 4 organs ({', '.join(f'{k}={v}' for k, v in ORGANS.items())}) on patient A, "
          f"{args.budget_s:.0f} s budget, then liver alone (binary) as the peer; {os.cpu_count()} CPU cores",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="medseg-multiclass-") as tmp:
        data = lay_out(Path(tmp))
        labels_map = [f"{k}={v}" for k, v in ORGANS.items()]
        t0 = time.perf_counter()
        multi = train_liver(data, Path(tmp) / "multi", args.budget_s, map_labels=None, labels_map=labels_map,
                            seed=args.seed)
        multi_s = time.perf_counter() - t0
        scores = score_organs(data, Path(tmp) / "multi")
        print(f"multiclass: 4 organs, {multi.steps} steps in {multi_s:.0f} s (filters {multi.model_config['filters']}): "
              + ", ".join(f"{n} {scores[f'dsc_{n}']:.3f}" for n in ORGANS) + f"; mean {scores['dsc_mean']:.3f} "
              + (f"(with --tta: {scores['dsc_mean_tta']:.3f})" if scores["dsc_mean_tta"] is not None
                 else "(no --tta: the model kept the orientation)"), flush=True)
        t0 = time.perf_counter()
        binary = train_liver(data, Path(tmp) / "binary", args.budget_s, seed=args.seed)
        binary_s = time.perf_counter() - t0
        liver = score_patient_b(data, Path(tmp) / "binary")
        print(f"multiclass: liver alone (binary), {binary.steps} steps in {binary_s:.0f} s: DSC {liver['dsc']:.3f}",
              flush=True)
    # Validation on the training case (patient A: one labelled case trains and validates): how well
    # each organ was learned, against how well it carries over to patient B.
    last = next((h for h in reversed(multi.history) if "val_dsc_liver" in h), {})
    fit = {f"fit_dsc_{n}_patient_a": round(float(last.get(f"val_dsc_{n}", float("nan"))), 4) for n in ORGANS}
    print("multiclass: on patient A itself (the training case): "
          + ", ".join(f"{n} {fit[f'fit_dsc_{n}_patient_a']:.3f}" for n in ORGANS), flush=True)
    result = {**{k: v for k, v in scores.items() if k.startswith(("dsc_", "hd95"))}, **fit,
              "dsc_liver_binary": round(liver["dsc"], 4), "hd95_mm_liver_binary": round(liver["hd95_mm"], 2),
              "steps_multiclass": multi.steps, "steps_binary": binary.steps,
              "filters_multiclass": multi.model_config["filters"], "filters_binary": binary.model_config["filters"],
              "budget_s": args.budget_s, "infer_s_multiclass": scores["infer_s"], "cpu_cores": os.cpu_count(),
              "goals_met": {"dsc_liver_0.80": scores["dsc_liver"] >= 0.80, "dsc_mean_0.6": scores["dsc_mean"] >= 0.6}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
