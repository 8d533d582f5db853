"""Deliver result objects to their destinations, with exponential backoff.

Each delivery row is one result to one destination. A delivery the peer accepted is never
sent again; the others are retried with exponential backoff until the retry policy gives
up. Result UIDs were fixed when the results were made, so even a resend after a crash
(accepted by the peer, not yet marked here) cannot make a duplicate in the PACS.

Where a delivery goes is decided at each attempt, from the configuration in force then: the
row's destination ("sender" or a peer name) is resolved again, so results that arrived before
their peer was configured go out once it is (``ainode outbox retry`` with the fixed config).
The row's address is the one last tried, for display. A destination that names no configured
peer waits (no attempt, no giving up) and is looked at again every ``waiting_recheck_s``; a
peer that does not take a result's kind (its ``outputs``) fails that delivery with the reason,
since no later attempt can change that without a new configuration and an operator's retry.

A peer with ``dicomweb`` gets its results by STOW-RS (node/deliver/stow.py), any other by C-STORE,
with the same rows, backoff and fixed UIDs. An outcome marked ``permanent`` (a STOW-RS 401 or 409)
fails its delivery at the first attempt instead of retrying against a server that said no.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import AuditEvent, Delivery, DeliveryState, Job, Result, utcnow
from db.queue import lease_due_deliveries
from db.states import make_delivery_due, set_delivery_state
from node.deliver.scu import AssociationFailed, PeerAddress, StoreOutcome, store
from node.deliver.stow import StowTarget, stow
from node.loops import Loop
from node.reasons import one_line_reason
from node.receive.spool import Spool
from node.work.destinations import DestinationError, PeerResolver

log = logging.getLogger("ainode.outbox")

#: The states a leased delivery is in while this outbox tries it. Another state means another sender
#: ended it after this one's lease ran out (a send slower than ``lease_s``): its outcome stands.
_TRIED = (DeliveryState.PENDING, DeliveryState.WAITING)


@dataclass(frozen=True)
class Backoff:
    """Retry schedule: initial_delay_s × factor^(attempt-1), capped, until give_up_after_s.

    The give-up window counts the schedule's own delays since the first attempt, not the time
    since the row was made: a delivery that waited days for its peer to be configured still
    gets the whole window once it can be tried.
    """

    initial_delay_s: float = 10.0
    factor: float = 2.0
    max_delay_s: float = 3600.0
    give_up_after_s: float = 86400.0

    def delay_s(self, attempts: int) -> float:
        return min(self.max_delay_s, self.initial_delay_s * self.factor ** max(0, attempts - 1))

    def gives_up(self, attempts: int) -> bool:
        """True when ``attempts`` failed attempts have used the give-up window."""
        elapsed_s = 0.0
        for attempt in range(1, attempts):
            elapsed_s += self.delay_s(attempt)
            if elapsed_s >= self.give_up_after_s:
                return True
        return False


@dataclass
class OutboxPass:
    """What one pass over the due deliveries did with the rows it took."""

    delivered: int = 0
    #: Not accepted this time; the next attempt is scheduled.
    retrying: int = 0
    #: Failed for good: the retry policy gave up, or the peer does not take this kind of result.
    failed: int = 0
    #: No configured peer for the destination yet.
    waiting: int = 0


StoreFn = Callable[[str, PeerAddress, list], list[StoreOutcome]]
#: STOW-RS of result files to a DICOMweb destination (node/deliver/stow.py).
StowFn = Callable[[StowTarget, list], list[StoreOutcome]]


class Outbox:
    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        spool: Spool,
        calling_ae: str,
        backoff: Backoff,
        owner: str,
        resolve: PeerResolver | None = None,
        lease_s: float = 300.0,
        waiting_recheck_s: float = 60.0,
        store_fn: StoreFn = store,
        stow_fn: StowFn = stow,
    ) -> None:
        """``resolve`` maps a destination to its peer in the configuration in force; without it
        every delivery goes to the address stored on its row."""
        self.sessions = sessions
        self.spool = spool
        self.calling_ae = calling_ae
        self.backoff = backoff
        self.owner = owner
        self.resolve = resolve
        self.lease_s = lease_s
        self.waiting_recheck_s = waiting_recheck_s
        self.store_fn = store_fn
        self.stow_fn = stow_fn

    def run_once(self, now: datetime | None = None) -> int:
        """Send everything due; returns how many deliveries were accepted."""
        return self.run_pass(now).delivered

    def run_pass(self, now: datetime | None = None, only: list[int] | None = None) -> OutboxPass:
        """Take the due deliveries (of ``only``, when given) that no other sender holds, and try each."""
        now = now or utcnow()
        summary = OutboxPass()
        ids = lease_due_deliveries(self.sessions, self.owner, lease_s=self.lease_s, now=now, only=only)
        if not ids:
            return summary
        with self.sessions() as session:
            rows = session.execute(
                select(
                    Delivery.id,
                    Delivery.destination,
                    Delivery.ae_title,
                    Delivery.host,
                    Delivery.port,
                    Result.kind,
                    Result.path,
                    Result.sop_instance_uid,
                    Job.sender_ae,
                    Job.sender_host,
                )
                .join(Result, Result.id == Delivery.result_id)
                .join(Job, Job.id == Result.job_id)
                .where(Delivery.id.in_(ids))
                .order_by(Delivery.id)
            ).all()
        by_peer: dict[PeerAddress | StowTarget, list[tuple[int, str, str]]] = defaultdict(list)
        held: dict[int, tuple[DeliveryState, str]] = {}
        for row in rows:
            if self.resolve is None:
                by_peer[PeerAddress(row.ae_title, row.host, row.port)].append((row.id, row.path, row.sop_instance_uid))
                continue
            try:
                dest = self.resolve(row.destination, row.sender_ae, row.sender_host)
            except DestinationError as exc:
                held[row.id] = (DeliveryState.WAITING, f"waiting for a peer: {exc}")
                continue
            if row.kind not in dest.outputs:
                takes = ", ".join(sorted(dest.outputs)) or "nothing"
                held[row.id] = (
                    DeliveryState.FAILED,
                    f"peer {dest.name} takes {takes}, not {row.kind} results "
                    f"(add {row.kind} to peers.{dest.name}.outputs, then run ainode outbox retry)",
                )
                continue
            # The peer's kind decides the protocol: STOW-RS for a DICOMweb peer, C-STORE otherwise.
            target = (
                StowTarget.of(dest.name, dest.dicomweb)
                if dest.dicomweb is not None
                else PeerAddress(dest.ae_title, dest.host, dest.port)
            )
            by_peer[target].append((row.id, row.path, row.sop_instance_uid))
        if held:
            self._hold(held, now, summary)
        for peer, items in by_peer.items():
            self._send(peer, items, summary)
        return summary

    def _hold(self, held: dict[int, tuple[DeliveryState, str]], now: datetime, summary: OutboxPass) -> None:
        """Deliveries that cannot be tried with this configuration: no attempt is counted."""
        with self.sessions() as session, session.begin():
            for delivery_id, (state, why) in held.items():
                row = session.get(Delivery, delivery_id)
                if row is None or row.state not in _TRIED:
                    continue
                changed = (row.state, row.last_error) != (state, why)
                set_delivery_state(row, state, why, now)
                row.leased_until = row.leased_by = None
                if state == DeliveryState.WAITING:
                    summary.waiting += 1
                    row.next_attempt_at = now + timedelta(seconds=self.waiting_recheck_s)
                    if changed:  # once, not at every look
                        log.warning("delivery %d to %s: %s", row.id, row.destination, why)
                    continue
                summary.failed += 1
                log.error("delivery %d to %s failed: %s", row.id, row.destination, why)
                session.add(AuditEvent(kind="delivery", actor=row.destination, subject=str(row.id), detail=why))

    def _send(self, peer: PeerAddress | StowTarget, items: list[tuple[int, str, str]], summary: OutboxPass) -> None:
        try:
            paths = [self.spool.abspath(p) for _, p, _ in items]
            if isinstance(peer, StowTarget):
                outcomes = self.stow_fn(peer, paths)
            else:
                outcomes = self.store_fn(self.calling_ae, peer, paths)
        except Exception as exc:  # a peer down or a broken result file must not stop the outbox
            # AssociationFailed's own message states the cause (node/deliver/scu.py); others name their type.
            why = str(exc) if isinstance(exc, AssociationFailed) else one_line_reason(exc)
            outcomes = [StoreOutcome(None, why)] * len(items)
        now = utcnow()
        with self.sessions() as session, session.begin():
            for (delivery_id, _, sop_uid), outcome in zip(items, outcomes, strict=True):
                row = session.get(Delivery, delivery_id)
                if row is None or row.state not in _TRIED:
                    continue
                row.ae_title, row.host, row.port = peer.ae_title, peer.host, peer.port  # the address last tried
                row.attempts += 1
                row.last_status = outcome.status
                row.leased_until = None
                row.leased_by = None
                if outcome.accepted:
                    set_delivery_state(row, DeliveryState.DELIVERED, None, now)
                    summary.delivered += 1
                    log.info("delivery %d: %s accepted by %s (0x%04X)", row.id, sop_uid, peer, outcome.status or 0)
                    session.add(AuditEvent(kind="delivery", actor=str(peer), subject=sop_uid, detail="delivered"))
                    continue
                if outcome.permanent or self.backoff.gives_up(row.attempts):
                    # A refusal no retry changes (a STOW-RS 401 or 409) ends the delivery at once.
                    ended = "refused" if outcome.permanent else f"given up after {row.attempts} attempts"
                    set_delivery_state(row, DeliveryState.FAILED, outcome.error, now)
                    summary.failed += 1
                    log.error("delivery %d: %s to %s %s: %s", row.id, sop_uid, peer, ended, outcome.error)
                    detail = f"{'refused' if outcome.permanent else 'gave up'}: {outcome.error}"
                    session.add(AuditEvent(kind="delivery", actor=str(peer), subject=sop_uid, detail=detail))
                else:
                    set_delivery_state(row, DeliveryState.PENDING, outcome.error, now)
                    summary.retrying += 1
                    delay = self.backoff.delay_s(row.attempts)
                    row.next_attempt_at = now + timedelta(seconds=delay)
                    log.warning(
                        "delivery %d: %s to %s failed (attempt %d), retry in %.0f s: %s",
                        row.id,
                        sop_uid,
                        peer,
                        row.attempts,
                        delay,
                        outcome.error,
                    )

    def retry_now(self, delivery_ids: list[int] | None = None, actor: str = "operator") -> list[int]:
        """Operator action: make every delivery not yet delivered (or those of ``delivery_ids``) due now.

        Pending, waiting and failed deliveries start again with a fresh retry window; the ids made
        due are returned. They are leased to this outbox in the same transaction, so that its
        next :meth:`run_pass` tries them with this configuration rather than a running node's
        outbox with its own; a delivery another sender is trying right now keeps its lease.
        """
        now = utcnow()
        with self.sessions() as session, session.begin():
            stmt = select(Delivery).where(Delivery.state != DeliveryState.DELIVERED).order_by(Delivery.id)
            if delivery_ids:
                stmt = stmt.where(Delivery.id.in_(delivery_ids))
            rows = list(session.scalars(stmt.with_for_update()))
            for row in rows:
                make_delivery_due(row, now)
                if row.leased_until is None or row.leased_until < now:
                    row.leased_until = now + timedelta(seconds=self.lease_s)
                    row.leased_by = self.owner
            ids = [row.id for row in rows]
            if ids:
                detail = f"made due: {', '.join(map(str, ids))}"
                session.add(AuditEvent(kind="operator", actor=actor, subject="deliveries", detail=detail[:2000]))
        return ids


def outbox_loop(outbox: Outbox, poll_s: float = 1.0) -> Loop:
    """The outbox in the background: a pass over the due deliveries every ``poll_s``, sooner when woken."""
    return Loop("outbox", outbox.run_once, poll_s, log=log)
