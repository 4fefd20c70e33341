"""GUI tests of the correction loop (issue 25 item 3) on a virtual display: segment patient B with a
tiny bundle, paint one slice, mark another checked, fine-tune for a few seconds, compare; a
cancelled and a failing fine-tuning leave the corrections as they were.

Run by test_gui.py in a pytest process of its own (no TensorFlow next to the viewer's
OpenGL: medseg/napari/predict_process.py); the TensorFlow checks run in _tf_finetune_jobs.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _geometry_checks import same_geometry, sitk_image
from conftest import PATIENT, REPO
from gui_widgets import TIMEOUT_MS, run_segmentation, segment_widget

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("display", "plugin")]

BUDGET_S = 3.0


@pytest.fixture()
def corrected(make_napari_viewer, tiny_liver_bundle, qtbot):
    """Patient B segmented by the tiny bundle, with the fine-tune widget docked: one slice painted
    (a liver blob), another marked checked. Returns (viewer, widget, prediction layer, painted, checked)."""
    from medseg.napari.finetune import FineTuneWidget

    viewer = make_napari_viewer()
    viewer.open_sample("medseg", "patient_b")
    segment = segment_widget(viewer, tiny_liver_bundle)
    widget = FineTuneWidget(viewer)
    viewer.window.add_dock_widget(widget, name="medseg fine-tune")
    run_segmentation(qtbot, segment)
    layer = segment.result_layer
    assert widget.labels_layer is layer and widget.record_of(layer).axis == 0  # the model's axial slices
    n = layer.data.shape[0]
    painted, checked = n // 2, n // 4
    layer.brush_size = 9
    layer.paint((painted, layer.data.shape[1] // 2, layer.data.shape[2] // 2), 5)
    viewer.dims.set_point(0, layer.data_to_world((checked, 0, 0))[0])
    assert widget.current_slice() == checked and widget.toggle_checked() == checked
    assert widget.mark_button.text() == "Unmark this slice"
    assert widget.record_of(layer).painted == {painted} and widget.record_of(layer).checked == {checked}
    assert widget.labelled_slices() == sorted([painted, checked])
    widget.budget_spin.setValue(BUDGET_S)
    widget.train_settings = {"workers": 1}
    return viewer, widget, layer, painted, checked


def _run(qtbot, widget):
    assert widget.fine_tune() is not None
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)
    return widget.last_result


def _tf_job(*args) -> dict:
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("_tf_finetune_jobs.py")), *map(str, args)],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_correct_mark_finetune_compare(qtbot, corrected, tiny_liver_bundle):
    import SimpleITK as sitk

    viewer, widget, layer, painted, checked = corrected
    data_before, record_before = np.array(layer.data, copy=True), widget.record_of(layer).snapshot()
    before = len(viewer.layers)
    steps: list = []
    widget._relay.message.connect(lambda m: steps.append(m) if m[0] == "step" else None)
    result = _run(qtbot, widget)
    assert result.error is None, result.error
    assert steps and all(m[1] >= 0 for m in steps)  # training progress reached the GUI
    # the new bundle names its parent by path and SHA-256 of its model, and started from its weights
    info = json.loads((result.bundle / "bundle.json").read_text())
    digest = hashlib.sha256((tiny_liver_bundle / "model.keras").read_bytes()).hexdigest()
    assert info["parent"]["sha256"] == digest and Path(info["parent"]["path"]).resolve() == tiny_liver_bundle.resolve()
    weights = _tf_job("compare", tiny_liver_bundle, result.bundle)
    assert weights["min_correlation"] > 0.9 and weights["fresh_max_correlation"] < 0.5, weights
    assert widget.bundle_path == result.bundle  # the next fine-tuning continues from it
    # the partial label it trained on: on patient B's DICOM grid, the two slices labelled, the rest ignored
    partial_file = next((result.bundle / "data" / "labels").glob("*_corrected.nii.gz"))
    written = sitk.ReadImage(str(partial_file))
    ok, why = same_geometry(written, sitk_image(PATIENT / "example_ct_dicom"))
    assert ok, why
    array = sitk.GetArrayFromImage(written)  # (z, y, x): the layer's data order for this axial series
    labelled = np.flatnonzero((array != 32767).reshape(array.shape[0], -1).all(1)).tolist()
    rows = [painted, checked]
    assert labelled == sorted(rows) and (array[rows] == data_before[rows]).all()
    assert set(np.unique(np.delete(array, [painted, checked], axis=0)).tolist()) == {32767}
    # the re-segmented scan and the changed voxels: new layers on the scan's grid
    image = viewer.layers[0]
    assert len(viewer.layers) == before + 2
    for new in (result.layer, result.changed_layer):
        assert new.data.shape == image.data.shape and np.allclose(new.affine.affine_matrix, image.affine.affine_matrix)
    new_data = np.asarray(result.layer.data)
    assert np.array_equal(np.asarray(result.changed_layer.data) != 0, new_data != data_before_prediction(layer, widget))
    liver_before = np.count_nonzero(widget._tracked[id(layer)].original == 5)
    row = result.difference.rows[0]
    assert row["class"] == "liver" and row["voxels_before"] == liver_before
    assert row["voxels_after"] == np.count_nonzero(new_data == 5)
    assert widget.table.rowCount() == 1 and widget.table.item(0, 0).text() == "liver"
    assert "voxels changed" in widget.status.text()
    # nothing the user painted was touched
    assert np.array_equal(np.asarray(layer.data), data_before) and widget.record_of(layer).snapshot() == record_before


def data_before_prediction(layer, widget) -> np.ndarray:
    """The prediction as the segment widget made it (before the paint)."""
    return widget._tracked[id(layer)].original


def _notes_since(start: int) -> list[str]:
    from napari.utils.notifications import notification_manager

    return [str(n.message) for n in notification_manager.records[start:]]


def _record_count() -> int:
    from napari.utils.notifications import notification_manager

    return len(notification_manager.records)


def test_cancel_keeps_the_corrections(qtbot, corrected, tiny_liver_bundle):
    viewer, widget, layer, _, _ = corrected
    data_before, record_before = np.array(layer.data, copy=True), widget.record_of(layer).snapshot()
    before, start = len(viewer.layers), _record_count()
    widget.budget_spin.setValue(600.0)  # only the cancel ends it in time
    widget._relay.message.connect(lambda m: widget.cancel() if m[0] == "step" else None)
    result = _run(qtbot, widget)
    assert result.cancelled and "fine-tuning cancelled" in result.error
    assert result.error in _notes_since(start) and "\n" not in result.error
    assert len(viewer.layers) == before
    assert widget.bundle_path.resolve() == tiny_liver_bundle.resolve()  # not the cancelled run's bundle
    assert np.array_equal(np.asarray(layer.data), data_before) and widget.record_of(layer).snapshot() == record_before
    assert widget.finetune_button.isEnabled() and not widget.cancel_button.isEnabled()


def test_a_failing_finetune_keeps_the_corrections(qtbot, corrected, tiny_liver_bundle, tmp_path):
    viewer, widget, layer, painted, _ = corrected
    broken = tmp_path / "moved-data"
    shutil.copytree(tiny_liver_bundle, broken)
    config = json.loads((broken / "config.json").read_text())
    config["images"] = str(tmp_path / "no-such-folder")  # its training data were moved away
    (broken / "config.json").write_text(json.dumps(config))
    assert widget.set_bundle(broken)
    data_before, record_before = np.array(layer.data, copy=True), widget.record_of(layer).snapshot()
    before, start = len(viewer.layers), _record_count()
    result = _run(qtbot, widget)
    assert not result.cancelled and "training data folders that still exist" in result.error
    assert result.error in _notes_since(start) and "\n" not in result.error and "Traceback" not in result.error
    assert len(viewer.layers) == before
    assert not any(p.name.startswith("moved-data-ft") for p in tmp_path.iterdir())  # no half-made bundle
    assert np.array_equal(np.asarray(layer.data), data_before) and widget.record_of(layer).snapshot() == record_before
    # refused before anything starts: a value that names no class painted on a labelled slice
    layer.paint((painted, 3, 3), 7)
    assert widget.fine_tune() is None and "value(s) 7" in widget.status.text()
    # refused too: a model that takes its slices along another axis than the corrections were recorded on
    layer.paint((painted, 3, 3), 5)
    sagittal = tmp_path / "sagittal"
    shutil.copytree(tiny_liver_bundle, sagittal)
    info = json.loads((sagittal / "bundle.json").read_text())
    info["plan"]["slice_axis"] = 0  # RAS axis 0: R, napari world x
    (sagittal / "bundle.json").write_text(json.dumps(info))
    assert widget.set_bundle(sagittal)
    assert widget.fine_tune() is None and "takes slices along x (L, mm)" in widget.status.text()
    assert np.array_equal(np.asarray(layer.data) == 7, np.zeros(layer.data.shape, bool))
