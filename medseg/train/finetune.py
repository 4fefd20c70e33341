"""Fine-tuning a trained bundle on corrected cases: the library call behind a viewer's
"Fine-tune" button (``medseg-train --init-from RUN_DIR`` on the command line).

:func:`finetune` takes a bundle, the training data it names, one more (image, partial label)
case and a budget, and trains a new bundle from the parent's weights (what is kept and the
schedule: :mod:`medseg.train.parent`), with the events and cancel of :func:`medseg.train.train`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from medseg.errors import InputError

__all__ = ["finetune"]


def _link_case_files(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for entry in sorted(Path(source).iterdir()):
        if not entry.name.startswith("."):
            os.symlink(entry.resolve(), target / entry.name, target_is_directory=entry.is_dir())


def finetune(bundle_dir, *, images, labels, image, label, budget_s: float = 60.0, ignore_label: int | None = None,
             run_dir=None, case_id: str = "corrected", events=None, cancel=None, **settings):
    """Fine-tune the bundle in ``bundle_dir`` on its training data plus one corrected case.

    Args:
        bundle_dir: the parent bundle's run folder.
        images, labels: the training data's folders (those ``medseg-train`` read).
        image, label: :class:`~medseg.io.Volume` of the extra case and its (partial) label map on
            the image's grid, in the dataset's label ids.
        budget_s: training budget in seconds (``max_time_s``).
        ignore_label: the label value of the unlabelled voxels of ``label`` (and of the training
            labels, if they hold it); None: every voxel of ``label`` is labelled.
        run_dir: the new bundle's folder (default: a new ``finetune-*`` folder next to the parent).
        case_id: the extra case's id; the training data must not hold it.
        events, cancel: as :func:`medseg.train.train` (``Cancelled`` + ``RunCancelled`` on cancel).
        settings: further :class:`~medseg.train.config.TrainConfig` fields.

    Returns:
        :class:`~medseg.train.run.RunResult` of the new bundle (validated on the training cases,
        the last model kept). The training data's files are linked, never copied or modified.
    """
    from medseg.io import write_volume
    from medseg.train.run import train

    if image.shape != label.shape:
        raise InputError(case_id, f"a label on the image's grid {image.shape}", f"shape {label.shape}")
    parent = Path(bundle_dir).resolve()
    out = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="finetune-", dir=parent.parent))
    with tempfile.TemporaryDirectory(prefix="medseg-finetune-data-") as tmp:
        data = Path(tmp)
        _link_case_files(Path(images), data / "images")
        _link_case_files(Path(labels), data / "labels")
        if any(p.name.split(".")[0] in (case_id, f"{case_id}_0000") for p in (data / "images").iterdir()):
            raise InputError(images, f"no case named {case_id!r} (the corrected case's id)", "one")
        write_volume(image, data / "images" / f"{case_id}.nii.gz")
        write_volume(label, data / "labels" / f"{case_id}.nii.gz")
        config = {"images": str(data / "images"), "labels": str(data / "labels"), "init_from": str(parent),
                  "run_dir": str(out), "max_time_s": float(budget_s), "val_fraction": 0.0, "verbose": 0,
                  "ignore_label": ignore_label, **settings}
        if run_dir is None:
            out.rmdir()  # the folder's name was reserved; the run creates it
        return train(config, events=events, cancel=cancel)
