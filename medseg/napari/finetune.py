"""The fine-tune widget: correct a prediction, mark slices checked, fine-tune, compare.

The loop of issue 25: the user paints corrections on a predicted Labels layer (the segment
widget's), or marks a slice as right with one click; those slices become the labelled part of a
partial label map, every other voxel the ignore value (:mod:`medseg.napari.corrections`).
**Fine-tune** retrains the layer's bundle on the training data it names plus this scan (the image
layer's Volume and the partial label on the scan's grid, through the writer's
:func:`~medseg.napari.writer.labels_volume`) for the chosen budget, in a child process
(:mod:`medseg.napari.finetune_process`) driven by a napari worker, with progress and Cancel; then
adds the scan segmented by the new bundle and a layer of the voxels that changed, with each
class's volume before and after. The corrected layer and the slice record are never modified by
a run: a cancel or a failure is a notification and leaves them as they were.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (QComboBox, QDoubleSpinBox, QFormLayout, QHBoxLayout, QLabel, QProgressBar, QPushButton,
                            QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from medseg.napari.corrections import SliceRecord, changed_slices, slice_axis_of_bundle, slices_of_paint
from medseg.napari.geometry import GEOMETRY_KEY, WORLD_AXES, LayerGeometry
from medseg.napari.reader import error_text

__all__ = ["FineTuneWidget", "FineTuneResult", "CHANGE_CLASSES"]

#: Values of the difference layer (:func:`medseg.napari.corrections.difference`).
CHANGE_CLASSES = {1: "gained a class", 2: "became background", 3: "another class"}
#: Training settings a fine-tuning run takes from its parent's ``config.json`` (the patches the
#: model was trained on; the library's defaults may differ).
_PARENT_SETTINGS = ("patch_size", "batch_size")


@dataclass
class FineTuneResult:
    """A run's outcome: ``bundle`` (the new run folder), ``layer`` / ``changed_layer`` (added),
    ``difference`` (:class:`~medseg.napari.corrections.Difference`), or ``error`` (one line;
    ``cancelled`` when the user stopped it)."""

    bundle: Path | None = None
    layer: object = None
    changed_layer: object = None
    difference: object = None
    error: str | None = None
    cancelled: bool = False


class _Relay(QObject):
    """Carries the child's messages from the worker thread to the GUI thread (queued)."""

    message = Signal(object)


class _Tracked:
    """A Labels layer followed since the widget saw it: its slice record and original data."""

    def __init__(self, layer, axis: int, on_paint=lambda: None):
        self.layer = layer
        self._on_change = on_paint
        self.record = SliceRecord(axis)
        self.original = np.array(layer.data, copy=True)
        for item in list(getattr(layer, "_undo_history", [])):  # painted before the widget opened
            self.record.painted |= slices_of_paint(item, axis)
        layer.events.paint.connect(self._on_paint)

    def _on_paint(self, event) -> None:
        self.record.painted |= slices_of_paint(event.value, self.record.axis)
        self._on_change()

    def labelled(self) -> list[int]:
        """Painted (events, or any difference from the original data) and checked slices."""
        found = changed_slices(np.asarray(self.layer.data), self.original, self.record.axis)
        return sorted(set(self.record.labelled()) | found)


class FineTuneWidget(QWidget):
    """Corrected labels + model -> mark slices -> Fine-tune (budget, progress, Cancel) -> compare."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        #: The run folder to fine-tune (default: the chosen layer's bundle); after a run, the new one.
        self.bundle_path: Path | None = None
        #: Further training settings passed to :func:`medseg.train.finetune.finetune`.
        self.train_settings: dict = {}
        self.last_result: FineTuneResult | None = None
        self.worker = None
        self.process = None
        self._tracked: dict[int, _Tracked] = {}
        self._added: set[int] = set()  # layers this widget added (results are not selected for correcting)
        self._relay = _Relay()
        self._relay.message.connect(self._on_message)
        self._build()
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self.viewer.dims.events.point.connect(self._show_slice_state)
        self._refresh_layers()

    # --- layout -------------------------------------------------------------------------------
    def _build(self) -> None:
        from medseg.napari.segment import bundle_picker

        self.bundle_edit, row = bundle_picker(self, "run folder (default: the layer's model)")
        self.labels_combo = QComboBox()
        self.labels_combo.currentTextChanged.connect(lambda *_: self._show_labelled())
        self.budget_spin = QDoubleSpinBox()
        self.budget_spin.setRange(1.0, 24 * 3600.0)
        self.budget_spin.setDecimals(0)
        self.budget_spin.setSuffix(" s")
        self.budget_spin.setValue(60.0)
        self.mark_button = QPushButton("Mark this slice checked")
        self.mark_button.clicked.connect(self.toggle_checked)
        self.slices_label = QLabel("")
        self.slices_label.setWordWrap(True)
        self.finetune_button = QPushButton("Fine-tune")
        self.finetune_button.clicked.connect(self.fine_tune)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        buttons.addWidget(self.finetune_button)
        buttons.addWidget(self.cancel_button)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.table = QTableWidget(0, 4)
        self.table.setHorizontalHeaderLabels(["class", "before (mL)", "after (mL)", "change (mL)"])
        self.status = QLabel("paint corrections on a predicted layer, or mark slices checked")
        self.status.setWordWrap(True)
        form = QFormLayout()
        form.addRow("corrected labels", self.labels_combo)
        form.addRow("model", row)
        form.addRow("budget", self.budget_spin)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        for widget in (self.mark_button, self.slices_label):
            layout.addWidget(widget)
        layout.addLayout(buttons)
        for widget in (self.progress, self.table, self.status):
            layout.addWidget(widget)
        layout.addStretch(1)

    def _layers(self, kind: str) -> list:
        import napari.layers

        cls = getattr(napari.layers, kind)
        return [layer for layer in self.viewer.layers if isinstance(layer, cls)
                and LayerGeometry.from_metadata(layer.metadata) is not None]

    def _refresh_layers(self, *_) -> None:
        labels = self._layers("Labels")
        alive = {id(layer) for layer in labels}
        self._tracked = {k: v for k, v in self._tracked.items() if k in alive}
        current = self.labels_combo.currentText()
        for layer in labels:
            if id(layer) not in self._tracked:
                self._tracked[id(layer)] = _Tracked(layer, self._axis_for(layer), self._show_labelled)
                bundle = layer.metadata[GEOMETRY_KEY].get("bundle")
                if bundle and id(layer) not in self._added:
                    current = layer.name  # a new prediction (the segment widget's) is what gets corrected,
                    self.set_bundle(bundle)  # with the model that made it
        names = [layer.name for layer in labels]
        self.labels_combo.blockSignals(True)
        self.labels_combo.clear()
        self.labels_combo.addItems(names)
        self.labels_combo.setCurrentText(current if current in names else (names or [""])[-1])
        self.labels_combo.blockSignals(False)
        self._show_labelled()

    def _axis_for(self, layer) -> int:
        bundle = layer.metadata[GEOMETRY_KEY].get("bundle") or self.bundle_path
        return slice_axis_of_bundle(Path(bundle)) if bundle else 0

    # --- state --------------------------------------------------------------------------------
    @property
    def labels_layer(self):
        """The corrected Labels layer chosen (None when the viewer holds none)."""
        name = self.labels_combo.currentText()
        return next((t.layer for t in self._tracked.values() if t.layer.name == name), None)

    @labels_layer.setter
    def labels_layer(self, layer) -> None:
        self._refresh_layers()
        self.labels_combo.setCurrentText(layer.name)

    @property
    def running(self) -> bool:
        return self.worker is not None

    def record_of(self, layer) -> SliceRecord:
        """The slice record of ``layer`` (painted and checked slices along its slice axis)."""
        return self._tracked[id(layer)].record

    def labelled_slices(self, layer=None) -> list[int]:
        """Slices of ``layer`` (default: the chosen one) that a fine-tuning would label."""
        tracked = self._tracked.get(id(layer or self.labels_layer))
        return [] if tracked is None else tracked.labelled()

    def set_bundle(self, path) -> bool:
        """Choose the run folder to fine-tune (checked at once: one line on failure)."""
        from napari.utils.notifications import show_error

        from medseg.errors import MedsegError
        from medseg.infer.bundle import read_bundle_contract

        text = str(path).strip()
        if not text:
            self.bundle_path = None
            return False
        try:
            run_dir, _ = read_bundle_contract(text)
        except (MedsegError, OSError, ValueError) as exc:
            show_error(error_text(exc))
            self.status.setText(error_text(exc))
            return False
        self.bundle_path = Path(run_dir)
        self.bundle_edit.setText(str(run_dir))
        return True

    def _bundle_for(self, layer) -> Path | None:
        if self.bundle_path is not None:
            return self.bundle_path
        named = layer.metadata[GEOMETRY_KEY].get("bundle")
        return Path(named) if named and self.set_bundle(named) else None

    # --- checked slices -----------------------------------------------------------------------
    def current_slice(self, layer=None) -> int | None:
        """Index of the slice shown, along ``layer``'s slice axis (None when that axis is displayed)."""
        layer = layer or self.labels_layer
        if layer is None:
            return None
        axis = self.record_of(layer).axis
        if axis in self.viewer.dims.displayed:
            return None
        index = int(np.round(layer.world_to_data(self.viewer.dims.point)[axis]))
        return index if 0 <= index < layer.data.shape[axis] else None

    def toggle_checked(self) -> int | None:
        """Mark the slice shown as checked (labelled as it is), or unmark it; returns its index."""
        from napari.utils.notifications import show_warning

        layer = self.labels_layer
        index = self.current_slice(layer)
        if index is None:
            show_warning("medseg: show a slice of a corrected labels layer (2D view, the slider on the model's "
                         "slice axis) to mark it")
            return None
        record = self.record_of(layer)
        record.checked ^= {index}
        self._show_labelled()
        return index

    def _show_slice_state(self, *_) -> None:
        """The mark button's text for the slice shown (cheap: runs at every slider move)."""
        layer = self.labels_layer
        checked = layer is not None and self.current_slice(layer) in self.record_of(layer).checked
        self.mark_button.setText("Unmark this slice" if checked else "Mark this slice checked")

    def _show_labelled(self) -> None:
        """The list of labelled slices (after a paint, a mark, another layer)."""
        self._show_slice_state()
        layer = self.labels_layer
        if layer is None:
            self.slices_label.setText("no corrected labels layer (segment a scan first)")
            return
        record = self.record_of(layer)
        labelled = self.labelled_slices(layer)
        self.slices_label.setText(f"{len(labelled)} labelled slice(s): {_ranges(labelled) or 'none'} (painted "
                                  f"{_ranges(sorted(record.painted)) or '-'}; checked "
                                  f"{_ranges(sorted(record.checked)) or '-'})")

    # --- running ------------------------------------------------------------------------------
    def fine_tune(self):
        """Start fine-tuning; returns the worker (None when refused, with one line saying why)."""
        from napari.qt.threading import create_worker
        from napari.utils.notifications import show_error

        if self.running:
            return None
        try:
            request, context = self._request()
        except Exception as exc:  # one line, never a traceback
            line = exc.args[0] if isinstance(exc, _Refused) else error_text(exc)
            show_error(line)
            self.status.setText(line)
            return None
        from medseg.napari.finetune_process import FineTuneProcess

        self.process = FineTuneProcess()
        self.worker = create_worker(self.process.run, request, self._relay.message.emit, _start_thread=False)
        self.worker.returned.connect(lambda answer: self._finish(answer, context))
        self.worker.errored.connect(lambda exc: self._finish(("error", error_text(exc)), context))
        self.finetune_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress.setRange(0, 0)
        self.status.setText(f"fine-tuning {Path(request['bundle']).name} on {len(context['slices'])} slice(s) "
                            "of this scan and its training data (starting)...")
        self.worker.start()
        return self.worker

    def _request(self) -> tuple[dict, dict]:
        """What the child needs, and what :meth:`_finish` needs (the image layer, the original)."""
        from medseg.napari.corrections import ignore_value_for, partial_label
        from medseg.napari.layers import CLASSES_KEY
        from medseg.napari.segment import image_volume
        from medseg.napari.writer import _layer_meta, grid_from_layers, labels_volume

        layer = self.labels_layer
        if layer is None:
            raise _Refused("medseg: segment a scan first: no labels layer read or made by medseg")
        bundle = self._bundle_for(layer)
        if bundle is None:
            raise _Refused("medseg: choose the model to fine-tune (its run folder)")
        meta = {**_layer_meta(layer), "metadata": layer.metadata, "name": layer.name}
        found = grid_from_layers(layer.data.shape, _world(layer), self._layers("Image"))
        if found is None:
            raise _Refused(f"medseg: open the scan of {layer.name!r} (an image layer on its grid) to fine-tune")
        image = image_volume(found[1])
        classes = {int(k): v for k, v in (layer.metadata[GEOMETRY_KEY].get(CLASSES_KEY) or {}).items()}
        ignore = ignore_value_for(bundle, classes)
        tracked = self._tracked[id(layer)]
        axis = slice_axis_of_bundle(bundle)
        if tracked.record.axis != axis:
            recorded = WORLD_AXES[tracked.record.axis]
            raise _Refused(f"medseg: the corrections of {layer.name!r} were recorded along {recorded}, the model "
                           f"{bundle.name} takes slices along {WORLD_AXES[axis]}: correct a layer that model segmented")
        slices = tracked.labelled()
        partial = partial_label(np.asarray(layer.data), tracked.record.axis, slices, ignore, classes, layer.name)
        label = labels_volume(partial, meta, layers=self.viewer.layers)
        request = {"bundle": str(bundle), "image": np.asarray(image.array), "label": np.asarray(label.array),
                   "affine": np.asarray(image.affine), "case_id": _case_id(image), "meta": dict(image.meta),
                   "ignore_label": ignore, "budget_s": float(self.budget_spin.value()),
                   "settings": {**_parent_settings(bundle), **self.train_settings}}
        context = {"image": image, "image_name": found[1].name, "layer": layer, "original": tracked.original,
                   "partial": partial, "ignore": ignore, "classes": classes, "slices": slices}
        return request, context

    def cancel(self) -> None:
        """Stop the run at its next step (nothing is added; the corrections stay)."""
        if self.running and self.process is not None:
            self.process.cancel()
            self.status.setText("cancelling...")

    def _on_message(self, message: tuple) -> None:
        if message[0] == "step":
            elapsed, left = message[1], message[2]
            total = elapsed + left if left is not None else float(self.budget_spin.value())
            self.progress.setRange(0, max(int(total), 1))
            self.progress.setValue(min(int(elapsed), max(int(total), 1)))
            self.status.setText(f"fine-tuning: {elapsed:.0f} of {total:.0f} s")
        elif message[0] == "segmenting":
            self.progress.setRange(0, 0)
            self.status.setText(f"segmenting the scan with {Path(message[1]).name}...")
        elif message[0] == "chunk":
            self.progress.setRange(0, max(message[2], 1))
            self.progress.setValue(message[1])

    def _finish(self, answer: tuple, context: dict) -> None:
        from napari.utils.notifications import show_error, show_info

        if self.worker is None:  # returned and errored both ended it
            return
        self.worker = self.process = None
        self.finetune_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.progress.setRange(0, 1)
        self.progress.setValue(1 if answer[0] == "done" else 0)
        if answer[0] != "done":
            line = f"{answer[1]}; your corrections are unchanged"
            self.last_result = FineTuneResult(error=line, cancelled=answer[0] == "cancelled")
            (show_info if answer[0] == "cancelled" else show_error)(line)
            self.status.setText(line)
            return
        try:
            self.last_result = self._show_result(answer[1], context)
        except Exception as exc:  # noqa: BLE001 - one line; the corrections stay
            self.last_result = FineTuneResult(error=error_text(exc))
            show_error(self.last_result.error)
            self.status.setText(self.last_result.error)

    def _show_result(self, out: dict, context: dict) -> FineTuneResult:
        from napari.layers import Layer

        from medseg.napari.corrections import difference
        from medseg.napari.layers import label_layer

        image = context["image"]
        labels = image.with_array(out["labels"])
        new_bundle = Path(out["bundle"])
        new = Layer.create(*label_layer(labels, f"{context['image_name']} medseg fine-tuned", out["classes"],
                                        bundle=str(new_bundle)))
        self._added.add(id(new))
        self.viewer.add_layer(new)
        diff = difference(context["original"], np.asarray(new.data), out["classes"], image.voxel_volume_ml,
                          context["partial"], context["ignore"])
        geometry = LayerGeometry.from_metadata(new.metadata)
        changed = self.viewer.add_layer(Layer.create(*label_layer(
            image.with_array(geometry.to_scan(diff.changed)), f"{context['image_name']} changed by fine-tuning",
            CHANGE_CLASSES)))
        self.set_bundle(new_bundle)  # the next fine-tuning continues from it (its data hold this scan)
        self._fill_table(diff.rows)
        agree = ("" if diff.agreement_before is None else f"; corrected slices agree {100 * diff.agreement_before:.1f}%"
                 f" -> {100 * diff.agreement_after:.1f}%")
        self.status.setText(f"fine-tuned {out['train_s']:.0f} s ({out['steps']} steps) -> {new_bundle.name}; "
                            f"{diff.voxels_changed} voxels changed ({diff.voxels_changed * image.voxel_volume_ml:.1f}"
                            f" mL){agree}")
        return FineTuneResult(new_bundle, new, changed, diff)

    def _fill_table(self, rows: list) -> None:
        self.table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            cells = [row["class"], f"{row['ml_before']:.1f}", f"{row['ml_after']:.1f}", f"{row['ml_change']:+.1f}"]
            for c, text in enumerate(cells):
                self.table.setItem(r, c, QTableWidgetItem(text))


class _Refused(Exception):
    """A fine-tuning refused before it starts; ``args[0]`` is the line shown."""


def _world(layer) -> np.ndarray:
    from medseg.napari.writer import _layer_meta, world_affine_of

    return world_affine_of(_layer_meta(layer))


def _case_id(image) -> str:
    """The corrected case's id: the scan's (a later correction of the same scan replaces it)."""
    import re

    text = re.sub(r"[^A-Za-z0-9._-]+", "_", str(image.case_id or "corrected")).strip("._") or "corrected"
    return f"{text}_corrected"


def _parent_settings(bundle: Path) -> dict:
    import json

    try:
        saved = json.loads((bundle / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: saved[k] for k in _PARENT_SETTINGS if saved.get(k) is not None}


def _ranges(values: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    out, start = [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)
