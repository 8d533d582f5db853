"""A node running in its own process, started by a test, that the test can kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.support import REPO
from tests.support.peers import OrthancServer, free_port


def node_section(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """The ``node`` section of a test node: AE AINODE on a free loopback port, spool and SQLite in ``tmp_path``."""
    return {
        "ae_title": "AINODE",
        "host": "127.0.0.1",
        "port": free_port(),
        "spool_dir": str(tmp_path / "spool"),
        "database_url": f"sqlite:///{tmp_path}/node.db",
        "workers": 1,
        # Jobs in the node's process, as the tests were written for; worker processes are tested on their own
        # (tests/test_worker_processes.py), with the default ``auto`` too.
        "worker_processes": 0,
        **overrides,
    }


def node_config(tmp_path: Path, orthanc: OrthancServer, **overrides: Any) -> dict[str, Any]:
    """A node on a free port, its spool and SQLite database in ``tmp_path``, results (sc) to ``orthanc``.

    One route: CT studies, quiet for 1 s, go to the tests' ``thumbnail`` pipeline. ``overrides``
    update a section (a dict) or replace it.
    """
    config: dict[str, Any] = {
        "node": node_section(tmp_path),
        "peers": {
            "pacs": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port, "outputs": ["sc"]},
        },
        "routes": [
            {
                "name": "ct-test",
                "match": {"Modality": "CT"},
                "pipeline": "thumbnail",
                "destinations": ["pacs"],
                "stable_after_s": 1,
            }
        ],
        "delivery": {"initial_delay_s": 0.5, "factor": 2, "max_delay_s": 2},
    }
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section].update(values)
        else:
            config[section] = values
    return config


def wait_for_echo(
    port: int, ae_title: str = "AINODE", timeout_s: float = 60, proc: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 2
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"node exited with {proc.returncode} before listening")
        assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
        if assoc.is_established:
            assoc.release()
            return
        time.sleep(0.05)
    raise TimeoutError(f"node on port {port} did not answer C-ECHO within {timeout_s} s")


class NodeProcess:
    """``ainode serve``-equivalent subprocess with the tests' pipeline runner.

    Parameters
    ----------
    config
        Config as a dict (written to ``workdir/config.yaml``).
    cli
        Run the real ``ainode serve`` instead of the test launcher (real pipelines).
    """

    def __init__(
        self,
        config: dict[str, Any],
        workdir: Path,
        *,
        env: dict[str, str] | None = None,
        cli: bool = False,
        job_lease_s: float = 120.0,
        preexec_fn: Any = None,
    ) -> None:
        if config.get("node", {}).get("role", "all") == "all":
            config = {**config, "node": {"worker_processes": 0, **config["node"]}}  # as in node_section
        self.config = config
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.cli = cli
        self.job_lease_s = job_lease_s
        self.preexec_fn = preexec_fn
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "node.log"
        self.port = int(config["node"]["port"])
        self.ae_title = config["node"].get("ae_title", "AINODE")

    def start(self, wait: bool = True) -> NodeProcess:
        if self.cli:
            cmd = [sys.executable, "-m", "node.operate.cli", "serve", "--config", str(self.config_path)]
        else:
            cmd = [sys.executable, "-m", "tests.support.launch_node", str(self.config_path), str(self.job_lease_s)]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=self.preexec_fn
        )
        if wait:
            wait_for_echo(self.port, self.ae_title, proc=self.proc)
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
