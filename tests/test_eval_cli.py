"""medseg-eval end to end on small NIfTI folders written with nibabel."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.cli.evaluate import main
from medseg.errors import DatasetError, InputError
from medseg.eval import compute_metrics, lesion_metrics
from medseg.eval.evaluate import evaluate_folders, pair_cases

# Spacings exactly representable in float32 (NIfTI headers store float32).
SPACING = (0.75, 1.5, 2.5)
SHAPE = (24, 20, 10)


def _affine(spacing=SPACING, origin=(0.0, 0.0, 0.0)):
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = origin
    return aff


def _save(path: Path, array, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), _affine() if affine is None else affine), str(path))


def _masks():
    """Reference / prediction arrays of 4 cases: good, shifted + FP, empty prediction, missing."""
    cases = {}
    ref = np.zeros(SHAPE, np.uint8)
    ref[4:12, 5:13, 2:6] = 1
    ref[16:19, 14:17, 6:8] = 1
    cases["case_a"] = (ref, ref.copy())
    pred = np.roll(ref, 1, axis=0)
    pred[20:22, 2:4, 8:9] = 1
    cases["case_b"] = (ref.copy(), pred)
    cases["case_c"] = (ref.copy(), np.zeros_like(ref))
    cases["case_d"] = (ref.copy(), None)
    return cases


@pytest.fixture()
def folders(tmp_path):
    rng = np.random.default_rng(0)
    for cid, (ref, pred) in _masks().items():
        _save(tmp_path / "ref" / f"{cid}.nii.gz", ref)
        if pred is not None:
            _save(tmp_path / "pred" / f"{cid}.nii.gz", pred)
        image = (rng.normal(0, 20, SHAPE) + 100 * ref).astype(np.float32)
        _save(tmp_path / "img" / f"{cid}_0000.nii.gz", image)
    _save(tmp_path / "pred" / "stray.nii.gz", np.zeros(SHAPE, np.uint8))
    return tmp_path


def _args(root: Path, out="out", *extra):
    return ["--pred", str(root / "pred"), "--ref", str(root / "ref"), "--out", str(root / out), "--quiet", *extra]


def _strict_json(path: Path) -> dict:
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_end_to_end_outputs(folders, capsys):
    assert main(_args(folders, "out", "--images", str(folders / "img"))) == 0
    out = folders / "out"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "report.html", "summary.json"]

    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["case_id"] for r in rows] == ["case_a", "case_b", "case_c", "case_d"]
    masks = _masks()
    for row in rows:
        ref, pred = masks[row["case_id"]]
        pred = np.zeros_like(ref) if pred is None else pred
        expected = compute_metrics(pred, ref, SPACING)
        lesions = lesion_metrics(pred, ref, SPACING)
        for key, value in expected.items():
            got = float(row[key])
            assert got == pytest.approx(value, abs=1e-9, nan_ok=True), (row["case_id"], key)
        assert int(row["lesion_fp"]) == lesions["lesion_fp"]
        assert int(row["lesion_fn"]) == lesions["lesion_fn"]
    assert rows[1]["lesion_fp"] == "1"  # the added island
    assert rows[2]["hd95_mm"] == "inf" and rows[3]["missing"] == "true"

    summary = _strict_json(out / "summary.json")
    diag = math.sqrt(sum((n * s) ** 2 for n, s in zip(SHAPE, SPACING)))
    per_case = {c["case_id"]: c for c in summary["metric_per_case"]}
    assert per_case["case_c"]["metrics"]["hd95_mm"] == "inf"
    assert per_case["case_d"]["pred_path"] is None and per_case["case_d"]["missing"] is True
    hd95 = [float(r["hd95_mm"]) for r in rows]
    worst = [v if math.isfinite(v) else diag for v in hd95]
    assert summary["statistics"]["hd95_mm"]["mean"] == pytest.approx(np.mean(worst))
    assert summary["statistics"]["hd95_mm"]["n_inf"] == 2
    assert summary["statistics"]["dsc"]["median"] == pytest.approx(np.median([float(r["dsc"]) for r in rows]))
    assert summary["policy"]["empty_distance"] == "worst"
    assert summary["policy"]["n_missing_prediction"] == 1 and summary["policy"]["n_pred_empty_only"] == 2
    assert summary["unmatched_predictions"] == ["stray"]
    assert set(summary["versions"]) >= {"medseg", "numpy", "scipy"}

    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 1 + 4  # box plots + one slice per patient
    assert "http://" not in page and "https://" not in page  # self-contained
    assert "case_d" in page and "prediction missing" in page

    printed = capsys.readouterr().out
    assert "case_b" in printed and f"report: {out / 'report.html'}" in printed


def test_exclude_policy_and_missing_error(folders, capsys):
    assert main(_args(folders, "ex", "--empty-distance", "exclude", "--no-figures")) == 0
    summary = _strict_json(folders / "ex" / "summary.json")
    hd = summary["statistics"]["hd95_mm"]
    assert hd["n"] == 3  # case_c's inf left out, the missing case_d kept at the diagonal
    assert (folders / "ex" / "report.html").read_text().count("data:image/png") == 1

    assert main(_args(folders, "err", "--missing", "error")) == 2
    err = capsys.readouterr().err
    assert "medseg-eval: error:" in err and "case_d: no prediction" in err
    assert not (folders / "err").exists()


@pytest.mark.slow
def test_workers_give_identical_results(folders, capsys):
    assert main(_args(folders, "w1", "--no-figures")) == 0
    assert main(_args(folders, "w2", "--no-figures", "--workers", "2")) == 0
    assert (folders / "w1" / "metrics.csv").read_text() == (folders / "w2" / "metrics.csv").read_text()
    assert _strict_json(folders / "w1" / "summary.json") == _strict_json(folders / "w2" / "summary.json")
    # An error inside a worker process reaches the user as the same one-line message.
    bad = np.zeros(SHAPE, np.uint8)
    bad[1, 1, 1] = 3
    _save(folders / "pred" / "case_b.nii.gz", bad)
    assert main(_args(folders, "w3", "--no-figures", "--workers", "2")) == 2
    err = capsys.readouterr().err
    assert "case_b.nii.gz: expected a binary mask with values {0, 1}, found other values: 3" in err
    assert not (folders / "w3").exists()


def test_grid_mismatch_refused_then_resampled(tmp_path, capsys):
    ref = np.zeros(SHAPE, np.uint8)
    ref[5:10, 6:12, 3:7] = 1
    # The same object on a grid whose origin is one voxel further along i.
    pred = np.roll(ref, -1, axis=0)
    _save(tmp_path / "ref" / "p1.nii.gz", ref)
    _save(tmp_path / "pred" / "p1.nii.gz", pred, _affine(origin=(SPACING[0], 0.0, 0.0)))
    assert main(_args(tmp_path, "out")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medseg-eval: error:") and len(err.splitlines()) == 1
    assert "origin (0.75, 0, 0)" in err and "origin (0, 0, 0)" in err and "--resample-pred" in err
    with pytest.raises(InputError, match="expected the grid of its reference"):
        main(_args(tmp_path, "out", "--debug"))
    assert main(_args(tmp_path, "out", "--resample-pred", "--no-figures")) == 0
    row = next(csv.DictReader((tmp_path / "out" / "metrics.csv").open()))
    assert float(row["dsc"]) == 1.0 and row["resampled"] == "true"


def test_labels_other_than_binary(tmp_path, capsys):
    ref = np.zeros(SHAPE, np.uint8)
    ref[2:6, 2:6, 2:5] = 1
    ref[10:14, 10:14, 5:8] = 2
    pred = ref.copy()
    pred[10:14, 10:14, 5:8] = 0
    _save(tmp_path / "ref" / "m.nii.gz", ref)
    _save(tmp_path / "pred" / "m.nii.gz", pred)
    assert main(_args(tmp_path, "out")) == 2
    err = capsys.readouterr().err
    assert "expected a binary mask with values {0, 1}, found other values: 2" in err and "--label N" in err
    assert main(_args(tmp_path, "out", "--label", "2", "--no-figures")) == 0
    row = next(csv.DictReader((tmp_path / "out" / "metrics.csv").open()))
    assert float(row["dsc"]) == 0.0 and row["pred_empty"] == "true"


def test_missing_folder_and_bad_flags(tmp_path, capsys):
    assert main(["--pred", str(tmp_path / "nope"), "--ref", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "medseg-eval: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--pred", "a", "--ref", "b", "--out", "c", "--workers", "0"])
    assert exc.value.code == 2
    assert "--workers must be >= 1" in capsys.readouterr().err


def test_library_argument_errors(folders):
    with pytest.raises(ValueError, match="missing must be one of"):
        pair_cases(folders / "pred", folders / "ref", missing="skip")
    with pytest.raises(DatasetError, match=r"1 of 4 reference cases have no prediction") as exc:
        pair_cases(folders / "pred", folders / "ref", missing="error")
    assert exc.value.problems == [f"case_d: no prediction for {folders / 'ref' / 'case_d.nii.gz'}"]
    pairs, unmatched = pair_cases(folders / "pred", folders / "ref", images_dir=folders / "img")
    assert [p.case_id for p in pairs] == ["case_a", "case_b", "case_c", "case_d"] and unmatched == ["stray"]
    assert pairs[3].pred_path is None and pairs[0].image_path.name == "case_a_0000.nii.gz"
    with pytest.raises(ValueError, match="workers must be >= 1"):
        evaluate_folders(folders / "pred", folders / "ref", workers=0)


def test_binary_mask_and_worker_error_transport():
    from medseg.errors import MedsegError
    from medseg.eval.evaluate import _raise_worker_error, binary_mask

    labels = np.array([0, 1, 2, 7, 1])
    expected = r"m.nii.gz: expected a binary mask with values \{0, 1\}, found other values: 2, 7"
    with pytest.raises(InputError, match=expected):
        binary_mask(labels, "m.nii.gz", None)
    np.testing.assert_array_equal(binary_mask(labels, "m.nii.gz", 7), labels == 7)
    with pytest.raises(InputError, match="a.nii: expected x, found y \\(hint\\)"):
        _raise_worker_error(("input", "a.nii", "x", "y", "hint"))
    with pytest.raises(MedsegError, match="dataset problem"):
        _raise_worker_error(("other", "dataset problem"))


def test_help_is_fast_and_imports_no_tensorflow():
    code = (
        "import sys\nfrom medseg.cli.evaluate import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TF', 'tensorflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert "--empty-distance" in out.stdout and "TF False" in out.stdout


def test_largest_disagreement_slice():
    from medseg.eval.report import largest_disagreement_slice

    ref = np.zeros((6, 6, 9), bool)
    pred = np.zeros_like(ref)
    ref[1:4, 1:4, 2:8] = True
    pred[1:4, 1:4, 2:8] = True
    pred[0:5, 0:5, 6] = True  # most disagreement on slice 6 of the coarsest axis (2)
    assert largest_disagreement_slice(pred, ref, (1.0, 1.0, 3.0)) == (2, 6)
    assert largest_disagreement_slice(pred, ref, (3.0, 1.0, 1.0))[0] == 0
    assert largest_disagreement_slice(ref, ref, (1.0, 1.0, 3.0)) == (2, 2)  # agree: largest reference slice
    assert largest_disagreement_slice(ref & False, ref & False, (1.0, 1.0, 3.0)) == (2, 4)


def test_image_on_another_grid_is_resampled_for_display(tmp_path):
    ref = np.zeros(SHAPE, np.uint8)
    ref[5:10, 6:12, 3:7] = 1
    _save(tmp_path / "ref" / "p1.nii.gz", ref)
    _save(tmp_path / "pred" / "p1.nii.gz", ref)
    image = np.zeros((12, 10, 5), np.float32)
    image[2:5, 3:6, 1:4] = 100.0
    _save(tmp_path / "img" / "p1.nii.gz", image, _affine(spacing=tuple(2 * s for s in SPACING)))
    assert main(_args(tmp_path, "out", "--images", str(tmp_path / "img"))) == 0
    assert (tmp_path / "out" / "report.html").read_text().count("data:image/png;base64,") == 2


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # surface-distance uses old scipy namespaces
def test_real_nrrd_cases_against_surface_distance(tmp_path, capsys):
    """pyradiomics' brain/breast MR lesion masks (tests/data/nrrd) against an eroded copy.

    The copy is written by SimpleITK and the oracle reads both with SimpleITK (z-first arrays,
    LPS): medseg's reader, orientation handling and metrics must give surface-distance's values.
    """
    import shutil

    import SimpleITK as sitk
    from scipy import ndimage

    surface_distance = pytest.importorskip("surface_distance")
    data = Path(__file__).parent / "data" / "nrrd"
    expected = {}
    for case in ("brain1", "breast1"):
        (tmp_path / "ref").mkdir(exist_ok=True)
        (tmp_path / "img").mkdir(exist_ok=True)
        shutil.copy(data / f"{case}_label.nrrd", tmp_path / "ref" / f"{case}.nrrd")
        shutil.copy(data / f"{case}_image.nrrd", tmp_path / "img" / f"{case}.nrrd")
        ref_img = sitk.ReadImage(str(data / f"{case}_label.nrrd"))
        ref = sitk.GetArrayFromImage(ref_img).astype(bool)
        pred = ndimage.binary_erosion(ref, structure=np.ones((1, 3, 3), bool))
        pred_img = sitk.GetImageFromArray(pred.astype(np.uint8))
        pred_img.CopyInformation(ref_img)
        (tmp_path / "pred").mkdir(exist_ok=True)
        sitk.WriteImage(pred_img, str(tmp_path / "pred" / f"{case}.nrrd"))
        spacing = ref_img.GetSpacing()[::-1]  # SimpleITK arrays are (z, y, x)
        sd = surface_distance.compute_surface_distances(ref, pred, spacing)
        expected[case] = {
            "dsc": 2 * np.count_nonzero(ref & pred) / (ref.sum() + pred.sum()),
            "hd_mm": surface_distance.compute_robust_hausdorff(sd, 100),
            "hd95_mm": surface_distance.compute_robust_hausdorff(sd, 95),
            "nsd": surface_distance.compute_surface_dice_at_tolerance(sd, 1.0),
            "vol_ref_ml": ref.sum() * np.prod(spacing) / 1000,
        }
    assert main(_args(tmp_path, "out", "--images", str(tmp_path / "img"))) == 0
    rows = {r["case_id"]: r for r in csv.DictReader((tmp_path / "out" / "metrics.csv").open())}
    for case, values in expected.items():
        for key, value in values.items():
            assert float(rows[case][key]) == pytest.approx(value, abs=1e-6), (case, key)
    assert "brain1" in capsys.readouterr().out


def test_pairs_medseg_infer_output_names(tmp_path):
    """medseg-infer writes <case>_seg.nii.gz: those pair with <case>; an exact id still wins."""
    ref = np.zeros(SHAPE, np.uint8)
    ref[2:5, 2:5, 2:4] = 1
    for cid in ("p1", "p2", "x_seg"):
        _save(tmp_path / "ref" / f"{cid}.nii.gz", ref)
    _save(tmp_path / "pred" / "p1_seg.nii.gz", ref)
    _save(tmp_path / "pred" / "p2.nii.gz", ref)
    _save(tmp_path / "pred" / "p2_seg.nii.gz", ref)  # p2 exists exactly: this one stays unmatched
    _save(tmp_path / "pred" / "x_seg.nii.gz", ref)
    pairs, unmatched = pair_cases(tmp_path / "pred", tmp_path / "ref")
    by_id = {p.case_id: p.pred_path.name for p in pairs}
    assert by_id == {"p1": "p1_seg.nii.gz", "p2": "p2.nii.gz", "x_seg": "x_seg.nii.gz"}
    assert unmatched == ["p2_seg"]
