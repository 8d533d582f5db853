"""Benchmark (issue 13): a STAT study sent behind ten routine CT studies, one worker.

    python3 tests/bench/stat_priority.py [--routine 10] [--job-delay 2]

Ten routine CT studies (pydicom's CT test image, each with its own UIDs) are sent by DCMTK storescu to a
node with one worker whose test pipeline takes ``--job-delay`` seconds per job, then one study from the
emergency department's scanner (``StationName`` ED-CT), which a route with ``priority: 10`` takes.
Results go to a real Orthanc. Prints the position at which the STAT job started, how many routine jobs
it overtook, and the time from the STAT study's last instance acknowledged to its result acknowledged by
Orthanc, against the same time to the last routine result (ratio). Asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, when run as a script

from tests.support.peers import OrthancServer  # noqa: E402
from tests.support.stat_priority import run_stat_behind_routine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routine", type=int, default=10)
    parser.add_argument("--job-delay", type=float, default=2.0, help="seconds each job of the test pipeline takes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="stat-priority-") as tmp, OrthancServer(Path(tmp) / "orthanc") as orthanc:
        run = run_stat_behind_routine(Path(tmp), orthanc, routine=args.routine, job_delay_s=args.job_delay)
    total = len(run.routine) + 1
    print(f"{args.routine} routine CT studies, then 1 STAT; 1 worker, {args.job_delay:g} s per job")
    print(
        f"STAT job started {run.start_position} of {total} "
        f"({run.started_before_stat_queued} routine job(s) already started when it was queued, "
        f"{len(run.overtaken)} still queued and overtaken)"
    )
    arrivals = run.arrival_order
    print(f"STAT result arrived at the PACS {arrivals.index(run.stat.study_uid) + 1} of {len(arrivals)}")
    ratio = run.stat_result_s / run.last_routine_result_s
    print(
        f"STAT last instance -> its result: {run.stat_result_s:.1f} s; -> last routine result: "
        f"{run.last_routine_result_s:.1f} s; ratio {ratio:.2f}"
    )


if __name__ == "__main__":
    main()
