"""The outbox with a DICOMweb peer: STOW-RS instead of C-STORE, same rows, same backoff (issue 13).

The STOW-RS call is played by the test (node/deliver/stow.py's mapping is tested in tests/test_stow.py);
the clock is injected, so the schedule runs in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

from db.models import AuditEvent, DeliveryState
from node.deliver.outbox import Backoff, Outbox
from node.deliver.scu import StoreOutcome
from node.deliver.stow import StowTarget
from node.work.destinations import make_resolver
from tests.support.node_parts import ACCEPT, Clock, FakeStore, NodeParts, build_node, ct_study, make_config

WEB_PEER = {"dicomweb": {"url": "http://pacs.example.org:8042/dicom-web"}, "outputs": ["sc"]}


class FakeStow:
    """The outbox's STOW-RS, played in the test: answers every file with ``outcome``; counts the calls."""

    def __init__(self, outcome: StoreOutcome) -> None:
        self.outcome = outcome
        self.calls: list[tuple[StowTarget, list[Path]]] = []

    def __call__(self, target: StowTarget, files: list) -> list[StoreOutcome]:
        self.calls.append((target, list(files)))
        return [self.outcome] * len(files)


def _node(tmp_path: Path) -> NodeParts:
    return build_node(tmp_path, Clock(), make_config(tmp_path, peers={"pacs": WEB_PEER}))


def _outbox(node: NodeParts, stow_fn: FakeStow, store_fn: FakeStore) -> Outbox:
    return Outbox(
        sessions=node.sessions,
        spool=node.spool,
        calling_ae="AINODE",
        backoff=Backoff(initial_delay_s=100, factor=2, max_delay_s=1000, give_up_after_s=10_000),
        owner="unit-host:1:outbox",
        resolve=make_resolver(node.config),
        store_fn=store_fn,
        stow_fn=stow_fn,
    )


def test_dicomweb_peer_gets_its_results_by_stow_and_the_row_shows_its_url_host_and_port(tmp_path: Path) -> None:
    node = _node(tmp_path)
    node.processed_study(ct_study())
    stow, store = FakeStow(ACCEPT), FakeStore(ACCEPT)

    assert _outbox(node, stow, store).run_pass(now=node.clock.now).delivered == 1

    assert store.calls == []
    ((target, files),) = stow.calls
    assert (target.name, target.url, len(files)) == ("pacs", "http://pacs.example.org:8042/dicom-web", 1)
    (delivery,) = node.deliveries()
    assert (delivery.state, delivery.attempts) == (DeliveryState.DELIVERED, 1)
    assert (delivery.ae_title, delivery.host, delivery.port) == ("DICOMWEB", "pacs.example.org", 8042)


def test_stow_refusal_for_good_fails_at_the_first_attempt_with_its_reason(tmp_path: Path) -> None:
    node = _node(tmp_path)
    node.processed_study(ct_study())
    refused = StoreOutcome(0xA900, "HTTP 409 Conflict: refused with FailureReason 0xA900", permanent=True)
    stow = FakeStow(refused)
    outbox = _outbox(node, stow, FakeStore(ACCEPT))

    summary = outbox.run_pass(now=node.clock.now)

    assert (summary.delivered, summary.retrying, summary.failed) == (0, 0, 1)
    (delivery,) = node.deliveries()
    assert (delivery.state, delivery.attempts, delivery.last_error) == (DeliveryState.FAILED, 1, refused.error)
    assert any(e.detail == f"refused: {refused.error}" for e in node.rows(AuditEvent) if e.kind == "delivery")
    # Failed for good: not tried again however long the outbox runs.
    assert outbox.run_pass(now=node.clock.advance(100_000)).failed == 0
    assert len(stow.calls) == 1


def test_stow_server_unavailable_is_retried_on_the_backoff_schedule(tmp_path: Path) -> None:
    node = _node(tmp_path)
    node.processed_study(ct_study())
    stow = FakeStow(StoreOutcome(None, "HTTP 503 Service Unavailable from http://pacs.example.org:8042/dicom-web"))
    outbox = _outbox(node, stow, FakeStore(ACCEPT))

    assert outbox.run_pass(now=node.clock.now).retrying == 1
    assert outbox.run_pass(now=node.clock.advance(50)).retrying == 0  # not due before its 100 s delay
    stow.outcome = ACCEPT
    assert outbox.run_pass(now=node.clock.advance(100)).delivered == 1

    (delivery,) = node.deliveries()
    assert (delivery.state, delivery.attempts, len(stow.calls)) == (DeliveryState.DELIVERED, 2, 2)
