"""Work that needs TensorFlow, run in a child process by the GUI tests and the scripts: a
viewer's OpenGL context and TensorFlow must not share a process (medseg/napari/predict_process.py).

    python _tf_jobs.py train DATA RUN_DIR [BUDGET_S]   # a tiny liver bundle (liver=5); BUDGET_S: a longer one
    python _tf_jobs.py predict RUN_DIR SCAN OUT.npz    # Predictor.segment: labels (i, j, k), fastest warm seconds
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def train_tiny(data: Path, run: Path, budget_s: float | None = None) -> None:
    from medseg.train import train

    settings = dict(images=str(data / "imagesTr"), labels=str(data / "labelsTr"), labels_map=["liver=5"],
                    run_dir=str(run), val_every=1000, verbose=0, seed=0, workers=1)
    if budget_s is None:  # the plumbing only: a few steps of a small network
        settings.update(epochs=1, steps_per_epoch=2, batch_size=2, depth=2, filters=[4, 8, 16], patch_size=[64, 64],
                        deep_supervision=False, cpu_sizing=False)
    else:
        settings.update(max_time_s=float(budget_s))
    train(settings)


def predict(run: Path, scan: Path, out: Path) -> None:
    from medseg.infer import Predictor, load_bundle
    from medseg.io import read_volume

    volume = read_volume(scan)
    predictor = Predictor(load_bundle(run))
    predictor.segment(volume)  # warm: traced graphs, as the widget's later runs have them
    seconds = []
    for _ in range(2):  # the fastest of two (a shared machine)
        start = time.perf_counter()
        labels = predictor.segment(volume)
        seconds.append(time.perf_counter() - start)
    np.savez(out, labels=np.asarray(labels.array), seconds=min(seconds))


if __name__ == "__main__":
    job, *args = sys.argv[1:]
    if job == "train":
        train_tiny(Path(args[0]), Path(args[1]), float(args[2]) if len(args) > 2 else None)
    elif job == "predict":
        predict(Path(args[0]), Path(args[1]), Path(args[2]))
    else:
        raise SystemExit(f"unknown job {job!r}")
