"""The HTTP API (issue 13): health, readiness, Prometheus metrics and a first /api/v1 with tokens."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydicom.data import get_testdata_file

from node.config import ConfigError, load_config
from tests.support.nodeproc import NodeProcess, node_section
from tests.support.peers import free_port, storescu
from tests.support.waiting import wait_for

VIEWER_TOKEN = "viewer-secret-token"
ADMIN_TOKEN = "admin-secret-token"


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _api_section(port: int) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": port,
        "tokens": [
            {"name": "pacs-admin", "role": "admin", "sha256": _sha256(ADMIN_TOKEN)},
            {"name": "dashboard", "role": "viewer", "sha256": _sha256(VIEWER_TOKEN)},
        ],
    }


def _config(tmp_path: Path, **node: object) -> dict[str, Any]:
    return {
        "node": node_section(tmp_path, **node),
        "routes": [
            {"name": "ct-test", "match": {"Modality": "CT"}, "pipeline": "thumbnail", "stable_after_s": 1},
        ],
        "api": _api_section(free_port()),
    }


class Api:
    def __init__(self, node: NodeProcess) -> None:
        self.node = node
        self.base = f"http://127.0.0.1:{node.config['api']['port']}"
        wait_for(lambda: self._up(), 30, "the HTTP API answering", node)

    def _up(self) -> bool:
        try:
            return requests.get(self.base + "/healthz", timeout=2).ok
        except requests.ConnectionError:
            return False

    def get(self, path: str, token: str | None = None) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.get(self.base + path, headers=headers, timeout=10)

    def post(self, path: str, token: str | None = None) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.post(self.base + path, headers=headers, timeout=10)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Api, NodeProcess, pydicom.Dataset]]:
    """A node with the API that received CT_small.dcm and processed it (its job done)."""
    tmp_path = tmp_path_factory.mktemp("api")
    ct = get_testdata_file("CT_small.dcm")
    with NodeProcess(_config(tmp_path), tmp_path / "n") as node:
        api = Api(node)
        sent = storescu(ct, node.port, calling_ae="CT_SCANNER1")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_for(
            lambda: any(j["state"] == "done" for j in api.get("/api/v1/studies", VIEWER_TOKEN).json()["jobs"]),
            90,
            "the job done",
            node,
        )
        yield api, node, pydicom.dcmread(ct)


# -- no token needed: health, readiness, metrics ---------------------------------------------------
@pytest.mark.dcmtk
def test_healthz_answers_ok_while_the_process_lives(served):
    api, _, _ = served
    r = api.get("/healthz")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})


@pytest.mark.dcmtk
def test_readyz_is_200_with_each_check_on_a_healthy_node(served):
    api, _, _ = served
    r = api.get("/readyz")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ready" and body["failing"] == []
    assert set(body["checks"]) == {"database", "spool", "models", "dicom"}
    assert all(c["ok"] for c in body["checks"].values())


@pytest.mark.dcmtk
def test_metrics_count_what_was_received_in_prometheus_format_without_patient_data(served):
    api, _, ds = served
    r = api.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }
    size = get_testdata_file("CT_small.dcm")
    assert samples[("ainode_received_instances", ())] == 1
    # The spool keeps the instance as received (file meta may differ from the source file by a few bytes).
    assert abs(samples[("ainode_received_bytes", ())] - Path(size).stat().st_size) < 1024
    ended = sum(v for (name, labels), v in samples.items() if name == "ainode_associations")
    assert ended >= 1, r.text
    assert samples[("ainode_associations", (("outcome", "released"),))] >= 1
    assert samples[("ainode_jobs", (("pipeline", "thumbnail"), ("state", "done")))] == 1
    assert samples[("ainode_studies", (("state", "processed"),))] == 1
    assert samples[("ainode_job_duration_seconds_count", (("pipeline", "thumbnail"),))] == 1
    assert ("ainode_job_model_seconds_bucket", (("le", "+Inf"), ("pipeline", "thumbnail"))) in samples
    assert ("ainode_oldest_pending_delivery_age_seconds", ()) in samples
    assert samples[("ainode_spool_free_bytes", ())] > 0
    for identifying in (ds.PatientID, ds.StudyInstanceUID, ds.SOPInstanceUID, "CT_SCANNER1"):
        assert str(identifying) not in r.text


@pytest.mark.dcmtk
def test_openapi_schema_lists_the_endpoints(served):
    api, _, _ = served
    paths = api.get("/openapi.json").json()["paths"]
    assert {"/healthz", "/readyz", "/metrics", "/api/v1/studies", "/api/v1/jobs/{job_id}/retry"} <= set(paths)


# -- /api/v1: tokens ----------------------------------------------------------------------------
@pytest.mark.dcmtk
def test_studies_need_a_valid_token(served):
    api, _, ds = served
    assert api.get("/api/v1/studies").status_code == 401
    assert api.get("/api/v1/studies", "not-a-token").status_code == 401
    r = api.get("/api/v1/studies", VIEWER_TOKEN)
    assert r.status_code == 200
    body = r.json()
    assert [s["study_instance_uid"] for s in body["studies"]] == [ds.StudyInstanceUID]
    assert [(j["pipeline"], j["state"]) for j in body["jobs"]] == [("thumbnail", "done")]


@pytest.mark.dcmtk
def test_retry_is_for_admins_and_queues_the_job_again_audited_with_the_token_name(served):
    api, node, _ = served
    job_id = api.get("/api/v1/studies", VIEWER_TOKEN).json()["jobs"][0]["id"]
    assert api.post(f"/api/v1/jobs/{job_id}/retry").status_code == 401
    assert api.post(f"/api/v1/jobs/{job_id}/retry", VIEWER_TOKEN).status_code == 403
    r = api.post(f"/api/v1/jobs/{job_id}/retry", ADMIN_TOKEN)
    assert r.status_code == 200, r.text
    assert r.json() == {"id": job_id, "state": "queued", "previous": "done"}
    assert api.post("/api/v1/jobs/999999/retry", ADMIN_TOKEN).status_code == 404
    db = node.config["node"]["database_url"].removeprefix("sqlite:///")
    with sqlite3.connect(db) as connection:
        audited = connection.execute(
            "SELECT actor, subject, detail FROM audit_events WHERE kind = 'operator'"
        ).fetchall()
    assert audited == [("pacs-admin", str(job_id), "done")]
    # The job runs again (the same result UIDs) and ends.
    wait_for(
        lambda: (
            [j["attempts"] for j in api.get("/api/v1/studies", VIEWER_TOKEN).json()["jobs"]] == [1]
            and api.get("/api/v1/studies", VIEWER_TOKEN).json()["jobs"][0]["state"] == "done"
        ),
        60,
        "the retried job done",
        node,
    )


# -- readiness fails, naming why -------------------------------------------------------------------
def test_readyz_is_503_naming_the_spool_when_it_is_below_its_watermark(tmp_path):
    config = _config(tmp_path, min_free_disk_mb=2**30)  # a petabyte: more than any test machine has free
    config["routes"] = []
    with NodeProcess(config, tmp_path / "n") as node:
        r = Api(node).get("/readyz")
        assert r.status_code == 503, r.text
        body = r.json()
        assert body["failing"] == ["spool"]
        assert "below min_free_disk_mb" in body["checks"]["spool"]["problem"]


# -- the api section ---------------------------------------------------------------------------
def _load(tmp_path: Path, api: Any) -> Any:
    path = tmp_path / "ainode.yaml"
    path.write_text(yaml.safe_dump({"node": {"port": 11112}, "routes": [], "api": api}))
    return load_config(path, env={})


def test_no_api_section_means_no_http_server(tmp_path):
    assert _load(tmp_path, None).api is None


def test_api_section_is_validated_naming_the_bad_key(tmp_path):
    good = _api_section(8081)
    config = _load(tmp_path, good)
    assert config.api is not None and [t.role for t in config.api.tokens] == ["admin", "viewer"]
    bad_hash = {**good, "tokens": [{"name": "x", "role": "viewer", "sha256": "abc"}]}
    with pytest.raises(ConfigError, match=r"api\.tokens\.0\.sha256: a SHA-256 is 64 hex digits"):
        _load(tmp_path, bad_hash)
    bad_role = {**good, "tokens": [{"name": "x", "role": "root", "sha256": _sha256("t")}]}
    with pytest.raises(ConfigError, match=r"api\.tokens\.0\.role"):
        _load(tmp_path, bad_role)
    with pytest.raises(ConfigError, match=r"api\.port \(11112\) is a DICOM port"):
        _load(tmp_path, {**good, "port": 11112})
    with pytest.raises(ConfigError, match=r"api\.tokens: name must be unique"):
        _load(tmp_path, {**good, "tokens": [good["tokens"][0], {**good["tokens"][1], "name": "pacs-admin"}]})
