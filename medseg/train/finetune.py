"""Fine-tuning a trained bundle on corrected cases: the library call behind a viewer's
"Fine-tune" button (``medseg-train --init-from RUN_DIR`` on the command line).

:func:`finetune` takes a bundle, the training data it names, one more (image, partial label)
case and a budget, and trains a new bundle from the parent's weights (what is kept and the
schedule: :mod:`medseg.train.parent`), with the events and cancel of :func:`medseg.train.train`.
"""

from __future__ import annotations

import os
from pathlib import Path

from medseg.errors import InputError

__all__ = ["finetune"]


def _training_data(bundle: Path) -> tuple[Path, Path]:
    """The images and labels folders the bundle's run read (its ``config.json``)."""
    import json

    path = bundle / "config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        images, labels = Path(saved["images"]), Path(saved["labels"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(path, "the training run's config.json naming its images and labels (or pass them)",
                         f"{type(exc).__name__}: {exc}") from None
    for folder in (images, labels):
        if not folder.is_dir():
            raise InputError(path, "training data folders that still exist (or pass images= and labels=)",
                             f"{folder}: no such folder")
    return images, labels


def _case_of(entry: Path) -> str:
    from medseg.io.suffixes import case_id_from_path

    case = entry.name if entry.is_dir() else case_id_from_path(entry)
    return case[:-5] if case.endswith("_0000") else case


def _link_case_files(source: Path, target: Path, replaced: str) -> None:
    """Link every case of ``source`` into ``target`` but ``replaced`` (a newer correction of it)."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in sorted(Path(source).iterdir()):
        if not entry.name.startswith(".") and _case_of(entry) != replaced:
            os.symlink(entry.resolve(), target / entry.name, target_is_directory=entry.is_dir())


def finetune(bundle_dir, *, image, label, images=None, labels=None, budget_s: float = 60.0,
             ignore_label: int | None = None, run_dir=None, case_id: str = "corrected", events=None, cancel=None,
             **settings):
    """Fine-tune the bundle in ``bundle_dir`` on its training data plus one corrected case.

    Args:
        bundle_dir: the parent bundle's run folder.
        image, label: :class:`~medseg.io.Volume` of the corrected case and its (partial) label map
            on the image's grid, in the dataset's label ids.
        images, labels: the training data's folders; default: those the bundle's run read (its
            ``config.json``; a bundle made by this function names its own data folder, so
            corrections accumulate from one fine-tuning to the next).
        budget_s: training budget in seconds (``max_time_s``).
        ignore_label: the label value of the unlabelled voxels of ``label`` (and of the training
            labels, if they hold it); None: every voxel of ``label`` is labelled.
        run_dir: the new bundle's folder (default: ``<bundle>-ft-<time>`` beside the parent).
        case_id: the corrected case's id; a training case of that id (an earlier correction of
            the same scan) is replaced by it.
        events, cancel: as :func:`medseg.train.train` (``Cancelled`` + ``RunCancelled`` on cancel).
        settings: further :class:`~medseg.train.config.TrainConfig` fields.

    Returns:
        :class:`~medseg.train.run.RunResult` of the new bundle, validated on the training cases
        (the last model kept). Its data folder ``<run_dir>/data`` links the training data (never
        copied or changed) and holds the corrected case; a failed run leaves no folder behind, a
        cancelled one its checkpoint and a bundle marked ``"cancelled"``.

    Raises:
        InputError: a label off the image's grid, training data that cannot be found, or what
            :func:`medseg.train.train` raises (other classes than the bundle's...).
    """
    import datetime as _dt
    import shutil

    from medseg.events import RunCancelled
    from medseg.io import write_volume
    from medseg.train.checkpoint import latest_checkpoint
    from medseg.train.run import train

    if tuple(image.shape) != tuple(label.shape):
        raise InputError(case_id, f"a label on the image's grid {tuple(image.shape)}", f"shape {tuple(label.shape)}")
    parent = Path(bundle_dir).resolve()
    if images is None or labels is None:
        images, labels = _training_data(parent)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(run_dir) if run_dir is not None else parent.parent / f"{parent.name}-ft-{stamp}"
    if out.exists() and any(out.iterdir()):
        raise InputError(out, "a new folder for the fine-tuned bundle", "a folder with files")
    data = out / "data"
    try:
        _link_case_files(Path(images), data / "images", case_id)
        _link_case_files(Path(labels), data / "labels", case_id)
        write_volume(image, data / "images" / f"{case_id}.nii.gz")
        write_volume(label, data / "labels" / f"{case_id}.nii.gz")
        config = {"images": str(data / "images"), "labels": str(data / "labels"), "init_from": str(parent),
                  "run_dir": str(out), "max_time_s": float(budget_s), "val_fraction": 0.0, "verbose": 0,
                  "ignore_label": ignore_label, **settings}
        return train(config, events=events, cancel=cancel)
    except RunCancelled:
        raise  # its checkpoint and cancelled bundle stay
    except BaseException:
        if latest_checkpoint(out) is None:  # nothing of the run is worth keeping
            shutil.rmtree(out, ignore_errors=True)
        raise
