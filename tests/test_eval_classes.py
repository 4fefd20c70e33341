"""medseg-eval per class (issue 13): --labels-map, --dataset-json, --lesion-classes.

Real multi-organ label maps (TotalSegmentator, tests/data/totalsegmentator; tests/data/README.md):
liver 5, spleen 1, stomach 6, aorta 52 in both patients. Independent answers: a plain numpy Dice,
surface-distance's HD95, scipy's connected components, SimpleITK reading the files; nested
regions against lattice-point counts of balls (1, 7, 33, 123, 257, 515, 925, 1419, 2109 points
of norm <= r^2, OEIS A000605); the binary path against a hand-computed cube overlap.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medseg.cli.evaluate import main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # surface-distance's scipy namespaces

DATA = Path(__file__).parent / "data" / "totalsegmentator"
PATIENTS = {"patientA": "example_seg_fast_force_split.nii.gz", "patientB": "example_seg_dicom.nii.gz"}
ORGANS = {"liver": 5, "spleen": 1, "stomach": 6, "aorta": 52}
#: matplotlib's tab10, the colours of the first four classes.
TAB10 = {"liver": "#1f77b4", "spleen": "#ff7f0e", "stomach": "#2ca02c", "aorta": "#d62728"}
UNKNOWN = 200  # a prediction value of no class


def _perturbed(ref: np.ndarray) -> np.ndarray:
    """A prediction holding only the four organs: liver eroded, spleen shifted 2 voxels along
    axis 0, every other aorta slice (axis 2) deleted, stomach exact; plus a 3x3x3 block of an
    id of no class in a corner."""
    pred = np.zeros_like(ref)
    pred[np.roll(ref == 1, 2, axis=0)] = 1
    pred[ndimage.binary_erosion(ref == 5)] = 5
    aorta = ref == 52
    slices = np.flatnonzero(aorta.any(axis=(0, 1)))
    aorta[:, :, slices[::2]] = False
    pred[aorta] = 52
    pred[ref == 6] = 6
    assert not pred[:3, :3, :3].any()
    pred[:3, :3, :3] = UNKNOWN
    return pred


@pytest.fixture(scope="module")
def organs(tmp_path_factory):
    """Reference / prediction folders of both patients and medseg-eval's outputs."""
    root = tmp_path_factory.mktemp("organs")
    for cid, name in PATIENTS.items():
        (root / "ref").mkdir(exist_ok=True)
        (root / "pred").mkdir(exist_ok=True)
        shutil.copy(DATA / name, root / "ref" / f"{cid}.nii.gz")
        img = nib.load(DATA / name)
        pred = _perturbed(np.asarray(img.dataobj))
        nib.save(nib.Nifti1Image(pred, img.affine, img.header), str(root / "pred" / f"{cid}_seg.nii.gz"))
    args = ["--pred", str(root / "pred"), "--ref", str(root / "ref"), "--out", str(root / "out"), "--quiet",
            "--labels-map", *(f"{k}={v}" for k, v in ORGANS.items()), "--lesion-classes", "spleen"]
    assert main(args) == 0
    return root


def _oracle(root: Path, cid: str) -> dict:
    """Per organ: numpy Dice, surface-distance HD95 and scipy lesion counts, files read by SimpleITK."""
    import SimpleITK as sitk

    surface_distance = pytest.importorskip("surface_distance")
    ref_img = sitk.ReadImage(str(root / "ref" / f"{cid}.nii.gz"))
    ref = sitk.GetArrayFromImage(ref_img)
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "pred" / f"{cid}_seg.nii.gz")))
    spacing = ref_img.GetSpacing()[::-1]  # SimpleITK arrays are (z, y, x)
    out = {}
    for organ, value in ORGANS.items():
        r, p = ref == value, pred == value
        sd = surface_distance.compute_surface_distances(r, p, spacing)
        ref_cc, n_ref = ndimage.label(r, np.ones((3, 3, 3)))
        pred_cc, n_pred = ndimage.label(p, np.ones((3, 3, 3)))
        detected = {int(v) for v in np.unique(ref_cc[p]) if v}
        matched = {int(v) for v in np.unique(pred_cc[np.isin(ref_cc, list(detected))]) if v}
        out[organ] = {
            "dsc": 2 * np.count_nonzero(r & p) / (np.count_nonzero(r) + np.count_nonzero(p)),
            "hd95_mm": surface_distance.compute_robust_hausdorff(sd, 95),
            "vol_ref_ml": np.count_nonzero(r) * np.prod(spacing) / 1000,
            "lesions": (len(detected), n_pred - len(matched), n_ref - len(detected)),
        }
    return out


def test_total_segmentator_organs_match_numpy_and_surface_distance(organs):
    rows = list(csv.DictReader((organs / "out" / "metrics.csv").open()))
    header = (organs / "out" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["case", "class"] and "dsc" in header and "hd95_mm" in header
    assert [(r["case"], r["class"]) for r in rows] == [(c, o) for c in PATIENTS for o in ORGANS]
    expected = {cid: _oracle(organs, cid) for cid in PATIENTS}
    for row in rows:
        want = expected[row["case"]][row["class"]]
        assert float(row["dsc"]) == pytest.approx(want["dsc"], abs=1e-6), (row["case"], row["class"])
        assert float(row["hd95_mm"]) == pytest.approx(want["hd95_mm"], abs=1e-3), (row["case"], row["class"])
        assert float(row["vol_ref_ml"]) == pytest.approx(want["vol_ref_ml"], rel=1e-9)
        if row["class"] == "spleen":
            assert (int(row["lesion_tp"]), int(row["lesion_fp"]), int(row["lesion_fn"])) == want["lesions"]
        else:  # not a lesion class: no lesion-wise counts
            assert row["lesion_tp"] == row["lesion_f1"] == ""
    for cid in PATIENTS:  # the perturbations did what they say
        assert expected[cid]["stomach"]["dsc"] == 1.0 and expected[cid]["stomach"]["hd95_mm"] == 0.0
        assert 0.3 < expected[cid]["aorta"]["dsc"] < 0.9 and expected[cid]["liver"]["dsc"] < 1.0


def test_total_segmentator_summary_per_class(organs):
    summary = json.loads((organs / "out" / "summary.json").read_text())
    expected = {cid: _oracle(organs, cid) for cid in PATIENTS}
    assert summary["classes"] == {o: {"ids": [v], "lesion_wise": o == "spleen"} for o, v in ORGANS.items()}
    per_class = []
    for organ in ORGANS:
        dscs = [expected[cid][organ]["dsc"] for cid in PATIENTS]
        assert summary["mean"][organ]["dsc"] == pytest.approx(np.mean(dscs), abs=1e-9)
        stats = summary["statistics"][organ]["hd95_mm"]
        assert stats["n"] == 2 and stats["n_nan"] == stats["n_inf"] == 0
        assert stats["max"] == pytest.approx(max(expected[c][organ]["hd95_mm"] for c in PATIENTS), abs=1e-3)
        assert summary["policy"]["classes"][organ] == {
            "n_both_empty": 0, "n_pred_empty_only": 0, "n_ref_empty_only": 0, "n_reference_without_class": 0}
        per_class.append(np.mean(dscs))
    assert summary["mean_over_classes"]["dsc"] == pytest.approx(np.mean(per_class), abs=1e-9)
    assert list(summary["lesions"]) == ["spleen"]
    tp = sum(expected[c]["spleen"]["lesions"][0] for c in PATIENTS)
    assert summary["lesions"]["spleen"]["totals"]["lesion_tp"] == tp
    # the id of no class: ignored, counted, one warning
    assert summary["unknown_prediction_values"] == {str(UNKNOWN): {"cases": 2, "voxels": 54}}
    stray = [w for w in summary["warnings"] if "of no class" in w]
    assert len(stray) == 1 and f"({UNKNOWN};" in stray[0] and "54 voxels in 2 of 2 cases" in stray[0]
    assert summary["options"]["classes"]["names"] == list(ORGANS)


def test_total_segmentator_report_lists_classes_with_colours(organs):
    page = (organs / "out" / "report.html").read_text()
    for organ, colour in TAB10.items():
        row = page.split(f"<tr data-class='{organ}'>")[1].split("</tr>")[0]
        assert colour in row and f"<td class='id'>{organ}</td>" in row
    assert page.count("<div class='card'>") == 2  # one overlay per patient
    assert "Per patient and class" in page and "Mean over classes of the per-class mean DSC" in page


def _ball(shape, radius, centre):
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius * radius


def _nested(shape, radii) -> np.ndarray:
    """Label map of nested balls: id k+1 inside radius radii[k] (later ids overwrite)."""
    label = np.zeros(shape, np.uint8)
    centre = tuple(s // 2 for s in shape)
    for k, radius in enumerate(radii, 1):
        if radius:
            label[_ball(shape, radius, centre)] = k
    return label


def _save(path: Path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


def test_nested_regions_from_dataset_json_hand_computed(tmp_path, capsys):
    """whole = ids {1,2,3} ⊃ core = {2,3} ⊃ enhancing = {3}; balls of lattice-point counts
    r2: 33, r3: 123, r4: 257, r5: 515, r7: 1419, r8: 2109 (1 mm voxels)."""
    shape = (21, 21, 21)
    cases = {
        "c1": ((8, 5, 3), (7, 4, 2)),   # every region smaller in the prediction
        "c2": ((8, 5, 0), (8, 5, 0)),   # no enhancing anywhere: NaN
        "c3": ((8, 5, 0), (8, 5, 2)),   # enhancing predicted, absent from the reference: 0 / inf
    }
    for cid, (ref_r, pred_r) in cases.items():
        _save(tmp_path / "ref" / f"{cid}.nii.gz", _nested(shape, ref_r))
        _save(tmp_path / "pred" / f"{cid}.nii.gz", _nested(shape, pred_r))
    counts = {2: 33, 3: 123, 4: 257, 5: 515, 7: 1419, 8: 2109}
    assert np.count_nonzero(_nested(shape, (8, 5, 3))) == counts[8]  # the construction is the balls
    dataset = {"labels": {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3},
               "regions_class_order": [1, 2, 3]}
    (tmp_path / "dataset.json").write_text(json.dumps(dataset))
    args = ["--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "--quiet", "--no-figures",
            "--dataset-json", str(tmp_path / "dataset.json")]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    rows = {(r["case"], r["class"]): r for r in csv.DictReader((tmp_path / "out" / "metrics.csv").open())}
    assert len(rows) == 9
    c1 = {"whole": 2 * counts[7] / (counts[7] + counts[8]), "core": 2 * counts[4] / (counts[4] + counts[5]),
          "enhancing": 2 * counts[2] / (counts[2] + counts[3])}
    for region, dsc in c1.items():
        assert float(rows["c1", region]["dsc"]) == pytest.approx(dsc, abs=1e-12)
    assert float(rows["c1", "enhancing"]["vol_ref_ml"]) == pytest.approx(counts[3] / 1000)
    for region in ("whole", "core"):
        assert float(rows["c2", region]["dsc"]) == float(rows["c3", region]["dsc"]) == 1.0
    assert math.isnan(float(rows["c2", "enhancing"]["dsc"]))
    assert float(rows["c3", "enhancing"]["dsc"]) == 0.0 and rows["c3", "enhancing"]["hd95_mm"] == "inf"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["regions"] is True
    assert summary["policy"]["classes"]["enhancing"] == {
        "n_both_empty": 1, "n_pred_empty_only": 0, "n_ref_empty_only": 1, "n_reference_without_class": 2}
    enh = summary["statistics"]["enhancing"]["dsc"]
    assert (enh["n"], enh["n_nan"]) == (2, 1) and enh["mean"] == pytest.approx(c1["enhancing"] / 2)
    assert summary["statistics"]["enhancing"]["hd95_mm"]["max"] == pytest.approx(math.sqrt(3) * 21)  # diagonal
    whole = (c1["whole"] + 2) / 3
    assert summary["mean_over_classes"]["dsc"] == pytest.approx(
        (whole + (c1["core"] + 2) / 3 + c1["enhancing"] / 2) / 3)
    # Worker processes (and region overlays drawn there) give the same files.
    with_figures = [a for a in args if a != "--no-figures"]
    assert main([*with_figures, "--workers", "2", "--out", str(tmp_path / "w2")]) == 0
    assert (tmp_path / "w2" / "metrics.csv").read_bytes() == (tmp_path / "out" / "metrics.csv").read_bytes()
    again = json.loads((tmp_path / "w2" / "summary.json").read_text())
    assert again.pop("options")["figures"] and {**again, "options": summary["options"]} == summary
    assert (tmp_path / "w2" / "report.html").read_text().count("<div class='card'>") == 3
    # The same maps read as softmax classes (ids alone, no union): class 2 is the shell 3 < r <= 5.
    assert main([*args[:-2], "--labels-map", "edema=1", "core=2", "enh=3", "--out", str(tmp_path / "cls")]) == 0
    rows = {(r["case"], r["class"]): r for r in csv.DictReader((tmp_path / "cls" / "metrics.csv").open())}
    shell_ref, shell_pred, shell_both = counts[5] - counts[3], counts[4] - counts[2], counts[4] - counts[3]
    assert float(rows["c1", "core"]["dsc"]) == pytest.approx(2 * shell_both / (shell_ref + shell_pred), abs=1e-12)
    assert "edema" in capsys.readouterr().out


CUBE_REF = (slice(4, 8), slice(4, 8), slice(2, 6))  # 64 voxels


def test_binary_output_and_a_one_class_dataset_json_named(tmp_path, capsys):
    """No class flags give today's binary files (one row per patient); a dataset.json of one
    foreground label scores that class by its name, with the same numbers. DSC of a 4x4x4 cube
    against it shifted by one voxel: 2*48/128."""
    ref = np.zeros((12, 12, 8), np.uint8)
    ref[CUBE_REF] = 1
    _save(tmp_path / "ref" / "cube.nii.gz", ref)
    _save(tmp_path / "pred" / "cube.nii.gz", np.roll(ref, 1, axis=0))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "tumour": 1}}))
    base = ["--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "--quiet"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "dj"), "--dataset-json", str(tmp_path / "dataset.json")]) == 0
    table = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert table[0][:3] == ["case", "class", "DSC"] and table[1][:3] == ["cube", "tumour", "0.750"]
    assert "tumour: mean DSC 0.7500, mean HD95 1.00 mm (reference without it: 0)" in [" ".join(r) for r in table]
    named = next(csv.DictReader((tmp_path / "dj" / "metrics.csv").open()))
    assert (named["case"], named["class"], float(named["dsc"]), float(named["jaccard"])) == ("cube", "tumour", 0.75, 0.6)
    named_summary = json.loads((tmp_path / "dj" / "summary.json").read_text())
    assert named_summary["classes"] == {"tumour": {"ids": [1], "lesion_wise": False}}
    assert named_summary["mean"]["tumour"]["dsc"] == 0.75
    html = (tmp_path / "dj" / "report.html").read_text()
    assert "1 class (label ids)" in html and "<td class='id'>tumour</td>" in html
    lines = (tmp_path / "plain" / "metrics.csv").read_text().splitlines()
    assert lines[0] == (
        "case_id,missing,pred_empty,ref_empty,resampled,dsc,jaccard,hd_mm,hd95_mm,assd_mm,masd_mm,nsd,vol_pred_ml,"
        "vol_ref_ml,rvd,n_ref_lesions,n_pred_lesions,lesion_tp,lesion_fp,lesion_fn,lesion_precision,lesion_recall,"
        "lesion_f1,diagonal_mm,pred_path,ref_path")
    row = next(csv.DictReader((tmp_path / "plain" / "metrics.csv").open()))
    assert len(lines) == 2 and float(row["dsc"]) == 0.75 and float(row["jaccard"]) == 0.6
    summary = json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert "classes" not in summary and "classes" not in summary["options"]
    assert summary["options"]["label"] == "binary {0, 1}" and summary["mean"]["dsc"] == 0.75


def test_library_binary_spec_is_the_binary_evaluation(tmp_path):
    from medseg.eval.evaluate import EvalOptions, evaluate_folders
    from medseg.io.classes import ClassSpec

    ref = np.zeros((12, 12, 8), np.uint8)
    ref[CUBE_REF] = 1
    _save(tmp_path / "ref" / "cube.nii.gz", ref)
    _save(tmp_path / "pred" / "cube.nii.gz", ref)
    result = evaluate_folders(tmp_path / "pred", tmp_path / "ref", progress=False,
                              options=EvalOptions(classes=ClassSpec.binary(), figures=False))
    assert result.options.classes is None and result.cases[0]["metrics"]["dsc"] == 1.0
    with pytest.raises(ValueError, match="label"):
        EvalOptions(label=1, classes=ClassSpec.parse(["a=1", "b=2"]))


@pytest.mark.parametrize("extra, message", [
    (["--labels-map", "a=1", "--dataset-json", "d.json"], "pass one"),
    (["--labels-map", "a=1", "--label", "1"], "--label picks one"),
    (["--lesion-classes", "a"], "--lesion-classes names classes"),
])
def test_conflicting_class_flags_are_usage_errors(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        main(["--pred", str(tmp_path), "--ref", str(tmp_path), "--out", str(tmp_path / "o"), *extra])
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--labels-map", "liver"], "NAME=IDS"),
    (["--labels-map", "a=1", "b=2", "--lesion-classes", "c"], "lesion classes ['c']"),
])
def test_bad_class_definitions_are_one_line_errors(tmp_path, capsys, extra, message):
    ref = np.zeros((6, 6, 4), np.uint8)
    _save(tmp_path / "ref" / "x.nii.gz", ref)
    _save(tmp_path / "pred" / "x.nii.gz", ref)
    args = ["--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "--out", str(tmp_path / "o")]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medseg-eval: error:") and message in err and not (tmp_path / "o" / "metrics.csv").exists()
