"""Benchmark (issue 4): time to result, from storescu's last instance to SEG and SR stored in Orthanc.

    python3 tests/bench/bench_time_to_result.py [--slices 300] [--stable-after 2] [--rounds 2] [--stream on|off]
        [--no-first-study] [--worker-processes auto|N]

A 300-slice 512 x 512 CT (made from the real TCIA A0002 CT, CC BY 4.0, as in bench_ingest.py) is
sent by DCMTK storescu to ``ainode serve`` (lung-seg route, results to a real Orthanc; after a 30-slice
warm-up study), twice per round: once by a scanner that is waited for (the study is complete when quiet for
``stable_after_s``) and once by a sender marked ``complete_on_release`` (a PACS "send to AI").
The time from storescu's exit (its last instance acknowledged) until both the SEG and the SR are
listed by Orthanc is split into

- stability wait: the node's last reception until the job was created (the assembler's quiet period),
- model: the ONNX pipeline (preprocessing + inference + postprocessing, ``jobs.model_s``),
- the rest: everything else — job pickup, reading the series from the spool, series selection,
  writing SEG/SR, the outbox and the C-STOREs to Orthanc. Target: under 3 s.

A scanner's study whose results were made ahead while it was quiet (its job took them) has no model
time in its job: the line says "made ahead while quiet" with the steps done before the wait ended, and
the summary gives the time after the stability wait for each kind of sender.

First the node's first study after its start is timed for each kind of sender (a fresh node, no
warm-up: its first inference, first results built), then ``--rounds`` warm rounds; the summary line is
of the warm rounds.

``--stream off`` turns ``runtime.stream_inference`` off: the model then starts only when the study is
complete (on: slices are analysed while they arrive, and the model time left is that of the slices it
did not reach). Prints times; asserts nothing (these machines are noisy).
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, when run as a script

import pydicom  # noqa: E402

from tests.bench.bench_ingest import STORESCU, make_study  # noqa: E402
from tests.support.nodeproc import NodeProcess  # noqa: E402
from tests.support.peers import OrthancServer, free_port  # noqa: E402


def arrival_watch(orthanc: OrthancServer, study_uid: str, found: dict[str, float], stop: threading.Event) -> None:
    """Record the wall-clock time at which Orthanc first lists a SEG and an SR of ``study_uid``."""
    while not stop.is_set() and len(found) < 2:
        for modality in ("SEG", "SR"):
            if modality not in found and orthanc.rest(
                "/tools/find", {"Level": "Series", "Query": {"StudyInstanceUID": study_uid, "Modality": modality}}
            ):
                found[modality] = time.time()
        time.sleep(0.05)


def _epoch(value: str | None) -> float:
    if value is None:
        return float("nan")
    stamp = datetime.fromisoformat(value)
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()


def db_times(db: Path, study_uid: str) -> dict[str, float]:
    with sqlite3.connect(db) as con:
        last_received = con.execute(
            "SELECT last_received_at FROM studies WHERE study_instance_uid = ?", (study_uid,)
        ).fetchone()[0]
        created, started, finished, model_s, total_s = con.execute(
            "SELECT j.created_at, j.started_at, j.finished_at, j.model_s, j.total_s FROM jobs j "
            "JOIN studies s ON s.id = j.study_id WHERE s.study_instance_uid = ? ORDER BY j.id DESC",
            (study_uid,),
        ).fetchone()
        delivered = con.execute(
            "SELECT max(d.delivered_at) FROM deliveries d JOIN results r ON r.id = d.result_id "
            "JOIN jobs j ON j.id = r.job_id JOIN studies s ON s.id = j.study_id WHERE s.study_instance_uid = ?",
            (study_uid,),
        ).fetchone()[0]
    return {
        "last_received": _epoch(last_received),
        "job_created": _epoch(created),
        "job_started": _epoch(started),
        "job_finished": _epoch(finished),
        "delivered": _epoch(delivered),
        "model_s": float(model_s),
        "job_total_s": float(total_s),
    }


def one_run(
    work: Path,
    orthanc: OrthancServer,
    slices: int,
    stable_after_s: float,
    on_release: bool,
    stream: bool = True,
    warm_up: bool = True,
    worker_processes: int | str = "auto",
) -> dict:
    study = make_study(work / "study", slices)
    study_uid = pydicom.dcmread(next(study.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
    port = free_port()
    config = {
        "node": {
            "port": port,
            "host": "127.0.0.1",
            "spool_dir": str(work / "spool"),
            "database_url": f"sqlite:///{work}/node.db",
            "workers": 1,
            "worker_processes": worker_processes,
            "log_level": "INFO",  # the job's line gives its steps (read, volume, model, write, store)
        },
        "peers": {
            "pacs": {
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
                "outputs": ["seg", "sr"],
            },
            "scanner": {"ae_title": "SCANNER", "host": "127.0.0.1", "port": 1, "complete_on_release": on_release},
        },
        "routes": [
            {
                "name": "ct-lungs",
                "match": {"Modality": "CT"},
                "pipeline": "lung-seg",
                "destinations": ["pacs"],
                "stable_after_s": stable_after_s,
            }
        ],  # fmt: skip
        "runtime": {"stream_inference": stream},
    }
    with NodeProcess(config, work / "node", cli=True) as node:
        if warm_up:
            # A node in service has processed studies before: one small study first, so that one-time costs
            # (highdicom's tables, first allocations) are not counted against the timed one.
            warm = make_study(work / "warm-up", 30)
            warm_uid = pydicom.dcmread(next(warm.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
            subprocess.run([STORESCU, "-aet", "SCANNER", "-aec", "AINODE", "+sd", "127.0.0.1", str(node.port),
                            str(warm)], capture_output=True, check=True)  # fmt: skip
            warmed: dict[str, float] = {}
            arrival_watch(orthanc, warm_uid, warmed, threading.Event())
        found: dict[str, float] = {}
        stop = threading.Event()
        watcher = threading.Thread(target=arrival_watch, args=(orthanc, study_uid, found, stop), daemon=True)
        watcher.start()
        sent = subprocess.run(
            [STORESCU, "-aet", "SCANNER", "-aec", "AINODE", "+sd", "127.0.0.1", str(node.port), str(study)],
            capture_output=True,
            text=True,
        )
        t_sent = time.time()
        if sent.returncode != 0:
            raise RuntimeError(sent.stderr[-500:])
        watcher.join(600)
        stop.set()
        if len(found) < 2:
            raise RuntimeError(f"results did not arrive: {found}\n{node.log_text()[-2000:]}")
        times = db_times(work / "node.db", study_uid)
        lines = [line for line in node.log_text().splitlines() if study_uid in line]
        steps = [line.split("done in", 1)[1].strip() for line in lines if "done in" in line]
        # A job that took the results made ahead while the study was quiet: its model ran before the wait ended.
        ahead = [line.split("quiet (", 1)[1].split(")", 1)[0] for line in lines
                 if "results prepared while the study was quiet (" in line]  # fmt: skip
    t_arrived = max(found.values())
    total = t_arrived - t_sent
    stability = max(0.0, times["job_created"] - times["last_received"])
    model = 0.0 if ahead else times["model_s"]
    return {
        "ahead": ahead[-1] if ahead else None,
        "mode": "complete on release" if on_release else f"quiet for {stable_after_s:g} s",
        "total": total,
        "stability": stability,
        "model": model,
        "rest": total - stability - model,
        "pickup": times["job_started"] - times["job_created"],
        "job_other": times["job_total_s"] - model,
        "deliver": t_arrived - times["job_finished"],
        "steps": steps[-1] if steps else "?",
    }


def _processes(value: str) -> int | str:
    return value if value == "auto" else int(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--stable-after", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stream", choices=("on", "off"), default="on", help="runtime.stream_inference")
    parser.add_argument(
        "--first-study",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="first time each sender's study as the node's first after its start (no warm-up)",
    )
    parser.add_argument("--worker-processes", type=_processes, default="auto",
                        help="node.worker_processes: auto (the default), 0 (jobs in the node) or a number")  # fmt: skip
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ttr-") as tmp, OrthancServer(Path(tmp) / "orthanc") as orthanc:
        # Round 0: the node's first study after its start (no warm-up); then the warm rounds.
        for r in range(0 if args.first_study else 1, args.rounds + 1):
            for on_release in (False, True):
                work = Path(tmp) / f"r{r}-{int(on_release)}"
                first_study = r == 0
                row = one_run(work, orthanc, args.slices, args.stable_after, on_release, args.stream == "on",
                              not first_study, args.worker_processes)  # fmt: skip
                orthanc.clear()
                if r > 0:
                    rows.append(row)
                label = f"round {r}" if r else "first study"
                ahead = f"; made ahead while quiet ({row['ahead']})" if row["ahead"] else ""
                print(
                    f"{label} {row['mode']:>20}: total {row['total']:6.2f} s = stability {row['stability']:5.2f}"
                    f" + model {row['model']:5.2f} + rest {row['rest']:5.2f}  (rest: pickup {row['pickup']:.2f},"
                    f" load/select/write {row['job_other']:.2f}, deliver {row['deliver']:.2f}); job {row['steps']}"
                    f"{ahead}",
                    flush=True,
                )
    print(f"\n{args.slices}-slice CT, lung-seg, stream_inference {args.stream}, SEG+SR to Orthanc, warm rounds:")
    for mode in dict.fromkeys(row["mode"] for row in rows):
        mine = [row for row in rows if row["mode"] == mode]
        after = [row["total"] - row["stability"] for row in mine]
        print(
            f"  {mode:>20}: total {min(r['total'] for r in mine):.2f}-{max(r['total'] for r in mine):.2f} s;"
            f" after the stability wait {min(after):.2f}-{max(after):.2f} s; model in the job"
            f" {min(r['model'] for r in mine):.2f}-{max(r['model'] for r in mine):.2f} s;"
            f" results made ahead in {sum(bool(r['ahead']) for r in mine)} of {len(mine)}"
        )


if __name__ == "__main__":
    main()
