"""The evaluate widget: a prediction layer against a reference layer, per class, in a table.

Pairing and metrics are :mod:`medseg.napari.scoring` (``medseg-eval``'s rules); this module is
the Qt part: two layer pickers, a table (DSC, HD95, ASSD, volumes) and a button that moves the
viewer to the worst class's slice of largest disagreement.
"""

from __future__ import annotations

import math

from qtpy.QtWidgets import (QComboBox, QFormLayout, QLabel, QPushButton, QTableWidget, QTableWidgetItem, QVBoxLayout,
                            QWidget)

from medseg.napari.reader import error_text
from medseg.napari.scoring import COLUMNS, Scores, score_layers

__all__ = ["EvaluateWidget"]


def _cell(key: str, value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if math.isinf(value):
            return "inf"
        return f"{value:.3f}" if key == "dsc" else f"{value:.2f}"
    return str(value)


class EvaluateWidget(QWidget):
    """Pick a prediction and a reference Labels layer; Evaluate; Go to worst slice."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        #: The last scores (:class:`medseg.napari.scoring.Scores`); None before a run.
        self.scores: Scores | None = None
        self.pred_combo, self.ref_combo = QComboBox(), QComboBox()
        self.evaluate_button = QPushButton("Evaluate")
        self.evaluate_button.clicked.connect(self.evaluate)
        self.worst_button = QPushButton("Go to worst slice")
        self.worst_button.setEnabled(False)
        self.worst_button.clicked.connect(self.go_to_worst)
        self.table = QTableWidget(0, len(COLUMNS) + 1)
        self.table.setHorizontalHeaderLabels(["class", *[title for _, title in COLUMNS]])
        self.status = QLabel("")
        self.status.setWordWrap(True)
        form = QFormLayout()
        form.addRow("prediction", self.pred_combo)
        form.addRow("reference", self.ref_combo)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.evaluate_button)
        layout.addWidget(self.table)
        layout.addWidget(self.worst_button)
        layout.addWidget(self.status)
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._refresh_layers()

    def _labels_layers(self) -> list:
        from napari.layers import Labels

        return [layer for layer in self.viewer.layers if isinstance(layer, Labels)]

    def _refresh_layers(self, *_) -> None:
        names = [layer.name for layer in self._labels_layers()]
        for combo, default in ((self.pred_combo, 0), (self.ref_combo, 1)):
            current = combo.currentText()
            combo.clear()
            combo.addItems(names)
            if current in names:
                combo.setCurrentText(current)
            elif len(names) > default:
                combo.setCurrentIndex(default)

    def _layer(self, combo):
        return next((layer for layer in self._labels_layers() if layer.name == combo.currentText()), None)

    def select(self, prediction, reference) -> None:
        """Choose the two layers (tests, scripts)."""
        self._refresh_layers()
        self.pred_combo.setCurrentText(prediction.name)
        self.ref_combo.setCurrentText(reference.name)

    def evaluate(self) -> Scores | None:
        """Score the chosen layers and fill the table; one-line notification on failure."""
        from napari.utils.notifications import show_error

        pred, ref = self._layer(self.pred_combo), self._layer(self.ref_combo)
        if pred is None or ref is None or pred is ref:
            problem = "medseg: choose a prediction and a different reference Labels layer"
            show_error(problem)
            self.status.setText(problem)
            return None
        try:
            self.scores = score_layers(pred, ref, list(self.viewer.layers))
        except Exception as exc:  # noqa: BLE001 - one line, never a traceback
            self.scores = None
            show_error(error_text(exc))
            self.status.setText(error_text(exc))
            return None
        self._fill(self.scores)
        return self.scores

    def _fill(self, scores: Scores) -> None:
        self.table.setRowCount(len(scores.rows))
        for r, row in enumerate(scores.rows):
            self.table.setItem(r, 0, QTableWidgetItem(row["class"]))
            for c, (key, _) in enumerate(COLUMNS, 1):
                self.table.setItem(r, c, QTableWidgetItem(_cell(key, row[key])))
        self.table.resizeColumnsToContents()
        self.worst_button.setEnabled(scores.worst_world is not None)
        note = {"same grid": "", "reordered": " (same voxels in another axis order: reordered exactly)",
                "resampled": " (grids differ: prediction resampled nearest-neighbour onto the reference)"}
        worst = f"; worst: {scores.worst_class}" if scores.worst_class else "; prediction and reference agree"
        self.status.setText(f"{len(scores.rows)} classes{note[scores.pairing]}{worst}")

    def go_to_worst(self) -> None:
        """Move the viewer to the worst class's slice of largest disagreement (its centre)."""
        if self.scores is None or self.scores.worst_world is None:
            return
        for axis, value in enumerate(self.scores.worst_world[-self.viewer.dims.ndim:]):
            self.viewer.dims.set_point(axis, value)
        self.viewer.camera.center = self.scores.worst_world[-3:]
