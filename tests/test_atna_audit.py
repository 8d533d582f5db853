"""The audit trail as DICOM audit messages to the site's audit repository (issue 12, item 13).

An audit repository runs in the test process: it accepts TCP (or TLS, certificates from a
throw-away ``openssl`` CA) connections, splits the octet-counted frames (RFC 6587 3.4.1), parses
each RFC 5424 header and the XML after it, and checks the XML against the shape of the PS3.15
A.5.1 schema (element and attribute names, their order, the enumerated values). The node's
audit events are made by the node's own code: its parts in the test process for the unit tests,
a whole node in its own process with DCMTK as scanner, intruder and PACS for the last ones.
"""

from __future__ import annotations

import base64
import getpass
import logging
import os
import re
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import select, text

from db.models import Association, AuditEvent, AuditForwarding
from node.audit import trail
from node.audit.events import NodeIdentity, messages_for
from node.audit.forwarder import AuditForwarder
from node.audit.message import AuditSource
from node.audit.syslog import SyslogSender, tls_context
from node.config import AuditSettings, Config, ConfigError, SyslogTarget
from tests.support.cli import ainode
from tests.support.node_parts import ACCEPT, FakeStore, NodeParts, build_node, ct_study
from tests.support.nodeproc import NodeProcess, node_section
from tests.support.peers import SiteCA, StoreSCP, echoscu, free_port, storescu
from tests.support.series import ct_series, save
from tests.support.waiting import wait_for

PATIENT_NAME = "Quaxelbrink^Hortensia"
PATIENT_ID = "AUDIT-PID-4711"
STUDY_UID = "1.2.826.0.1.3680043.8.498.7001"
NODE = NodeIdentity("AINODE", AuditSource("AINODE", "ST-MARY"))


# -- the audit repository of the tests -----------------------------------------------------------
def split_octet_counted(stream: bytes) -> list[bytes]:
    """RFC 6587 3.4.1: ``MSG-LEN SP SYSLOG-MSG``, repeated; MSG-LEN is NONZERO-DIGIT *DIGIT."""
    frames, at = [], 0
    while at < len(stream):
        space = stream.index(b" ", at)
        length = stream[at:space]
        assert re.fullmatch(rb"[1-9][0-9]*", length), f"not an octet count: {length[:20]!r}"
        end = space + 1 + int(length)
        assert end <= len(stream), "a frame longer than what was sent"
        frames.append(stream[space + 1 : end])
        at = end
    return frames


@dataclass
class SyslogMessage:
    """One RFC 5424 message: its header fields, and the audit message (XML) in its MSG."""

    pri: int
    version: str
    timestamp: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    structured_data: str
    xml: bytes

    @property
    def root(self) -> ET.Element:
        return ET.fromstring(self.xml)

    @property
    def event_id(self) -> str:
        found = self.root.find("EventIdentification/EventID")
        assert found is not None
        return found.get("csd-code", "")


_HEADER = re.compile(rb"<(\d{1,3})>([1-9]\d{0,2}) (\S+) (\S+) (\S+) (\S+) (\S+) (-|\[.*?\]) ", re.DOTALL)


def parse_rfc5424(frame: bytes) -> SyslogMessage:
    found = _HEADER.match(frame)
    assert found is not None, f"not an RFC 5424 message: {frame[:120]!r}"
    msg = frame[found.end() :]
    assert msg.startswith(b"\xef\xbb\xbf"), "an RFC 5424 UTF-8 MSG starts with the BOM"
    pri, version, timestamp, hostname, app_name, procid, msgid, sd = (g.decode("ascii") for g in found.groups())
    return SyslogMessage(int(pri), version, timestamp, hostname, app_name, procid, msgid, sd, xml=msg[3:])


class AuditRepository:
    """A syslog collector on 127.0.0.1:``port``: reads each connection to its end, keeps the frames."""

    def __init__(self, port: int, context: ssl.SSLContext | None = None) -> None:
        self.port, self.context = port, context
        self.frames: list[bytes] = []
        self.handshake_errors: list[str] = []
        self.client_certificates: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: socket.socket | None = None

    def start(self) -> AuditRepository:
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._server.settimeout(0.2)
        threading.Thread(target=self._accept, name=f"audit-repository:{self.port}", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.close()

    def _accept(self) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        with conn:
            stream: socket.socket = conn
            if self.context is not None:
                try:
                    stream = self.context.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    with self._lock:
                        self.handshake_errors.append(str(exc))
                    return
                with self._lock:
                    self.client_certificates.append(stream.getpeercert() or {})  # type: ignore[attr-defined]
            data = b""
            while chunk := stream.recv(65536):
                data += chunk
            frames = split_octet_counted(data)
            with self._lock:
                self.frames += frames

    def messages(self) -> list[SyslogMessage]:
        with self._lock:
            return [parse_rfc5424(f) for f in self.frames]


# -- the PS3.15 A.5.1 schema, as a shape ------------------------------------------------------------
CODED = {"required": {"csd-code", "codeSystemName", "originalText"}, "optional": {"displayName"}}
#: Per element: required and optional attributes, enumerated attribute values, and the children as a
#: regular expression over their names (the schema's order and repetitions).
SCHEMA: dict[str, dict[str, Any]] = {
    "AuditMessage": {
        "children": r"EventIdentification (ActiveParticipant )+AuditSourceIdentification "
        r"(ParticipantObjectIdentification )*",
    },
    "EventIdentification": {
        "required": {"EventDateTime", "EventOutcomeIndicator"},
        "optional": {"EventActionCode"},
        "values": {"EventActionCode": {"C", "R", "U", "D", "E"}, "EventOutcomeIndicator": {"0", "4", "8", "12"}},
        "children": r"EventID (EventTypeCode )*(EventOutcomeDescription )?",
    },
    "EventID": CODED,
    "EventTypeCode": CODED,
    "EventOutcomeDescription": {"text": True},
    "ActiveParticipant": {
        "required": {"UserID", "UserIsRequestor"},
        "optional": {"AlternativeUserID", "UserName", "NetworkAccessPointID", "NetworkAccessPointTypeCode"},
        "values": {"UserIsRequestor": {"true", "false", "1", "0"}, "NetworkAccessPointTypeCode": set("12345")},
        "children": r"(RoleIDCode )*(MediaIdentifier )?",
    },
    "RoleIDCode": CODED,
    "AuditSourceIdentification": {
        "required": {"AuditSourceID"},
        "optional": {"AuditEnterpriseSiteID"},
        "children": r"(AuditSourceTypeCode )*",
    },
    "AuditSourceTypeCode": {"required": {"csd-code"}, "optional": {"codeSystemName", "displayName", "originalText"}},
    "ParticipantObjectIdentification": {
        "required": {"ParticipantObjectID"},
        "optional": {
            "ParticipantObjectTypeCode",
            "ParticipantObjectTypeCodeRole",
            "ParticipantObjectDataLifeCycle",
            "ParticipantObjectSensitivity",
        },
        "values": {
            "ParticipantObjectTypeCode": set("1234"),
            "ParticipantObjectTypeCodeRole": {str(n) for n in range(1, 27)},
            "ParticipantObjectDataLifeCycle": {str(n) for n in range(1, 16)},
        },
        # Name or Query: optional, as the A.5.3 message tables have them (this node writes neither).
        "children": r"ParticipantObjectIDTypeCode ((ParticipantObjectName|ParticipantObjectQuery) )?"
        r"(ParticipantObjectDetail )*(ParticipantObjectDescription )*",
    },
    "ParticipantObjectIDTypeCode": CODED,
    "ParticipantObjectDetail": {"required": {"type", "value"}},
    "ParticipantObjectDescription": {
        "children": r"(MPPS )*(Accession )*(SOPClass )*(ParticipantObjectContainsStudy )?(Encrypted )?(Anonymized )?",
    },
    "SOPClass": {"required": {"NumberOfInstances"}, "optional": {"UID"}, "children": r"(Instance )*"},
    "Instance": {"required": {"UID"}},
}


def schema_problems(element: ET.Element, path: str = "") -> list[str]:
    """What in ``element`` (and below) the A.5.1 schema does not allow; empty when it all fits."""
    path = f"{path}/{element.tag}"
    rules = SCHEMA.get(element.tag)
    if rules is None:
        return [f"{path}: no such element in the schema"]
    problems = []
    attributes = set(element.attrib)
    for missing in rules.get("required", set()) - attributes:
        problems.append(f"{path}: attribute {missing} missing")
    for extra in attributes - rules.get("required", set()) - rules.get("optional", set()):
        problems.append(f"{path}: attribute {extra} not in the schema")
    for name, allowed in rules.get("values", {}).items():
        if name in element.attrib and element.attrib[name] not in allowed:
            problems.append(f"{path}: {name}={element.attrib[name]!r} is not one of the schema's values")
    sequence = "".join(f"{child.tag} " for child in element)
    if not re.fullmatch(rules.get("children", ""), sequence):
        problems.append(f"{path}: children {sequence.split()} do not follow {rules.get('children')!r}")
    if (element.text or "").strip() and not rules.get("text"):
        problems.append(f"{path}: text where the schema has none")
    if element.tag == "EventIdentification":
        stamp = element.get("EventDateTime", "")
        if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", stamp):
            problems.append(f"{path}: EventDateTime {stamp!r} is not an xsd:dateTime with its time zone")
    if element.tag == "ParticipantObjectDetail":
        base64.b64decode(element.get("value", ""), validate=True)
    for child in element:
        problems += schema_problems(child, path)
    return problems


def participants(root: ET.Element) -> list[dict[str, Any]]:
    return [
        {**p.attrib, "roles": [r.get("csd-code") for r in p.findall("RoleIDCode")]}
        for p in root.findall("ActiveParticipant")
    ]


def objects(root: ET.Element) -> list[tuple[str, str | None, str | None]]:
    """(ParticipantObjectID, ID type code, role) of each participant object."""
    return [
        (o.get("ParticipantObjectID", ""), o.find("ParticipantObjectIDTypeCode").get("csd-code"),  # type: ignore[union-attr]
         o.get("ParticipantObjectTypeCodeRole"))
        for o in root.findall("ParticipantObjectIdentification")
    ]  # fmt: skip


# -- the node's audit events, made by its own parts -------------------------------------------------
def with_patient(slices: list) -> list:
    for ds in slices:
        ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    return slices


def node_with_a_delivered_result(tmp_path: Path) -> NodeParts:
    """A study received from CT1, analysed, its result accepted by the PACS: the outbox's "delivered" event."""
    node = build_node(tmp_path)
    node.processed_study(with_patient(ct_study(study_uid=STUDY_UID)))
    assert node.outbox(FakeStore(ACCEPT)).run_pass(now=node.clock.now).delivered == 1
    return node


def add_receiver_and_operator_events(node: NodeParts) -> None:
    """The events the receiver and the operator's commands write (their own functions and wording)."""
    with node.sessions() as session, session.begin():
        accepted = Association(calling_ae="CT1", called_ae="AINODE", peer_host="127.0.0.1", outcome="released")
        session.add(accepted)
        session.flush()
        session.add(AuditEvent(kind=trail.ASSOCIATION, actor=trail.caller("CT1", "127.0.0.1"), subject=str(accepted.id),
                               detail=trail.association_ended("released", 3, 0, [STUDY_UID])))  # fmt: skip
        reason = "calling AE title 'INTRUDER' from 10.9.8.7 not in allowed_callers"
        session.add(AuditEvent(kind=trail.ASSOCIATION, actor=trail.caller("INTRUDER", "10.9.8.7"), subject="99",
                               detail=trail.association_rejected(reason)))  # fmt: skip
        session.add(AuditEvent(kind="operator", actor="ainode jobs retry (alice)", subject="1", detail="done"))
        session.add(AuditEvent(kind="operator", actor="ainode outbox retry (bob)", subject="deliveries",
                               detail="made due: 1"))  # fmt: skip
        session.add(AuditEvent(kind="job", actor="w0", subject="1", detail="done: "))  # bookkeeping: no message


def all_messages(node: NodeParts) -> list[tuple[AuditEvent, Any]]:
    with node.sessions() as session:
        events = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
        return [(e, m) for e in events for m in messages_for(session, e, NODE)]


def test_each_audited_action_becomes_a_ps3_15_audit_message(tmp_path: Path) -> None:
    node = node_with_a_delivered_result(tmp_path)
    add_receiver_and_operator_events(node)

    made = all_messages(node)
    documents = {(event.kind, re.split(r"[: ]", event.detail or "")[0]): ET.fromstring(m.to_xml()) for event, m in made}

    for (kind, _), root in documents.items():
        assert schema_problems(root) == [], kind
        assert PATIENT_NAME.split("^")[0] not in ET.tostring(root, encoding="unicode")
        assert root.find("ParticipantObjectIdentification/ParticipantObjectName") is None
        source = root.find("AuditSourceIdentification")
        assert source is not None and source.attrib == {"AuditEnterpriseSiteID": "ST-MARY", "AuditSourceID": "AINODE"}
    assert {kind for kind, _ in documents} == {"delivery", "association", "operator"}, "bookkeeping makes no message"

    received = documents[("association", "released")]
    assert received.find("EventIdentification").attrib["EventActionCode"] == "C"  # type: ignore[union-attr]
    assert received.find("EventIdentification/EventID").get("csd-code") == "110104"  # type: ignore[union-attr]
    sender, us = participants(received)
    assert (sender["UserID"], sender["UserIsRequestor"], sender["roles"]) == ("CT1", "true", ["110153"])
    assert sender["NetworkAccessPointID"] == "127.0.0.1" and sender["NetworkAccessPointTypeCode"] == "2"
    assert (us["UserID"], us["UserIsRequestor"], us["roles"]) == ("AINODE", "false", ["110152"])
    assert objects(received) == [(STUDY_UID, "110180", "3"), (PATIENT_ID, "2", "1")]

    rejected = documents[("association", "rejected")]
    assert rejected.find("EventIdentification/EventID").get("csd-code") == "110113"  # type: ignore[union-attr]
    assert rejected.find("EventIdentification/EventTypeCode").get("csd-code") == "110126"  # type: ignore[union-attr]
    assert rejected.find("EventIdentification").get("EventOutcomeIndicator") == "4"  # type: ignore[union-attr]
    intruder = participants(rejected)[0]
    assert (intruder["UserID"], intruder["NetworkAccessPointID"], intruder["UserIsRequestor"]) == (
        "INTRUDER", "10.9.8.7", "true")  # fmt: skip
    assert "not in allowed_callers" in rejected.findtext("EventIdentification/EventOutcomeDescription", "")

    sent = documents[("delivery", "delivered")]
    assert sent.find("EventIdentification").get("EventActionCode") == "R"  # type: ignore[union-attr]
    us, pacs = participants(sent)
    assert (us["UserID"], us["UserIsRequestor"], us["roles"]) == ("AINODE", "true", ["110153"])
    assert (pacs["UserID"], pacs["UserIsRequestor"], pacs["roles"]) == ("PACS", "false", ["110152"])
    (result,) = node.results()
    counted = sent.find("ParticipantObjectIdentification/ParticipantObjectDescription/SOPClass")
    assert counted is not None and counted.attrib == {"UID": result.sop_class_uid, "NumberOfInstances": "1"}

    operators = [root for (kind, _), root in documents.items() if kind == "operator"]
    by_whom = {participants(root)[0]["UserID"]: root for root in operators}
    assert set(by_whom) == {"alice", "bob"}
    for root in by_whom.values():
        assert root.find("EventIdentification/EventID").get("csd-code") == "110103"  # type: ignore[union-attr]
        assert participants(root)[0]["UserIsRequestor"] == "true"
        assert objects(root)[0] == (STUDY_UID, "110180", "3")
    assert by_whom["alice"].find("EventIdentification/EventTypeCode").get("csd-code") == "JOB-RETRY"  # type: ignore[union-attr]


# -- forwarding ---------------------------------------------------------------------------------------
def forwarder(
    node: NodeParts, port: int, *, context: ssl.SSLContext | None = None, owner: str = "unit:1"
) -> AuditForwarder:
    sender = SyslogSender("127.0.0.1", port, context=context, timeout_s=5)
    return AuditForwarder(node.sessions, sender, NODE, owner=owner, hostname="ainode-host", initial_delay_s=1,
                          max_delay_s=8)  # fmt: skip


def unforwarded(node: NodeParts) -> int:
    return len([e for e in node.rows(AuditEvent) if e.forwarded_at is None])


def lease_of(node: NodeParts) -> AuditForwarding:
    with node.sessions() as session:
        (row,) = session.scalars(select(AuditForwarding)).all()
        return row


@pytest.fixture
def repository() -> Iterator[Callable[..., AuditRepository]]:
    started: list[AuditRepository] = []

    def start(port: int | None = None, context: ssl.SSLContext | None = None) -> AuditRepository:
        started.append(AuditRepository(port or free_port(), context).start())
        return started[-1]

    yield start
    for repo in started:
        repo.stop()


def test_events_reach_the_repository_as_octet_counted_rfc5424_messages(tmp_path: Path, repository: Any) -> None:
    node = node_with_a_delivered_result(tmp_path)
    add_receiver_and_operator_events(node)
    repo = repository()
    forward = forwarder(node, repo.port)

    assert forward.run_once(now=node.clock.now) is False, "one batch held every event"

    wait_for(lambda: len(repo.messages()) == 5, 10, "five audit messages")
    messages = repo.messages()
    for message in messages:
        assert message.version == "1" and message.msgid == "DICOM+RFC3881" and message.app_name == "ainode"
        assert message.pri in (10 * 8 + 5, 10 * 8 + 4)  # facility 10 (security), notice or warning
        assert message.hostname == "ainode-host" and message.procid == str(os.getpid())
        assert message.structured_data == "-" and message.xml.startswith(b'<?xml version="1.0" encoding="UTF-8"?>')
        assert schema_problems(message.root) == []
    assert sorted(m.event_id for m in messages) == ["110103", "110103", "110104", "110104", "110113"]
    assert [m.pri for m in messages if m.event_id == "110113"] == [84], "a refused association is a warning"
    assert unforwarded(node) == 0
    lease = lease_of(node)
    assert (lease.leased_by, lease.forwarded, lease.last_error) == ("unit:1", len(node.rows(AuditEvent)), None)

    forward.run_once(now=node.clock.advance(1))
    time.sleep(0.3)
    assert len(repo.messages()) == 5, "a forwarded event is not sent again"


def test_events_wait_while_the_repository_is_down_and_arrive_when_it_is_back(
    tmp_path: Path, repository: Any, caplog: pytest.LogCaptureFixture
) -> None:
    node = node_with_a_delivered_result(tmp_path)
    port = free_port()  # nobody listens there yet
    forward = forwarder(node, port)
    caplog.set_level(logging.INFO, logger="ainode.audit")

    for _ in range(6):  # six tries, as the doubling delay (1, 2, 4, 8, 8 s) allows them
        forward.run_once(now=node.clock.advance(8))
    forward.run_once(now=node.clock.advance(0.5))  # within the delay: not even tried

    down = [r for r in caplog.records if "cannot be reached" in r.getMessage()]
    assert len(down) == 1 and down[0].levelno == logging.WARNING, "an outage is logged once, not per try"
    assert "kept" in down[0].getMessage() and f"127.0.0.1:{port}" in down[0].getMessage()
    assert unforwarded(node) == len(node.rows(AuditEvent)) > 0
    lease = lease_of(node)
    assert lease.failing_since is not None and "connecting" in (lease.last_error or "")

    add_receiver_and_operator_events(node)  # more events while it is down
    repo = repository(port)
    forward.run_once(now=node.clock.advance(8))

    wait_for(lambda: len(repo.messages()) == 5, 10, "every event kept during the outage")
    assert unforwarded(node) == 0
    back = [r for r in caplog.records if "reachable again" in r.getMessage()]
    assert len(back) == 1 and "6 tries" in back[0].getMessage()
    lease = lease_of(node)
    assert lease.failing_since is None and lease.last_error is None


def test_a_repository_that_resets_the_connection_gets_the_batch_again(tmp_path: Path) -> None:
    node = node_with_a_delivered_result(tmp_path)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def reset_after_reading_a_little() -> None:
        conn, _ = server.accept()
        conn.recv(10)  # then dies with the rest unread: the kernel answers with a reset
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()

    thread = threading.Thread(target=reset_after_reading_a_little)
    thread.start()
    forward = forwarder(node, port)
    forward.run_once(now=node.clock.now)
    thread.join(5)
    server.close()

    assert unforwarded(node) == len(node.rows(AuditEvent)), "not taken: sent again later"


@pytest.mark.postgres
def test_forwarding_marks_events_on_postgresql_too(tmp_path: Path, repository: Any, postgres_url: str) -> None:
    from tests.support.node_parts import make_config

    node = build_node(tmp_path, config=make_config(tmp_path, node={"database_url": postgres_url}))
    node.processed_study(with_patient(ct_study(study_uid=STUDY_UID)))
    assert node.outbox(FakeStore(ACCEPT)).run_pass(now=node.clock.now).delivered == 1
    add_receiver_and_operator_events(node)
    repo = repository()

    forwarder(node, repo.port).run_once(now=node.clock.now)

    wait_for(lambda: len(repo.messages()) == 5, 10, "five audit messages")
    assert unforwarded(node) == 0 and lease_of(node).forwarded == len(node.rows(AuditEvent))
    with node.sessions() as session:
        index = session.execute(text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_audit_events_unforwarded'"))
        assert "WHERE (forwarded_at IS NULL)" in index.scalar_one()


def test_only_the_process_holding_the_lease_forwards(tmp_path: Path, repository: Any) -> None:
    node = node_with_a_delivered_result(tmp_path)
    repo = repository()
    first, second = forwarder(node, repo.port, owner="host-a:1"), forwarder(node, repo.port, owner="host-b:2")
    assert first.run_once(now=node.clock.now) is False
    wait_for(lambda: len(repo.messages()) == 1, 10, "the first process's message")

    add_receiver_and_operator_events(node)
    second.run_once(now=node.clock.advance(10))  # the first process's lease (60 s) still runs
    time.sleep(0.3)
    assert len(repo.messages()) == 1 and unforwarded(node) > 0

    second.run_once(now=node.clock.advance(61))  # the first process stopped: its lease ran out
    wait_for(lambda: len(repo.messages()) == 5, 10, "the second process's messages")
    lease = lease_of(node)
    assert lease.leased_by == "host-b:2"


# -- TLS (RFC 5425) with a throw-away CA ------------------------------------------------------------
@dataclass
class PKI:
    ca: SiteCA
    repository: tuple[Path, Path]
    node: tuple[Path, Path]
    #: A CA the node was never told about.
    other: SiteCA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    folder = tmp_path_factory.mktemp("audit-pki")
    ca, other = SiteCA(folder / "site"), SiteCA(folder / "other", name="other-ca")
    return PKI(ca, ca.issue("audit-repository"), ca.issue("ainode"), other)


def repository_context(pki: PKI, key_cert: tuple[Path, Path]) -> ssl.SSLContext:
    """The repository's side: its certificate, and senders must show one of the site CA (mutual TLS)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(key_cert[1], key_cert[0])
    context.load_verify_locations(cafile=pki.ca.cert)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def test_audit_messages_go_over_mutually_authenticated_tls(tmp_path: Path, repository: Any, pki: PKI) -> None:
    node = node_with_a_delivered_result(tmp_path)
    repo = repository(context=repository_context(pki, pki.repository))
    context = tls_context(pki.ca.cert, cert_file=pki.node[1], key_file=pki.node[0])

    forwarder(node, repo.port, context=context).run_once(now=node.clock.now)

    (message,) = wait_for(lambda: repo.messages(), 10, "the message over TLS")
    assert message.event_id == "110104" and schema_problems(message.root) == []
    (certificate,) = repo.client_certificates
    assert ("commonName", "ainode") in [field for rdn in certificate["subject"] for field in rdn]
    assert unforwarded(node) == 0


def test_a_repository_with_a_certificate_of_another_ca_gets_nothing(tmp_path: Path, repository: Any, pki: PKI) -> None:
    node = node_with_a_delivered_result(tmp_path)
    impostor = repository(context=repository_context(pki, pki.other.issue("impostor", tmp_path / "impostor")))
    context = tls_context(pki.ca.cert, cert_file=pki.node[1], key_file=pki.node[0])
    forward = forwarder(node, impostor.port, context=context)

    forward.run_once(now=node.clock.now)

    assert impostor.frames == [] and unforwarded(node) == len(node.rows(AuditEvent))
    lease = lease_of(node)
    assert "certificate not accepted" in (lease.last_error or "")


# -- configuration --------------------------------------------------------------------------------------
def test_the_audit_section_defaults_and_refusals(tmp_path: Path, pki: PKI) -> None:
    assert Config().audit.syslog is None, "no repository unless one is configured"
    assert SyslogTarget(host="audit.hospital").effective_port == 6514
    assert SyslogTarget(host="audit.hospital", tls=False).effective_port == 601
    target = SyslogTarget(host="audit.hospital", port=6515, ca_file=pki.ca.cert)
    assert (target.tls, target.effective_port, target.ca_file) == (True, 6515, pki.ca.cert)

    refusals = {
        "cert_file and key_file go together": {"host": "a", "cert_file": str(pki.node[1])},
        "are for tls: true": {"host": "a", "tls": False, "ca_file": str(pki.ca.cert)},
        "no such file": {"host": "a", "ca_file": str(tmp_path / "missing.crt")},
        "Extra inputs are not permitted": {"host": "a", "protocol": "udp"},
    }
    for message, values in refusals.items():
        with pytest.raises(ValidationError, match=message):
            AuditSettings.model_validate({"syslog": values})

    not_pem = tmp_path / "not-a-certificate.crt"
    not_pem.write_text("hello")
    config = Config.model_validate({"audit": {"syslog": {"host": "127.0.0.1", "ca_file": str(not_pem)}}})
    with pytest.raises(ConfigError, match=r"audit\.syslog\.ca_file: .*not-a-certificate.crt: not a PEM certificate"):
        AuditForwarder.from_config(config, build_node(tmp_path).sessions, owner="unit:1")


# -- a whole node, with DCMTK as scanner, intruder and PACS -----------------------------------------------
@pytest.mark.dcmtk
def test_a_node_reports_what_it_received_refused_sent_and_was_told_to_redo(tmp_path: Path, pki: PKI) -> None:
    pacs = StoreSCP(tmp_path / "pacs")
    study = tmp_path / "study"
    study.mkdir()
    slices = with_patient(ct_series(4))
    for k, ds in enumerate(slices):
        save(ds, study / f"{k}.dcm")
    study_uid = str(slices[0].StudyInstanceUID)
    audit_port = free_port()  # the repository starts only later: the node must keep its events meanwhile
    config = {
        "node": node_section(tmp_path, allowed_callers=["CT1", "PROBE"]),  # PROBE: the tests' C-ECHO at start
        "peers": {"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.port, "outputs": ["sc"]}},
        "routes": [{"name": "ct", "match": {"Modality": "CT"}, "pipeline": "thumbnail", "destinations": ["pacs"],
                    "stable_after_s": 1}],
        "audit": {
            "syslog": {"host": "127.0.0.1", "port": audit_port, "tls": True, "ca_file": str(pki.ca.cert),
                       "cert_file": str(pki.node[1]), "key_file": str(pki.node[0]), "timeout_s": 5},
            "initial_delay_s": 0.2,
            "max_delay_s": 1,
        },
    }  # fmt: skip
    repo = AuditRepository(audit_port, repository_context(pki, pki.repository))
    try:
        with NodeProcess(config, tmp_path / "node") as node:
            assert storescu(study, node.port, calling_ae="CT1").returncode == 0
            refused = echoscu(node.port, calling_ae="INTRUDER")
            assert refused.returncode != 0
            wait_for(lambda: len(pacs.received()) >= 1, 120, "the result at the PACS", node)
            wait_for(lambda: "cannot be reached" in node.log_text(), 30, "the outage noticed", node)
            time.sleep(2)  # the forwarder tries again meanwhile (0.2 s, doubling up to 1 s): no new line each time
            assert node.log_text().count("cannot be reached") == 1, node.log_text()[-3000:]

            repo.start()

            def arrived(event_id: str, action: str) -> list[SyslogMessage]:
                return [m for m in repo.messages() if m.event_id == event_id
                        and m.root.find("EventIdentification").get("EventActionCode") == action]  # type: ignore[union-attr]  # fmt: skip

            wait_for(lambda: arrived("110104", "C") and arrived("110113", "E") and arrived("110104", "R"), 60,
                     "the audit messages kept while the repository was down", node)  # fmt: skip
            # The forwarder logs the outage's end after it has marked the events sent, a moment after they arrive.
            wait_for(lambda: "reachable again" in node.log_text(), 30, "the outage's end logged", node)
            assert node.log_text().count("reachable again") == 1

            retried = ainode("jobs", "retry", "1", "--config", str(node.config_path))
            assert retried.returncode == 0, retried.stderr
            (redo,) = wait_for(lambda: arrived("110103", "R"), 60, "the operator's retry", node)
            wait_for(lambda: len(arrived("110104", "R")) >= 2, 120, "the result sent again", node)
    finally:
        repo.stop()
        pacs.stop()

    messages = repo.messages()
    for message in messages:
        assert schema_problems(message.root) == [], message.xml
        assert b"Quaxelbrink" not in message.xml and b"Hortensia" not in message.xml
    (received,) = arrived("110104", "C")
    sender, us = participants(received.root)
    assert (sender["UserID"], sender["NetworkAccessPointID"], sender["roles"]) == ("CT1", "127.0.0.1", ["110153"])
    assert (us["UserID"], us["roles"]) == ("AINODE", ["110152"])
    assert objects(received.root) == [(study_uid, "110180", "3"), (PATIENT_ID, "2", "1")]
    described = received.root.find("ParticipantObjectIdentification/ParticipantObjectDescription/SOPClass")
    assert described is not None and described.attrib == {"UID": str(slices[0].SOPClassUID), "NumberOfInstances": "4"}

    (rejection,) = arrived("110113", "E")
    intruder = participants(rejection.root)[0]
    assert (intruder["UserID"], intruder["NetworkAccessPointID"]) == ("INTRUDER", "127.0.0.1")
    assert "INTRUDER" in rejection.root.findtext("EventIdentification/EventOutcomeDescription", "")

    first_sent = arrived("110104", "R")[0]
    us, destination = participants(first_sent.root)
    assert (us["UserID"], destination["UserID"], destination["roles"]) == ("AINODE", pacs.aet, ["110152"])
    assert objects(first_sent.root)[0] == (study_uid, "110180", "3")

    (started,) = arrived("110100", "E")  # Application Activity: the node started (A.5.3.1)
    assert started.root.find("EventIdentification/EventTypeCode").get("csd-code") == "110120"  # type: ignore[union-attr]
    application, launcher = participants(started.root)
    assert (application["UserID"], application["roles"]) == ("AINODE", ["110150"])
    assert launcher["roles"] == ["110151"] and launcher["UserIsRequestor"] == "true"

    user = os.environ.get("SUDO_USER") or getpass.getuser()
    operator = participants(redo.root)[0]
    assert (operator["UserID"], operator["UserIsRequestor"]) == (user, "true")
    assert objects(redo.root)[0] == (study_uid, "110180", "3")
    assert redo.root.find("EventIdentification/EventTypeCode").get("csd-code") == "JOB-RETRY"  # type: ignore[union-attr]
    stamps = [datetime.fromisoformat(m.timestamp) for m in messages]
    assert max(stamps) - min(stamps) < timedelta(minutes=10)
