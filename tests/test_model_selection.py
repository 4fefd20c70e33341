"""Which model is kept, the small-component post-processing, and few cases (issue 23 items 4 and 5)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from medseg.errors import InputError


# --- item 5: the final model by default, "best" on request --------------------------------------
def _tiny_model():
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def test_last_selection_keeps_every_validated_model_and_still_stops_early(tmp_path, capsys):
    from medseg.train.callbacks import RunKeeper, new_state

    model = _tiny_model()
    saved, state = [], new_state(seed=0)
    keeper = RunKeeper(tmp_path, state, save_best=lambda m, epoch, logs: saved.append(epoch), epochs=10, patience=2,
                       selection="last", training_cases=False)
    keeper.set_model(model)
    keeper.on_train_begin()
    for epoch, dsc in enumerate([0.2, 0.6, 0.5, float("nan"), 0.9]):
        keeper.on_epoch_begin(epoch)
        keeper.on_epoch_end(epoch, {"loss": 1.0, "val_dsc_3d": dsc})
        if model.stop_training:
            break
    # Every validated model replaces the kept one; the best seen (0.6 at epoch 2) only counts
    # for early stopping: 0.5 and NaN are two validations without a better DSC.
    assert saved == [0, 1, 2, 3] and epoch == 3
    assert state["stopped_early"] and state["stop_reason"] == "early_stopping"
    assert state["best_epoch"] == 4 and math.isnan(state["best_dsc"])
    assert state["peak_dsc"] == 0.6 and state["peak_epoch"] == 2
    out = capsys.readouterr().out.splitlines()
    assert "val 3D DSC 0.600 *best*" in out[1] and "best 0.600 @ 2 (keeping the last)" in out[2]
    assert "(training cases)" not in out[1]


def test_selection_setting_flag_and_resume_of_older_runs(tmp_path):
    from medseg.cli.train import build_parser, config_from_args
    from medseg.train.config import TrainConfig
    from medseg.train.resolve import resolve_config

    assert TrainConfig().selection == "last"
    assert TrainConfig.from_dict({"selection": "best"}).selection == "best"
    with pytest.raises(InputError, match="selection to be one of last, best"):
        TrainConfig.from_dict({"selection": "worst"})
    args = build_parser().parse_args(["--images", "i", "--labels", "l", "--selection", "best"])
    assert config_from_args(args).selection == "best"
    args = build_parser().parse_args(["--images", "i", "--labels", "l", "--no-contrast-phases"])
    assert config_from_args(args).plan == {"contrast_phases": None}
    args = build_parser().parse_args(["--images", "i", "--labels", "l", "--contrast-phases"])
    assert config_from_args(args).plan == {"contrast_phases": "on"}  # an unnamed class too
    # A run saved before the setting existed kept the best model: its resume keeps doing so.
    run = tmp_path / "run"
    run.mkdir()
    saved = TrainConfig(images=str(tmp_path), labels=str(tmp_path)).to_dict()
    del saved["selection"]
    (run / "config.json").write_text(json.dumps(saved))
    assert resolve_config(TrainConfig(resume=str(run))).selection == "best"


# --- item 5: dropping components smaller than the training labels' smallest ----------------------
def test_small_component_choice_by_hand():
    from medseg.infer.postprocess import choose_small_components
    from medseg.train.validation import score_case

    ref = np.zeros((10, 10, 10), bool)
    ref[2:5, 2:5, 2:5] = True  # 27 voxels of 1 mm^3
    pred = ref.copy()
    pred[8, 8, 8] = True  # a false component of 1 voxel (0.001 ml)
    row = score_case(pred, ref, (1.0, 1.0, 1.0), min_component_ml=0.005)
    assert row["dsc"] == pytest.approx(2 * 27 / (28 + 27))
    assert row["dsc_without_small"] == pytest.approx(1.0)
    assert score_case(pred, ref, (1.0, 1.0, 1.0))["dsc_without_small"] == pytest.approx(row["dsc"])
    # The rule is scored as inference applies it: the largest component stays whatever its size.
    assert score_case(pred, ref, (1.0, 1.0, 1.0), min_component_ml=1.0)["dsc_without_small"] == pytest.approx(1.0)
    choice = choose_small_components([row, {"dsc": 0.5, "dsc_without_small": 0.5}], min_component_ml=0.005)
    assert choice["drop"] and choice["dsc"] == pytest.approx((row["dsc"] + 0.5) / 2)
    assert choice["dsc_without_small"] == pytest.approx(0.75) and choice["cases"] == 2
    # Dropping removed a true part of the structure: not chosen.
    worse = choose_small_components([{"dsc": 0.8, "dsc_without_small": 0.7}], min_component_ml=0.005)
    assert not worse["drop"]
    assert not choose_small_components([{"dsc": float("nan")}], min_component_ml=1.0)["drop"]
    # A tie at 0 (nothing found) chooses nothing; a tie above 0 drops (nothing that small was labelled).
    assert not choose_small_components([{"dsc": 0.0, "dsc_without_small": 0.0}], min_component_ml=1.0)["drop"]
    assert choose_small_components([{"dsc": 0.6, "dsc_without_small": 0.6}], min_component_ml=1.0)["drop"]
    with pytest.raises(ValueError, match="min_component_ml"):
        choose_small_components([], min_component_ml=0.0)


def test_postprocessing_contract_extends_compatibly():
    from medseg.infer.contract import BundleInfo, Postprocessing, typed_fields

    lcc = {"largest_component": False, "dsc": 0.7, "dsc_largest_component": 0.6, "cases": 1,
           "validation": "held-out cases", "reason": "r"}
    small = {"drop": True, "min_component_ml": 0.4, "dsc": 0.7, "dsc_without_small": 0.72, "cases": 1,
             "validation": "held-out cases", "reason": "s"}
    post = Postprocessing.from_training({**lcc, "small_components": {"aorta": small}}, ("aorta",))
    assert post.min_component_ml() == 0.4 and post.min_component_ml("aorta") == 0.4
    assert not post.keeps_largest("aorta")
    assert Postprocessing.from_dict(post.to_dict()) == post
    # Older bundles (no small_components) read as before: nothing dropped.
    old = Postprocessing.from_dict({"largest_component": {"aorta": {"keep": True}}})
    assert old.min_component_ml("aorta") == 0.0 and "small_components" not in old.to_dict()
    kept_off = Postprocessing.from_training({**lcc, "small_components": {"aorta": {**small, "drop": False}}},
                                            ("aorta",))
    assert kept_off.min_component_ml("aorta") == 0.0
    with pytest.raises(ValueError, match="not among"):
        typed_fields(("background", "aorta"), postprocessing={**lcc, "small_components": {"liver": small}})
    with pytest.raises(ValueError, match="min_component_ml must be a number > 0"):
        Postprocessing.from_dict({"largest_component": {}, "small_components": {"aorta": {**small,
                                                                                           "min_component_ml": -1}}})
    info = BundleInfo.parse({"format_version": 2, "classes": ["background", "aorta"], "threshold": 0.5,
                             "input_channels": 1, "divisor": 16, "postprocessing": post.to_dict(),
                             "selection": "last", "validation": "held-out cases"})
    assert info.postprocessing.min_component_ml() == 0.4 and info.selection == "last"


def _volumes(tmp_path, n: int, with_label=lambda i: True):
    """``n`` small synthetic CT cases written as NIfTI: a 40 HU body with a 'lesion' cube."""
    import nibabel as nib

    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        hu = np.full((24, 24, 8), -1000.0, np.float32)
        hu[4:20, 4:20] = 40.0
        lab = np.zeros(hu.shape, np.uint8)
        if with_label(i):
            lab[8:12, 8:12, 2:4] = 1  # 32 voxels of 2 x 2 x 3 mm = 0.384 ml
            lab[15, 15, 5] = 1        # 1 voxel: 0.012 ml, the smallest component
        affine = np.diag([2.0, 2.0, 3.0, 1.0])
        nib.save(nib.Nifti1Image(hu, affine), images / f"case{i}.nii.gz")
        nib.save(nib.Nifti1Image(lab, affine), labels / f"case{i}.nii.gz")
    return images, labels


def test_training_facts_from_the_plan(tmp_path):
    from medseg.data.plan import make_plan
    from medseg.io import pair_cases
    from medseg.train.validation import empty_prediction_text, training_facts

    images, labels = _volumes(tmp_path, 2)
    cases, _ = pair_cases(images, labels)
    held, smallest = training_facts(make_plan(cases))
    # A tenth of the smallest labelled component (1 voxel of 2 x 2 x 3 mm = 0.012 ml).
    assert held == {"lesion"} and smallest == {"lesion": pytest.approx(0.1 * 2 * 2 * 3 / 1000)}
    images2, labels2 = _volumes(tmp_path / "b", 2, with_label=lambda i: i == 0)
    held2, smallest2 = training_facts(make_plan(pair_cases(images2, labels2)[0]))
    assert held2 == set() and smallest2 == {"lesion": pytest.approx(0.0012)}
    text = empty_prediction_text("patientB", ["aorta"], 2)
    assert "predicts no aorta on patientB" in text and "each of the 2 training cases holds it" in text


def test_reporting_validator_warns_on_an_empty_prediction():
    from medseg.events import Message
    from medseg.io.classes import ClassSpec
    from medseg.train.progress import reporting_validator

    seen = []
    rows = [{"case_id": "a", "dsc": 0.0, "hd95_mm": float("inf"), "pred_empty": 1.0, "ref_empty": 0.0,
             "warning": "the model predicts no lesion on a"}, {"case_id": "b", "dsc": 0.9, "hd95_mm": 1.0}]
    evaluate = reporting_validator(lambda model: rows, ClassSpec.binary(), "training cases", seen.append, lambda: 2)
    assert evaluate(None) == rows
    warnings = [e for e in seen if isinstance(e, Message)]
    assert len(warnings) == 1 and warnings[0].level == "warning" and warnings[0].stream == "stderr"
    assert warnings[0].text == "medseg-train: warning: epoch 3 validation: the model predicts no lesion on a"


# --- item 4: few cases train on all of them -----------------------------------------------------
def test_few_cases_train_on_all_and_say_so(tmp_path):
    from medseg.events import Message
    from medseg.train.cases import FEW_CASES, HELD_OUT, ON_TRAINING, check_and_split, effective_val_fraction
    from medseg.train.config import TrainConfig

    assert FEW_CASES == 5
    cfg = TrainConfig()
    assert cfg.val_fraction is None
    assert [effective_val_fraction(cfg, n) for n in (1, 2, 4, 5, 10)] == [0.0, 0.0, 0.0, 0.2, 0.2]
    assert effective_val_fraction(TrainConfig(val_fraction=0.5), 2) == 0.5
    images, labels = _volumes(tmp_path, 2)
    seen = []
    _, train, val, validation = check_and_split(TrainConfig(images=str(images), labels=str(labels)), seen.append)
    assert validation == ON_TRAINING and [c.case_id for c in train] == [c.case_id for c in val] == ["case0", "case1"]
    lines = [e.text for e in seen if isinstance(e, Message)]
    assert len(lines) == 1 and "2 labelled cases (case0, case1), fewer than 5" in lines[0]
    assert "--val-fraction" in lines[0] and "the model kept is the last one" in lines[0]
    # Asked for: a held-out case, or a fold.
    _, train, val, validation = check_and_split(TrainConfig(images=str(images), labels=str(labels),
                                                            val_fraction=0.5))
    assert validation == HELD_OUT and len(train) == len(val) == 1
    _, train, val, validation = check_and_split(TrainConfig(images=str(images), labels=str(labels), folds=2, fold=0))
    assert validation == HELD_OUT and len(train) == len(val) == 1
    many_images, many_labels = _volumes(tmp_path / "many", 5)
    seen = []
    _, train, val, validation = check_and_split(TrainConfig(images=str(many_images), labels=str(many_labels)),
                                                seen.append)
    assert validation == HELD_OUT and len(val) == 1 and len(train) == 4 and not seen
