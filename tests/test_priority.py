"""STAT before routine (issue 13): a route's priority goes into its jobs; workers claim the highest first."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError

from db.engine import make_engine, make_session_factory
from db.migrate import upgrade
from db.models import Job, JobState, Study, utcnow
from db.queue import claim_next_job, next_due_study, reclaim_stale_jobs
from db.states import finish_job, requeue_job
from tests.support.node_parts import STABLE_AFTER_S, build_node, ct_route, ct_study, make_config
from tests.support.stat_priority import STAT_PRIORITY, run_stat_behind_routine


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request, tmp_path):
    url = f"sqlite:///{tmp_path}/queue.db" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    engine = make_engine(url)
    upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


def _queue(sessions, priorities: list[int], *, uid: str = "1.2.3.4") -> list[int]:
    with sessions() as session, session.begin():
        study = Study(study_instance_uid=uid)
        session.add(study)
        session.flush()
        jobs = [
            Job(study_id=study.id, route=f"r{i}", pipeline="p", destinations=[], priority=p, state=JobState.QUEUED)
            for i, p in enumerate(priorities)
        ]
        session.add_all(jobs)
        session.flush()
        return [j.id for j in jobs]


def _claim_all(sessions, now=None) -> list[int]:
    claimed = []
    while (job := claim_next_job(sessions, "host:1:w0", now=now)) is not None:
        claimed.append(job.id)
    return claimed


def test_workers_claim_the_highest_priority_first_then_the_oldest(sessions):
    ids = _queue(sessions, [0, 0, 10, 0, 5, 10])
    assert _claim_all(sessions) == [ids[2], ids[5], ids[4], ids[0], ids[1], ids[3]]


def test_a_stat_job_put_off_by_a_transient_failure_waits_its_retry_time(sessions):
    now = utcnow()
    routine, stat = _queue(sessions, [0, STAT_PRIORITY])
    with sessions() as session, session.begin():
        session.get(Job, stat).retry_at = now + timedelta(seconds=60)
    assert _claim_all(sessions, now=now) == [routine]
    assert _claim_all(sessions, now=now + timedelta(seconds=61)) == [stat]


def test_a_job_queued_again_keeps_its_priority(sessions):
    now = utcnow()
    routine, stat = _queue(sessions, [0, STAT_PRIORITY])
    assert _claim_all(sessions, now=now) == [stat, routine]
    # The STAT job's worker dies (its lease runs out) and an operator re-runs the routine job.
    with sessions() as session, session.begin():
        finish_job(session, session.get(Job, routine), JobState.DONE, None, now)
    reclaim_stale_jobs(sessions, lease_s=1, max_attempts=3, now=now + timedelta(seconds=5))
    with sessions() as session, session.begin():
        requeue_job(session, session.get(Job, routine), "retried by operator", now)
    later = _queue(sessions, [0], uid="1.2.3.5")
    assert _claim_all(sessions, now=now + timedelta(seconds=6)) == [stat, routine, *later]
    with sessions() as session:
        assert session.get(Job, stat).priority == STAT_PRIORITY


def test_a_route_priority_defaults_to_routine_and_must_be_a_number(tmp_path):
    config = make_config(tmp_path, routes=[ct_route(name="stat", priority=STAT_PRIORITY), ct_route(name="routine")])
    assert [r.priority for r in config.routes] == [STAT_PRIORITY, 0]
    with pytest.raises(ValidationError, match="priority"):
        make_config(tmp_path, routes=[ct_route(priority="urgent")])


def test_the_assembler_gives_each_job_its_route_priority(tmp_path):
    stat = ct_route(name="ct-stat", match={"Modality": "CT", "StationName": "ED-CT"}, priority=STAT_PRIORITY)
    parts = build_node(tmp_path, config=make_config(tmp_path, routes=[stat, ct_route(name="ct-routine")]))
    parts.receive(ct_study(2, study_uid="1.2.826.0.1.3680043.8.498.7101"))
    emergency = ct_study(2, study_uid="1.2.826.0.1.3680043.8.498.7102")
    for ds in emergency:
        ds.StationName = "ED-CT"
    parts.receive(emergency)
    parts.assembler.tick(now=parts.clock.advance(STABLE_AFTER_S + 1))
    assert {(j.route, j.priority) for j in parts.jobs()} == {("ct-routine", 0), ("ct-stat", STAT_PRIORITY)}
    # One worker: the STAT study's job runs first although the routine study completed first.
    assert parts.worker().run_once()
    (first,) = [j for j in parts.jobs() if j.state != JobState.QUEUED]
    assert first.route == "ct-stat"


@pytest.mark.orthanc
@pytest.mark.slow
def test_a_stat_study_sent_behind_ten_routine_studies_starts_next_and_arrives_first(tmp_path, orthanc):
    run = run_stat_behind_routine(tmp_path, orthanc, routine=10, job_delay_s=2.0)
    assert run.stat.route == "ct-stat" and run.stat.priority == STAT_PRIORITY
    assert {j.route for j in run.routine} == {"ct-routine"} and {j.priority for j in run.routine} == {0}
    # With one worker busy 2 s per job, most routine jobs are still queued when the STAT one is.
    overtaken = run.overtaken
    assert len(overtaken) >= 5, run
    # It starts as soon as the worker is free: before every routine job that was still waiting ...
    assert all(run.stat.started_at < j.started_at for j in overtaken), run
    assert run.start_position == run.started_before_stat_queued + 1, run
    # ... and its result reaches the PACS before theirs.
    assert all(run.stat.delivered_at < j.delivered_at for j in overtaken), run
    arrivals = run.arrival_order
    stat_at = arrivals.index(run.stat.study_uid)
    assert all(stat_at < arrivals.index(j.study_uid) for j in overtaken), arrivals


def test_the_next_due_study_is_that_of_the_job_a_worker_claims_next(sessions):
    # Worker.defer asks which study's job comes next before it claims (see node/work/worker.py).
    now = utcnow()
    _queue(sessions, [0], uid="1.2.3.1")
    (stat,) = _queue(sessions, [STAT_PRIORITY], uid="1.2.3.2")
    _queue(sessions, [0], uid="1.2.3.3")
    assert next_due_study(sessions, now) == "1.2.3.2"
    with sessions() as session, session.begin():
        session.get(Job, stat).retry_at = now + timedelta(seconds=60)
    order = []
    while (uid := next_due_study(sessions, now)) is not None:
        job = claim_next_job(sessions, "host:1:w0", now=now)
        assert job is not None
        with sessions() as session:
            order.append((uid, session.get(Study, job.study_id).study_instance_uid))
    assert order == [("1.2.3.1", "1.2.3.1"), ("1.2.3.3", "1.2.3.3")]
