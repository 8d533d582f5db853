"""The node's background loops: one thread calling one step, until stopped.

Every periodic part of the node (assembler, reclaimer, retention, each worker, the job
heartbeat, the outbox) is a :class:`Loop`. Its state is in the database, so a step that
raises is logged and the loop goes on: the next step starts from the database again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable


class Loop:
    """A thread calling ``step`` every ``every_s`` seconds, sooner when woken, until stopped.

    Parameters
    ----------
    name
        The thread's name, and how the log names the loop when a step raises.
    step
        One pass of the loop's work.
    every_s
        Seconds to wait after a step before the next one (a :meth:`wake` ends the wait).
    again_while_busy
        When the step returns a true value (it found work: a worker ran a job), step again at
        once instead of waiting: a queue of work is drained without a pause between items.
    log
        Where an unexpected error of a step is logged (the loop's owner's logger).
    due_in
        After a step: seconds until something the loop waits for is due (a study's quiet period ends),
        or None; the loop then waits that long if it is shorter than ``every_s`` (at least 10 ms).
    """

    def __init__(
        self,
        name: str,
        step: Callable[[], object],
        every_s: float,
        *,
        again_while_busy: bool = False,
        log: logging.Logger | None = None,
        due_in: Callable[[], float | None] | None = None,
    ) -> None:
        self.due_in = due_in
        self.name = name
        self.step = step
        self.every_s = every_s
        self.again_while_busy = again_while_busy
        self.log = log or logging.getLogger("ainode")
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def died(self) -> bool:
        """The loop's thread ended although no one asked it to stop (only a BaseException ends it)."""
        return self._thread.ident is not None and not self._thread.is_alive() and not self._stop.is_set()

    def restart(self) -> None:
        """A new thread for a loop that died (see :attr:`died`)."""
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Step now rather than at the end of the wait (new work arrived)."""
        self._wake.set()

    def request_stop(self) -> None:
        """Ask the loop to end after its current step, without waiting for it (see :meth:`join`)."""
        self._stop.set()
        self._wake.set()

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)

    def stop(self, timeout_s: float = 10) -> None:
        self.request_stop()
        self.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            failed = False
            try:
                busy = self.step()
            except Exception:
                self.log.exception("%s: unexpected error; continuing", self.name)
                busy, failed = False, True
            if busy and self.again_while_busy:
                continue
            wait_s = self.every_s
            # After a failed step (the database away), the full wait: what is due is not known.
            due_s = self.due_in() if self.due_in is not None and not failed else None
            if due_s is not None:
                wait_s = min(wait_s, max(0.01, due_s))
            self._wake.wait(wait_s)
            self._wake.clear()
