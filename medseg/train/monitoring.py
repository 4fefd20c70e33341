"""What watches a run besides validation: the training diagnostics and their ``warnings.json``,
TensorBoard, and the Keras verbosity of the progress bar."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from pathlib import Path

from medseg.train.checkpoint import atomic_write_json
from medseg.train.rundir import WARNINGS_FILE

log = logging.getLogger(__name__)

#: The flat-Dice rule looks at least this many optimizer steps back: in the first few hundred
#: steps of a healthy run the cross-entropy part falls while the hard Dice is still near 0.
FLAT_DICE_MIN_STEPS = 1000


def flat_dice_window(steps_per_epoch: int) -> int:
    """Epochs of the flat-Dice window: 4, or more when epochs are short (>= 1000 steps in all)."""
    return max(4, math.ceil(FLAT_DICE_MIN_STEPS / max(1, int(steps_per_epoch))))


def make_diagnostics(cfg, write_dir: Path, dataset=None, num_classes: int = 2, class_names=None,
                     foreground_name: str = "lesion"):
    """The training-diagnostics callback (:class:`medseg.train.diagnostics.Diagnostics`).

    With the training ``dataset`` it checks the labels of the first batch and the augmentation
    alignment self-check (image and mask warped together must stay in register).
    """
    from medseg.train.diagnostics import Diagnostics

    sample_batch, alignment = None, None
    maker = getattr(dataset, "batch_maker", None)
    if maker is not None:
        sample_batch = maker.batch(0)
        if any(getattr(t, "ignore", None) is not None for t in maker.pipeline.deterministic):
            # Partial labels: the unlabelled pixels are no label value to judge (nor any class).
            from medseg.io.classes import without_ignore

            sample_batch = (sample_batch[0], without_ignore(sample_batch[1])[0])
        if maker.augmenter is not None:
            from medseg.transforms.augment import check_alignment

            alignment = check_alignment(maker.augmenter, n=16, size=32, channels=maker.context_slices,
                                        seed=cfg.seed)
    # verbose=0: RunKeeper prints the epoch's summary line (with the same loss split).
    return Diagnostics(sample_batch=sample_batch, alignment_dice=alignment, verbose=0,
                       flat_epochs=flat_dice_window(cfg.steps_per_epoch), num_classes=num_classes,
                       class_names=class_names, foreground_name=foreground_name)


def write_warnings(diagnostics, run_dir: Path, previous: list[dict] | None = None) -> Path:
    """``warnings.json``: the diagnostics' warnings (those of the run before a resume kept)."""
    seen = list(previous or [])
    # A warning is one kind at one epoch (for one class, with several classes).
    keys = {(w.get("kind"), w.get("epoch"), w.get("class")) for w in seen}
    seen += [w for w in getattr(diagnostics, "warnings", [])
             if (w.get("kind"), w.get("epoch"), w.get("class")) not in keys]
    return atomic_write_json(Path(run_dir) / WARNINGS_FILE, {"warnings": seen})


def make_tensorboard(write_dir: Path):
    """Keras' TensorBoard callback writing epoch scalars to ``write_dir/tensorboard`` (None, with a
    warning, when the ``tensorboard`` package is missing: training must not fail for a log)."""
    import keras

    if importlib.util.find_spec("tensorboard") is None:
        log.warning("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
        return None
    return keras.callbacks.TensorBoard(log_dir=os.fspath(Path(write_dir) / "tensorboard"), write_graph=False,
                                       update_freq="epoch", profile_batch=0)


def keras_verbose(verbose: int) -> int | str:
    """Keras' ``fit(verbose=)`` for medseg's: 1 the progress bar; 2 (a log without a terminal)
    and 0 none (RunKeeper's plain line per epoch is the only output)."""
    return {0: 0, 1: "auto", 2: 0}.get(int(verbose), "auto")
