"""The segment widget: a model bundle (run folder) applied to an image layer in a napari worker.

A napari worker thread drives the run; :meth:`medseg.infer.Predictor.segment` itself runs in a
child process (:mod:`medseg.napari.predict_process`: TensorFlow must not load next to the
viewer's OpenGL). Its :class:`~medseg.events.ChunkProgress` events reach the progress bar through
a queued Qt signal, so the viewer keeps answering. Cancel sets the run's
:class:`~medseg.events.CancelToken` (checked between batches of slices). The result is added as one Labels layer only when the run
succeeded: an error (modality, a modified or corrupt model, out of memory) or a cancel is a
notification and adds nothing. The state later tools build on stays public:
:attr:`SegmentWidget.bundle_path`, :attr:`SegmentWidget.image_layer`,
:attr:`SegmentWidget.result_layer`, :attr:`SegmentWidget.process` (the child running the Predictor).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QLineEdit,
                            QProgressBar, QPushButton, QVBoxLayout, QWidget)

from medseg.napari.geometry import LayerGeometry, volume_of_layer
from medseg.napari.predict_process import PredictorProcess
from medseg.napari.reader import error_text

__all__ = ["SegmentWidget", "SegmentResult", "image_volume"]


def image_volume(layer):
    """The medseg Volume of an image layer the medseg reader made (its scan's grid and meta).

    Raises:
        InputError: the layer carries no medseg geometry (read by another plugin or made in
            Python), is not 3D, or was moved off its scan's grid.
    """
    from medseg.errors import InputError
    from medseg.napari.writer import _layer_meta, world_affine_of

    geometry = LayerGeometry.from_metadata(layer.metadata)
    if geometry is None:
        raise InputError(None, f"an image layer read by medseg (image layer {layer.name!r})",
                         "a layer without its scan's geometry", "open the scan with the medseg reader")
    info = layer.metadata["medseg"]
    return volume_of_layer(layer.data, world_affine_of(_layer_meta(layer)), geometry, name=layer.name,
                           case_id=str(info.get("case_id") or layer.name), meta=dict(info.get("volume_meta") or {}))


@dataclass
class SegmentResult:
    """What a run gave: the label Volume, ``classes`` {id: name}, ``volumes_ml`` {name: mL},
    ``seconds`` (segmentation only), ``warning`` (a modality mismatch), or ``error`` (one line;
    ``cancelled`` when the user stopped it)."""

    labels: Any = None
    classes: dict = field(default_factory=dict)
    volumes_ml: dict = field(default_factory=dict)
    seconds: float = 0.0
    warning: str | None = None
    error: str | None = None
    cancelled: bool = False


class _Relay(QObject):
    """Carries progress from the worker thread to the GUI thread (queued connection)."""

    progress = Signal(int, int)


class SegmentWidget(QWidget):
    """Pick a run folder and an image layer, segment, see each class's volume."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        #: The run folder chosen (holding bundle.json and model.keras); None before one is chosen.
        self.bundle_path: Path | None = None
        #: The Labels layer of the last successful run.
        self.result_layer = None
        #: The last run's outcome (:class:`SegmentResult`).
        self.last_result: SegmentResult | None = None
        self.worker = None
        #: The child process that runs the Predictor (kept between runs: the model stays loaded).
        self.process = PredictorProcess.shared()
        self._relay = _Relay()
        self._relay.progress.connect(self._on_progress)
        self._build()
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._refresh_layers()

    # --- layout -------------------------------------------------------------------------------
    def _build(self) -> None:
        self.bundle_edit, row = bundle_picker(self, "run folder with bundle.json")
        self.image_combo = QComboBox()
        self.tta_check = QCheckBox("test-time flips (TTA)")
        self.tta_check.setEnabled(False)
        self.post_check = QCheckBox("bundle's post-processing")
        self.post_check.setChecked(True)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.segment_button = QPushButton("Segment")
        self.segment_button.clicked.connect(self.segment)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        buttons.addWidget(self.segment_button)
        buttons.addWidget(self.cancel_button)
        self.status = QLabel("choose a run folder")
        self.status.setWordWrap(True)
        form = QFormLayout()
        form.addRow("model", row)
        form.addRow("image", self.image_combo)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.tta_check)
        layout.addWidget(self.post_check)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addStretch(1)

    def _image_layers(self) -> list:
        from napari.layers import Image

        return [layer for layer in self.viewer.layers if isinstance(layer, Image)]

    def _refresh_layers(self, *_) -> None:
        current = self.image_combo.currentText()
        names = [layer.name for layer in self._image_layers()]
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current in names:
            self.image_combo.setCurrentText(current)

    # --- state --------------------------------------------------------------------------------
    @property
    def image_layer(self):
        """The image layer chosen (None when the viewer holds none)."""
        name = self.image_combo.currentText()
        return next((layer for layer in self._image_layers() if layer.name == name), None)

    @image_layer.setter
    def image_layer(self, layer) -> None:
        self._refresh_layers()
        self.image_combo.setCurrentText(layer.name)

    @property
    def running(self) -> bool:
        return self.worker is not None

    def set_bundle(self, path) -> bool:
        """Choose the run folder ``path``; its ``bundle.json`` is checked at once (one line on
        failure) and TTA offered when its model saw flips or turns. Returns whether it was taken."""
        from napari.utils.notifications import show_error

        from medseg.errors import MedsegError
        from medseg.infer.bundle import read_bundle_contract

        text = str(path).strip()
        if not text:
            return False
        try:
            run_dir, contract = read_bundle_contract(text)
        except (MedsegError, OSError, ValueError) as exc:
            show_error(error_text(exc))
            self.status.setText(error_text(exc))
            return False
        self.bundle_path = Path(run_dir)
        self.bundle_edit.setText(str(run_dir))
        self.tta_check.setEnabled(_tta_allowed(self.bundle_path))
        self.tta_check.setToolTip("" if self.tta_check.isEnabled() else "this model saw no flips or turns in training")
        if not self.tta_check.isEnabled():
            self.tta_check.setChecked(False)
        names = ", ".join(c for c in contract.classes if c != "background")
        self.status.setText(f"model {self.bundle_path.name}: {names}")
        self._preload()
        return True

    def _preload(self) -> None:
        """Load the model in the child now, so the first run does not wait for it (a failure
        is reported by the run itself)."""
        from napari.qt.threading import create_worker

        worker = create_worker(self.process.load, self.bundle_path, self.tta_check.isChecked(), _start_thread=False)
        worker.start()

    # --- running ------------------------------------------------------------------------------
    def segment(self):
        """Start segmenting the chosen image with the chosen bundle; returns the worker (None
        when refused: no bundle, no image layer, a run already going; each says why)."""
        from napari.qt.threading import create_worker
        from napari.utils.notifications import show_error

        if self.running:
            return None
        problem = None if self.bundle_path is not None else "medseg: choose a model run folder first"
        layer = self.image_layer
        if problem is None and layer is None:
            problem = "medseg: open a scan (an image layer) first"
        volume = None
        if problem is None:
            try:
                volume = image_volume(layer)
            except Exception as exc:  # one line, never a traceback
                problem = error_text(exc)
        if problem is not None:
            show_error(problem)
            self.status.setText(problem)
            return None
        settings = (self.bundle_path, self.tta_check.isChecked(), self.post_check.isChecked())
        self.worker = create_worker(self._run, volume, *settings, _start_thread=False)
        self.worker.returned.connect(lambda result, name=layer.name: self._finish(result, name))
        self.segment_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress.setRange(0, 0)  # busy until the first chunk announces the total
        self.status.setText(f"segmenting {layer.name}...")
        self.worker.start()
        return self.worker

    def cancel(self) -> None:
        """Stop the run at its next batch of slices (nothing is added)."""
        if self.running:
            self.process.cancel()
            self.status.setText("cancelling...")

    def _run(self, volume, run_dir: Path, tta: bool, post: bool) -> SegmentResult:
        """Worker thread: the child segments; every failure becomes ``result.error`` (one line)."""
        from medseg.napari.layers import volume_ml_per_class

        answer = self.process.segment(volume, str(run_dir), tta, post, self._relay.progress.emit)
        if answer[0] == "cancelled":
            return SegmentResult(error="medseg: segmentation cancelled", cancelled=True)
        if answer[0] != "done":
            return SegmentResult(error=answer[1])
        out = answer[1]
        labels = volume.with_array(out["array"])
        classes = out["classes"]
        return SegmentResult(labels, classes, volume_ml_per_class(labels.array, labels.voxel_volume_ml, classes),
                             out["seconds"], out["warning"])

    def _on_progress(self, done: int, total: int) -> None:
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(done)

    def _finish(self, result: SegmentResult, image_name: str) -> None:
        from napari.utils.notifications import show_error, show_info, show_warning

        self.worker = None
        self.last_result = result
        self.segment_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.progress.setRange(0, 1)
        self.progress.setValue(0 if result.error else 1)
        if result.error:
            (show_info if result.cancelled else show_error)(result.error)
            self.status.setText(result.error)
            return
        if result.warning:
            show_warning(f"medseg: {result.warning}")
        self.result_layer = self._add_result(result, image_name)
        text = ", ".join(f"{name} {ml:.1f} mL" for name, ml in result.volumes_ml.items())
        self.status.setText(f"{self.result_layer.name}: {text} ({result.seconds:.1f} s)")

    def _add_result(self, result: SegmentResult, image_name: str):
        from napari.layers import Layer

        from medseg.napari.layers import label_layer

        data, kwargs, kind = label_layer(result.labels, f"{image_name} medseg", result.classes,
                                         bundle=str(self.bundle_path), volumes_ml=result.volumes_ml)
        return self.viewer.add_layer(Layer.create(data, kwargs, kind))


def _tta_allowed(run_dir: Path) -> bool:
    """Whether the bundle's model saw flips or turns in training (what TTA averages over), from
    ``bundle.json`` alone (no model load: the GUI thread stays free)."""
    from types import SimpleNamespace

    try:
        from medseg.infer.bundle import read_bundle_info
        from medseg.infer.contract import read_pipeline
        from medseg.infer.slices import tta_flips

        info = read_bundle_info(run_dir)
        return len(tta_flips(SimpleNamespace(pipeline=read_pipeline(info, run_dir / "bundle.json")))) > 1
    except Exception:  # noqa: BLE001 - an unusable bundle is reported when it is run
        return False


def bundle_picker(widget, placeholder: str) -> tuple:
    """``(edit, row)``: a run-folder field and its Browse button, both handing the folder to
    ``widget.set_bundle`` (the segment and fine-tune widgets pick a bundle the same way)."""
    edit = QLineEdit()
    edit.setPlaceholderText(placeholder)
    edit.editingFinished.connect(lambda: widget.set_bundle(edit.text()))

    def browse() -> None:
        folder = QFileDialog.getExistingDirectory(widget, "medseg run folder (bundle.json)")
        if folder:
            widget.set_bundle(folder)

    button = QPushButton("Browse...")
    button.clicked.connect(browse)
    row = QHBoxLayout()
    row.addWidget(edit)
    row.addWidget(button)
    return edit, row
