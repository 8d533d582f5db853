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
from pathlib import Path

log = logging.getLogger("ainode.supervise")

#: First wait before a child that exited is started again; doubled while it keeps exiting, up to MAX_RESTART_S.
FIRST_RESTART_S = 1.0
MAX_RESTART_S = 60.0
#: A child that ran this long counts as healthy again: its next exit is restarted after FIRST_RESTART_S.
HEALTHY_AFTER_S = 60.0
#: How long stop() waits for the children to finish their jobs before it kills them.
STOP_TIMEOUT_S = 30.0


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

    def __init__(self, config_path: Path, count: int) -> None:
        self.config_path = Path(config_path)
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
        child.proc = subprocess.Popen(self.command(child.index), preexec_fn=_child_setup)  # noqa: PLW1509
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
