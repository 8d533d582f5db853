"""Index a received instance: the database half of "durably kept".

Called by the C-STORE handler after the spool has fsynced the file. One short
transaction per instance, in Core SQL (this is the hot path): upsert study and series,
insert the instance, and decide what a late instance means for a processed study.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, cast

from pydicom import Dataset
from sqlalchemy import Connection, CursorResult, Engine, Row, bindparam, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from db.engine import is_postgres
from db.models import Instance, Series, Study, StudyState, UtcDateTime, utcnow
from db.states import study_values
from node.receive.duplicates import StoredInstance
from node.receive.spool import Spool

log = logging.getLogger("ainode.ingest")

LatePolicy = Literal["new-version", "ignore"]


@dataclass(frozen=True)
class ReceivedInstance:
    """What the index needs of one received instance; read from its header, never its pixels."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None
    patient_id: str | None
    accession_number: str | None

    @classmethod
    def from_header(
        cls, ds: Dataset, *, sop_class_uid: str | None = None, transfer_syntax_uid: str | None = None
    ) -> ReceivedInstance:
        """Read from ``ds``'s header; a missing UID raises ``AttributeError`` naming it.

        ``sop_class_uid`` and ``transfer_syntax_uid``: as negotiated (a C-STORE request's Affected
        SOP Class and the presentation context's transfer syntax); by default the file's own.
        """
        study_uid, series_uid, sop_uid = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        modality, patient_id, accession = ds.get("Modality"), ds.get("PatientID"), ds.get("AccessionNumber")
        if sop_class_uid is None:
            sop_class_uid = str(ds.SOPClassUID)
        if transfer_syntax_uid is None:
            transfer_syntax_uid = str(ds.file_meta.TransferSyntaxUID)
        return cls(
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            sop_class_uid=sop_class_uid,
            transfer_syntax_uid=transfer_syntax_uid,
            modality=str(modality) if modality else None,
            patient_id=str(patient_id) if patient_id else None,
            accession_number=str(accession) if accession else None,
        )


class AlreadyIndexed(Exception):
    """The SOP Instance UID has a row already, kept at ``relpath`` (raised when the caller expected a new one)."""

    def __init__(self, relpath: str) -> None:
        super().__init__(f"already indexed at {relpath}")
        self.relpath = relpath


@dataclass(frozen=True)
class IndexOutcome:
    study_id: int
    study_version: int
    duplicate: bool
    #: True when this instance re-opened a processed study as a new version.
    new_version: bool
    #: True when the instance arrived after processing and the policy is "ignore".
    ignored_late: bool


# The hot path's statements, built once: constructing SQLAlchemy statements per C-STORE cost
# more than executing them. ON CONFLICT ... DO NOTHING is spelled the same in SQLite and PostgreSQL.
_SELECT_STUDY = text("SELECT id, state, version FROM studies WHERE study_instance_uid = :uid")
_SELECT_STUDY_FOR_UPDATE = text("SELECT id, state, version FROM studies WHERE study_instance_uid = :uid FOR UPDATE")
_INSERT_INSTANCE = text(
    "INSERT INTO instances (series_id, sop_instance_uid, sop_class_uid, transfer_syntax_uid, path, size_bytes,"
    " study_version, received_at, association_id) VALUES (:series_id, :sop_instance_uid, :sop_class_uid,"
    " :transfer_syntax_uid, :path, :size_bytes, :study_version, :received_at, :association_id)"
    " ON CONFLICT (sop_instance_uid) DO NOTHING"
).bindparams(bindparam("received_at", type_=UtcDateTime()))
_BUMP_STUDY = text(
    "UPDATE studies SET last_received_at = :now, instance_count = instance_count + :added WHERE id = :id"
).bindparams(bindparam("now", type_=UtcDateTime()))
_INSTANCE_PATH = text("SELECT path FROM instances WHERE sop_instance_uid = :uid")
_FIND_INSTANCE = text(
    "SELECT i.path, i.transfer_syntax_uid, s.series_instance_uid, st.study_instance_uid, st.patient_id"
    " FROM instances i JOIN series s ON s.id = i.series_id JOIN studies st ON st.id = s.study_id"
    " WHERE i.sop_instance_uid = :uid"
)


#: How the duplicate line names a study's state (StudyState values other than "receiving").
_ALREADY = {
    StudyState.PROCESSED.value: "was already processed",
    StudyState.QUEUED.value: "is already queued for processing",
    StudyState.UNROUTED.value: "was already complete (not routed)",
}


def _dialect_insert(connection: Connection):  # type: ignore[no-untyped-def]
    return postgresql.insert if is_postgres(connection) else sqlite.insert


class InstanceIndex:
    """Writes instance rows; one instance per transaction, committed before returning.

    The common case — another instance of a study that is still receiving — costs three
    statements: read the study's state, insert the instance (a duplicate SOP Instance UID is
    a no-op insert), bump the study's clock. Series ids are cached: they never change.
    """

    def __init__(self, sessions: sessionmaker[Session], late_instances: LatePolicy = "new-version") -> None:
        self.sessions = sessions
        bind = sessions.kw.get("bind")
        if not isinstance(bind, Engine):
            raise TypeError("InstanceIndex needs a session factory bound to an engine (db.engine.make_session_factory)")
        self._engine: Engine = bind
        self.late_instances = late_instances
        self._series_ids: dict[str, int] = {}
        #: Re-sent instances of studies no longer receiving: association id -> study UID -> (state, count).
        #: Counted on the hot path (a dict update), told once per study when the association ends.
        self._duplicates: dict[int | None, dict[str, tuple[str, int]]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def _transaction(self, before_commit: Callable[[], object] | None) -> Iterator[Connection]:
        """One transaction, committed when its block ends (``before_commit`` called first), rolled back if it raises.

        A Connection, not an ORM Session: the statements are SQL already, and the connection's bookkeeping
        was a third of the row's cost on the C-STORE's path.
        """
        try:
            with self._engine.begin() as connection:
                yield connection
                if before_commit is not None:
                    before_commit()
        except BaseException:
            # A series row made in a transaction rolled back is gone with it: its cached id must not be used again.
            with self._lock:
                self._series_ids.clear()
            raise

    def _study_row(
        self,
        connection: Connection,
        inst: ReceivedInstance,
        calling_ae: str | None,
        calling_host: str | None,
        now: datetime,
    ) -> Row:
        # Lock the study row (PostgreSQL) so that concurrent associations of the same study
        # serialise their version decisions; SQLite's BEGIN IMMEDIATE already does.
        query = _SELECT_STUDY_FOR_UPDATE if is_postgres(connection) else _SELECT_STUDY
        row = connection.execute(query, {"uid": inst.study_instance_uid}).first()
        if row is None:
            insert = _dialect_insert(connection)
            connection.execute(
                insert(Study)
                .values(
                    study_instance_uid=inst.study_instance_uid,
                    patient_id=inst.patient_id,
                    accession_number=inst.accession_number,
                    version=1,
                    sender_ae=calling_ae,
                    sender_host=calling_host,
                    first_received_at=now,
                    last_received_at=now,
                    instance_count=0,
                    **study_values(inst.study_instance_uid, None, StudyState.RECEIVING),
                )
                .on_conflict_do_nothing(index_elements=["study_instance_uid"])
            )
            row = connection.execute(query, {"uid": inst.study_instance_uid}).one()
        return row

    def _series_id(self, connection: Connection, inst: ReceivedInstance, study_id: int) -> int:
        with self._lock:
            cached = self._series_ids.get(inst.series_instance_uid)
        if cached is not None:
            return cached
        query = select(Series.id).where(Series.series_instance_uid == inst.series_instance_uid)
        series_id = connection.execute(query).scalar_one_or_none()
        if series_id is None:
            insert = _dialect_insert(connection)
            connection.execute(
                insert(Series)
                .values(study_id=study_id, series_instance_uid=inst.series_instance_uid, modality=inst.modality)
                .on_conflict_do_nothing(index_elements=["series_instance_uid"])
            )
            series_id = connection.execute(query).scalar_one()
        with self._lock:
            self._series_ids[inst.series_instance_uid] = series_id
        return series_id

    def _count_duplicate(self, association_id: int | None, study_uid: str, state: str) -> None:
        with self._lock:
            studies = self._duplicates.setdefault(association_id, {})
            studies[study_uid] = (state, studies.get(study_uid, (state, 0))[1] + 1)

    def end_association(self, association_id: int | None) -> None:
        """Tell, once per study, that an association re-sent instances of a study already complete.

        A PACS that re-sends a whole study sends hundreds of duplicates; one line per study says
        why nothing happens, where one line per instance would drown the log.
        """
        with self._lock:
            studies = self._duplicates.pop(association_id, {})
        for study_uid, (state, count) in studies.items():
            was = _ALREADY.get(state, f"was already {state}")
            plural = "s" if count != 1 else ""
            log.info("study %s %s; %d duplicate instance%s ignored", study_uid, was, count, plural)

    def find(self, sop_instance_uid: str) -> StoredInstance | None:
        """The instance already kept under ``sop_instance_uid``, with its study, series and patient; or None."""
        with self.sessions() as session:
            row = session.execute(_FIND_INSTANCE, {"uid": sop_instance_uid}).first()
        if row is None:
            return None
        return StoredInstance(
            relpath=row.path,
            study_instance_uid=row.study_instance_uid,
            series_instance_uid=row.series_instance_uid,
            patient_id=row.patient_id,
            transfer_syntax_uid=row.transfer_syntax_uid,
        )

    def record(
        self,
        inst: ReceivedInstance,
        *,
        relpath: str,
        size_bytes: int,
        calling_ae: str | None,
        calling_host: str | None,
        association_id: int | None,
        now: datetime | None = None,
        replaced: bool = False,
        expect_new: bool = False,
        before_commit: Callable[[], object] | None = None,
    ) -> IndexOutcome:
        """Index ``inst``, kept in the spool at ``relpath`` (``size_bytes`` long), in one committed transaction.

        ``replaced``: the file of an instance already indexed was replaced by changed content
        (``duplicates: replace``): the study treats it as new content, without counting another instance.
        ``expect_new``: the caller did not look the UID up (no file at ``relpath``): a row already there raises
        :class:`AlreadyIndexed`, and nothing of this transaction is kept.
        ``before_commit``: called when the rows are written, before they are committed (the file put in place: a
        committed row never points to a file that is not on the disk); what it raises rolls the rows back.
        """
        now = now or utcnow()
        new_version = ignored = False
        with self._transaction(before_commit) as connection:
            study = self._study_row(connection, inst, calling_ae, calling_host, now)
            version = study.version
            receiving = study.state == StudyState.RECEIVING
            if not receiving and self.late_instances == "new-version":
                version += 1
            series_id = self._series_id(connection, inst, study.id)
            inserted = cast(
                CursorResult[Any],
                connection.execute(
                    _INSERT_INSTANCE,
                    {
                        "series_id": series_id,
                        "sop_instance_uid": inst.sop_instance_uid,
                        "sop_class_uid": inst.sop_class_uid,
                        "transfer_syntax_uid": inst.transfer_syntax_uid,
                        "path": relpath,
                        "size_bytes": size_bytes,
                        "study_version": version,
                        "received_at": now,
                        "association_id": association_id,
                    },
                ),
            ).rowcount
            if not inserted and expect_new:
                kept_at = connection.execute(_INSTANCE_PATH, {"uid": inst.sop_instance_uid}).scalar_one()
                raise AlreadyIndexed(kept_at)  # rolls the transaction back
            if not inserted and not replaced:
                # Same SOP Instance UID again, same content (the C-STORE handler checked): idempotent.
                if not receiving:
                    self._count_duplicate(association_id, inst.study_instance_uid, str(study.state))
                return IndexOutcome(study.id, study.version, True, False, False)
            if not inserted:
                connection.execute(
                    update(Instance)
                    .where(Instance.sop_instance_uid == inst.sop_instance_uid)
                    .values(size_bytes=size_bytes, received_at=now, association_id=association_id,
                            transfer_syntax_uid=inst.transfer_syntax_uid, study_version=version)
                )  # fmt: skip
            added = 0 if replaced else 1
            if receiving:
                connection.execute(_BUMP_STUDY, {"now": now, "id": study.id, "added": added})
                return IndexOutcome(study.id, version, False, False, False)
            # A late instance (or changed content): the study was complete already.
            values: dict[str, object] = {"last_received_at": now, "instance_count": Study.instance_count + added}
            if self.late_instances == "new-version":
                new_version = True
                values.update(
                    study_values(inst.study_instance_uid, study.state, StudyState.RECEIVING),
                    version=version,
                    sender_ae=calling_ae,
                    sender_host=calling_host,
                )
            else:
                ignored = True
            connection.execute(update(Study).where(Study.id == study.id).values(**values))
        if new_version:
            log.info("study %s re-opened as version %d by a late instance", inst.study_instance_uid, version)
        elif ignored:
            log.info("study %s: late instance kept, not processed (late_instances: ignore)", inst.study_instance_uid)
        return IndexOutcome(study.id, version, False, new_version, ignored)


def reconcile_spool(spool: Spool, index: InstanceIndex) -> int:
    """Index instance files that are in the spool but not in the database.

    The spool is fsynced before every C-STORE success; with SQLite's ``synchronous=NORMAL``
    a power cut can lose the last committed rows, never the files. Re-indexing them at start
    restores "acknowledged means kept". Returns how many files were indexed.
    """
    with index.sessions() as session:
        known = set(session.execute(select(Instance.path)).scalars())
    added = 0
    for relpath in spool.iter_instance_files():
        if relpath in known:
            continue
        try:
            index.record(
                ReceivedInstance.from_header(spool.read(relpath, headers_only=True)),
                relpath=relpath,
                size_bytes=spool.abspath(relpath).stat().st_size,
                calling_ae=None,
                calling_host=None,
                association_id=None,
            )
            added += 1
        except Exception as exc:
            log.warning("spool file %s could not be indexed: %s", relpath, exc)
    return added
