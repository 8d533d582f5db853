"""Benchmark (issue 13): throughput of 1 and 2 worker processes on one PostgreSQL, in studies per minute.

    python3 tests/bench/scale_out.py [--studies 40] [--instances 4] [--delay-s 0 1]
    python3 tests/bench/scale_out.py --pipeline lung-seg --studies 12

The site of ``tests/test_scale_out.py``: two receivers behind HAProxy, worker processes (``role: worker``,
one worker thread each) sharing PostgreSQL and the spool, results to a real Orthanc, the tests'
``thumbnail`` pipeline (one Secondary Capture per study). For each worker count the studies are sent
first, with the workers started but stopped (SIGSTOP), until every job is queued; then the workers go
(SIGCONT) and throughput is N studies over the time from the first job started to the last job finished
(and to the last result delivered), from the database's own timestamps.

``--delay-s`` makes each job wait that long as well (``AINODE_TEST_RUNNER_DELAY_S``): a stand-in for a model
that keeps the worker waiting on a GPU, not the CPU. With 0 the jobs are the node's own work (claim, read
the series, write the SC, deliver), which is CPU-bound: on a machine of 2 cores shared with the receivers,
PostgreSQL and Orthanc, a second worker process cannot double it.

Prints figures; asserts nothing (these machines are noisy).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, when run as a script

from tests.support.data import ct_dir  # noqa: E402
from tests.support.dicom import copy_as_other_patient  # noqa: E402
from tests.support.peers import OrthancServer, PostgresServer  # noqa: E402
from tests.support.scale_out import ScaleOutSite, ct_studies  # noqa: E402


def make_studies(folder: Path, pipeline: str, studies: int, instances: int) -> None:
    if pipeline == "thumbnail":
        ct_studies(folder, studies, instances)
        return
    series = sorted(p for p in ct_dir().iterdir() if p.is_dir())[-1:]  # one real series of 30 512 x 512 slices
    for i in range(studies):
        copy_as_other_patient(series, folder / f"study{i:02d}", f"BENCH{i:02d}", "BENCH^SCALE")


def one_run(work: Path, orthanc: OrthancServer, database_url: str, workers: int, studies: int, instances: int,
            delay_s: float, pipeline: str) -> dict[str, float]:  # fmt: skip
    env = {"AINODE_TEST_RUNNER_DELAY_S": str(delay_s)}
    site = ScaleOutSite(work, orthanc, database_url, worker_env=env, pipeline=pipeline)
    try:
        make_studies(work / "studies", pipeline, studies, instances)
        site.add_receiver()
        site.add_receiver()
        site.start_balancer()
        for _ in range(workers):
            site.add_worker()
        for w in site.workers:
            assert w.proc is not None
            os.kill(w.proc.pid, signal.SIGSTOP)
        sent = site.send(sorted((work / "studies").iterdir()), 4)
        if any(out.returncode for out in sent):
            raise RuntimeError(f"storescu failed: {[out.stderr for out in sent if out.returncode]}")
        _wait(lambda: len([j for j in site.jobs() if j.state == "queued"]) == studies, 300, "every job queued")
        for w in site.workers:
            assert w.proc is not None
            os.kill(w.proc.pid, signal.SIGCONT)
        _wait(lambda: all(j.state == "done" for j in site.jobs()), 1800, "every job done")
        _wait(lambda: _all_delivered(site, studies), 600, "every result delivered")
        started, finished, delivered = site.job_times()
        return {
            "workers": workers,
            "jobs_s": finished - started,
            "delivered_s": delivered - started,
            "per_min": studies / (finished - started) * 60,
            "delivered_per_min": studies / (delivered - started) * 60,
        }
    finally:
        for w in site.workers:  # a stopped process handles no SIGTERM
            if w.proc is not None and w.proc.poll() is None:
                os.kill(w.proc.pid, signal.SIGCONT)
        site.close()


def _all_delivered(site: ScaleOutSite, studies: int) -> bool:
    deliveries = site.deliveries()
    return len({d[0] for d in deliveries}) == studies and all(d[2] == "delivered" for d in deliveries)


def _wait(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s} s")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--instances", type=int, default=4, help="CT images per study (pydicom's CT_small)")
    parser.add_argument("--delay-s", type=float, nargs="+", default=[0.0, 1.0], help="thumbnail only")
    parser.add_argument(
        "--pipeline",
        default="thumbnail",
        help="thumbnail (the tests' runner) or a bundled model, e.g. lung-seg: the real ainode serve on copies of"
        " the real CT (tests/support/data.py), 30 slices of 512 x 512 per study, SEG + SR to Orthanc",
    )
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}; load average before: {os.getloadavg()}")
    rows = []
    if args.pipeline != "thumbnail":
        args.delay_s = [0.0]
    with tempfile.TemporaryDirectory(prefix="scale-out-") as tmp, PostgresServer() as postgres:
        with OrthancServer(Path(tmp) / "orthanc") as orthanc:
            for delay_s in args.delay_s:
                figures = {}
                for workers in (1, 2):
                    url = postgres.create_database(f"bench_{int(delay_s * 1000)}_{workers}")
                    work = Path(tmp) / f"d{delay_s}-w{workers}"
                    figures[workers] = one_run(
                        work, orthanc, url, workers, args.studies, args.instances, delay_s, args.pipeline
                    )
                    f = figures[workers]
                    jobs = f"jobs in {f['jobs_s']:.1f} s = {f['per_min']:.0f} studies/min"
                    delivered = f"delivered in {f['delivered_s']:.1f} s = {f['delivered_per_min']:.0f} studies/min"
                    print(
                        f"{args.pipeline}, delay {delay_s:g} s, {workers} worker process(es), {args.studies} studies:"
                        f" {jobs}; {delivered}",
                        flush=True,
                    )
                ratio = figures[2]["per_min"] / figures[1]["per_min"]
                rows.append((delay_s, figures[1]["per_min"], figures[2]["per_min"], ratio))
    print(f"load average after: {os.getloadavg()}")
    print("\n| job delay (s) | 1 worker (studies/min) | 2 workers (studies/min) | ratio |")
    print("|---|---|---|---|")
    for delay_s, one, two, ratio in rows:
        print(f"| {delay_s:g} | {one:.0f} | {two:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
