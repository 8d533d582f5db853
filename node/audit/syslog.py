"""Audit messages as syslog (RFC 5424) to the audit repository, over TCP (RFC 6587) or TLS (RFC 5425).

Each message is one octet-counted frame (``LEN SP SYSLOG-MSG``, RFC 6587 3.4.1, the only framing
RFC 5425 allows), with PRI facility 10 (security/authorization) and MSGID ``DICOM+RFC3881`` as
PS3.15 A.6 and A.7 say. Syslog over TCP has no acknowledgement: a batch counts as delivered only
when the repository, after our end of the stream, closes its end too. A repository that went away
in the middle resets the connection instead, and the batch is sent again (at least once).
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Sequence
from datetime import UTC
from pathlib import Path

from node.audit.codes import EventOutcome
from node.audit.message import AuditMessage

#: PS3.15 A.6: facility 10, security/authorization messages.
FACILITY = 10
#: Severity 5 (notice, "normal but significant"); 4 (warning) for an event that failed.
NOTICE, WARNING = 5, 4
MSGID = "DICOM+RFC3881"
APP_NAME = "ainode"
#: RFC 5424 6.4: a UTF-8 MSG starts with the byte order mark.
BOM = b"\xef\xbb\xbf"


class SyslogError(Exception):
    """The batch did not reach the repository; ``str()`` says why, in one line."""


def _printable(value: str, limit: int) -> str:
    # RFC 5424 header fields are PRINTUSASCII (33-126); "-" is the NILVALUE.
    kept = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return kept or "-"


def syslog_message(message: AuditMessage, hostname: str, procid: str | None = None) -> bytes:
    """``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - BOM XML``; TIMESTAMP is the event's time."""
    severity = NOTICE if message.outcome is EventOutcome.SUCCESS else WARNING
    at = message.at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    header = (
        f"<{FACILITY * 8 + severity}>1 {at} {_printable(hostname, 255)} {APP_NAME} "
        f"{_printable(procid or str(os.getpid()), 128)} {MSGID} -"
    )
    return header.encode("ascii") + b" " + BOM + message.to_xml().encode("utf-8")


def octet_counted(syslog_msg: bytes) -> bytes:
    """RFC 6587 3.4.1 / RFC 5425 4.3: the message's length in octets, a space, the message."""
    return str(len(syslog_msg)).encode("ascii") + b" " + syslog_msg


def tls_context(ca_file: Path | None, cert_file: Path | None, key_file: Path | None) -> ssl.SSLContext:
    """The client context: TLS 1.2 or later (RFC 5425, PS3.15 A.6), the repository verified with its host name.

    Raises
    ------
    ValueError
        A file cannot be loaded; the message names it.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if ca_file is not None:
            context.load_verify_locations(cafile=str(ca_file))
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"ca_file: {ca_file}: not a PEM certificate ({_reason(exc)})") from None
    try:
        if cert_file is not None and key_file is not None:
            context.load_cert_chain(str(cert_file), str(key_file), password=b"")
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"cert_file/key_file: {cert_file}, {key_file}: cannot be loaded ({_reason(exc)})") from None
    return context


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not accepted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.replace("_", " ").lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


class SyslogSender:
    """Sends batches of frames to one repository, a connection per batch.

    Parameters
    ----------
    context
        The TLS context; None: plain TCP.
    timeout_s
        For connecting, for sending, and for the repository to close its end after ours.
    """

    def __init__(self, host: str, port: int, *, context: ssl.SSLContext | None, timeout_s: float) -> None:
        self.host, self.port, self.context, self.timeout_s = host, port, context, timeout_s

    def __str__(self) -> str:
        return f"syslog{'+tls' if self.context else ''}://{self.host}:{self.port}"

    def send(self, frames: Sequence[bytes]) -> None:
        """Deliver ``frames`` on one connection; raises :class:`SyslogError` when that is not certain."""
        where = "connecting"
        sock: socket.socket | None = None
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
            if self.context is not None:
                where = "in the TLS handshake"
                sock = self.context.wrap_socket(sock, server_hostname=self.host)
            where = "sending"
            sock.sendall(b"".join(frames))
            where = "closing"
            self._close_confirmed(sock)
        except OSError as exc:  # ssl.SSLError among them
            raise SyslogError(f"{where}: {_reason(exc)}") from None
        finally:
            if sock is not None:
                sock.close()

    def _close_confirmed(self, sock: socket.socket) -> None:
        """End our side and wait for the repository to end its side: then it has read every frame.

        A repository that died with frames unread resets the connection (ConnectionResetError). One
        that keeps its end open past the timeout is alive and did not reset: the batch counts as sent.
        """
        try:
            if isinstance(sock, ssl.SSLSocket):
                try:
                    sock.unwrap()  # close_notify, then the repository's close_notify or end of stream
                except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                    pass  # the repository closed the TCP stream without a close_notify: ended all the same
                except OSError as exc:
                    if exc.errno not in (0, None) or isinstance(exc, ConnectionError):
                        raise
                return
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(4096):
                pass  # a repository says nothing; whatever it says is not ours to read
        except TimeoutError:
            return
