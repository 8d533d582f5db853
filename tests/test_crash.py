"""kill -9 during ingest and during a job: nothing acknowledged is lost, results arrive exactly once."""

from __future__ import annotations

import threading
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import select

from db.engine import make_engine, make_session_factory
from db.models import Instance
from tests.support.cli import status
from tests.support.data import CT_STUDY_UID
from tests.support.nodeproc import NodeProcess, node_config
from tests.support.peers import results_in_orthanc, storescu
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]


def send_until_killed(port: int, files: list[Path], node: NodeProcess, kill_after: int) -> list[str]:
    """C-STORE files one by one; kill -9 the node after ``kill_after`` successes. Returns acknowledged UIDs."""
    acknowledged: list[str] = []
    ae = AE(ae_title="CTSCANNER")
    ae.add_requested_context(CTImageStorage)
    ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    assert assoc.is_established
    killer = None
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        if i == kill_after:
            # Kill while this instance is in flight, not between instances.
            killer = threading.Timer(0.005, node.kill9)
            killer.start()
        try:
            rsp = assoc.send_c_store(ds)
        except Exception:
            break
        if rsp and rsp.get("Status") == 0x0000:
            acknowledged.append(ds.SOPInstanceUID)
        if not assoc.is_established:
            break
    if killer is not None:
        killer.join()
    if assoc.is_established:
        assoc.abort()
    return acknowledged


def settled(st: dict) -> dict | None:
    """``st`` when no study waits for a job, no job is queued or running and every delivery has ended."""
    if any(s["state"] in ("receiving", "queued") for s in st["studies"]):
        return None
    if not st["jobs"] or any(j["state"] in ("queued", "running") for j in st["jobs"]):
        return None
    if not st["deliveries"] or any(d["state"] not in ("delivered", "failed") for d in st["deliveries"]):
        return None
    return st


def test_kill_during_ingest_and_during_job_loses_nothing_and_delivers_once(tmp_path, orthanc, ct_dir):
    orthanc.clear()
    files = sorted(ct_dir.rglob("*.dcm"))
    config = node_config(tmp_path, orthanc)
    # The study is complete only when the scanner releases an association (the killed one never is), so
    # however slow the restart below, the node cannot take the partial study for a whole one.
    config["routes"][0]["stable_after_s"] = 600
    config["peers"]["scanner"] = {"ae_title": "CTSCANNER", "host": "127.0.0.1", "port": 1, "complete_on_release": True}
    node = NodeProcess(config, tmp_path / "n", job_lease_s=3600, env={"AINODE_TEST_RUNNER_DELAY_S": "4"})

    # 1. kill -9 in the middle of ingest.
    node.start()
    acknowledged = send_until_killed(node.port, files, node, kill_after=25)
    assert 20 <= len(acknowledged) <= 26
    node.start()  # restart on the same spool and database
    try:
        sessions = make_session_factory(make_engine(config["node"]["database_url"]))
        with sessions() as session:
            kept = {i.sop_instance_uid: i.path for i in session.scalars(select(Instance))}
        missing = set(acknowledged) - set(kept)
        assert not missing, f"acknowledged but lost after kill -9: {missing}"
        for uid in acknowledged:
            assert pydicom.dcmread(Path(config["node"]["spool_dir"]) / kept[uid]).SOPInstanceUID == uid

        # 2. The scanner sends the whole study again (as it would after an error): idempotent.
        assert storescu(ct_dir, node.port, called_ae="AINODE", calling_ae="CTSCANNER").returncode == 0

        # 3. kill -9 while the job runs (the test pipeline sleeps 4 s inside the job).
        wait_for(lambda: any(j["state"] == "running" for j in status(node)["jobs"]), node=node, what="job running")
        node.kill9()
    except BaseException:
        node.stop()
        raise
    node.env.pop("AINODE_TEST_RUNNER_DELAY_S")
    node.start()
    try:
        wait_for(lambda: results_in_orthanc(orthanc, CT_STUDY_UID), node=node, what="results after restart")
        # A duplicate could only come from another run of the job or another delivery: wait until the
        # node has nothing left to do (no job open, no delivery pending), then count what Orthanc holds.
        st = wait_for(lambda: settled(status(node)), node=node, what="no open job and no pending delivery")
        assert len(results_in_orthanc(orthanc, CT_STUDY_UID)) == 1
        assert len(st["jobs"]) == 1, st["jobs"]
        (job,) = st["jobs"]
        assert job["state"] == "done" and job["attempts"] == 2
        assert [d["state"] for d in st["deliveries"]] == ["delivered"]
        assert st["studies"][0]["instances"] == len(files)
    finally:
        node.stop()
