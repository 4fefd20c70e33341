"""Events of a training or segmentation run, and the token a caller cancels it with.

One protocol for :func:`medseg.train.train` and :meth:`medseg.infer.Predictor.segment`: the run
calls ``events(event)`` for each :class:`Event`, in order, on the thread that runs it; the
command lines print by subscribing (:class:`Printer`), a viewer or a notebook passes its own
callable. A sink that raises stops the run (its error propagates): sinks should be quick.

    >>> seen = []
    >>> emit(seen.append, Message("hello"))
    >>> seen[0].text
    'hello'
    >>> token = CancelToken(); token.cancel("user"); token.cancelled
    True

Cancelling is cooperative: a run checks its token between steps (training) or chunks
(segmentation) and then ends with :class:`RunCancelled` after emitting :class:`Cancelled`.
Emitting to ``None`` does nothing, so library code never tests whether a caller subscribed.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Optional, TextIO

from medseg.errors import MedsegError

__all__ = [
    "Event", "Message", "OutOfRange", "RunStarted", "StepProgress", "EpochEnd", "ValidationResult", "CheckpointWritten",
    "ChunkProgress", "Finished", "Cancelled", "Failed", "EventSink", "CancelToken", "RunCancelled", "emit",
    "Printer", "Recorder", "fan_out",
]


@dataclass(frozen=True)
class Event:
    """Base of every event; ``kind`` names it in logs and JSON (``event.kind == "epoch_end"``)."""

    kind: ClassVar[str] = "event"

    def to_dict(self) -> dict[str, Any]:
        out = {"kind": self.kind}
        out.update({k: v for k, v in self.__dict__.items()})
        return out


@dataclass(frozen=True)
class Message(Event):
    """A line meant for a person (what the command lines print), e.g. ``medseg-train: run folder ...``.

    ``level`` is ``"info"``, ``"warning"`` or ``"detail"`` (printed only when verbose).
    ``stream`` is ``"stdout"`` or ``"stderr"``: where a command line prints it.
    """

    kind: ClassVar[str] = "message"
    text: str
    level: str = "info"
    stream: str = "stdout"


@dataclass(frozen=True)
class OutOfRange(Message):
    """A scan unlike the training scans (:func:`medseg.infer.range_check.check_scan`): ``text`` is
    the one-line warning (printed like any Message), ``check`` the structured findings
    (:meth:`medseg.infer.range_check.RangeCheck.to_dict`) a viewer or a report shows."""

    kind: ClassVar[str] = "out_of_range"
    check: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunStarted(Event):
    """A run began. ``task`` is ``"train"`` or ``"segment"``; ``settings`` the resolved settings
    (training: the resolved configuration as a dict; segmentation: case id, model, TTA...)."""

    kind: ClassVar[str] = "run_started"
    task: str
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StepProgress(Event):
    """Training step ``step`` (1-based within the epoch) of ``steps`` done.

    ``time_left_s``: the budget's remaining seconds (``--max-time-s``), else an estimate from the
    mean step time, None before the first step was timed.
    """

    kind: ClassVar[str] = "step"
    epoch: int
    step: int
    steps: int | None
    elapsed_s: float
    time_left_s: float | None = None


@dataclass(frozen=True)
class EpochEnd(Event):
    """Epoch ``epoch`` (1-based) of ``epochs`` ended; ``logs`` holds the losses and metrics
    (``loss``, ``data_loss``, ``reg_loss``, ``dice``, ``val_dsc_3d``, ``lr``...)."""

    kind: ClassVar[str] = "epoch_end"
    epoch: int
    epochs: int
    logs: Mapping[str, float]
    duration_s: float
    time_left_s: float | None = None


@dataclass(frozen=True)
class ValidationResult(Event):
    """Whole-volume validation after epoch ``epoch``: ``per_class`` maps class name -> metric ->
    mean over the validation cases (``dsc``, ``hd95_mm``...); ``validation`` says on what
    (``"held-out cases"`` or ``"training cases"``)."""

    kind: ClassVar[str] = "validation"
    epoch: int
    per_class: Mapping[str, Mapping[str, float]]
    mean_dsc: float
    validation: str = "held-out cases"


@dataclass(frozen=True)
class CheckpointWritten(Event):
    """A checkpoint (``what="checkpoint"``) or the bundle (``what="bundle"``) was written at ``path``."""

    kind: ClassVar[str] = "checkpoint"
    epoch: int
    path: str
    what: str = "checkpoint"


@dataclass(frozen=True)
class ChunkProgress(Event):
    """Segmentation: ``done`` of ``total`` units (chunks of slices, times TTA variants) of ``case_id``."""

    kind: ClassVar[str] = "chunk"
    case_id: str
    done: int
    total: int
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class Finished(Event):
    """The run ended normally; ``summary`` holds its headline figures (JSON-friendly)."""

    kind: ClassVar[str] = "finished"
    task: str
    summary: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Cancelled(Event):
    """The run stopped at a cancel request; ``checkpoint`` is what it left (None: nothing written)."""

    kind: ClassVar[str] = "cancelled"
    task: str
    reason: str = ""
    checkpoint: Optional[str] = None


@dataclass(frozen=True)
class Failed(Event):
    """The run ended with an error; ``error`` is its one-line text."""

    kind: ClassVar[str] = "failed"
    task: str
    error: str


EventSink = Callable[[Event], None]


class RunCancelled(MedsegError):
    """A run stopped because its :class:`CancelToken` was cancelled (raised after :class:`Cancelled`)."""

    def __init__(self, message: str = "cancelled", checkpoint: str | None = None):
        self.checkpoint = checkpoint
        super().__init__(message)


class CancelToken:
    """Thread-safe flag a caller sets to stop a run at its next step or chunk."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def cancel(self, reason: str = "cancelled by the caller") -> None:
        self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self, checkpoint: str | None = None) -> None:
        if self._event.is_set():
            raise RunCancelled(self.reason or "cancelled", checkpoint)


def emit(events: EventSink | None, event: Event) -> None:
    """Send ``event`` to ``events`` (nothing when None)."""
    if events is not None:
        events(event)


def fan_out(*sinks: EventSink | None) -> EventSink | None:
    """One sink calling each of ``sinks`` (Nones left out) in order; None when none is left."""
    real = [s for s in sinks if s is not None]
    if not real:
        return None
    if len(real) == 1:
        return real[0]

    def sink(event: Event) -> None:
        for s in real:
            s(event)

    return sink


class Printer:
    """The command lines' subscriber: prints :class:`Message` texts (``detail`` only when verbose).

    Other events print nothing here: what a command shows of them is already a Message.
    """

    def __init__(self, verbose: bool = False, stdout: TextIO | None = None, stderr: TextIO | None = None):
        self.verbose = verbose
        self._out = stdout
        self._err = stderr

    def __call__(self, event: Event) -> None:
        if not isinstance(event, Message) or (event.level == "detail" and not self.verbose):
            return
        stream = (self._err or sys.stderr) if event.stream == "stderr" else (self._out or sys.stdout)
        print(event.text, file=stream, flush=True)


class Recorder(list):
    """A sink that keeps every event (tests, notebooks): ``rec.kinds()`` lists their kinds."""

    def __call__(self, event: Event) -> None:
        self.append(event)

    def kinds(self) -> list[str]:
        return [e.kind for e in self]

    def of(self, cls: type) -> list:
        return [e for e in self if isinstance(e, cls)]
