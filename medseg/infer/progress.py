"""Progress and cancelling of one segmentation (:meth:`medseg.infer.predictor.Predictor.segment`).

A :class:`Progress` lives for one call: the :class:`~medseg.infer.predictor.Predictor` keeps no
state between calls, so a cancelled call leaves it ready for the next one.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

from medseg.events import (Cancelled, CancelToken, ChunkProgress, EventSink, Failed, Finished, RunCancelled,
                           RunStarted, emit)

__all__ = ["Progress"]


class Progress:
    """Counts the units of work of one segmentation and reports them.

    A unit is one model call: a batch of slices for one test-time flip. The total is announced
    (:meth:`expect`) before the first model call, so each :class:`ChunkProgress` carries
    ``done`` of ``total`` with ``done`` increasing by one up to ``total``.

    Args:
        events: where events go (None: nowhere).
        cancel: checked before each batch (:meth:`check`); None never cancels.
        case_id: named in the events.
        variants: model calls per batch (test-time flips).
    """

    def __init__(self, events: EventSink | None, cancel: CancelToken | None, case_id: str, variants: int = 1):
        self.events, self.cancel, self.case_id, self.variants = events, cancel, case_id, int(variants)
        self.total = self.done = 0
        self.start = time.perf_counter()

    def expect(self, batches: int) -> None:
        """Announce ``batches`` more batches of slices (each ``variants`` units)."""
        self.total += int(batches) * self.variants

    def check(self) -> None:
        """Raise :class:`RunCancelled` when the caller cancelled (between batches)."""
        if self.cancel is not None:
            self.cancel.raise_if_cancelled()

    def step(self) -> None:
        """One model call done."""
        self.done += 1
        emit(self.events, ChunkProgress(self.case_id, self.done, max(self.total, self.done),
                                        time.perf_counter() - self.start))

    def run(self, settings: Mapping[str, Any], work, summary) -> Any:
        """``work(self)`` between :class:`RunStarted` and :class:`Finished` (``summary(result)``);
        a cancel emits :class:`Cancelled` and re-raises :class:`RunCancelled`, an error emits
        :class:`Failed` and re-raises: nothing half-made is returned."""
        emit(self.events, RunStarted("segment", dict(settings)))
        try:
            self.check()
            result = work(self)
        except RunCancelled as exc:
            emit(self.events, Cancelled("segment", reason=str(exc)))
            raise
        except Exception as exc:
            emit(self.events, Failed("segment", f"{type(exc).__name__}: {exc}"))
            raise
        emit(self.events, Finished("segment", {"case_id": self.case_id, "units": self.done,
                                               "seconds": time.perf_counter() - self.start, **summary(result)}))
        return result
