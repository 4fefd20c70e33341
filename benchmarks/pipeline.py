"""Input-pipeline benchmark: lesion-aware 256x256 patches from 512x512x100 volumes.

    python benchmarks/pipeline.py [--quick]

Measures, on this machine and in one run:

Rates are the best of 3 runs (this machine is shared; the load average is printed).

1. patches/s of medseg's batch builder (numpy, one thread) and of the ``tf.data`` pipeline Keras
   consumes (parallel map + prefetch), with crops + flips/rot90 only and with the full default
   augmentation (flips, rot90, rotation/scaling, gamma, noise, brightness, contrast);
2. the peer, a MONAI-style per-sample pipeline (``RandCropByPosNegLabeld`` -> ``RandFlipd`` ->
   ``RandRotate90d`` -> ``RandAffined`` -> intensity, each sample on its own with
   ``scipy.ndimage.affine_transform``, order 1 for the image and 0 for the mask), same
   probabilities, same sampling ratio, foreground indices precomputed (as MONAI's
   ``FgBgToIndicesd`` caching does);
3. peak resident memory while training from the on-disk (``.npy`` memory-map) cache with 1x and
   4x the data, each in a fresh subprocess (peak = ``VmHWM`` after the cache is built, reset via
   ``/proc/self/clear_refs`` so only the sampling phase counts). The children run with
   ``CHILD_MALLOC_ENV`` (glibc reads these variables at start-up; medseg itself sets nothing), so
   that freed preprocessing temporaries do not stay on the heap as fragments that grow with the
   number of cases; ``--default-allocator`` measures what a user gets without them.

Each rate is also given per CPU second of the benchmark process (``*_per_cpu_s_*``): on a busy
machine this is what one free core would deliver.

The last line printed is one JSON object with ``patches_per_s_flips``, ``patches_per_s_full``
(both the ``tf.data`` figures Keras sees) and ``peak_mb_growth_4x`` among others.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from _needs import require  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

#: glibc settings of the memory children: a fixed mmap threshold of 16 MiB (trim threshold 32 MiB,
#: twice it, as glibc pairs them). By default glibc raises the threshold after each large free, up
#: to 32 MiB, so the 25 MB per-volume masks of cache building land on the heap and leave fragments
#: behind, more the more cases are cached (measured: +53 MB peak with 4x the cases). Fixed at
#: 16 MiB, per-volume arrays are their own maps, returned to the OS when freed, while the 8 MiB
#: batch buffers are still reused from the heap (a 1 MiB threshold maps each batch afresh: 2048
#: page faults, and the children sampled about 40 % slower).
CHILD_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(16 << 20), "MALLOC_TRIM_THRESHOLD_": str(32 << 20)}
PATCH = (256, 256)
SHAPE = (100, 512, 512)  # plan space: slices first
BATCH = 32


def synthetic_case(seed: int, shape=SHAPE):
    """A CT-like volume in plan space (window-normalized to [0, 1]) with 3-5 lesions of mixed size."""
    rng = np.random.default_rng(seed)
    n, h, w = shape
    yy, xx = np.ogrid[:h, :w]
    body = (((yy - h / 2) / (0.42 * h)) ** 2 + ((xx - w / 2) / (0.36 * w)) ** 2) <= 1
    image = np.empty(shape, np.float32)
    label = np.zeros(shape, np.uint8)
    for s in range(n):
        sl = rng.random((h, w), dtype=np.float32) * 0.05
        sl[body] += 0.55
        image[s] = sl
    zz, yy3, xx3 = np.ogrid[:n, :h, :w]
    for _ in range(int(rng.integers(3, 6))):
        r = float(rng.choice([2.0, 5.0, 15.0]))
        cz, cy, cx = rng.integers(10, n - 10), rng.integers(h // 3, 2 * h // 3), rng.integers(w // 3, 2 * w // 3)
        zr = max(1.0, r / 4)  # anisotropic: 5 mm slices, 0.8 mm pixels
        box = (slice(max(0, int(cz - zr - 1)), int(cz + zr + 2)), slice(int(cy - r - 1), int(cy + r + 2)),
               slice(int(cx - r - 1), int(cx + r + 2)))
        ball = (((zz[box[0]] - cz) / zr) ** 2 + ((yy3[:, box[1]] - cy) / r) ** 2 + ((xx3[:, :, box[2]] - cx) / r) ** 2) <= 1
        label[box] |= ball.astype(np.uint8)
        image[box][ball] += 0.25
    return f"case{seed:03d}", image, label


def _plan(context: int = 1):
    from medseg.data.plan import Plan

    return Plan(patch_size=PATCH, context_slices=context, lesion_fraction=0.5)


REPEATS = 3


# --- medseg ----------------------------------------------------------------------------------
def numpy_rate(maker, n_batches: int) -> tuple[float, float]:
    """(patches per wall-clock second, patches per CPU second of this process), best of REPEATS
    runs: the machine is shared, the best run is the least disturbed one, and CPU time does not
    count the time other jobs held the cores."""
    maker.batch(10_000)  # warm up (noise bank, page faults)
    best, best_cpu = 0.0, 0.0
    for r in range(REPEATS):
        t, c = time.perf_counter(), time.process_time()
        for i in range(n_batches):
            maker.batch(r * n_batches + i)
        n = n_batches * maker.batch_size
        best = max(best, n / (time.perf_counter() - t))
        best_cpu = max(best_cpu, n / max(time.process_time() - c, 1e-9))
    return best, best_cpu


def tfdata_rate(cache, plan, augment, n_batches: int) -> tuple[float, float]:
    from medseg.data.pipeline import make_dataset

    ds = make_dataset(cache, plan, batch_size=BATCH, seed=1, augment=augment, num_batches=REPEATS * n_batches + 4)
    it = iter(ds)
    for _ in range(4):  # warm up: graph tracing, thread pool start
        next(it)
    best, best_cpu = 0.0, 0.0
    for _ in range(REPEATS):
        t, c = time.perf_counter(), time.process_time()
        for _ in range(n_batches):
            next(it)
        best = max(best, n_batches * BATCH / (time.perf_counter() - t))
        best_cpu = max(best_cpu, n_batches * BATCH / max(time.process_time() - c, 1e-9))
    return best, best_cpu


# --- peer: MONAI-style per-sample pipeline -----------------------------------------------------
class NaivePerSample:
    """Per-sample dictionary-transform pipeline in the style of MONAI, on numpy/scipy."""

    def __init__(self, cases, rng, lesion_fraction=0.5):
        from medseg.transforms.augment import AugmentConfig

        self.cases = cases
        self.rng = rng
        self.cfg = AugmentConfig()
        self.lesion_fraction = lesion_fraction
        self.fg = [np.argwhere(lab) for _, _, lab in cases]  # FgBgToIndicesd, cached

    def sample(self):
        from scipy import ndimage

        rng, cfg = self.rng, self.cfg
        ph, pw = PATCH
        c = int(rng.integers(len(self.cases)))
        _, image, label = self.cases[c]
        n, h, w = image.shape
        if rng.random() < self.lesion_fraction and len(self.fg[c]):
            s, cy, cx = self.fg[c][rng.integers(len(self.fg[c]))]
        else:
            s, cy, cx = rng.integers(n), rng.integers(h), rng.integers(w)
        y0 = int(np.clip(cy - ph // 2, 0, h - ph))
        x0 = int(np.clip(cx - pw // 2, 0, w - pw))
        img = image[s, y0:y0 + ph, x0:x0 + pw].copy()
        lab = label[s, y0:y0 + ph, x0:x0 + pw].copy()
        for axis in (0, 1):  # RandFlipd per axis
            if rng.random() < cfg.flip_prob:
                img, lab = np.flip(img, axis).copy(), np.flip(lab, axis).copy()
        k = int(rng.integers(4))  # RandRotate90d
        img, lab = np.rot90(img, k).copy(), np.rot90(lab, k).copy()
        angle = rng.uniform(-cfg.max_rotate_deg, cfg.max_rotate_deg) if rng.random() < cfg.rotate_prob else 0.0
        scale = rng.uniform(*cfg.scale_range) if rng.random() < cfg.scale_prob else 1.0
        if angle or scale != 1.0:  # RandAffined
            t = np.deg2rad(angle)
            m = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]) / scale
            centre = (np.array(PATCH) - 1) / 2
            off = centre - m @ centre
            img = ndimage.affine_transform(img, m, offset=off, order=1, mode="constant", cval=float(img.min()))
            lab = ndimage.affine_transform(lab, m, offset=off, order=0, mode="constant", cval=0)
        if rng.random() < cfg.gamma_prob:  # RandAdjustContrastd
            lo, hi = img.min(), img.max()
            img = ((img - lo) / max(hi - lo, 1e-8)) ** rng.uniform(*cfg.gamma_range) * (hi - lo) + lo
        if rng.random() < cfg.noise_prob:  # RandGaussianNoised
            img = img + rng.normal(0, rng.uniform(*cfg.noise_std), img.shape).astype(np.float32)
        if rng.random() < cfg.brightness_prob:  # RandScaleIntensityd
            img = img * rng.uniform(*cfg.brightness_range)
        return img.astype(np.float32), lab

    def rate(self, n_patches: int) -> tuple[float, float]:
        self.sample()
        best, best_cpu = 0.0, 0.0
        for _ in range(REPEATS):
            t, c = time.perf_counter(), time.process_time()
            for _ in range(n_patches):
                self.sample()
            best = max(best, n_patches / (time.perf_counter() - t))
            best_cpu = max(best_cpu, n_patches / max(time.process_time() - c, 1e-9))
        return best, best_cpu


# --- memory (subprocess) -------------------------------------------------------------------------
def _vm(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def memory_child(n_cases: int, n_batches: int, cache_dir: str) -> None:
    """Build a disk cache of ``n_cases`` volumes (one at a time), then sample; print peak MB as JSON."""
    from medseg.data.cache import VolumeCache
    from medseg.data.pipeline import BatchMaker

    plan = _plan()
    cache = VolumeCache.from_arrays((synthetic_case(i) for i in range(n_cases)), plan, mode="disk",
                                    cache_dir=cache_dir, body_threshold=0.3)
    gc.collect()
    build_peak = _vm("VmHWM")
    reset = False
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM (Linux >= 4.0), so the peak below is the sampling phase's
        reset = True
    except OSError:
        pass
    maker = BatchMaker(cache, plan, batch_size=BATCH, seed=0)
    t = time.perf_counter()
    for i in range(n_batches):
        maker.batch(i)
    rate = n_batches * BATCH / (time.perf_counter() - t)
    data_mb = sum(s.image.nbytes + s.label.nbytes for s in cache.sources) / 2 ** 20
    print(json.dumps({"cases": n_cases, "data_mb": round(data_mb), "peak_mb": round(_vm("VmHWM"), 1),
                      "rss_mb": round(_vm("VmRSS"), 1), "build_peak_mb": round(build_peak, 1),
                      "peak_reset": reset, "patches_per_s": round(rate)}))


def run_memory(n_cases: int, n_batches: int, default_allocator: bool = False) -> dict:
    env = os.environ if default_allocator else {**os.environ, **CHILD_MALLOC_ENV}
    with tempfile.TemporaryDirectory(prefix="medseg-bench-") as d:
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(n_cases), str(n_batches), d],
                             capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer batches (a smoke run, noisier figures)")
    p.add_argument("--default-allocator", action="store_true",
                   help="memory children without CHILD_MALLOC_ENV (glibc's defaults: what a user gets)")
    p.add_argument("--memory-child", nargs=3, metavar=("CASES", "BATCHES", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    require("medseg", "scipy", "tensorflow")
    if args.memory_child:
        memory_child(int(args.memory_child[0]), int(args.memory_child[1]), args.memory_child[2])
        return 0

    from medseg.data.cache import VolumeCache
    from medseg.data.pipeline import BatchMaker
    from medseg.transforms.augment import AugmentConfig, Augmenter, check_alignment
    from medseg.transforms.warp import warp_backend

    n_batches = 15 if args.quick else 60
    base_cases = 1 if args.quick else 2
    print(f"cpu cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.2f}", flush=True)
    t = time.perf_counter()
    cases = [synthetic_case(i) for i in range(2)]
    plan = _plan()
    cache = VolumeCache.from_arrays(cases, plan, mode="memory", body_threshold=0.3)
    print(f"2 synthetic volumes {SHAPE[1]}x{SHAPE[2]}x{SHAPE[0]} with "
          f"{sum(s.index.n_components for s in cache.sources)} lesions, cached in {time.perf_counter() - t:.1f} s",
          flush=True)

    flips = AugmentConfig.flips_only()
    full = AugmentConfig()
    results = {}
    for name, cfg in (("flips", flips), ("full", full)):
        maker = BatchMaker(cache, plan, batch_size=BATCH, seed=0, augment=cfg)
        wall, cpu = numpy_rate(maker, n_batches)
        results[f"numpy_patches_per_s_{name}"], results[f"numpy_patches_per_cpu_s_{name}"] = round(wall), round(cpu)
        wall, cpu = tfdata_rate(cache, plan, cfg, n_batches)
        results[f"patches_per_s_{name}"], results[f"patches_per_cpu_s_{name}"] = round(wall), round(cpu)
        print(f"medseg {name:5s}: numpy {results[f'numpy_patches_per_s_{name}']:6d} patches/s "
              f"({results[f'numpy_patches_per_cpu_s_{name}']} per CPU s), "
              f"tf.data {results[f'patches_per_s_{name}']:6d} patches/s "
              f"({results[f'patches_per_cpu_s_{name}']} per CPU s)", flush=True)
    ctx_plan = _plan(context=3)
    maker = BatchMaker(cache, ctx_plan, batch_size=BATCH, seed=0, augment=full)
    wall, cpu = numpy_rate(maker, n_batches // 2)
    results["numpy_patches_per_s_full_2p5d"] = round(wall)
    print(f"medseg full, 2.5D (3 channels): numpy {round(wall)} patches/s ({round(cpu)} per CPU s)", flush=True)

    peer = NaivePerSample(cases, np.random.default_rng(0))
    results["peer"] = "MONAI-style per-sample scipy pipeline"
    wall, cpu = peer.rate(n_batches * 8)
    results["peer_patches_per_s_full"], results["peer_patches_per_cpu_s_full"] = round(wall), round(cpu)
    print(f"peer (MONAI-style per-sample, scipy affine_transform): {round(wall)} patches/s "
          f"({round(cpu)} per CPU s)", flush=True)
    results["alignment_min_dice"] = check_alignment(Augmenter(full), n=64, size=64)
    del cache, cases
    gc.collect()

    allocator = "glibc defaults" if args.default_allocator else " ".join(f"{k}={v}" for k, v in CHILD_MALLOC_ENV.items())
    print(f"allocator of the memory children: {allocator} ("
          + ("--default-allocator: what a user gets)" if args.default_allocator else
             "set by this benchmark, not by medseg: a fixed mmap threshold, so freed per-volume arrays go back to "
             "the OS and the peak counts live data, not heap fragments; --default-allocator measures glibc's "
             "defaults)") + f"; load average {os.getloadavg()[0]:.2f}", flush=True)
    one = run_memory(base_cases, n_batches, args.default_allocator)
    four = run_memory(4 * base_cases, n_batches, args.default_allocator)
    print(f"memory, disk cache, {one['cases']} volumes ({one['data_mb']} MB): peak {one['peak_mb']} MB "
          f"while sampling ({one['patches_per_s']} patches/s)", flush=True)
    print(f"memory, disk cache, {four['cases']} volumes ({four['data_mb']} MB): peak {four['peak_mb']} MB "
          f"while sampling ({four['patches_per_s']} patches/s)", flush=True)
    results.update({
        "peak_mb_1x": one["peak_mb"], "peak_mb_4x": four["peak_mb"],
        "peak_mb_growth_4x": round(four["peak_mb"] - one["peak_mb"], 1),
        "data_mb_1x": one["data_mb"], "data_mb_4x": four["data_mb"],
        "peak_reset": bool(one["peak_reset"] and four["peak_reset"]), "child_allocator": allocator,
        "patch": list(PATCH), "batch": BATCH, "volume_shape": list(SHAPE), "cpu_cores": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2), "rates": f"best of {REPEATS} runs",
        "warp_backend": warp_backend(),
        "targets_met": {"flips_3000": results["patches_per_s_flips"] >= 3000,
                        "full_1500": results["patches_per_s_full"] >= 1500},
    })
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
