"""A node is never left without workers (issue 12, item 2): a worker thread that dies is started again."""

from __future__ import annotations

import logging
import threading

import pytest

from node.work.worker import WorkerPool
from tests.support.node_parts import STABLE_AFTER_S, NodeParts, ct_study


class Dies(BaseException):
    """What ends a thread (Exception is caught by the loop and logged; a BaseException is not)."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death is the point
def test_a_worker_thread_that_dies_is_restarted_and_the_next_job_is_done(
    node: NodeParts, caplog: pytest.LogCaptureFixture
) -> None:
    worker = node.worker()
    real_run_once = worker.run_once
    died = threading.Event()

    def run_once_that_dies() -> bool:
        if not died.is_set():
            died.set()
            raise Dies()
        return real_run_once()

    worker.run_once = run_once_that_dies  # type: ignore[method-assign]
    pool = WorkerPool([worker], node.sessions, heartbeat_s=0.1)  # the heartbeat loop also watches the workers
    with caplog.at_level(logging.ERROR, logger="ainode.worker"):
        pool.start()
        try:
            assert died.wait(10)
            node.receive(ct_study())
            assert node.assembler.tick(now=node.clock.advance(STABLE_AFTER_S + 1))
            for _ in range(200):
                pool.wake()
                if node.jobs()[0].state.value == "done":
                    break
                threading.Event().wait(0.1)
            assert node.jobs()[0].state.value == "done", "no worker took the job after the only one died"
        finally:
            pool.stop(10)
    assert "stopped unexpectedly; started again" in caplog.text
