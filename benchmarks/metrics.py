"""Benchmark: medseg's surface metrics against surface-distance and MedPy, same masks, same run.

Run ``python benchmarks/metrics.py`` (needs ``pip install -e .[bench]``). Two cases:

(a) CT-sized 512x512x128 at (0.7, 0.7, 2.5) mm: an organ-sized ellipsoid (~5 % of the voxels)
    and a prediction that is shifted, has a wavy (noisy) boundary and a far-away false-positive
    island, which blows up the joint bounding box that distance-transform methods work in;
(b) 256x256x64 at (1, 1, 3) mm: three small lesions, the prediction misses one and adds one.

Timed per case: medseg ``compute_metrics`` (DSC, Jaccard, HD, HD95, ASSD, MASD, NSD, volumes;
best of several runs, all cores for the KD-tree queries and also single-threaded),
surface-distance (``compute_surface_distances`` + Dice, robust HD at 100 and 95, average
distances, surface Dice) and MedPy (``dc``, ``hd``, ``hd95``, ``assd``). Peak memory of medseg
on the large case beyond its inputs is measured in a fresh subprocess: the growth of the
resident set size (sampled every 2 ms by psutil) above its value once the inputs are loaded, and
tracemalloc's peak of the numpy allocations; ``peak_mb_large_case`` is the larger of the two.
Times are the best of several runs for every library. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage

from _needs import require  # benchmarks/ is on sys.path when run as a script

LARGE_SHAPE, LARGE_SPACING = (512, 512, 128), (0.7, 0.7, 2.5)
SMALL_SHAPE, SMALL_SPACING = (256, 256, 64), (1.0, 1.0, 3.0)


def _ellipsoid(shape, center, radii, *, wobble=None) -> np.ndarray:
    """Bool ellipsoid built slice by slice (no full-size float temporaries)."""
    mask = np.zeros(shape, dtype=bool)
    ii = ((np.arange(shape[0]) - center[0]) / radii[0]) ** 2
    jj = ((np.arange(shape[1]) - center[1]) / radii[1]) ** 2
    plane = (ii[:, None] + jj[None, :]).astype(np.float32)
    for k in range(shape[2]):
        level = plane + np.float32(((k - center[2]) / radii[2]) ** 2)
        mask[:, :, k] = level <= (1.0 if wobble is None else 1.0 + wobble[:, :, k])
    return mask


def large_case(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(pred, ref) of case (a)."""
    rng = np.random.default_rng(seed)
    ref = _ellipsoid(LARGE_SHAPE, (256, 256, 64), (100, 100, 40))  # ~1.68 M voxels = 5 %
    wobble = ndimage.zoom(rng.normal(0.0, 0.08, (64, 64, 16)).astype(np.float32), 8, order=1)
    pred = _ellipsoid(LARGE_SHAPE, (259, 254, 65), (100, 100, 40), wobble=wobble)
    # Far-away false-positive island (about 1.5 cm across) near a corner of the volume.
    pred |= _ellipsoid(LARGE_SHAPE, (470, 40, 12), (11, 11, 3))
    return pred, ref


def small_case(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(pred, ref) of case (b): lesions A and B found (imperfectly), C missed, D added."""
    rng = np.random.default_rng(seed)
    ref = np.zeros(SMALL_SHAPE, dtype=bool)
    pred = np.zeros(SMALL_SHAPE, dtype=bool)
    lesions = [((80, 90, 20), (8, 8, 3)), ((170, 120, 35), (5, 6, 2)), ((120, 200, 50), (4, 4, 2))]
    for center, radii in lesions:
        ref |= _ellipsoid(SMALL_SHAPE, center, radii)
    wobble = ndimage.zoom(rng.normal(0.0, 0.15, (32, 32, 8)).astype(np.float32), 8, order=1)
    pred |= _ellipsoid(SMALL_SHAPE, (81, 89, 20), (8.5, 7.5, 3), wobble=wobble)
    pred |= _ellipsoid(SMALL_SHAPE, (171, 121, 35), (5, 6, 2))
    pred |= _ellipsoid(SMALL_SHAPE, (40, 200, 10), (5, 5, 2))  # added lesion
    return pred, ref


def _best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def run_medseg(pred, ref, spacing, workers=-1):
    from medseg.eval import compute_metrics

    return compute_metrics(pred, ref, spacing, workers=workers)


def run_surface_distance(pred, ref, spacing):
    import surface_distance as sd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        dist = sd.compute_surface_distances(ref, pred, spacing)
    gt_to_pred, pred_to_gt = sd.compute_average_surface_distance(dist)
    a_gt, a_pred = dist["surfel_areas_gt"], dist["surfel_areas_pred"]
    return {
        "dsc": float(sd.compute_dice_coefficient(ref, pred)),
        "hd_mm": float(sd.compute_robust_hausdorff(dist, 100)),
        "hd95_mm": float(sd.compute_robust_hausdorff(dist, 95)),
        "assd_mm": float(
            (np.sum(dist["distances_gt_to_pred"] * a_gt) + np.sum(dist["distances_pred_to_gt"] * a_pred))
            / (a_gt.sum() + a_pred.sum())
        ),
        "masd_mm": float(0.5 * (gt_to_pred + pred_to_gt)),
        "nsd": float(sd.compute_surface_dice_at_tolerance(dist, 1.0)),
    }


def run_medpy(pred, ref, spacing):
    from medpy.metric import binary

    return {
        "dsc": float(binary.dc(pred, ref)),
        "hd_mm": float(binary.hd(pred, ref, voxelspacing=spacing)),
        "hd95_mm": float(binary.hd95(pred, ref, voxelspacing=spacing)),
        "assd_mm": float(binary.assd(pred, ref, voxelspacing=spacing)),
    }


def _peak_child(pred_path: str, ref_path: str) -> None:
    """Subprocess body: load the inputs, then measure what compute_metrics adds on top of them."""
    import threading
    import tracemalloc

    import psutil

    pred, ref = np.load(pred_path), np.load(ref_path)  # .npy: read straight into the arrays
    from medseg.eval import compute_metrics

    compute_metrics(pred[:40, :40, :40], ref[:40, :40, :40], LARGE_SPACING)  # imports, caches
    proc = psutil.Process()
    baseline = proc.memory_info().rss
    peak = [baseline]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    tracemalloc.start()
    compute_metrics(pred, ref, LARGE_SPACING)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    done.set()
    sampler.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    print(json.dumps({"rss_peak_delta_mb": (peak[0] - baseline) / 2**20, "tracemalloc_peak_mb": traced_peak / 2**20}))


def measure_peak_mb(pred, ref) -> dict:
    """Peak memory of compute_metrics beyond its inputs on (pred, ref), in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, "pred.npy"), os.path.join(tmp, "ref.npy")]
        np.save(paths[0], pred)
        np.save(paths[1], ref)
        out = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--peak-child", *paths],
            capture_output=True, text=True, check=True,
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_case(name, pred, ref, spacing, *, repeats_medseg, repeats_peer, log) -> dict:
    run_medseg(pred, ref, spacing)  # warm-up: imports and the area-table cache
    t_ms, m = _best_time(lambda: run_medseg(pred, ref, spacing), repeats_medseg)
    t_ms1, m1 = _best_time(lambda: run_medseg(pred, ref, spacing, workers=1), repeats_medseg)
    assert m1 == m, "single- and multi-threaded results differ"
    t_sd, sdv = _best_time(lambda: run_surface_distance(pred, ref, spacing), repeats_peer)
    log(f"[{name}] medseg {t_ms:.3f} s (1 thread {t_ms1:.3f} s), surface-distance {t_sd:.3f} s; running MedPy ...")
    t_mp, mpv = _best_time(lambda: run_medpy(pred, ref, spacing), 1)
    max_diff = max(abs(m[k] - sdv[k]) for k in sdv)
    log(f"[{name}] MedPy {t_mp:.3f} s")
    shown = ("dsc", "hd_mm", "hd95_mm", "assd_mm", "masd_mm", "nsd")
    log(f"[{name}] medseg:           " + ", ".join(f"{k} {m[k]:.4f}" for k in shown))
    log(f"[{name}] surface-distance: " + ", ".join(f"{k} {v:.4f}" for k, v in sdv.items())
        + f"  (max |diff| {max_diff:.2e})")
    log(f"[{name}] MedPy (voxel centres, unweighted): " + ", ".join(f"{k} {v:.4f}" for k, v in mpv.items()))
    return {
        "medseg_s": t_ms,
        "medseg_single_thread_s": t_ms1,
        "surface_distance_s": t_sd,
        "medpy_s": t_mp,
        "speedup_vs_surface_distance": t_sd / t_ms,
        "speedup_vs_surface_distance_single_thread": t_sd / t_ms1,
        "speedup_vs_medpy": t_mp / t_ms,
        "max_abs_diff_vs_surface_distance": max_diff,
        "medseg": m,
        "surface_distance": sdv,
        "medpy": mpv,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    require("medseg", "surface_distance", "medpy", "psutil")  # the peers and the memory sampler
    if args.peak_child:
        _peak_child(*args.peak_child)
        return

    def log(msg):
        print(msg, flush=True)

    log(f"cpu cores: {os.cpu_count()}, numpy {np.__version__}")
    pred_b, ref_b = small_case()
    log(f"[small] {SMALL_SHAPE} at {SMALL_SPACING} mm, ref {int(ref_b.sum())} voxels, pred {int(pred_b.sum())}")
    small = bench_case("small", pred_b, ref_b, SMALL_SPACING, repeats_medseg=10, repeats_peer=5, log=log)
    pred_a, ref_a = large_case()
    log(f"[large] {LARGE_SHAPE} at {LARGE_SPACING} mm, ref {ref_a.mean() * 100:.2f} % of voxels, "
        f"pred {int(pred_a.sum())} voxels")
    large = bench_case("large", pred_a, ref_a, LARGE_SPACING, repeats_medseg=3, repeats_peer=2, log=log)
    peak = measure_peak_mb(pred_a, ref_a)
    log(f"[large] medseg peak memory beyond inputs: {peak['rss_peak_delta_mb']:.1f} MB RSS, "
        f"{peak['tracemalloc_peak_mb']:.1f} MB numpy (tracemalloc)")
    result = {
        "speedup_vs_surface_distance": min(small["speedup_vs_surface_distance"], large["speedup_vs_surface_distance"]),
        "speedup_vs_surface_distance_single_thread": min(
            small["speedup_vs_surface_distance_single_thread"], large["speedup_vs_surface_distance_single_thread"]
        ),
        "speedup_vs_medpy": min(small["speedup_vs_medpy"], large["speedup_vs_medpy"]),
        "peak_mb_large_case": max(peak["rss_peak_delta_mb"], peak["tracemalloc_peak_mb"]),
        "peak_rss_delta_mb_large_case": peak["rss_peak_delta_mb"],
        "peak_tracemalloc_mb_large_case": peak["tracemalloc_peak_mb"],
        "max_abs_diff_vs_surface_distance_mm": max(
            small["max_abs_diff_vs_surface_distance"], large["max_abs_diff_vs_surface_distance"]
        ),
        "large": {k: v for k, v in large.items() if k.endswith("_s")},
        "small": {k: v for k, v in small.items() if k.endswith("_s")},
        "cpu_cores": os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
