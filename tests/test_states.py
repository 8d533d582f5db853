"""One owner for state (ARCHITECTURE.md, invariant 9): db/states.py, with an injected clock.

Every transition its tables allow works and sets what belongs to it; every other one raises,
naming both states; and no module of node/ or db/ but db/states.py assigns a ``state``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from db.engine import make_engine, make_session_factory
from db.migrate import upgrade
from db.models import Delivery, DeliveryState, Job, JobState, Study, StudyState
from db.queue import claim_next_job, reclaim_stale_jobs
from db.states import (
    DELIVERY_TRANSITIONS,
    JOB_TRANSITIONS,
    STUDY_TRANSITIONS,
    TransitionError,
    finish_job,
    make_delivery_due,
    requeue_job,
    set_delivery_state,
    set_job_state,
    set_study_state,
    study_values,
)
from tests.support import REPO

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
EARLIER = NOW - timedelta(hours=1)


def _allowed(table: Any) -> list[tuple[Any, Any]]:
    return [(old, new) for old, news in table.items() for new in sorted(news, key=lambda s: s.value)]


def _forbidden(table: Any, states: type[Enum]) -> list[tuple[Any, Any]]:
    return [(old, new) for old in [None, *states] for new in states if new not in table.get(old, ())]


def _name(value: object) -> str:
    return getattr(value, "value", "new")


def _study(state: StudyState | None) -> Study:
    study = Study(id=3, study_instance_uid="1.2.3", version=1, complete_requested=True, note="before")
    study.state = state  # type: ignore[assignment]
    return study


def _job(state: JobState | None) -> Job:
    job = Job(id=7, study_id=3, study_version=1, route="r", pipeline="p", attempts=2, reason="before")
    job.state = state  # type: ignore[assignment]
    if state is JobState.RUNNING:
        job.claimed_by, job.started_at = "host:1:w0", EARLIER
    if state in (JobState.DONE, JobState.FAILED, JobState.NOT_APPLICABLE):
        job.claimed_by, job.finished_at = "host:1:w0", EARLIER
    return job


def _delivery(state: DeliveryState | None) -> Delivery:
    row = Delivery(id=11, result_id=5, destination="pacs", attempts=4, last_status=0xA700, last_error="before")
    row.state = state  # type: ignore[assignment]
    row.next_attempt_at = EARLIER
    if state is DeliveryState.DELIVERED:
        row.delivered_at, row.last_error = EARLIER, None
    return row


# -- every allowed transition works -------------------------------------------------------------
@pytest.mark.parametrize(("old", "new"), _allowed(STUDY_TRANSITIONS), ids=lambda s: _name(s))
def test_every_allowed_study_transition_sets_the_state_and_the_note(old, new):
    study = _study(old)
    assert set_study_state(study, new, "why", NOW) == old
    assert study.state is new
    assert study.note == "why"
    # A study that starts receiving (again) is not complete, whatever its sender asked before.
    assert study.complete_requested is (new is not StudyState.RECEIVING)


def test_a_study_transition_without_a_reason_keeps_the_note():
    study = _study(StudyState.RECEIVING)
    set_study_state(study, StudyState.QUEUED, None, NOW)
    assert (study.state, study.note) == (StudyState.QUEUED, "before")


def test_the_receivers_core_sql_gets_the_same_transition_as_values():
    # The hot path reads the state as the stored string.
    receiving = {"state": "receiving", "complete_requested": False}
    assert study_values("1.2.3", None, StudyState.RECEIVING) == receiving
    assert study_values("1.2.3", "processed", StudyState.RECEIVING) == receiving
    with pytest.raises(TransitionError, match="receiving -> receiving"):
        study_values("1.2.3", "receiving", StudyState.RECEIVING)


@pytest.mark.parametrize(("old", "new"), _allowed(JOB_TRANSITIONS), ids=lambda s: _name(s))
def test_every_allowed_job_transition_sets_the_state_and_what_belongs_to_it(old, new):
    job = _job(old)
    assert set_job_state(job, new, "why", NOW, worker="host:2:w1") == old
    assert (job.state, job.reason) == (new, "why")
    if new is JobState.RUNNING:
        assert (job.claimed_by, job.started_at, job.heartbeat_at, job.attempts) == ("host:2:w1", NOW, NOW, 3)
    elif new is JobState.QUEUED:
        assert (job.claimed_by, job.finished_at) == (None, None)
        # An operator's re-run is a new run; a requeue after a worker died keeps counting crashes.
        assert job.attempts == (2 if old in (None, JobState.RUNNING) else 0)
    else:
        assert job.finished_at == NOW
        # Who ran it stays visible; a queued job an operator cancelled never ran.
        assert job.claimed_by == (None if old is JobState.QUEUED else "host:1:w0")
        assert job.attempts == 2


def test_a_claim_needs_the_worker():
    with pytest.raises(ValueError, match="worker"):
        set_job_state(_job(JobState.QUEUED), JobState.RUNNING, None, NOW)


@pytest.mark.parametrize(("old", "new"), _allowed(DELIVERY_TRANSITIONS), ids=lambda s: _name(s))
def test_every_allowed_delivery_transition_sets_the_state_and_the_error(old, new):
    row = _delivery(old)
    assert set_delivery_state(row, new, "why", NOW) == old
    assert (row.state, row.last_error) == (new, "why")
    was_delivered_at = EARLIER if old is DeliveryState.DELIVERED else None
    assert row.delivered_at == (NOW if new is DeliveryState.DELIVERED else was_delivered_at)
    assert (row.attempts, row.next_attempt_at) == (4, EARLIER)  # scheduling is the outbox's business


@pytest.mark.parametrize("old", [None, *DeliveryState], ids=lambda s: _name(s))
def test_a_delivery_made_due_starts_again_from_any_state(old):
    row = _delivery(old)
    make_delivery_due(row, NOW)
    assert (row.state, row.attempts, row.next_attempt_at) == (DeliveryState.PENDING, 0, NOW)
    assert (row.last_status, row.last_error, row.delivered_at) == (None, None, None)


# -- every other transition raises, naming both states ------------------------------------------
def _forbidden_cases() -> Iterator[Any]:
    moves = {
        "study": (STUDY_TRANSITIONS, StudyState, lambda o, n: set_study_state(_study(o), n, None, NOW)),
        "job": (JOB_TRANSITIONS, JobState, lambda o, n: set_job_state(_job(o), n, None, NOW, worker="w")),
        "delivery": (DELIVERY_TRANSITIONS, DeliveryState, lambda o, n: set_delivery_state(_delivery(o), n, None, NOW)),
    }
    for entity, (table, states, move) in moves.items():
        for old, new in _forbidden(table, states):
            yield pytest.param(move, old, new, id=f"{entity}-{_name(old)}-{new.value}")


@pytest.mark.parametrize(("move", "old", "new"), list(_forbidden_cases()))
def test_a_forbidden_transition_raises_naming_both_states(move, old, new):
    with pytest.raises(TransitionError) as raised:
        move(old, new)
    assert f"{_name(old)} -> {new.value} is not allowed" in str(raised.value)
    assert (raised.value.old, raised.value.new) == (old, new)


def test_the_tables_cover_every_state_and_only_known_ones():
    tables = ((STUDY_TRANSITIONS, StudyState), (JOB_TRANSITIONS, JobState), (DELIVERY_TRANSITIONS, DeliveryState))
    for table, states in tables:
        assert set(table) == {None, *states}
        assert all(news <= set(states) for news in table.values())


# -- the transitions that span rows, on a database ----------------------------------------------
@pytest.fixture
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    engine = make_engine(f"sqlite:///{tmp_path}/states.db")
    upgrade(engine)
    return make_session_factory(engine)


def _queued_study_with_jobs(sessions: sessionmaker[Session], n: int) -> list[int]:
    with sessions() as session, session.begin():
        study = Study(study_instance_uid="1.2.3")
        set_study_state(study, StudyState.RECEIVING, None, EARLIER)
        session.add(study)
        session.flush()
        set_study_state(study, StudyState.QUEUED, None, EARLIER)
        jobs = [Job(study_id=study.id, study_version=1, route=f"r{i}", pipeline="p") for i in range(n)]
        for job in jobs:
            set_job_state(job, JobState.QUEUED, None, EARLIER)
        session.add_all(jobs)
        session.flush()
        return [job.id for job in jobs]


def _states(sessions: sessionmaker[Session], job_id: int) -> tuple[StudyState, JobState]:
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.study.state, job.state


def test_a_study_is_processed_once_every_job_of_its_version_has_ended(sessions):
    first, second = _queued_study_with_jobs(sessions, 2)
    expected = {first: (StudyState.QUEUED, JobState.DONE), second: (StudyState.PROCESSED, JobState.NOT_APPLICABLE)}
    for job_id, (study_state, job_state) in expected.items():
        claimed = claim_next_job(sessions, "host:1:w0", now=NOW)
        assert claimed is not None and claimed.id == job_id
        with sessions() as session, session.begin():
            job = session.get(Job, job_id)
            assert job is not None
            finish_job(session, job, job_state, None, NOW)
        assert _states(sessions, job_id) == (study_state, job_state)


def test_a_study_waits_for_its_other_jobs(sessions):
    first, _second = _queued_study_with_jobs(sessions, 2)
    claim_next_job(sessions, "host:1:w0", now=NOW)
    with sessions() as session, session.begin():
        job = session.get(Job, first)
        assert job is not None
        finish_job(session, job, JobState.FAILED, "broken", NOW)
    assert _states(sessions, first) == (StudyState.QUEUED, JobState.FAILED)
    with sessions() as session:
        job = session.get(Job, first)
        assert job is not None and (job.finished_at, job.reason) == (NOW, "broken")


def test_an_operator_rerun_queues_the_job_and_its_processed_study_again(sessions):
    (job_id,) = _queued_study_with_jobs(sessions, 1)
    claim_next_job(sessions, "host:1:w0", now=NOW)
    with sessions() as session, session.begin():
        job = session.get(Job, job_id)
        assert job is not None
        finish_job(session, job, JobState.FAILED, "broken", NOW)
    with sessions() as session, session.begin():
        job = session.get(Job, job_id)
        assert job is not None
        assert requeue_job(session, job, "retried by operator", NOW) is JobState.FAILED
    assert _states(sessions, job_id) == (StudyState.QUEUED, JobState.QUEUED)
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None and (job.attempts, job.finished_at, job.claimed_by) == (0, None, None)


def test_an_operator_cannot_requeue_a_running_job(sessions):
    (job_id,) = _queued_study_with_jobs(sessions, 1)
    claim_next_job(sessions, "host:1:w0", now=NOW)
    with sessions() as session, session.begin():
        job = session.get(Job, job_id)
        assert job is not None
        with pytest.raises(TransitionError, match="running -> queued"):
            requeue_job(session, job, "retried by operator", NOW)


def test_the_reclaimer_requeues_a_job_whose_worker_stopped_then_fails_it(sessions):
    (job_id,) = _queued_study_with_jobs(sessions, 1)
    claim_next_job(sessions, "elsewhere:1:w0", now=NOW)
    later = NOW + timedelta(seconds=300)
    assert reclaim_stale_jobs(sessions, lease_s=120, max_attempts=2, now=later) == [job_id]
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (job.state, job.attempts, job.claimed_by) == (JobState.QUEUED, 1, None)
        assert job.reason == "requeued: worker elsewhere:1:w0 stopped while running it"
    claim_next_job(sessions, "elsewhere:1:w0", now=later)
    assert reclaim_stale_jobs(sessions, lease_s=120, max_attempts=2, now=later + timedelta(seconds=300)) == [job_id]
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (job.state, job.finished_at, job.claimed_by) == (JobState.FAILED, later + timedelta(seconds=300), None)
        assert job.reason == "worker died 2 times while running this job"
        # Its study does not stay "queued" for ever (found by the kill -9 campaign): its last job has ended.
        study = session.get(Study, job.study_id)
        assert study is not None and study.state == StudyState.PROCESSED


# -- nothing else assigns a state ---------------------------------------------------------------
OWNER = Path("db/states.py")


def _state_assignments(path: Path) -> list[str]:
    """Where ``path`` sets a ``state``: ``x.state = …`` (plain, augmented, annotated or in a tuple),
    ``setattr(x, "state", …)``, or ``state=…`` given to a call (a model's constructor, ``.values()``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[str] = []

    def targets(node: ast.AST) -> Iterator[ast.AST]:
        if isinstance(node, ast.Tuple | ast.List):
            for element in node.elts:
                yield from targets(element)
        elif isinstance(node, ast.Starred):
            yield from targets(node.value)
        else:
            yield node

    for node in ast.walk(tree):
        assigned: list[ast.AST] = []
        if isinstance(node, ast.Assign):
            assigned = [t for target in node.targets for t in targets(target)]
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            assigned = list(targets(node.target))
        for target in assigned:
            if isinstance(target, ast.Attribute) and target.attr == "state":
                found.append(f"{path}:{node.lineno}: .state assigned")
        if isinstance(node, ast.Call):
            if any(k.arg == "state" for k in node.keywords):
                found.append(f"{path}:{node.lineno}: state= given to a call")
            func = node.func
            if (
                isinstance(func, ast.Name)
                and func.id == "setattr"
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and node.args[1].value == "state"
            ):
                found.append(f"{path}:{node.lineno}: setattr(..., 'state', ...)")
    return found


def test_no_module_but_db_states_assigns_a_state():
    files = sorted(p for top in ("node", "db") for p in (REPO / top).rglob("*.py") if "migrations" not in p.parts)
    assert len(files) > 20
    offenders = [hit for p in files if p.relative_to(REPO) != OWNER for hit in _state_assignments(p)]
    assert offenders == []


def test_the_state_check_finds_assignments(tmp_path):
    # The check above would pass on any tree if it found nothing: it finds the owner's own, and each form.
    assert _state_assignments(REPO / OWNER)
    sample = tmp_path / "sample.py"
    sample.write_text(
        "row.state = 1\n"
        "a.b, row.state = 1, 2\n"
        "Job(route='r', state='queued')\n"
        "update(Study).values(state='queued')\n"
        "setattr(row, 'state', 'done')\n"
        "row.states = 1\n"  # not a state
        "state = 1\n"  # a local name, not a row's state
    )
    assert [hit.split(": ", 1)[0].rsplit(":", 1)[1] for hit in _state_assignments(sample)] == ["1", "2", "3", "4", "5"]
