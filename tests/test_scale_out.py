"""Scale-out as a site runs it: receivers behind HAProxy, separate workers, one PostgreSQL, one spool.

Every process is ``ainode serve`` with its own ``node.role`` (the tests' pipeline runner, ``thumbnail``);
scanners are DCMTK ``storescu``; the PACS is Orthanc. What a site relies on: each study is analysed once
and its result delivered once, whichever receiver took it and whichever worker ran it; nothing received
is lost; a worker killed mid-job leaves its job to another worker, which finishes and delivers it once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.peers import OrthancServer, results_in_orthanc
from tests.support.scale_out import ScaleOutSite, can_name_hosts, ct_studies
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.orthanc, pytest.mark.dcmtk]

STUDIES = 20
SENDERS = 4


@pytest.fixture
def site(tmp_path: Path, orthanc: OrthancServer, postgres_url: str) -> Iterator[ScaleOutSite]:
    # A lease far longer than a job here: a heartbeat late on a busy machine must not look like a dead worker.
    s = ScaleOutSite(tmp_path, orthanc, postgres_url, job_lease_s=60)
    yield s
    s.close()


def _all_done(site: ScaleOutSite, count: int) -> bool:
    jobs = site.jobs()
    return len(jobs) >= count and all(j.state in ("done", "failed") for j in jobs)


def _delivered(site: ScaleOutSite, count: int) -> bool:
    deliveries = site.deliveries()
    return len(deliveries) >= count and all(state == "delivered" for _, _, state, _ in deliveries)


def test_twenty_studies_through_two_receivers_and_two_workers_are_each_analysed_and_delivered_once(
    site: ScaleOutSite, tmp_path: Path, orthanc: OrthancServer
):
    studies = ct_studies(tmp_path / "studies", STUDIES)
    dirs = sorted((tmp_path / "studies").iterdir())
    site.worker_env = {"AINODE_TEST_RUNNER_DELAY_S": "0.5"}  # long enough that the second worker finds work
    site.add_receiver()
    site.add_receiver()
    site.add_worker()
    balancer = site.start_balancer()

    # The first half, while one worker runs; then a second worker joins and the second half is sent.
    sent = site.send(dirs[: STUDIES // 2], SENDERS)
    wait_for(lambda: any(j.state == "done" for j in site.jobs()), 120, "a first job done", site.workers[0])
    site.add_worker()
    sent += site.send(dirs[STUDIES // 2 :], SENDERS)
    assert [out.returncode for out in sent] == [0] * STUDIES, [out.stderr for out in sent if out.returncode]

    wait_for(lambda: _all_done(site, STUDIES), 300, f"{STUDIES} jobs ended", site.workers[-1])
    wait_for(lambda: _delivered(site, STUDIES), 120, "every result delivered", site.workers[-1])

    # HAProxy spread the associations over both receivers.
    connections = {name: int(row["stot"]) for name, row in balancer.stats().items()}
    assert sorted(connections) == ["receiver1", "receiver2"] and all(connections.values()), connections

    # No instance lost: every SOP Instance UID sent is in the database, under its study, and its file in the spool.
    assert site.instances_by_study() == {study: set(sops) for study, sops in studies.items()}
    for sop_uid, path in site.instances().items():
        assert (site.spool_root / path).is_file(), sop_uid

    # Analysed exactly once: one job per study, done, never run twice.
    jobs = site.jobs()
    assert Counter(j.study_uid for j in jobs) == Counter(dict.fromkeys(studies, 1))
    assert [(j.state, j.attempts) for j in jobs] == [("done", 1)] * STUDIES, jobs

    # Delivered exactly once: one result per study, one delivery, one Secondary Capture in Orthanc.
    deliveries = site.deliveries()
    assert sorted(study for study, *_ in deliveries) == sorted(studies)
    assert all((state, attempts) == ("delivered", 1) for _, _, state, attempts in deliveries), deliveries
    result_uid = {study: sop for study, sop, *_ in deliveries}
    for study_uid in studies:
        at_pacs = [str(ds.SOPInstanceUID) for ds in results_in_orthanc(orthanc, study_uid)]
        assert at_pacs == [result_uid[study_uid]], study_uid


def test_a_job_of_a_worker_killed_mid_job_is_reclaimed_by_the_other_worker_and_delivered_once(
    site: ScaleOutSite, tmp_path: Path, orthanc: OrthancServer
):
    (study_uid, _sops), *_ = ct_studies(tmp_path / "studies", 1).items()
    # Slow jobs: a worker is killed while it holds one. Each worker as if on a machine of its own: the
    # reclaimer cannot see that the killed worker's process is gone, only that its heartbeat stopped, and
    # requeues the job once the heartbeat is older than the (short) lease.
    site.worker_env = {"AINODE_TEST_RUNNER_DELAY_S": "6"}
    site.job_lease_s = 8
    hosts = ["worker-host-a", "worker-host-b"] if can_name_hosts() else [None, None]
    site.add_receiver()
    first, second = site.add_worker(hostname=hosts[0]), site.add_worker(hostname=hosts[1])
    site.start_balancer()

    assert [out.returncode for out in site.send(sorted((tmp_path / "studies").iterdir()), 1)] == [0]
    running = wait_for(
        lambda: [j for j in site.jobs() if j.state == "running"], 120, "the job running", site.receivers[0]
    )
    holder_host, holder_pid = (running[0].claimed_by or "").split(":")[:2]
    assert holder_host in hosts or None in hosts, running
    victim, survivor = (first, second) if first.proc and first.proc.pid == int(holder_pid) else (second, first)
    assert victim.proc is not None and victim.proc.pid == int(holder_pid)
    victim.kill9()

    wait_for(lambda: _all_done(site, 1), 180, "the job finished by the other worker", survivor)
    wait_for(lambda: _delivered(site, 1), 120, "its result delivered", survivor)

    [job] = site.jobs()
    assert (job.study_uid, job.state, job.attempts) == (study_uid, "done", 2), job
    assert survivor.proc is not None and int((job.claimed_by or "").split(":")[1]) == survivor.proc.pid
    [(_, result_uid, state, attempts)] = site.deliveries()
    assert (state, attempts) == ("delivered", 1)
    assert [str(ds.SOPInstanceUID) for ds in results_in_orthanc(orthanc, study_uid)] == [result_uid]
