"""Budgeted training: the clock is kept to the step, the schedule ends at the budget, resume
continues it, one labelled case is enough, CPU sizing picks by measured step time.

Whole runs use a fake clock (``medseg.train.budget.now``) that advances a fixed amount per
optimizer step and not at all otherwise: the figures do not depend on this machine's speed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from medseg.train import budget
from medseg.train.budget import BudgetClock, replan

from _helpers import lesion_folders as lesion_dataset


TINY = dict(filters=[4, 8], depth=1, deep_supervision=False, patch_size=[32, 32], batch_size=2,
            steps_per_epoch=5, epochs=1000, verbose=0, precision="float32", run_eagerly=True)


class FakeClock:
    """Seconds that pass only when a step runs (``step_s`` per optimizer step)."""

    def __init__(self, step_s: float = 1.0):
        self.t = 1000.0
        self.step_s = step_s

    def __call__(self) -> float:
        return self.t


def slow_steps(clock: FakeClock):
    """A callback making every optimizer step last ``clock.step_s`` fake seconds, and recording
    the learning rate each step ran with."""
    import keras

    class Slow(keras.callbacks.Callback):
        lrs: list = []

        def on_train_batch_begin(self, batch, logs=None):
            # Runs after medseg's clock has set the step's position: this is the step's lr.
            self.lrs.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))
            clock.t += clock.step_s  # the step "takes" step_s seconds

    Slow.lrs = []
    return Slow()


# --- the clock alone ------------------------------------------------------------------------------
class _Model:
    stop_training = False


class _Var:
    value = None

    def assign(self, v):
        self.value = v


def run_clock(clock: BudgetClock, fake: FakeClock, steps_per_epoch: int, max_steps: int, epoch_end_s: float = 0.0):
    """Drive the callback as ``model.fit`` would; returns the positions each step ran at."""
    model = _Model()
    clock.set_model(model)
    clock.set_params({"steps": steps_per_epoch})
    clock.on_train_begin()
    positions = []
    epoch = 0
    while len(positions) < max_steps and not model.stop_training:
        clock.on_epoch_begin(epoch)
        for b in range(steps_per_epoch):
            clock.on_train_batch_begin(b)
            positions.append(clock.position)
            fake.t += fake.step_s
            clock.on_train_batch_end(b, {})
            if model.stop_training:
                break
        clock.on_epoch_end(epoch, {})
        fake.t += epoch_end_s
        epoch += 1
    return positions


def test_clock_stops_at_the_budget_and_schedule_reaches_its_end():
    fake = FakeClock(step_s=1.0)
    var = _Var()
    clock = BudgetClock(100.0, started_at=fake.t - 10.0, clock=fake, progress=var)  # 10 s of start-up
    positions = run_clock(clock, fake, steps_per_epoch=7, max_steps=1000, epoch_end_s=2.0)
    elapsed = fake.t - clock.started_at
    assert clock.time_up
    # the last step ended where no further step (1 s) plus epoch-end work (2 s) fitted
    assert 100.0 - 3.0 - 0.5 <= clock.stop_at_s <= 100.0 + 0.5
    assert elapsed <= 100.0 * 1.05
    assert positions[0] == pytest.approx(0.0, abs=0.02) and positions[-1] == pytest.approx(1.0)
    assert np.all(np.diff(positions) >= 0) and var.value == positions[-1]
    # 90 s of training minus 2 s per epoch end: about 90 * 7 / 9 steps
    assert 66 <= len(positions) <= 72


def test_clock_budget_spent_during_start_up():
    fake = FakeClock()
    clock = BudgetClock(5.0, started_at=fake.t - 6.0, clock=fake)
    model = _Model()
    clock.set_model(model)
    clock.on_train_begin()
    assert clock.time_up and model.stop_training


def test_epoch_end_work_that_would_overrun_makes_this_epoch_the_last():
    fake = FakeClock(step_s=1.0)
    clock = BudgetClock(20.0, started_at=fake.t, clock=fake)
    positions = run_clock(clock, fake, steps_per_epoch=5, max_steps=1000, epoch_end_s=8.0)
    # epochs end at 5, (13) 18: after the second epoch's validation (8 s) no step fits
    assert len(positions) == 10 and clock.time_up


def test_replan_messages_and_positions():
    assert replan(300, None).remaining_s == 300 and replan(300, None).start_progress == 0
    same = replan(300, {"max_time_s": 300, "spent_s": 120, "progress": 0.4})
    assert same.remaining_s == pytest.approx(180) and same.start_progress == pytest.approx(0.4)
    assert "continues from 40%" in same.message
    longer = replan(600, {"max_time_s": 300, "spent_s": 120, "progress": 0.4})
    assert longer.remaining_s == pytest.approx(480) and "300 s -> 600 s" in longer.message
    restart = replan(600, {"max_time_s": 300, "spent_s": 300, "progress": 1.0})
    assert restart.start_progress == 0 and "warm restart" in restart.message
    with pytest.raises(ValueError, match="already trained 300 s of a 200 s budget"):
        replan(200, {"max_time_s": 300, "spent_s": 300, "progress": 1.0})


def test_schedule_follows_clock_progress():
    from medseg.train.callbacks import WarmupDecay

    schedule = WarmupDecay(0.01, total_steps=10_000, kind="poly", power=0.9, clock=True)
    assert float(schedule(5)) == pytest.approx(0.01, rel=1e-3)
    schedule.clock_progress.assign(0.5)
    assert float(schedule(5)) == pytest.approx(0.01 * 0.5 ** 0.9, rel=1e-4)
    schedule.clock_progress.assign(1.0)
    assert float(schedule(5)) == 0.0
    # the step fraction still counts: an epoch limit reached first ends the decay too
    schedule.clock_progress.assign(0.0)
    assert float(schedule(10_000)) == 0.0
    again = WarmupDecay.from_config(schedule.get_config())
    assert again.clock and again.clock_progress is not None


# --- whole runs ---------------------------------------------------------------------------------------
@pytest.fixture
def fake_clock(monkeypatch):
    clock = FakeClock(step_s=1.0)
    monkeypatch.setattr(budget, "now", clock)
    return clock


@pytest.mark.slow
def test_budgeted_run_stops_on_time_with_the_schedule_at_its_end(tmp_path, fake_clock):
    from medseg.train import train

    images, labels = lesion_dataset(tmp_path)
    slow = slow_steps(fake_clock)
    result = train(dict(TINY, images=str(images), labels=str(labels), run_dir=str(tmp_path / "run"),
                        max_time_s=24.0, val_every=1000), callbacks=[slow])
    assert result.stop_reason == "budget"
    assert result.budget["spent_s"] <= 24.0 * 1.05
    assert result.steps == len(slow.lrs) and 22 <= result.steps <= 25
    peak = result.learning_rate
    assert slow.lrs[0] == pytest.approx(peak, rel=0.1)
    assert slow.lrs[-1] <= 0.05 * peak            # within 5 % of the schedule's end value (0)
    assert np.all(np.diff(slow.lrs) <= 1e-12)     # decays monotonically over the budget
    state = json.loads((result.run_dir / "state.json").read_text())
    assert state["stop_reason"] == "budget" and state["steps"] == result.steps
    assert state["schedule_end_lr"] == 0.0 and state["final_lr"] <= 0.05 * peak
    assert state["budget"]["max_time_s"] == 24.0 and state["budget"]["progress"] == pytest.approx(1.0)
    from medseg.train.curves import read_history_csv

    rows = read_history_csv(result.run_dir / "history.csv")
    assert rows[-1]["steps"] == result.steps and "time_left_s" in rows[-1]
    # the epoch that spent the budget was validated although val_every is 1000
    assert "val_dsc_3d" in rows[-1]


@pytest.mark.slow
def test_resume_under_a_budget_continues_the_schedule(tmp_path, fake_clock):
    import keras

    from medseg.train import train

    images, labels = lesion_dataset(tmp_path)
    settings = dict(TINY, images=str(images), labels=str(labels), run_dir=str(tmp_path / "run"), max_time_s=30.0,
                    val_every=1000)

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise KeyboardInterrupt

    first = slow_steps(fake_clock)
    with pytest.raises(KeyboardInterrupt):
        train(settings, callbacks=[first, Interrupt()])
    saved = json.loads((tmp_path / "run" / "state.json").read_text())["budget"]
    assert saved["spent_s"] == pytest.approx(10.0, abs=0.01) and 0.2 < saved["progress"] < 0.5
    second = slow_steps(fake_clock)
    result = train(dict(resume=str(tmp_path / "run")), callbacks=[second])
    # The schedule continues from where it stopped: the first resumed step's learning rate is
    # the next one of the interrupted run (no jump back to the peak, no jump to the end).
    step_lr = first.lrs[-1] - first.lrs[-2]
    assert second.lrs[0] == pytest.approx(first.lrs[-1] + step_lr, abs=0.25 * abs(step_lr))
    assert result.stop_reason == "budget" and result.budget["spent_s"] <= 30.0 * 1.05
    assert second.lrs[-1] <= 0.05 * result.learning_rate
    assert result.steps == len(first.lrs) + len(second.lrs)


@pytest.mark.slow
def test_one_labelled_case_trains_and_the_bundle_serves_medseg_infer(tmp_path, capsys):
    from medseg.cli.infer import main as infer_main
    from medseg.cli.train import main as train_main
    from medseg.io import read_volume

    images, labels = lesion_dataset(tmp_path, cases=("brain1",))
    run = tmp_path / "run"
    code = train_main(["--images", str(images), "--labels", str(labels), "--run-dir", str(run), "--epochs", "2",
                       "--steps-per-epoch", "2", "--batch-size", "2", "--filters", "4", "8", "--depth", "1",
                       "--no-deep-supervision", "--patch-size", "32", "32", "--precision", "float32",
                       "--verbose", "2", "--run-eagerly"])
    out = capsys.readouterr().out
    assert code == 0
    assert "1 labelled case (brain1): training on it and validating on it" in out
    assert "val (training cases) 3D DSC" in out and "*best*" not in out
    assert "last model kept" in out.splitlines()[-1] and "stopped: all epochs done" in out.splitlines()[-1]
    info = json.loads((run / "bundle.json").read_text())
    assert info["validation"] == "training cases" and info["training"]["epoch"] == 2
    assert info["selection"] == "last"
    split = json.loads((run / "split.json").read_text())
    assert split["train"] == split["val"] == ["brain1"] and split["validation"] == "training cases"
    assert "training cases" in (run / "validation.csv").read_text() or split["validation"] == "training cases"
    out_dir = tmp_path / "pred"
    assert infer_main([str(images / "brain1.nrrd"), "--model", str(run), "-o", str(out_dir)]) == 0
    pred = read_volume(next(out_dir.iterdir()))
    assert pred.same_grid(read_volume(images / "brain1.nrrd"))


def test_val_fraction_zero_and_early_stopping_refused():
    from medseg.errors import InputError
    from medseg.train.config import TrainConfig

    assert TrainConfig.from_dict({"val_fraction": 0}).val_fraction == 0
    with pytest.raises(InputError, match="early_stopping only with held-out validation cases"):
        TrainConfig.from_dict({"val_fraction": 0, "early_stopping": 3})


# --- CPU sizing ---------------------------------------------------------------------------------------
def test_cpu_sizing_keeps_the_widest_network_within_the_target():
    from medseg.data.plan import Plan
    from medseg.train.config import TrainConfig
    from medseg.train.sizing import choose_network

    times = {8: 0.1, 16: 0.2, 32: 1.2}
    timed = []

    def timer(filters, depth):
        timed.append(filters[0])
        return times[filters[0]]

    plan = Plan(patch_size=(128, 128))
    chosen = choose_network(TrainConfig(), plan, precision="float32", target_step_s=0.5, timer=timer, verbose=0)
    assert chosen["chosen"]["filters"][0] == 16 and timed == [8, 16, 32]
    assert [p["step_s"] for p in chosen["probes"]] == [0.1, 0.2, 1.2]
    # growth 0.1 -> 0.3 predicts 0.9 s for the widest: not built, not timed
    times[16] = 0.3
    timed.clear()
    chosen = choose_network(TrainConfig(), plan, precision="float32", target_step_s=0.5, timer=timer, verbose=0)
    assert chosen["chosen"]["filters"][0] == 16 and timed == [8, 16]
    assert chosen["skipped"]["predicted_step_s"] == pytest.approx(0.9)
    # A slow machine: even the narrowest is over the target; it is used, wider ones are not timed.
    timed.clear()
    slow = choose_network(TrainConfig(), plan, precision="float32", target_step_s=0.05, timer=timer, verbose=0)
    assert slow["chosen"]["filters"][0] == 8 and timed == [8]


def _sizing(narrowest_s: float, target_s: float) -> dict:
    return {"probes": [{"filters": [8], "depth": 4, "step_s": narrowest_s}], "target_step_s": target_s}


def _labelled_plan(spacing, patch, component_ml):
    """A plan whose fingerprint lists one case with one component of ``component_ml``."""
    from medseg.data.plan import Plan

    voxel_ml = float(np.prod([spacing[0], spacing[1], 2.0])) / 1000.0
    case = {"spacing_mm": [spacing[0], spacing[1], 2.0], "lesion": {"component_voxels": [component_ml / voxel_ml]}}
    return Plan(target_spacing_mm=spacing, patch_size=patch, fingerprint={"cases": [case]})


def test_a_budget_too_short_for_the_plans_pixels_coarsens_them():
    """Patient B of the liver task: 0.98 mm pixels, 256 x 256 patches; the narrowest network took
    1.3 s a step where a 300 s budget's pace is 0.27 s: sqrt(1.3 / 0.27) = 2.19 times coarser."""
    from medseg.data.plan import Plan
    from medseg.train.sizing import coarsening, coarser_plan, structure_diameter_mm

    plan = _labelled_plan((0.98, 0.98), (256, 256), 700.0)  # a liver: 110 mm across
    assert structure_diameter_mm(plan.fingerprint) == pytest.approx((6 * 700_000 / np.pi) ** (1 / 3))
    factor = coarsening(plan, _sizing(1.3, 0.27))
    assert factor == pytest.approx(np.sqrt(1.3 / 0.27))
    coarse = coarser_plan(plan, factor)
    assert coarse.target_spacing_mm == pytest.approx((0.98 * factor,) * 2)
    # The same field of view: 256 / 2.19 = 116.7 pixels, up to the next multiple of 16.
    assert coarse.patch_size == (128, 128)
    # Fast enough (under twice the pace), or a spacing kept per volume: left alone.
    assert coarsening(plan, _sizing(0.5, 0.27)) is None
    assert coarsening(Plan(target_spacing_mm=None), _sizing(1.3, 0.27)) is None


def test_coarsening_stops_at_3_mm_3x_and_eight_pixels_across_the_median_structure():
    from medseg.train.sizing import coarsening

    # 3 mm pixels (patient A) are coarse enough whatever the pace.
    assert coarsening(_labelled_plan((3.0, 3.0), (128, 112), 1000.0), _sizing(5.0, 0.27)) is None
    # 1.5 mm: at most 2x (3 mm); 0.5 mm: at most 3x.
    assert coarsening(_labelled_plan((1.5, 1.5), (256, 256), 1000.0), _sizing(5.0, 0.27)) == pytest.approx(2.0)
    assert coarsening(_labelled_plan((0.5, 0.5), (256, 256), 1000.0), _sizing(50.0, 0.27)) == pytest.approx(3.0)
    # A 0.5 ml lesion (9.85 mm across) keeps 8 pixels: 9.85 / 8 = 1.23 mm, 1.26x of 0.98 mm.
    small = _labelled_plan((0.98, 0.98), (256, 256), 0.5)
    assert coarsening(small, _sizing(5.0, 0.27)) == pytest.approx((6 * 500 / np.pi) ** (1 / 3) / 8 / 0.98)
    # 0.3 ml (8.3 mm): 1.06x, not worth a change.
    assert coarsening(_labelled_plan((0.98, 0.98), (256, 256), 0.3), _sizing(5.0, 0.27)) is None


def test_the_run_trains_the_coarser_plan_sizes_the_network_again_and_says_so(monkeypatch):
    """``run._coarsened``: the plan at coarser pixels, the network sized again for its patches
    (the first sizing kept in the record), one line on the terminal; a spacing the user gave,
    a run without a budget and a fine-tuning run keep the plan."""
    from medseg.train import run as run_module
    from medseg.train import sizing
    from medseg.train.config import TrainConfig

    plan = _labelled_plan((0.98, 0.98), (256, 256), 700.0)
    first = _sizing(1.3, 0.27)
    seen = []

    def resize(cfg, p, **kwargs):
        seen.append(p.patch_size)
        return _sizing(1.3 * (p.patch_size[0] / 256) ** 2, 0.27)

    monkeypatch.setattr(sizing, "choose_network", resize)

    class Run:
        precision, verbose, events, lines = "float32", 1, None, []

        def say(self, text):
            self.lines.append(text)

    run = Run()
    coarse, record = run_module._coarsened(run, TrainConfig(max_time_s=300.0), plan, first)
    assert coarse.patch_size == (128, 128) and seen == [(128, 128)]
    assert record["coarsened"]["from_spacing_mm"] == [0.98, 0.98] and record["coarsened"]["first_sizing"] is first
    assert record["probes"][0]["step_s"] == pytest.approx(1.3 / 4)
    assert len(run.lines) == 1 and "training at 2.15, 2.15 mm pixels instead, 128x128 patches" in run.lines[0]
    for cfg in (TrainConfig(max_time_s=300.0, plan={"target_spacing_mm": [0.98, 0.98]}), TrainConfig(),
                TrainConfig(max_time_s=300.0, init_from="parent")):
        assert run_module._coarsened(run, cfg, plan, first) == (plan, first)
    assert seen == [(128, 128)] and len(run.lines) == 1


def test_budget_target_leaves_room_for_enough_steps():
    from medseg.train.sizing import BUDGET_MIN_STEPS, TARGET_STEP_S, budget_target_step_s

    assert budget_target_step_s(None) == TARGET_STEP_S
    assert budget_target_step_s(300) == pytest.approx(0.9 * 300 / BUDGET_MIN_STEPS)
    assert budget_target_step_s(10_000) == TARGET_STEP_S  # a long budget: the plain target


def test_cpu_sizing_only_when_the_network_is_left_at_defaults():
    from medseg.train.config import TrainConfig
    from medseg.train.resolve import cpu_sizing_wanted

    class Default:
        class extended:
            worker_devices = ("/job:localhost/replica:0/task:0/device:CPU:0",)

    assert cpu_sizing_wanted(TrainConfig(), Default)
    for changed in ({"filters": [8, 16, 32, 64, 128]}, {"depth": 3}, {"patch_size": [64, 64]}, {"batch_size": 4},
                    {"cpu_sizing": False}):
        assert not cpu_sizing_wanted(TrainConfig.from_dict(changed), Default), changed


@pytest.mark.slow
def test_tensorflow_start_up_chatter_is_silenced_unless_debugging():
    """No absl/oneDNN/CUDA-stub lines (nor the error-level cuInit line) on a machine without a
    GPU; with --debug they are left alone."""
    import os
    import subprocess
    import sys

    code = "from medseg.cli._common import import_tensorflow_quietly as q; import sys; q({}); print('ready')"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    quiet = subprocess.run([sys.executable, "-c", code.format("False")], capture_output=True, text=True, env=env,
                           timeout=120)
    assert quiet.returncode == 0 and quiet.stdout.strip() == "ready"
    assert "I0000" not in quiet.stderr and "absl" not in quiet.stderr and "cuInit" not in quiet.stderr, quiet.stderr
    loud = subprocess.run([sys.executable, "-c", code.format("True")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert loud.returncode == 0
    if "absl" not in loud.stderr and "I0000" not in loud.stderr:
        pytest.skip("this TensorFlow build prints nothing at start-up: nothing to silence")
