"""Lesion-wise detection scores and aggregation over patients (hand-counted expectations)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg.eval import aggregate, lesion_metrics, scored_value
from medseg.eval.aggregate import check_policy, describe


def _three_lesions():
    ref = np.zeros((20, 20, 20), bool)
    pred = np.zeros_like(ref)
    ref[2:5, 2:5, 2:5] = True  # 27 voxels; prediction covers 18 of them (and 9 more)
    ref[10:12, 10:12, 10:12] = True  # 8 voxels; prediction covers 1 voxel
    ref[15:18, 2:4, 2:4] = True  # 12 voxels; missed
    pred[3:6, 2:5, 2:5] = True
    pred[10, 10, 10] = True
    pred[15:18, 15:18, 15:18] = True  # false positive, 27 voxels
    return pred, ref


def test_counts_rates_and_per_lesion_values():
    pred, ref = _three_lesions()
    m = lesion_metrics(pred, ref, (1.0, 1.0, 2.0))
    assert (m["n_ref_lesions"], m["n_pred_lesions"]) == (3, 3)
    assert (m["lesion_tp"], m["lesion_fp"], m["lesion_fn"]) == (2, 1, 1)
    assert m["lesion_precision"] == pytest.approx(2 / 3)
    assert m["lesion_recall"] == pytest.approx(2 / 3)
    assert m["lesion_f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    by_id = {les["id"]: les for les in m["ref_lesions"]}
    # ndimage.label numbers components in scan order: the three reference cubes in the order above.
    assert by_id[1]["volume_ml"] == pytest.approx(27 * 2.0 / 1000)
    assert by_id[1]["dice"] == pytest.approx(2 * 18 / (27 + 27))
    assert by_id[1]["overlap_fraction"] == pytest.approx(18 / 27)
    assert by_id[2]["dice"] == pytest.approx(2 * 1 / (8 + 1))
    assert by_id[3]["detected"] is False and by_id[3]["dice"] == 0.0
    assert by_id[3]["centroid_ijk"] == [16.0, 2.5, 2.5]
    fps = [p for p in m["pred_lesions"] if p["false_positive"]]
    assert len(fps) == 1 and fps[0]["volume_ml"] == pytest.approx(27 * 2.0 / 1000)
    assert fps[0]["centroid_ijk"] == [16.0, 16.0, 16.0]


def test_min_overlap_fraction_turns_small_overlap_into_miss_and_false_positive():
    pred, ref = _three_lesions()
    m = lesion_metrics(pred, ref, (1.0, 1.0, 1.0), min_overlap_fraction=0.2)
    # Lesion 2 is covered 1/8 < 0.2: missed, and the one-voxel component touching it is a FP.
    assert (m["lesion_tp"], m["lesion_fp"], m["lesion_fn"]) == (1, 2, 2)
    m = lesion_metrics(pred, ref, (1.0, 1.0, 1.0), min_overlap_fraction=18 / 27)
    assert m["lesion_tp"] == 1  # exactly the covered fraction still counts


def test_merged_and_split_predictions():
    ref = np.zeros((12, 12, 12), bool)
    ref[2:4, 2:4, 2:4] = True
    ref[2:4, 6:8, 2:4] = True
    merged = np.zeros_like(ref)
    merged[2:4, 2:8, 2:4] = True  # one component covering both lesions
    m = lesion_metrics(merged, ref, (1, 1, 1))
    assert (m["n_pred_lesions"], m["lesion_tp"], m["lesion_fp"], m["lesion_fn"]) == (1, 2, 0, 0)
    one = np.zeros_like(ref)
    one[2:4, 2:4, 2:4] = True
    split = np.zeros_like(ref)
    split[2, 2, 2] = True
    split[3, 3, 3] = True  # corner-touching: two components under 6-connectivity, same lesion
    m = lesion_metrics(split, one, (1, 1, 1), connectivity=6)
    assert m["lesion_tp"] == 1 and m["lesion_fp"] == 0
    assert m["n_pred_lesions"] == 2  # two 6-connected pieces, both on the detected lesion


@pytest.mark.parametrize(
    "connectivity, expected", [(6, 3), (18, 2), (26, 1)]
)
def test_connectivity(connectivity, expected):
    ref = np.zeros((6, 6, 6), bool)
    ref[1, 1, 1] = True
    ref[2, 2, 1] = True  # shares an edge with (1, 1, 1)
    ref[3, 3, 2] = True  # shares only a corner with (2, 2, 1)
    m = lesion_metrics(np.zeros_like(ref), ref, (1, 1, 1), connectivity=connectivity)
    assert m["n_ref_lesions"] == expected
    assert m["lesion_fn"] == expected and m["lesion_recall"] == 0.0


def test_empty_masks_never_raise():
    z = np.zeros((5, 5, 5), bool)
    m = lesion_metrics(z, z, (1, 1, 1))
    assert (m["lesion_tp"], m["lesion_fp"], m["lesion_fn"]) == (0, 0, 0)
    assert all(math.isnan(m[k]) for k in ("lesion_precision", "lesion_recall", "lesion_f1"))
    ref = z.copy()
    ref[1, 1, 1] = True
    m = lesion_metrics(z, ref, (1, 1, 1))
    assert math.isnan(m["lesion_precision"]) and m["lesion_recall"] == 0.0 and m["lesion_f1"] == 0.0
    m = lesion_metrics(ref, z, (1, 1, 1))
    assert m["lesion_precision"] == 0.0 and math.isnan(m["lesion_recall"]) and m["lesion_fp"] == 1


def test_bad_arguments_raise():
    z = np.zeros((4, 4, 4), bool)
    with pytest.raises(ValueError, match="connectivity must be 6, 18 or 26, found 8"):
        lesion_metrics(z, z, (1, 1, 1), connectivity=8)
    with pytest.raises(ValueError, match=r"min_overlap_fraction must be in \[0, 1\]"):
        lesion_metrics(z, z, (1, 1, 1), min_overlap_fraction=1.5)
    with pytest.raises(ValueError, match="3D arrays of the same shape"):
        lesion_metrics(z, np.zeros((4, 4, 5)), (1, 1, 1))


# --- aggregation ---------------------------------------------------------------------------------


def _case(dsc, hd95, *, pred_empty=False, ref_empty=False, missing=False, diagonal=100.0, tp=1, fp=0, fn=0):
    metrics = {k: math.nan for k in ("dsc", "jaccard", "hd_mm", "hd95_mm", "assd_mm", "masd_mm", "nsd",
                                     "vol_pred_ml", "vol_ref_ml", "rvd")}
    metrics.update(dsc=dsc, hd95_mm=hd95)
    return {
        "metrics": metrics,
        "lesions": {"lesion_tp": tp, "lesion_fp": fp, "lesion_fn": fn, "n_ref_lesions": tp + fn,
                    "n_pred_lesions": tp + fp, "lesion_f1": 1.0},
        "diagonal_mm": diagonal,
        "missing": missing,
        "pred_empty": pred_empty,
        "ref_empty": ref_empty,
    }


def _cases():
    return [
        _case(0.8, 2.0),
        _case(0.6, 4.0),
        _case(0.0, math.inf, pred_empty=True, diagonal=300.0, tp=0, fn=2),  # missed
        _case(math.nan, math.nan, pred_empty=True, ref_empty=True, tp=0),  # nothing to score
        _case(0.0, math.inf, pred_empty=True, missing=True, diagonal=200.0, tp=0, fn=1),
    ]


def test_worst_policy_uses_image_diagonal():
    summary = aggregate(_cases(), "worst")
    hd = summary["metrics"]["hd95_mm"]
    assert hd["n"] == 4 and hd["n_nan"] == 1 and hd["n_inf"] == 2
    assert hd["mean"] == pytest.approx((2 + 4 + 300 + 200) / 4)
    assert hd["median"] == pytest.approx((4 + 200) / 2)
    assert hd["std"] == pytest.approx(np.std([2, 4, 300, 200], ddof=1))
    assert (hd["min"], hd["max"]) == (2.0, 300.0)
    dsc = summary["metrics"]["dsc"]
    assert dsc["n"] == 4 and dsc["mean"] == pytest.approx(1.4 / 4)
    pol = summary["policy"]
    assert (pol["n_cases"], pol["n_both_empty"], pol["n_pred_empty_only"], pol["n_missing_prediction"]) == (5, 1, 2, 1)
    assert summary["lesions"]["totals"]["lesion_fn"] == 3
    assert summary["lesions"]["pooled"]["recall"] == pytest.approx(2 / 5)


def test_exclude_policy_drops_inf_but_never_a_missing_file():
    summary = aggregate(_cases(), "exclude")
    hd = summary["metrics"]["hd95_mm"]
    assert hd["n"] == 3
    assert hd["mean"] == pytest.approx((2 + 4 + 200) / 3)
    assert math.isnan(scored_value(_cases()[2], "hd95_mm", "exclude"))
    assert scored_value(_cases()[4], "hd95_mm", "exclude") == 200.0
    assert "excluded" in summary["policy"]["description"]


def test_describe_edge_cases_and_policy_check():
    empty = describe([math.nan])
    assert empty["n"] == 0 and math.isnan(empty["mean"])
    one = describe([3.0])
    assert one["mean"] == 3.0 and math.isnan(one["std"])
    with pytest.raises(ValueError, match="empty_distance must be one of"):
        check_policy("zero")
    with pytest.raises(ValueError, match="empty_distance must be one of"):
        aggregate(_cases(), "nan")
