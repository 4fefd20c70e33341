"""Surface metrics against independent oracles: hand-computed values, brute force, surface-distance."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from medseg.eval import compute_metrics, dice, hausdorff_distance, jaccard
from medseg.eval import surface as surface_mod
from medseg.eval.metrics import DISTANCE_KEYS, METRIC_KEYS, image_diagonal_mm

surface_distance = pytest.importorskip("surface_distance")
from surface_distance import lookup_tables  # noqa: E402

# surface-distance 0.1 imports scipy.ndimage.filters/morphology, deprecated in SciPy 1.x.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(params=["lattice", "kdtree"])
def nn_stage(request, monkeypatch):
    """Run a test with the lattice-offset stage on every element, or with the KD-tree only."""
    monkeypatch.setattr(surface_mod, "_MIN_QUERIES_FOR_LATTICE", 0 if request.param == "lattice" else 10**9)
    return request.param


def _blob(rng: np.random.Generator, shape, sigma=1.5) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.random(shape), sigma)
    return field > np.quantile(field, rng.uniform(0.55, 0.9))


# --- hand-made masks with exact answers ----------------------------------------------------------


def test_two_voxels_along_slice_axis_anisotropic():
    # Voxels 3 slices apart along k at 2 mm: the corner lattice puts the facing corners 2 slices
    # (4 mm) apart and the far corners 3 slices (6 mm) apart; all 8 corners have equal area.
    spacing = (0.5, 0.8, 2.0)
    pred = np.zeros((6, 6, 9), bool)
    ref = np.zeros_like(pred)
    pred[2, 2, 2] = True
    ref[2, 2, 5] = True
    m = compute_metrics(pred, ref, spacing)
    assert m["dsc"] == 0.0 and m["jaccard"] == 0.0
    assert m["hd_mm"] == pytest.approx(6.0, abs=1e-12)
    assert m["hd95_mm"] == pytest.approx(6.0, abs=1e-12)
    assert m["assd_mm"] == pytest.approx(5.0, abs=1e-12)
    assert m["masd_mm"] == pytest.approx(5.0, abs=1e-12)
    assert m["nsd"] == 0.0
    assert m["vol_pred_ml"] == pytest.approx(0.5 * 0.8 * 2.0 / 1000)
    assert m["rvd"] == 0.0
    # 4.0 mm tolerance matches the facing halves exactly (distance <= tolerance).
    assert compute_metrics(pred, ref, spacing, nsd_tolerance_mm=4.0)["nsd"] == pytest.approx(0.5)


def test_two_voxels_diagonal_offset_anisotropic():
    spacing = (0.5, 0.8, 2.0)
    pred = np.zeros((7, 6, 4), bool)
    ref = np.zeros_like(pred)
    pred[1, 1, 1] = True
    ref[4, 3, 1] = True
    # Corner offsets (in voxels) from each of pred's corners to ref's nearest corner:
    # (2, 1), (3, 2), (3, 1), (2, 2) in (i, j), each for two k levels; symmetric the other way.
    d = [
        math.hypot(2 * 0.5, 1 * 0.8),
        math.hypot(3 * 0.5, 2 * 0.8),
        math.hypot(3 * 0.5, 1 * 0.8),
        math.hypot(2 * 0.5, 2 * 0.8),
    ]
    m = compute_metrics(pred, ref, spacing)
    assert m["hd_mm"] == pytest.approx(max(d), abs=1e-12)
    assert m["hd95_mm"] == pytest.approx(max(d), abs=1e-12)
    assert m["assd_mm"] == pytest.approx(sum(d) / 4, abs=1e-12)
    assert m["masd_mm"] == pytest.approx(sum(d) / 4, abs=1e-12)
    # With a 50th percentile: 8 equal areas sorted, the 4th of 8 reaches exactly 50 %.
    m50 = compute_metrics(pred, ref, spacing, percentile=50)
    assert m50["hd95_mm"] == pytest.approx(sorted(d)[1], abs=1e-12)


def _cube_corner_oracle(n: int, shift: int, spacing) -> tuple[float, float]:
    """HD and ASSD of an n^3 cube and its copy shifted by ``shift`` voxels along axis 0.

    Derived by hand: corners of the (n+1)^3 block, areas by type (face corner = one voxel face;
    edge corner = two half-diagonal strips; vertex = one corner triangle), distance to the
    shifted block's surface from the block geometry.
    """
    s0, s1, s2 = spacing
    face = {0: s1 * s2, 1: s0 * s2, 2: s0 * s1}
    total_area = 0.0
    total = 0.0
    hd = 0.0
    for i in range(n + 1):
        for j in range(n + 1):
            for k in range(n + 1):
                on = [c in (0, n) for c in (i, j, k)]
                if not any(on):
                    continue
                if sum(on) == 1:
                    area = face[on.index(True)]
                elif sum(on) == 2:
                    a, b = [ax for ax in range(3) if on[ax]]
                    # '220 220' type: two triangles with area vector (1/4, 1/4) on the two axes.
                    area = 2 * 0.25 * math.hypot(face[a], face[b])
                else:
                    area = 0.125 * math.sqrt(face[0] ** 2 + face[1] ** 2 + face[2] ** 2)
                # Distance to the other cube's surface (lattice i range [shift, n + shift]).
                if i < shift:
                    dist = (shift - i) * s0
                elif i == n and not (on[1] or on[2]):
                    rim = min(j, n - j) * s1, min(k, n - k) * s2
                    dist = min(shift * s0, *rim)
                else:
                    dist = 0.0
                total += area * dist
                total_area += area
                hd = max(hd, dist)
    # Symmetric: the shifted cube sees the same distances mirrored.
    return hd, total / total_area


@pytest.mark.parametrize("shift", [1, 2])
def test_shifted_cubes_exact(shift):
    spacing = (0.6, 0.9, 2.5)
    n = 4
    ref = np.zeros((12, 8, 8), bool)
    pred = np.zeros_like(ref)
    ref[2 : 2 + n, 2 : 2 + n, 2 : 2 + n] = True
    pred[2 + shift : 2 + shift + n, 2 : 2 + n, 2 : 2 + n] = True
    hd, assd = _cube_corner_oracle(n, shift, spacing)
    m = compute_metrics(pred, ref, spacing)
    assert hd == pytest.approx(shift * spacing[0])
    assert m["hd_mm"] == pytest.approx(hd, abs=1e-12)
    assert m["assd_mm"] == pytest.approx(assd, abs=1e-12)
    assert m["masd_mm"] == pytest.approx(assd, abs=1e-12)
    assert m["dsc"] == pytest.approx(2 * (n - shift) / (2 * n))


# --- brute force and surface-distance --------------------------------------------------------------


def _brute_force(pred, ref, spacing, percentile=95, tol=1.0):
    """All-pairs distances (cdist) between surfel corners found by an explicit 8-neighbour scan."""
    table = lookup_tables.create_table_neighbour_code_to_surface_area(spacing)

    def surfels(mask):
        padded = np.pad(mask, 1)
        pts, areas = [], []
        shape = np.array(mask.shape) + 1
        for g in np.ndindex(*shape):
            code = 0
            for o0 in (0, 1):
                for o1 in (0, 1):
                    for o2 in (0, 1):
                        if padded[g[0] + o0, g[1] + o1, g[2] + o2]:
                            code |= 1 << (4 * (1 - o0) + 2 * (1 - o1) + (1 - o2))
            if code not in (0, 255):
                pts.append(g)
                areas.append(table[code])
        return np.array(pts, float) * spacing, np.array(areas)

    pp, ap = surfels(pred)
    pr, ar = surfels(ref)
    dist = cdist(pp, pr)
    d_pr, d_rp = dist.min(axis=1), dist.min(axis=0)

    def pct(d, a):
        order = np.lexsort((a, d))
        cum = np.cumsum(a[order]) / a.sum()
        return d[order][min(np.searchsorted(cum, percentile / 100), len(d) - 1)]

    return {
        "hd_mm": max(d_pr.max(), d_rp.max()),
        "hd95_mm": max(pct(d_pr, ap), pct(d_rp, ar)),
        "assd_mm": (np.sum(d_pr * ap) + np.sum(d_rp * ar)) / (ap.sum() + ar.sum()),
        "masd_mm": 0.5 * (np.sum(d_pr * ap) / ap.sum() + np.sum(d_rp * ar) / ar.sum()),
        "nsd": (ap[d_pr <= tol].sum() + ar[d_rp <= tol].sum()) / (ap.sum() + ar.sum()),
    }


@pytest.mark.parametrize("seed", range(4))
def test_brute_force_all_pairs(seed, nn_stage):
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(5, 10, 3))
    spacing = tuple(float(s) for s in rng.uniform(0.4, 2.5, 3))
    pred, ref = _blob(rng, shape, 1.0), _blob(rng, shape, 1.0)
    if not (pred.any() and ref.any()):
        pytest.skip("random masks came out empty")
    expected = _brute_force(pred, ref, np.array(spacing))
    got = compute_metrics(pred, ref, spacing)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def _surface_distance_metrics(pred, ref, spacing, percentile=95, tol=1.0):
    sd = surface_distance.compute_surface_distances(ref, pred, spacing)
    gt_to_pred, pred_to_gt = surface_distance.compute_average_surface_distance(sd)
    a_gt, a_pred = sd["surfel_areas_gt"], sd["surfel_areas_pred"]
    return {
        "dsc": surface_distance.compute_dice_coefficient(ref, pred),
        "hd_mm": surface_distance.compute_robust_hausdorff(sd, 100),
        "hd95_mm": surface_distance.compute_robust_hausdorff(sd, percentile),
        "masd_mm": 0.5 * (gt_to_pred + pred_to_gt),
        "assd_mm": (np.sum(sd["distances_gt_to_pred"] * a_gt) + np.sum(sd["distances_pred_to_gt"] * a_pred))
        / (a_gt.sum() + a_pred.sum()),
        "nsd": surface_distance.compute_surface_dice_at_tolerance(sd, tol),
    }


@pytest.mark.parametrize("seed", range(12))
def test_matches_surface_distance_random_blobs(seed, nn_stage):
    rng = np.random.default_rng(100 + seed)
    shape = tuple(int(s) for s in rng.integers(6, 40, 3))
    spacing = tuple(float(s) for s in rng.uniform(0.3, 3.0, 3))
    pred, ref = _blob(rng, shape), _blob(rng, shape)
    if not (pred.any() and ref.any()):
        pytest.skip("random masks came out empty")
    percentile = float(rng.choice([50, 90, 95, 99]))
    tol = float(rng.uniform(0.5, 3.0))
    expected = _surface_distance_metrics(pred, ref, spacing, percentile, tol)
    got = compute_metrics(pred, ref, spacing, percentile=percentile, nsd_tolerance_mm=tol)
    for key, value in expected.items():
        assert abs(got[key] - value) <= 1e-6, (key, got[key], value)


def test_matches_surface_distance_far_island_and_border(nn_stage):
    # Masks touching the array border (outside = background) and a far false-positive island.
    spacing = (0.7, 0.7, 2.5)
    ref = np.zeros((60, 50, 20), bool)
    ref[0:20, 10:30, 0:8] = True
    pred = np.roll(ref, (2, -1, 1), axis=(0, 1, 2))
    pred[55:58, 45:48, 17:19] = True
    expected = _surface_distance_metrics(pred, ref, spacing)
    got = compute_metrics(pred, ref, spacing)
    for key, value in expected.items():
        assert abs(got[key] - value) <= 1e-6, key


def test_large_surface_with_island_default_stages_and_capped_grid(monkeypatch):
    # Large enough for the lattice stage by default (> 4096 elements), with a far island whose
    # elements fall back to the KD-tree; then the same with the occupancy grid disallowed.
    spacing = (0.7, 0.7, 2.5)
    rng = np.random.default_rng(5)
    ref = _blob(rng, (70, 64, 24), sigma=3.0)
    pred = np.roll(ref, (2, -1, 1), axis=(0, 1, 2)) ^ (rng.random(ref.shape) > 0.995)
    pred[2:5, 58:62, 20:23] = True
    assert surface_mod.extract_surface(ref, spacing).corners.shape[0] > surface_mod._MIN_QUERIES_FOR_LATTICE
    expected = _surface_distance_metrics(pred, ref, spacing)
    got = compute_metrics(pred, ref, spacing)
    monkeypatch.setattr(surface_mod, "_MAX_OCCUPANCY_CORNERS", 0)
    capped = compute_metrics(pred, ref, spacing)
    for key, value in expected.items():
        assert abs(got[key] - value) <= 1e-6, key
        assert abs(capped[key] - value) <= 1e-6, key


@pytest.mark.parametrize("order", ["C", "F"])
def test_bounding_box_matches_argwhere(order):
    rng = np.random.default_rng(11)
    for shape in [(5, 6, 7), (8, 4, 4), (3, 3, 8)]:
        for _ in range(20):
            mask = np.asarray(rng.random(shape) > 0.95, order=order)
            box = surface_mod.bounding_box(mask)
            idx = np.argwhere(mask)
            if idx.size == 0:
                assert box is None
            else:
                np.testing.assert_array_equal(box[0], idx.min(axis=0))
                np.testing.assert_array_equal(box[1], idx.max(axis=0) + 1)


def test_full_mask_has_a_surface():
    spacing = (1.0, 1.5, 2.0)
    ref = np.ones((5, 6, 7), bool)
    pred = ref.copy()
    pred[0] = False
    expected = _surface_distance_metrics(pred, ref, spacing)
    got = compute_metrics(pred, ref, spacing)
    for key, value in expected.items():
        assert abs(got[key] - value) <= 1e-6, key
    assert got["hd_mm"] == pytest.approx(1.0)


def test_area_table_equals_surface_distance_table():
    for spacing in [(1, 1, 1), (0.7, 0.7, 2.5), (0.31, 1.7, 2.9)]:
        np.testing.assert_array_equal(
            surface_mod.surfel_area_table(spacing), lookup_tables.create_table_neighbour_code_to_surface_area(spacing)
        )


def test_corrupt_area_table_is_refused(monkeypatch):
    monkeypatch.setattr(surface_mod, "_AREA_VECTORS_EIGHTHS", ("111,", "222"))
    with pytest.raises(RuntimeError, match="2 codes instead of 256"):
        surface_mod._parse_area_vectors()


# --- invariances and options -------------------------------------------------------------------------


def test_axis_order_and_threads_do_not_change_values():
    rng = np.random.default_rng(7)
    pred, ref = _blob(rng, (20, 16, 12)), _blob(rng, (20, 16, 12))
    spacing = (0.8, 1.1, 3.0)
    base = compute_metrics(pred, ref, spacing)
    perm = (2, 0, 1)
    moved = compute_metrics(pred.transpose(perm), ref.transpose(perm), tuple(spacing[p] for p in perm))
    single = compute_metrics(pred, ref, spacing, workers=1)
    for key in METRIC_KEYS:
        assert moved[key] == pytest.approx(base[key], abs=1e-9, nan_ok=True), key
        assert single[key] == base[key] or (math.isnan(single[key]) and math.isnan(base[key]))


def test_uint8_input_and_hausdorff_helper():
    rng = np.random.default_rng(3)
    pred, ref = _blob(rng, (15, 15, 10)), _blob(rng, (15, 15, 10))
    spacing = (1.0, 1.0, 2.0)
    m = compute_metrics(pred.astype(np.uint8), ref.astype(np.uint8), spacing)
    assert m == compute_metrics(pred, ref, spacing)
    assert hausdorff_distance(pred, ref, spacing) == m["hd_mm"]
    assert hausdorff_distance(pred, ref, spacing, percentile=95) == m["hd95_mm"]


def test_dice_and_jaccard_counts():
    a = np.array([[1, 1, 0, 0]], bool)
    b = np.array([[1, 0, 1, 0]], bool)
    assert dice(a, b) == pytest.approx(0.5)
    assert jaccard(a, b) == pytest.approx(1 / 3)
    assert math.isnan(dice(np.zeros(3), np.zeros(3)))
    assert math.isnan(jaccard(np.zeros(3), np.zeros(3)))
    assert dice(np.ones(3), np.zeros(3)) == 0.0


# --- empty masks --------------------------------------------------------------------------------------


def test_both_empty_is_nan_and_never_raises():
    z = np.zeros((8, 8, 8), bool)
    m = compute_metrics(z, z, (1.0, 1.0, 1.0))
    for key in ("dsc", "jaccard", "nsd", "rvd") + DISTANCE_KEYS:
        assert math.isnan(m[key]), key
    assert m["vol_pred_ml"] == 0.0 and m["vol_ref_ml"] == 0.0


@pytest.mark.parametrize("empty", ["pred", "ref"])
def test_one_empty_is_zero_dice_and_inf_distances(empty):
    z = np.zeros((8, 8, 8), bool)
    full = z.copy()
    full[2:5, 2:5, 2:5] = True
    pred, ref = (z, full) if empty == "pred" else (full, z)
    m = compute_metrics(pred, ref, (0.5, 0.5, 2.0))
    assert m["dsc"] == 0.0 and m["jaccard"] == 0.0 and m["nsd"] == 0.0
    for key in DISTANCE_KEYS:
        assert m[key] == math.inf, key
    if empty == "pred":
        assert m["rvd"] == -1.0
    else:
        assert math.isnan(m["rvd"])
    assert hausdorff_distance(pred, ref, (0.5, 0.5, 2.0)) == math.inf


def test_image_diagonal():
    assert image_diagonal_mm((3, 4, 0), (1.0, 1.0, 5.0)) == pytest.approx(5.0)


# --- bad input ----------------------------------------------------------------------------------------


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"same shape, found \(2, 2, 2\) and \(2, 2, 3\)"):
        compute_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), (1, 1, 1))
    with pytest.raises(ValueError, match="same shape"):
        dice(np.zeros(3), np.zeros(4))


def test_non_3d_and_bad_spacing_raise():
    with pytest.raises(ValueError, match="need 3D masks"):
        compute_metrics(np.zeros((4, 4)), np.zeros((4, 4)), (1, 1, 1))
    with pytest.raises(ValueError, match="3 positive finite numbers"):
        compute_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 0, 1))
    with pytest.raises(ValueError, match="3 positive finite numbers"):
        compute_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 1))


def test_importing_eval_does_not_import_tensorflow():
    code = "import sys, medseg.eval, medseg.eval.evaluate; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"
