"""The audit trail's way out: events of ``audit_events`` not yet forwarded go to the audit repository.

At least once, never blocking the node: the forwarder is a :class:`Loop` of its own, reads the
events not marked forwarded, sends their messages on one connection and marks them in one short
transaction after the repository took them (a crash in between sends them again). While the
repository cannot be reached, the events wait in the database and the forwarder tries again
after a delay that doubles up to ``audit.max_delay_s``; the outage is logged once when it starts
and once when it ends, not per event. Of several processes sharing a database, the one holding
the ``audit_forwarding`` lease forwards.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from db.models import AuditEvent, AuditForwarding, utcnow
from node.audit.events import NodeIdentity, messages_for
from node.audit.message import AuditSource
from node.audit.syslog import SyslogError, SyslogSender, octet_counted, syslog_message, tls_context
from node.config import Config, ConfigError
from node.loops import Loop

log = logging.getLogger("ainode.audit")

TARGET = "syslog"


@dataclass
class _Outage:
    since: datetime
    attempts: int = 1


class AuditForwarder:
    """Sends the audit events not yet forwarded, in id order, as DICOM audit messages over syslog.

    Parameters
    ----------
    sender
        Delivers a batch of syslog frames, or raises :class:`SyslogError`.
    node
        The node as its messages name it (AE title, audit source).
    owner
        This process (``host:pid``), the holder of the forwarding lease.
    initial_delay_s, max_delay_s
        While the repository cannot be reached: the first wait, doubled after each failed try up to the maximum.
    lease_s
        How long another process waits before it takes over from a forwarder that stopped.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        sender: SyslogSender,
        node: NodeIdentity,
        *,
        owner: str,
        hostname: str | None = None,
        batch_size: int = 200,
        initial_delay_s: float = 2.0,
        max_delay_s: float = 300.0,
        lease_s: float = 60.0,
    ) -> None:
        self.sessions = sessions
        self.sender = sender
        self.node = node
        self.owner = owner
        self.hostname = hostname or socket.gethostname()
        self.procid = str(os.getpid())
        self.batch_size = batch_size
        self.initial_delay_s = initial_delay_s
        self.max_delay_s = max_delay_s
        self.lease_s = lease_s
        self._outage: _Outage | None = None
        self._next_try: datetime | None = None
        #: Events whose messages could not be made (a bug, not an outage): skipped until a restart.
        self._unreadable: set[int] = set()
        self._renew_before = timedelta(seconds=lease_s / 2)

    @classmethod
    def from_config(cls, config: Config, sessions: sessionmaker[Session], owner: str) -> AuditForwarder:
        """The forwarder ``config.audit`` describes; ConfigError when its TLS files cannot be used."""
        audit, target = config.audit, config.audit.syslog
        if target is None:
            raise ValueError("audit.syslog is not configured")
        context = None
        if target.tls:
            try:
                context = tls_context(target.ca_file, target.cert_file, target.key_file)
            except ValueError as exc:
                raise ConfigError(f"config error in {config.source.path}: audit.syslog.{exc}") from None
        ae_title = config.node.ae_title
        source = AuditSource(audit.source_id or ae_title, audit.enterprise_site_id)
        return cls(
            sessions,
            SyslogSender(target.host, target.effective_port, context=context, timeout_s=target.timeout_s),
            NodeIdentity(ae_title, source),
            owner=owner,
            batch_size=audit.batch_size,
            initial_delay_s=audit.initial_delay_s,
            max_delay_s=audit.max_delay_s,
        )

    # -- one pass ------------------------------------------------------------------------------
    def run_once(self, now: datetime | None = None) -> bool:
        """Forward one batch if it is time to; True when a whole batch went (more may be waiting)."""
        now = now or utcnow()
        if self._next_try is not None and now < self._next_try:
            return False
        try:
            batch = self._take_batch(now)
        except IntegrityError:  # another process made the lease row at the same moment: it forwards
            return False
        if batch is None:
            return False
        ids, frames = batch
        if not ids:
            return False
        try:
            if frames:
                self.sender.send(frames)
        except SyslogError as exc:
            self._failed(str(exc), now)
            return False
        self._forwarded(ids, now, sent=bool(frames))
        return len(ids) == self.batch_size

    def _take_batch(self, now: datetime) -> tuple[list[int], list[bytes]] | None:
        """With the lease taken or kept: the next events not forwarded, and the frames of their messages.

        None while another live process holds the lease. An event may make no message (the node's
        own bookkeeping); one that cannot be read is logged once and left for an operator, unmarked.
        """
        with self.sessions() as session, session.begin():
            row = session.get(AuditForwarding, TARGET, with_for_update=True)
            if row is None:
                row = AuditForwarding(target=TARGET, forwarded=0)
                session.add(row)
            elif row.leased_by not in (None, self.owner) and row.leased_until and row.leased_until > now:
                return None
            if row.leased_by != self.owner or row.leased_until is None or row.leased_until < now + self._renew_before:
                row.leased_by, row.leased_until = self.owner, now + timedelta(seconds=self.lease_s)
            query = select(AuditEvent).where(AuditEvent.forwarded_at.is_(None))
            if self._unreadable:
                query = query.where(AuditEvent.id.not_in(self._unreadable))
            events = session.scalars(query.order_by(AuditEvent.id).limit(self.batch_size)).all()
            ids, frames = [], []
            for event in events:
                try:
                    messages = messages_for(session, event, self.node)
                except SQLAlchemyError:
                    raise  # the database, not the event: the loop tries again
                except Exception:
                    log.exception("audit event %d cannot be made an audit message; it is not forwarded", event.id)
                    self._unreadable.add(event.id)
                    continue
                ids.append(event.id)
                frames += [octet_counted(syslog_message(m, self.hostname, self.procid)) for m in messages]
            return ids, frames

    def _forwarded(self, ids: list[int], now: datetime, *, sent: bool) -> None:
        with self.sessions() as session, session.begin():
            session.execute(update(AuditEvent).where(AuditEvent.id.in_(ids)).values(forwarded_at=now))
            row = session.get(AuditForwarding, TARGET)
            if row is not None:
                row.forwarded = (row.forwarded or 0) + len(ids)
                row.last_forwarded_at = now
                if sent:  # the repository took them: the outage, if any, is over
                    row.failing_since = row.last_error = None
        if not sent:
            return
        self._next_try = None
        if self._outage is not None:
            down_s = (now - self._outage.since).total_seconds()
            log.info(
                "audit repository %s reachable again after %.0f s (%d tries); forwarding the events kept meanwhile",
                self.sender,
                down_s,
                self._outage.attempts,
            )
            self._outage = None

    def _failed(self, reason: str, now: datetime) -> None:
        if self._outage is None:
            self._outage = _Outage(now)
            delay_s = self.initial_delay_s
            # Once per outage: the events are safe in the database, a line per event would only bury the log.
            log.warning(
                "audit repository %s cannot be reached (%s); audit events are kept and sent when it is back",
                self.sender,
                reason,
            )
            with self.sessions() as session, session.begin():
                row = session.get(AuditForwarding, TARGET)
                if row is not None:
                    row.failing_since, row.last_error = now, reason[:2000]
        else:
            self._outage.attempts += 1
            delay_s = min(self.initial_delay_s * 2 ** (self._outage.attempts - 1), self.max_delay_s)
            log.debug("audit repository %s still cannot be reached (%s)", self.sender, reason)
        self._next_try = now + timedelta(seconds=delay_s)


def audit_loop(forwarder: AuditForwarder, poll_s: float = 1.0) -> Loop:
    """The forwarder in the background: a batch every ``poll_s``, at once again while a backlog drains."""
    return Loop("audit-forwarder", forwarder.run_once, poll_s, again_while_busy=True, log=log)
