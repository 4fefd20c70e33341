"""TensorFlow checks of the fine-tune GUI tests, in a child process (no TensorFlow beside the
viewer's OpenGL: medseg/napari/predict_process.py). Prints one JSON line.

    python _tf_finetune_jobs.py compare PARENT_RUN CHILD_RUN
        min_correlation: over the weight tensors (> 8 values), the smallest Pearson correlation
        of the child's weights with the parent's (a fine-tuning of a few steps stays close);
        fresh_max_correlation: the largest with a freshly initialised network of the same build
        (what "started from scratch" would give).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _weights(model) -> list[np.ndarray]:
    return [np.asarray(w).ravel() for w in model.get_weights() if np.size(w) > 8]


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if np.std(a) == 0 or np.std(b) == 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(np.corrcoef(a, b)[0, 1])


def compare(parent: str, child: str) -> dict:
    import keras

    from medseg.infer import load_bundle

    p, c = load_bundle(parent).model, load_bundle(child).model
    fresh = keras.models.clone_model(p)  # same architecture, new initial weights
    wp, wc, wf = _weights(p), _weights(c), _weights(fresh)
    kernels = [i for i, w in enumerate(wp) if np.std(w) > 0 and np.std(wf[i]) > 0]  # initialised at random
    return {"min_correlation": min(_corr(a, b) for a, b in zip(wp, wc)),
            "fresh_max_correlation": max(abs(_corr(wp[i], wf[i])) for i in kernels), "tensors": len(wp)}


if __name__ == "__main__":
    job, *args = sys.argv[1:]
    if job != "compare":
        raise SystemExit(f"unknown job {job!r}")
    print(json.dumps(compare(*args)))
