"""The demo's liver task, shared by the benchmarks that train on it (budget, demo_task, seed_recipe).

Patient A (non-contrast abdomen CT, NIfTI) trains; patient B (contrast-enhanced CT, a 20-file
DICOM series) is held out and scored against its label map (stored LAS; paired by geometry).
Liver = label 5 of TotalSegmentator's maps. The files are the checked copies in
``tests/data/totalsegmentator``, laid out exactly as ``scripts/demo`` lays out the archive's.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "tests" / "data" / "totalsegmentator"
LIVER = "5:1,*:0"


def require(*modules: str) -> None:
    """Exit with one line naming the install command when a module the benchmark needs is missing
    (checked before any work, not after minutes of it)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        print(f"{Path(sys.argv[0]).name}: needs {', '.join(missing)}; install with: "
              f"{REPO / '.venv/bin/pip'} install -e '{REPO}[bench]'", file=sys.stderr)
        raise SystemExit(2)


def lay_out(work: Path) -> Path:
    """The liver task's folders (imagesTr, labelsTr, imagesTs/patientB, labelsTs) under ``work``."""
    spec = importlib.util.spec_from_file_location("prepare_sample_data", REPO / "scripts" / "prepare_sample_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.prepare_liver(Path(work) / "liver", SOURCE)


def train_liver(data: Path, run_dir: Path, budget_s: float, **settings):
    """medseg-train on patient A under ``budget_s`` seconds (settings override the defaults)."""
    from medseg.train import train

    config = dict(images=str(data / "imagesTr"), labels=str(data / "labelsTr"), map_labels=LIVER,
                  run_dir=str(run_dir), max_time_s=float(budget_s), val_every=1000, verbose=0, seed=0)
    config.update(settings)
    return train(config)


def patient_b(data: Path):
    """(image Volume of the DICOM series, boolean liver reference on that grid)."""
    import numpy as np

    from medseg.data.plan import load_pair
    from medseg.io import Case
    from medseg.io.labels import parse_label_map

    image, label = load_pair(Case("patientB", data / "imagesTs" / "patientB", data / "labelsTs" / "patientB.nii.gz",
                                  label_map=parse_label_map(LIVER)))
    return image, np.asarray(label.array) > 0


def warm_imports() -> None:
    """Import SimpleITK (in-plane resampling) before inference is timed: its first import loads a
    270 MB library, which from a cold page cache took 43-51 s here (measured with cProfile in the
    multiclass runs whose inference seemed to take 45 s instead of 2.5 s); that is disk, not
    inference."""
    import SimpleITK  # noqa: F401


def score_patient_b(data: Path, run_dir: Path) -> dict:
    """Segment patient B with the run's bundle as ``medseg-infer`` would (its post-processing
    included) and score it in 3D: ``dsc``, ``hd95_mm``, ``infer_s`` (reading excluded)."""
    import numpy as np

    from medseg.eval import compute_metrics
    from medseg.infer.bundle import load_bundle
    from medseg.infer.predictor import Predictor

    image, ref = patient_b(data)
    predictor = Predictor(load_bundle(run_dir))
    warm_imports()
    t0 = time.perf_counter()
    mask = predictor.segment(image)
    infer_s = time.perf_counter() - t0
    metrics = compute_metrics(np.asarray(mask.array) > 0, ref, image.spacing_mm)
    return {"dsc": float(metrics["dsc"]), "hd95_mm": float(metrics["hd95_mm"]), "infer_s": infer_s,
            "largest_component": predictor.largest_component_default}
