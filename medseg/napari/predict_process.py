"""The Predictor in a child process that the segment widget's napari worker drives.

Why a process: a napari viewer's OpenGL context on Mesa (llvmpipe under Xvfb, radeonsi on AMD
GPUs) loads Mesa's ``libLLVM``, whose symbols clash with TensorFlow's own LLVM: measured here
(napari 0.9.2, PyQt6, Mesa 22.3, TensorFlow 2.21), importing TensorFlow after the canvas exists
crashes the interpreter (segmentation fault), and importing it before makes it abort on exit
(``free(): invalid pointer``). TensorFlow therefore never loads in the viewer's process: a
child (``python -m medseg.napari.predict_process``, kept for the session, its Predictors cached
per bundle and TTA setting) runs :meth:`medseg.infer.Predictor.segment`, sending each
:class:`~medseg.events.ChunkProgress` back as it happens; a cancel message sets the run's
:class:`~medseg.events.CancelToken`, checked between batches. A plain subprocess, not
``multiprocessing``'s spawn: spawn re-runs the user's main script in the child, and napari
scripts rarely guard it with ``if __name__ == "__main__"``. If the child dies (out of memory, killed), the run fails with one line
and the next run starts a new child. No napari or Qt here: the child imports none.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from typing import Callable

import numpy as np

from medseg.events import CancelToken, ChunkProgress, RunCancelled

__all__ = ["PredictorProcess"]

#: Environment variable carrying the connection's key to the child (not on its command line).
_KEY_ENV = "MEDSEG_PREDICTOR_KEY"
#: Seconds the child has to connect back after it starts.
_CONNECT_S = 120.0


def _error_text(exc: BaseException) -> str:
    from medseg.napari.reader import error_text

    return error_text(exc)


def _predictor(cache: dict, run_dir: str, tta: bool):
    if (run_dir, tta) not in cache:
        from medseg.infer.bundle import load_bundle
        from medseg.infer.predictor import Predictor

        cache[(run_dir, tta)] = Predictor(load_bundle(run_dir), tta=tta)
    return cache[(run_dir, tta)]


def _segment(cache: dict, request: dict, conn) -> tuple:
    """One request in the child: ``("done", {...})``, ``("loaded",)``, ``("cancelled",)`` or
    ``("error", line)``."""
    from medseg.infer.predictor import check_image
    from medseg.io.volume import Volume
    from medseg.napari.layers import classes_of_predictor

    token = CancelToken()
    read_cancel = cancel_reader(conn, token)

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
                read_cancel()

        read_cancel()
        start = time.perf_counter()
        labels = predictor.segment(volume, largest_component=None if request["post"] else False, events=events,
                                   cancel=token)
        return ("done", {"array": np.asarray(labels.array), "classes": classes_of_predictor(predictor),
                         "seconds": time.perf_counter() - start, "warning": warning})
    except RunCancelled:
        return ("cancelled",)
    except MemoryError:
        return ("error", "medseg: error: out of memory while segmenting")
    except Exception as exc:  # noqa: BLE001 - one line to the widget; nothing half-made is returned
        return ("error", _error_text(exc))


def connect_to_parent(address: str, key_env: str):
    """The child's side of :func:`spawn_child`: the connection back to the parent."""
    from multiprocessing.connection import Client

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return Client(address, authkey=bytes.fromhex(os.environ.pop(key_env)))


def cancel_reader(conn, token: CancelToken):
    """A callable that drains the parent's messages and cancels ``token`` on ``("cancel",)``;
    the child calls it between steps or chunks."""
    def read() -> None:
        while conn.poll():
            if conn.recv() == ("cancel",):
                token.cancel("cancelled in napari")
    return read


def serve(address: str) -> None:
    """The child: connect back, then answer requests until ``None`` or the parent goes away."""
    conn = connect_to_parent(address, _KEY_ENV)
    cache: dict = {}
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        if isinstance(request, dict):  # a late ("cancel",) of a finished run is dropped
            conn.send(_segment(cache, request, conn))


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
        self._proc: subprocess.Popen | None = None
        self._conn = None
        self._lock = threading.Lock()  # one request at a time
        self._send_lock = threading.Lock()  # a cancel (GUI thread) and a request (worker) both send

    def _ensure(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self._proc, self._conn = spawn_child("medseg.napari.predict_process", _KEY_ENV, "segmentation")

    def request(self, request: dict, on_chunk: Callable[[int, int], None] | None = None) -> tuple:
        """Send ``request`` and wait for its answer, passing chunk progress to ``on_chunk``."""
        with self._lock:
            try:
                self._ensure()
                with self._send_lock:
                    self._conn.send(request)
                return await_answer(self._conn, self._proc, lambda message: message[0] != "chunk",
                                    None if on_chunk is None else lambda message: on_chunk(message[1], message[2]))
            except (EOFError, OSError, RuntimeError) as exc:
                code = None if self._proc is None else self._proc.poll()
                self._stop()
                return ("error", f"medseg: error: the segmentation process ended ({exc or 'exit code'} {code}; out "
                                 "of memory?); the next run starts a new one")

    def load(self, run_dir, tta: bool) -> tuple:
        """Load the bundle's Predictor in the child ahead of the first run."""
        return self.request({"run_dir": str(run_dir), "tta": bool(tta), "load_only": True})

    def segment(self, volume, run_dir, tta: bool, post: bool,
                on_chunk: Callable[[int, int], None] | None = None) -> tuple:
        """Segment the Volume ``volume`` in the child (see :func:`_segment` for the answers)."""
        request = {"run_dir": str(run_dir), "tta": bool(tta), "post": bool(post), "array": np.asarray(volume.array),
                   "affine": np.asarray(volume.affine), "case_id": volume.case_id, "meta": dict(volume.meta)}
        return self.request(request, on_chunk)

    def cancel(self) -> None:
        """Ask the running request to stop at its next batch of slices."""
        conn = self._conn
        if conn is None:
            return
        try:
            with self._send_lock:
                conn.send(("cancel",))
        except (OSError, ValueError):
            pass

    def _stop(self) -> None:
        proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if conn is not None:
            try:
                conn.send(None)
                conn.close()
            except (OSError, ValueError):
                pass
        if proc is not None:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def close(self) -> None:
        """Stop the child (it also ends when this process ends: its connection closes)."""
        with self._lock:
            self._stop()


if __name__ == "__main__":
    serve(sys.argv[1])


def spawn_child(module: str, key_env: str, what: str) -> tuple:
    """``(process, connection)``: ``python -m module ADDRESS`` started and connected back over an
    authenticated local socket (the key travels in ``key_env``, never on the command line).

    Raises:
        RuntimeError: the child exited or did not connect within ``_CONNECT_S`` (it is killed).
    """
    from multiprocessing.connection import Listener

    key = secrets.token_bytes(32)
    with Listener(authkey=key) as listener:
        env = dict(os.environ, **{key_env: key.hex()})
        proc = subprocess.Popen([sys.executable, "-m", module, str(listener.address)], env=env)
        accepted: list = []
        thread = threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True)
        thread.start()
        deadline = time.monotonic() + _CONNECT_S
        while thread.is_alive() and proc.poll() is None and time.monotonic() < deadline:
            thread.join(0.05)
        if not accepted:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise RuntimeError(f"the {what} process did not start")
        return proc, accepted[0]


def await_answer(conn, proc: subprocess.Popen, is_answer: Callable[[tuple], bool],
                 on_progress: Callable[[tuple], None] | None = None) -> tuple:
    """The child's answer on ``conn``: the first message ``is_answer`` accepts; the others
    (progress) go to ``on_progress`` (None: dropped) as they come.

    Raises:
        EOFError: the child exited before answering (polled every 50 ms, so a child killed by the
            system is noticed instead of waited on forever).
    """
    while True:
        if not conn.poll(0.05):
            if proc.poll() is not None:
                raise EOFError
            continue
        message = conn.recv()
        if is_answer(message):
            return message
        if on_progress is not None:
            on_progress(message)
