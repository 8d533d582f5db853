"""The node's parts built directly in the test process, on a temp SQLite database, with an injected clock.

For the unit lane (tests/unit): no peers, no subprocesses, no sockets. The parts are the node's own
classes (InstanceIndex, StudyAssembler, Worker, Outbox) wired as ``NodeApp`` wires them, without its
threads; a test calls each step itself, with time coming in as ``now=`` (STYLE.md) from a
:class:`Clock` that moves only when the test says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pydicom import Dataset
from sqlalchemy import event, select
from sqlalchemy.orm import Session, sessionmaker

from db.engine import make_engine, make_session_factory
from db.migrate import upgrade
from db.models import Delivery, Instance, Job, Result, Study, utcnow
from node.assemble.assembler import StudyAssembler
from node.assemble.router import Router
from node.config import Config
from node.deliver.outbox import Backoff, Outbox, StoreFn
from node.deliver.scu import PeerAddress, StoreOutcome
from node.identity import MANUFACTURER, device_uid
from node.receive.ingest import IndexOutcome, InstanceIndex, ReceivedInstance
from node.receive.spool import Spool
from node.work.destinations import make_resolver
from node.work.worker import Worker
from pipelines.study import StudyRunner
from tests.support.runners import ThumbnailRunner
from tests.support.series import ct_series

#: The modality that sends the test studies, and the PACS their results go to (no socket is opened).
SENDER_AE = "CT1"
PACS = {"ae_title": "PACS", "host": "127.0.0.1", "port": 104, "outputs": ["sc"]}
STABLE_AFTER_S = 5.0


@dataclass
class Clock:
    """An injected clock; it moves only by :meth:`advance`.

    It starts at the real time, not at a fixed date: a few steps still read the real clock themselves
    (``Outbox`` stamps ``next_attempt_at`` and ``delivered_at`` with it, a worker's claim and finish
    too, retention its cutoff), and an injected time at or after the real one keeps both in order.
    """

    now: datetime = field(default_factory=utcnow)

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


def ct_route(**overrides: Any) -> dict[str, Any]:
    """The route of the test studies: CT, quiet for ``STABLE_AFTER_S``, to the thumbnail pipeline, results to pacs."""
    route = {"name": "ct", "match": {"Modality": "CT"}, "pipeline": "thumbnail", "destinations": ["pacs"]}
    return {**route, "stable_after_s": STABLE_AFTER_S, **overrides}


def make_config(tmp_path: Path, *, node: dict[str, Any] | None = None, **sections: Any) -> Config:
    """A validated config: spool and database in ``tmp_path``; CT studies go to the tests' thumbnail pipeline.

    ``node`` updates the node section; other keyword arguments replace a section (``peers``, ``routes``, ...).
    """
    data: dict[str, Any] = {
        "node": {"spool_dir": str(tmp_path / "spool"), "database_url": f"sqlite:///{tmp_path}/node.db", **(node or {})},
        "peers": {"pacs": PACS},
        "routes": [ct_route()],
        **sections,
    }
    return Config.model_validate(data)


def ct_study(n: int = 3, study_uid: str = "1.2.826.0.1.3680043.8.498.7001") -> list[Dataset]:
    """``n`` tiny CT slices (32 x 32) of one series of study ``study_uid``."""
    return ct_series(n, study_uid=study_uid)


class FakeStore:
    """The outbox's C-STORE, played in the test: answers every file with ``outcome``; counts the calls."""

    def __init__(self, outcome: StoreOutcome) -> None:
        self.outcome = outcome
        self.calls: list[tuple[PeerAddress, list[Path]]] = []

    def __call__(self, calling_ae: str, peer: PeerAddress, files: list) -> list[StoreOutcome]:
        self.calls.append((peer, list(files)))
        return [self.outcome] * len(files)


ACCEPT = StoreOutcome(0x0000)


@dataclass
class NodeParts:
    config: Config
    sessions: sessionmaker[Session]
    spool: Spool
    index: InstanceIndex
    assembler: StudyAssembler
    clock: Clock

    # -- the steps, each called by the test --------------------------------------------------
    def receive(
        self, datasets: Sequence[Dataset], *, calling_ae: str = SENDER_AE, calling_host: str = "127.0.0.1"
    ) -> list[IndexOutcome]:
        """What the C-STORE handler does for each instance, without the network: spool the file, index it."""
        outcomes = []
        for ds in datasets:
            inst = ReceivedInstance.from_header(ds)
            relpath = Spool.instance_relpath(inst.study_instance_uid, inst.series_instance_uid, inst.sop_instance_uid)
            size = self.spool.write_dataset(relpath, ds)
            outcomes.append(
                self.index.record(
                    inst,
                    relpath=relpath,
                    size_bytes=size,
                    calling_ae=calling_ae,
                    calling_host=calling_host,
                    association_id=None,
                    now=self.clock.now,
                )
            )
        return outcomes

    def worker(self, worker_id: str = "unit-host:1:w0", runner: StudyRunner | None = None) -> Worker:
        return Worker(
            sessions=self.sessions,
            spool=self.spool,
            runner=runner or ThumbnailRunner(),
            resolve=make_resolver(self.config),
            worker_id=worker_id,
        )

    def outbox(self, store_fn: StoreFn | Callable[..., list[StoreOutcome]], backoff: Backoff | None = None) -> Outbox:
        d = self.config.delivery
        return Outbox(
            sessions=self.sessions,
            spool=self.spool,
            calling_ae=self.config.node.ae_title,
            backoff=backoff or Backoff(d.initial_delay_s, d.factor, d.max_delay_s, d.give_up_after_s),
            owner="unit-host:1:outbox",
            resolve=make_resolver(self.config),
            store_fn=store_fn,
        )

    def processed_study(self, datasets: Sequence[Dataset]) -> None:
        """Receive ``datasets``, let them go quiet, run the job: the study is processed, its result pending."""
        self.receive(datasets)
        assert self.assembler.tick(now=self.clock.advance(STABLE_AFTER_S + 1)), "the study made no job"
        assert self.worker().run_once(), "no job to run"

    # -- what the database says --------------------------------------------------------------
    def rows(self, model: type) -> list[Any]:
        with self.sessions() as session:
            return list(session.scalars(select(model).order_by(model.id)))

    def study(self, study_uid: str) -> Study:
        with self.sessions() as session:
            return session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()

    def jobs(self) -> list[Job]:
        return self.rows(Job)

    def results(self) -> list[Result]:
        return self.rows(Result)

    def deliveries(self) -> list[Delivery]:
        return self.rows(Delivery)

    def instances(self) -> list[Instance]:
        return self.rows(Instance)


def run_retention(config: Config) -> None:
    """One pass of the node's retention housekeeping, as its loop runs it (it reads the clock itself).

    SQLite waits up to 30 s for a lock; here 0.5 s: nothing else uses the database, so a lock that
    retention waits for is its own, and the unit lane stays fast when it fails.
    """
    from node.app import NodeApp

    app = NodeApp(config)
    event.listen(app.engine, "connect", lambda dbapi, _record: dbapi.execute("PRAGMA busy_timeout=500"))
    app.engine.dispose()  # connections made from now on get the listener
    try:
        app.retention.run()
    finally:
        app.engine.dispose()


def build_node(tmp_path: Path, clock: Clock | None = None, config: Config | None = None) -> NodeParts:
    """The parts of one node on a fresh, migrated SQLite database in ``tmp_path``."""
    config = config or make_config(tmp_path)
    engine = make_engine(config.node.database_url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    spool = Spool(Path(config.node.spool_dir))
    router = Router(config.routes, own_device_uid=device_uid(config), own_manufacturer=MANUFACTURER)
    return NodeParts(
        config=config,
        sessions=sessions,
        spool=spool,
        index=InstanceIndex(sessions, config.node.late_instances),
        assembler=StudyAssembler(sessions, spool, router, config.routes),
        clock=clock or Clock(),
    )
