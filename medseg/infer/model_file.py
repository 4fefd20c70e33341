"""The ``model.keras`` file of a bundle: its digest, soundness checks and loading.

Split from :mod:`medseg.infer.bundle` (which calls these); Keras is imported inside the functions.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from medseg.errors import InputError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import keras

log = logging.getLogger("medseg.infer.bundle")


def versions() -> dict[str, str]:
    import keras
    import numpy as np
    import tensorflow as tf

    import medseg

    return {
        "medseg": medseg.__version__, "tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__
    }


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def zip_problem(model_path: Path) -> str | None:
    """Why ``model_path`` is not a sound zip archive (a ``.keras`` file is one), or None."""
    import zipfile

    size = model_path.stat().st_size
    if not zipfile.is_zipfile(model_path):
        return f"a corrupt or truncated file (not a zip archive, {size} bytes)"
    try:
        with zipfile.ZipFile(model_path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        return f"a corrupt zip archive ({exc})"
    return None if bad is None else f"a corrupt zip archive (damaged member {bad!r})"


def check_model_file(model_path: Path, recorded: str | None, bundle_path: Path, accept_modified: bool) -> None:
    """Refuse a corrupt ``model.keras`` or, unless ``accept_modified``, one that is not the model
    ``bundle.json`` recorded: the plan and threshold in it were chosen for that model."""
    try:
        found = sha256(model_path)
    except OSError as exc:
        raise InputError(model_path, "a readable Keras model file", exc.strerror or str(exc)) from exc
    if recorded and found == recorded:
        return
    # A changed digest is most often damage (a truncated copy): say so rather than "modified".
    problem = zip_problem(model_path)
    if problem is not None:
        raise InputError(model_path, "a Keras 3 model file (.keras zip)", problem,
                         "the file is damaged: copy the run folder again or retrain")
    if not recorded:
        return
    if not accept_modified:
        raise InputError(
            model_path, f"the model recorded in {bundle_path} (SHA-256 {recorded[:12]}...)",
            f"another file (SHA-256 {found[:12]}...)",
            "replaced after training; pass --accept-modified-model to use it anyway",
        )
    log.warning("%s: not the model recorded in %s (SHA-256 %s... instead of %s...): used anyway, as asked",
                model_path, bundle_path, found[:12], recorded[:12])


def load_model(model_path: Path) -> "keras.Model":
    import keras

    # Networks' serializable Keras classes register themselves on import; load_model may need them.
    from medseg.nets.registry import load_networks

    load_networks()

    try:
        return keras.saving.load_model(model_path, compile=False)
    except Exception as exc:  # zipfile, h5py, JSON and Keras deserialization errors all mean "corrupt"
        # Keras words an unreadable archive "File not found"; the file is there, its content is wrong.
        problem = zip_problem(model_path) or f"an unreadable model ({type(exc).__name__}: {exc})"
        raise InputError(model_path, "a Keras 3 model file (.keras zip)", problem) from exc


def warn_on_version_change(saved: Mapping[str, str], bundle_path: Path) -> None:
    try:
        now = versions()
    except ImportError:  # pragma: no cover
        return
    for name in ("keras", "tensorflow"):
        old, new = saved.get(name), now.get(name)
        if old and new and old.split(".")[0] != new.split(".")[0]:
            log.warning("%s: saved with %s %s, running %s %s", bundle_path, name, old, name, new)
