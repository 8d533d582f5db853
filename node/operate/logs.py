"""Logging set-up: one line per association, study, job and delivery, with UIDs.

Patient names and IDs are never logged at INFO level; UIDs identify studies for the
PACS administrator without identifying the patient.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import NoReturn

#: Libraries whose INFO and WARNING records are chatter for a PACS administrator. pynetdicom logs
#: every PDU, highdicom every module it copies, alembic every migration step; our own lines say what
#: happened to each association, study, job and delivery. Library warnings (pydicom, highdicom via
#: ``warnings``) quote attribute values, patient names among them. All of it is DEBUG.
LIBRARY_LOGGERS = ("highdicom", "pydicom", "pynetdicom", "alembic", "py.warnings")


def _is_library(name: str) -> bool:
    return any(name == lib or name.startswith(lib + ".") for lib in LIBRARY_LOGGERS)


class _LibraryChatterAsDebug(logging.Filter):
    """Show a library's records below ERROR as DEBUG lines (they only get here when DEBUG is on)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR and _is_library(record.name):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


class _LibraryErrorsOnOneLine(logging.Filter):
    """A library's error with a traceback becomes one line: what failed, the exception's type and message.

    pynetdicom logs a traceback for every malformed PDU or stalled connection a hostile or broken peer
    sends; the node's own line (rejected, aborted, refused) already says what happened. The traceback
    is kept for DEBUG.
    """

    def __init__(self, debug: bool) -> None:
        super().__init__()
        self.debug = debug

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and not self.debug and _is_library(record.name):
            exc = record.exc_info[1]
            message = record.getMessage()
            if exc is not None:
                said = f"{type(exc).__name__}: {_first_line(str(exc))}".rstrip(": ")
                message = said if message in (str(exc), "") else f"{message}: {said}"
            record.msg, record.args = message, ()
            record.exc_info = record.exc_text = None
        return True


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _thread_died(args: threading.ExceptHookArgs) -> None:
    """A thread that ends with an exception (a library's reactor on a message it cannot parse): one line."""
    name = args.thread.name if args.thread is not None else "a thread"
    exc = args.exc_value
    logging.getLogger("ainode").error(
        "thread %s stopped: %s: %s", name, args.exc_type.__name__, _first_line(str(exc)) if exc else ""
    )
    if exc is not None:
        logging.getLogger("ainode").debug("thread %s", name, exc_info=(args.exc_type, exc, args.exc_traceback))


def setup_logging(level: str = "INFO", tag: str | None = None) -> None:
    """Log lines to stderr at ``level``; ``tag`` names the process in each line (a worker process of a node)."""
    debug = level.upper() == "DEBUG"
    handler = logging.StreamHandler(sys.stderr)
    who = f"[{tag}] " if tag else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)-7s {who}%(name)s: %(message)s"))
    handler.addFilter(_LibraryChatterAsDebug())
    handler.addFilter(_LibraryErrorsOnOneLine(debug))
    threading.excepthook = _thread_died
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    for name in LIBRARY_LOGGERS:
        # Dropped where they are made unless DEBUG is asked for; a library's errors still show.
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.ERROR)


def exit_after_stop(code: int) -> NoReturn:
    """End a stopped node's process now: logs flushed, without the interpreter's teardown.

    Everything is stored and committed when the node has stopped; tearing down the loaded
    libraries (ONNX Runtime, highdicom, ...) only adds about half a second to every stop,
    restart and reload.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
