"""node.worker_processes: jobs in child processes that the node starts, wakes, restarts and stops with itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import yaml
from sqlalchemy import select

from db.engine import make_engine, make_session_factory
from db.models import Job, JobState
from node.config import ConfigError, NodeSettings, load_config
from node.operate.supervise import plan, usable_cpus, usable_memory_bytes
from tests.support import REPO
from tests.support.nodeproc import NodeProcess, node_section
from tests.support.peers import StoreSCP, storescu
from tests.support.waiting import wait_for

pytestmark = pytest.mark.dcmtk


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return sorted(int(p) for p in out.split())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[-1][:1] != "Z"


def _config(tmp_path: Path, **node: object) -> dict:
    return {"node": {**node_section(tmp_path), **node}, "routes": []}


def _lung_config(tmp_path: Path, pacs: StoreSCP, **node: object) -> dict:
    """2 worker processes of 1 thread; CT to lung-seg, complete when the scanner releases, SEG + SR to ``pacs``."""
    return {
        "node": {**node_section(tmp_path), "worker_processes": 2, "workers": 1, **node},
        "peers": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port, "outputs": ["seg", "sr"]},
                  "scanner": {"ae_title": "CTSCANNER", "host": "127.0.0.1", "port": 1, "complete_on_release": True}},
        "routes": [{"name": "ct", "match": {"Modality": "CT"}, "pipeline": "lung-seg", "destinations": ["pacs"],
                    "stable_after_s": 600}],
    }  # fmt: skip


@pytest.mark.parametrize("setting", ["2 of 1 thread", "auto (the default)"])
def test_a_lung_ct_is_analysed_in_a_worker_process_and_its_results_reach_the_pacs(
    tmp_path: Path, ct_dir: Path, setting: str
):
    pacs = StoreSCP(tmp_path / "pacs", aet="PACS")
    # auto with the default's 2 jobs at once; on this machine (2 cores or more, 4 GiB or more): 2 processes of 1 thread.
    auto = {"worker_processes": "auto", "workers": 2} if setting.startswith("auto") else {}
    assert not auto or NodeSettings().worker_processes == "auto" and NodeSettings().workers == 2
    here = plan("auto", 2, cpus=usable_cpus(), memory_bytes=usable_memory_bytes(), providers=["CPUExecutionProvider"])
    if auto and here.processes != 2:
        pytest.skip(f"auto keeps the jobs in the node here ({here.why})")
    config = _lung_config(tmp_path, pacs, **auto)
    series = sorted(ct_dir.iterdir())[0]
    try:
        with NodeProcess(config, tmp_path / "n", cli=True) as node:
            assert node.proc is not None
            workers = wait_for(lambda: children(node.proc.pid) if len(children(node.proc.pid)) == 2 else None, 60)
            if auto:
                chosen = "jobs run in 2 worker processes of 1 job thread each (worker_processes: auto, "
                assert chosen in node.log_text()
            sent = storescu(series, node.port, calling_ae="CTSCANNER")
            assert sent.returncode == 0, sent.stderr
            # Completed on the scanner's release, analysed by a worker process, sent by it to the PACS.
            results = wait_for(lambda: pacs.received() if len(pacs.received()) >= 2 else None, 180)
            modalities = sorted(str(pydicom.dcmread(p, stop_before_pixels=True).Modality) for p in results)
            assert modalities == ["SEG", "SR"]
            # The job's line follows its commit, after which the other process's outbox may already send.
            wait_for(lambda: "done in" in node.log_text(), 10, "the job's line", node)
            log = node.log_text()
            done = [line for line in log.splitlines() if "done in" in line]
            assert len(done) == 1 and ("[worker-1]" in done[0] or "[worker-2]" in done[0]), done
            assert children(node.proc.pid) == workers  # no worker process died meanwhile
    finally:
        pacs.stop()


def test_a_worker_process_that_dies_is_started_again_and_all_stop_with_the_node(tmp_path: Path):
    node = NodeProcess(_config(tmp_path, worker_processes=2), tmp_path / "n", cli=True).start()
    assert node.proc is not None
    parent = node.proc.pid
    first = wait_for(lambda: children(parent) if len(children(parent)) == 2 else None, 60)
    os.kill(first[0], signal.SIGKILL)
    again = wait_for(lambda: children(parent) if len(children(parent)) == 2 and first[0] not in children(parent)
                     else None, 30)  # fmt: skip
    assert first[1] in again
    assert "exited with signal SIGKILL" in node.log_text()
    # SIGTERM to the node: it stops its worker processes, then itself.
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(60) == 0
    assert not any(alive(pid) for pid in again)


def test_worker_processes_do_not_outlive_a_node_killed_with_sigkill(tmp_path: Path):
    node = NodeProcess(_config(tmp_path, worker_processes=1), tmp_path / "n", cli=True).start()
    assert node.proc is not None
    (child,) = wait_for(lambda: children(node.proc.pid) or None, 60)
    node.kill9()
    # The kernel tells the orphan (PR_SET_PDEATHSIG): it stops on its own, nobody reaps a worker left behind.
    wait_for(lambda: not alive(child) or None, 30)


def test_only_a_worker_process_may_leave_completing_studies_to_its_node(tmp_path: Path):
    # A receiving node started with --no-assembler would keep every study open for ever: it does not start.
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path)))
    serve = [sys.executable, "-m", "node.operate.cli", "serve", "--config", str(path), "--no-assembler"]
    ran = subprocess.run(serve, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert ran.returncode == 2, ran.stderr
    assert "--no-assembler is for worker processes (role worker), not role all" in ran.stderr


def test_worker_processes_need_role_all(tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, worker_processes=2, role="worker", port=None)))
    with pytest.raises(ConfigError, match="worker_processes .2. needs role all"):
        load_config(path)


def test_a_quiet_scanners_study_is_completed_by_the_node_and_its_job_taken_where_its_results_were_made_ahead(
    tmp_path: Path, ct_dir: Path
):
    """One worker process analyses a study ahead (it holds the study's lease) and makes its results while it is
    quiet. The node itself completes the study and wakes both processes: the job goes to that one, which takes
    the results made ahead, rather than to the other, which would analyse the study again. A worker process that
    completed the study itself would wake only its own workers (it did, before, in 2 of 3 measured rounds)."""
    pacs = StoreSCP(tmp_path / "pacs", aet="PACS")
    config = _lung_config(tmp_path, pacs)
    config["peers"]["scanner"]["complete_on_release"] = False
    config["routes"][0]["stable_after_s"] = 4
    series = sorted(ct_dir.iterdir())[0]
    try:
        with NodeProcess(config, tmp_path / "n", cli=True) as node:
            assert node.proc is not None
            wait_for(lambda: len(children(node.proc.pid)) == 2 or None, 60)
            for child in children(node.proc.pid):
                # The children are told to leave the studies to the node.
                assert "--no-assembler" in Path(f"/proc/{child}/cmdline").read_text().split("\0")
            assert storescu(series, node.port, calling_ae="CTSCANNER").returncode == 0
            wait_for(lambda: len(pacs.received()) >= 2 or None, 180, "SEG and SR at the PACS", node)
            wait_for(lambda: "done in" in node.log_text(), 10, "the job's line", node)
            lines = node.log_text().splitlines()

            def tag(line: str) -> str:
                return line.split("[", 1)[1].split("]", 1)[0] if "] ainode." in line and "[" in line else "node"

            (complete,) = [line for line in lines if "complete (quiet for" in line]
            assert tag(complete) == "node", complete  # completed by the node, which woke both processes
            (made,) = [line for line in lines if "results made ahead in" in line]
            (took,) = [line for line in lines if "results prepared while the study was quiet" in line]
            assert tag(made) == tag(took) != "node", (made, took)
    finally:
        pacs.stop()


def test_a_job_whose_worker_process_is_killed_is_run_again_by_another_and_delivered_once(tmp_path: Path, ct_dir: Path):
    pacs = StoreSCP(tmp_path / "pacs", aet="PACS")
    config = _lung_config(tmp_path, pacs)
    sessions = make_session_factory(make_engine(config["node"]["database_url"]))
    try:
        with NodeProcess(config, tmp_path / "n", cli=True) as node:
            assert node.proc is not None
            wait_for(lambda: len(children(node.proc.pid)) == 2 or None, 60)
            assert storescu(sorted(ct_dir.iterdir())[0], node.port, calling_ae="CTSCANNER").returncode == 0

            def running_job_pid() -> int | None:
                with sessions() as session:
                    owner = session.scalars(select(Job.claimed_by).where(Job.state == JobState.RUNNING)).first()
                return int(owner.split(":")[1]) if owner else None

            victim = wait_for(running_job_pid, 60, step_s=0.02)
            os.kill(victim, signal.SIGKILL)  # in the middle of the job
            results = wait_for(lambda: pacs.received() if len(pacs.received()) >= 2 else None, 180)
            # Run again by the other process (or the restarted one) and delivered once: one SEG and one SR.
            modalities = sorted(str(pydicom.dcmread(p, stop_before_pixels=True).Modality) for p in results)
            assert modalities == ["SEG", "SR"]
            with sessions() as session:
                (job,) = session.scalars(select(Job)).all()
                assert job.state == JobState.DONE and str(victim) not in (job.claimed_by or "")
            assert "requeued" in node.log_text() or job.attempts >= 2
            assert len(pacs.received()) == 2
    finally:
        pacs.stop()


def test_a_node_with_worker_processes_and_a_route_to_an_unknown_model_stops_before_starting_them(tmp_path: Path):
    config = _config(tmp_path, worker_processes=2)
    config["routes"] = [{"name": "ct", "match": {"Modality": "CT"}, "pipeline": "lung-sge", "destinations": []}]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "node.operate.cli", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)  # fmt: skip
    assert done.returncode == 2
    assert "lung-sge" in done.stderr and "did you mean 'lung-seg'" in done.stderr
    assert "worker process" not in done.stderr
