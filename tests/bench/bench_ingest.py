"""Ingest benchmark (issue 2): a 300-slice 512x512 CT sent by DCMTK storescu to four receivers.

Receivers, on this machine, in this run, taking turns on fresh copies of the same study:
  - the node (``ainode serve``, role receiver: durable spool writes + database rows),
  - a bare pynetdicom SCP that only writes each dataset to a file (the floor of our stack),
  - DCMTK storescp,
  - Orthanc 1.10.
Then the node's resident memory while it ingests a 2,000-instance study.

Run: ``python3 tests/bench/bench_ingest.py [--rounds 3] [--floor-rounds 6] [--slices 300] [--memory-instances 2000]``.
Prints times and ratios; asserts nothing (these machines are noisy). The study is made from the
real chest CT in ../shared/data/ct-chest-tcia-A0002 (TCIA, CC BY 4.0) by re-using its 30 slices
with new UIDs and positions.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, when run as a script

from tests.support.data import ct_dir  # noqa: E402
from tests.support.nodeproc import NodeProcess, wait_for_echo  # noqa: E402
from tests.support.peers import OrthancServer, free_port  # noqa: E402

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"

BARE_SCP = textwrap.dedent(
    """
    import sys
    from pynetdicom import AE, evt, AllStoragePresentationContexts, ALL_TRANSFER_SYNTAXES
    from pydicom.filewriter import write_file_meta_info
    out, port = sys.argv[1], int(sys.argv[2])
    def handle(event):
        with open(f"{out}/{event.request.AffectedSOPInstanceUID}.dcm", "wb") as f:
            f.write(b"\\x00" * 128 + b"DICM")
            write_file_meta_info(f, event.file_meta)
            f.write(event.request.DataSet.getvalue())
        return 0x0000
    ae = AE(ae_title="BARE")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    from pynetdicom.sop_class import Verification
    ae.add_supported_context(Verification)
    ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, handle)])
    """
)


def make_study(out: Path, slices: int) -> Path:
    """A study of ``slices`` 512x512 CT images built from the real CT's 30 slices."""
    sources = sorted((ct_dir() / "series-3-B40f").glob("*.dcm"))
    datasets = [pydicom.dcmread(p) for p in sources]
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    out.mkdir(parents=True, exist_ok=True)
    z0 = float(datasets[0].ImagePositionPatient[2])
    for i in range(slices):
        ds = datasets[i % len(datasets)]
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], z0 - 1.0 * i]
        ds.save_as(out / f"{i:05d}.dcm")
    return out


def send(study: Path, port: int, called_ae: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(
        [STORESCU, "-aet", "BENCH", "-aec", called_ae, "+sd", "127.0.0.1", str(port), str(study)],
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"storescu to {called_ae} failed: {r.stderr[-500:]}")
    return elapsed


class Receiver:
    name = ""
    ae = ""

    def start(self, work: Path) -> int:  # returns the port
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class NodeReceiver(Receiver):
    name, ae = "dicom-ai-node", "AINODE"

    def start(self, work: Path) -> int:
        port = free_port()
        config = {
            "node": {
                "port": port,
                "role": "receiver",
                "spool_dir": str(work / "spool"),
                "database_url": f"sqlite:///{work}/node.db",
                "log_level": "WARNING",
            },
            "routes": [],
        }
        self.node = NodeProcess(config, work / "proc", cli=True).start()
        return port

    def stop(self) -> None:
        self.node.stop()


class ProcessReceiver(Receiver):
    def __init__(self, name: str, ae: str, cmd) -> None:  # type: ignore[no-untyped-def]
        self.name, self.ae, self.cmd = name, ae, cmd

    def start(self, work: Path) -> int:
        port = free_port()
        (work / "out").mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.cmd(work / "out", port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_echo(port, self.ae, proc=self.proc)
        return port

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class OrthancReceiver(Receiver):
    name, ae = "Orthanc 1.10", "ORTHANC"

    def start(self, work: Path) -> int:
        self.server = OrthancServer(work).start()
        return self.server.dicom_port

    def stop(self) -> None:
        self.server.stop()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_run(base: Path, instances: int) -> tuple[float, float]:
    study = make_study(base / "memory-study", instances)
    node = NodeReceiver()
    port = node.start(base / "memory-node")
    pid = node.node.proc.pid  # type: ignore[union-attr]
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            try:
                rss = Path(f"/proc/{pid}/statm").read_text().split()[1]
                samples.append(int(rss) * os.sysconf("SC_PAGE_SIZE") / 2**20)
            except OSError:
                break

    t = threading.Thread(target=sample)
    t.start()
    elapsed = send(study, port, node.ae)
    stop.set()
    t.join()
    peak = peak_rss_mb(pid)
    node.stop()
    return elapsed, max(peak, max(samples, default=0))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--memory-instances", type=int, default=2000)
    parser.add_argument(
        "--floor-rounds",
        type=int,
        default=6,
        help="extra rounds of only the node and the bare pynetdicom floor, taking turns: the node/floor ratio "
        "is the median of every round's own ratio (one round's noise hits both receivers alike)",
    )
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="ainode-bench-"))
    try:
        study = make_study(base / "study", args.slices)
        size_mb = sum(f.stat().st_size for f in study.iterdir()) / 2**20
        receivers: list[Receiver] = [
            NodeReceiver(),
            ProcessReceiver(
                "bare pynetdicom", "BARE", lambda out, port: [sys.executable, "-c", BARE_SCP, str(out), str(port)]
            ),
            ProcessReceiver(
                "DCMTK storescp",
                "STORESCP",
                lambda out, port: [STORESCP, "-aet", "STORESCP", "-od", str(out), str(port)],
            ),
            OrthancReceiver(),
        ]
        times: dict[str, list[float]] = {r.name: [] for r in receivers}
        floor_pair = receivers[:2]
        schedule = [receivers] * args.rounds + [floor_pair] * args.floor_rounds
        for rnd, taking_turns in enumerate(schedule):
            for r in taking_turns:
                work = base / f"r{rnd}-{r.name.split()[0]}"
                port = r.start(work)
                times[r.name].append(send(study, port, r.ae))
                r.stop()
                shutil.rmtree(work, ignore_errors=True)
        print(
            f"\nIngest of {args.slices} CT instances ({size_mb:.0f} MB) sent by DCMTK storescu, "
            f"median of the rounds taking turns ({args.rounds} of all four, {args.floor_rounds} more of the node "
            "and the floor):"
        )
        med = {k: statistics.median(v) for k, v in times.items()}
        node_t = med["dicom-ai-node"]
        for name, t in med.items():
            runs = ", ".join(f"{x:.2f}" for x in times[name])
            print(f"  {name:<18} {t:7.2f} s   ({runs})   node/this = {node_t / t:.2f}")
        ratios = sorted(n / f for n, f in zip(times["dicom-ai-node"], times["bare pynetdicom"], strict=True))
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        print(
            f"  node vs bare pynetdicom floor: {statistics.median(ratios):.2f}x, the median of {len(ratios)} rounds' "
            f"own ratios (quartiles {quartiles[0]:.2f}-{quartiles[2]:.2f}; target <= 1.3x)"
        )
        print(f"  DCMTK storescp vs node: {med['DCMTK storescp'] / node_t:.2f}x slower than the node")
        print(f"  Orthanc vs node:        {med['Orthanc 1.10'] / node_t:.2f}x slower than the node")
        if args.memory_instances:
            elapsed, peak = memory_run(base, args.memory_instances)
            print(
                f"\nNode ingesting {args.memory_instances} instances: {elapsed:.1f} s, peak RSS {peak:.0f} MB "
                "(target < 300 MB)"
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
