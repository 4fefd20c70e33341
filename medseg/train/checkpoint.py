"""Atomic files and per-epoch training checkpoints that survive ``kill -9``.

Layout inside a run folder::

    checkpoints/
        epoch-0003/            one complete checkpoint: written as epoch-0003.tmp-*, then renamed
            state.weights.h5   model weights + optimizer state (step counter, moments, loss scale)
            state.json         epoch, best validation DSC, early-stopping counter, history rows
        epoch-0004/
        latest                 text file naming the newest complete checkpoint, replaced atomically

A checkpoint folder appears under its final name only when both files are complete (a rename
is atomic on POSIX file systems), and ``latest`` is updated after that, so an interruption at any
moment leaves the previous checkpoint usable: at most the current epoch is lost.

The weights file is made in memory and reaches the disk in one plain write: HDF5 writing to a
full disk does not fail cleanly (h5py reports the failures from object destructors, one traceback
per block, and the interpreter can then crash), whereas a plain write fails with one ``OSError``,
re-raised naming the checkpoint file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from medseg.errors import InputError
from medseg.io.atomic import atomic_path, renamed
from medseg.io.jsonsafe import json_safe

CHECKPOINTS = "checkpoints"
LATEST = "latest"
WEIGHTS = "state.weights.h5"
STATE = "state.json"


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise an ``OSError`` of the block naming ``path`` (the file the user knows, not the
    temporary one written first)."""
    try:
        yield
    except OSError as exc:
        if exc.filename == os.fspath(path):
            raise
        raise renamed(exc, path) from exc


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically (NaN/inf written as JSON null)."""
    return atomic_write_text(path, json.dumps(json_safe(data), indent=2, sort_keys=True) + "\n")


def save_checkpoint(run_dir: str | os.PathLike, model, state: dict[str, Any], *, keep: int = 2) -> Path:
    """Save the model + optimizer state and ``state`` as checkpoint ``epoch-<state['epoch']>``.

    Args:
        run_dir: run folder (checkpoints go to ``run_dir/checkpoints``).
        model: compiled Keras model; its optimizer's variables are saved with the weights.
        state: JSON-serialisable training state; must hold ``epoch`` (number of completed epochs).
        keep: number of most recent checkpoints kept (older ones are deleted after the new
            one is complete).

    Returns:
        The checkpoint folder.
    """
    root = Path(run_dir) / CHECKPOINTS
    name = f"epoch-{int(state['epoch']):04d}"
    final = root / name
    with naming(final):
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{name}.tmp-", dir=root))
    try:
        with naming(final / WEIGHTS):  # the checkpoint's file, not the hidden temp folder
            write_weights(model, tmp / WEIGHTS)
        with naming(final / STATE):
            atomic_write_json(tmp / STATE, state)
        _fsync_dir(tmp)
        if final.exists():  # same epoch saved again (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with naming(root / LATEST):
        atomic_write_text(root / LATEST, name + "\n")
    _fsync_dir(root)
    complete = sorted(p for p in root.glob("epoch-*") if p.is_dir() and ".tmp-" not in p.name)
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("epoch-*.tmp-*"):  # leftovers of a killed save
        shutil.rmtree(stale, ignore_errors=True)
    return final


def weights_h5_bytes(model) -> memoryview | None:
    """The model's weights and optimizer state as the bytes of a ``.weights.h5`` file, made in
    memory (Keras' own H5 store on a ``BytesIO``), or None when this Keras lacks that store."""
    try:
        from keras.src.saving import saving_lib

        store_cls, save_state = saving_lib.H5IOStore, saving_lib._save_state
    except (ImportError, AttributeError):
        return None
    if not model.built:
        raise ValueError("You are saving a model that has not yet been built.")
    buffer = io.BytesIO()
    store = store_cls(buffer, mode="w")
    try:
        save_state(model, store, None, "", set())
    finally:
        store.close()
    return buffer.getbuffer()


def write_weights(model, path: Path) -> None:
    """Write ``model``'s weights and optimizer state to ``path`` (``.weights.h5``), durably.

    Raises:
        OSError: the write failed (a full disk: ``errno.ENOSPC``), naming ``path``; the partial
            file is the caller's to remove.
    """
    data = weights_h5_bytes(model)
    if data is None:  # no in-memory store in this Keras: HDF5 writes the file itself
        model.save_weights(path)
        return
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder of ``run_dir``, or None if there is none.

    Reads ``checkpoints/latest``; if it is missing or names a folder that is gone, falls back to
    the highest-numbered complete ``epoch-*`` folder.
    """
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if (candidate / WEIGHTS).is_file() and (candidate / STATE).is_file():
            return candidate
    complete = sorted(
        p for p in root.glob("epoch-*")
        if p.is_dir() and ".tmp-" not in p.name and (p / WEIGHTS).is_file() and (p / STATE).is_file()
    )
    return complete[-1] if complete else None


def load_checkpoint(checkpoint: str | os.PathLike, model) -> dict[str, Any]:
    """Restore weights and optimizer state into ``model`` (compiled, same architecture).

    Returns:
        The saved training state dict.

    Raises:
        InputError: the checkpoint files are missing or do not match the model.
    """
    checkpoint = Path(checkpoint)
    state_path = checkpoint / STATE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(state_path, "a training state JSON file", f"an unreadable file ({exc})") from exc
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and not optimizer.built:
        # Optimizer variables must exist before their saved values can be loaded into them.
        optimizer.build(model.trainable_variables)
    try:
        model.load_weights(checkpoint / WEIGHTS)
    except Exception as exc:  # h5py / Keras raise several types for a mismatched file
        raise InputError(
            checkpoint / WEIGHTS,
            "weights of the same model architecture and optimizer",
            f"an incompatible or damaged file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
        ) from exc
    return state


def _fsync_dir(path: Path) -> None:
    # Persist the directory entry itself (a rename is durable only after its folder is synced).
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
