"""Issue 21 item 7: a metric is described once (medseg.eval.catalog) and every output reads it.

Independent answers: the lists each output wrote by hand before the catalog existed (written out
here), and a fake metric, |Vpred - Vref| in mL, added to the catalog only: hand-computed from voxel
counts, it must reach the CSV, summary.json, the terminal table and summary line, the HTML tables
and the box plots with no other edit.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.eval import catalog
from medseg.eval.catalog import LOWER, Metric

SPACING = (1.0, 1.0, 2.0)  # a voxel is 2 mm^3 = 0.002 mL


def _abs_volume_difference_ml(pred, ref, spacing_mm) -> float:
    return abs(int(np.count_nonzero(pred)) - int(np.count_nonzero(ref))) * float(np.prod(spacing_mm)) / 1000.0


FAKE = Metric("vol_diff_ml", "dV", "absolute volume difference |Vpred - Vref|", unit="mL", better=LOWER,
              digits=3, table=11, plot=10, class_plot=5, class_mean=8, class_stats=("mean",), headline=3,
              validation=True, validation_per_class=True, compute=_abs_volume_difference_ml)


@pytest.fixture()
def with_fake(monkeypatch):
    monkeypatch.setattr(catalog, "METRICS", catalog.METRICS + (FAKE,))
    titles: list[list[str]] = []
    from medseg.eval import figures, report_classes

    original = figures._png_b64

    def spy(fig):
        titles.append([ax.get_title() for ax in fig.axes])
        return original(fig)

    monkeypatch.setattr(figures, "_png_b64", spy)
    monkeypatch.setattr(report_classes, "_png_b64", spy)
    return titles


def _save(path: Path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.diag([*SPACING, 1.0])), str(path))


def _cube_case(root: Path, value: int = 1) -> None:
    """Reference: a 4x4x4 cube (64 voxels); prediction: its first 3 planes (48): |dV| = 16 voxels
    = 0.032 mL; DSC 2*48/112."""
    ref = np.zeros((10, 10, 8), np.uint8)
    ref[2:6, 2:6, 2:6] = value
    pred = np.zeros_like(ref)
    pred[2:5, 2:6, 2:6] = value
    _save(root / "ref" / "c1.nii.gz", ref)
    _save(root / "pred" / "c1.nii.gz", pred)


# --- the description reproduces the hand-written lists -----------------------------------------------
def test_catalog_gives_the_lists_outputs_wrote_by_hand():
    assert catalog.keys() == (
        "dsc", "jaccard", "hd_mm", "hd95_mm", "assd_mm", "masd_mm", "nsd", "vol_pred_ml", "vol_ref_ml", "rvd",
        "n_ref_lesions", "n_pred_lesions", "lesion_tp", "lesion_fp", "lesion_fn", "lesion_precision",
        "lesion_recall", "lesion_f1")
    assert [(m.key, m.column) for m in catalog.table_metrics()] == [
        ("dsc", "DSC"), ("hd95_mm", "HD95 mm"), ("assd_mm", "ASSD mm"), ("nsd", "NSD"), ("vol_ref_ml", "Vref mL"),
        ("vol_pred_ml", "Vpred mL"), ("lesion_tp", "TP"), ("lesion_fp", "FP"), ("lesion_fn", "FN"),
        ("lesion_f1", "F1")]
    assert {m.key: m.label for m in catalog.plot_metrics()} == {
        "dsc": "DSC", "jaccard": "Jaccard", "nsd": "NSD", "hd_mm": "HD (mm)", "hd95_mm": "HD95 (mm)",
        "assd_mm": "ASSD (mm)", "masd_mm": "MASD (mm)", "rvd": "RVD", "lesion_f1": "lesion F1"}
    assert list({m.key: m.label for m in catalog.plot_metrics()}) == [
        "dsc", "jaccard", "nsd", "hd_mm", "hd95_mm", "assd_mm", "masd_mm", "rvd", "lesion_f1"]
    assert [(m.key, m.label) for m in catalog.class_plot_metrics()] == [
        ("dsc", "DSC"), ("hd95_mm", "HD95 (mm)"), ("assd_mm", "ASSD (mm)"), ("nsd", "NSD")]
    assert catalog.class_mean_keys() == ("dsc", "jaccard", "nsd", "hd_mm", "hd95_mm", "assd_mm", "masd_mm")
    assert catalog.distance_keys() == {"hd_mm", "hd95_mm", "assd_mm", "masd_mm"}
    assert catalog.count_keys() == ("n_ref_lesions", "n_pred_lesions", "lesion_tp", "lesion_fp", "lesion_fn")
    # The training validator's row (medseg/train/loop.py, _class_row) and its per-class columns.
    assert catalog.validation_columns() == ("dsc", "jaccard", "hd95_mm", "assd_mm", "nsd")
    assert catalog.validation_class_columns() == ("dsc", "hd95_mm")
    assert catalog.primary().key == "dsc"
    assert [m.headline_text(v) for m, v in zip(catalog.headline_metrics(), (0.83125, 4.5))] == [
        "mean DSC 0.8313", "mean HD95 4.50 mm"]
    assert {k: catalog.metric(k).better for k in ("dsc", "hd95_mm", "rvd", "vol_ref_ml", "lesion_f1")} == {
        "dsc": "higher", "hd95_mm": "lower", "rvd": "zero", "vol_ref_ml": "", "lesion_f1": "higher"}


def test_bad_descriptions_and_unknown_keys():
    with pytest.raises(ValueError, match="better"):
        Metric("x", "X", "x", better="up")
    with pytest.raises(ValueError, match="level"):
        Metric("x", "X", "x", level="organ")
    with pytest.raises(KeyError, match="no metric 'nope'; known: dsc, jaccard"):
        catalog.metric("nope")


def test_format_value():
    f = catalog.format_value
    assert [f(None), f("x"), f(True), f(np.int64(3)), f(0.12345), f(2.5, 2), f(math.nan), f(-math.inf)] == [
        "-", "x", "yes", "3", "0.123", "2.50", "nan", "-inf"]


# --- a metric added to the catalog reaches every output -------------------------------------------
def test_a_described_metric_is_computed(with_fake):
    from medseg.eval.metrics import compute_metrics

    ref = np.zeros((6, 6, 6), bool)
    ref[1:5, 1:5, 1:5] = True
    pred = np.zeros_like(ref)
    pred[1:4, 1:5, 1:5] = True
    m = compute_metrics(pred, ref, SPACING)
    assert list(m)[-1] == "vol_diff_ml" and m["vol_diff_ml"] == pytest.approx(16 * 0.002)
    assert m["dsc"] == pytest.approx(96 / 112)


def test_a_described_metric_reaches_the_binary_outputs(with_fake, tmp_path, capsys):
    from medseg.cli.evaluate import main

    _cube_case(tmp_path)
    assert main(["--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "--out", str(tmp_path / "o"),
                 "--quiet", "--no-figures"]) == 0
    printed = capsys.readouterr().out.splitlines()
    header = (tmp_path / "o" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[-5:] == ["lesion_f1", "vol_diff_ml", "diagonal_mm", "pred_path", "ref_path"]
    row = next(csv.DictReader((tmp_path / "o" / "metrics.csv").open()))
    assert float(row["vol_diff_ml"]) == pytest.approx(0.032)
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["mean"]["vol_diff_ml"] == pytest.approx(0.032)
    assert summary["statistics"]["vol_diff_ml"]["n"] == 1
    assert summary["metric_per_case"][0]["metrics"]["vol_diff_ml"] == pytest.approx(0.032)
    # Terminal: the last column of the table, and the summary line.
    assert printed[0].split()[-2:] == ["dV", "mL"] and printed[1].split()[-1] == "0.032"
    assert printed[2].startswith("mean DSC 0.8571, mean HD95 ") and ", mean dV 0.032 mL (" in printed[2]
    html = (tmp_path / "o" / "report.html").read_text()
    assert "<th>dV mL</th>" in html and "<td class='id'>vol_diff_ml</td>" in html
    assert with_fake and "dV (mL)  (n=1)" in with_fake[-1]


def test_a_described_metric_reaches_the_per_class_outputs(with_fake, tmp_path, capsys):
    from medseg.cli.evaluate import main

    _cube_case(tmp_path, value=5)
    assert main(["--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "--out", str(tmp_path / "o"),
                 "--labels-map", "liver=5", "--quiet", "--no-figures"]) == 0
    printed = capsys.readouterr().out.splitlines()
    header = (tmp_path / "o" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["case", "class"] and header[-4] == "vol_diff_ml"
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["mean"]["liver"]["vol_diff_ml"] == pytest.approx(0.032)
    assert list(summary["mean_over_classes"])[-1] == "vol_diff_ml"
    assert summary["mean_over_classes"]["vol_diff_ml"] == pytest.approx(0.032)
    assert printed[0].split()[-2:] == ["dV", "mL"] and printed[1].split()[-1] == "0.032"
    assert printed[2].startswith("liver: mean DSC 0.8571") and "mean dV 0.032 mL (reference without it: 0)" in printed[2]
    html = (tmp_path / "o" / "report.html").read_text()
    assert "<th>mean dV mL</th>" in html and "<th>dV mL</th>" in html and "<td>0.032</td>" in html
    assert with_fake and with_fake[-1][-1] == "dV (mL)"
    assert catalog.validation_columns()[-1] == "vol_diff_ml" == catalog.validation_class_columns()[-1]


def test_the_training_validator_reads_the_catalog(with_fake):
    """medseg-train's validation rows carry a catalog metric with no edit of medseg/train: the
    class mean, each class's own column and the per-class means the events report."""
    from medseg.io.classes import ClassSpec
    from medseg.train.validation import class_row, per_class_means, score_case

    ref = np.zeros((8, 8, 4), bool)
    ref[2:6, 2:6, 1:3] = True  # 32 voxels
    pred = ref.copy()
    pred[2:6, 2:6, 3] = True  # 16 more: |dV| = 16 x 0.002 mL
    liver = score_case(pred, ref, SPACING)
    spleen = score_case(ref, ref, SPACING)
    assert liver["vol_diff_ml"] == pytest.approx(0.032) and spleen["vol_diff_ml"] == 0.0
    row = class_row("a", "held-out cases", {"liver": liver, "spleen": spleen})
    assert row["vol_diff_ml"] == pytest.approx(0.016)  # the mean over the two classes
    assert row["vol_diff_ml_liver"] == pytest.approx(0.032) and row["vol_diff_ml_spleen"] == 0.0
    spec = ClassSpec.parse(["liver=5", "spleen=1"])
    assert per_class_means(spec, [row])["liver"] == pytest.approx({"dsc": 2 * 32 / 80, "hd95_mm": 2.0,
                                                                    "vol_diff_ml": 0.032})
