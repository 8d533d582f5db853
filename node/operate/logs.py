"""Logging set-up: one line per association, study, job and delivery, with UIDs.

Patient names and IDs are never logged at INFO level; UIDs identify studies for the
PACS administrator without identifying the patient.
"""

from __future__ import annotations

import logging
import sys

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


def setup_logging(level: str = "INFO") -> None:
    debug = level.upper() == "DEBUG"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(_LibraryChatterAsDebug())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    for name in LIBRARY_LOGGERS:
        # Dropped where they are made unless DEBUG is asked for; a library's errors still show.
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.ERROR)
