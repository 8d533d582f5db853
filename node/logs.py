"""Logging set-up: one line per association, study, job and delivery, with UIDs.

Patient names and IDs are never logged at INFO level; UIDs identify studies for the
PACS administrator without identifying the patient.
"""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom logs every PDU at INFO; its association events are summarised by ours.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # Library warnings (pydicom, highdicom) quote attribute values — patient names among
    # them — so they are logged only when DEBUG is asked for.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.DEBUG if level.upper() == "DEBUG" else logging.ERROR)
