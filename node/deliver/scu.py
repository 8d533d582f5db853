"""Outgoing DICOM: C-ECHO and C-STORE as a service user (pynetdicom).

An instance goes out in its own transfer syntax whenever the peer accepts it: a JPEG-LS CT is
stored as JPEG-LS. Only when the peer accepts none of an instance's syntaxes is it converted
(decompressed to Explicit VR Little Endian). Every failure says its cause in one line: connection
refused or timed out, association rejected and why, aborted, or the C-STORE status and its meaning.
"""

from __future__ import annotations

import copy
import errno
import logging
import socket
import ssl
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from node.tls import describe_tls_error

log = logging.getLogger("ainode.scu")

#: Proposed together, in one presentation context per SOP class: the peer picks one, and
#: pynetdicom converts between them (and inflates deflated files) by itself. Every SCP accepts
#: Implicit VR Little Endian (PS3.5 10.1).
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
#: Presentation context IDs are the odd numbers 1..255 (PS3.8 9.3.2.2).
MAX_CONTEXTS = 128


class AssociationFailed(ConnectionError):
    """The peer could not be reached or refused the association; the message says why."""


class TooManySopClasses(ValueError):
    """More SOP classes than one association has presentation contexts for; nothing was sent."""


@dataclass(frozen=True)
class PeerAddress:
    ae_title: str
    host: str
    port: int
    #: DICOM TLS (node/tls.py's client context: the peer verified, for ``host``, against the site CA); None: plain.
    tls: ssl.SSLContext | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class StoreOutcome:
    #: DIMSE status of the C-STORE response, None when no response came.
    status: int | None
    #: Why the instance was not stored, or the peer's warning status; None on plain success.
    error: str | None = None
    #: The transfer syntax the instance went out in.
    transfer_syntax: str | None = None
    #: The file's own transfer syntax when the peer accepted none of its syntaxes and it was converted.
    converted_from: str | None = None
    #: The peer refused in a way no later attempt changes (a STOW-RS 4xx such as 401 or 409): no retry.
    permanent: bool = False

    @property
    def accepted(self) -> bool:
        # Success (0x0000) and the warnings (0x0001, 0xB000, 0xB007, 0xB006): the peer kept
        # the instance, possibly with coercion. Anything else is a failure to retry.
        return self.status is not None and (self.status == 0x0000 or self.status in (0x0001, 0xB000, 0xB006, 0xB007))

    def describe(self) -> str:
        """One line for an operator: the status and its meaning (or the error), and how it went out."""
        if self.error:
            text = self.error
        elif self.status is not None:
            text = f"status 0x{self.status:04X} ({status_text(self.status)})"
        else:
            text = "not sent"
        if self.transfer_syntax and self.converted_from:
            return f"{text}, converted from {UID(self.converted_from).name} to {UID(self.transfer_syntax).name}"
        return f"{text}, as {UID(self.transfer_syntax).name}" if self.transfer_syntax else text


def status_text(status: int) -> str:
    """What a C-STORE response status means (PS3.4 B.2.3, PS3.7 C), e.g. ``refused: out of resources``."""
    if status == 0x0000:
        return "success"
    _, text = STORAGE_SERVICE_CLASS_STATUS.get(status, ("", ""))
    return (text or code_to_category(status)).lower()


def _status_error(status: int, comment: object) -> str | None:
    if status == 0x0000:
        return None
    text = f"status 0x{status:04X} ({status_text(status)})"
    return f"{text}: {comment}" if comment else text


def _ae(calling_ae: str, timeout_s: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    return ae


class _Watch:
    """What happened on an association: pynetdicom tells it through events, not return values."""

    def __init__(self) -> None:
        self.connected = False
        #: The last ACSE primitive from the peer's side: A-ASSOCIATE (AC or RJ), A-ABORT, A-P-ABORT.
        self.last: object | None = None

    def handlers(self) -> list[Any]:
        return [
            (evt.EVT_CONN_OPEN, self._opened),
            (evt.EVT_ACSE_RECV, self._received),
            (evt.EVT_ABORTED, self._aborted),
            (evt.EVT_CONN_CLOSE, self._aborted),
        ]

    def _opened(self, event: evt.Event) -> None:
        self.connected = True

    def _received(self, event: evt.Event) -> None:
        # pynetdicom sets Event.primitive for EVT_ACSE_RECV at run time but does not declare it.
        self.last = event.primitive  # type: ignore[attr-defined]

    @staticmethod
    def _aborted(event: evt.Event) -> None:
        # pynetdicom wakes a DIMSE call waiting for its response with one (None, None) on the
        # message queue when the association is aborted. Its reactor thread may take that item
        # off the queue itself, in the moment between passing its pause checkpoint and pausing,
        # and the call then waits out the whole DIMSE timeout. A second wake-up item ends the
        # wait at once; a spare one is never read, as the association is over.
        event.assoc.dimse.msg_queue.put((None, None))

    def ended(self, assoc: Association, waited_s: float, timeout_s: float) -> str:
        """Why an established association ended before an answer came."""
        # An abort may still wait in pynetdicom's queue when the DIMSE call gives up on it.
        last = assoc.dul.peek_next_pdu() or self.last
        if isinstance(last, A_ABORT):
            return "the peer aborted the association"
        if isinstance(last, A_P_ABORT):
            return "the connection to the peer was lost"
        if waited_s >= 0.9 * timeout_s:
            return f"no answer within {timeout_s:g} s; association aborted"
        return "the association ended without an answer"


# A-ASSOCIATE-RJ (source, reason/diag.), PS3.8 9.3.4.
_REJECT_REASONS: dict[tuple[int | None, int | None], str] = {  # keyed as pynetdicom types them
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}
# Presentation context results of an A-ASSOCIATE-AC, PS3.8 9.3.3.2.
_CONTEXT_RESULTS: dict[int | None, str] = {
    1: "refused by the peer",
    2: "refused, no reason given",
    3: "SOP class not supported",
    4: "transfer syntaxes not supported",
}


def _socket_failure(exc: OSError, peer: PeerAddress, timeout_s: float) -> str:
    if isinstance(exc, socket.gaierror):
        return f"host name {peer.host!r} not found"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused (nothing listens on {peer.host}:{peer.port})"
    if isinstance(exc, TimeoutError):
        return f"connection timed out after {timeout_s:g} s"
    if exc.errno == errno.EHOSTUNREACH:
        return f"host {peer.host} unreachable"
    if exc.errno == errno.ENETUNREACH:
        return f"network unreachable for {peer.host}"
    return f"cannot connect: {exc.strerror or exc}"


def _connect_failure(peer: PeerAddress, timeout_s: float, elapsed_s: float) -> str:
    # pynetdicom logs the socket error but keeps it to itself: ask the socket once more.
    if elapsed_s >= 0.9 * timeout_s:
        return f"connection timed out after {timeout_s:g} s"
    try:
        with socket.create_connection((peer.host, peer.port), timeout=timeout_s) as sock:
            if peer.tls is not None:  # the handshake again, for its reason (a certificate, a version)
                peer.tls.wrap_socket(sock, server_hostname=peer.host).close()
            return "could not connect (the port accepts connections now: try again)"
    except ssl.SSLError as exc:
        return f"TLS with {peer.host}:{peer.port}: {describe_tls_error(exc)}"
    except OSError as exc:
        return _socket_failure(exc, peer, timeout_s)


def _refusal(assoc: Association, watch: _Watch, peer: PeerAddress, timeout_s: float, elapsed_s: float) -> str:
    # When a peer rejects and closes at once, pynetdicom can see the close first and give up with
    # the A-ASSOCIATE-RJ still queued, unread: read it from there.
    answer = watch.last or assoc.dul.peek_next_pdu()
    if not watch.connected:
        return f"failed: {_connect_failure(peer, timeout_s, elapsed_s)}"
    if isinstance(answer, A_ASSOCIATE) and answer.result in (1, 2):
        reason = _REJECT_REASONS.get((answer.result_source, answer.diagnostic), f"diagnostic {answer.diagnostic}")
        return f"rejected: {reason} ({'permanent' if answer.result == 1 else 'transient'})"
    if isinstance(answer, A_ASSOCIATE):
        reasons = {
            f"{cx.abstract_syntax.name if cx.abstract_syntax else '?'}: "
            f"{_CONTEXT_RESULTS.get(cx.result, f'result {cx.result}')}": None
            for cx in assoc.rejected_contexts
        }
        refused = "; ".join(list(reasons)[:3])
        return f"failed: the peer accepted none of the proposed presentation contexts ({refused})"
    if isinstance(answer, A_ABORT):
        return "aborted by the peer during association negotiation"
    if isinstance(answer, A_P_ABORT) or elapsed_s < 0.9 * timeout_s:
        return "failed: the peer closed the connection without answering the association request"
    return f"failed: no answer to the association request within {timeout_s:g} s"


def _associate(
    ae: AE, peer: PeerAddress, contexts: list[PresentationContext], timeout_s: float
) -> tuple[Association, _Watch]:
    """An established association with ``peer``, or AssociationFailed saying why not."""
    watch = _Watch()
    started = time.monotonic()
    try:
        assoc = ae.associate(
            peer.host,
            peer.port,
            contexts=contexts,
            ae_title=peer.ae_title,
            evt_handlers=watch.handlers(),
            tls_args=(peer.tls, peer.host) if peer.tls is not None else None,
        )
    except OSError as exc:  # pynetdicom resolves the host name before it connects
        raise AssociationFailed(f"association with {peer} failed: {_socket_failure(exc, peer, timeout_s)}") from None
    if not assoc.is_established:
        why = _refusal(assoc, watch, peer, timeout_s, time.monotonic() - started)
        raise AssociationFailed(f"association with {peer} {why}")
    return assoc, watch


def echo(calling_ae: str, peer: PeerAddress, timeout_s: float = 10) -> int:
    """C-ECHO ``peer``; returns the DIMSE status (0 = success) or raises AssociationFailed."""
    assoc, watch = _associate(_ae(calling_ae, timeout_s), peer, [build_context(Verification)], timeout_s)
    try:
        started = time.monotonic()
        rsp = assoc.send_c_echo()
        if not rsp or "Status" not in rsp:
            why = watch.ended(assoc, time.monotonic() - started, timeout_s)
            raise AssociationFailed(f"no C-ECHO response from {peer}: {why}")
        return int(rsp.Status)
    finally:
        if assoc.is_established:
            assoc.release()


def _one_line(exc: Exception) -> str:
    # Codec plugins report one reason per line; an outcome is one line of an operator's output.
    return " ".join(str(exc).split())[:500]


@dataclass(frozen=True)
class _Instance:
    """One item to send, as far as the association must know it before anything is sent."""

    source: Dataset | Path
    sop_class: UID | None = None
    transfer_syntax: UID | None = None
    error: str | None = None


def _inspect(item: Dataset | Path | str) -> _Instance:
    source: Dataset | Path
    if isinstance(item, Dataset):
        ds, source = item, item
    else:
        source = Path(item)
        try:
            # The header plans the association; pixel data are read when the instance is sent.
            ds = dcmread(source, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
        except Exception as exc:  # pydicom raises many kinds of error for a file that is not DICOM
            return _Instance(source, error=f"cannot read as DICOM: {_one_line(exc)}")
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
        return _Instance(source, error="not sent: no SOP Class UID or SOP Instance UID")
    if not syntax:
        return _Instance(source, error="not sent: no Transfer Syntax UID in the file meta information")
    return _Instance(source, UID(ds.SOPClassUID), UID(syntax))


def _contexts(instances: Sequence[_Instance]) -> list[PresentationContext]:
    """Per SOP class, the uncompressed syntaxes in one context, and each syntax of the items in one of its own.

    A context's transfer syntaxes are alternatives of which the peer picks one: one syntax per
    context lets it accept JPEG-LS and refuse JPEG 2000 for the same SOP class, and keeps an
    Implicit VR file implicit when the peer picked Explicit VR in the uncompressed context. When
    that needs more than 128 contexts, the syntaxes of the fewest items are not proposed (those
    items go out in an uncompressed syntax); more SOP classes than that cannot be sent at all.
    """
    pairs: list[tuple[UID, UID]] = []
    for i in instances:
        if i.sop_class is None or i.transfer_syntax is None:
            raise ValueError(f"no presentation context for an instance that cannot be sent: {i.error}")
        pairs.append((i.sop_class, i.transfer_syntax))
    classes = list(dict.fromkeys(c for c, _ in pairs))
    if len(classes) > MAX_CONTEXTS:
        raise TooManySopClasses(
            f"{len(classes)} SOP classes in one send, but one association has at most {MAX_CONTEXTS} "
            "presentation contexts: send the files in smaller groups"
        )
    own = Counter(pairs)
    room = MAX_CONTEXTS - len(classes)
    if len(own) > room:
        log.warning(
            "%d SOP class / transfer syntax pairs do not fit in %d presentation contexts: "
            "their instances go out in an uncompressed syntax",
            len(own) - room,
            MAX_CONTEXTS,
        )
    # Compressed syntaxes first (uncompressed ones have the shared context), then the most used.
    chosen = sorted(own, key=lambda pair: (pair[1] in UNCOMPRESSED, -own[pair]))[:room]
    return [build_context(c, list(UNCOMPRESSED)) for c in classes] + [build_context(c, ts) for c, ts in chosen]


def _sendable_as(syntax: UID, accepted: Sequence[UID]) -> UID | None:
    """The accepted syntax pynetdicom sends ``syntax`` in, or None when it needs converting first.

    pynetdicom prefers an exact match and otherwise converts between the uncompressed syntaxes of
    one byte order itself (explicit/implicit VR, deflate); compressed pixel data it cannot convert.
    """
    if syntax in accepted:
        return syntax
    if syntax.is_compressed:
        return None
    return next((a for a in accepted if not a.is_compressed and a.is_little_endian == syntax.is_little_endian), None)


# Values pydicom keeps as raw bytes, by their word size: the only ones whose byte order it does
# not change when a dataset is written in the other endianness.
_WORD_BYTES = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}


def _to_explicit_little_endian(ds: Dataset) -> None:
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_compressed:
        # Same image, same SOP Instance UID: only its encoding changes (as DCMTK's dcmdjpeg does).
        ds.decompress(generate_instance_uid=False)
        return
    if syntax.is_little_endian:
        return
    for elem in ds.iterall():
        if elem.VR == "UN" and elem.value:
            raise ValueError(f"element {elem.tag} has VR UN, whose byte order cannot be known")
        size = _WORD_BYTES.get(str(elem.VR))
        if size and elem.value:
            elem.value = np.frombuffer(elem.value, dtype=f">u{size}").astype(f"<u{size}").tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.set_original_encoding(False, True, ds.original_character_set)


def _store_one(assoc: Association, watch: _Watch, inst: _Instance, timeout_s: float) -> StoreOutcome:
    assert inst.sop_class is not None and inst.transfer_syntax is not None
    accepted = [
        UID(cx.transfer_syntax[0])
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == inst.sop_class and cx.as_scu
    ]
    if not accepted:
        return StoreOutcome(None, f"not sent: the peer accepted no presentation context for {inst.sop_class.name}")
    own = inst.transfer_syntax
    sent_as = _sendable_as(own, accepted)
    converted_from = None
    try:
        ds = inst.source if isinstance(inst.source, Dataset) else dcmread(inst.source)
    except Exception as exc:  # the file changed or broke since it was inspected
        return StoreOutcome(None, f"cannot read as DICOM: {_one_line(exc)}")
    if sent_as is None:
        target = _sendable_as(ExplicitVRLittleEndian, accepted)
        only = ", ".join(a.name for a in accepted)
        if target is None:
            return StoreOutcome(None, f"not sent: the peer accepts {inst.sop_class.name} only as {only}")
        try:
            ds = copy.deepcopy(ds) if ds is inst.source else ds  # never change the caller's dataset
            _to_explicit_little_endian(ds)
        except Exception as exc:  # a codec's own error: the file's pixel data cannot be decoded
            return StoreOutcome(
                None,
                f"not sent: the peer accepts {inst.sop_class.name} only as {only}, and {own.name} "
                f"could not be converted to Explicit VR Little Endian: {_one_line(exc)}",
            )
        sent_as, converted_from = target, own
        log.info("%s: %s sent converted to %s", ds.SOPInstanceUID, own.name, target.name)
    started = time.monotonic()
    try:
        rsp = assoc.send_c_store(ds)
    except RuntimeError:  # the association ended between the previous response and this request
        return StoreOutcome(None, f"not sent: {watch.ended(assoc, 0, timeout_s)}")
    except (ValueError, AttributeError) as exc:  # pynetdicom could not encode the dataset
        return StoreOutcome(None, f"not sent: {_one_line(exc)}")
    if not rsp or "Status" not in rsp:
        why = watch.ended(assoc, time.monotonic() - started, timeout_s)
        return StoreOutcome(None, f"no C-STORE response: {why}", str(sent_as))
    status = int(rsp.Status)
    return StoreOutcome(
        status,
        _status_error(status, rsp.get("ErrorComment")),
        str(sent_as),
        str(converted_from) if converted_from else None,
    )


def store(
    calling_ae: str,
    peer: PeerAddress,
    items: Sequence[Dataset | Path | str],
    timeout_s: float = 30,
) -> list[StoreOutcome]:
    """C-STORE every item over one association; one outcome per item, in order.

    Each item goes out in its own transfer syntax when the peer accepted it, else converted to
    Explicit VR Little Endian; an item that cannot be read, converted or stored gets its own error.

    Raises AssociationFailed when no association can be made, and TooManySopClasses when the
    items have more SOP classes than one association can carry (nothing was sent).
    """
    instances = [_inspect(item) for item in items]
    sendable = [i for i in instances if i.error is None]
    if not sendable:
        return [StoreOutcome(None, i.error) for i in instances]
    assoc, watch = _associate(_ae(calling_ae, timeout_s), peer, _contexts(sendable), timeout_s)
    outcomes: list[StoreOutcome] = []
    try:
        for inst in instances:
            if inst.error is not None:
                outcomes.append(StoreOutcome(None, inst.error))
            elif not assoc.is_established:
                outcomes.append(StoreOutcome(None, f"not sent: {watch.ended(assoc, 0, timeout_s)}"))
            else:
                outcomes.append(_store_one(assoc, watch, inst, timeout_s))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes
