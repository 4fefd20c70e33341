"""The typed bundle contract (issue 21): format 2's named fields, format-1 bundles read into the
same value and segmenting exactly as before, the divisor's one rule, cancelled bundles, class names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medseg.errors import InputError
from medseg.infer.bundle import BUNDLE_FILE, load_bundle, read_bundle_contract, resolve_divisor, save_bundle
from medseg.infer.contract import BundleInfo, ComponentChoice, Postprocessing, TrainingRecord
from medseg.infer.postprocess import choose_largest_component
from medseg.infer.predictor import Predictor
from medseg.io import read_volume

DATA = Path(__file__).parent / "data"
FORMAT1 = DATA / "bundles" / "format1"  # written by the code of c396279: see its README.md
BREAST = DATA / "nrrd" / "breast1_image.nrrd"
ROWS = [{"dsc": 0.50, "dsc_largest_component": 0.60}, {"dsc": 0.70, "dsc_largest_component": 0.72}]
LCC = float(np.mean([0.60, 0.72]))  # the mean DSC with the largest component kept (0.66 in floating point)
REASON = "mean 3D DSC on 2 held-out cases 0.600 -> 0.660 keeping the largest component"


def test_format1_bundle_segments_exactly_as_when_it_was_written():
    bundle = load_bundle(FORMAT1)
    expected = np.load(FORMAT1 / "expected_breast1.npz")
    image = read_volume(BREAST)
    seg = Predictor(bundle).segment(image)
    assert seg.array.dtype == np.uint8 and int(seg.array.sum()) == 1940  # the README's count
    np.testing.assert_array_equal(seg.array, expected["labels"])
    np.testing.assert_array_equal(seg.affine, expected["affine"])
    np.testing.assert_array_equal(seg.affine, image.affine)
    # Its post-processing (in format 1's extra) is obeyed: without it, more voxels (2300).
    assert int(Predictor(bundle).segment(image, largest_component=False).array.sum()) == 2300


def test_format1_bundle_loads_into_the_typed_value():
    folder, info = read_bundle_contract(FORMAT1)
    assert folder == FORMAT1 and info.format_version == 1 and info.status == "complete"
    assert info.classes == ("background", "lesion") and info.threshold == 0.9 and info.divisor == 2
    assert info.selection == "best" and info.validation == "held-out cases"
    assert info.training == TrainingRecord(3, 0.6, 4.5, ("brain1",), ("brain2",), None)
    assert info.postprocessing == Postprocessing(
        {"lesion": ComponentChoice(True, 0.6, LCC, 2, "held-out cases", REASON)})
    assert info.status_note() is None
    bundle = load_bundle(FORMAT1)
    assert bundle.contract == info and bundle.postprocessing.keeps_largest("lesion")
    assert bundle.divisor == 2  # lcm(recorded 2, the recognized depth-1 UNet++'s 2, the plan's 2)


def _copy(tmp_path: Path, edit=None) -> Path:
    run = tmp_path / "copy"
    shutil.copytree(FORMAT1, run)
    if edit is not None:
        info = json.loads((run / BUNDLE_FILE).read_text())
        edit(info)
        (run / BUNDLE_FILE).write_text(json.dumps(info))
    return run


def test_the_same_content_in_format_2_is_the_same_value_and_segmentation(tmp_path):
    old = load_bundle(FORMAT1)
    run = tmp_path / "new"
    f1 = json.loads((FORMAT1 / BUNDLE_FILE).read_text())
    extra = f1["extra"]
    save_bundle(run, old.model, old.plan, threshold=0.9, postprocessing=extra["postprocessing"], selection="best",
                validation="held-out cases", training={k: extra[k] for k in ("epoch", "val_dsc_3d", "val_hd95_mm",
                                                                             "train_cases", "val_cases", "map_labels")},
                extra={"note": "free"})
    info = json.loads((run / BUNDLE_FILE).read_text())
    assert info["format_version"] == 2 and info["status"] == "complete" and info["extra"] == {"note": "free"}
    assert (info["selection"], info["validation"]) == ("best", "held-out cases")
    assert info["postprocessing"] == {"largest_component": {"lesion": {
        "keep": True, "dsc": 0.6, "dsc_largest_component": LCC, "cases": 2, "validation": "held-out cases",
        "reason": REASON}}}
    assert info["training"] == {"epoch": 3, "val_dsc_3d": 0.6, "val_hd95_mm": 4.5, "train_cases": ["brain1"],
                                "val_cases": ["brain2"], "map_labels": None}
    new = load_bundle(run)
    typed = ("classes", "threshold", "divisor", "status", "postprocessing", "selection", "validation", "training")
    assert all(getattr(new.contract, k) == getattr(old.contract, k) for k in typed)
    image = read_volume(BREAST)
    np.testing.assert_array_equal(Predictor(new).segment(image).array, np.load(FORMAT1 / "expected_breast1.npz")["labels"])
    # Writing the old keys into extra (what medseg-train did before format 2) types nothing: extra is
    # free-form now, only the fixture's format 1 is read through it.
    legacy = tmp_path / "legacy"
    save_bundle(legacy, old.model, old.plan, threshold=0.9, extra=extra)
    contract = load_bundle(legacy).contract
    assert contract.training is None and contract.selection is None and not contract.postprocessing.keeps_largest("lesion")


def test_inference_never_reads_extra(tmp_path):
    """A format-2 bundle whose free-form extra says "keep the largest component" keeps every one."""
    old = load_bundle(FORMAT1)
    save_bundle(tmp_path, old.model, old.plan, threshold=0.9)
    info = json.loads((tmp_path / BUNDLE_FILE).read_text())
    info["extra"] = {"postprocessing": {"largest_component": True, "reason": "not a contract"},
                     "selection": "last model (validation on the training cases)"}
    (tmp_path / BUNDLE_FILE).write_text(json.dumps(info))
    bundle = load_bundle(tmp_path)
    assert bundle.postprocessing == Postprocessing() and bundle.contract.selection is None
    predictor = Predictor(bundle)
    assert predictor.largest_component_default is False
    assert int(predictor.segment(read_volume(BREAST)).array.sum()) == 2300


def test_several_classes_postprocessing_from_training():
    per_class = {"liver": choose_largest_component(ROWS), "spleen": choose_largest_component(
        [{"dsc": 0.9, "dsc_largest_component": 0.8}])}
    post = Postprocessing.from_training({"largest_component": {k: v["largest_component"] for k, v in per_class.items()},
                                         "classes": per_class}, ("liver", "spleen"))
    assert post.keeps_largest("liver") and not post.keeps_largest("spleen") and not post.keeps_largest(None)
    assert post.largest_component["spleen"].dsc == 0.9 and post.largest_component["spleen"].cases == 1
    assert Postprocessing.from_dict(post.to_dict()) == post
    assert Postprocessing.from_training(None, ("lesion",)) == Postprocessing() and Postprocessing().to_dict() is None


@pytest.mark.parametrize("kwargs, match", [
    ({"selection": "newest"}, "selection must be one of 'best', 'last'"),
    ({"validation": "some cases"}, "validation must be one of 'held-out cases', 'training cases'"),
    ({"status": "stopped"}, "status must be one of 'complete', 'cancelled'"),
    ({"training": {"epochs": 3}}, "training takes the keys epoch"),
    ({"postprocessing": {"largest_component": {"liver": True}}}, r"names classes \['liver'\] that are not among"),
])
def test_save_refuses_bad_typed_fields(tmp_path, kwargs, match):
    old = load_bundle(FORMAT1)
    with pytest.raises(ValueError, match=match):
        save_bundle(tmp_path, old.model, old.plan, **kwargs)
    assert not (tmp_path / BUNDLE_FILE).exists()


def test_a_malformed_typed_field_is_one_error_naming_the_file(tmp_path):
    run = _copy(tmp_path, lambda info: info.update(format_version=2, selection="newest"))
    with pytest.raises(InputError, match=r"bundle.json: expected valid bundle settings, found selection must be one "
                                         r"of 'best', 'last' or null, found 'newest'"):
        load_bundle(run)


def test_the_divisor_is_the_networks():
    from medseg.data.plan import Plan
    from medseg.nets.registry import NetworkSpec

    spec = NetworkSpec("unetpp", {"filters": [4, 8, 16], "depth": 2})  # 2**2 = 4
    plan = Plan(modality="MR", context_slices=3, divisor=16, patch_size=(32, 32), normalization={"kind": "zscore"})
    assert resolve_divisor(spec, plan) == 4 and resolve_divisor(None, plan) == 16
    # Format 1: what inference used then, the LCM of the record, the network's and the plan's.
    assert resolve_divisor(spec, plan, recorded=8, format_version=1) == 16
    assert resolve_divisor(spec, plan.replace(divisor=2), recorded=8, format_version=1) == 8


def test_a_format1_record_keeps_its_divisor_format2_takes_the_networks(tmp_path):
    assert load_bundle(_copy(tmp_path / "a", lambda info: info.update(divisor=8))).divisor == 8
    assert load_bundle(_copy(tmp_path / "b", lambda info: info.update(divisor=8, format_version=2))).divisor == 2


def test_a_cancelled_bundle_says_so_in_one_line_and_still_works(tmp_path, capsys):
    from medseg.cli.infer import main as infer_main
    from medseg.cli.info import main as info_main

    old = load_bundle(FORMAT1)
    run = tmp_path / "run"
    save_bundle(run, old.model, old.plan, threshold=0.9, status="cancelled", training={"epoch": 2})
    assert load_bundle(run).status == "cancelled"
    assert info_main([str(run)]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert [line for line in shown if line.startswith("status")] == [
        "status     cancelled: the training run was cancelled before its end; the model is the one saved then, "
        "and it runs"]
    assert info_main([str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "cancelled"
    out = tmp_path / "seg.nii.gz"
    assert infer_main([str(BREAST), "--model", str(run), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert ("medseg-infer: note: this bundle was written when its training run was cancelled (the model of epoch 2); "
            "it is used as it is") in err.splitlines()
    assert int(np.asarray(read_volume(out).array).sum()) == 2300  # no post-processing chosen: every component


def test_a_one_class_model_is_named_by_its_bundle(tmp_path, capsys):
    from medseg.cli.infer import main as infer_main

    old = load_bundle(FORMAT1)
    run = tmp_path / "liver"
    save_bundle(run, old.model, old.plan, classes=("background", "liver"), threshold=0.9,
                postprocessing=choose_largest_component(ROWS))
    assert Predictor(load_bundle(run)).class_names == ("liver",)
    assert infer_main([str(BREAST), "--model", str(run), "-o", str(tmp_path / "seg.nii.gz")]) == 0
    captured = capsys.readouterr()
    image = read_volume(BREAST)
    ml = 1940 * float(np.prod(image.spacing_mm)) / 1000.0
    assert captured.out.startswith(f"breast1_image: liver {ml:.2f} ml -> ")
    assert "largest connected component kept (the bundle's choice: " + REASON in captured.err
    default = infer_main([str(BREAST), "--model", str(FORMAT1), "-o", str(tmp_path / "seg2.nii.gz")])
    assert default == 0 and capsys.readouterr().out.startswith(f"breast1_image: lesion {ml:.2f} ml -> ")


def test_info_json_shows_the_typed_fields():
    from medseg.cli.info import describe_bundle

    d = describe_bundle(FORMAT1)
    assert (d["format_version"], d["status"], d["largest_component"]) == (1, "complete", True)
    assert d["training"]["selection"] == "best" and d["training"]["epoch"] == 3
    assert d["postprocessing"]["largest_component"]["lesion"]["keep"] is True
    assert isinstance(BundleInfo.parse(json.loads((FORMAT1 / BUNDLE_FILE).read_text())), BundleInfo)
