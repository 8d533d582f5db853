"""The operator's commands (``python -m node.operate.cli``), run as a subprocess the way an administrator runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.support import REPO
from tests.support.nodeproc import NodeProcess


def ainode(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.operate.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        timeout=120,
    )


def write_config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "ainode.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def status(node: NodeProcess) -> dict[str, Any]:
    """``ainode status --json`` of a running node, read from its database as an operator would."""
    out = subprocess.run(
        [sys.executable, "-m", "node.operate.cli", "status", "--json", "--config", str(node.config_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=node.env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)
