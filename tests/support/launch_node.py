"""Start a node with a pipeline runner defined in tests (``python -m tests.support.launch_node CONFIG``)."""

from __future__ import annotations

import os
import signal
import sys
import threading

from node.app import NodeApp
from node.config import load_config
from node.operate.logs import exit_after_stop, setup_logging
from tests.support.runners import ThumbnailRunner


def main() -> None:
    config = load_config(sys.argv[1])
    setup_logging(config.node.log_level)
    lease_s = float(sys.argv[2]) if len(sys.argv) > 2 else 120.0
    # A campaign that kills the whole node again and again may stop one job more often than a node would.
    attempts = int(os.environ.get("AINODE_TEST_MAX_JOB_ATTEMPTS", "3"))
    app = NodeApp(
        config, runner=ThumbnailRunner(), job_lease_s=lease_s, max_job_attempts=attempts, assembler_poll_s=0.2
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    app.start()
    print("NODE READY", flush=True)
    stop.wait()
    app.stop()
    exit_after_stop(0)


if __name__ == "__main__":
    main()
