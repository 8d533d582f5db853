"""The job queue on SQLite and on a real PostgreSQL: atomic claims, crash reclaim (issue 2, item 6)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest
from sqlalchemy import select

from db.engine import make_engine, make_session_factory
from db.migrate import current_revision, upgrade
from db.models import Job, JobState, Study, utcnow
from db.queue import claim_next_job, process_identity, reclaim_stale_jobs
from tests.support import REPO

CLAIMER = textwrap.dedent(
    """
    import os, sys, time
    from db.engine import make_engine, make_session_factory
    from db.queue import claim_next_job
    from db.models import Job, JobState
    url, out, other_out, name = sys.argv[1:5]
    sessions = make_session_factory(make_engine(url))

    def other_has_claimed():
        try:
            return os.path.getsize(other_out) > 0
        except FileNotFoundError:
            return False

    with open(out, "w") as fh:
        held_first = False
        while True:
            job = claim_next_job(sessions, name)
            if job is None:
                break
            fh.write(f"{job.id}\\n")
            fh.flush()
            if not held_first:
                # Keep the first job running until the other process has claimed one too: both then
                # hold a running job at the same moment, so their claims competed for the same queue.
                deadline = time.monotonic() + 120
                while not other_has_claimed():
                    if time.monotonic() > deadline:
                        sys.exit(f"{name}: the other process claimed no job within 120 s")
                    time.sleep(0.01)
                held_first = True
            time.sleep(0.002)  # "work", so that both processes are busy at once
            with sessions() as s, s.begin():
                s.get(Job, job.id).state = JobState.DONE
    """
)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/queue.db"
    return request.getfixturevalue("postgres_url")


def _queue_jobs(url: str, n: int) -> list[int]:
    engine = make_engine(url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    with sessions() as session, session.begin():
        study = Study(study_instance_uid="1.2.3.4")
        session.add(study)
        session.flush()
        jobs = [Job(study_id=study.id, route=f"r{i}", pipeline="p", destinations=[]) for i in range(n)]
        session.add_all(jobs)
        session.flush()
        ids = [j.id for j in jobs]
    engine.dispose()
    return ids


def test_migrations_bring_an_empty_database_to_head(database_url):
    engine = make_engine(database_url)
    upgrade(engine)
    assert current_revision(engine) is not None
    upgrade(engine)  # a second start is a no-op
    engine.dispose()


def test_two_worker_processes_never_run_the_same_job(database_url, tmp_path):
    ids = _queue_jobs(database_url, 300)
    outs = [tmp_path / "a.txt", tmp_path / "b.txt"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, database_url, str(out), str(outs[1 - i]), f"host:{i}:w"],
            env=env,
            cwd=REPO,
        )
        for i, out in enumerate(outs)
    ]
    # Each process holds its first job until the other has claimed one (bounded inside), then drains the queue.
    for p in procs:
        assert p.wait(240) == 0
    claimed = [[int(x) for x in out.read_text().split()] for out in outs]
    assert not set(claimed[0]) & set(claimed[1]), "a job was claimed by both processes"
    assert sorted(claimed[0] + claimed[1]) == sorted(ids), "every job was claimed exactly once"
    # Both processes really competed (otherwise the test proves nothing about concurrency): each took
    # part, and the first to claim held its job running until the other had claimed one.
    assert all(claimed), [len(c) for c in claimed]
    sessions = make_session_factory(make_engine(database_url))
    with sessions() as session:
        states = dict(session.execute(select(Job.id, Job.state)).all())
    assert states == dict.fromkeys(ids, JobState.DONE), "the queue was drained, every job done once"


def test_job_left_running_by_a_dead_process_is_reclaimed(database_url):
    ids = _queue_jobs(database_url, 2)
    sessions = make_session_factory(make_engine(database_url))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    dead_owner = process_identity().rsplit(":", 1)[0] + f":{dead.pid}:w0"
    job = claim_next_job(sessions, dead_owner)
    assert job is not None and job.id == ids[0]
    alive = claim_next_job(sessions, process_identity("w0"))
    assert alive is not None
    # Only the dead process's job comes back, without waiting for its lease to expire.
    assert reclaim_stale_jobs(sessions, lease_s=3600, max_attempts=3) == [ids[0]]
    with sessions() as session:
        states = dict(session.execute(select(Job.id, Job.state)).all())
    assert states == {ids[0]: JobState.QUEUED, ids[1]: JobState.RUNNING}


def test_job_whose_heartbeat_expired_is_reclaimed_and_fails_after_max_attempts(database_url):
    (job_id,) = _queue_jobs(database_url, 1)
    sessions = make_session_factory(make_engine(database_url))
    for attempt in range(1, 4):
        job = claim_next_job(sessions, f"elsewhere:1:w{attempt}")
        assert job is not None and job.attempts == attempt
        later = utcnow() + timedelta(seconds=121)
        assert reclaim_stale_jobs(sessions, lease_s=120, max_attempts=3, now=later) == [job_id]
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job.state == JobState.FAILED
        assert "worker died 3 times" in job.reason
