"""The outbox with an injected clock and a store played by the test: retry schedule, give-up, waiting.

A result of the tests' thumbnail pipeline is made by the node's own worker; the outbox then tries it
with ``run_pass(now=...)`` at the times the test chooses, so a schedule of hours or days runs in
milliseconds.
"""

from __future__ import annotations

import pytest

from db.models import AuditEvent, DeliveryState
from node.deliver.outbox import Backoff
from node.deliver.scu import StoreOutcome
from tests.support.node_parts import ACCEPT, FakeStore, NodeParts, build_node, ct_route, ct_study, make_config

REFUSED = StoreOutcome(None, "association with PACS@127.0.0.1:104 refused: called AE title not recognised")


def test_backoff_delays_grow_by_the_factor_up_to_the_cap() -> None:
    backoff = Backoff(initial_delay_s=10, factor=3, max_delay_s=100, give_up_after_s=1000)

    assert [backoff.delay_s(n) for n in range(1, 6)] == [10, 30, 90, 100, 100]


def test_backoff_gives_up_once_the_delays_between_attempts_fill_the_window() -> None:
    backoff = Backoff(initial_delay_s=100, factor=2, max_delay_s=400, give_up_after_s=500)

    # Delays after attempts 1, 2, 3: 100 + 200 + 400 = 700 s >= 500 s, first reached after the 4th attempt.
    assert [backoff.gives_up(n) for n in range(1, 6)] == [False, False, False, True, True]


def test_delivery_is_retried_on_its_schedule_and_fails_with_the_reason_after_give_up_after_s(
    node: NodeParts,
) -> None:
    node.processed_study(ct_study())
    store = FakeStore(REFUSED)
    outbox = node.outbox(store, Backoff(initial_delay_s=100, factor=2, max_delay_s=400, give_up_after_s=500))

    first = outbox.run_pass(now=node.clock.now)
    assert (first.retrying, first.failed, len(store.calls)) == (1, 0, 1)
    # Not due again before its delay (100 s after the attempt).
    assert outbox.run_pass(now=node.clock.advance(50)).retrying == 0
    assert len(store.calls) == 1

    for attempt in (2, 3):
        summary = outbox.run_pass(now=node.clock.advance(1000))
        assert (summary.retrying, summary.failed, len(store.calls)) == (1, 0, attempt)
        (delivery,) = node.deliveries()
        assert (delivery.state, delivery.attempts) == (DeliveryState.PENDING, attempt)

    last = outbox.run_pass(now=node.clock.advance(1000))

    assert (last.retrying, last.failed, len(store.calls)) == (0, 1, 4)
    (delivery,) = node.deliveries()
    assert (delivery.state, delivery.attempts) == (DeliveryState.FAILED, 4)
    assert delivery.last_error == REFUSED.error
    (gave_up,) = [e for e in node.rows(AuditEvent) if e.kind == "delivery"]
    assert gave_up.detail == f"gave up: {REFUSED.error}"
    # Failed for good: a year later it is not tried again (only an operator's retry makes it due).
    assert outbox.run_pass(now=node.clock.advance(365 * 86400)).failed == 0
    assert len(store.calls) == 4


def test_a_delivery_the_peer_accepted_is_not_sent_again(node: NodeParts) -> None:
    node.processed_study(ct_study())
    store = FakeStore(ACCEPT)
    outbox = node.outbox(store)

    assert outbox.run_pass(now=node.clock.now).delivered == 1
    assert outbox.run_pass(now=node.clock.advance(30 * 86400)).delivered == 0

    assert len(store.calls) == 1
    (delivery,) = node.deliveries()
    assert (delivery.state, delivery.attempts) == (DeliveryState.DELIVERED, 1)


@pytest.mark.parametrize("days_later", [1, 30])
def test_a_delivery_waiting_for_its_peer_is_never_tried_nor_given_up(tmp_path, clock, days_later: int) -> None:
    # Results go back to the sender, which is not configured under peers: the delivery waits.
    node = build_node(tmp_path, clock, make_config(tmp_path, peers={}, routes=[ct_route(destinations=["sender"])]))
    node.processed_study(ct_study())
    store = FakeStore(ACCEPT)
    outbox = node.outbox(store, Backoff(initial_delay_s=1, factor=2, max_delay_s=2, give_up_after_s=5))

    for _ in range(3):
        outbox.run_pass(now=node.clock.advance(days_later * 86400))

    assert store.calls == []
    (delivery,) = node.deliveries()
    assert (delivery.state, delivery.attempts) == (DeliveryState.WAITING, 0)
    assert delivery.last_error.startswith("waiting for a peer: the sender CT1@127.0.0.1 has no entry under peers")


def test_deliveries_leased_by_a_sender_that_died_are_sent_again_at_once_and_audited(node: NodeParts) -> None:
    import socket
    import subprocess
    import sys

    from db.queue import lease_due_deliveries, reclaim_dead_deliveries

    node.processed_study(ct_study())
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_owner = f"{socket.gethostname()}:{int(gone.stdout)}:outbox"
    # The dead sender had leased the delivery for 300 s and was killed during its attempt.
    assert lease_due_deliveries(node.sessions, dead_owner, lease_s=300, now=node.clock.now)
    store = FakeStore(ACCEPT)
    assert node.outbox(store).run_pass(now=node.clock.now).delivered == 0, "still held by the dead sender"

    released = reclaim_dead_deliveries(node.sessions, now=node.clock.now)

    assert len(released) == 1
    assert node.outbox(store).run_pass(now=node.clock.now).delivered == 1
    (event,) = [e for e in node.rows(AuditEvent) if e.kind == "redelivery"]
    assert event.actor == dead_owner and "same SOP Instance UID" in event.detail


def test_a_live_senders_lease_is_left_alone(node: NodeParts) -> None:
    from db.queue import lease_due_deliveries, process_identity, reclaim_dead_deliveries

    node.processed_study(ct_study())
    assert lease_due_deliveries(node.sessions, process_identity("outbox"), lease_s=300, now=node.clock.now)

    assert reclaim_dead_deliveries(node.sessions, now=node.clock.now) == []
