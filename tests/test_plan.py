"""Plan validation, JSON round trip, and the fingerprint on real NRRD cases and synthetic CT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medseg.data.plan import DEFAULT_LESION_FRACTION, Plan, make_plan
from medseg.errors import InputError
from medseg.io.volume import Volume

NRRD = Path(__file__).parent / "data" / "nrrd"


def test_plan_round_trip(tmp_path):
    plan = Plan(modality="MR", slice_axis=0, target_spacing_mm=(0.5, 0.75), context_slices=3,
                normalization={"kind": "zscore"}, patch_size=(96, 128), fingerprint={"n": np.int64(3)})
    d = plan.to_dict()
    json.dumps(d)  # JSON-ready
    assert d["patch_size"] == [96, 128] and d["fingerprint"] == {"n": 3}
    assert d["normalization"]["clip_percentiles"] == [0.5, 99.5]  # defaults made explicit
    again = Plan.from_dict(d)
    assert again.to_dict() == d
    path = plan.save(tmp_path / "plan.json")
    assert Plan.load(path).to_dict() == d
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no temp file left
    assert plan.replace(context_slices=5).context_slices == 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"orientation": "XYZ"}, "one of each pair"),
        ({"slice_axis": 3}, "slice_axis must be 0, 1 or 2"),
        ({"target_spacing_mm": (1.0, -1.0)}, "target_spacing_mm must be None or two positive"),
        ({"normalization": {"kind": "minmax"}}, "kind must be one of"),
        ({"context_slices": 2}, "context_slices must be a positive odd integer"),
        ({"divisor": 0}, "divisor must be a positive integer"),
        ({"patch_size": (100, 128)}, "multiples of divisor=16"),
        ({"lesion_fraction": 1.5}, r"lesion_fraction must lie in \[0, 1\]"),
        ({"num_classes": 1}, "num_classes must be an integer >= 2"),
    ],
)
def test_plan_rejects_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Plan(**kwargs)


def test_plan_from_dict_and_load_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown Plan fields \['colour'\]"):
        Plan.from_dict({"colour": "red"})
    with pytest.raises(ValueError, match="newer than this medseg"):
        Plan.from_dict({"version": 99})
    with pytest.raises(InputError, match="no such file"):
        Plan.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="unreadable JSON"):
        Plan.load(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(InputError, match="a JSON list"):
        Plan.load(bad)
    bad.write_text('{"slice_axis": 7}')
    with pytest.raises(InputError, match="expected a valid Plan, found Plan.slice_axis"):
        Plan.load(bad)


def test_make_plan_real_mr_cases():
    pairs = [{"image": NRRD / f"{c}_image.nrrd", "label": NRRD / f"{c}_label.nrrd"} for c in ("brain1", "brain2")]
    plan = make_plan(pairs)
    assert plan.modality == "MR"  # NRRD has no modality tag; intensities are non-negative
    assert plan.orientation == "RAS" and plan.slice_axis == 2  # 6.5 mm slices
    np.testing.assert_allclose(plan.target_spacing_mm, (0.78125, 0.78125))
    assert plan.normalization["kind"] == "zscore" and plan.normalization["mean"] is None
    assert plan.patch_size == (256, 256) and plan.lesion_fraction == DEFAULT_LESION_FRACTION
    fp = plan.fingerprint
    assert fp["n_cases"] == 2
    # MANIFEST: brain1 4137 lesion voxels in 2 components on 7/25 slices; brain2 453 voxels, 1, 3/23.
    lesions = [c["lesion"] for c in fp["cases"]]
    assert [le["voxels"] for le in lesions] == [4137, 453]
    assert [le["components"] for le in lesions] == [2, 1]
    assert [le["slices_with_lesion"][2] for le in lesions] == [7, 3]
    assert fp["lesion"]["slice_fraction_with_lesion"] == pytest.approx(10 / 48)
    assert fp["cases"][0]["original_orientation"] == "LAS"
    ib = fp["intensity_body"]
    assert ib["p0_5"] <= ib["median"] <= ib["p99_5"] and ib["std"] > 0
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))).to_dict() == plan.to_dict()
    # Deterministic given the seed.
    assert make_plan(pairs).to_dict() == plan.to_dict()


def synthetic_ct(case_id: str, spacing=(0.7, 0.7, 5.0), shape=(40, 48, 10), lesion_hu=1500.0):
    arr = np.full(shape, -1000.0, np.float32)
    arr[5:35, 5:40, :] = 40.0
    lab = np.zeros(shape, np.uint8)
    lab[10:14, 10:14, 3:5] = 1
    arr[lab > 0] = lesion_hu
    aff = np.diag([*spacing, 1.0])
    return Volume(arr, aff, case_id, {"modality": "CT"}), Volume(lab, aff, case_id, {})


def test_make_plan_ct_window_and_overrides():
    cases = [synthetic_ct("a"), synthetic_ct("b", spacing=(0.9, 0.9, 5.0))]
    plan = make_plan(cases)
    assert plan.modality == "CT" and plan.slice_axis == 2
    np.testing.assert_allclose(plan.target_spacing_mm, (0.8, 0.8))  # median of 0.7 and 0.9
    # Window [-1000, 400] widened to include the lesions' 99.5th percentile (1500 HU).
    assert plan.normalization == {"kind": "ct_window", "low_hu": -1000.0, "high_hu": 1500.0}
    # Median FOV 32 mm x 38.4 mm at 0.8 mm -> 40 x 48 px, rounded up to 16.
    assert plan.patch_size == (48, 48)
    over = make_plan(cases, overrides={"context_slices": 3, "lesion_fraction": 0.33, "slice_axis": 0,
                                       "target_spacing_mm": None})
    assert over.context_slices == 3 and over.lesion_fraction == 0.33 and over.slice_axis == 0
    assert over.target_spacing_mm is None
    images_only = make_plan([c[0] for c in cases])
    assert images_only.fingerprint["lesion"] is None
    # An unnamed class gets no simulated contrast phases (issue 23) unless asked: the window is
    # [-1000, 400]; asked, its top keeps an arterial vessel (550 HU) + 100 HU.
    assert images_only.normalization == {"kind": "ct_window", "low_hu": -1000.0, "high_hu": 400.0}
    assert images_only.contrast_phases is None
    asked = make_plan([c[0] for c in cases], overrides={"contrast_phases": "on"})
    assert asked.normalization == {"kind": "ct_window", "low_hu": -1000.0, "high_hu": 650.0}


def test_make_plan_errors():
    ct, ct_lab = synthetic_ct("a")
    mr = Volume(np.ones((8, 8, 4)), np.eye(4), "m", {"modality": "MR"})
    with pytest.raises(ValueError, match="at least one case"):
        make_plan([])
    with pytest.raises(ValueError, match=r"unknown Plan fields in overrides: \['spacing'\]"):
        make_plan([ct], overrides={"spacing": 1})
    mixed = make_plan([ct, mr])
    assert mixed.modality == "MIXED" and mixed.normalization["kind"] == "zscore"
    assert mixed.fingerprint["modalities"] == ["CT", "MR"]
    assert make_plan([ct, mr], overrides={"modality": "CT"}).modality == "CT"
    with pytest.raises(ValueError, match="slice_axis must be 0, 1 or 2"):
        make_plan([ct], overrides={"slice_axis": 5})
    with pytest.raises(InputError, match=r"a label of shape \(40, 48, 10\)"):
        make_plan([(ct, Volume(np.zeros((4, 4, 4)), np.eye(4), "a"))])
    with pytest.raises(TypeError, match="make_plan expects Cases"):
        make_plan([42])
