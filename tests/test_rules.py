"""One module owns each rule: every place that applies a rule gives the same answer.

Lesion connectivity (medseg.components), the slice axis (transforms.slicing), label values
(io.labels), the regularization loss (losses.regularization), strict JSON (io.jsonsafe), DICOM
detection (io.dicom), and evaluation records that hold numbers while the report draws.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.errors import InputError

DATA = Path(__file__).parent / "data"
CT5N = DATA / "dicom" / "pydicom" / "dicomdirtests" / "98892001" / "CT5N"


# --- lesion connectivity ---------------------------------------------------------------------------
def _corner_pair(shape=(6, 6, 6)) -> np.ndarray:
    """Two lesion voxels that touch only at a corner: one lesion at 26-connectivity, two at 6 or 18."""
    mask = np.zeros(shape, np.uint8)
    mask[1, 1, 1] = mask[2, 2, 2] = 1
    return mask


def test_components_rule_and_its_options():
    from medseg.components import LESION_CONNECTIVITY, label_components, structure

    mask = _corner_pair()
    assert LESION_CONNECTIVITY == 26 and label_components(mask)[1] == 1
    assert label_components(mask, 18)[1] == 2 and label_components(mask, 6)[1] == 2
    # An edge neighbour (two coordinates differ) joins at 18, not at 6.
    edge = np.zeros((4, 4, 4), bool)
    edge[0, 0, 0] = edge[1, 1, 0] = True
    assert (label_components(edge, 18)[1], label_components(edge, 6)[1]) == (1, 2)
    assert structure(6).sum() == 7 and structure(18).sum() == 19 and structure(26).sum() == 27
    with pytest.raises(ValueError, match="found 8"):
        structure(8)


def test_corner_touching_voxels_are_one_lesion_everywhere():
    from medseg.data.check import lesion_statistics
    from medseg.data.plan import make_plan
    from medseg.eval.lesions import lesion_metrics
    from medseg.infer.postprocess import keep_largest_component
    from medseg.io import Volume
    from medseg.transforms.sampling import build_index

    mask = _corner_pair()
    assert lesion_statistics(mask, (1, 1, 1))["lesion_count"] == 1

    image = Volume(np.arange(216, dtype=np.float32).reshape(6, 6, 6), np.eye(4), "c")
    plan = make_plan([(image, image.with_array(mask))])
    assert plan.fingerprint["cases"][0]["lesion"]["components"] == 1

    assert build_index(mask).component_voxels.tolist() == [2]

    # A single voxel far away: the corner pair (2 voxels) is the largest lesion, not a 1-voxel tie.
    three = mask.copy()
    three[5, 5, 0] = 1
    kept = keep_largest_component(three)
    assert kept.sum() == 2 and kept[1, 1, 1] == kept[2, 2, 2] == 1

    scores = lesion_metrics(mask, mask, (1, 1, 1))
    assert (scores["n_ref_lesions"], scores["n_pred_lesions"], scores["lesion_tp"]) == (1, 1, 1)
    assert lesion_metrics(mask, mask, (1, 1, 1), connectivity=6)["n_ref_lesions"] == 2


def test_eval_cli_connectivity_default_is_the_rule():
    from medseg.cli.evaluate import build_parser
    from medseg.components import LESION_CONNECTIVITY
    from medseg.eval.evaluate import EvalOptions

    args = build_parser().parse_args(["--pred", "p", "--ref", "r", "--out", "o"])
    assert args.connectivity == EvalOptions().connectivity == LESION_CONNECTIVITY == 26


# --- slice axis ------------------------------------------------------------------------------------
def test_slice_axis_ties_within_one_percent_in_check_plan_and_report():
    from medseg.data.check import lesion_statistics
    from medseg.data.plan import make_plan
    from medseg.io import Volume

    spacing = (1.0, 1.0, 0.995)  # 0.5 % thinner: near-isotropic, sliced axially (last axis)
    mask = np.zeros((4, 5, 6), np.uint8)
    mask[1, 1, 1] = 1
    stats = lesion_statistics(mask, spacing)
    assert (stats["slice_axis"], stats["n_slices"]) == (2, 6)
    image = Volume(np.arange(120, dtype=np.float32).reshape(4, 5, 6), np.diag([*spacing, 1.0]), "c")
    assert make_plan([image]).slice_axis == 2
    # 2 % thinner is no tie: the largest spacing wins, the last of the tied ones (axis 1).
    assert lesion_statistics(mask, (1.0, 1.0, 0.98))["slice_axis"] == 1
    # The report's figure slices across the same axis.
    from medseg.eval.report import largest_disagreement_slice

    assert largest_disagreement_slice(mask.astype(bool), np.zeros_like(mask, bool), spacing) == (2, 1)
    assert largest_disagreement_slice(mask.astype(bool), np.zeros_like(mask, bool), (1.0, 1.0, 0.98)) == (1, 1)


# --- label values ----------------------------------------------------------------------------------
def _nifti(path: Path, array) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4)), str(path))
    return path


@pytest.mark.parametrize(
    ("bad_value", "check_says", "eval_says", "diag_says"),
    [
        (0.5, "label has 2 non-integer voxels (values such as 0.5)",
         "expected a label map (integer values), found a probability map (values between 0 and 1, such as 0.5)",
         "non-integer label values [0.5]"),
        (np.nan, "label has 2 NaN/inf voxels", "expected a label map (integer values), found 2 NaN/inf voxels",
         "NaN/inf label values"),
        (2.0, "label values {0, 1, 2} outside {0, 1}",
         "expected a binary mask with values {0, 1}, found other values: 2",
         "label values [2.0] outside the classes 0..1"),
    ],
)
def test_one_bad_label_is_named_by_check_eval_and_training(tmp_path, bad_value, check_says, eval_says, diag_says):
    from medseg.data.check import check_case
    from medseg.eval.evaluate import binary_mask
    from medseg.io import Case
    from medseg.train.diagnostics import check_labels

    label = np.zeros((4, 4, 4), np.float32)
    label[0, 0, :2] = 1.0
    label[2, 2, :2] = bad_value
    path = _nifti(tmp_path / "labels" / "c.nii.gz", label)
    image = _nifti(tmp_path / "images" / "c.nii.gz", np.arange(64, dtype=np.float32).reshape(4, 4, 4))

    problems, _ = check_case(Case("c", image, path))
    assert [p.message.startswith(check_says) for p in problems] == [True]
    with pytest.raises(InputError) as info:
        binary_mask(label, path, None, role="reference")
    assert str(info.value).startswith(f"{path}: {eval_says}")
    report = check_labels(label[None], num_classes=2)
    assert not report["ok"] and [p.startswith(diag_says) for p in report["problems"]] == [True]


def test_label_value_rule():
    from medseg.io.labels import check_label_values, label_problems, label_values

    assert label_values(np.array([3, 0, 1, 3, 255], np.uint8)) == [0, 1, 3, 255]
    with_nan = label_values(np.array([1.0, np.nan, 0.0, np.nan]))
    assert len(with_nan) == 3 and with_nan[:2] == [0.0, 1.0] and math.isnan(with_nan[2])  # NaN last, once
    assert check_label_values(np.array([0, 1, 1, 0]), "m", num_classes=2) == [0, 1]
    assert check_label_values(np.array([0, 4, 2]), "m") == [0, 2, 4]  # any class index without num_classes
    [negative] = label_problems(np.array([0, -1, -1, 2]))
    assert (negative.kind, negative.count, negative.values) == ("outside", 2, [-1])
    # NaN, a fraction and a value above the classes in one array: three problems, voxels counted.
    kinds = [(p.kind, p.count) for p in label_problems(np.array([0.0, np.inf, 2.5, 3.0, 3.0]), num_classes=3)]
    assert kinds == [("nan", 1), ("non_integer", 1), ("outside", 2)]
    with pytest.raises(InputError, match=r"m: expected class indices 0..2, found other values: 3 \(use 0..2\)"):
        check_label_values(np.array([0, 3]), "m", num_classes=3, hints={"outside": "use 0..2"})


# --- regularization loss ---------------------------------------------------------------------------
def test_regularization_loss_has_one_definition():
    import keras

    import medseg.losses
    import medseg.train.callbacks
    import medseg.train.diagnostics

    owner = medseg.losses.regularization_loss
    assert medseg.train.diagnostics.regularization_loss is owner
    assert medseg.train.callbacks.regularization_loss is owner
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(
        3, kernel_initializer="ones", kernel_regularizer=keras.regularizers.L2(0.01))])
    assert owner(model) == pytest.approx(0.01 * 6)  # 0.01 * sum of six squared ones
    assert owner(keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])) == 0.0


# --- strict JSON -----------------------------------------------------------------------------------
def test_json_safe_union_of_behaviours(tmp_path):
    from medseg.io.jsonsafe import json_safe
    from medseg.train.checkpoint import atomic_write_json

    data = {1: np.float32(1.5), "nan": float("nan"), "inf": np.float64("-inf"), "i": np.int64(3),
            "b": np.bool_(True), "p": Path("a") / "b", "arr": np.arange(3), "t": (np.int8(1), None, "s")}
    expected = {"1": 1.5, "nan": None, "inf": None, "i": 3, "b": True, "p": str(Path("a/b")), "arr": [0, 1, 2],
                "t": [1, None, "s"]}
    assert json_safe(data) == expected
    assert json_safe(data, inf_as_text=True)["inf"] == "-inf"
    # The checkpoint writer goes through it (a numpy array or a Path used to break it).
    path = atomic_write_json(tmp_path / "state.json", data)
    assert json.loads(path.read_text()) == expected


def test_json_writers_share_json_safe():
    import medseg.data.check
    import medseg.eval.report
    import medseg.train.checkpoint
    from medseg.io.jsonsafe import json_safe

    for module in (medseg.data.check, medseg.eval.report, medseg.train.checkpoint):
        assert module.json_safe is json_safe and not hasattr(module, "_json_safe")


# --- DICOM detection -------------------------------------------------------------------------------
def test_dicom_detection_has_one_owner(tmp_path):
    import medseg.io
    import medseg.io.dataset
    from medseg.cli.infer import _is_dicom_series_folder
    from medseg.io.dicom import is_dicom_file, is_dicom_folder, looks_like_dicom

    assert medseg.io.is_dicom_file is medseg.io.dataset.is_dicom_file is is_dicom_file
    series = tmp_path / "patient"
    shutil.copytree(CT5N, series)
    assert is_dicom_folder(series) and _is_dicom_series_folder(series)
    assert medseg.io.list_volume_files(tmp_path) == {"patient": series}
    other = tmp_path / "notes"
    other.mkdir()
    (other / "README").write_text("no images here\n" * 20)
    assert not is_dicom_folder(other) and not _is_dicom_series_folder(other)
    assert not is_dicom_folder(tmp_path / "missing")
    (other / "broken.dcm").write_bytes(b"x" * 200)  # named DICOM: read as DICOM (and refused clearly)
    assert looks_like_dicom(other / "broken.dcm") and not is_dicom_file(other / "broken.dcm")
    assert is_dicom_folder(other)
    # Only the first `probe` entries are looked at.
    late = tmp_path / "late"
    late.mkdir()
    for k in range(3):
        (late / f"a{k}.txt").write_text("text")
    shutil.copy(CT5N / "2062", late / "z_slice")
    assert is_dicom_folder(late) and not is_dicom_folder(late, probe=3)


def test_detecting_nifti_never_loads_pydicom(tmp_path):
    nifti = _nifti(tmp_path / "a.nii.gz", np.zeros((2, 2, 2), np.uint8))
    code = ("import sys; from medseg.io.dicom import is_dicom_folder, looks_like_dicom; "
            f"assert not looks_like_dicom({str(nifti)!r}) and not is_dicom_folder({str(tmp_path)!r}); "
            "print('pydicom' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --- evaluation records hold numbers; the report draws ---------------------------------------------
def test_evaluate_does_not_import_report():
    code = "import sys, medseg.eval.evaluate; print('medseg.eval.report' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def _walk(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _walk(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _walk(v)
    else:
        yield value


def test_evaluate_case_record_holds_no_image_and_the_report_draws_it(tmp_path):
    from medseg.eval.evaluate import CasePair, EvalOptions, evaluate_case, evaluate_folders
    from medseg.eval.report import write_report

    ref = np.zeros((8, 8, 4), np.uint8)
    ref[2:5, 2:5, 1:3] = 1
    pred = np.roll(ref, 1, axis=0)
    _nifti(tmp_path / "ref" / "c.nii.gz", ref)
    _nifti(tmp_path / "pred" / "c.nii.gz", pred)
    _nifti(tmp_path / "img" / "c.nii.gz", np.arange(256, dtype=np.float32).reshape(8, 8, 4))
    pair = CasePair("c", tmp_path / "ref" / "c.nii.gz", tmp_path / "pred" / "c.nii.gz", tmp_path / "img" / "c.nii.gz")
    record = evaluate_case(pair, EvalOptions(figures=True))
    assert not any("png" in key or "figure" in key for key in record)
    leaves = list(_walk(record))
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in leaves)
    assert max(len(v) for v in leaves if isinstance(v, str)) < 200  # paths and ids, no base64 image
    assert record["metrics"]["dsc"] == pytest.approx(2 * 12 / 36)  # 18 voxels each, 12 shared

    result = evaluate_folders(tmp_path / "pred", tmp_path / "ref", images_dir=tmp_path / "img", progress=False)
    html = write_report(result, tmp_path / "out")["html"].read_text()
    assert html.count("data:image/png;base64,") == 2  # the box plots and the one patient's slice
    assert "<img alt='c'" in html
    no_figures = evaluate_folders(tmp_path / "pred", tmp_path / "ref", options=EvalOptions(figures=False),
                                  progress=False)
    html = write_report(no_figures, tmp_path / "out2")["html"].read_text()
    assert html.count("data:image/png;base64,") == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["metric_per_case"][0]["metrics"]["dsc"] == pytest.approx(2 / 3)


# --- layering (docs/architecture.md) ----------------------------------------------------------------
def test_base_layers_import_nothing_from_the_upper_ones():
    """io, nets, losses, eval and components never import transforms, data, train, infer or cli,
    not even inside a function (read from the source, so a lazy import counts too)."""
    import ast

    root = Path(__file__).resolve().parents[1] / "medseg"
    upper = ("medseg.transforms", "medseg.data", "medseg.train", "medseg.infer", "medseg.cli")
    files = [root / "components.py"] + [p for d in ("io", "nets", "losses", "eval") for p in (root / d).rglob("*.py")]
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.relative_to(root)}: {n}" for n in names if n.startswith(upper)]
    assert len(files) > 20 and found == []
