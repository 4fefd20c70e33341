"""A fine-tuning run of the napari plugin, in a child process (no napari or Qt here).

As :mod:`medseg.napari.predict_process` explains, TensorFlow never loads in the viewer's process.
One child per run (``python -m medseg.napari.finetune_process``, a plain subprocess): it calls
:func:`medseg.train.finetune.finetune` on the bundle's training data plus the corrected scan,
then segments the scan with the new bundle (:meth:`medseg.infer.Predictor.segment`), sending each
:class:`~medseg.events.StepProgress` and :class:`~medseg.events.ChunkProgress` to the parent as it
happens. A ``("cancel",)`` message sets the run's :class:`~medseg.events.CancelToken` (checked
between training steps and batches of slices); the child ends with the run, so its memory goes
with it. Answers: ``("done", {...})``, ``("cancelled", line)``, ``("error", line)``.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Callable

import numpy as np

from medseg.events import CancelToken, ChunkProgress, RunCancelled, StepProgress

__all__ = ["FineTuneProcess", "run_request"]

_KEY_ENV = "MEDSEG_FINETUNE_KEY"


def _line(exc: BaseException) -> str:
    from medseg.napari.reader import error_text

    return error_text(exc)


def run_request(request: dict, send: Callable[[tuple], None], token: CancelToken,
                poll: Callable[[], None] = lambda: None) -> tuple:
    """Fine-tune, then re-segment; every failure is one line (nothing half-made is returned).

    ``request``: ``bundle``, ``image`` / ``label`` (arrays on one grid), ``affine``, ``case_id``,
    ``meta``, ``ignore_label``, ``budget_s``, ``settings`` (further training settings).
    """
    from medseg.io.volume import Volume

    def events(event) -> None:
        if isinstance(event, StepProgress):
            send(("step", float(event.elapsed_s), event.time_left_s))
        elif isinstance(event, ChunkProgress):
            send(("chunk", int(event.done), int(event.total)))
        poll()

    new_bundle = None
    try:
        from medseg.infer.bundle import load_bundle
        from medseg.infer.predictor import Predictor
        from medseg.napari.layers import classes_of_predictor
        from medseg.train.finetune import finetune

        image = Volume(request["image"], request["affine"], request["case_id"], request["meta"])
        label = Volume(request["label"], request["affine"], request["case_id"], {})
        poll()
        token.raise_if_cancelled()
        start = time.perf_counter()
        result = finetune(request["bundle"], image=image, label=label, budget_s=request["budget_s"],
                          ignore_label=request["ignore_label"], case_id=request["case_id"], events=events,
                          cancel=token, **request.get("settings", {}))
        new_bundle = str(result.bundle_dir)
        train_s = time.perf_counter() - start
        send(("segmenting", new_bundle))
        predictor = Predictor(load_bundle(new_bundle))
        labels = predictor.segment(image, events=events, cancel=token)
        return ("done", {"bundle": new_bundle, "labels": np.asarray(labels.array), "train_s": train_s,
                         "steps": int(result.steps), "classes": classes_of_predictor(predictor)})
    except RunCancelled:
        where = f"; the fine-tuned model is in {new_bundle}" if new_bundle else ""
        return ("cancelled", f"medseg: fine-tuning cancelled{where}")
    except MemoryError:
        return ("error", "medseg: error: out of memory while fine-tuning")
    except Exception as exc:  # noqa: BLE001 - one line to the widget
        return ("error", _line(exc))


def serve(address: str) -> None:
    """The child: connect back, answer one request, end."""
    from medseg.napari.predict_process import cancel_reader, connect_to_parent

    conn = connect_to_parent(address, _KEY_ENV)
    token = CancelToken()
    poll = cancel_reader(conn, token)

    try:
        request = conn.recv()
    except (EOFError, OSError):
        return
    conn.send(run_request(request, conn.send, token, poll))
    conn.close()


class FineTuneProcess:
    """The parent's handle on one fine-tuning child: :meth:`run` (worker thread) and :meth:`cancel`."""

    def __init__(self) -> None:
        self._conn = None
        self._proc: subprocess.Popen | None = None
        self._cancelled = threading.Event()
        self._send_lock = threading.Lock()

    def _start(self) -> None:
        from medseg.napari.predict_process import spawn_child

        self._proc, self._conn = spawn_child("medseg.napari.finetune_process", _KEY_ENV, "fine-tuning")

    def run(self, request: dict, on_message: Callable[[tuple], None] | None = None) -> tuple:
        """Start the child, send ``request``, pass its progress messages to ``on_message`` and
        return its answer (``("error", line)`` when the child dies or never starts)."""
        from medseg.napari.predict_process import await_answer

        try:
            self._start()
            with self._send_lock:
                self._conn.send(request)
                if self._cancelled.is_set():
                    self._conn.send(("cancel",))
            return await_answer(self._conn, self._proc, lambda message: message[0] in ("done", "cancelled", "error"),
                                on_message)
        except (EOFError, OSError, RuntimeError) as exc:
            if self._cancelled.is_set():
                return ("cancelled", "medseg: fine-tuning cancelled")
            code = None if self._proc is None else self._proc.poll()
            return ("error", f"medseg: error: the fine-tuning process ended ({exc or 'exit code'} {code}; out of "
                             "memory?)")
        finally:
            self._stop()

    def cancel(self) -> None:
        """Ask the run to stop at its next training step or batch of slices."""
        self._cancelled.set()
        with self._send_lock:
            if self._conn is not None:
                try:
                    self._conn.send(("cancel",))
                except (OSError, ValueError):
                    pass

    def _stop(self) -> None:
        with self._send_lock:
            proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if conn is not None:
            conn.close()
        if proc is not None:  # reaped off the worker thread: the result need not wait for TensorFlow's exit
            threading.Thread(target=_reap, args=(proc,), daemon=True).start()


def _reap(proc: subprocess.Popen) -> None:
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


if __name__ == "__main__":
    serve(sys.argv[1])
