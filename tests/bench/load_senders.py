"""Load: several scanners send 300-slice CTs of different patients at once (issue 12 "Done when").

    python3 tests/bench/load_senders.py [--senders 8] [--slices 300]

Each study is made from the real TCIA A0002 CT (CC BY 4.0, as in bench_ingest.py) for a patient of its
own. DCMTK storescu sends them all at the same time to ``ainode serve`` (lung-seg route, SEG and SR to a
real Orthanc). Prints: instances acknowledged and refused, jobs failed, results that arrived, results
whose patient or study is not their source's (mix-ups), the time from the last instance to the last
result, and the node's resident memory (after a warm-up study, and its peak). Asserts nothing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, when run as a script

import pydicom  # noqa: E402

from tests.bench.bench_ingest import STORESCU, make_study, peak_rss_mb  # noqa: E402
from tests.support.nodeproc import NodeProcess  # noqa: E402
from tests.support.peers import OrthancServer, free_port  # noqa: E402


def study_of_patient(folder: Path, slices: int, patient: str) -> tuple[str, Path]:
    study = make_study(folder, slices)
    for path in study.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.PatientID, ds.PatientName = patient, f"Load^{patient}"
        ds.save_as(path)
    uid = str(pydicom.dcmread(next(study.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
    return uid, study


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pss_mb(pid: int) -> float:
    """The proportional set size of ``pid``: its private memory plus its share of what it shares (libraries, forks).

    Summed over several processes it counts shared pages once, which resident sizes would count in each.
    """
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def send_at_once(
    port: int, studies: dict[str, tuple[str, Path]], calling_prefix: str = "SENDER"
) -> tuple[float, float, int]:
    """One DCMTK storescu per study, all at once, calling as ``<prefix><k>``; returns (first instance sent,
    last instance acknowledged, failed senders)."""
    started = time.time()
    senders = [
        subprocess.Popen([STORESCU, "-aet", f"{calling_prefix}{k}", "-aec", "AINODE", "+sd", "127.0.0.1", str(port),
                          str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for k, (_, folder) in enumerate(studies.values())
    ]  # fmt: skip
    failed = sum(p.wait() != 0 for p in senders)
    return started, time.time(), failed


def remove_work(work: Path) -> Path:
    """Remove a benchmark's folder (several GB of studies, spool and results), keeping its logs; returns where."""
    logs = work.with_name(f"{work.name}-logs")
    for log in work.rglob("*.log"):
        target = logs / log.relative_to(work)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(log, target)
    shutil.rmtree(work, ignore_errors=True)
    return logs


class RssSampler:
    """The resident memory of process ``pid``, sampled every ``every_s`` in a thread until :meth:`stop`.

    ``measure``: :func:`rss_mb` (default) or :func:`pss_mb`, for processes whose sum is wanted.
    """

    def __init__(self, pid: int, every_s: float = 0.5, measure: Callable[[int], float] | None = None) -> None:
        self.pid, self.every_s = pid, every_s
        self.measure = measure or rss_mb
        self.samples: list[float] = []
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.measure(self.pid))
            time.sleep(self.every_s)

    def stop(self) -> None:
        self._stop.set()


def results_of(orthanc: OrthancServer, study_uid: str) -> list[pydicom.Dataset]:
    found = []
    for modality in ("SEG", "SR"):
        for series in orthanc.rest(
            "/tools/find", {"Level": "Series", "Query": {"StudyInstanceUID": study_uid, "Modality": modality}}
        ):
            for instance in orthanc.rest(f"/series/{series}/instances"):
                found.append(orthanc.instance_dataset(instance["ID"]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--slices", type=int, default=300)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ainode-load-"))
    studies = {f"LOAD-{k:02d}": study_of_patient(work / f"study-{k}", args.slices, f"LOAD-{k:02d}")
               for k in range(args.senders)}  # fmt: skip
    orthanc = OrthancServer(work / "orthanc").start()
    config = {
        "node": {"port": free_port(), "host": "127.0.0.1", "spool_dir": str(work / "spool"),
                 "database_url": f"sqlite:///{work}/node.db", "workers": 2, "log_level": "WARNING"},
        "peers": {"pacs": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port,
                           "outputs": ["seg", "sr"]}},
        "routes": [{"name": "ct-lungs", "match": {"Modality": "CT"}, "pipeline": "lung-seg",
                    "destinations": ["pacs"], "stable_after_s": 2}],
    }  # fmt: skip
    try:
        with NodeProcess(config, work / "node", cli=True) as node:
            assert node.proc is not None
            warm_uid, warm = study_of_patient(work / "warm-up", 30, "WARM")
            subprocess.run([STORESCU, "-aec", "AINODE", "+sd", "127.0.0.1", str(node.port), str(warm)], check=True,
                           capture_output=True)  # fmt: skip
            while len(results_of(orthanc, warm_uid)) < 2:
                time.sleep(0.5)
            rss_warm = rss_mb(node.proc.pid)
            sampler = RssSampler(node.proc.pid)
            started, last_instance, failed_senders = send_at_once(node.port, studies, calling_prefix="CT")
            arrived: dict[str, float] = {}
            deadline = time.time() + 900
            while len(arrived) < len(studies) and time.time() < deadline:
                for patient, (uid, _) in studies.items():
                    if patient not in arrived and len(results_of(orthanc, uid)) >= 2:
                        arrived[patient] = time.time()
                time.sleep(0.5)
            sampler.stop()
            peak = peak_rss_mb(node.proc.pid)
            mixups = 0
            for patient, (uid, _) in studies.items():
                for ds in results_of(orthanc, uid):
                    mixups += ds.PatientID != patient or ds.StudyInstanceUID != uid
            import sqlite3

            with sqlite3.connect(work / "node.db") as con:
                jobs = dict(con.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
                stored = con.execute("SELECT count(*) FROM instances").fetchone()[0]
    finally:
        orthanc.stop()
        logs = remove_work(work)
    print(f"{args.senders} senders x {args.slices} slices, different patients, at once (logs in {logs}):")
    print(f"  instances kept {stored - 30} of {args.senders * args.slices}; senders failed {failed_senders}")
    print(f"  jobs by state {jobs}; studies with SEG+SR in Orthanc {len(arrived)} of {len(studies)}; mix-ups {mixups}")
    print(f"  all instances received in {last_instance - started:.1f} s; last result "
          f"{max(arrived.values(), default=float('nan')) - last_instance:.1f} s after the last instance")  # fmt: skip
    print(f"  node memory: {rss_warm:.0f} MB after a warm-up study, peak {peak:.0f} MB, "
          f"last sample {sampler.samples[-1] if sampler.samples else float('nan'):.0f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
