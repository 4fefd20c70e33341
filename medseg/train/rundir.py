"""The run folder and the machine's resources: naming a new run's folder, refusing one inside the
data, one that cannot be written, a disk without room for the run's outputs, and a patch whose
training batch cannot fit in memory. Every check here runs before training starts.

Files of a run folder (names shared by the other modules of :mod:`medseg.train`)::

    model.keras, bundle.json   the model kept (medseg.infer.bundle)
    config.json                the resolved configuration (medseg.train.config.RunConfig)
    plan.json, split.json      preprocessing plan; patients used for training / validation
    check.json                 dataset check report
    history.csv, curves.png    one row per epoch; loss (data + regularization) and Dice curves
    validation.csv             per-patient 3D metrics at each validation
    warnings.json              training diagnostics (medseg.train.diagnostics)
    tensorboard/               TensorBoard event files
    checkpoints/               per-epoch checkpoints (weights + optimizer + state), for --resume
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from medseg.errors import InputError
from medseg.io.atomic import check_writable_folder
from medseg.train.checkpoint import latest_checkpoint
from medseg.train.strategy import tf_config

CONFIG_FILE = "config.json"
PLAN_FILE = "plan.json"
SPLIT_FILE = "split.json"
WARNINGS_FILE = "warnings.json"

#: Rough bytes of training memory per patch pixel and first-level filter (UNet++ activations and
#: their gradients, float32): a 256x256 batch of 8 with 32 filters needs about 1.3 GB.
_TRAIN_BYTES_PER_PIXEL_FILTER = 80

#: Bytes a run writes besides its weights (history, curves.png, JSON files, TensorBoard events,
#: HDF5 and zip headers), a generous round figure: a 3-epoch run of the smallest network (filters
#: 4 8, depth 1) writes 0.4 MB, nearly all of it the headers of its 2 checkpoints and model.keras.
RUN_FILES_MARGIN = 4 * 2**20


def new_run_dir(cfg) -> Path:
    """The folder of a new run: ``run_dir`` if given, else ``out/<YYYYmmdd-HHMMSS>`` (made unique).

    Under ``TF_CONFIG`` every worker must agree on the folder without talking to each other, so
    the name is ``out/run-<hash of the cluster spec>`` unless ``run_dir`` is given.

    Raises:
        InputError: ``run_dir`` already holds a run (use ``--resume`` to continue it).
    """
    if cfg.run_dir:
        run_dir = Path(cfg.run_dir)
    elif tf_config() is not None:
        digest = hashlib.sha1(json.dumps(tf_config()["cluster"], sort_keys=True).encode()).hexdigest()[:10]
        run_dir = Path(cfg.out) / f"run-{digest}"
    else:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(cfg.out) / stamp
        n = 1
        while run_dir.exists():
            n += 1
            run_dir = Path(cfg.out) / f"{stamp}-{n}"
    if (run_dir / CONFIG_FILE).exists() and latest_checkpoint(run_dir) is not None:
        raise InputError(run_dir, "a new run folder", "a previous run (continue it with --resume)")
    return run_dir


def check_run_dir_outside_data(run_dir: Path, cfg) -> None:
    """Refuse a run folder equal to or inside a data folder (run files would land among the scans)."""
    run = Path(run_dir).resolve()
    for name, folder in (("--images", cfg.images), ("--labels", cfg.labels)):
        if folder is None:
            continue
        data = Path(folder).resolve()
        if run == data or data in run.parents:
            raise InputError(run_dir, f"a run folder outside the {name} folder {folder}", "a folder inside it",
                             "pass another --run-dir or --out")


def prepare_write_dir(write_dir: Path) -> None:
    """Make the folder this process writes into; before any file of the run, a read-only or
    full disk shows now (a 64 KiB probe, :func:`medseg.io.atomic.check_writable_folder`)."""
    check_writable_folder(write_dir, what="a writable run folder")
    Path(write_dir).mkdir(parents=True, exist_ok=True)


def check_resources(cfg) -> None:
    """Refuse, before anything is written, a patch whose training batch cannot fit in memory.

    Raises:
        InputError: the estimated memory of one training batch exceeds the physical memory.
    """
    if cfg.patch_size is None:
        return  # the plan's patch is at most 256 x 256
    h, w = (int(v) for v in cfg.patch_size)
    first = cfg.unet_filters[0] if cfg.filters is not None else 8
    need = float(h) * w * cfg.batch_size * first * _TRAIN_BYTES_PER_PIXEL_FILTER
    try:
        have = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not POSIX: no check
        return
    if need > have:
        raise InputError("--patch-size", f"a patch whose training batch fits in this machine's {have / 2**30:.0f} GiB "
                         f"of memory", f"{h} x {w} (batch {cfg.batch_size}, {first} filters: about "
                         f"{need / 2**30:.0f} GiB)", "choose a smaller --patch-size or --batch-size")


def disk_space_needed(model, existing: int = 0) -> int:
    """Bytes of disk a run of ``model`` needs at its peak: 3 checkpoints (the 2 kept and the one
    being written), each the weights plus Adam's 2 moments (3x the weights), 2 ``model.keras``
    (the new one is complete before the old one goes), plus :data:`RUN_FILES_MARGIN`.

    ``existing``: bytes of checkpoints and ``model.keras`` a resumed run already holds (counted
    as written; at least one more checkpoint and model still need room).
    """
    weights = sum(int(np.prod(v.shape)) * np.dtype(str(getattr(v.dtype, "name", v.dtype))).itemsize
                  for v in model.weights)
    checkpoint = 3 * weights
    full = 3 * checkpoint + 2 * weights + RUN_FILES_MARGIN
    return max(full - int(existing), checkpoint + weights + RUN_FILES_MARGIN)


def check_disk_space(run_dir: Path, model) -> None:
    """Refuse, before training, a run folder whose disk cannot hold the run's outputs
    (:func:`disk_space_needed`, measured with ``shutil.disk_usage``).

    Raises:
        InputError: naming the folder, the space needed and the space free.
    """
    run_dir = Path(run_dir)
    existing = sum(p.stat().st_size for p in (run_dir / "checkpoints").rglob("*") if p.is_file())
    if (run_dir / "model.keras").is_file():
        existing += (run_dir / "model.keras").stat().st_size
    need = disk_space_needed(model, existing)
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise InputError(run_dir, f"a run folder with room for the run's outputs: about {need / 1e6:.1f} MB "
                         "(2 checkpoints of weights + optimizer state, model.keras, history, curves)",
                         f"{free / 1e6:.1f} MB free on its disk", "free space, or pass another --run-dir")


def saved_state(run_dir: Path) -> dict | None:
    """The training state of the newest checkpoint of ``run_dir`` (None without one)."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        return None
    try:
        return json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_warnings(run_dir: Path) -> list[dict]:
    """The warnings of ``warnings.json`` (those of the run before a resume), [] without one."""
    path = Path(run_dir) / WARNINGS_FILE
    try:
        return list(json.loads(path.read_text(encoding="utf-8")).get("warnings", []))
    except (OSError, ValueError, AttributeError):
        return []
