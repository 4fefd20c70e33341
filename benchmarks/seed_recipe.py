"""The user's original recipe vs medseg's defaults, same data, same wall-clock budget.

The seed recipe is ported from the user's code (docs/user_story.md): Nest_UNet with
Dropout(0.5) after every convolution, L2 1e-4 on every kernel, Conv2DTranspose up-sampling with
ReLU, softmax output ``output_4``; loss ``1 - (0.3 * Dice_background + 0.7 * Dice_foreground)``
over the flattened batch with smooth = 1; metric ``dsc`` (foreground Dice over the flattened
batch, smooth = 1); Adam with per-epoch poly decay; every slice of the training volumes fed
whole ("blind" slice sampling), intensities scaled to [0, 1] per volume (the user's /255 on
8-bit exports: min-max); augmentation by rotation 10 degrees, shifts 0.1 and horizontal flips
applied to the images only, as ``ImageDataGenerator.flow(x, y)`` does (the masks stay put).

``--task liver`` (default): the demo's task (:mod:`liver_task`): both train on patient A
(non-contrast CT), both are scored on patient B (contrast-enhanced CT DICOM series) in 3D on
B's own grid. medseg runs as a new user runs it (``medseg-train`` defaults: CPU sizing,
validation on the training case, budget schedule; the bundle segments B as ``medseg-infer``
does); the recipe gets the network width medseg chose and the same in-plane pixels (A's 3 mm).

``--task lesions``: the real MR lesion cases of tests/data/nrrd (brain1, brain2, breast1),
leave-one-out; medseg trains through ``--folds 3 --fold k`` and is scored with its final
weights (its per-epoch validation of the held-out case is only a curve).

Output: detail lines, each side's loss and metric curves per epoch in the JSON (the user's
symptom: the loss falls, does the metric move?) and as PNG files in ``--out``, and last one
JSON line with ``dsc_medseg`` and ``dsc_seed_recipe`` (goal: ``dsc_medseg >= dsc_seed_recipe +
0.10``).

    python benchmarks/seed_recipe.py [--task liver|lesions] [--budget-s 300] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from liver_task import lay_out, patient_b, require, score_patient_b, train_liver  # benchmarks/ is on sys.path
from user_recipe import dice_loss, dsc, nest_unet

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
NRRD = REPO / "tests" / "data" / "nrrd"
CASES = ("brain1", "brain2", "breast1")


# === the user's recipe, ported to Keras 3 =========================================================
def _resize_slices(stack, shape, order):
    """(n, H, W) -> (n, *shape) by interpolation of the given order (0: nearest, for masks);
    pixel areas aligned (scipy's ``grid_mode``, as skimage's ``resize``)."""
    import numpy as np
    from scipy import ndimage

    if stack.shape[1:] == tuple(shape):
        return stack
    zoom = (shape[0] / stack.shape[1], shape[1] / stack.shape[2])
    out = [ndimage.zoom(s, zoom, order=order, mode="grid-constant" if order == 0 else "nearest", grid_mode=True)
           for s in stack]
    return np.stack([o[: shape[0], : shape[1]] for o in out]).astype(stack.dtype)


def _grid(volume, spacing_mm):
    """In-plane shape of ``volume`` resampled to ``spacing_mm`` (the same grid medseg's plan uses)."""
    sp = volume.spacing_mm
    return (max(1, round(volume.shape[0] * sp[0] / spacing_mm)), max(1, round(volume.shape[1] * sp[1] / spacing_mm)))


def _recipe_slices(volume, size, spacing_mm):
    """Axial slices (k, size, size, 1) as the user fed them, scaled to [0, 1] per volume (their
    /255 of 8-bit exports: min-max); resampled to the benchmark's in-plane spacing so both sides
    see the same pixels."""
    import numpy as np

    arr = np.asarray(volume.array, dtype=np.float32)
    arr = (arr - float(arr.min())) / max(float(arr.max() - arr.min()), 1e-6)
    slices = _resize_slices(np.moveaxis(arr, 2, 0), _grid(volume, spacing_mm), order=1)
    return _pad_crop(slices, size)[..., None]


def _recipe_mask(volume, size, spacing_mm):
    import numpy as np

    slices = np.moveaxis((np.asarray(volume.array) > 0).astype(np.float32), 2, 0)
    return _pad_crop(_resize_slices(slices, _grid(volume, spacing_mm), order=0), size)


def _pad_crop(stack, size):
    """Centre pad (zeros) or crop (n, H, W) to (n, size, size)."""
    import numpy as np

    n, h, w = stack.shape
    out = np.zeros((n, size, size), dtype=stack.dtype)
    sh, sw = max(0, (h - size) // 2), max(0, (w - size) // 2)
    dh, dw = max(0, (size - h) // 2), max(0, (size - w) // 2)
    hh, ww = min(h, size), min(w, size)
    out[:, dh:dh + hh, dw:dw + ww] = stack[:, sh:sh + hh, sw:sw + ww]
    return out


def _unpad(stack, h, w):
    """Inverse of :func:`_pad_crop` for a prediction (n, size, size) -> (n, h, w)."""
    import numpy as np

    n, size, _ = stack.shape
    out = np.zeros((n, h, w), dtype=stack.dtype)
    sh, sw = max(0, (h - size) // 2), max(0, (w - size) // 2)
    dh, dw = max(0, (size - h) // 2), max(0, (size - w) // 2)
    hh, ww = min(h, size), min(w, size)
    out[:, sh:sh + hh, sw:sw + ww] = stack[:, dh:dh + hh, dw:dw + ww]
    return out


def _augment_images_only(x, rng):
    """ImageDataGenerator(rotation_range=10, width/height_shift_range=0.1, horizontal_flip=True,
    fill_mode="nearest").flow(x, y): every transform applies to x only; y is passed through."""
    import numpy as np
    from scipy import ndimage

    out = np.empty_like(x)
    for i in range(len(x)):
        img = x[i, ..., 0]
        img = ndimage.rotate(img, rng.uniform(-10, 10), reshape=False, order=1, mode="nearest")
        img = ndimage.shift(img, (rng.uniform(-0.1, 0.1) * img.shape[0], rng.uniform(-0.1, 0.1) * img.shape[1]),
                            order=1, mode="nearest")
        if rng.random() < 0.5:
            img = img[:, ::-1]
        out[i, ..., 0] = img
    return out


def _lesion_pair(case):
    from medseg.io import read_volume

    return read_volume(NRRD / f"{case}_image.nrrd"), read_volume(NRRD / f"{case}_label.nrrd")


def run_recipe(train_pairs, test_pair, test_case, args, out_dir, filters):
    """Train the user's recipe for ``budget_s`` seconds on ``(image, label)`` Volume pairs and
    score ``test_pair`` in 3D; return (held-out row, curves)."""
    import keras
    import numpy as np

    from medseg.eval import compute_metrics

    keras.utils.set_random_seed(args.seed)
    xs, ys = [], []
    for image, label in train_pairs:
        xs.append(_recipe_slices(image, args.size, args.spacing_mm))
        ys.append(_recipe_mask(label, args.size, args.spacing_mm))
    x = np.concatenate(xs)
    y = np.concatenate(ys)
    y_onehot = np.stack([1 - y, y], axis=-1).astype(np.float32)
    model = nest_unet(filters)
    n_epoch = args.recipe_epochs
    init_lr = args.lr

    def poly_decay(epoch):
        return init_lr * (1 - epoch / float(n_epoch)) ** 1.0

    model.compile(loss=dice_loss, optimizer=keras.optimizers.Adam(learning_rate=init_lr), metrics=[dsc])
    rng = np.random.default_rng(args.seed)
    steps = max(1, len(x) // args.batch)
    curves = {"loss": [], "dsc": []}

    def batches():
        while True:
            order = rng.permutation(len(x))  # shuffle=True: blind slice sampling
            for s in range(steps):
                idx = order[s * args.batch:(s + 1) * args.batch]
                yield _augment_images_only(x[idx], rng), y_onehot[idx]

    stream = batches()
    t0 = time.perf_counter()
    epoch = 0
    while time.perf_counter() - t0 < args.budget_s and epoch < n_epoch:
        model.optimizer.learning_rate.assign(poly_decay(epoch))  # LearningRateScheduler(poly_decay)
        losses, dscs = [], []
        for _ in range(steps):
            xb, yb = next(stream)
            logs = model.train_on_batch(xb, yb, return_dict=True)
            losses.append(logs["loss"])
            dscs.append(logs["dsc"])
        curves["loss"].append(float(np.mean(losses)))
        curves["dsc"].append(float(np.mean(dscs)))
        epoch += 1
    train_s = time.perf_counter() - t0

    image, label = test_pair
    gh, gw = _grid(image, args.spacing_mm)
    slices = _recipe_slices(image, args.size, args.spacing_mm)
    probs = model.predict(slices, batch_size=args.batch, verbose=0)
    pred = _unpad(np.argmax(probs, axis=-1).astype(np.uint8), gh, gw)
    pred = np.moveaxis(_resize_slices(pred, image.shape[:2], order=0), 0, 2)  # back to the native grid
    metrics = compute_metrics(pred > 0, np.asarray(label.array) > 0, image.spacing_mm)
    _plot(curves, {"loss": "loss (1 - weighted Dice + L2)", "dsc": "metric dsc (flattened batch)"},
          out_dir / f"recipe_{test_case}.png", f"seed recipe, held out {test_case}")
    return {"case": test_case, "dsc": metrics["dsc"], "hd95_mm": metrics["hd95_mm"], "epochs": epoch,
            "train_s": round(train_s, 1), "steps": epoch * steps}, curves


def run_medseg_liver(data, args, out_dir, work):
    """medseg as a new user runs it on patient A for ``budget_s``; scored on patient B."""
    run_dir = work / "run_liver"
    t0 = time.perf_counter()
    result = train_liver(data, run_dir, args.budget_s, seed=args.seed, batch_size=args.batch, lr=args.lr)
    train_s = time.perf_counter() - t0
    score = score_patient_b(data, run_dir)
    curves = {"loss": [r.get("loss") for r in result.history], "data_loss": [r.get("data_loss") for r in result.history],
              "train_dice": [r.get("dice") for r in result.history]}
    _plot(curves, {"loss": "loss (Dice + CE, deep supervision)", "train_dice": "train Dice (patches, hard)"},
          out_dir / "medseg_patientB.png", "medseg, trained on patient A")
    return {"case": "patientB", "dsc": score["dsc"], "hd95_mm": score["hd95_mm"], "epochs": result.epochs_completed,
            "train_s": round(train_s, 1), "steps": result.steps, "filters": result.model_config["filters"],
            "largest_component": score["largest_component"]}, curves


def run_medseg(test_case, args, out_dir, work):
    """medseg defaults for ``budget_s`` seconds; return (held-out row, curves).

    All cases go to :func:`medseg.train.train` with ``folds = len(cases)`` and the fold that
    holds ``test_case`` out, so medseg trains on exactly the recipe's training patients. Its
    whole-volume validation then runs on the held-out patient: that is only a curve here (how
    the test DSC moves while the loss falls). The score uses the final weights, not the bundle's
    best epoch, so the held-out patient never influences the model.
    """
    from medseg.data.plan import Plan
    from medseg.data.split import kfold_split
    from medseg.eval import compute_metrics
    from medseg.infer.bundle import Bundle
    from medseg.infer.predictor import Predictor
    from medseg.train import train

    images, labels = work / "images", work / "labels"
    if not images.is_dir():
        images.mkdir(parents=True)
        labels.mkdir(parents=True)
        for case in args.cases:
            shutil.copy(NRRD / f"{case}_image.nrrd", images / f"{case}.nrrd")
            shutil.copy(NRRD / f"{case}_label.nrrd", labels / f"{case}.nrrd")
    k = len(args.cases)
    fold = next(f for f in range(k) if kfold_split(sorted(args.cases), k, f, seed=args.seed)[1] == [test_case])
    run_dir = work / f"run_{test_case}"
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    result = train(dict(images=str(images), labels=str(labels), run_dir=str(run_dir), filters=list(args.filters),
                        depth=len(args.filters) - 1, batch_size=args.batch, epochs=10_000,
                        steps_per_epoch=args.medseg_steps, val_every=args.val_every, max_time_s=args.budget_s,
                        seed=args.seed, verbose=0, lr=args.lr, folds=k, fold=fold,
                        plan={"target_spacing_mm": [args.spacing_mm, args.spacing_mm]}))
    train_s = time.perf_counter() - t0
    assert result.val_cases == [test_case], (result.val_cases, test_case)
    plan = Plan.load(run_dir / "plan.json")
    final = Bundle(run_dir=run_dir, model=result.model, plan=plan, divisor=int(plan.divisor),
                   input_channels=int(plan.context_slices))
    image, label = _lesion_pair(test_case)
    mask = Predictor(final, batch_size=8).segment(image)
    metrics = compute_metrics(mask.array > 0, label.array > 0, image.spacing_mm)
    curves = {
        "loss": [r.get("loss") for r in result.history],
        "data_loss": [r.get("data_loss") for r in result.history],
        "train_dice": [r.get("dice") for r in result.history],
        "heldout_dsc_3d": [r.get("val_dsc_3d") for r in result.history],
    }
    _plot(curves, {"loss": "loss (Dice + CE, 4 heads)", "train_dice": "train Dice (patches, hard)",
                   "heldout_dsc_3d": "held-out 3D DSC (whole volume)"},
          out_dir / f"medseg_{test_case}.png", f"medseg, held out {test_case}")
    shutil.copy(run_dir / "curves.png", out_dir / f"medseg_{test_case}_run_curves.png")
    return {"case": test_case, "dsc": metrics["dsc"], "hd95_mm": metrics["hd95_mm"],
            "epochs": result.epochs_completed, "train_s": round(train_s, 1),
            "steps": result.epochs_completed * args.medseg_steps, "train_cases": result.train_cases}, curves


def _plot(curves, labels, path, title):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for key, label in labels.items():
        ys = [v if v is not None else math.nan for v in curves.get(key, [])]
        ax.plot(range(1, len(ys) + 1), ys, marker=".", label=label)
    ax.set_xlabel("epoch")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _trend(values):
    """(first, last) finite values of a curve."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return (vals[0], vals[-1]) if vals else (math.nan, math.nan)


def _finite_or_null(value):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def _describe(name, row, curve, dice_key):
    (l0, l1), (d0, d1) = _trend(curve["loss"]), _trend(curve[dice_key])
    return (f"{name}, held out {row['case']}: 3D DSC {row['dsc']:.4f} ({row['epochs']} epochs, {row['steps']} steps, "
            f"{row['train_s']} s); loss {l0:.3f} -> {l1:.3f}, {dice_key} {d0:.3f} -> {d1:.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("liver", "lesions"), default="liver")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="training wall-clock budget per side (and fold); default 300 (liver), 200 (lesions)")
    parser.add_argument("--filters", type=int, nargs=5, default=[8, 16, 32, 64, 128],
                        help="lesions: filters of both models (liver: medseg sizes its network, the recipe copies it)")
    parser.add_argument("--batch", type=int, default=8, help="batch size, both")
    parser.add_argument("--lr", type=float, default=1e-3, help="initial learning rate, both")
    parser.add_argument("--spacing-mm", type=float, default=None,
                        help="in-plane spacing both sides train at; default 3 (liver: patient A's), 1.5 (lesions)")
    parser.add_argument("--size", type=int, default=None,
                        help="recipe: slices padded/cropped to this square; default 176 (liver), 128 (lesions)")
    parser.add_argument("--recipe-epochs", type=int, default=100, help="recipe: epochs of its poly decay")
    parser.add_argument("--medseg-steps", type=int, default=10, help="lesions: medseg steps per epoch")
    parser.add_argument("--val-every", type=int, default=2, help="lesions: medseg whole-volume validation every N")
    parser.add_argument("--cases", nargs="+", default=list(CASES), help="lesions: held out one at a time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for curves (default: a temporary folder)")
    args = parser.parse_args(argv)
    liver = args.task == "liver"
    args.budget_s = args.budget_s or (300.0 if liver else 200.0)
    args.spacing_mm = args.spacing_mm or (3.0 if liver else 1.5)
    args.size = args.size or (176 if liver else 128)
    require("tensorflow", "scipy", "matplotlib")

    out_dir = Path(args.out or tempfile.mkdtemp(prefix="medseg-seed-recipe-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="medseg-seed-work-"))
    rows_m, rows_r, curves_m, curves_r = [], [], {}, {}
    try:
        if liver:
            from medseg.data.plan import load_pair
            from medseg.io import Case
            from medseg.io.labels import parse_label_map

            data = lay_out(work)
            row, curve = run_medseg_liver(data, args, out_dir, work)
            rows_m.append(row)
            curves_m["patientB"] = curve
            print(_describe("medseg", row, curve, "train_dice"), flush=True)
            train_pair = load_pair(Case("patientA", data / "imagesTr" / "patientA.nii.gz",
                                        data / "labelsTr" / "patientA.nii.gz", label_map=parse_label_map("5:1,*:0")))
            row, curve = run_recipe([train_pair], patient_b_pair(data), "patientB", args, out_dir, row["filters"])
            rows_r.append(row)
            curves_r["patientB"] = curve
            print(_describe("seed recipe", row, curve, "dsc"), flush=True)
        else:
            for test_case in args.cases:
                train_pairs = [_lesion_pair(c) for c in args.cases if c != test_case]
                row, curve = run_recipe(train_pairs, _lesion_pair(test_case), test_case, args, out_dir, args.filters)
                rows_r.append(row)
                curves_r[test_case] = curve
                print(_describe("seed recipe", row, curve, "dsc"), flush=True)
                row, curve = run_medseg(test_case, args, out_dir, work)
                rows_m.append(row)
                curves_m[test_case] = curve
                print(_describe("medseg", row, curve, "train_dice"), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def mean(rows):
        vals = [r["dsc"] for r in rows if math.isfinite(r["dsc"])]
        return round(sum(vals) / len(vals), 4) if vals else None

    result = {
        "dsc_medseg": mean(rows_m),
        "dsc_seed_recipe": mean(rows_r),
        "task": args.task,
        "per_patient_medseg": {r["case"]: round(r["dsc"], 4) for r in rows_m},
        "per_patient_seed_recipe": {r["case"]: round(r["dsc"], 4) for r in rows_r},
        "budget_s": args.budget_s,
        "batch": args.batch,
        "spacing_mm": args.spacing_mm,
        "medseg_curves": curves_m,
        "seed_recipe_curves": curves_r,
        "medseg_runs": rows_m,
        "seed_recipe_runs": rows_r,
        "curves_dir": str(out_dir),
    }
    print(json.dumps(_finite_or_null(result)))
    return 0


def patient_b_pair(data):
    """Patient B as an (image, label) pair of Volumes on the DICOM grid (the recipe's test case)."""
    import numpy as np

    image, ref = patient_b(data)
    return image, image.with_array(ref.astype(np.uint8))


if __name__ == "__main__":
    sys.exit(main())
