"""Writing the run's bundle (``model.keras`` + ``bundle.json``, :func:`medseg.infer.bundle.save_bundle`).

The bundle holds the float32 twin of the trained model with the weights being kept: the best
mean 3D validation DSC on held-out cases (``selection="best"``), the last validated model when
validation runs on the training cases (``"last"``), or the model at a cancel (``status
"cancelled"``, ``"last"``). It records the largest-component choice the validation rows
support (:func:`medseg.train.validation.postprocessing`).
"""

from __future__ import annotations

from typing import Any

from medseg.events import CheckpointWritten, emit
from medseg.infer import bundle as bundle_io
from medseg.train.assembly import network_spec
from medseg.train.validation import postprocessing

COMPLETE = "complete"
CANCELLED = "cancelled"


class BundleWriter:
    """``writer(model, epoch, logs)``: the twin takes ``model``'s weights and is written as the bundle.

    Args:
        run: the run's state (``cfg``, ``twin``, ``plan``, ``pipeline``, ``write_dir``, the cases,
            ``validation_kind`` and the validation callback ``validation``).
        selection: ``"best"`` or ``"last"`` (recorded in the bundle).
        events: a :mod:`medseg.events` sink (``CheckpointWritten(what="bundle")`` per write).

    ``status`` is ``"complete"`` until :meth:`cancelled` writes the model of a cancelled run.
    """

    def __init__(self, run: Any, selection: str, events=None):
        self.run = run
        self.selection = selection
        self.events = events
        self.status = COMPLETE
        self.writes = 0
        from medseg.train.parent import parent_record

        self.parent = parent_record(run.cfg)  # a fine-tuned bundle names its parent; hashed once

    def __call__(self, model, epoch: int, logs: dict) -> None:
        run = self.run
        run.twin.set_weights(model.get_weights())
        validation = run.validation
        rows = validation.last_rows if validation is not None and validation.last_epoch == epoch else []
        spec = run.plan.class_spec
        training = {"epoch": epoch + 1, "val_dsc_3d": logs.get("val_dsc_3d"), "val_hd95_mm": logs.get("val_hd95_mm"),
                    "train_cases": [c.case_id for c in run.train_cases],
                    "val_cases": [c.case_id for c in run.val_cases], "map_labels": run.cfg.map_labels}
        path = save(run.write_dir, run.twin, run.plan, classes=spec.output_names, pipeline=run.pipeline,
                    network=network_spec(run.cfg), postprocessing=postprocessing(spec, rows, run.validation_kind),
                    selection=self.selection, validation=run.validation_kind, training=training, status=self.status,
                    parent=self.parent)
        self.writes += 1
        emit(self.events, CheckpointWritten(epoch=epoch + 1, path=str(path), what="bundle"))

    def cancelled(self, model, epoch: int) -> None:
        """Write ``model`` (the weights at the cancel, after ``epoch`` 0-based) as a cancelled bundle."""
        self.status, self.selection = CANCELLED, "last"
        self(model, epoch, {})


def save(run_dir, model, plan, *, classes, pipeline, network, postprocessing, selection, validation, training,
         status, parent=None):
    """:func:`medseg.infer.bundle.save_bundle` with the typed fields; returns ``bundle.json``'s path."""
    return bundle_io.save_bundle(run_dir, model, plan, classes=classes, pipeline=pipeline, network=network,
                                 threshold=0.5, head_level=None, postprocessing=postprocessing, selection=selection,
                                 validation=validation, training=training, status=status, parent=parent)
