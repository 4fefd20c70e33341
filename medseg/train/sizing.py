"""CPU-aware network size: time real training steps, keep the widest network that stays fast.

On a CPU, model size decides whether anything is learned in minutes: the paper's UNet++
(filters 32..512, 9.04 M parameters) takes seconds per step of 8 patches on two cores, a
0.57 M one a fraction of a second. When no GPU is visible and the user left the network and
batch at their defaults, :func:`choose_network` builds each candidate of :data:`CANDIDATES`
(narrowest first) with the run's registered network (``cfg.network``, through its builder), runs
a few real optimizer steps on random patches of the plan's patch size, and keeps the widest
whose median step time is at most the target (the narrowest when none is): :data:`TARGET_STEP_S`,
or under a time budget the pace that fits :data:`BUDGET_MIN_STEPS` steps into it (:func:`budget_target_step_s`). Timing stops as soon as a candidate is over the
target, or when the growth of the step times so far predicts that the next one will be (each
probe builds and traces a model: seconds a candidate, counted in a time budget). The figures
go into ``plan.json`` (``fingerprint.cpu_sizing``) and onto the terminal, with the flags that
override the choice.

When even the narrowest network is far slower than a budget's pace (the data's pixels are too
many for it: patient B's 0.98 mm, 256 x 256 patches), :func:`coarsening` and
:func:`coarser_plan` give the plan coarser in-plane pixels over the same field of view, and the
network is sized again for them (``medseg.train.run``).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from medseg.events import Message, emit

#: Candidate networks, narrowest first: (filters per level, depth).
CANDIDATES: tuple[tuple[tuple[int, ...], int], ...] = (
    ((8, 16, 32, 64, 128), 4),
    ((16, 32, 64, 128, 256), 4),
    ((32, 64, 128, 256, 512), 4),
)
#: Target median seconds per optimizer step without a time budget.
TARGET_STEP_S = 0.5
#: With a time budget, the target leaves room for this many steps in 90 % of the budget: on the
#: demo's liver task a narrow network trained for ~1000 steps beat a wider one trained for ~550
#: in the same 300 s (held-out DSC 0.89 vs 0.71).
BUDGET_MIN_STEPS = 1000


def budget_target_step_s(max_time_s: float | None) -> float:
    """The step-time target: :data:`TARGET_STEP_S`, or less under a budget too short for
    :data:`BUDGET_MIN_STEPS` steps at that pace."""
    if max_time_s is None:
        return TARGET_STEP_S
    return min(TARGET_STEP_S, 0.9 * float(max_time_s) / BUDGET_MIN_STEPS)


#: Coarser pixels when even the narrowest network is this many times slower than the budget's
#: pace (fewer than about BUDGET_MIN_STEPS / 2 steps would fit): measured on patient B of the
#: liver task (0.98 mm, 256 x 256 patches), 300 s gave 226-255 steps and a liver model that fit
#: its own training scan at DSC 0.42; docs/train.md ("Training on a time budget").
COARSEN_RATIO = 2.0
#: At most this factor coarser than the plan's spacing, and never coarser than this (mm) ...
MAX_COARSEN = 3.0
MAX_COARSE_SPACING_MM = 3.0
#: ... nor so coarse that the training labels' median structure (equivalent sphere) is fewer than
#: this many pixels across.
MIN_PIXELS_ACROSS = 8
#: Smaller changes are not worth a plan that differs from the data's.
MIN_COARSEN = 1.25
#: Timed steps per candidate, after one untimed step that traces the graph.
PROBE_STEPS = 3


def time_steps(cfg, plan, filters, depth: int, *, precision: str, steps: int = PROBE_STEPS) -> float:
    """Median seconds of ``steps`` real optimizer steps of a fresh model of the run's network
    (``cfg.network``, built through the registry, its layers in ``precision``) with these filters
    and depth (random patches). Nothing process-wide is changed: the precision goes to the layers."""
    import dataclasses
    import gc


    from medseg.train.assembly import build_model, compile_model, network_spec

    trial = dataclasses.replace(cfg, filters=list(filters), depth=int(depth), max_time_s=None)
    model = None
    try:
        spec = network_spec(trial)
        model = build_model(trial, plan.replace(divisor=spec.divisor), dtype=precision)
        compile_model(model, trial, 1e-3, precision=precision)
        rng = np.random.default_rng(0)
        h, w = plan.patch_size
        x = rng.standard_normal((trial.batch_size, h, w, int(plan.context_slices))).astype("float32")
        y = (rng.random((trial.batch_size, h, w)) < 0.1).astype("int32")
        heads = spec.output_names
        targets = {name: y for name in heads} if len(heads) > 1 else y
        model.train_on_batch(x, targets)  # traces the graph: not timed
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            model.train_on_batch(x, targets)
            times.append(time.perf_counter() - t0)
        return float(np.median(times))
    finally:
        # Not keras.backend.clear_session(): it would reset the Keras settings of every thread of
        # the caller's process (dtype policy, floatx, name counters). The probe's layers are named,
        # so dropping the model is enough; its graphs go with it.
        del model
        gc.collect()


def choose_network(cfg, plan, *, precision: str, target_step_s: float | None = None,
                   candidates=CANDIDATES, timer=None, verbose: int = 1, events=None) -> dict[str, Any]:
    """Time the candidates narrowest first and keep the widest within ``target_step_s``.

    Args:
        cfg: the run's :class:`~medseg.train.config.TrainConfig` (batch size, loss, ...).
        plan: the run's plan (patch size, context slices).
        precision: Keras dtype policy of the run.
        target_step_s: the largest acceptable median step time (default:
            :func:`budget_target_step_s` of ``cfg.max_time_s``).
        candidates: (filters, depth) pairs, narrowest first.
        timer: ``(filters, depth) -> seconds`` (tests); default :func:`time_steps`.
        verbose: report the decision (a ``Message`` to ``events``; printed when ``events`` is None).
        events: a :mod:`medseg.events` sink.

    Returns:
        ``{"target_step_s", "batch_size", "patch_size", "precision", "probes": [{"filters",
        "depth", "step_s"}...], "chosen": {"filters", "depth", "step_s"}, "probe_s"}``.
        Timing stops at the first candidate over the target (a wider one would be slower), or
        when the last ratio of step times predicts the next candidate over it (``"skipped"``
        names it).
    """
    t0 = time.perf_counter()
    if target_step_s is None:
        target_step_s = budget_target_step_s(cfg.max_time_s)
    timer = timer or (lambda f, d: time_steps(cfg, plan, f, d, precision=precision))
    probes = []
    chosen = None
    skipped = None
    for filters, depth in candidates:
        if len(probes) >= 2 and probes[-2]["step_s"] > 0:
            predicted = probes[-1]["step_s"] ** 2 / probes[-2]["step_s"]
            if predicted > target_step_s:
                skipped = {"filters": list(filters), "depth": int(depth), "predicted_step_s": predicted}
                break
        step_s = float(timer(filters, depth))
        probes.append({"filters": list(filters), "depth": int(depth), "step_s": step_s})
        if step_s <= target_step_s:
            chosen = probes[-1]
        else:
            break
    if chosen is None:
        chosen = probes[0]
    result = {"target_step_s": float(target_step_s), "batch_size": int(cfg.batch_size),
              "patch_size": list(plan.patch_size), "precision": precision, "probes": probes,
              "chosen": chosen, "skipped": skipped, "probe_s": time.perf_counter() - t0}
    if verbose:
        timed = ", ".join(f"{p['filters'][0]}..{p['filters'][-1]}: {p['step_s']:.2f} s" for p in probes)
        if skipped:
            timed += f"; {skipped['filters'][0]}..{skipped['filters'][-1]} predicted {skipped['predicted_step_s']:.2f} s"
        line = (f"medseg-train: no GPU: {cfg.network} network sized to this CPU (step time target {target_step_s:g} s; "
                f"timed {timed}); chosen filters {' '.join(map(str, chosen['filters']))}, depth {chosen['depth']}. "
                f"Override with --filters/--depth/--patch-size/--batch-size or --no-cpu-sizing")
        if events is None:
            print(line, flush=True)
        else:
            emit(events, Message(line))
    return result


def coarsening(plan, sizing: dict[str, Any]) -> float | None:
    """How much coarser the plan's in-plane pixels should be under a time budget, or None.

    Step time grows with the patch's pixels; the patch keeps its field of view in millimetres,
    so ``factor`` coarser pixels make about ``factor ** 2`` fewer of them. The factor brings the
    narrowest network's measured step to the budget's pace (``sqrt(step / target)``), capped by
    :data:`MAX_COARSEN`, :data:`MAX_COARSE_SPACING_MM` and the training labels' median structure
    (:data:`MIN_PIXELS_ACROSS`); None below :data:`COARSEN_RATIO` or :data:`MIN_COARSEN`, or
    when the plan keeps each volume's own spacing.
    """
    narrowest = sizing["probes"][0]["step_s"]
    target = sizing["target_step_s"]
    if plan.target_spacing_mm is None or target <= 0 or narrowest < COARSEN_RATIO * target:
        return None
    finest = min(plan.target_spacing_mm)
    caps = [MAX_COARSEN, max(1.0, MAX_COARSE_SPACING_MM / max(plan.target_spacing_mm))]
    diameter = structure_diameter_mm(plan.fingerprint)
    if diameter is not None:
        caps.append(diameter / MIN_PIXELS_ACROSS / finest)
    factor = min([float(np.sqrt(narrowest / target))] + caps)
    return factor if factor >= MIN_COARSEN else None


def structure_diameter_mm(fingerprint: dict) -> float | None:
    """Equivalent-sphere diameter (mm) of the median labelled component of the training cases
    (the largest 20 of each case, as the fingerprint lists them), None without labels."""
    sizes_ml = []
    for entry in fingerprint.get("cases") or []:
        lesion = entry.get("lesion") or {}
        voxel_ml = float(np.prod(entry.get("spacing_mm") or [0.0])) / 1000.0
        sizes_ml += [v * voxel_ml for v in lesion.get("component_voxels") or []]
    if not sizes_ml:
        return None
    return float((6.0 * np.median(sizes_ml) * 1000.0 / np.pi) ** (1.0 / 3.0))


def coarser_plan(plan, factor: float):
    """``plan`` at ``factor`` times its in-plane spacing, its patch the same field of view (mm)."""
    d = plan.divisor
    spacing = tuple(float(v) * factor for v in plan.target_spacing_mm)
    patch = tuple(max(d, int(np.ceil(p / factor / d)) * d) for p in plan.patch_size)
    return plan.replace(target_spacing_mm=spacing, patch_size=patch)
