"""Inference benchmark: Predictor throughput vs a bare ``model.predict``, and peak memory vs volume length.

Run: ``python benchmarks/infer.py`` (about 4-6 minutes on 2 CPU cores). Last line: one JSON object.

1. Throughput. One UNet++ (the default widths of its first levels, ``filters=(32, 64, 128)``,
   depth 2, unless ``--filters``/``--depth`` say otherwise) and a 256 x 256 x 16 CT volume on the
   Plan's grid. ``Predictor.predict_proba(volume)`` (preprocessing, batches, padding check,
   restore: everything) is timed against ``model.predict`` over the same preprocessed slices
   (``Prepared.slices``, batch size 8). Both are warmed up first; the runs alternate, and the
   ratio of the median times is reported: ``throughput_ratio_vs_predict`` =
   t(model.predict) / t(Predictor) (1.0 = as fast, the issue asks >= 0.95).
2. Peak memory. A fresh subprocess per volume length (512 x 512 x 100 and x 400 int16 CT), a
   one-convolution model (what the network holds per batch does not depend on the volume's
   length; a real UNet++ would only make the run slower): ``Predictor.segment(volume)``; peak RSS is the
   RSS high-water mark, reset after start-up and warm-up (``/proc/self/clear_refs``; read as
   ``VmHWM``, which is what ``resource.getrusage`` reports minus the marks of exited threads), so
   it covers creating the input volume and segmenting it; the lowest peak of 2 runs per CT size.
   ``peak_mb_growth_400_vs_100`` is compared with the size
   of the 300 extra slices of the input (int16) and the output (uint8) arrays. The same is measured
   for an MR plan (per-volume z-score), which must preprocess the whole volume at once, and again
   with its body percentiles taken by ``np.percentile`` on a float32 copy of the body voxels
   instead of medseg's streamed selection (``_mr_zscore_np_percentile``): the figure that decides
   whether that hand-written selection is still needed.

   Allocator: the children run with ``CHILD_MALLOC_ENV`` (glibc reads these variables at start-up;
   medseg itself sets nothing), so that peak RSS counts live arrays rather than freed chunk
   temporaries that glibc's default, dynamic thresholds keep on the heap. ``--default-allocator``
   measures what a user gets without them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from _needs import require  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

#: glibc settings of the memory children: every array of 1 MiB or more is its own memory map,
#: returned to the OS when freed, and free memory above 128 KiB at the heap's top is trimmed. By
#: default glibc raises its mmap threshold after each large free (up to 32 MB), so chunk
#: temporaries land on the heap and stay resident after they are freed.
CHILD_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_TRIM_THRESHOLD_": str(128 << 10)}


def _ct_volume(n_slices: int, size: int, seed: int = 0):
    """An int16 CT-like volume (RAS, 0.8 x 0.8 x 2.5 mm): air, a body, brighter blobs."""
    from medseg.io.volume import Volume

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (0.4 * size) ** 2
    array = np.full((size, size, n_slices), -1000, dtype=np.int16)
    array[body] = 40
    array += rng.integers(-20, 20, size=(size, size, 1), dtype=np.int16)  # cheap texture, no big temporaries
    blob = ((yy - size / 3) ** 2 + (xx - size / 2) ** 2) < (0.08 * size) ** 2
    array[blob, n_slices // 4 : max(n_slices // 4 + 1, n_slices // 2)] = 120
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    return Volume(array, affine, f"ct{n_slices}", {"modality": "CT"})


def _plan(modality: str, divisor: int):
    from medseg.data.plan import Plan

    norm = (
        {"kind": "ct_window", "low_hu": -1000.0, "high_hu": 400.0}
        if modality == "CT"
        else {"kind": "zscore"}  # per-volume mean/std over the body: needs the whole volume
    )
    return Plan(modality=modality, context_slices=3, divisor=divisor, patch_size=(divisor * 4,) * 2, normalization=norm)


def _bundle(filters, depth, modality, folder):
    """A saved and reloaded bundle; ``filters=None``: a one-convolution model (memory runs)."""
    import keras

    from medseg.infer.bundle import load_bundle, save_bundle
    from medseg.nets.unetpp import build_unetpp

    keras.utils.set_random_seed(0)
    if filters is None:
        inputs = keras.Input((None, None, 3))
        logits = keras.layers.Conv2D(2, 3, padding="same")(inputs)
        model = keras.Model(inputs, keras.layers.Activation("softmax")(logits))
    else:
        model = build_unetpp(input_channels=3, filters=filters, depth=depth, deep_supervision=False)
    save_bundle(folder, model, _plan(modality, 2**depth))
    return load_bundle(folder)


# --- 1. throughput ---------------------------------------------------------------------------------
def throughput(filters, depth, n_slices, size, repeats, batch_size=8) -> dict:
    from medseg.infer.predictor import Predictor
    from medseg.transforms.preprocess import preprocess_image

    with tempfile.TemporaryDirectory() as folder:
        bundle = _bundle(filters, depth, "CT", folder)
    predictor = Predictor(bundle, batch_size=batch_size)
    model = predictor.model  # the very model the Predictor runs
    volume = _ct_volume(n_slices, size)
    x = preprocess_image(volume, bundle.plan).slices(0, n_slices)  # the same preprocessed slices

    def run_predictor():
        return predictor.predict_proba(volume)

    def run_predict():
        return model.predict(x, batch_size=batch_size, verbose=0)

    prob = run_predictor()  # warm-up: graph tracing on both sides
    bare = run_predict()
    np.testing.assert_allclose(prob.array.transpose(2, 0, 1), bare[..., 1], atol=1e-4)  # same computation
    times = {"predictor": [], "predict": []}
    for _ in range(repeats):  # alternate, so load changes on the machine hit both alike
        for name, fn in (("predict", run_predict), ("predictor", run_predictor)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    t_pred, t_bare = statistics.median(times["predictor"]), statistics.median(times["predict"])
    return {
        "model_params": int(model.count_params()),
        "volume": f"{size}x{size}x{n_slices}",
        "predictor_s": [round(t, 3) for t in times["predictor"]],
        "predict_s": [round(t, 3) for t in times["predict"]],
        "predictor_slices_per_s": round(n_slices / t_pred, 3),
        "predict_slices_per_s": round(n_slices / t_bare, 3),
        "throughput_ratio_vs_predict": round(t_bare / t_pred, 4),
        "throughput_ratio_best_of": round(min(times["predict"]) / min(times["predictor"]), 4),
    }


# --- 2. peak memory (child process) ----------------------------------------------------------------
def _status_mb(key: str) -> float:
    """A memory line of /proc/self/status (``VmRSS``, ``VmHWM``) in MB; NaN where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _reset_peak() -> bool:
    """Reset the RSS high-water mark that getrusage reports (Linux >= 4.0: /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _use_numpy_percentile() -> None:
    """Take normalization percentiles with ``np.percentile`` on a float32 copy of the region's
    values (what plain numpy needs) instead of medseg's streamed selection, in this process."""
    import medseg.transforms.intensity as intensity

    def numpy_percentiles(make_chunks, n, pcts):
        values = np.empty(n, np.float32)
        filled = 0
        for chunk in make_chunks():
            values[filled : filled + chunk.size] = chunk
            filled += chunk.size
        low, high = np.percentile(values, list(pcts), overwrite_input=True)  # partitions the copy in place
        return float(low), float(high)

    intensity._percentiles_chunks = numpy_percentiles


def memory_child(n_slices: int, modality: str, numpy_percentile: bool = False) -> dict:
    from medseg.infer.predictor import Predictor

    if numpy_percentile:
        _use_numpy_percentile()

    with tempfile.TemporaryDirectory() as folder:
        bundle = _bundle(None, 2, modality, folder)
    predictor = Predictor(bundle, batch_size=8)
    predictor.segment(_ct_volume(8, 512, seed=1))  # warm-up (tracing) on a short volume
    # Start the high-water mark here: TensorFlow's start-up and the bundle's save/load peak
    # higher than a short volume needs and would hide the growth being measured.
    peak_reset = _reset_peak()
    rss_before = _rss_mb()
    volume = _ct_volume(n_slices, 512)
    if modality == "MR":
        volume = volume.with_array(volume.array, modality="MR")
    start = time.perf_counter()
    labels = predictor.segment(volume)
    seconds = time.perf_counter() - start
    # getrusage's ru_maxrss also keeps the high-water marks recorded when threads exit (TensorFlow
    # start-up), which clear_refs does not reset; VmHWM is the same mark, reset: use it when it is.
    rusage_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    hwm_mb = _status_mb("VmHWM")
    peak_mb = hwm_mb if peak_reset and hwm_mb == hwm_mb else rusage_mb
    return {
        "slices": n_slices, "modality": modality, "peak_mb": round(peak_mb, 1), "peak_reset": peak_reset,
        "ru_maxrss_mb": round(rusage_mb, 1),
        "rss_before_mb": round(rss_before, 1),
        "input_mb": round(volume.array.nbytes / 2**20, 1), "output_mb": round(labels.array.nbytes / 2**20, 1),
        "seconds": round(seconds, 2),
    }


def memory(sizes, modality, repeats: int = 1, default_allocator: bool = False,
           numpy_percentile: bool = False) -> list[dict]:
    """One row per size: the child run with the lowest peak of ``repeats`` runs.

    TensorFlow's thread pools make the resident size vary by a few tens of MB from one process to
    the next; the lowest of several runs is the least disturbed measurement of the same work.
    """
    rows = []
    for n in sizes:
        runs = []
        for _ in range(repeats):
            out = subprocess.run(
                [sys.executable, __file__, "--memory-child", str(n), "--modality", modality]
                + (["--np-percentile"] if numpy_percentile else []),
                capture_output=True, text=True, check=False,
                env=os.environ if default_allocator else {**os.environ, **CHILD_MALLOC_ENV},
            )
            if out.returncode != 0:
                raise RuntimeError(f"memory child ({n} slices, {modality}) failed:\n{out.stderr[-3000:]}")
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        best = min(runs, key=lambda r: r["peak_mb"])
        best["peaks_mb_all_runs"] = [r["peak_mb"] for r in runs]
        rows.append(best)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filters", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-sizes", type=int, nargs=2, default=[100, 400])
    parser.add_argument("--memory-repeats", type=int, default=2, help="child runs per CT size (lowest peak kept)")
    parser.add_argument("--skip-throughput", action="store_true", help="only the memory runs")
    parser.add_argument("--skip-mr", action="store_true", help="skip the MR (whole-volume preprocessing) memory runs")
    parser.add_argument("--default-allocator", action="store_true",
                        help="memory children without CHILD_MALLOC_ENV (glibc's defaults: what a user gets)")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--modality", default="CT", help=argparse.SUPPRESS)
    parser.add_argument("--np-percentile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    require("medseg", "keras", "tensorflow")
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.modality, args.np_percentile)))
        return 0

    import tensorflow as tf

    started = time.perf_counter()
    result: dict = {"cpu_threads": os.cpu_count(), "tensorflow": tf.__version__}
    tp = {} if args.skip_throughput else throughput(tuple(args.filters), args.depth, args.slices, args.size, args.repeats)
    if tp:
        print(f"throughput: Predictor {tp['predictor_slices_per_s']} slices/s, model.predict {tp['predict_slices_per_s']} "
              f"slices/s -> ratio {tp['throughput_ratio_vs_predict']} (median of {args.repeats}; best-of ratio "
              f"{tp['throughput_ratio_best_of']}); UNet++ {tp['model_params']} params on {tp['volume']}", flush=True)
    result.update(tp)

    small, large = args.memory_sizes
    extra = large - small
    allocator = "glibc defaults" if args.default_allocator else " ".join(f"{k}={v}" for k, v in CHILD_MALLOC_ENV.items())
    print(f"allocator of the memory children: {allocator} ("
          + ("--default-allocator: what a user gets)" if args.default_allocator else
             "set by this benchmark, not by medseg: freed arrays of 1 MiB or more go back to the OS, so peak RSS "
             "counts live arrays, not heap fragments; --default-allocator measures glibc's defaults)")
          + f"; load average {os.getloadavg()[0]:.2f}", flush=True)
    result["child_allocator"] = allocator
    runs = [("CT", False, "", "CT")]
    if not args.skip_mr:
        runs += [("MR", False, "_mr_zscore", "MR"),
                 ("MR", True, "_mr_zscore_np_percentile", "MR with np.percentile on a body copy")]
    for modality, numpy_percentile, key, label in runs:
        rows = memory([small, large], modality, repeats=args.memory_repeats if modality == "CT" else 1,
                      default_allocator=args.default_allocator, numpy_percentile=numpy_percentile)
        growth = rows[1]["peak_mb"] - rows[0]["peak_mb"]
        # The same, net of each child's resident size before the volume (start-up noise removed).
        growth_net = (rows[1]["peak_mb"] - rows[1]["rss_before_mb"]) - (rows[0]["peak_mb"] - rows[0]["rss_before_mb"])
        extra_io = (rows[1]["input_mb"] + rows[1]["output_mb"]) - (rows[0]["input_mb"] + rows[0]["output_mb"])
        for row in rows:
            print(f"memory {label} 512x512x{row['slices']}: peak {row['peak_mb']} MB (before the volume "
                  f"{row['rss_before_mb']} MB; input {row['input_mb']} MB, output {row['output_mb']} MB, "
                  f"{row['seconds']} s)", flush=True)
        print(f"memory {label}: peak growth {growth:.1f} MB for {extra} more slices; extra input+output arrays "
              f"{extra_io:.1f} MB -> ratio {growth / extra_io:.2f} (net of the start RSS: {growth_net:.1f} MB, "
              f"ratio {growth_net / extra_io:.2f})", flush=True)
        result[f"peak_mb_growth_{large}_vs_{small}{key}"] = round(growth, 1)
        result[f"extra_input_output_mb{key}"] = round(extra_io, 1)
        result[f"growth_vs_extra_io{key}"] = round(growth / extra_io, 3)
        result[f"peak_above_start_mb_growth_{large}_vs_{small}{key}"] = round(growth_net, 1)
        result[f"memory_rows{key}"] = rows
    result["benchmark_seconds"] = round(time.perf_counter() - started, 1)
    result["load_average_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
