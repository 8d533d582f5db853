"""Soak: the kill -9 campaign of tests/test_kill_campaign.py for longer (issue 12, item 8).

    python tests/bench/kill_soak.py [CYCLES] [SEED]

Runs the campaign with CYCLES kills (default 500) and prints what it printed: instances acknowledged,
re-deliveries audited; it fails, naming what, when anything acknowledged is lost, a study's result
reaches Orthanc more or less than once, or a job or delivery is left open.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main() -> int:
    cycles = sys.argv[1] if len(sys.argv) > 1 else "500"
    seed = sys.argv[2] if len(sys.argv) > 2 else "1"
    env = {**os.environ, "AINODE_KILL_CYCLES": cycles, "AINODE_KILL_SEED": seed}
    command = [sys.executable, "-m", "pytest", "-q", "-s", "tests/test_kill_campaign.py"]
    return subprocess.run(command, cwd=REPO, env=env).returncode


if __name__ == "__main__":
    raise SystemExit(main())
