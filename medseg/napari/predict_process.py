"""The Predictor in a child process that the segment widget's napari worker drives.

Why a process: a napari viewer's OpenGL context on Mesa (llvmpipe under Xvfb, radeonsi on AMD
GPUs) loads Mesa's ``libLLVM``, whose symbols clash with TensorFlow's own LLVM: measured here
(napari 0.9.2, PyQt6, Mesa 22.3, TensorFlow 2.21), importing TensorFlow after the canvas exists
crashes the interpreter (segmentation fault), and importing it before makes it abort on exit
(``free(): invalid pointer``). TensorFlow therefore never loads in the viewer's process: a
spawned child (kept for the session, its Predictors cached per bundle and TTA setting) runs
:meth:`medseg.infer.Predictor.segment`, sending each :class:`~medseg.events.ChunkProgress` back
as it happens. A cancel sets a shared flag the child's :class:`~medseg.events.CancelToken`
reads between batches. If the child dies (out of memory, killed), the run fails with one line
and the next run starts a new child. No napari or Qt here: the child imports none.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from typing import Any, Callable

import numpy as np

from medseg.events import CancelToken, ChunkProgress, RunCancelled

__all__ = ["PredictorProcess", "SharedCancel"]


class SharedCancel(CancelToken):
    """A :class:`CancelToken` whose flag is a ``multiprocessing`` Event set by the parent."""

    def __init__(self, flag) -> None:
        super().__init__()
        self._flag = flag

    def cancel(self, reason: str = "cancelled by the caller") -> None:
        self.reason = reason
        self._flag.set()

    @property
    def cancelled(self) -> bool:
        return self._flag.is_set()

    def raise_if_cancelled(self, checkpoint: str | None = None) -> None:
        if self._flag.is_set():
            raise RunCancelled(self.reason or "cancelled in napari", checkpoint)


def _error_text(exc: BaseException) -> str:
    from medseg.napari.reader import error_text

    return error_text(exc)


def _predictor(cache: dict, run_dir: str, tta: bool):
    if (run_dir, tta) not in cache:
        from medseg.infer.bundle import load_bundle
        from medseg.infer.predictor import Predictor

        cache[(run_dir, tta)] = Predictor(load_bundle(run_dir), tta=tta)
    return cache[(run_dir, tta)]


def _segment(cache: dict, request: dict, conn, flag) -> tuple:
    """One request in the child: ``("done", {...})``, ``("cancelled",)`` or ``("error", line)``."""
    from medseg.infer.predictor import check_image
    from medseg.io.volume import Volume
    from medseg.napari.layers import classes_of_predictor

    try:
        predictor = _predictor(cache, request["run_dir"], request["tta"])
        if request.get("load_only"):
            return ("loaded",)
        volume = Volume(request["array"], request["affine"], request["case_id"], request["meta"])
        check_image(volume, volume.meta.get("source_path") or volume.case_id)
        warning = predictor.check_modality(volume)

        def events(event) -> None:
            if isinstance(event, ChunkProgress):
                conn.send(("chunk", event.done, event.total))

        start = time.perf_counter()
        labels = predictor.segment(volume, largest_component=None if request["post"] else False, events=events,
                                   cancel=SharedCancel(flag))
        return ("done", {"array": np.asarray(labels.array), "classes": classes_of_predictor(predictor),
                         "seconds": time.perf_counter() - start, "warning": warning})
    except RunCancelled:
        return ("cancelled",)
    except MemoryError:
        return ("error", "medseg: error: out of memory while segmenting")
    except Exception as exc:  # noqa: BLE001 - one line to the widget; nothing half-made is returned
        return ("error", _error_text(exc))


def _serve(conn, flag) -> None:
    """The child's loop: requests until ``None`` or the parent goes away."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cache: dict = {}
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        conn.send(_segment(cache, request, conn, flag))


class PredictorProcess:
    """The parent's handle on the child (started on first use; one request at a time).

    :meth:`shared` is the one child of a napari session: every segment widget uses it, so
    TensorFlow and each model load once.
    """

    _shared: "PredictorProcess | None" = None

    @classmethod
    def shared(cls) -> "PredictorProcess":
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def __init__(self) -> None:
        self._proc = None
        self._conn = None
        self._flag = None
        self._lock = threading.Lock()

    def _ensure(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        ctx = mp.get_context("spawn")  # never fork a process holding Qt and OpenGL
        self._conn, child = ctx.Pipe()
        self._flag = ctx.Event()
        self._proc = ctx.Process(target=_serve, args=(child, self._flag), daemon=True, name="medseg-predictor")
        self._proc.start()
        child.close()

    def request(self, request: dict, on_chunk: Callable[[int, int], None] | None = None) -> tuple:
        """Send ``request`` and wait for its answer, passing chunk progress to ``on_chunk``."""
        with self._lock:
            self._ensure()
            self._flag.clear()
            self._conn.send(request)
            while True:
                if not self._conn.poll(0.05):
                    if not self._proc.is_alive():
                        code = self._proc.exitcode
                        self._proc = None
                        return ("error", f"medseg: error: the segmentation process ended (exit code {code}; out of "
                                         "memory?); the next run starts a new one")
                    continue
                message = self._conn.recv()
                if message[0] == "chunk":
                    if on_chunk is not None:
                        on_chunk(message[1], message[2])
                    continue
                return message

    def load(self, run_dir: str, tta: bool) -> tuple:
        """Load the bundle's Predictor in the child ahead of the first run."""
        return self.request({"run_dir": str(run_dir), "tta": bool(tta), "load_only": True})

    def segment(self, volume, run_dir: str, tta: bool, post: bool,
                on_chunk: Callable[[int, int], None] | None = None) -> tuple:
        """Segment the Volume ``volume`` in the child (see :func:`_segment` for the answers)."""
        request = {"run_dir": str(run_dir), "tta": bool(tta), "post": bool(post), "array": np.asarray(volume.array),
                   "affine": np.asarray(volume.affine), "case_id": volume.case_id, "meta": dict(volume.meta)}
        return self.request(request, on_chunk)

    def cancel(self) -> None:
        if self._flag is not None:
            self._flag.set()

    def close(self) -> None:
        """Stop the child (it also ends with the parent: a daemon process)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            self._conn.send(None)
        except (OSError, ValueError):
            pass
        proc.join(5)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
