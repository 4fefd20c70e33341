"""Cache (memory / .npy memory maps), batch maker, tf.data pipeline, folders helper, patient splits."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from medseg.data.cache import VolumeCache, open_npy_mmap
from medseg.data.pipeline import BatchMaker
from medseg.data.plan import Plan
from medseg.data.split import k_fold_splits, kfold_split, patient_groups, train_val_split
from medseg.errors import InputError
from medseg.io.volume import Volume

NRRD = Path(__file__).parent / "data" / "nrrd"
PAIRS = [{"image": NRRD / f"{c}_image.nrrd", "label": NRRD / f"{c}_label.nrrd"} for c in ("brain1", "brain2")]


@pytest.fixture(scope="module")
def plan() -> Plan:
    return Plan(modality="MR", normalization={"kind": "zscore"}, target_spacing_mm=(1.5, 1.5), patch_size=(64, 64),
                context_slices=3, lesion_fraction=0.5)


def synthetic(n_cases=3, shape=(6, 48, 40)):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n_cases):
        img = rng.random(shape, dtype=np.float32)
        lab = np.zeros(shape, np.uint8)
        if i:  # case 0 has no lesion
            lab[2, 10:14, 10:14] = 1
        out.append((f"p{i}", img, lab))
    return out


# --- cache -----------------------------------------------------------------------------------
def test_cache_memory_and_disk_give_same_arrays(plan, tmp_path):
    mem = VolumeCache(PAIRS, plan, mode="memory")
    disk = VolumeCache(PAIRS, plan, mode="disk", cache_dir=tmp_path)
    assert mem.on_disk == [False, False] and disk.on_disk == [True, True]
    assert mem.case_ids == disk.case_ids == ["brain1_image", "brain2_image"]
    # 256 px of 0.78125 mm at 1.5 mm -> round(133.3) = 133 px; 25 and 23 slices.
    assert [s.image.shape for s in mem.sources] == [(25, 133, 133), (23, 133, 133)]
    for a, b in zip(mem.sources, disk.sources):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)
        np.testing.assert_array_equal(a.index.coords, b.index.coords)
        assert a.pad_value == b.pad_value == pytest.approx(float(a.image.min()))
    assert mem.sources[0].index.n_components == 2 and mem.sources[1].index.n_components == 1
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 6 and not [f for f in files if f.startswith(".")]  # no temp files left
    # A second cache with the same plan reuses the files; a changed plan writes new ones.
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = VolumeCache(PAIRS, plan, mode="disk", cache_dir=tmp_path)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == mtimes
    np.testing.assert_array_equal(again.sources[0].image, mem.sources[0].image)
    VolumeCache(PAIRS[:1], plan.replace(target_spacing_mm=(2.0, 2.0)), mode="disk", cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 9
    # Released pages are re-read from the file on the next touch.
    disk.release_pages()
    np.testing.assert_array_equal(disk.sources[1].image, mem.sources[1].image)


def test_cache_auto_spills_to_disk(plan):
    # Estimates at 5 bytes per raw voxel: brain1 8.2 MB fits in 9 MB and takes 2.2 MB once resampled;
    # brain2 (7.2 MB raw) would pass the budget, so it goes to disk.
    cache = VolumeCache(PAIRS, plan, mode="auto", memory_limit_mb=9)
    assert cache.on_disk == [False, True]
    assert cache.cache_dir is not None and "1 on disk" in repr(cache)
    roomy = VolumeCache(PAIRS, plan, mode="auto", memory_limit_mb=10_000)
    assert roomy.on_disk == [False, False] and roomy.memory_mb > 0


def test_cache_errors(plan, tmp_path):
    image = Volume(np.zeros((4, 4, 4), np.float32), np.eye(4), "a")
    with pytest.raises(ValueError, match="cache mode must be one of"):
        VolumeCache([], plan, mode="ram")
    with pytest.raises(ValueError, match="at least one case"):
        VolumeCache([], plan)
    with pytest.raises(ValueError, match="a: training cases need a label"):
        VolumeCache([image], plan)
    other = Volume(np.zeros((4, 4, 4), np.uint8), np.diag([2.0, 1, 1, 1]), "a")
    with pytest.raises(InputError, match="a label on the image's grid"):
        VolumeCache([(image, other)], plan)
    with pytest.raises(ValueError, match="must be equal 3D shapes"):
        VolumeCache.from_arrays([("x", np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))], plan)
    with pytest.raises(ValueError, match="from_arrays mode must be"):
        VolumeCache.from_arrays([], plan, mode="auto")
    with pytest.raises(ValueError, match="at least one case"):
        VolumeCache.from_arrays([], plan)
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not a numpy file")
    with pytest.raises(InputError, match="an invalid header"):
        open_npy_mmap(bad)
    np.save(tmp_path / "f.npy", np.asfortranarray(np.zeros((3, 4))))
    with pytest.raises(InputError, match="Fortran-ordered"):
        open_npy_mmap(tmp_path / "f.npy")


# --- batches ---------------------------------------------------------------------------------
def test_batch_maker_shapes_determinism_fraction(plan):
    cache = VolumeCache.from_arrays(synthetic(), plan)
    maker = BatchMaker(cache, plan, batch_size=6, seed=3)
    images, masks = maker.batch(0)
    assert images.shape == (6, 64, 64, 3) and images.dtype == np.float32
    assert masks.shape == (6, 64, 64) and masks.dtype == np.int32 and set(np.unique(masks)) <= {0, 1}
    assert maker.last_params["centres"]["lesion"] == [True] * 3 + [False] * 3
    assert all(c != 0 for c in maker.last_params["centres"]["case"][:3])  # never the lesion-free case
    again = BatchMaker(cache, plan, batch_size=6, seed=3)
    for i in (0, 5):
        np.testing.assert_array_equal(again.batch(i)[0], maker.batch(i)[0])
    assert not np.array_equal(maker.batch(1)[0], maker.batch(0)[0])
    plain = BatchMaker(cache, plan, batch_size=4, augment=False, lesion_fraction=1.0)
    _, m = plain.batch(0)
    assert m.reshape(4, -1).any(1).all()
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        BatchMaker(cache, plan, batch_size=0)
    with pytest.raises(TypeError, match="augment must be True/False"):
        BatchMaker(cache, plan, augment="yes")


def test_disk_cache_batches_equal_memory_batches(plan, tmp_path):
    arrays = synthetic()
    mem = BatchMaker(VolumeCache.from_arrays(arrays, plan), plan, batch_size=4, seed=1)
    disk_cache = VolumeCache.from_arrays(arrays, plan, mode="disk", cache_dir=tmp_path)
    disk = BatchMaker(disk_cache, plan, batch_size=4, seed=1)
    assert not mem.release_pages and disk.release_pages
    released = []
    original = disk_cache.release_slices
    disk_cache.release_slices = lambda *args: (released.append(args), original(*args))
    for i in range(3):
        released.clear()
        np.testing.assert_array_equal(mem.batch(i)[0], disk.batch(i)[0])
        # Each patch's slices (with their 2.5D neighbours, clamped) were handed back.
        c = disk.last_params["centres"]
        assert released == [(case, max(0, s - 1), min(5, s + 1)) for case, s in zip(c["case"], c["slice"])]
    disk_cache.release_pages()  # everything at once also works, and data read back unchanged
    np.testing.assert_array_equal(mem.batch(0)[0], disk.batch(0)[0])


@pytest.mark.slow
def test_tf_dataset_and_folders_helper(plan, tmp_path):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from medseg.data.pipeline import dataset_from_folders, make_dataset

    cache = VolumeCache.from_arrays(synthetic(), plan)
    ds = make_dataset(cache, plan, batch_size=4, seed=7, start_batch=2, num_batches=3, num_parallel_calls=2)
    assert ds.element_spec[0].shape == (4, 64, 64, 3) and ds.element_spec[0].dtype == tf.float32
    assert ds.element_spec[1].shape == (4, 64, 64) and ds.element_spec[1].dtype == tf.int32
    got = [(x.numpy(), y.numpy()) for x, y in ds]
    assert len(got) == 3
    ref = BatchMaker(cache, plan, batch_size=4, seed=7)
    for i, (x, y) in enumerate(got):  # same batches as the numpy maker, in order, whatever the parallelism
        rx, ry = ref.batch(2 + i)
        np.testing.assert_array_equal(x, rx)
        np.testing.assert_array_equal(y, ry)
    # Folders -> dataset in one call (the README example).
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for c in ("brain1", "brain2"):
        (images / f"{c}.nrrd").symlink_to(NRRD / f"{c}_image.nrrd")
        (labels / f"{c}.nrrd").symlink_to(NRRD / f"{c}_label.nrrd")
    ds, fitted = dataset_from_folders(images, labels, batch_size=2, plan_overrides={"patch_size": (32, 32)},
                                      num_batches=2)
    assert fitted.modality == "MR" and fitted.patch_size == (32, 32)
    x, y = next(iter(ds))
    assert x.shape == (2, 32, 32, 1) and y.shape == (2, 32, 32) and y.dtype == tf.int32
    assert int(tf.reduce_max(y)) == 1  # half the batch is lesion-centred


# --- splits ----------------------------------------------------------------------------------
def test_train_val_split_patient_level():
    ids = [f"pat{p:02d}_{s}" for p in range(10) for s in ("t1", "t2")]
    train, val = train_val_split(ids, 0.3, seed=1, patient_of=r"^(pat\d+)_")
    patients = lambda items: {i.split("_")[0] for i in items}  # noqa: E731
    assert not patients(train) & patients(val)
    assert len(patients(val)) == 3 and len(train) + len(val) == 20
    assert train_val_split(ids, 0.3, seed=1, patient_of=r"^(pat\d+)_") == (train, val)  # deterministic
    assert train_val_split(list(reversed(ids)), 0.3, seed=1, patient_of=r"^(pat\d+)_")[1] == sorted(
        val, key=lambda i: -ids.index(i))  # the same patients whatever the input order
    tiny_train, tiny_val = train_val_split(["a", "b"], 0.01)
    assert len(tiny_train) == 1 and len(tiny_val) == 1


def test_k_fold_patient_level():
    ids = [f"p{p}_{s}" for p in range(7) for s in range(2)]
    folds = k_fold_splits(ids, 3, seed=0, patient_of=lambda i: i.split("_")[0])
    assert len(folds) == 3
    seen = []
    for train, val in folds:
        assert not {i.split("_")[0] for i in train} & {i.split("_")[0] for i in val}
        assert sorted(train + val) == sorted(ids)
        seen += val
    assert sorted(seen) == sorted(ids)  # each case validated exactly once
    assert sorted(len({i.split("_")[0] for i in v}) for _, v in folds) == [2, 2, 3]
    assert kfold_split(ids, 3, 1, patient_of=lambda i: i.split("_")[0]) == folds[1]


def test_split_errors():
    with pytest.raises(ValueError, match="val_fraction must lie strictly between 0 and 1"):
        train_val_split(["a", "b"], 1.0)
    with pytest.raises(ValueError, match="needs at least 2 patients, found 1"):
        train_val_split(["a_1", "a_2"], 0.5, patient_of=r"^(a)")
    with pytest.raises(ValueError, match="k must be an integer >= 2"):
        k_fold_splits(["a", "b"], 1)
    with pytest.raises(ValueError, match="3 folds need at least 3 patients, found 2"):
        k_fold_splits(["a", "b"], 3)
    with pytest.raises(ValueError, match=r"fold must be an integer in \[0, 2\)"):
        kfold_split(["a", "b"], 2, 2)
    with pytest.raises(ValueError, match="case 'a' is listed twice"):
        patient_groups(["a", "a"])
    with pytest.raises(ValueError, match="does not match case id 'zz'"):
        patient_groups(["zz"], r"^p(\d+)")


def test_folders_without_labels_rejected(tmp_path):
    from medseg.data.pipeline import dataset_from_folders
    from medseg.errors import DatasetError

    images = tmp_path / "images"
    images.mkdir()
    (images / "brain1.nrrd").symlink_to(NRRD / "brain1_image.nrrd")
    with pytest.raises(DatasetError, match="no labelled cases found in"):
        dataset_from_folders(images)
