"""The receiving side: a pynetdicom AE answering C-ECHO and C-STORE.

The C-STORE handler stays small (STYLE.md): read the few header attributes the index
needs, hand the bytes as received to the spool, commit the row, return the status. No
pixel decoding, no routing, no model on this path.
"""

from __future__ import annotations

import copy
import gc
import logging
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from pydicom import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from db.models import Association as AssociationRow
from db.models import AuditEvent, Study, utcnow
from node.audit import trail
from node.receive.duplicates import DuplicateDecision, DuplicatePolicy, Verdict, judge
from node.receive.encoding import EncodingProblem, decode
from node.receive.filemeta import FileMetaEncoder
from node.receive.ingest import AlreadyIndexed, InstanceIndex, ReceivedInstance
from node.receive.spool import Spool, SpoolError, StagedFile, valid_uid
from node.tls import describe_tls_error, handshake
from pipelines.pixeldata import pixel_data_problem

log = logging.getLogger("ainode.scp")

#: How often the accept loop checks for shutdown (seconds).
ACCEPT_POLL_S = 0.05
#: How often the accept loop runs a full garbage collection (seconds), as pynetdicom's at its default poll.
GC_EVERY_S = 30.0

# C-STORE statuses (PS3.4 Annex B.2.3).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # disk full, database unavailable: the sender should retry later
DATASET_MISMATCH = 0xA900  # required attributes missing or inconsistent with the request
CANNOT_UNDERSTAND = 0xC000  # the dataset could not be parsed at all

# An AE title can never contain a backslash (PS3.5 6.2), so this entry matches no caller.
_NOBODY = "\\"


def _uid_reaches_the_handler(value: object) -> tuple[bool, str]:
    """pynetdicom's UID check for DIMSE messages, relaxed so that a malformed UID gets a status.

    pynetdicom aborts the association (with a traceback in the log) when a request's Affected SOP
    Instance UID is longer than 64 characters; the C-STORE handler answers such a request 0xA900
    naming the UID as invalid, and the sender's other instances go on. Our own UIDs are valid.
    """
    return True, ""


#: Attributes every composite instance has; a dataset with none of them is not one.
_IDENTIFYING = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


#: What a refused C-STORE's status means, as the ``reason`` label of the rejected-instances counter.
REJECTION_REASONS = {
    OUT_OF_RESOURCES: "out-of-resources",
    DATASET_MISMATCH: "dataset-mismatch",
    CANNOT_UNDERSTAND: "cannot-understand",
}


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    # Error Comment is LO: at most 64 characters.
    ds.ErrorComment = comment[:64]
    return ds


@dataclass
class _AssocState:
    row_id: int | None
    calling_ae: str
    host: str
    stored: int = 0
    failed: int = 0
    study_ids: set[int] = field(default_factory=set)


class CallerPolicy:
    """Which calling AE titles may associate, optionally tied to a host (``AE@host``)."""

    def __init__(self, allowed_callers: list[str]) -> None:
        self.entries: list[tuple[str, str | None]] = []
        for entry in allowed_callers:
            ae, _, host = entry.partition("@")
            self.entries.append((ae.strip(), host.strip() or None))

    def allowed_titles(self, host: str | None) -> list[str]:
        return [ae for ae, h in self.entries if h is None or h == host]

    def allows(self, ae_title: str, host: str | None) -> bool:
        return not self.entries or ae_title.strip() in self.allowed_titles(host)


class ListenError(Exception):
    """The DICOM port cannot be listened on; ``str()`` is the one line shown to the administrator."""


def listen(host: str, port: int) -> socket.socket:
    """Bind and listen on ``host:port``; connections wait in the backlog until :meth:`StorageSCP.start`.

    The node binds before anything else starts, so that a second node on a port in use stops
    before it touches the spool (whose clean-up would delete files the first node is still
    writing), the database or the job queue.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        # A deep backlog: a burst of connections waits for accept() instead of SYN retries of 1, 3, 7 s.
        return socket.create_server((host, port), family=family, backlog=1024)
    except OSError as exc:
        # create_server appends "(while attempting to bind on address ...)"; the line below names it once.
        why = (exc.strerror or str(exc)).split(" (while attempting")[0]
        raise ListenError(f"cannot listen on {host}:{port}: {why[:1].lower()}{why[1:]}") from None


@dataclass(frozen=True)
class AssociationLimits:
    """How many connections the node serves at once, and how long one may take to become an association.

    A sender that opens connections and sends nothing, or half an A-ASSOCIATE-RQ, must not lock
    out the scanners: each connection has ``establish_timeout_s`` (the ARTIM timer of PS3.8 9.1.5,
    from the first byte) to become an association; one host holds at most ``per_host`` connections;
    the last ``reserved_for_known`` of ``total`` only go to known hosts (peers and allowed callers).
    """

    total: int = 32
    per_host: int = 8
    reserved_for_known: int = 8
    establish_timeout_s: float = 5.0
    known_hosts: frozenset[str] = frozenset()

    def refusal(self, host: str, open_total: int, open_from_host: int) -> str | None:
        """Why a new connection from ``host`` is refused, given what is open now; None to admit it."""
        if open_total >= self.total:
            return f"{open_total} connections open, limit {self.total}"
        if open_from_host >= self.per_host:
            return f"{open_from_host} connections open from {host}, limit per host {self.per_host}"
        if host not in self.known_hosts and open_total >= self.total - self.reserved_for_known:
            return f"{open_total} connections open; the last {self.reserved_for_known} are kept for known peers"
        return None


def known_hosts(hosts: Iterable[str]) -> frozenset[str]:
    """The hosts as configured and the addresses they resolve to now (a peer connects from an address)."""
    out: set[str] = set()
    for host in hosts:
        out.add(host)
        try:
            out.update(str(info[4][0]) for info in socket.getaddrinfo(host, None))
        except OSError:  # unresolvable now: its name is still known
            continue
    return frozenset(out)


class _FastCopyContexts(list):  # type: ignore[type-arg]
    """The server's supported contexts, copied per connection without ``copy.deepcopy``.

    pynetdicom deep-copies every supported context (170 storage classes x 45 transfer syntaxes) for
    each new connection: 70 ms of CPU under the GIL, so 200 connections took half a minute to accept.
    A context's state is its scalar attributes and its transfer syntax list: a shallow copy with the
    lists copied is the same, in half a millisecond.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        out = []
        for context in self:
            clone = copy.copy(context)
            for name, value in vars(context).items():
                if isinstance(value, list):
                    setattr(clone, name, list(value))
            out.append(clone)
        return out


#: PS3.7 C.4.1.1.3.2: Refused, SOP Class not supported.
SOP_CLASS_NOT_SUPPORTED = 0x0122


def _not_supported(event: evt.Event) -> int:
    return SOP_CLASS_NOT_SUPPORTED


def _not_supported_with_dataset(event: evt.Event) -> tuple[int, None]:
    return SOP_CLASS_NOT_SUPPORTED, None


def _answer_incomplete_c_stores(assoc: Association) -> None:
    """A C-STORE request without its Affected SOP Class or Instance UID gets 0xA900, as the README promises.

    pynetdicom drops such a request with a warning and sends nothing: the sender waits until its timeout.
    Its association reactor calls ``_serve_request`` for every request; this association's own answers
    those first and hands every other one on.
    """
    serve = assoc._serve_request

    def serve_or_refuse(msg: Any, context_id: int) -> None:
        if not isinstance(msg, C_STORE) or msg.is_valid_request or msg.MessageID is None:
            serve(msg, context_id)
            return
        missing = [k for k in ("AffectedSOPClassUID", "AffectedSOPInstanceUID") if getattr(msg, k, None) is None]
        log.warning("C-STORE refused: the request has no %s", " or ".join(missing) or "priority")
        response = C_STORE()
        response.MessageIDBeingRespondedTo = msg.MessageID
        response.AffectedSOPClassUID = msg.AffectedSOPClassUID
        response.AffectedSOPInstanceUID = msg.AffectedSOPInstanceUID
        response.Status = DATASET_MISMATCH
        response.ErrorComment = f"request without {', '.join(missing) or 'Priority'}"[:64]  # type: ignore[assignment]
        assoc.dimse.send_msg(response, context_id)

    assoc._serve_request = serve_or_refuse  # type: ignore[method-assign]


def _host_of(client_address: Any) -> str:
    return str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)


class _ListeningServer(ThreadedAssociationServer):
    """pynetdicom's server on a socket :func:`listen` already bound, through socketserver's bind hooks.

    It also admits each connection under :class:`AssociationLimits` before a thread is made for it.
    """

    def __init__(
        self,
        *args: Any,
        listener: socket.socket,
        limits: AssociationLimits,
        shared_with: _ListeningServer | None = None,
        **kwargs: Any,
    ) -> None:
        self._listener = listener
        self.limits = limits
        # The plain and the TLS listener count together (``shared_with``): the limits are the node's, so
        # that a flood on one port cannot take the slots kept for known peers on the other.
        #: Connections admitted whose association thread has not started yet (by host): counted as open.
        self._admitted: dict[str, int] = shared_with._admitted if shared_with is not None else {}
        self._admitted_lock: threading.Lock = (
            shared_with._admitted_lock if shared_with is not None else threading.Lock()
        )
        self._group: list[_ListeningServer] = shared_with._group if shared_with is not None else []
        self._group.append(self)
        super().__init__(*args, **kwargs)
        self.contexts = _FastCopyContexts(self.contexts)
        self._collected_at = time.monotonic()

    def service_actions(self) -> None:
        """socketserver's hook on every turn of the accept loop: a full garbage collection every GC_EVERY_S.

        pynetdicom's own runs one every 60 turns (it frees dead association threads): every 30 s at
        socketserver's 0.5 s poll, but every 3 s at the node's 0.05 s one, each holding the interpreter for
        tens of milliseconds in the middle of C-STOREs. Counted in seconds here, whatever the poll.
        """
        now = time.monotonic()
        if now - self._collected_at >= GC_EVERY_S:
            self._collected_at = now
            gc.collect()

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None  # bound in server_bind
        client, address = self.socket.accept()
        context = self.ssl_context  # read once: a SIGHUP may swap it for the connections after this one
        if context is not None:
            # pynetdicom shakes hands here, in the one thread that accepts: a client that stalls would hold
            # every other connection. Only wrapped here; the handshake runs in the connection's own thread.
            client = context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            # After verify_request: the admission limits held, and the handshake counts against ARTIM.
            try:
                handshake(request, self.limits.establish_timeout_s)
            except OSError as exc:  # ssl.SSLError and TimeoutError among them
                log.warning("TLS connection from %s refused: %s", _host_of(client_address), describe_tls_error(exc))
                self.association_thread_starting(client_address)  # no association follows: its admission ends
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = _host_of(client_address)
        with self._admitted_lock:
            open_now = [a.requestor.address for server in self._group for a in server.active_associations]
            open_now += [h for h, n in self._admitted.items() for _ in range(n)]
            why = self.limits.refusal(host, len(open_now), open_now.count(host))
            if why is None:
                self._admitted[host] = self._admitted.get(host, 0) + 1
        if why is not None:
            log.warning("connection from %s refused: %s", host, why)
            return False  # socketserver closes it
        # ARTIM: until the association is established, a read that waits longer than this ends the connection.
        request.settimeout(self.limits.establish_timeout_s)
        return True

    def association_thread_starting(self, client_address: Any) -> None:
        """From EVT_CONN_OPEN: the admitted connection is about to be counted as an active association."""
        host = _host_of(client_address)
        with self._admitted_lock:
            if self._admitted.get(host, 0) > 1:
                self._admitted[host] -= 1
            else:
                self._admitted.pop(host, None)

    def server_bind(self) -> None:
        if self.socket is not None:
            self.socket.close()  # the unbound socket socketserver made: ours is bound already
        self.socket = self._listener
        if self.ae.network_timeout is not None:  # as pynetdicom's own server_bind
            self.socket.settimeout(self.ae.network_timeout)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """Already listening (see :func:`listen`)."""


class _NodeAE(AE):
    """pynetdicom's AE with an allow-list that can depend on the caller's host.

    pynetdicom checks ``require_calling_aet`` during negotiation, inside the association's
    own thread, and rejects with "calling AE title not recognized" (0x01, 0x01, 0x03) — the
    answer the standard gives for an unknown caller. Returning the titles allowed for the
    current association's host gives ``AE@host`` entries that same, standard rejection.
    """

    caller_policy: CallerPolicy | None = None

    @property
    def require_calling_aet(self) -> list[str]:
        policy = self.caller_policy
        if policy is None or not policy.entries:
            return []
        assoc = threading.current_thread()
        host = assoc.requestor.address if isinstance(assoc, Association) else None
        return policy.allowed_titles(host) or [_NOBODY]

    @require_calling_aet.setter
    def require_calling_aet(self, ae_titles: list[str]) -> None:
        # Read-only, as before: the allow-list is derived from caller_policy, per association.
        raise AttributeError("require_calling_aet is derived from caller_policy: set caller_policy instead")


class StorageSCP:
    """C-ECHO + C-STORE service provider bound to a spool and an instance index.

    Parameters
    ----------
    ae_title
        Our AE title: the Called AE Title peers must use.
    on_release
        Called with (calling AE, host, study ids, released normally?) when an association
        ends, so the assembler can treat a ``complete_on_release`` sender's study as ready.
    """

    def __init__(
        self,
        *,
        ae_title: str,
        spool: Spool,
        sessions: sessionmaker[Session],
        index: InstanceIndex,
        allowed_callers: list[str] | None = None,
        on_release: Callable[[str, str, set[int], bool], None] | None = None,
        maximum_pdu_size: int = 0,
        acse_timeout_s: float = 30,
        dimse_timeout_s: float = 60,
        network_timeout_s: float = 60,
        limits: AssociationLimits | None = None,
        duplicates: DuplicatePolicy = "keep-first",
    ) -> None:
        self.limits = limits or AssociationLimits()
        self.network_timeout_s = network_timeout_s
        self.spool = spool
        self._file_meta = FileMetaEncoder()  # each file's File Meta Information, encoded a piece at a time
        self.duplicates = duplicates
        self.sessions = sessions
        self.index = index
        self.on_release = on_release
        self._states: dict[int, _AssocState] = {}
        self._lock = threading.Lock()
        #: C-STOREs refused since this process started, by reason (:data:`REJECTION_REASONS`).
        self.rejected: Counter[str] = Counter()

        # pynetdicom's validators are process-wide by its design (pynetdicom._config.VALIDATORS).
        _config.VALIDATORS["UI"] = _uid_reaches_the_handler
        ae = _NodeAE(ae_title=ae_title)
        ae.caller_policy = CallerPolicy(allowed_callers or [])
        ae.maximum_pdu_size = maximum_pdu_size
        # pynetdicom's ARTIM timer is its ACSE timeout: a connection that sends no A-ASSOCIATE-RQ is closed then.
        ae.acse_timeout = min(acse_timeout_s, self.limits.establish_timeout_s)
        ae.dimse_timeout = dimse_timeout_s
        ae.network_timeout = network_timeout_s
        ae.maximum_associations = self.limits.total
        # Peers must call us by our AE title: PACS administrators rely on that check.
        ae.require_called_aet = True
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            assert context.abstract_syntax is not None  # pynetdicom's storage contexts each name their SOP class
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.ae = ae
        #: The plain listener and/or the TLS listener (PS3.15 B.9), in the order started.
        self._servers: list[_ListeningServer] = []

    # -- lifecycle -------------------------------------------------------------------------
    def start(
        self, host: str, port: int, listener: socket.socket | None = None, *, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        """Accept associations on ``listener`` (made by :func:`listen`), or on ``host:port`` bound now.

        With ``ssl_context``, the listener speaks DICOM TLS; called once for each of the two, the
        plain and the TLS listener share the association limits.

        Raises
        ------
        ListenError
            ``host:port`` cannot be bound (only when no ``listener`` is given).
        """
        listener = listener if listener is not None else listen(host, port)
        handlers: list[evt.EventHandlerType] = [
            (evt.EVT_CONN_OPEN, self._on_connection_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, self._on_c_echo),
            # Normalized services sent on a storage context: "SOP class not supported", not a processing failure.
            (evt.EVT_N_ACTION, _not_supported_with_dataset),
            (evt.EVT_N_CREATE, _not_supported_with_dataset),
            (evt.EVT_N_EVENT_REPORT, _not_supported_with_dataset),
            (evt.EVT_N_GET, _not_supported_with_dataset),
            (evt.EVT_N_SET, _not_supported_with_dataset),
            (evt.EVT_N_DELETE, _not_supported),
            (evt.EVT_C_STORE, self._on_c_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_connection_closed),
        ]
        server = self.ae.make_server(
            (host, port),
            evt_handlers=handlers,
            server_class=_ListeningServer,
            ssl_context=ssl_context,
            listener=listener,
            limits=self.limits,
            shared_with=self._servers[0] if self._servers else None,
        )
        assert isinstance(server, _ListeningServer)
        # As AE.start_server(block=False) does: the AE knows its servers, and server.shutdown() expects that.
        self.ae._servers.append(server)
        bound = int(server.server_address[1])
        # A short poll: shutdown() waits for it, and a node stops (or reloads) without a pause.
        threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": ACCEPT_POLL_S},
            name=f"dicom-acceptor:{bound}",
            daemon=True,
        ).start()
        self._servers.append(server)
        tls = " (DICOM TLS)" if ssl_context is not None else ""
        log.info("listening as %s on %s:%d%s", self.ae.ae_title, host, bound, tls)

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
        self._servers = []

    def use_ssl_context(self, ssl_context: ssl.SSLContext) -> None:
        """Serve new TLS connections with ``ssl_context`` (new certificates); open ones keep theirs."""
        for server in self._servers:
            if server.ssl_context is not None:
                server.ssl_context = ssl_context

    def _port(self, tls: bool) -> int:
        found = [s for s in self._servers if (s.ssl_context is not None) == tls]
        if not found:
            raise RuntimeError(f"no {'TLS' if tls else 'plain'} listener started")
        return int(found[0].server_address[1])

    @property
    def port(self) -> int:
        """The plain listener's port."""
        return self._port(tls=False)

    @property
    def tls_port(self) -> int:
        return self._port(tls=True)

    # -- association bookkeeping -----------------------------------------------------------
    def _audit_start(
        self, assoc: Association, outcome: str, reason: str | None = None, called_ae: str | None = None
    ) -> int | None:
        row = AssociationRow(
            direction="in",
            calling_ae=(assoc.requestor.ae_title or "").strip(),
            called_ae=called_ae if called_ae is not None else (assoc.acceptor.ae_title or "").strip(),
            peer_host=assoc.requestor.address,
            peer_port=assoc.requestor.port,
            outcome=outcome,
            reason=reason,
        )
        try:
            with self.sessions() as session, session.begin():
                session.add(row)
                if outcome == "rejected":  # the audit trail's (an accepted one is audited when it ends)
                    session.flush()
                    actor = trail.caller(row.calling_ae, row.peer_host)
                    detail = trail.association_rejected(reason or "")
                    session.add(AuditEvent(kind=trail.ASSOCIATION, actor=actor, subject=str(row.id), detail=detail))
            return row.id
        except SQLAlchemyError:
            log.exception("could not record association from %s", assoc.requestor.address)
            return None

    def _on_connection_open(self, event: evt.Event) -> None:
        server = getattr(event.assoc, "_server", None)  # the listener that accepted it (pynetdicom sets it)
        if isinstance(server, _ListeningServer):
            server.association_thread_starting(event.address)  # type: ignore[attr-defined]
        _answer_incomplete_c_stores(event.assoc)

    def _on_connection_closed(self, event: evt.Event) -> None:
        # Released and aborted associations were closed in the books already; this is one whose connection
        # ended otherwise (pynetdicom's reactor stopped on a message it could not decode).
        self._finish(event, "aborted")

    def _on_requested(self, event: evt.Event) -> None:
        """Reject an A-ASSOCIATE-RQ that PS3.8 9.3.2 does not allow; pynetdicom would accept it.

        An association needs at least one presentation context, and their IDs are unique odd numbers.
        """
        assoc = event.assoc
        request = assoc.requestor.primitive
        ids = [cx.context_id for cx in (getattr(request, "presentation_context_definition_list", None) or [])]
        why = None
        if not ids:
            why = "no presentation context"
        elif len(set(ids)) != len(ids) or any(i is None or i % 2 == 0 for i in ids):
            why = "presentation context IDs not unique odd numbers"
        if why is None:
            return
        calling = (assoc.requestor.ae_title or "").strip()
        log.warning("association from %r at %s rejected: A-ASSOCIATE-RQ with %s", calling, assoc.requestor.address, why)
        # As pynetdicom's own rejections: rejected permanent, by the service user, no reason given (PS3.8 7.1.1.9).
        assoc.acse.send_reject(0x01, 0x01, 0x01)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    def _on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        # Established: from now on the idle and DIMSE timeouts apply, not the establishment (ARTIM) one.
        client = getattr(assoc.dul.socket, "socket", None)
        if client is not None:
            client.settimeout(self.network_timeout_s)
        row_id = self._audit_start(assoc, "accepted")
        with self._lock:
            self._states[id(assoc)] = _AssocState(
                row_id, (assoc.requestor.ae_title or "").strip(), assoc.requestor.address
            )

    def _on_rejected(self, event: evt.Event) -> None:
        # pynetdicom sends one diagnostic, and its called-AE check overwrites its calling-AE one: the
        # reasons are worked out again from the request, so that the operator reads every one that holds.
        assoc = event.assoc
        calling = (assoc.requestor.ae_title or "").strip()
        called = str(getattr(assoc.requestor.primitive, "called_ae_title", None) or "").strip()
        ours = str(self.ae.ae_title).strip()
        host = assoc.requestor.address
        caller = f"caller {calling!r} from {host}"
        reasons = []
        reply = assoc.acceptor.primitive
        source, diagnostic = (reply.result_source, reply.diagnostic) if reply is not None else (None, None)
        if (source, diagnostic) == (0x03, 0x02):
            limit = self.ae.maximum_associations
            reasons.append(f"local limit exceeded: max_associations {limit} in use, {caller}")
        if called != ours:
            reasons.append(f"called AE title {called!r} not recognised (this node is {ours!r}), {caller}")
        policy = self.ae.caller_policy
        if policy is not None and not policy.allows(calling, host):
            reasons.append(f"calling AE title {calling!r} from {host} not in allowed_callers")
        if not reasons:
            why = reply.reason_str if reply is not None else "No reason given"
            reasons.append(f"{why[:1].lower()}{why[1:]}, {caller}")
        reason = "; ".join(reasons)
        self._audit_start(assoc, "rejected", reason, called_ae=called[:16])
        log.warning("association rejected: %s", reason)

    def _finish(self, event: evt.Event, outcome: str) -> None:
        with self._lock:
            state = self._states.pop(id(event.assoc), None)
        if state is None:
            return
        study_uids: list[str] = []
        if state.study_ids:
            with self.sessions() as session:
                uids = session.query(Study.study_instance_uid).filter(Study.id.in_(state.study_ids)).all()
            study_uids = [u for (u,) in uids]
        if state.row_id is not None:
            try:
                with self.sessions() as session, session.begin():
                    row = session.get(AssociationRow, state.row_id)
                    if row is not None:
                        row.outcome, row.ended_at = outcome, utcnow()
                        row.stored, row.failed = state.stored, state.failed
                    # The audit trail: who sent what, one event per association (the instances it stored).
                    detail = trail.association_ended(outcome, state.stored, state.failed, study_uids)
                    session.add(AuditEvent(kind=trail.ASSOCIATION, actor=trail.caller(state.calling_ae, state.host),
                                           subject=str(state.row_id), detail=detail))  # fmt: skip
            except SQLAlchemyError:
                log.exception("could not close association record %s", state.row_id)
        studies = " studies " + ",".join(study_uids) if study_uids else ""
        log.info(
            "association %s from %s@%s %s: %d stored, %d failed%s",
            state.row_id,
            state.calling_ae,
            state.host,
            outcome,
            state.stored,
            state.failed,
            studies,
        )
        self.index.end_association(state.row_id)
        if self.on_release is not None:
            self.on_release(state.calling_ae, state.host, state.study_ids, outcome == "released")

    def _on_released(self, event: evt.Event) -> None:
        self._finish(event, "released")

    def _on_aborted(self, event: evt.Event) -> None:
        self._finish(event, "aborted")

    # -- services --------------------------------------------------------------------------
    def _on_c_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def rejected_counts(self) -> dict[str, int]:
        """The C-STOREs refused since this process started, by reason (a copy, taken under the lock)."""
        with self._lock:
            return dict(self.rejected)

    def _on_c_store(self, event: evt.Event) -> int | Dataset:
        with self._lock:
            state = self._states.get(id(event.assoc))
        status = self._store(event, state)
        refused = not (isinstance(status, int) and status == SUCCESS)
        if refused:
            code = int(status if isinstance(status, int) else status.Status)
            with self._lock:
                self.rejected[REJECTION_REASONS.get(code, f"0x{code:04X}")] += 1
        if state is not None:
            if refused:
                state.failed += 1
            else:
                state.stored += 1
        return status

    def _store(self, event: evt.Event, state: _AssocState | None) -> int | Dataset:
        request = cast(C_STORE, event.request)  # bound to EVT_C_STORE only
        # None only with pynetdicom's STORE_RECV_CHUNKED_DATASET, which the node does not enable.
        assert request.DataSet is not None
        encoded = request.DataSet.getbuffer()
        try:
            # Our own decoding, not pynetdicom's lenient event.dataset: encoded as negotiated, complete, bounded.
            dataset = decode(encoded, str(event.context.transfer_syntax))
        except EncodingProblem as exc:
            log.warning("C-STORE %s refused: %s", request.AffectedSOPInstanceUID, exc)
            return _failure(CANNOT_UNDERSTAND, str(exc))
        except Exception as exc:  # pydicom raises many types for broken encodings
            log.warning("C-STORE %s refused, dataset unreadable: %s", request.AffectedSOPInstanceUID, exc)
            return _failure(CANNOT_UNDERSTAND, f"dataset unreadable: {type(exc).__name__}")
        try:
            inst = ReceivedInstance.from_header(
                dataset,
                sop_class_uid=str(request.AffectedSOPClassUID),
                transfer_syntax_uid=str(event.context.transfer_syntax),
            )
        except AttributeError as exc:
            if not any(k in dataset for k in _IDENTIFYING):
                # Not a composite instance at all (bytes that happen to decode): "cannot understand", not "mismatch".
                log.warning("C-STORE %s refused: not a DICOM instance", request.AffectedSOPInstanceUID)
                return _failure(CANNOT_UNDERSTAND, "dataset unreadable: no SOP, study or series identification")
            log.warning("C-STORE %s refused: %s", request.AffectedSOPInstanceUID, exc)
            return _failure(DATASET_MISMATCH, f"missing attribute: {exc}")
        except Exception as exc:  # pydicom raises many types for broken encodings
            log.warning("C-STORE %s refused, dataset unreadable: %s", request.AffectedSOPInstanceUID, exc)
            return _failure(CANNOT_UNDERSTAND, f"dataset unreadable: {type(exc).__name__}")
        study_uid, series_uid, sop_uid = inst.study_instance_uid, inst.series_instance_uid, inst.sop_instance_uid
        if sop_uid != request.AffectedSOPInstanceUID:
            return _failure(DATASET_MISMATCH, "SOPInstanceUID differs from Affected SOP Instance UID")
        bad = [n for n, v in (("Study", study_uid), ("Series", series_uid), ("SOP", sop_uid)) if not valid_uid(v)]
        if bad:
            return _failure(DATASET_MISMATCH, f"invalid {'/'.join(bad)} Instance UID")
        own_class = str(dataset.get("SOPClassUID", "") or "")
        if own_class and own_class != inst.sop_class_uid:
            # A CT sent on an MR context would be recorded (and routed) as MR.
            log.warning("C-STORE %s refused: SOP Class mismatch", sop_uid)
            return _failure(
                DATASET_MISMATCH, f"SOP Class mismatch: the dataset is {own_class}, the request {inst.sop_class_uid}"
            )
        damaged = pixel_data_problem(dataset, inst.transfer_syntax_uid)
        if damaged is not None:
            log.warning("C-STORE %s refused: %s", sop_uid, damaged)
            return _failure(DATASET_MISMATCH, damaged)

        full = self.spool.below_watermark()
        if full is not None:
            log.error("C-STORE %s refused: %s", sop_uid, full)
            return _failure(OUT_OF_RESOURCES, full)
        relpath = Spool.instance_relpath(study_uid, series_uid, sop_uid)
        rewritten = False
        if not self.spool.exists(relpath):
            # Almost every instance is new, with no file at its path: it is not looked up first (half a
            # millisecond a C-STORE); the row's INSERT finds a UID kept already, and then it is judged below.
            try:
                # Written now and flushed to the disk while its row is written; put in place before the row's commit.
                staged = self.spool.stage_encoded(relpath, self._header(inst), encoded)
            except SpoolError as exc:
                log.error("C-STORE %s failed: spool: %s", sop_uid, exc)
                return _failure(OUT_OF_RESOURCES, f"spool: {exc.strerror or exc}")
            try:
                return self._record(
                    inst, relpath, staged.size, state, replaced=False, expect_new=True, before_commit=staged
                )
            except AlreadyIndexed as exc:
                if exc.relpath != relpath:
                    staged.discard()  # kept elsewhere (another study or series): no row points here
                else:
                    try:
                        staged.put_in_place()  # its file was missing: judged as such (another one is there now, ours)
                    except SpoolError as error:
                        log.error("C-STORE %s failed: spool: %s", sop_uid, error)
                        return _failure(OUT_OF_RESOURCES, f"spool: {error.strerror or error}")
                    rewritten = True
            except BaseException:
                staged.discard()  # not put in place (the database failed, or the file could not be): nothing kept
                raise
        try:
            stored = self.index.find(sop_uid)
        except SQLAlchemyError as exc:
            log.error("C-STORE %s failed: database: %s", sop_uid, type(exc).__name__)
            return _failure(OUT_OF_RESOURCES, "database unavailable")
        replaced = False
        if stored is not None:
            decision = judge(
                stored,
                self.spool.abspath(stored.relpath),
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
                patient_id=inst.patient_id,
                transfer_syntax_uid=inst.transfer_syntax_uid,
                encoded_dataset=encoded,
                policy=self.duplicates,
                stored_missing=rewritten,
            )
            self._audit_duplicate(state, sop_uid, decision)
            if decision.verdict is Verdict.MOVED:
                if rewritten:
                    self.spool.remove(relpath)  # written above where the stored file was missing: not kept
                log.warning("C-STORE %s refused: %s", sop_uid, decision.detail)
                return _failure(DATASET_MISMATCH, decision.detail)
            if decision.verdict is not Verdict.REPLACE:
                if decision.verdict is Verdict.KEEP_FIRST:
                    log.warning("C-STORE %s: changed duplicate, %s", sop_uid, decision.detail)
                return self._record(inst, stored.relpath, 0, state, replaced=False)
            replaced = True
            log.warning("C-STORE %s: changed duplicate, %s", sop_uid, decision.detail)
        try:
            size = self.spool.write_encoded(relpath, self._header(inst), encoded)
        except SpoolError as exc:
            log.error("C-STORE %s failed: spool: %s", sop_uid, exc)
            return _failure(OUT_OF_RESOURCES, f"spool: {exc.strerror or exc}")
        return self._record(inst, relpath, size, state, replaced=replaced)

    def _header(self, inst: ReceivedInstance) -> bytes:
        """The file's preamble and File Meta Information: the request's SOP Class and Instance, the context's syntax."""
        return self._file_meta.header(inst.sop_class_uid, inst.sop_instance_uid, inst.transfer_syntax_uid)

    def _record(
        self,
        inst: ReceivedInstance,
        relpath: str,
        size: int,
        state: _AssocState | None,
        *,
        replaced: bool,
        expect_new: bool = False,
        before_commit: StagedFile | None = None,
    ) -> int | Dataset:
        """Index the instance; ``expect_new``: raise :class:`AlreadyIndexed` if its UID has a row already.

        ``before_commit``: the instance's file, put in place (on the disk) before its row is committed.
        """
        try:
            outcome = self.index.record(
                inst,
                relpath=relpath,
                size_bytes=size,
                calling_ae=state.calling_ae if state else None,
                calling_host=state.host if state else None,
                association_id=state.row_id if state else None,
                replaced=replaced,
                expect_new=expect_new,
                before_commit=before_commit.put_in_place if before_commit is not None else None,
            )
        except SQLAlchemyError as exc:
            log.error("C-STORE %s failed: database: %s", inst.sop_instance_uid, type(exc).__name__)
            if before_commit is not None:
                before_commit.discard()
            return _failure(OUT_OF_RESOURCES, "database unavailable")
        except SpoolError as exc:  # the file could not be put in place: its row is rolled back
            log.error("C-STORE %s failed: spool: %s", inst.sop_instance_uid, exc)
            return _failure(OUT_OF_RESOURCES, f"spool: {exc.strerror or exc}")
        if state is not None:
            state.study_ids.add(outcome.study_id)
        return SUCCESS

    def _audit_duplicate(self, state: _AssocState | None, sop_uid: str, decision: DuplicateDecision) -> None:
        """Every duplicate goes to the audit: who sent it, and what differed (keywords only, never values)."""
        actor = f"{state.calling_ae}@{state.host}" if state else None
        try:
            with self.sessions() as session, session.begin():
                session.add(AuditEvent(kind="duplicate", actor=actor, subject=sop_uid,
                                       detail=f"{decision.verdict.value}: {decision.detail}"))  # fmt: skip
        except SQLAlchemyError as exc:  # the C-STORE's own commit reports a database that is down
            log.error("duplicate of %s not audited: database: %s", sop_uid, type(exc).__name__)
