"""Shared plumbing of the ``medseg-*`` commands: ``--debug``, logging, error -> one line.

Every command follows the same pattern::

    def main(argv=None) -> int:
        parser = argparse.ArgumentParser(prog="medseg-check", description=...)
        add_common_args(parser)              # --debug, --quiet
        args = parser.parse_args(argv)       # usage errors: argparse exits 2
        setup_logging(args)
        return run_command("medseg-check", args, lambda: _run(args))

``run_command`` turns a :class:`medseg.errors.MedsegError` (bad input, bad dataset) or an
``OSError`` (disk full, permission denied on an output) into one line on stderr,
``medseg-NAME: error: <message>``, and exit code 2; ``--debug`` re-raises so the traceback shows.
Kept free of heavy imports: importing it must not import TensorFlow or nibabel.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import Callable, Iterator

from medseg.errors import MedsegError

#: Exit codes shared by every command.
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--debug`` (tracebacks, debug logging) and ``--quiet`` (warnings only) to ``parser``."""
    parser.add_argument(
        "--debug", action="store_true", help="show full tracebacks and debug logging (for bug reports)"
    )
    parser.add_argument("--quiet", action="store_true", help="print only warnings and errors")
    return parser


def setup_logging(args: argparse.Namespace | None = None, *, debug: bool = False, quiet: bool = False) -> None:
    """Configure the ``medseg`` logger once: messages to stderr, level from ``--debug``/``--quiet``.

    Only the ``medseg`` logger is touched, so libraries keep their own settings; TensorFlow's C++
    chatter is silenced (``TF_CPP_MIN_LOG_LEVEL=2``) unless ``--debug`` is given or it is already set.
    """
    if args is not None:
        debug = bool(getattr(args, "debug", debug))
        quiet = bool(getattr(args, "quiet", quiet))
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    logger = logging.getLogger("medseg")
    logger.setLevel(level)
    if not any(getattr(h, "_medseg_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if debug else "%(message)s"))
        handler._medseg_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False
    if not debug:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextlib.contextmanager
def native_stderr_silenced(enabled: bool = True) -> Iterator[None]:
    """Send what native code writes to file descriptor 2 to /dev/null inside the block.

    TensorFlow's start-up lines (absl's "All log messages before absl::InitializeLog()", oneDNN
    and CUDA-stub notices, and an error-level ``failed call to cuInit`` on machines without a
    GPU) are written by C++ before ``TF_CPP_MIN_LOG_LEVEL`` applies. Python exceptions are not
    affected: they propagate and are printed after the block.
    """
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_tensorflow_quietly(debug: bool = False) -> None:
    """Import TensorFlow and initialise its devices with the start-up chatter silenced
    (shown with ``--debug``), so a command's output starts with its own lines."""
    with native_stderr_silenced(not debug):
        import tensorflow as tf

        tf.config.list_physical_devices()


def error_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (a multi-line problem list is joined with ``"; "``)."""
    if isinstance(exc, OSError) and not isinstance(exc, MedsegError):
        # OSError's str() puts errno first; lead with the path the user can act on.
        what = exc.strerror or str(exc)
        path = exc.filename
        text = f"{path}: {what}" if path else what
    else:
        text = str(exc) or type(exc).__name__
    parts = [p.strip() for p in text.splitlines() if p.strip()]
    parts = [p[2:] if p.startswith("- ") else p for p in parts]
    return "; ".join(parts)


def run_command(prog: str, args: argparse.Namespace, func: Callable[[], int | None]) -> int:
    """Run ``func`` and map user-facing errors to one line on stderr.

    Args:
        prog: command name used as prefix, e.g. ``"medseg-check"``.
        args: parsed arguments; ``args.debug`` True re-raises instead of printing one line.
        func: the command's work; its return value (None -> 0) is the exit code.

    Returns:
        ``func``'s exit code, 2 for a :class:`MedsegError` or ``OSError``, 130 on Ctrl-C, 1 for
        any other exception (one line naming it; ``--debug`` shows the traceback).
    """
    try:
        code = func()
        return EXIT_OK if code is None else int(code)
    except (MedsegError, OSError) as exc:
        if getattr(args, "debug", False):
            raise
        print(f"{prog}: error: {error_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an unforeseen failure: one line, the traceback on request
        if getattr(args, "debug", False):
            raise
        print(f"{prog}: error: unexpected {type(exc).__name__}: {error_line(exc)} "
              f"(rerun with --debug for the traceback, and please report it)", file=sys.stderr)
        return EXIT_FAILED
