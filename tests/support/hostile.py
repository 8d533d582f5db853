"""A hostile peer, byte by byte: PDUs (PS3.8 9.3), DIMSE command sets (PS3.7 9.3, E) and datasets (PS3.5 7).

pynetdicom's SCU checks and re-encodes what it sends; a broken modality, a fuzzer or an attacker does
not. Everything here is built in code, at the byte level, so that each message can be wrong in exactly
one way: a PDU type that does not exist, a length that lies, a command without its SOP Class, a
dataset whose sequence never ends. :class:`RawPeer` sends such bytes over a plain socket and reports
what the node answered (:class:`Answer`): a PDU, a DIMSE status, or the connection closed.

``legitimate_sender`` is the well-behaved scanner that must still be served after each case,
``NodeWatch`` says what the node kept and logged meanwhile (spool files, instance and association rows,
log lines), and ``memory_kb`` reads a process's resident memory from ``/proc``.
"""

from __future__ import annotations

import io
import itertools
import socket
import sqlite3
import struct
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import encode

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.999.1"

# PDU types (PS3.8 9.3.1).
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA, RELEASE_RQ, RELEASE_RP, ABORT = range(1, 8)
PDU_NAMES = {
    ASSOCIATE_RQ: "A-ASSOCIATE-RQ",
    ASSOCIATE_AC: "A-ASSOCIATE-AC",
    ASSOCIATE_RJ: "A-ASSOCIATE-RJ",
    P_DATA: "P-DATA-TF",
    RELEASE_RQ: "A-RELEASE-RQ",
    RELEASE_RP: "A-RELEASE-RP",
    ABORT: "A-ABORT",
}

# DIMSE Command Field values (PS3.7 E.1).
C_STORE_RQ, C_GET_RQ, C_FIND_RQ, C_MOVE_RQ, C_ECHO_RQ, N_ACTION_RQ = 0x0001, 0x0010, 0x0020, 0x0021, 0x0030, 0x0130
#: Command Data Set Type (0000,0800): any value but this one says a data set follows.
NO_DATASET = 0x0101


# -- PDUs ----------------------------------------------------------------------------------------
def pdu(pdu_type: int, body: bytes, length: int | None = None) -> bytes:
    """A PDU: type, reserved, 4-byte big-endian length (``length`` to lie about it), body."""
    return struct.pack(">BBL", pdu_type, 0, len(body) if length is None else length) + body


def item(item_type: int, body: bytes) -> bytes:
    """A variable item or sub-item of an A-ASSOCIATE PDU: type, reserved, 2-byte length, body."""
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def ae_field(title: str | bytes, width: int = 16) -> bytes:
    raw = title.encode("ascii") if isinstance(title, str) else title
    return raw.ljust(width, b" ")


def presentation_context(context_id: int, abstract_syntax: str, transfer_syntaxes: Sequence[str]) -> bytes:
    """A Presentation Context item (0x20) of an A-ASSOCIATE-RQ."""
    if isinstance(transfer_syntaxes, str):  # a str is a sequence of one-character "transfer syntaxes"
        raise TypeError("transfer_syntaxes: a list of UIDs, not one UID")
    body = struct.pack(">BBBB", context_id & 0xFF, 0, 0, 0) + item(0x30, abstract_syntax.encode())
    body += b"".join(item(0x40, ts.encode()) for ts in transfer_syntaxes)
    return item(0x20, body)


def user_information(max_pdu: int = 16384) -> bytes:
    """User Information (0x50): Maximum Length (0x51), Implementation Class UID (0x52), version name (0x55)."""
    body = item(0x51, struct.pack(">L", max_pdu)) + item(0x52, IMPLEMENTATION_CLASS_UID.encode())
    return item(0x50, body + item(0x55, b"HOSTILE_0"))


def associate_rq(
    contexts: Iterable[tuple[int, str, Sequence[str]]] = ((1, VERIFICATION, (ImplicitVRLittleEndian,)),),
    *,
    called: str | bytes = "AINODE",
    calling: str | bytes = "HOSTILE",
    protocol_version: int = 1,
    called_width: int = 16,
    items: bytes | None = None,
) -> bytes:
    """An A-ASSOCIATE-RQ (PS3.8 9.3.2); ``called_width`` over 16 makes the Called AE Title field over-long.

    ``items`` replaces the variable items (application context, presentation contexts, user information).
    """
    if items is None:
        items = item(0x10, APPLICATION_CONTEXT.encode())
        items += b"".join(presentation_context(cid, a, ts) for cid, a, ts in contexts)
        items += user_information()
    fixed = struct.pack(">HH", protocol_version, 0) + ae_field(called, called_width) + ae_field(calling) + bytes(32)
    return pdu(ASSOCIATE_RQ, fixed + items)


def pdv(context_id: int, data: bytes, *, command: bool, last: bool, length: int | None = None) -> bytes:
    """One Presentation Data Value item: 4-byte length, context ID, message control header, fragment."""
    header = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    return struct.pack(">LBB", len(data) + 2 if length is None else length, context_id, header) + data


def p_data(*pdvs: bytes, length: int | None = None) -> bytes:
    return pdu(P_DATA, b"".join(pdvs), length)


def release_rq() -> bytes:
    return pdu(RELEASE_RQ, bytes(4))


# -- DIMSE command sets --------------------------------------------------------------------------
def _implicit(tag: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def us(value: int) -> bytes:
    return struct.pack("<H", value)


def ui(value: str | bytes) -> bytes:
    """A UI value as given (the element pads it to even length with a NUL); no check that it is a UID."""
    return value.encode("latin-1") if isinstance(value, str) else value


def command_set(elements: dict[int, bytes]) -> bytes:
    """A command set (group 0000, implicit VR little endian) with its Command Group Length first."""
    body = b"".join(_implicit(tag, value) for tag, value in sorted(elements.items()))
    return _implicit(0x00000000, struct.pack("<L", len(body))) + body


def c_store_rq(
    sop_class: str | bytes | None, sop_instance: str | bytes | None, *, message_id: int = 1, dataset: bool = True
) -> bytes:
    """A C-STORE-RQ command (PS3.7 9.3.1.1); ``None`` leaves that UID out of the command."""
    elements = {0x00000100: us(C_STORE_RQ), 0x00000110: us(message_id), 0x00000700: us(0),
                0x00000800: us(0x0000 if dataset else NO_DATASET)}  # fmt: skip
    if sop_class is not None:
        elements[0x00000002] = ui(sop_class)
    if sop_instance is not None:
        elements[0x00001000] = ui(sop_instance)
    return command_set(elements)


def c_echo_rq(message_id: int = 1) -> bytes:
    return command_set({0x00000002: ui(VERIFICATION), 0x00000100: us(C_ECHO_RQ), 0x00000110: us(message_id),
                        0x00000800: us(NO_DATASET)})  # fmt: skip


def query_rq(command_field: int, sop_class: str, *, message_id: int = 1, move_destination: str = "HOSTILE") -> bytes:
    """A C-FIND, C-GET or C-MOVE request (PS3.7 9.3.2-9.3.4); an identifier data set follows."""
    elements = {0x00000002: ui(sop_class), 0x00000100: us(command_field), 0x00000110: us(message_id),
                0x00000700: us(0), 0x00000800: us(0x0000)}  # fmt: skip
    if command_field == C_MOVE_RQ:
        elements[0x00000600] = ae_field(move_destination)
    return command_set(elements)


def n_action_rq(sop_class: str, sop_instance: str, *, message_id: int = 1, action_type: int = 1) -> bytes:
    """An N-ACTION request (PS3.7 10.3.4), e.g. a Storage Commitment request; an action information follows."""
    return command_set({0x00000003: ui(sop_class), 0x00000100: us(N_ACTION_RQ), 0x00000110: us(message_id),
                        0x00000800: us(0x0000), 0x00001001: ui(sop_instance),
                        0x00001008: us(action_type)})  # fmt: skip


def command_with_field(command_field: int, *, message_id: int = 1) -> bytes:
    """A command set whose Command Field is ``command_field`` (for values PS3.7 does not define)."""
    return command_set({0x00000002: ui(VERIFICATION), 0x00000100: us(command_field), 0x00000110: us(message_id),
                        0x00000800: us(NO_DATASET)})  # fmt: skip


# -- datasets, as bytes ------------------------------------------------------------------------------
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
UNDEFINED = 0xFFFFFFFF


def explicit_element(tag: int, vr: str, value: bytes = b"", length: int | None = None) -> bytes:
    """One explicit VR little endian element; ``length`` to declare another length than ``len(value)``."""
    declared = len(value) if length is None else length
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr.encode(), 0, declared) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), declared) + value


def delimiter(tag: int) -> bytes:
    """An item (FFFE,E000 with undefined length), item delimitation (E00D) or sequence delimitation (E0DD)."""
    return struct.pack("<HHL", 0xFFFE, tag & 0xFFFF, UNDEFINED if tag == 0xFFFEE000 else 0)


def explicit(ds: Dataset) -> bytes:
    """``ds`` encoded explicit VR little endian, as a C-STORE carries it (no preamble, no File Meta)."""
    body = encode(ds, is_implicit_vr=False, is_little_endian=True)
    assert body is not None, "pydicom could not encode the dataset"
    return body


def implicit(ds: Dataset) -> bytes:
    body = encode(ds, is_implicit_vr=True, is_little_endian=True)
    assert body is not None, "pydicom could not encode the dataset"
    return body


def spliced(ds: Dataset, at: int, raw: bytes) -> bytes:
    """``ds`` explicit VR little endian with ``raw`` element bytes inserted where tag ``at`` belongs."""
    whole, before = explicit(ds), Dataset()
    for element in ds:
        if element.tag < at:
            before.add(element)
    # Elements are encoded one after the other in tag order: the ones before ``at`` are a prefix of the whole.
    head = explicit(before) if len(before) else b""
    assert whole.startswith(head)
    return head + raw + whole[len(head) :]


def offset_of(body: bytes, tag: int) -> int:
    """Where the element ``tag`` starts in explicit VR little endian ``body`` (a plain byte search)."""
    found = body.find(struct.pack("<HH", tag >> 16, tag & 0xFFFF))
    assert found >= 0, f"({tag >> 16:04X},{tag & 0xFFFF:04X}) not in the dataset"
    return found


def nested_sequences(levels: int, tag: int = 0x0040A730) -> bytes:
    """``levels`` sequences each in an item of the one before, undefined lengths, properly closed."""
    opening = explicit_element(tag, "SQ", length=UNDEFINED) + delimiter(0xFFFEE000)
    closing = delimiter(0xFFFEE00D) + delimiter(0xFFFEE0DD)
    return opening * levels + closing * levels


def deflate_bomb(header: bytes, expanded_bytes: int, tag: int = 0x7FE11000) -> bytes:
    """Deflate (RFC 1951, raw, as Deflated Explicit VR Little Endian carries it) of ``header`` followed by
    a private OB element of ``expanded_bytes`` zeros: a few MB on the wire, ``expanded_bytes`` inflated.

    Built without compressing gigabytes: after a full flush the compressor starts afresh, so one
    megabyte of zeros always compresses to the same bytes, which are repeated.
    """
    chunk = 1 << 20
    assert expanded_bytes % chunk == 0 and expanded_bytes < UNDEFINED
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    creator = explicit_element(tag & 0xFFFF0000 | 0x0010, "LO", b"HOSTILE ")
    start = compressor.compress(header + creator + explicit_element(tag, "OB", length=expanded_bytes))
    start += compressor.flush(zlib.Z_FULL_FLUSH)
    zeros = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert zeros == again, "zlib did not repeat itself after a full flush"
    return start + zeros * (expanded_bytes // chunk) + compressor.flush(zlib.Z_FINISH)


# -- the peer ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    """What the node did in reply: a PDU (by name), a DIMSE status, or nothing on a connection it closed."""

    #: "A-ASSOCIATE-AC", "A-ASSOCIATE-RJ", "A-ABORT", "A-RELEASE-RP", "P-DATA-TF" (a DIMSE response),
    #: "closed" (the node closed the connection without a PDU), "silent" (nothing within the wait), or
    #: "unknown PDU 0xNN".
    kind: str
    #: A-ASSOCIATE-RJ: (result, source, reason); A-ABORT: (source, reason); else empty.
    fields: tuple[int, ...] = ()
    #: The DIMSE response's Status, for a P-DATA-TF answer.
    status: int | None = None
    #: The DIMSE response's command set, for a P-DATA-TF answer.
    command: Dataset | None = None
    #: A-ASSOCIATE-AC: presentation context ID -> (result, transfer syntax).
    contexts: dict[int, tuple[int, str]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """What a case's expectation is compared with: "status 0xA900", "A-ASSOCIATE-RJ 1,2,2", "A-ABORT", ..."""
        if self.status is not None:
            return f"status 0x{self.status:04X}"
        if self.kind == PDU_NAMES[ASSOCIATE_RJ]:
            return f"{self.kind} " + ",".join(map(str, self.fields))
        return self.kind

    def __str__(self) -> str:
        if self.status is not None:
            comment = self.command.get("ErrorComment", "") if self.command is not None else ""
            return f"status 0x{self.status:04X}" + (f" ({comment})" if comment else "")
        return self.kind + (f" {self.fields}" if self.fields else "")


def _ac_contexts(body: bytes) -> dict[int, tuple[int, str]]:
    out: dict[int, tuple[int, str]] = {}
    offset = 68  # protocol version, reserved, AE titles, reserved (PS3.8 9.3.3)
    while offset + 4 <= len(body):
        item_type, _, length = struct.unpack(">BBH", body[offset : offset + 4])
        value = body[offset + 4 : offset + 4 + length]
        if item_type == 0x21:
            end = 8 + struct.unpack(">H", value[6:8])[0] if len(value) >= 8 else 8
            syntax = value[8:end].rstrip(b"\x00").decode(errors="replace")
            out[value[0]] = (value[2], syntax)
        offset += 4 + length
    return out


#: Hostile peers take turns on 200 loopback addresses, as many hosts would: the node may hold a refused
#: connection's slot until its ARTIM timer expires (PS3.8 Sta13), and a host has 8 slots.
_SOURCES = itertools.cycle([f"127.0.2.{k}" for k in range(1, 201)])


class RawPeer:
    """One TCP connection to the node that sends exactly the bytes it is given.

    Parameters
    ----------
    source
        The local address to connect from; by default the next of 200 loopback addresses (127.0.2.x),
        other hosts than the legitimate sender's 127.0.0.1.
    """

    def __init__(self, port: int, *, source: str | None = None, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((source or next(_SOURCES), 0))
        self.sock.connect((host, port))
        self._buffer = b""

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes) -> bool:
        """Send ``data``; False when the node has already closed or reset the connection."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def _read(self, n: int, deadline: float) -> bytes | None:
        """``n`` bytes; b"" when the connection ends first, None when ``deadline`` passes first."""
        while len(self._buffer) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None
            except OSError:  # reset by the node
                chunk = b""
            if not chunk:
                return b""
            self._buffer += chunk
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out

    def read_pdu(self, timeout_s: float = 10) -> tuple[int, bytes] | str:
        """The next PDU as (type, body), or "closed" / "silent"."""
        deadline = time.monotonic() + timeout_s
        header = self._read(6, deadline)
        if header is None:
            return "silent"
        if len(header) < 6:
            return "closed"
        pdu_type, _, length = struct.unpack(">BBL", header)
        body = self._read(length, deadline)
        if body is None:
            return "silent"
        if len(body) < length:
            return "closed"
        return pdu_type, body

    def answer(self, timeout_s: float = 10) -> Answer:
        """The node's next answer, a DIMSE response read whole (all its command fragments)."""
        command = b""
        while True:
            got = self.read_pdu(timeout_s)
            if isinstance(got, str):
                return Answer(got)
            pdu_type, body = got
            if pdu_type == ASSOCIATE_RJ:
                return Answer(PDU_NAMES[pdu_type], tuple(body[1:4]))
            if pdu_type == ABORT:
                return Answer(PDU_NAMES[pdu_type], tuple(body[2:4]))
            if pdu_type == ASSOCIATE_AC:
                return Answer(PDU_NAMES[pdu_type], contexts=_ac_contexts(body))
            if pdu_type != P_DATA:
                return Answer(PDU_NAMES.get(pdu_type, f"unknown PDU 0x{pdu_type:02X}"))
            offset, last = 0, False
            while offset + 6 <= len(body):
                length, _, header = struct.unpack(">LBB", body[offset : offset + 6])
                if header & 0x01:
                    command += body[offset + 6 : offset + 4 + length]
                    last = last or bool(header & 0x02)
                offset += 4 + length
            if last:
                ds = read_dataset(io.BytesIO(command), True, True)
                return Answer("P-DATA-TF", status=int(ds.get("Status", -1)), command=ds)

    def associate(self, contexts: Sequence[tuple[int, str, Sequence[str]]]) -> Answer:
        """Request an association with ``contexts`` (ID, abstract syntax, transfer syntaxes); the node's answer."""
        self.send(associate_rq(contexts))
        return self.answer()

    def send_message(
        self, context_id: int, command: bytes, dataset: bytes | None = None, *, max_pdv: int = 16000
    ) -> bool:
        """A DIMSE message: the command in one PDV, the data set in PDVs of at most ``max_pdv`` bytes."""
        sent = self.send(p_data(pdv(context_id, command, command=True, last=True)))
        if dataset is not None:
            chunks = [dataset[i : i + max_pdv] for i in range(0, len(dataset), max_pdv)] or [b""]
            for k, chunk in enumerate(chunks):
                sent = sent and self.send(p_data(pdv(context_id, chunk, command=False, last=k == len(chunks) - 1)))
        return sent

    def release(self, timeout_s: float = 10) -> Answer:
        self.send(release_rq())
        return self.answer(timeout_s)

    def closed_by_node(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the node to close the connection (PDUs it sends meanwhile are read)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.read_pdu(deadline - time.monotonic())
            if got == "closed":
                return True
            if got == "silent":
                return False
        return False


def store(
    port: int,
    body: bytes,
    *,
    sop_class: str | bytes | None,
    sop_instance: str | bytes | None,
    context: tuple[str, str],
    dataset: bool = True,
    timeout_s: float = 15,
) -> Answer:
    """One C-STORE as a hostile SCU makes it: its own request UIDs, its own dataset bytes, on ``context``
    (abstract syntax, transfer syntax), then a release. Returns the node's answer to the C-STORE."""
    with RawPeer(port) as peer:
        accepted = peer.associate([(1, context[0], [context[1]])])
        assert accepted.kind == "A-ASSOCIATE-AC" and accepted.contexts.get(1, (1, ""))[0] == 0, (
            f"the node did not accept {context}: {accepted}"
        )
        peer.send_message(1, c_store_rq(sop_class, sop_instance, dataset=dataset), body if dataset else None)
        got = peer.answer(timeout_s)
        if got.kind == "P-DATA-TF":
            peer.release()
        return got


def legitimate_sender(port: int, ds: Dataset, *, calling_ae: str = "GOODSCU") -> list[str]:
    """A well-behaved scanner (pynetdicom, from 127.0.0.1): C-ECHO, then a C-STORE of ``ds``; what went wrong."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(VERIFICATION)
    ae.add_requested_context(str(ds.SOPClassUID), ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = 15
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    if not assoc.is_established:
        how = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        return [f"the next legitimate sender's association was {how}"]
    try:
        echo = assoc.send_c_echo()
        stored = assoc.send_c_store(ds)
    finally:
        if assoc.is_established:
            assoc.release()
    problems = []
    if "Status" not in echo or echo.Status != 0:
        problems.append(f"the next legitimate C-ECHO got {echo.get('Status', 'no answer')}")
    if "Status" not in stored or stored.Status != 0:
        problems.append(f"the next legitimate C-STORE got {stored.get('Status', 'no answer')}")
    return problems


# -- what the node kept and said -----------------------------------------------------------------------
#: Files of the node that change with every association; any other new file is something kept.
_BOOKKEEPING = ("node.db", "node.db-wal", "node.db-shm", "node.db-journal", "node.log", "config.yaml")


@dataclass(frozen=True)
class Snapshot:
    log_offset: int
    files: frozenset[Path]
    instances: dict[str, str]
    #: The last association row before the case: the case's own associations come after it.
    last_association: int


class NodeWatch:
    """The node's files, database rows and log, to say what one hostile case left behind.

    Parameters
    ----------
    root
        The node's folder: spool, database and log are all under it, so a file written outside the
        spool by a path in a UID (``../../x``) is still seen.
    """

    def __init__(self, root: Path, spool: Path, database: Path, log: Path) -> None:
        self.root, self.spool, self.database, self.log = root, spool, database, log

    def _query(self, sql: str) -> list[tuple[object, ...]]:
        with sqlite3.connect(f"file:{self.database}?mode=ro", uri=True, timeout=30) as db:
            return list(db.execute(sql).fetchall())

    def files(self) -> frozenset[Path]:
        """Every file under ``root`` but the database and log, with the spool's temp files."""
        return frozenset(p for p in self.root.rglob("*") if p.is_file() and p.name not in _BOOKKEEPING)

    def instances(self) -> dict[str, str]:
        """SOP Instance UID -> spool path of every instance row."""
        return {str(uid): str(path) for uid, path in self._query("SELECT sop_instance_uid, path FROM instances")}

    def open_associations(self, after: int = 0) -> list[str]:
        """Incoming associations after row ``after`` recorded as accepted that never ended (no release or abort)."""
        rows = self._query("SELECT id, calling_ae FROM associations WHERE direction = 'in' AND ended_at IS NULL"
                           f" AND outcome = 'accepted' AND id > {int(after)}")  # fmt: skip
        return [f"association {row_id} from {ae}" for row_id, ae in rows]

    def last_association(self) -> int:
        ((last,),) = self._query("SELECT coalesce(max(id), 0) FROM associations")
        return int(last)  # type: ignore[call-overload]

    def jobs(self) -> list[tuple[str, str | None, str]]:
        """(state, reason, study instance UID) of every job."""
        query = "SELECT j.state, j.reason, s.study_instance_uid FROM jobs j JOIN studies s ON s.id = j.study_id"
        return [
            (str(state), None if reason is None else str(reason), str(uid)) for state, reason, uid in self._query(query)
        ]

    def log_size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def log_since(self, offset: int) -> str:
        with open(self.log, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")

    def snapshot(self) -> Snapshot:
        return Snapshot(self.log_size(), self.files(), self.instances(), self.last_association())

    def kept_since(self, before: Snapshot, allowed: Iterable[str] = ()) -> list[str]:
        """What was kept since ``before`` other than the instances ``allowed``: files and instance rows."""
        expected = set(allowed)
        problems = []
        rows = {uid: relpath for uid, relpath in self.instances().items() if uid not in before.instances}
        for uid, relpath in rows.items():
            if uid not in expected:
                problems.append(f"kept an instance row {uid!r} -> {relpath}")
        expected_files = {self.spool / relpath for uid, relpath in rows.items() if uid in expected}
        for path in sorted(self.files() - before.files - expected_files):
            problems.append(f"kept a file {path.relative_to(self.root)} ({path.stat().st_size} bytes)")
        missing = expected - set(rows)
        if missing:
            problems.append(f"did not keep {sorted(missing)}")
        return problems

    def settle(self, before: Snapshot, timeout_s: float) -> list[str]:
        """Wait for the node to record the end of the associations opened since ``before``; those still open
        after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            still_open = self.open_associations(before.last_association)
            if not still_open or time.monotonic() > deadline:
                return [f"{a} never recorded as ended (no release or abort in the audit)" for a in still_open]
            time.sleep(0.1)


def naive_paths(spool: Path, study: str, series: str, sop: str) -> list[Path]:
    """Where a spool joining UIDs into a path unchecked would write (``/etc/...``, ``../../x``): the file and
    its two folders. Empty when the UIDs cannot be a path at all (a NUL)."""
    if "\x00" in study + series + sop:
        return []
    final = spool / study / series / f"{sop}.dcm"
    return [final, final.parent, final.parent.parent]


def existing(paths: Iterable[Path]) -> set[Path]:
    return {p for p in paths if p.exists()}


def traceback_lines(log: str, context: int = 2) -> list[str]:
    """The lines of every Python traceback in ``log``, with the ``context`` lines before each."""
    lines = log.splitlines()
    out: list[str] = []
    for k, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last)"):
            end = k + 1
            while end < len(lines) and (lines[end].startswith((" ", "\t")) or lines[end].startswith("During")):
                end += 1
            out += lines[max(0, k - context) : end + 1]
    return out


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak resident), VmSize and VmPeak of process ``pid`` in kB, from ``/proc/<pid>/status``."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "VmSize", "VmPeak"):
            out[key] = int(value.split()[0])
    return out


def reset_peak_rss(pid: int) -> None:
    """Set the process's VmHWM back to its current resident size (Linux >= 4.0, ``clear_refs`` value 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
