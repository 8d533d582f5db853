"""Below the disk watermark the node refuses instances before the disk is full, and says so (issue 12, item 9).

The watermark is set above the free space this machine has, so the test needs no full disk: what the node
does with each C-STORE and what ``ainode status`` shows are what an administrator relies on.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from tests.support.cli import ainode
from tests.support.nodeproc import NodeProcess, node_section
from tests.support.peers import storescu

pytestmark = pytest.mark.dcmtk


def test_below_the_watermark_c_stores_get_out_of_resources_and_status_says_why(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    above_free_mb = shutil.disk_usage(tmp_path).free // 2**20 + 10_000
    config = {"node": node_section(tmp_path, min_free_disk_mb=above_free_mb), "routes": []}
    with NodeProcess(config, tmp_path / "node") as node:
        sent = storescu(get_testdata_file("CT_small.dcm"), node.port, extra_args=["-v"])
        status = ainode("status", "--config", str(node.config_path))
        log = node.log_text()

    assert sent.returncode != 0
    assert "Refused: OutOfResources" in sent.stdout + sent.stderr  # 0xA700: the sender keeps it and retries
    assert not list((tmp_path / "spool").rglob("*.dcm"))
    assert f"below min_free_disk_mb {above_free_mb}" in log
    assert "spool: REFUSING instances (C-STORE 0xA700): spool free space" in status.stdout


def test_above_the_watermark_status_shows_the_free_space(tmp_path: Path) -> None:
    config = {"node": node_section(tmp_path, min_free_disk_mb=1), "routes": []}
    with NodeProcess(config, tmp_path / "node") as node:
        assert storescu(get_testdata_file("CT_small.dcm"), node.port).returncode == 0
        status = ainode("status", "--config", str(node.config_path))

    assert " MB free (min_free_disk_mb 1)" in status.stdout.splitlines()[0]
