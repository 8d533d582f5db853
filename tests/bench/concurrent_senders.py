"""Keep pace under load (issue 15): 1, 2 and 4 scanners send 300-slice CTs of different patients at once.

    python3 tests/bench/concurrent_senders.py [--senders 1 2 4] [--slices 300] [--workers 2]

Each study is made from the real TCIA A0002 CT (CC BY 4.0, as in bench_ingest.py) for a patient of its
own. DCMTK storescu sends them all at the same time to ``ainode serve`` (lung-seg route, each sender a
peer with ``complete_on_release``, as a PACS "send to AI"); SEG and SR go to a DCMTK storescp. For each
number of senders it prints: the time from the last instance acknowledged to the last result stored,
that time in job-times (one study's job alone on the warm node, measured in the same run) and in batch
job-times (the same with ``stream_inference`` off: the model starts when the study is complete), studies per
hour, the ratio to the model-only bound (the model alone, on all cores, on the same slices, for as many
studies), mix-ups (a result whose patient or study is not its source's), and the node's memory.
Asserts nothing: the machine is noisy, and the figures are read as ratios within one run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, when run as a script

import pydicom  # noqa: E402

from node.operate.supervise import plan, usable_cpus, usable_memory_bytes  # noqa: E402
from tests.bench.bench_ingest import peak_rss_mb  # noqa: E402
from tests.bench.load_senders import RssSampler, pss_mb, remove_work, send_at_once, study_of_patient  # noqa: E402
from tests.support.nodeproc import NodeProcess  # noqa: E402
from tests.support.peers import StoreSCP, free_port  # noqa: E402


def model_only_s(study: Path) -> float:
    """The lung-seg network alone on ``study``'s slices, on all cores (the bound no node can beat)."""
    from pipelines.runtime import ModelRegistry, bundled_models_dir
    from pipelines.segmentation import infer_labelmap
    from pipelines.volume import load_volume

    model = ModelRegistry(bundled_models_dir()).get("lung-seg")
    volume = load_volume(sorted(study.glob("*.dcm")), min_slices=2)
    infer_labelmap(model, volume)  # warm
    timings: dict[str, float] = {}
    infer_labelmap(model, volume, timings=timings)
    return timings["inference_s"]


_PARSED: dict[Path, pydicom.Dataset] = {}


def results_by_study(pacs: StoreSCP) -> dict[str, list[pydicom.Dataset]]:
    """What the PACS stored, by study (each file read once it is complete)."""
    for path in pacs.received():
        if path in _PARSED:
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            str(ds.StudyInstanceUID), str(ds.PatientID), str(ds.Modality)
        except Exception:  # noqa: BLE001 - a file storescp is still writing
            continue
        _PARSED[path] = ds
    found: dict[str, list[pydicom.Dataset]] = {}
    for ds in _PARSED.values():
        found.setdefault(str(ds.StudyInstanceUID), []).append(ds)
    return found


def children(pid: int, count: int, timeout_s: float = 60) -> list[int]:
    """The pids of the ``count`` worker processes the node ``pid`` started (node.worker_processes)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        if len(found) >= count or time.monotonic() > deadline:
            return [int(p) for p in found]
        time.sleep(0.2)


def wait_for_results(pacs: StoreSCP, studies: dict[str, tuple[str, Path]], timeout_s: float = 900) -> dict:
    arrived: dict[str, float] = {}
    deadline = time.time() + timeout_s
    while len(arrived) < len(studies) and time.time() < deadline:
        found = results_by_study(pacs)
        for patient, (uid, _) in studies.items():
            kinds = {str(ds.Modality) for ds in found.get(uid, [])}
            if patient not in arrived and {"SEG", "SR"} <= kinds:
                arrived[patient] = time.time()
        time.sleep(0.2)
    return arrived


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--senders", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--lanes", type=int, default=None, help="runtime.inference_lanes (default: the node's)")
    parser.add_argument("--stream", choices=["on", "off"], default="on", help="runtime.stream_inference")
    parser.add_argument("--log-level", default="WARNING", help="the node's log level (INFO: slices reused per job)")
    parser.add_argument("--worker-processes", type=lambda v: v if v == "auto" else int(v), default="auto",
                        help="node.worker_processes: auto (the default), 0 (jobs in the node) or a number")  # fmt: skip
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ainode-concurrent-"))
    most = max(args.senders)
    patients = [f"LOAD-{k:02d}" for k in range(most)]
    pacs = StoreSCP(work / "pacs", aet="PACS")
    peers = {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port, "outputs": ["seg", "sr"]}}
    for k in range(most):  # each sender a PACS whose "send to AI" is one whole study per association
        peers[f"sender{k}"] = {"ae_title": f"SENDER{k}", "host": "127.0.0.1", "port": 1, "complete_on_release": True}
    config = {
        "node": {"port": free_port(), "host": "127.0.0.1", "spool_dir": str(work / "spool"),
                 "database_url": f"sqlite:///{work}/node.db", "workers": args.workers, "log_level": args.log_level},
        "runtime": {"inference_lanes": args.lanes, "stream_inference": args.stream == "on"},
        "peers": peers,
        "routes": [{"name": "ct-lungs", "match": {"Modality": "CT"}, "pipeline": "lung-seg",
                    "destinations": ["pacs"], "stable_after_s": 30}],
    }  # fmt: skip
    rows = []
    try:
        bound_one = model_only_s(study_of_patient(work / "bound", args.slices, "BOUND")[1])
        # The job-time of issue 15's goal: one study alone, analysed when complete (streaming off), as before it.
        batch_config = {**config, "node": {**config["node"], "port": free_port(), "spool_dir": str(work / "spool-b"),
                                           "database_url": f"sqlite:///{work}/batch.db"},
                        "runtime": {**config["runtime"], "stream_inference": False}}  # fmt: skip
        with NodeProcess(batch_config, work / "node-batch", cli=True) as batch_node:
            for name in ("WARMB", "WARMB"):
                uid, folder = study_of_patient(work / f"warmb-{time.time_ns()}", args.slices, name)
                _, last, _ = send_at_once(batch_node.port, {name: (uid, folder)})
                batch_job_time = wait_for_results(pacs, {name: (uid, folder)})[name] - last
        config["node"]["worker_processes"] = args.worker_processes
        with NodeProcess(config, work / "node", cli=True) as node:
            assert node.proc is not None
            processes = args.worker_processes
            if processes == "auto":  # as the node chooses it on this machine (node/operate/supervise.py)
                processes = plan("auto", args.workers, cpus=usable_cpus(), memory_bytes=usable_memory_bytes(),
                                 providers=["CPUExecutionProvider"]).processes  # fmt: skip
            pids = [node.proc.pid, *children(node.proc.pid, processes)]
            # Warm-up, then one study alone: the job-time the goal is counted in.
            for name in ("WARM", "WARM"):
                uid, folder = study_of_patient(work / f"warm-{time.time_ns()}", args.slices, name)
                _, last, _ = send_at_once(node.port, {name: (uid, folder)})
                arrived = wait_for_results(pacs, {name: (uid, folder)})
                job_time = arrived[name] - last
            samplers = [RssSampler(pid, measure=pss_mb if len(pids) > 1 else None) for pid in pids]
            for n in args.senders:
                studies = {f"{p}-{n}": study_of_patient(work / f"s{n}-{p}", args.slices, f"{p}-{n}")
                           for p in patients[:n]}  # fmt: skip
                for sampler in samplers:
                    sampler.samples.clear()
                first, last, failed = send_at_once(node.port, studies)
                arrived = wait_for_results(pacs, studies)
                if len(samplers) > 1:
                    print(f"{n} senders: peak MB per process (the node first):",
                          [round(max(x.samples, default=0)) for x in samplers], flush=True)  # fmt: skip
                found = results_by_study(pacs)
                mixups = sum(ds.PatientID != patient or ds.StudyInstanceUID != uid
                             for patient, (uid, _) in studies.items() for ds in found.get(uid, []))  # fmt: skip
                end = max(arrived.values(), default=float("nan"))
                rows.append({
                    "senders": n, "failed": failed, "arrived": len(arrived), "mixups": mixups,
                    "received_s": last - first, "after_last_s": end - last,
                    "per_hour": 3600 * len(arrived) / (end - first), "bound_s": n * bound_one,
                    "peak_mb": max(map(sum, zip(*(x.samples for x in samplers), strict=False)), default=float("nan")),
                })  # fmt: skip
            for sampler in samplers:
                sampler.stop()
            peak = sum(peak_rss_mb(pid) for pid in pids)
    finally:
        pacs.stop()
        logs = remove_work(work)
    print(f"{args.slices}-slice CTs, {args.workers} workers, this machine's cores; model alone (all cores) "
          f"{bound_one:.2f} s per study; one study alone on the warm node: last result {job_time:.2f} s after "
          f"its last instance (one job-time); the same analysed only when complete (stream off, the batch "
          f"job-time): {batch_job_time:.2f} s")  # fmt: skip
    print(
        "senders | received in | last result after last instance | in job-times | in batch job-times | "
        "studies/h | model-only bound (s) | (after last)/bound | mix-ups | peak MB (RSS; PSS summed over processes)"
    )
    for r in rows:
        print(f"{r['senders']:7d} | {r['received_s']:9.1f} s | {r['after_last_s']:29.1f} s | "
              f"{r['after_last_s'] / job_time:12.2f} | {r['after_last_s'] / batch_job_time:18.2f} | "
              f"{r['per_hour']:9.0f} | {r['bound_s']:20.2f} | "
              f"{r['after_last_s'] / r['bound_s']:18.2f} | {r['mixups']:7d} | {r['peak_mb']:.0f}"
              + (f"  ({r['failed']} senders failed, {r['arrived']} of {r['senders']} arrived)"
                 if r["failed"] or r["arrived"] < r["senders"] else ""))  # fmt: skip
    print(f"node peak memory (VmHWM, summed over its processes) over the whole run: {peak:.0f} MB; "
          f"node logs in {logs}")  # fmt: skip


if __name__ == "__main__":
    main()
