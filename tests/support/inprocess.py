"""The receiving half of the node in the test process: spool + database + SCP."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.engine import make_engine, make_session_factory
from db.migrate import upgrade
from db.models import Association, Instance
from node.receive.ingest import InstanceIndex
from node.receive.scp import StorageSCP
from node.receive.spool import Spool
from tests.support.peers import free_port
from tests.support.waiting import wait_for


@dataclass
class Receiver:
    scp: StorageSCP
    spool: Spool
    sessions: sessionmaker[Session]
    port: int

    def instances(self) -> dict[str, Instance]:
        with self.sessions() as session:
            return {i.sop_instance_uid: i for i in session.scalars(select(Instance))}

    def associations(self) -> list[Association]:
        with self.sessions() as session:
            return list(session.scalars(select(Association).order_by(Association.id)))

    def ended_associations(self, count: int, timeout_s: float = 10) -> list[Association]:
        """The associations, once ``count`` have ended (their row is written after the peer has the answer)."""

        def ended() -> list[Association] | None:
            rows = self.associations()
            return rows if len(rows) >= count and all(a.outcome != "accepted" for a in rows) else None

        return wait_for(ended, timeout_s, f"{count} associations recorded as ended")

    def stop(self) -> None:
        self.scp.stop()


def start_receiver(
    tmp: Path,
    *,
    database_url: str | None = None,
    allowed_callers: list[str] | None = None,
    spool: Spool | None = None,
    late_instances: str = "new-version",
    duplicates: str = "keep-first",
) -> Receiver:
    engine = make_engine(database_url or f"sqlite:///{tmp}/node.db")
    upgrade(engine)
    sessions = make_session_factory(engine)
    spool = spool or Spool(tmp / "spool")
    scp = StorageSCP(
        ae_title="AINODE",
        spool=spool,
        sessions=sessions,
        index=InstanceIndex(sessions, late_instances),  # type: ignore[arg-type]
        allowed_callers=allowed_callers,
        duplicates=duplicates,  # type: ignore[arg-type]
    )
    port = free_port()
    scp.start("127.0.0.1", port)
    return Receiver(scp, spool, sessions, port)
