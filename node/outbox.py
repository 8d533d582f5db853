"""Deliver result objects to their destinations, with exponential backoff.

Each delivery row is one result to one destination. A delivery the peer accepted is never
sent again; the others are retried with exponential backoff until the retry policy gives
up. Result UIDs were fixed when the results were made, so even a resend after a crash
(accepted by the peer, not yet marked here) cannot make a duplicate in the PACS.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import AuditEvent, Delivery, DeliveryState, Result, utcnow
from db.queue import lease_due_deliveries
from node.scu import AssociationFailed, PeerAddress, StoreOutcome, store
from node.spool import Spool

log = logging.getLogger("ainode.outbox")


@dataclass(frozen=True)
class Backoff:
    """Retry schedule: initial_delay_s × factor^(attempt-1), capped, until give_up_after_s."""

    initial_delay_s: float = 10.0
    factor: float = 2.0
    max_delay_s: float = 3600.0
    give_up_after_s: float = 86400.0

    def delay_s(self, attempts: int) -> float:
        return min(self.max_delay_s, self.initial_delay_s * self.factor ** max(0, attempts - 1))


StoreFn = Callable[[str, PeerAddress, list], list[StoreOutcome]]


class Outbox:
    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        spool: Spool,
        calling_ae: str,
        backoff: Backoff,
        owner: str,
        lease_s: float = 300.0,
        store_fn: StoreFn = store,
    ) -> None:
        self.sessions = sessions
        self.spool = spool
        self.calling_ae = calling_ae
        self.backoff = backoff
        self.owner = owner
        self.lease_s = lease_s
        self.store_fn = store_fn

    def run_once(self, now: datetime | None = None) -> int:
        """Send everything due; returns how many deliveries were accepted."""
        ids = lease_due_deliveries(self.sessions, self.owner, lease_s=self.lease_s, now=now)
        if not ids:
            return 0
        with self.sessions() as session:
            rows = session.execute(
                select(
                    Delivery.id, Delivery.ae_title, Delivery.host, Delivery.port, Result.path, Result.sop_instance_uid
                )
                .join(Result, Result.id == Delivery.result_id)
                .where(Delivery.id.in_(ids))
                .order_by(Delivery.id)
            ).all()
        by_peer: dict[PeerAddress, list[tuple[int, str, str]]] = defaultdict(list)
        for delivery_id, ae, host, port, path, sop_uid in rows:
            by_peer[PeerAddress(ae, host, port)].append((delivery_id, path, sop_uid))
        accepted = 0
        for peer, items in by_peer.items():
            accepted += self._send(peer, items)
        return accepted

    def _send(self, peer: PeerAddress, items: list[tuple[int, str, str]]) -> int:
        try:
            outcomes = self.store_fn(self.calling_ae, peer, [self.spool.abspath(p) for _, p, _ in items])
        except (AssociationFailed, OSError) as exc:
            outcomes = [StoreOutcome(None, f"{type(exc).__name__}: {exc}")] * len(items)
        except Exception as exc:  # a broken result file must not stop the outbox
            outcomes = [StoreOutcome(None, f"{type(exc).__name__}: {exc}")] * len(items)
        now = utcnow()
        accepted = 0
        with self.sessions() as session, session.begin():
            for (delivery_id, _, sop_uid), outcome in zip(items, outcomes, strict=True):
                row = session.get(Delivery, delivery_id)
                if row is None:
                    continue
                row.attempts += 1
                row.last_status = outcome.status
                row.leased_until = None
                row.leased_by = None
                if outcome.accepted:
                    row.state = DeliveryState.DELIVERED
                    row.delivered_at = now
                    row.last_error = None
                    accepted += 1
                    log.info("delivery %d: %s accepted by %s (0x%04X)", row.id, sop_uid, peer, outcome.status or 0)
                    session.add(AuditEvent(kind="delivery", actor=str(peer), subject=sop_uid, detail="delivered"))
                    continue
                row.last_error = outcome.error
                if (now - row.created_at).total_seconds() >= self.backoff.give_up_after_s:
                    row.state = DeliveryState.FAILED
                    log.error(
                        "delivery %d: %s to %s given up after %d attempts: %s",
                        row.id,
                        sop_uid,
                        peer,
                        row.attempts,
                        outcome.error,
                    )
                    session.add(
                        AuditEvent(
                            kind="delivery", actor=str(peer), subject=sop_uid, detail=f"gave up: {outcome.error}"
                        )
                    )
                else:
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
        return accepted

    def retry_now(self, delivery_ids: list[int] | None = None) -> int:
        """Operator action: make pending (and given-up) deliveries due immediately."""
        now = utcnow()
        with self.sessions() as session, session.begin():
            stmt = select(Delivery).where(Delivery.state != DeliveryState.DELIVERED)
            if delivery_ids:
                stmt = stmt.where(Delivery.id.in_(delivery_ids))
            rows = list(session.scalars(stmt))
            for row in rows:
                row.state = DeliveryState.PENDING
                row.next_attempt_at = now
                row.leased_until = None
        return len(rows)


class OutboxThread:
    def __init__(self, outbox: Outbox, poll_s: float = 1.0) -> None:
        self.outbox = outbox
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="outbox", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float = 30) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.outbox.run_once()
            except Exception:
                log.exception("outbox: unexpected error; continuing")
            self._wake.wait(self.poll_s)
            self._wake.clear()
