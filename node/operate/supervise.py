"""Worker processes of one node (``node.worker_processes``): jobs in processes of their own, on one machine.

Jobs are Python work for a large part (reading headers, building SEG and SR with highdicom): threads of one
process take turns at the interpreter lock, and a receiving node also runs its C-STORE handlers in that
process. Measured with four scanners sending at once on 2 cores (``tests/bench/concurrent_senders.py``),
jobs in two worker processes beside a receiving one brought the last result from about 2 to about 1
job-time after the last instance (README, "Several scanners at once").

The node (role all) then receives, assembles and serves the API itself, and starts ``n`` children
``ainode serve --role worker --no-api --no-assembler`` with the same configuration file. It completes the
studies and queues their jobs itself (a child that did would wake only its own workers). It

- restarts a child that exits (after 1 s, doubling up to a minute while it keeps failing),
- wakes them (SIGUSR1) when it has queued a job, so that no job waits for their next poll,
- passes SIGHUP on (certificates reloaded everywhere), and stops them with itself (SIGTERM, then SIGKILL).

A child is also told by the kernel (Linux ``PR_SET_PDEATHSIG``) to stop when the node dies without stopping
it (SIGKILL, a crash): no worker is left behind. Jobs it was running are taken over by the lease mechanism.

``worker_processes: auto`` (the default) chooses (:func:`plan`): on a machine with at least 2 usable cores and 2 GiB
of memory per process, the node's ``workers`` jobs at once run in as many processes (at most one per core), of
one job thread each; otherwise, and for GPU inference (each process would hold a GPU context of its own), in
the node's own threads. Measured on 2 cores with the memory of each process bounded (node/operate/allocator.py),
four scanners' CTs came back within 1.12-1.16 batch job-times at 1.3 GB, against 2.05-2.21 in one process.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger("ainode.supervise")

#: First wait before a child that exited is started again; doubled while it keeps exiting, up to MAX_RESTART_S.
FIRST_RESTART_S = 1.0
MAX_RESTART_S = 60.0
#: A child that ran this long counts as healthy again: its next exit is restarted after FIRST_RESTART_S.
HEALTHY_AFTER_S = 60.0
#: How long stop() waits for the children to finish their jobs before it kills them.
STOP_TIMEOUT_S = 30.0
#: Memory that ``worker_processes: auto`` counts per worker process: a 300-slice CT job's peak was 0.6 GB.
MEMORY_PER_PROCESS = 2 << 30
#: Execution providers that run the models on a GPU: one process's sessions share it.
GPU_PROVIDERS = frozenset({"TensorrtExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider",
                           "MIGraphXExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider"})  # fmt: skip


@dataclass(frozen=True)
class JobProcesses:
    """Where a node of role all runs its jobs (:func:`plan`)."""

    #: Worker processes; 0: the node's own threads.
    processes: int
    #: Job threads of each worker process.
    threads: int
    #: Why, for the log: the setting, and for ``auto`` what it saw.
    why: str


def plan(
    setting: int | Literal["auto"], workers: int, *, cpus: int, memory_bytes: int | None, providers: list[str]
) -> JobProcesses:
    """How many worker processes ``worker_processes: setting`` means on this machine.

    ``auto``: ``workers`` jobs at once, in as many processes of one job thread each (``workers`` // processes
    threads when cores or memory allow fewer processes), when there are at least 2 of them; else 0.
    """
    if setting != "auto":
        return JobProcesses(setting, workers, f"worker_processes: {setting}")
    gpu = sorted(GPU_PROVIDERS.intersection(providers))
    memory = "memory unknown" if memory_bytes is None else f"{memory_bytes / 2**30:.1f} GiB"
    seen = f"{cpus} usable core{'s' if cpus != 1 else ''}, {memory}"
    if gpu:
        return JobProcesses(0, workers, f"worker_processes: auto, models on {gpu[0]}: one process shares it")
    by_memory = workers if memory_bytes is None else memory_bytes // MEMORY_PER_PROCESS
    processes = min(workers, cpus, by_memory)
    if processes < 2:
        return JobProcesses(0, workers, f"worker_processes: auto, {seen}: jobs in this process")
    return JobProcesses(processes, max(1, workers // processes), f"worker_processes: auto, {seen}")


#: Where Linux shows this process's control groups (a container's CPU quota and memory limit).
CGROUP = Path("/sys/fs/cgroup")


def _read(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


def usable_cpus(cgroup: Path = CGROUP) -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup's CPU quota (a container's)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # cgroup v2: "QUOTA PERIOD" or "max PERIOD"; v1: the quota (-1: none) and the period in two files.
    v2 = _read(cgroup / "cpu.max")
    if len(v2) >= 2:
        quota, period = v2[0], v2[1]
    else:
        quota = next(iter(_read(cgroup / "cpu" / "cpu.cfs_quota_us")), "-1")
        period = next(iter(_read(cgroup / "cpu" / "cpu.cfs_period_us")), "0")
    if quota.isdigit() and period.isdigit() and int(period) > 0:
        cpus = min(cpus, max(1, int(quota) // int(period)))
    return max(1, cpus)


def usable_memory_bytes(cgroup: Path = CGROUP) -> int | None:
    """Physical memory, capped by a cgroup's memory limit (a container's); None when it cannot be told."""
    try:
        total: int | None = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = None
    for limit in (_read(cgroup / "memory.max"), _read(cgroup / "memory" / "memory.limit_in_bytes")):  # v2, v1
        if limit and limit[0].isdigit():
            total = int(limit[0]) if total is None else min(total, int(limit[0]))
    return total


def _child_setup() -> None:  # pragma: no cover - runs in the child between fork and exec
    # A wake-up (SIGUSR1) that comes before the child has its handler would end it (the default action):
    # blocked until then (the mask is inherited across exec; serve unblocks it, and a pending one is delivered).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        # PR_SET_PDEATHSIG: SIGTERM when the thread that started it ends (the node's main thread, or the
        # watcher for a restarted child: both live as long as the node).
        libc.prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the child stops when stop() is called only
        pass


class _Child:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.delay_s = FIRST_RESTART_S
        self.due = 0.0  # when it may be started (again)


class WorkerProcesses:
    """``count`` child worker processes of the node whose configuration file is ``config_path``."""

    def __init__(self, config_path: Path, count: int, threads: int | None = None) -> None:
        self.config_path = Path(config_path)
        #: Job threads of each child, when they are not the configuration's ``workers`` (``auto``).
        self.threads = threads
        self._children = [_Child(i + 1) for i in range(count)]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="worker-processes", daemon=True)

    def command(self, index: int) -> list[str]:
        return [sys.executable, "-m", "node.operate.cli", "serve", "--config", str(self.config_path),
                "--role", "worker", "--no-api", "--no-assembler", "--process-tag", f"worker-{index}"]  # fmt: skip

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [c.proc.pid for c in self._children if c.proc is not None and c.proc.poll() is None]

    def start(self) -> None:
        with self._lock:
            for child in self._children:
                self._spawn(child)
        self._thread.start()

    def _spawn(self, child: _Child) -> None:
        # stdout/stderr are the node's: one log, each child's lines tagged with its name.
        env = None if self.threads is None else {**os.environ, "AINODE_NODE__WORKERS": str(self.threads)}
        child.proc = subprocess.Popen(self.command(child.index), env=env, preexec_fn=_child_setup)  # noqa: PLW1509
        child.started = time.monotonic()
        log.info("worker process %d started (pid %d)", child.index, child.proc.pid)

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                if self._stop.is_set():
                    return
                now = time.monotonic()
                for child in self._children:
                    if child.proc is None:
                        if now >= child.due:
                            self._spawn(child)
                        continue
                    code = child.proc.poll()
                    if code is None:
                        continue
                    ran = now - child.started
                    if ran >= HEALTHY_AFTER_S:
                        child.delay_s = FIRST_RESTART_S
                    log.error("worker process %d (pid %d) exited with %s after %.0f s; started again in %.0f s",
                              child.index, child.proc.pid, _describe(code), ran, child.delay_s)  # fmt: skip
                    child.proc, child.due = None, now + child.delay_s
                    child.delay_s = min(MAX_RESTART_S, child.delay_s * 2)

    def _signal(self, signum: int) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:  # exited meanwhile: the watcher restarts it
                pass

    def wake(self) -> None:
        """A job was queued: the children look for it now rather than at their next poll."""
        self._signal(signal.SIGUSR1)

    def reload(self) -> None:
        """SIGHUP, passed on: each child reloads what the node reloads."""
        self._signal(signal.SIGHUP)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop the children (SIGTERM: each finishes or hands back its job); kill those that outlast ``timeout_s``."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        with self._lock:
            procs = [c.proc for c in self._children if c.proc is not None]
            for child in self._children:
                child.proc = None
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker process (pid %d) did not stop within %.0f s: killed", proc.pid, timeout_s)
                proc.kill()
                proc.wait(10)


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"
