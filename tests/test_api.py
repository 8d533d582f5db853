"""The HTTP API (issue 13): health, readiness, Prometheus metrics, and /api/v1 with tokens: what the node holds
(studies, jobs, deliveries, audit, models, routes, peers) and what an admin may do (retry, cancel, reprocess).

Through HTTP against a node process that received a real study from DCMTK ``storescu``."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from node.config import ConfigError, load_config
from tests.support.nodeproc import NodeProcess, node_section
from tests.support.peers import StoreSCP, free_port, storescu
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

    @staticmethod
    def _headers(token: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"} if token else {}

    def get(self, path: str, token: str | None = None, **params: Any) -> requests.Response:
        return requests.get(self.base + path, headers=self._headers(token), params=params, timeout=10)

    def post(self, path: str, token: str | None = None, **kwargs: Any) -> requests.Response:
        return requests.post(self.base + path, headers=self._headers(token), timeout=30, **kwargs)

    def ok(self, path: str, token: str = VIEWER_TOKEN, **params: Any) -> Any:
        r = self.get(path, token, **params)
        assert r.status_code == 200, f"{path}: {r.status_code} {r.text}"
        return r.json()

    def job(self, job_id: int) -> dict[str, Any]:
        return self.ok(f"/api/v1/jobs/{job_id}")


def _copy_with_new_uids(source: str | Path, target: Path) -> pydicom.Dataset:
    """``source`` as another study: new Study, Series and SOP Instance UIDs."""
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(target)
    return ds


@dataclass
class Served:
    api: Api
    node: NodeProcess
    ds: pydicom.Dataset
    pacs: StoreSCP


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A node with the API that received CT_small.dcm and processed it (its job done), results to two peers:
    ``pacs`` (a DCMTK storescp, delivered) and ``down`` (nothing listens there: pending, retried)."""
    tmp_path = tmp_path_factory.mktemp("api")
    ct = get_testdata_file("CT_small.dcm")
    pacs = StoreSCP(tmp_path / "pacs", aet="PACS")
    config = _config(tmp_path)
    config["peers"] = {
        "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port, "outputs": ["sc"]},
        "down": {"ae_title": "DOWN", "host": "127.0.0.1", "port": free_port(), "outputs": ["sc"]},
    }
    config["routes"][0]["destinations"] = ["pacs", "down"]
    config["delivery"] = {"initial_delay_s": 0.5, "factor": 2, "max_delay_s": 2}
    try:
        with NodeProcess(config, tmp_path / "n") as node:
            api = Api(node)
            sent = storescu(ct, node.port, calling_ae="CT_SCANNER1")
            assert sent.returncode == 0, sent.stdout + sent.stderr
            wait_for(
                lambda: api.ok("/api/v1/deliveries", state="delivered")["total"] == 1,
                90,
                "the job done and its result delivered to pacs",
                node,
            )
            yield Served(api, node, pydicom.dcmread(ct), pacs)
    finally:
        pacs.stop()


def _operator_events(node: NodeProcess) -> list[tuple[str, str, str]]:
    db = node.config["node"]["database_url"].removeprefix("sqlite:///")
    with sqlite3.connect(db) as connection:
        return connection.execute(
            "SELECT actor, subject, detail FROM audit_events WHERE kind = 'operator' ORDER BY id"
        ).fetchall()


# -- no token needed: health, readiness, metrics ---------------------------------------------------
@pytest.mark.dcmtk
def test_healthz_answers_ok_while_the_process_lives(served):
    r = served.api.get("/healthz")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})


@pytest.mark.dcmtk
def test_readyz_is_200_with_each_check_on_a_healthy_node(served):
    r = served.api.get("/readyz")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ready" and body["failing"] == []
    assert set(body["checks"]) == {"database", "spool", "models", "dicom"}
    assert all(c["ok"] for c in body["checks"].values())


@pytest.mark.dcmtk
def test_metrics_count_what_was_received_in_prometheus_format_without_patient_data(served):
    api, ds = served.api, served.ds
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


def test_metrics_count_refused_instances_by_reason(served, tmp_path):
    def rejected() -> dict[str, float]:
        families = text_string_to_metric_families(served.api.get("/metrics").text)
        return {s.labels["reason"]: s.value for f in families for s in f.samples
                if s.name == "ainode_rejected_instances_total"}  # fmt: skip

    before = rejected()
    # Pixel Data shorter than Rows x Columns x Samples x Bits Allocated declare: refused 0xA900.
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    path = tmp_path / "truncated.dcm"
    ds.save_as(path, enforce_file_format=True)
    storescu(path, served.node.port, calling_ae="BROKEN_MODALITY")
    after = rejected()
    assert after.get("dataset-mismatch", 0) == before.get("dataset-mismatch", 0) + 1, after
    assert sum(after.values()) == sum(before.values()) + 1


ENDPOINTS = {
    ("get", "/api/v1/whoami"),
    ("get", "/api/v1/status"),
    ("get", "/api/v1/studies"),
    ("get", "/api/v1/studies/{study_instance_uid}"),
    ("post", "/api/v1/studies/{study_instance_uid}/reprocess"),
    ("get", "/api/v1/jobs"),
    ("get", "/api/v1/jobs/{job_id}"),
    ("post", "/api/v1/jobs/{job_id}/retry"),
    ("post", "/api/v1/jobs/{job_id}/cancel"),
    ("get", "/api/v1/deliveries"),
    ("post", "/api/v1/deliveries/{delivery_id}/retry"),
    ("get", "/api/v1/audit"),
    ("get", "/api/v1/associations"),
    ("get", "/api/v1/models"),
    ("get", "/api/v1/routes"),
    ("get", "/api/v1/peers"),
    ("post", "/api/v1/peers/{name}/echo"),
    ("post", "/api/v1/route-test"),
}


@pytest.mark.dcmtk
def test_openapi_schema_lists_every_endpoint_with_a_summary(served):
    paths = served.api.get("/openapi.json").json()["paths"]
    assert {"/healthz", "/readyz", "/metrics"} <= set(paths)
    listed = {(method, path) for path, methods in paths.items() for method in methods if path.startswith("/api/v1")}
    assert listed == ENDPOINTS
    assert all(paths[path][method].get("summary") for method, path in ENDPOINTS)


# -- /api/v1: tokens ----------------------------------------------------------------------------
@pytest.mark.dcmtk
@pytest.mark.parametrize(("method", "path"), sorted(ENDPOINTS))
def test_every_api_endpoint_needs_a_valid_token(served, method, path):
    concrete = path.format(study_instance_uid=served.ds.StudyInstanceUID, job_id=1, delivery_id=1, name="pacs")
    for token in (None, "not-a-token"):
        r = getattr(served.api, method)(concrete, token)
        assert r.status_code == 401, (token, r.text)
        assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.dcmtk
def test_whoami_names_the_token_and_its_role(served):
    assert served.api.ok("/api/v1/whoami", VIEWER_TOKEN) == {"name": "dashboard", "role": "viewer"}
    assert served.api.ok("/api/v1/whoami", ADMIN_TOKEN) == {"name": "pacs-admin", "role": "admin"}


@pytest.mark.dcmtk
def test_status_is_what_ainode_status_json_shows(served):
    body = served.api.ok("/api/v1/status")
    assert set(body) == {"spool", "counts", "studies", "jobs", "deliveries", "rejected_associations"}
    assert [s["study_instance_uid"] for s in body["studies"]] == [served.ds.StudyInstanceUID]
    assert body["counts"]["deliveries"]["delivered"] == 1


# -- studies ----------------------------------------------------------------------------------------
STUDY_KEYS = {
    "id", "study_instance_uid", "state", "version", "instances", "sender", "last_received_at", "note",
    "study_date", "modalities",
}  # fmt: skip


@pytest.mark.dcmtk
def test_studies_list_the_received_study_without_patient_data_for_a_viewer(served):
    ds = served.ds
    body = served.api.ok("/api/v1/studies")
    assert (body["total"], body["limit"], body["offset"]) == (1, 50, 0)
    [study] = body["items"]
    assert set(study) == STUDY_KEYS  # no patient_name, no patient_id: not even as keys
    assert study["study_instance_uid"] == ds.StudyInstanceUID
    assert (study["state"], study["version"], study["instances"], study["sender"]) == ("processed", 1, 1, "CT_SCANNER1")
    assert study["modalities"] == ["CT"]
    assert study["study_date"] == f"{ds.StudyDate[:4]}-{ds.StudyDate[4:6]}-{ds.StudyDate[6:]}"
    assert str(ds.PatientName) not in str(body) and ds.PatientID not in str(body)


@pytest.mark.dcmtk
def test_studies_show_the_patient_to_an_admin(served):
    ds = served.ds
    [study] = served.api.ok("/api/v1/studies", ADMIN_TOKEN)["items"]
    assert set(study) == STUDY_KEYS | {"patient_name", "patient_id"}
    assert (study["patient_name"], study["patient_id"]) == (str(ds.PatientName), ds.PatientID)
    detail = served.api.ok(f"/api/v1/studies/{ds.StudyInstanceUID}", ADMIN_TOKEN)
    assert (detail["patient_name"], detail["patient_id"]) == (str(ds.PatientName), ds.PatientID)


@pytest.mark.dcmtk
def test_studies_filter_by_state_and_time_and_refuse_bad_values(served):
    api = served.api
    assert api.ok("/api/v1/studies", state="processed")["total"] == 1
    assert api.ok("/api/v1/studies", state="receiving") == {"items": [], "total": 0, "limit": 50, "offset": 0}
    assert api.ok("/api/v1/studies", since="2000-01-01T00:00:00Z")["total"] == 1
    assert api.ok("/api/v1/studies", since="2999-01-01T00:00:00")["total"] == 0
    for bad in ({"state": "lost"}, {"since": "yesterday"}, {"limit": 0}, {"limit": 501}, {"offset": -1}):
        assert api.get("/api/v1/studies", VIEWER_TOKEN, **bad).status_code == 422, bad


@pytest.mark.dcmtk
def test_a_study_shows_its_series_route_jobs_results_and_deliveries(served):
    ds = served.ds
    study = served.api.ok(f"/api/v1/studies/{ds.StudyInstanceUID}")
    assert STUDY_KEYS | {"series", "jobs", "results", "deliveries"} == set(study)
    [series] = study["series"]
    assert series["series_instance_uid"] == ds.SeriesInstanceUID
    assert (series["number"], series["modality"], series["instances"]) == (int(ds.SeriesNumber), "CT", 1)
    assert series["description"] == (ds.get("SeriesDescription") or None)
    assert series["route"] == "ct-test" and "Modality CT" in series["route_reason"]
    [job] = study["jobs"]
    assert (job["study_instance_uid"], job["route"], job["pipeline"], job["state"]) == (
        ds.StudyInstanceUID, "ct-test", "thumbnail", "done",
    )  # fmt: skip
    assert job["started_at"] and job["finished_at"] and job["total_s"] is not None and job["priority"] == 0
    [result] = study["results"]
    assert (result["job_id"], result["kind"]) == (job["id"], "sc")
    assert isinstance(result["series_number"], int)
    stored = [pydicom.dcmread(p, stop_before_pixels=True) for p in served.pacs.received()]
    assert [(d.SOPInstanceUID, d.SeriesInstanceUID, d.SeriesNumber) for d in stored] == [
        (result["sop_instance_uid"], result["series_instance_uid"], result["series_number"])
    ]
    by_destination = {d["destination"]: d for d in study["deliveries"]}
    assert set(by_destination) == {"pacs", "down"}
    assert by_destination["pacs"]["state"] == "delivered" and by_destination["pacs"]["delivered_at"]
    assert by_destination["pacs"]["peer"] == f"PACS@127.0.0.1:{served.pacs.port}"
    assert by_destination["down"]["state"] == "pending" and by_destination["down"]["last_error"]
    assert all(d["sop_instance_uid"] == result["sop_instance_uid"] for d in study["deliveries"])


@pytest.mark.dcmtk
def test_an_unknown_study_or_job_is_404(served):
    assert served.api.get("/api/v1/studies/1.2.3.4", VIEWER_TOKEN).status_code == 404
    assert served.api.get("/api/v1/jobs/999999", VIEWER_TOKEN).status_code == 404


# -- jobs, deliveries -----------------------------------------------------------------------------
JOB_KEYS = {
    "id", "study_instance_uid", "version", "route", "pipeline", "state", "reason", "attempts", "priority",
    "created_at", "started_at", "finished_at", "model_s", "total_s", "selection",
}  # fmt: skip
DELIVERY_KEYS = {
    "id", "job_id", "kind", "sop_instance_uid", "destination", "peer", "state", "attempts", "next_attempt_at",
    "last_error", "delivered_at",
}  # fmt: skip


@pytest.mark.dcmtk
def test_jobs_list_and_a_job_with_its_results_and_deliveries(served):
    api = served.api
    body = api.ok("/api/v1/jobs")
    [job] = body["items"]
    assert (body["total"], set(job)) == (1, JOB_KEYS)
    assert api.ok("/api/v1/jobs", state="done")["total"] == 1
    assert api.ok("/api/v1/jobs", state="queued")["total"] == 0
    assert api.get("/api/v1/jobs", VIEWER_TOKEN, state="stuck").status_code == 422
    detail = api.job(job["id"])
    assert set(detail) == JOB_KEYS | {"results", "deliveries"}
    assert [r["kind"] for r in detail["results"]] == ["sc"]
    assert sorted(d["destination"] for d in detail["deliveries"]) == ["down", "pacs"]


@pytest.mark.dcmtk
def test_deliveries_list_the_outbox_filtered_by_state(served):
    api = served.api
    body = api.ok("/api/v1/deliveries")
    assert body["total"] == 2 and all(set(d) == DELIVERY_KEYS for d in body["items"])
    [delivered] = api.ok("/api/v1/deliveries", state="delivered")["items"]
    assert delivered["destination"] == "pacs"
    [pending] = api.ok("/api/v1/deliveries", state="pending")["items"]
    assert pending["destination"] == "down" and pending["attempts"] >= 1 and pending["next_attempt_at"]


# -- audit, associations --------------------------------------------------------------------------
@pytest.mark.dcmtk
def test_audit_and_associations_show_who_called_without_patient_data(served):
    api, ds = served.api, served.ds
    audit = api.ok("/api/v1/audit", limit=500)
    assert audit["total"] == len(audit["items"]) > 0
    assert all(set(e) == {"id", "kind", "actor", "subject", "detail", "at"} for e in audit["items"])
    assert {"association", "job", "delivery"} <= {e["kind"] for e in audit["items"]}
    assert all(e["kind"] == "delivery" for e in api.ok("/api/v1/audit", kind="delivery")["items"])
    associations = api.ok("/api/v1/associations", limit=500)["items"]
    incoming = [a for a in associations if a["calling_ae"] == "CT_SCANNER1"]
    assert [(a["called_ae"], a["host"], a["outcome"], a["stored"]) for a in incoming] == [
        ("AINODE", "127.0.0.1", "released", 1)
    ]
    assert api.ok("/api/v1/associations", outcome="rejected")["items"] == []
    for identifying in (str(ds.PatientName), ds.PatientID, str(ds.PatientName).split("^")[0]):
        assert identifying not in str(audit) and identifying not in str(associations)


@pytest.mark.dcmtk
def test_pages_of_the_audit_trail_follow_each_other(served):
    api = served.api
    everything = api.ok("/api/v1/audit", limit=500)
    assert everything["total"] >= 3
    first, second = (api.ok("/api/v1/audit", limit=2, offset=offset) for offset in (0, 2))
    assert (first["limit"], second["offset"]) == (2, 2)
    assert first["total"] == second["total"] >= everything["total"]
    ids = [e["id"] for e in first["items"] + second["items"]]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 4  # newest first, no row twice
    assert api.ok("/api/v1/audit", offset=everything["total"] + 10)["items"] == []


# -- models, routes, peers --------------------------------------------------------------------------
@pytest.mark.dcmtk
def test_models_are_those_ainode_models_list_shows(served):
    from node.config import Config
    from node.models import registry_from_config
    from pipelines.modelcheck import models_list_rows

    items = served.api.ok("/api/v1/models")["items"]
    listed = models_list_rows(registry_from_config(Config()))
    assert [(m["name"], m["version"], m["task"]) for m in items] == [
        (r["name"], r["version"], r["task"]) for r in listed
    ]
    for m in items:
        assert len(m["sha256"]) == 64 and m["inputs"]["shape"] and m["modalities"] and m["routes"] == []


@pytest.mark.dcmtk
def test_routes_are_the_configured_ones(served):
    assert served.api.ok("/api/v1/routes")["items"] == [
        {
            "name": "ct-test",
            "match": {"Modality": {"equals": "CT"}},
            "pipeline": "thumbnail",
            "destinations": ["pacs", "down"],
            "stable_after_s": 1.0,
            "priority": 0,
        }
    ]


@pytest.mark.dcmtk
def test_peers_are_listed_and_an_admin_can_echo_them(served):
    api = served.api
    peers = {p["name"]: p for p in api.ok("/api/v1/peers")["items"]}
    assert peers["pacs"] == {
        "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": served.pacs.port, "outputs": ["sc"],
        "tls": False, "complete_on_release": False,
    }  # fmt: skip
    assert set(peers) == {"pacs", "down"}
    assert api.post("/api/v1/peers/pacs/echo", VIEWER_TOKEN).status_code == 403
    up = api.post("/api/v1/peers/pacs/echo", ADMIN_TOKEN)
    assert up.status_code == 200, up.text
    assert (up.json()["ok"], up.json()["status"], up.json()["error"]) == (True, 0, None)
    down = api.post("/api/v1/peers/down/echo", ADMIN_TOKEN).json()
    assert (down["ok"], down["status"]) == (False, None) and down["error"]
    assert api.post("/api/v1/peers/nobody/echo", ADMIN_TOKEN).status_code == 404


# -- route test ---------------------------------------------------------------------------------------
@pytest.mark.dcmtk
def test_route_test_says_which_route_an_uploaded_file_takes_and_why(served, tmp_path):
    api = served.api
    with open(get_testdata_file("CT_small.dcm"), "rb") as f:
        r = api.post("/api/v1/route-test", VIEWER_TOKEN, files={"file": ("ct.dcm", f, "application/dicom")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["filename"], body["routed"], body["route"], body["pipeline"]) == (
        "ct.dcm",
        True,
        "ct-test",
        "thumbnail",
    )
    assert body["destinations"] == ["pacs", "down"] and "Modality CT" in body["reason"]
    assert body["sop_instance_uid"] == served.ds.SOPInstanceUID
    with open(get_testdata_file("MR_small.dcm"), "rb") as f:
        mr = api.post("/api/v1/route-test", VIEWER_TOKEN, files={"file": ("mr.dcm", f)}).json()
    assert (mr["routed"], mr["route"], mr["modality"]) == (False, None, "MR")
    assert mr["reason"].startswith("no route matched") and "Modality MR not == CT" in mr["reason"]


@pytest.mark.dcmtk
def test_route_test_refuses_a_file_that_is_not_dicom_or_too_large(served):
    r = served.api.post("/api/v1/route-test", ADMIN_TOKEN, files={"file": ("notes.txt", b"not a DICOM file\n")})
    assert r.status_code == 400
    assert "notes.txt cannot be read as DICOM" in r.json()["detail"]
    assert served.api.post("/api/v1/route-test", ADMIN_TOKEN).status_code == 422  # no file at all
    too_big = b"\0" * (64 * 2**20 + 1)  # one header is all a route test reads
    r = served.api.post("/api/v1/route-test", VIEWER_TOKEN, files={"file": ("big.dcm", too_big)})
    assert r.status_code == 413 and "at most 64 MB" in r.json()["detail"]


# -- actions: who may, and what they do -------------------------------------------------------------
@pytest.mark.dcmtk
@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/jobs/{job}/retry",
        "/api/v1/jobs/{job}/cancel",
        "/api/v1/studies/{study}/reprocess",
        "/api/v1/deliveries/{delivery}/retry",
        "/api/v1/peers/pacs/echo",
    ],
)
def test_actions_are_403_for_a_viewer_and_404_for_what_does_not_exist(served, path):
    api = served.api
    job = api.ok("/api/v1/jobs")["items"][0]["id"]
    delivery = api.ok("/api/v1/deliveries")["items"][0]["id"]
    known = path.format(job=job, study=served.ds.StudyInstanceUID, delivery=delivery)
    assert api.post(known, VIEWER_TOKEN).status_code == 403
    if "{" in path:
        unknown = path.format(job=999999, study="1.2.3.4", delivery=999999)
        r = api.post(unknown, ADMIN_TOKEN)
        assert r.status_code == 404 and r.json()["detail"].startswith("no ")
    assert _operator_events(served.node) == []  # nothing refused left a trace as if done


@pytest.mark.dcmtk
def test_a_done_job_cannot_be_cancelled_and_a_delivered_delivery_not_retried(served):
    api = served.api
    [job] = api.ok("/api/v1/jobs")["items"]
    r = api.post(f"/api/v1/jobs/{job['id']}/cancel", ADMIN_TOKEN)
    assert r.status_code == 409 and "only a queued job can be cancelled" in r.json()["detail"]
    [delivered] = api.ok("/api/v1/deliveries", state="delivered")["items"]
    r = api.post(f"/api/v1/deliveries/{delivered['id']}/retry", ADMIN_TOKEN)
    assert r.status_code == 409 and "is delivered" in r.json()["detail"]
    assert api.job(job["id"])["state"] == "done"


@pytest.mark.dcmtk
def test_retrying_a_delivery_makes_it_due_again_audited_with_the_token_name(served):
    api = served.api
    [pending] = api.ok("/api/v1/deliveries", state="pending")["items"]
    r = api.post(f"/api/v1/deliveries/{pending['id']}/retry", ADMIN_TOKEN)
    assert r.status_code == 200, r.text
    assert r.json() == {"id": pending["id"], "state": "pending", "previous": "pending"}
    assert _operator_events(served.node)[-1] == ("pacs-admin", "deliveries", f"made due: {pending['id']} (was pending)")
    # The outbox, woken, tries it again at once: the attempt count started again and grows from zero.
    wait_for(
        lambda: any(
            d["id"] == pending["id"] and d["attempts"] >= 1 and d["state"] == "pending"
            for d in api.ok("/api/v1/deliveries")["items"]
        ),
        60,
        "the delivery tried again",
        served.node,
    )


@pytest.mark.dcmtk
def test_retry_is_for_admins_and_queues_the_job_again_audited_with_the_token_name(served):
    api, node = served.api, served.node
    [job] = api.ok("/api/v1/jobs")["items"]
    before = api.job(job["id"])["results"]
    r = api.post(f"/api/v1/jobs/{job['id']}/retry", ADMIN_TOKEN)
    assert r.status_code == 200, r.text
    assert r.json() == {"id": job["id"], "state": "queued", "previous": "done"}
    assert _operator_events(node)[-1] == ("pacs-admin", str(job["id"]), "done")
    # The job runs again and ends, with the same result UIDs (fixed from its input).
    wait_for(lambda: api.job(job["id"])["state"] == "done", 60, "the retried job done", node)
    assert [r["sop_instance_uid"] for r in api.job(job["id"])["results"]] == [r["sop_instance_uid"] for r in before]


@pytest.mark.dcmtk
def test_reprocessing_a_study_runs_its_jobs_again_or_a_new_pipeline(served):
    api, node, uid = served.api, served.node, served.ds.StudyInstanceUID
    [job] = api.ok("/api/v1/jobs")["items"]
    r = api.post(f"/api/v1/studies/{uid}/reprocess", ADMIN_TOKEN)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "study_instance_uid": uid,
        "queued": [{"id": job["id"], "route": "ct-test", "previous": "done"}],
        "unchanged": [],
    }
    wait_for(lambda: api.job(job["id"])["state"] == "done", 60, "the reprocessed job done", node)
    # With a pipeline: a new job of that pipeline, results to the sender.
    r = api.post(f"/api/v1/studies/{uid}/reprocess", ADMIN_TOKEN, params={"pipeline": "lung-seg"})
    assert r.status_code == 200, r.text
    [new] = r.json()["queued"]
    assert new["id"] != job["id"] and (new["route"], new["previous"]) == ("reprocess:lung-seg", None)
    made = api.job(new["id"])
    assert (made["pipeline"], made["study_instance_uid"]) == ("lung-seg", uid)
    wait_for(lambda: api.job(new["id"])["state"] == "done", 60, "the new job done", node)
    assert [j["id"] for j in api.ok(f"/api/v1/studies/{uid}")["jobs"]] == [job["id"], new["id"]]
    unknown = api.post(f"/api/v1/studies/{uid}/reprocess", ADMIN_TOKEN, params={"pipeline": "no-such-model"})
    assert unknown.status_code == 422 and "no pipeline named 'no-such-model'" in unknown.json()["detail"]
    details = [detail for actor, _, detail in _operator_events(node) if actor == "pacs-admin"]
    assert f"study {uid}: was done" in details and f"study {uid}: new reprocess:lung-seg" in details


# -- cancel: a queued job that no worker ever runs -----------------------------------------------------
@pytest.mark.dcmtk
def test_a_cancelled_queued_job_is_never_run(tmp_path):
    """A receiver-only node queues jobs that no worker takes; job 1 is cancelled, then a worker process on the same
    database runs job 2, which it can claim only after job 1 (claims go by priority, then id): job 1 never ran."""
    first = get_testdata_file("CT_small.dcm")
    second = _copy_with_new_uids(first, tmp_path / "second.dcm")
    second_path = tmp_path / "second.dcm"
    config = _config(tmp_path, role="receiver")
    worker_config = {**config, "node": {**config["node"], "role": "worker", "port": free_port()}}
    del worker_config["api"]
    with NodeProcess(config, tmp_path / "receiver") as receiver:
        api = Api(receiver)
        assert storescu(first, receiver.port).returncode == 0
        [job] = wait_for(lambda: api.ok("/api/v1/jobs", state="queued")["items"], 60, "job 1 queued", receiver)
        assert api.post(f"/api/v1/jobs/{job['id']}/cancel", VIEWER_TOKEN).status_code == 403
        r = api.post(f"/api/v1/jobs/{job['id']}/cancel", ADMIN_TOKEN)
        assert r.status_code == 200, r.text
        assert r.json() == {
            "id": job["id"],
            "state": "failed",
            "reason": "cancelled by pacs-admin",
            "previous": "queued",
        }
        again = api.post(f"/api/v1/jobs/{job['id']}/cancel", ADMIN_TOKEN)
        assert again.status_code == 409 and "is failed" in again.json()["detail"]
        assert api.ok(f"/api/v1/studies/{job['study_instance_uid']}")["state"] == "processed"
        assert _operator_events(receiver) == [("pacs-admin", str(job["id"]), "cancelled (was queued)")]

        assert storescu(second_path, receiver.port).returncode == 0
        [job2] = wait_for(lambda: api.ok("/api/v1/jobs", state="queued")["items"], 60, "job 2 queued", receiver)
        assert job2["id"] > job["id"] and job2["study_instance_uid"] == second.StudyInstanceUID
        worker = NodeProcess(worker_config, tmp_path / "worker").start(wait=False)
        try:
            wait_for(lambda: api.job(job2["id"])["state"] == "done", 90, "job 2 done by the worker", worker)
        finally:
            worker.stop()
        cancelled = api.job(job["id"])
        assert (cancelled["state"], cancelled["reason"]) == ("failed", "cancelled by pacs-admin")
        assert (cancelled["attempts"], cancelled["started_at"], cancelled["results"]) == (0, None, [])


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
