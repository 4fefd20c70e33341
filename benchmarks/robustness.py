"""Robust to what changes between scanners (issue 23): contrast phase, field of view, resolution.

    python benchmarks/robustness.py [--budget-s 300] [--seed 0] [--only dsc_liver_b_to_a ...] [--plan JSON]

The liver task's two visible patients (benchmarks/liver_task.py): A, a non-contrast abdomen CT
(NIfTI, 3 mm voxels, the whole abdomen) and B, a contrast-enhanced CT (a 20-file DICOM series,
0.98 x 0.98 x 2 mm, 4 cm of the body). Each model is medseg-train under ``--budget-s`` (default
300 s, CPU sizing as for a user) and each scan is segmented as medseg-infer does (the bundle's
post-processing), scored in 3D with medseg's metrics against the patient's label map:

- ``dsc_aorta_a_to_b`` / ``dsc_aorta_b_to_a``: the aorta (``--map-labels 52:1,*:0``) trained on
  one patient alone, scored on the other (goals 0.75 / 0.70);
- ``dsc_liver_a_to_b`` / ``dsc_liver_b_to_a``: the same for the liver (``5:1,*:0``; 0.90 / 0.70);
- ``dsc_crop_vs_full_b``: the liver model of A on a crop of B (in-plane box around the liver plus
  a 15 mm margin: no body outline, no air) against the full B prediction on the same region:
  ``|DSC(crop prediction) - DSC(full prediction, cropped)|`` (goal <= 0.02);
- ``aorta_ab_fit_min``: the aorta trained on A + B with default flags: the smaller of its DSCs on
  A and on B (goal >= 0.80);
- ``warned_out_of_range`` of ``shifted_inputs``: medseg-infer (the command, one call) with the
  A + B aorta model on deliberately shifted copies of B: +300 HU inside the aorta, and B
  resampled to 5 mm slices (linear, SimpleITK); how many made it print the out-of-range warning.

Each cross-patient figure comes with ``volumes_<organ>_<x>_to_<y>``: predicted and reference mL,
the predicted mL on slices without the structure, and the DSC on the slices that hold it (whether a
model misses the structure or marks other anatomy). ``--only`` runs some parts and ``--plan``
overrides every run's plan, e.g. ``'{"contrast_phases": "on"}'`` (diagnosis).

The single-patient runs use the demo's settings (``benchmarks/liver_task.train_liver``: no
validation during the budget); the A + B run uses medseg-train's defaults. Figures are printed
as they come; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from liver_task import REPO, lay_out, require, warm_imports  # noqa: E402

AORTA, LIVER = "52:1,*:0", "5:1,*:0"
#: The out-of-range warning medseg-infer prints (medseg.infer.range_check.RangeCheck.warning).
WARNING_MARK = "warning: out of the training range"
CROP_MARGIN_MM = 15.0


def training_sets(data: Path, root: Path) -> dict[str, tuple[Path, Path]]:
    """(images, labels) folders of A alone, B alone and A + B (copies, as a user lays them out)."""
    sets = {}
    for name, cases in {"A": ["A"], "B": ["B"], "AB": ["A", "B"]}.items():
        images, labels = root / name / "images", root / name / "labels"
        images.mkdir(parents=True)
        labels.mkdir(parents=True)
        if "A" in cases:
            shutil.copy(data / "imagesTr" / "patientA.nii.gz", images / "patientA.nii.gz")
            shutil.copy(data / "labelsTr" / "patientA.nii.gz", labels / "patientA.nii.gz")
        if "B" in cases:
            shutil.copytree(data / "imagesTs" / "patientB", images / "patientB")
            shutil.copy(data / "labelsTs" / "patientB.nii.gz", labels / "patientB.nii.gz")
        sets[name] = (images, labels)
    return sets


#: Plan overrides of every run (``--plan``, diagnosis): e.g. ``{"contrast_phases": "on"}``.
PLAN: dict = {}


def train(images: Path, labels: Path, run_dir: Path, map_labels: str, budget_s: float, seed: int,
          demo_settings: bool):
    from medseg.train import train as medseg_train

    config = dict(images=str(images), labels=str(labels), map_labels=map_labels, run_dir=str(run_dir),
                  max_time_s=float(budget_s), verbose=0, seed=seed, plan=dict(PLAN))
    if demo_settings:
        config["val_every"] = 1000  # as benchmarks/liver_task.train_liver (the demo)
    t0 = time.perf_counter()
    result = medseg_train(config)
    return result, time.perf_counter() - t0


def patient(data: Path, name: str, map_labels: str):
    """(image Volume, boolean reference on its grid) of patient A or B under ``map_labels``."""
    import numpy as np

    from medseg.data.plan import load_pair
    from medseg.io import Case
    from medseg.io.labels import parse_label_map

    image_path = data / "imagesTr" / "patientA.nii.gz" if name == "A" else data / "imagesTs" / "patientB"
    label_path = data / ("labelsTr" if name == "A" else "labelsTs") / f"patient{name}.nii.gz"
    image, label = load_pair(Case(f"patient{name}", image_path, label_path, label_map=parse_label_map(map_labels)))
    return image, np.asarray(label.array) > 0


#: The benchmark's parts (``--only``), named by their figure.
PARTS = ("dsc_aorta_a_to_b", "dsc_aorta_b_to_a", "dsc_liver_a_to_b", "dsc_liver_b_to_a", "dsc_crop_vs_full_b",
         "aorta_ab_fit_min")

#: Issue 23's goals: name -> (figure, test).
GOALS = {"dsc_aorta_a_to_b_0.75": ("dsc_aorta_a_to_b", lambda v: v >= 0.75),
         "dsc_aorta_b_to_a_0.70": ("dsc_aorta_b_to_a", lambda v: v >= 0.70),
         "dsc_liver_a_to_b_0.90": ("dsc_liver_a_to_b", lambda v: v >= 0.90),
         "dsc_liver_b_to_a_0.70": ("dsc_liver_b_to_a", lambda v: v >= 0.70),
         "dsc_crop_vs_full_b_0.02": ("dsc_crop_vs_full_b", lambda v: v <= 0.02),
         "aorta_ab_fit_min_0.80": ("aorta_ab_fit_min", lambda v: v >= 0.80),
         "all_shifted_warned": ("warned_out_of_range", lambda v: v == 2)}


def volumes(pred, ref, spacing) -> dict:
    """Where a cross-patient prediction goes wrong: predicted and reference mL, the predicted mL on
    the slices (last axis) holding no reference, and the DSC on the slices that hold it."""
    import numpy as np

    ml = float(np.prod(spacing)) / 1000.0
    held = ref.any(axis=(0, 1))
    return {"pred_ml": round(float(pred.sum()) * ml, 1), "ref_ml": round(float(ref.sum()) * ml, 1),
            "pred_ml_off_ref_slices": round(float(pred[..., ~held].sum()) * ml, 1),
            "dsc_on_ref_slices": dsc(pred[..., held], ref[..., held], spacing)}


def dsc(pred, ref, spacing) -> float:
    from medseg.eval import compute_metrics

    return round(float(compute_metrics(pred, ref, spacing)["dsc"]), 4)


def segment(run_dir: Path, image):
    import numpy as np

    from medseg.infer.bundle import load_bundle
    from medseg.infer.predictor import Predictor

    return np.asarray(Predictor(load_bundle(run_dir)).segment(image).array) > 0


def crop_vs_full(run_dir: Path, image, ref) -> dict:
    """The model on a crop of B around the liver against its full-B prediction on that crop."""
    import numpy as np

    from medseg.io import Volume

    ii, jj = np.nonzero(ref.any(axis=2))
    margin = [int(np.ceil(CROP_MARGIN_MM / s)) for s in image.spacing_mm[:2]]
    lo = [max(0, int(ii.min()) - margin[0]), max(0, int(jj.min()) - margin[1])]
    hi = [min(image.shape[0], int(ii.max()) + 1 + margin[0]), min(image.shape[1], int(jj.max()) + 1 + margin[1])]
    box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(None))
    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ [lo[0], lo[1], 0] + image.affine[:3, 3]  # the crop's first voxel
    crop = Volume(np.ascontiguousarray(np.asarray(image.array)[box]), affine, "patientB_crop", dict(image.meta))
    full = segment(run_dir, image)[box]
    cropped = segment(run_dir, crop)
    d_crop, d_full = dsc(cropped, ref[box], image.spacing_mm), dsc(full, ref[box], image.spacing_mm)
    return {"dsc_crop_b": d_crop, "dsc_full_b_on_crop": d_full, "dsc_crop_vs_full_b": round(abs(d_crop - d_full), 4),
            "crop_shape": list(crop.shape)}


def shifted_copies(data: Path, folder: Path) -> list[Path]:
    """B with +300 HU inside its aorta, and B resampled to 5 mm slices (linear), as NIfTI files."""
    import numpy as np
    import SimpleITK as sitk

    from medseg.io import write_volume
    from medseg.io.itk import image_to_volume, volume_to_image

    image, aorta = patient(data, "B", AORTA)
    folder.mkdir(parents=True)
    enhanced = image.with_array(np.asarray(image.array, dtype=np.float32) + 300.0 * aorta)
    paths = [write_volume(enhanced, folder / "patientB_aorta_plus300.nii.gz")]
    itk = volume_to_image(image.with_array(np.asarray(image.array, dtype=np.float32)))
    spacing = list(itk.GetSpacing())
    slice_axis = int(np.argmax(spacing))
    size = list(itk.GetSize())
    new_spacing = spacing.copy()
    new_spacing[slice_axis] = 5.0
    size[slice_axis] = max(1, int(round((size[slice_axis] - 1) * spacing[slice_axis] / 5.0)) + 1)
    thick = sitk.Resample(itk, size, sitk.Transform(), sitk.sitkLinear, itk.GetOrigin(), new_spacing,
                          itk.GetDirection(), -1024.0, sitk.sitkFloat32)
    paths.append(write_volume(image_to_volume(thick, case_id="patientB_5mm", meta={"modality": "CT"}),
                              folder / "patientB_5mm.nii.gz"))
    return paths


def warned(run_dir: Path, inputs: list[Path], out: Path) -> tuple[int, list[str]]:
    """Run medseg-infer once on ``inputs``; the number of inputs it warned about, and the lines."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "medseg.cli.infer", *map(str, inputs), "--model", str(run_dir), "-o", f"{out}/"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"robustness: medseg-infer failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    lines = [line for line in proc.stderr.splitlines() if WARNING_MARK in line]
    return sum(any(line.startswith(str(p)) for line in lines) for p in inputs), lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=300.0, help="training budget of each of the 5 runs (s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", choices=list(PARTS), default=list(PARTS),
                        help="run these parts only (for diagnosis; the figures of the parts left out are absent)")
    parser.add_argument("--plan", type=json.loads, default={},
                        help='plan overrides of every run, JSON (diagnosis), e.g. \'{"contrast_phases": "on"}\'')
    args = parser.parse_args()
    PLAN.update(args.plan)
    require("tensorflow", "SimpleITK")
    print(f"robustness: 5 trainings of {args.budget_s:.0f} s on patients A and B; {os.cpu_count()} CPU cores",
          flush=True)
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="medseg-robustness-") as tmp:
        tmp = Path(tmp)
        data = lay_out(tmp)
        sets = training_sets(data, tmp / "sets")
        warm_imports()
        steps = {}
        for organ, labels_map in (("aorta", AORTA), ("liver", LIVER)):
            for train_on, test_on in (("A", "B"), ("B", "A")):
                key = f"dsc_{organ}_{train_on.lower()}_to_{test_on.lower()}"
                if key not in args.only:
                    continue
                run = tmp / "runs" / f"{organ}_{train_on}"
                fit, seconds = train(*sets[train_on], run, labels_map, args.budget_s, args.seed, demo_settings=True)
                image, ref = patient(data, test_on, labels_map)
                pred = segment(run, image)
                result[key] = dsc(pred, ref, image.spacing_mm)
                steps[f"steps_{organ}_{train_on.lower()}"] = fit.steps
                detail = volumes(pred, ref, image.spacing_mm)
                result[key.replace("dsc_", "volumes_")] = detail
                print(f"robustness: {organ} trained on {train_on} ({fit.steps} steps, {seconds:.0f} s), "
                      f"on {test_on}: DSC {result[key]:.3f}; {detail}", flush=True)
        if "dsc_crop_vs_full_b" in args.only:
            crop(data, tmp, sets, args, result)
        if "aorta_ab_fit_min" in args.only:
            fit_ab(data, tmp, sets, args, result, steps)
    result.update(steps, budget_s=args.budget_s, plan=args.plan, cpu_cores=os.cpu_count(), goals_met={
        goal: test(result[key]) for goal, (key, test) in GOALS.items() if key in result})
    print(json.dumps(result))


def crop(data: Path, tmp: Path, sets: dict, args, result: dict) -> None:
    """``dsc_crop_vs_full_b``: the liver model of A (trained here if ``liver_a_to_b`` was not run)."""
    run = tmp / "runs" / "liver_A"
    if not run.exists():
        train(*sets["A"], run, LIVER, args.budget_s, args.seed, demo_settings=True)
    image_b, liver_b = patient(data, "B", LIVER)
    result.update(crop_vs_full(run, image_b, liver_b))
    print(f"robustness: liver model of A on a crop {result['crop_shape']} of B: DSC {result['dsc_crop_b']:.3f}, "
          f"the full prediction there {result['dsc_full_b_on_crop']:.3f}", flush=True)


def fit_ab(data: Path, tmp: Path, sets: dict, args, result: dict, steps: dict) -> None:
    """``aorta_ab_fit_min`` and ``warned_out_of_range``: the aorta on A + B with default flags."""
    ab = tmp / "runs" / "aorta_AB"
    fit, seconds = train(*sets["AB"], ab, AORTA, args.budget_s, args.seed, demo_settings=False)
    steps["steps_aorta_ab"] = fit.steps
    on = {}
    for name in ("A", "B"):
        image, ref = patient(data, name, AORTA)
        on[name] = dsc(segment(ab, image), ref, image.spacing_mm)
    result["aorta_ab_dsc_a"], result["aorta_ab_dsc_b"] = on["A"], on["B"]
    result["aorta_ab_fit_min"] = min(on.values())
    print(f"robustness: aorta trained on A + B ({fit.steps} steps, {seconds:.0f} s): DSC on A {on['A']:.3f}, "
          f"on B {on['B']:.3f}", flush=True)
    inputs = shifted_copies(data, tmp / "shifted")
    count, lines = warned(ab, inputs, tmp / "shifted_out")
    for line in lines:
        print(f"robustness: medseg-infer said: {line}", flush=True)
    result["warned_out_of_range"], result["shifted_inputs"] = count, len(inputs)
    print(f"robustness: {count} of {len(inputs)} shifted copies of B warned about", flush=True)


if __name__ == "__main__":
    main()
