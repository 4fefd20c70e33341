"""The user's original recipe vs medseg's defaults, same real lesion cases, same wall-clock budget.

The seed recipe is ported from the user's code (docs: /work/shared/USER_STORY.md, "README: the
story"): Nest_UNet with Dropout(0.5) after every convolution, L2 1e-4 on every kernel,
Conv2DTranspose up-sampling with ReLU, softmax output ``output_4``; loss
``1 - (0.3 * Dice_background + 0.7 * Dice_lesion)`` over the flattened batch with smooth = 1;
metric ``dsc`` (lesion Dice over the flattened batch, smooth = 1); Adam with per-epoch poly decay;
every slice of the training volumes fed whole ("blind" slice sampling, most slices have no
lesion), intensities divided by the volume maximum (the user's /255 on 0..255 data); augmentation
by rotation 10 degrees, shifts 0.1 and horizontal flips applied to the images only, as
``ImageDataGenerator.flow(x, y)`` does (the masks stay where they were).

medseg runs :func:`medseg.train.loop.train` with its defaults (plan, lesion-aware patches, joint
augmentation, Dice + CE with deep supervision, whole-volume validation) and only the network
width, batch size, epoch length, time budget and in-plane spacing set for a CPU. Both models
have the same filters and see the same pixels: slices at ``--spacing-mm`` (1.5 mm, about half the
native resolution, so a CPU gets enough steps into the budget), the recipe's whole slices padded
to ``--size``.

Cases: the real MR lesion cases of tests/data/nrrd (brain1, brain2, breast1), leave-one-out:
each case is held out once and both sides train on the other two (medseg through its own
``--folds 3 --fold k``; its per-epoch whole-volume validation of the held-out patient is only
recorded as a curve, and the score uses the final weights, so no model selection sees the
held-out patient). Held-out cases are segmented whole and scored per patient in 3D
(:func:`medseg.eval.compute_metrics`, DSC on the original grid).

Output: detail lines, the curves of both (loss falls; does the metric move?) as PNG files in
``--out``, and last one JSON line with ``dsc_medseg`` and ``dsc_seed_recipe`` (mean per-patient
held-out 3D DSC) and the per-patient values.

    python benchmarks/seed_recipe.py [--budget-s 150] [--filters 16 32 64 128 256] [--batch 8]
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

from user_recipe import dice_loss, dsc, nest_unet  # benchmarks/ is on sys.path when run as a script

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
NRRD = REPO / "tests" / "data" / "nrrd"
CASES = ("brain1", "brain2", "breast1")


# === the user's recipe, ported to Keras 3 =========================================================
def _resize_slices(stack, shape, order):
    """(n, H, W) -> (n, *shape) by interpolation of the given order (0: nearest, for masks)."""
    import numpy as np
    from skimage.transform import resize

    if stack.shape[1:] == tuple(shape):
        return stack
    return np.stack([resize(s, shape, order=order, preserve_range=True, anti_aliasing=False) for s in stack]
                    ).astype(stack.dtype)


def _grid(volume, spacing_mm):
    """In-plane shape of ``volume`` resampled to ``spacing_mm`` (the same grid medseg's plan uses)."""
    sp = volume.spacing_mm
    return (max(1, round(volume.shape[0] * sp[0] / spacing_mm)), max(1, round(volume.shape[1] * sp[1] / spacing_mm)))


def _recipe_slices(volume, size, spacing_mm):
    """Axial slices (k, size, size, 1) as the user fed them, /max scaling (their /255 on 0..255
    data); resampled to the benchmark's in-plane spacing so both sides see the same pixels."""
    import numpy as np

    arr = np.asarray(volume.array, dtype=np.float32)
    arr = arr / max(float(arr.max()), 1e-6)
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


def run_recipe(train_cases, test_case, args, out_dir):
    """Train the user's recipe for ``budget_s`` seconds; return (held-out row, curves)."""
    import keras
    import numpy as np

    from medseg.eval import compute_metrics
    from medseg.io import read_volume

    keras.utils.set_random_seed(args.seed)
    xs, ys = [], []
    for case in train_cases:
        image = read_volume(NRRD / f"{case}_image.nrrd")
        label = read_volume(NRRD / f"{case}_label.nrrd")
        xs.append(_recipe_slices(image, args.size, args.spacing_mm))
        ys.append(_recipe_mask(label, args.size, args.spacing_mm))
    x = np.concatenate(xs)
    y = np.concatenate(ys)
    y_onehot = np.stack([1 - y, y], axis=-1).astype(np.float32)
    model = nest_unet(args.filters)
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

    image = read_volume(NRRD / f"{test_case}_image.nrrd")
    label = read_volume(NRRD / f"{test_case}_label.nrrd")
    gh, gw = _grid(image, args.spacing_mm)
    slices = _recipe_slices(image, args.size, args.spacing_mm)
    probs = model.predict(slices, batch_size=args.batch, verbose=0)
    pred = _unpad(np.argmax(probs, axis=-1).astype(np.uint8), gh, gw)
    pred = np.moveaxis(_resize_slices(pred, image.shape[:2], order=0), 0, 2)  # back to the native grid
    metrics = compute_metrics(pred > 0, label.array > 0, image.spacing_mm)
    _plot(curves, {"loss": "loss (1 - weighted Dice + L2)", "dsc": "metric dsc (flattened batch)"},
          out_dir / f"recipe_{test_case}.png", f"seed recipe, held out {test_case}")
    return {"case": test_case, "dsc": metrics["dsc"], "hd95_mm": metrics["hd95_mm"], "epochs": epoch,
            "train_s": round(train_s, 1), "steps": epoch * steps}, curves


def run_medseg(test_case, args, out_dir, work):
    """medseg defaults for ``budget_s`` seconds; return (held-out row, curves).

    All cases go to :func:`medseg.train.loop.train` with ``folds = len(cases)`` and the fold that
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
    from medseg.io import read_volume
    from medseg.train.loop import train

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
    image = read_volume(NRRD / f"{test_case}_image.nrrd")
    label = read_volume(NRRD / f"{test_case}_label.nrrd")
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=200.0, help="training wall-clock budget per side and fold")
    parser.add_argument("--filters", type=int, nargs=5, default=[8, 16, 32, 64, 128], help="filters, both models")
    parser.add_argument("--batch", type=int, default=8, help="batch size, both")
    parser.add_argument("--lr", type=float, default=1e-3, help="initial learning rate, both")
    parser.add_argument("--spacing-mm", type=float, default=1.5,
                        help="in-plane spacing both sides train at (medseg: plan override; recipe: slices resized)")
    parser.add_argument("--size", type=int, default=128, help="recipe: resized slices padded/cropped to this square")
    parser.add_argument("--recipe-epochs", type=int, default=100, help="recipe: epochs of its poly decay")
    parser.add_argument("--medseg-steps", type=int, default=10, help="medseg: steps per epoch")
    parser.add_argument("--val-every", type=int, default=2, help="medseg: whole-volume validation every N epochs")
    parser.add_argument("--cases", nargs="+", default=list(CASES), help="held out one at a time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for curves (default: a temporary folder)")
    args = parser.parse_args(argv)

    out_dir = Path(args.out or tempfile.mkdtemp(prefix="medseg-seed-recipe-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="medseg-seed-work-"))
    rows_m, rows_r, curves_m, curves_r = [], [], {}, {}
    for test_case in args.cases:
        train_cases = [c for c in args.cases if c != test_case]
        row, curve = run_recipe(train_cases, test_case, args, out_dir)
        rows_r.append(row)
        curves_r[test_case] = curve
        print(f"seed recipe, held out {test_case}: 3D DSC {row['dsc']:.4f} ({row['epochs']} epochs, "
              f"{row['steps']} steps, {row['train_s']} s); loss {curve['loss'][0]:.3f} -> {curve['loss'][-1]:.3f}, "
              f"metric dsc {curve['dsc'][0]:.3f} -> {curve['dsc'][-1]:.3f}", flush=True)
        row, curve = run_medseg(test_case, args, out_dir, work)
        rows_m.append(row)
        curves_m[test_case] = curve
        (l0, l1), (d0, d1), (v0, v1) = (_trend(curve["loss"]), _trend(curve["train_dice"]),
                                        _trend(curve["heldout_dsc_3d"]))
        print(f"medseg, held out {test_case}: 3D DSC {row['dsc']:.4f} ({row['epochs']} epochs, {row['steps']} steps, "
              f"{row['train_s']} s incl. validation); loss {l0:.3f} -> {l1:.3f}, train Dice {d0:.3f} -> {d1:.3f}, "
              f"held-out 3D DSC {v0:.3f} -> {v1:.3f}", flush=True)
    shutil.rmtree(work, ignore_errors=True)

    def mean(rows):
        vals = [r["dsc"] for r in rows if math.isfinite(r["dsc"])]
        return round(sum(vals) / len(vals), 4) if vals else None

    result = {
        "dsc_medseg": mean(rows_m),
        "dsc_seed_recipe": mean(rows_r),
        "per_patient_medseg": {r["case"]: round(r["dsc"], 4) for r in rows_m},
        "per_patient_seed_recipe": {r["case"]: round(r["dsc"], 4) for r in rows_r},
        "budget_s": args.budget_s,
        "filters": args.filters,
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


if __name__ == "__main__":
    sys.exit(main())
