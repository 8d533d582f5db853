"""How an exception becomes the one-line reason a job or a delivery records (``ainode status``)."""

from __future__ import annotations

#: A job reason is one line an operator reads in ``ainode status``; longer messages are cut.
MAX_REASON_CHARS = 500


def _first_line(text: str) -> str:
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    return line if len(line) <= MAX_REASON_CHARS else line[: MAX_REASON_CHARS - 1] + "…"


def one_line_reason(exc: BaseException) -> str:
    """``ExceptionClass: first line of its message`` — what a job (or delivery) records as its reason.

    A database error names the driver's exception and the first line of the driver's message
    (``IntegrityError: UNIQUE constraint failed: results.sop_instance_uid``): never the SQL
    statement nor its parameters, which SQLAlchemy appends and which may hold patient data.
    """
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    if isinstance(exc, DBAPIError) and exc.orig is not None:
        return f"{type(exc.orig).__name__}: {_first_line(str(exc.orig))}".rstrip(": ")
    if isinstance(exc, SQLAlchemyError):
        # Without the "[SQL: ...]" and "(Background on this error at: ...)" parts SQLAlchemy adds.
        message = exc.args[0] if exc.args and isinstance(exc.args[0], str) else ""
        return f"{type(exc).__name__}: {_first_line(message.split('[SQL:')[0])}".rstrip(": ")
    return f"{type(exc).__name__}: {_first_line(str(exc))}".rstrip(": ")
