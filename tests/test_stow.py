"""DICOMweb STOW-RS as a destination (issue 13): the outbox's guarantees, over HTTP instead of C-STORE.

The outcome mapping is tested against a local HTTP server that answers what a PACS may answer
(409 with a FailedSOPSequence, 503, 202 with a warning); delivery end to end against Orthanc's
DICOMweb plugin, with a node in its own process.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file

from node.config import Config, ConfigError, DicomWebTarget, load_config
from node.deliver.stow import StowTarget, stow
from node.work.destinations import make_resolver
from tests.support.cli import status
from tests.support.nodeproc import NodeProcess, node_config
from tests.support.peers import OrthancServer, SiteCA, results_in_orthanc, storescu
from tests.support.waiting import wait_for

CT = get_testdata_file("CT_small.dcm")


# -- a DICOMweb origin server that answers what it is told ------------------------------------------
@dataclass
class Answer:
    status: int
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


class CannedStow:
    """A local HTTP server answering every POST with ``answer``; it keeps the requests' headers."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.answer = Answer(200)
        self.requests: list[dict[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                elif self.headers.get("Transfer-Encoding") == "chunked":
                    while (size := int(self.rfile.readline().strip() or b"0", 16)) > 0:
                        self.rfile.read(size + 2)
                    self.rfile.readline()
                outer.requests.append({"path": self.path, **dict(self.headers)})
                body = json.dumps(outer.answer.body).encode() if outer.answer.body is not None else b""
                self.send_response(outer.answer.status)
                if body:
                    self.send_header("Content-Type", "application/dicom+json")
                for key, value in outer.answer.headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def canned() -> Iterator[CannedStow]:
    server = CannedStow()
    yield server
    server.stop()


def _target(url: str, **settings: Any) -> StowTarget:
    return StowTarget.of("web", DicomWebTarget(url=url, **settings))


def _sop_uid() -> str:
    return str(pydicom.dcmread(CT, stop_before_pixels=True).SOPInstanceUID)


def _sop_item(uid: str, **values: int) -> dict[str, Any]:
    """One item of a STOW-RS response sequence in DICOM JSON (PS3.18 F.2)."""
    item: dict[str, Any] = {"00081155": {"vr": "UI", "Value": [uid]}}
    tags = {"FailureReason": "00081197", "WarningReason": "00081196"}
    for name, value in values.items():
        item[tags[name]] = {"vr": "US", "Value": [value]}
    return item


# -- outcome mapping -------------------------------------------------------------------------------
def test_stow_200_is_delivered_and_posts_to_the_studies_resource(canned):
    (outcome,) = stow(_target(canned.url), [CT])
    assert outcome.accepted and outcome.status == 0 and outcome.error is None
    (request,) = canned.requests
    assert request["path"] == "/dicom-web/studies"
    media = request["Content-Type"]
    assert media.startswith("multipart/related") and 'type="application/dicom"' in media


def test_stow_409_conflict_fails_for_good_with_the_failure_reason(canned):
    uid = _sop_uid()
    canned.answer = Answer(409, {"00081198": {"vr": "SQ", "Value": [_sop_item(uid, FailureReason=0xA900)]}})
    (outcome,) = stow(_target(canned.url), [CT])
    assert not outcome.accepted and outcome.permanent
    assert outcome.status == 0xA900
    assert outcome.error is not None and "409" in outcome.error and "0xA900" in outcome.error


@pytest.mark.parametrize("http_status", [503, 500, 429, 408])
def test_stow_server_busy_or_failing_is_retried(canned, http_status):
    canned.answer = Answer(http_status)
    (outcome,) = stow(_target(canned.url), [CT])
    assert not outcome.accepted and not outcome.permanent
    assert outcome.error is not None and str(http_status) in outcome.error


def test_stow_202_with_a_warning_is_delivered_with_the_warning_recorded(canned):
    uid = _sop_uid()
    canned.answer = Answer(202, {"00081199": {"vr": "SQ", "Value": [_sop_item(uid, WarningReason=0xB000)]}})
    (outcome,) = stow(_target(canned.url), [CT])
    assert outcome.accepted and not outcome.permanent
    assert outcome.status == 0xB000 and outcome.error is not None and "202" in outcome.error


def test_stow_202_that_lists_the_instance_as_failed_is_not_delivered(canned):
    uid = _sop_uid()
    canned.answer = Answer(202, {"00081198": {"vr": "SQ", "Value": [_sop_item(uid, FailureReason=0xA700)]}})
    (outcome,) = stow(_target(canned.url), [CT])
    # Out of resources: the server may take it later.
    assert not outcome.accepted and not outcome.permanent and outcome.status == 0xA700


@pytest.mark.parametrize("http_status", [400, 401, 403, 404, 413, 415])
def test_stow_other_client_errors_fail_for_good(canned, http_status):
    canned.answer = Answer(http_status)
    (outcome,) = stow(_target(canned.url), [CT])
    assert not outcome.accepted and outcome.permanent and str(http_status) in (outcome.error or "")


def test_stow_sends_the_bearer_token_from_the_environment_and_never_logs_it(canned, caplog):
    token = "tok-3f9a0c1d-never-in-a-log"
    canned.answer = Answer(401)
    caplog.set_level(logging.DEBUG)
    (outcome,) = stow(_target(canned.url, auth={"bearer_token_env": "PACS_TOKEN"}), [CT], env={"PACS_TOKEN": token})
    assert canned.requests[0]["Authorization"] == f"Bearer {token}"
    assert outcome.permanent and token not in (outcome.error or "")
    assert token not in caplog.text


def test_stow_without_its_secret_sends_nothing_and_says_which_variable(canned):
    outcomes = stow(_target(canned.url, auth={"bearer_token_env": "PACS_TOKEN"}), [CT, CT], env={})
    assert not canned.requests
    assert all(not o.accepted and "PACS_TOKEN" in (o.error or "") for o in outcomes)


def test_stow_to_a_closed_port_is_retried_and_tries_the_server_once(canned):
    url = canned.url
    canned.stop()
    first, second = stow(_target(url), [CT, CT])
    assert not first.accepted and not first.permanent and "connection refused" in (first.error or "")
    assert second.error == f"not sent: {first.error}"


def test_stow_over_https_verifies_the_server_against_ca_file(tmp_path):
    ca = SiteCA(tmp_path / "pki")
    key, cert = ca.issue("pacs")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = CannedStow(tls=context)
    try:
        (trusted,) = stow(_target(server.url, ca_file=ca.cert), [CT])
        (unknown_ca,) = stow(_target(server.url), [CT])  # the system's CAs do not know the site CA
    finally:
        server.stop()
    assert trusted.accepted
    assert not unknown_ca.accepted and not unknown_ca.permanent
    assert (unknown_ca.error or "").startswith("TLS with 127.0.0.1:") and "certificate not accepted" in unknown_ca.error


# -- configuration ---------------------------------------------------------------------------------
def _load(tmp_path: Path, peers: dict[str, Any], env: dict[str, str] | None = None) -> Config:
    path = tmp_path / "ainode.yaml"
    path.write_text(yaml.safe_dump({"peers": peers, "routes": []}))
    return load_config(path, env=env or {})


def test_dicomweb_peer_resolves_to_a_stow_destination_shown_as_dicomweb_host_port(tmp_path):
    config = _load(
        tmp_path,
        {
            "pacs-web": {
                "dicomweb": {"url": "https://pacs.example.org/dicom-web/", "auth": {"bearer_token_env": "T"}},
                "outputs": ["seg", "sr"],
            }
        },
        env={"T": "x"},
    )
    dest = make_resolver(config)("pacs-web", None, None)
    assert (dest.ae_title, dest.host, dest.port) == ("DICOMWEB", "pacs.example.org", 443)
    assert dest.dicomweb is not None and dest.dicomweb.url == "https://pacs.example.org/dicom-web"
    assert dest.outputs == {"seg", "sr"}


def test_dicomweb_peer_that_also_sends_gets_sender_results_by_stow(tmp_path):
    web = {"url": "http://pacs:8042/dicom-web"}
    config = _load(tmp_path, {"pacs": {"ae_title": "ORTHANC", "host": "10.0.0.5", "dicomweb": web}})
    dest = make_resolver(config)("sender", "ORTHANC", "10.0.0.5")
    assert dest.name == "pacs" and dest.dicomweb is not None and (dest.host, dest.port) == ("pacs", 8042)


@pytest.mark.parametrize(
    ("peer", "env", "message"),
    [
        ({"dicomweb": {"url": "http://p/dw", "auth": {"username": "u", "password": "x"}}}, {}, "password: secrets"),
        ({"dicomweb": {"url": "http://p/dw", "auth": {"token": "x"}}}, {}, "bearer_token_env"),
        ({"dicomweb": {"url": "http://u:pw@p/dw"}}, {}, "credentials do not go in the URL"),
        ({"dicomweb": {"url": "ftp://p/dw"}}, {}, "not an http:// or https:// URL"),
        ({"dicomweb": {"url": "http://p/dw", "auth": {"bearer_token_env": "T"}}}, {}, "T is not set"),
        ({"dicomweb": {"url": "http://p/dw", "auth": {"username": "u"}}}, {}, "username with password_env"),
        ({"dicomweb": {"url": "http://p/dw", "ca_file": "ca.pem"}}, {}, "for an https:// url"),
        ({"dicomweb": {"url": "https://p/dw", "ca_file": "/nonexistent/ca.pem"}}, {}, "no such file"),
        ({"dicomweb": {"url": "http://p/dw", "verfy_tls": False}}, {}, "verfy_tls: unknown key"),
        ({"port": 104, "dicomweb": {"url": "http://p/dw"}}, {}, "port: for C-STORE peers"),
        ({"ae_title": "PACS", "host": "p"}, {}, "port missing"),
    ],
)
def test_bad_dicomweb_peer_is_one_line_naming_the_key(tmp_path, peer, env, message):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, {"web": peer}, env)
    (line,) = str(err.value).splitlines()
    assert "peers.web" in line and message in line, line


# -- end to end against Orthanc's DICOMweb plugin --------------------------------------------------
def _stow_config(tmp_path: Path, orthanc: OrthancServer, **web: Any) -> dict[str, Any]:
    config = node_config(tmp_path, orthanc)
    config["peers"] = {"pacs-web": {"dicomweb": {"url": f"{orthanc.url}/dicom-web", **web}, "outputs": ["sc"]}}
    config["routes"][0]["destinations"] = ["pacs-web"]
    return config


def _deliveries(node: NodeProcess) -> list[dict[str, Any]]:
    return list(status(node)["deliveries"])


@pytest.mark.orthanc
@pytest.mark.dcmtk
def test_results_reach_orthanc_by_stow_rs_exactly_once(tmp_path, orthanc):
    orthanc.clear()
    study_uid = pydicom.dcmread(CT, stop_before_pixels=True).StudyInstanceUID
    with NodeProcess(_stow_config(tmp_path, orthanc), tmp_path / "n") as node:
        assert storescu(CT, node.port, calling_ae="CTSCANNER").returncode == 0
        (result,) = wait_for(lambda: results_in_orthanc(orthanc, study_uid), what="result in Orthanc", node=node)
        (delivery,) = wait_for(
            lambda: [d for d in _deliveries(node) if d["state"] == "delivered"], what="delivered", node=node
        )
    assert delivery["peer"] == f"DICOMWEB@127.0.0.1:{orthanc.http_port}" and delivery["attempts"] == 1
    assert delivery["sop_instance_uid"] == result.SOPInstanceUID
    # A resend after a crash (stored, not yet marked delivered) posts the same SOP Instance UID again.
    (path,) = (tmp_path / "spool").rglob(f"*{result.SOPInstanceUID}*")
    settings = DicomWebTarget(url=f"{orthanc.url}/dicom-web")
    (again,) = stow(StowTarget.of("pacs-web", settings), [path])
    assert again.accepted
    assert [r.SOPInstanceUID for r in results_in_orthanc(orthanc, study_uid)] == [result.SOPInstanceUID]


@pytest.mark.orthanc
@pytest.mark.dcmtk
def test_stow_delivery_retries_while_orthanc_is_down_and_succeeds_once_it_is_up(tmp_path, orthanc_factory):
    pacs = orthanc_factory()
    pacs.stop()
    study_uid = pydicom.dcmread(CT, stop_before_pixels=True).StudyInstanceUID
    with NodeProcess(_stow_config(tmp_path, pacs), tmp_path / "n") as node:
        assert storescu(CT, node.port, calling_ae="CTSCANNER").returncode == 0
        (waiting,) = wait_for(
            lambda: [d for d in _deliveries(node) if d["attempts"] >= 1], what="a failed attempt", node=node
        )
        assert waiting["state"] == "pending" and "connection refused" in waiting["last_error"]
        pacs.start()
        wait_for(lambda: results_in_orthanc(pacs, study_uid), what="result once Orthanc is up", node=node)
        (delivery,) = wait_for(
            lambda: [d for d in _deliveries(node) if d["state"] == "delivered"], what="delivered", node=node
        )
    assert delivery["attempts"] >= 2
    assert len(results_in_orthanc(pacs, study_uid)) == 1


@pytest.mark.orthanc
@pytest.mark.dcmtk
def test_wrong_password_fails_the_delivery_at_once_with_the_reason(tmp_path):
    password = "right-horse-battery"
    with OrthancServer(tmp_path / "pacs", users={"ainode": password}) as pacs:
        config = _stow_config(tmp_path, pacs, auth={"username": "ainode", "password_env": "PACS_PASSWORD"})
        wrong = "wrong-staple-9c1e"
        with NodeProcess(config, tmp_path / "n", env={"PACS_PASSWORD": wrong}) as node:
            assert storescu(CT, node.port, calling_ae="CTSCANNER").returncode == 0
            (delivery,) = wait_for(
                lambda: [d for d in _deliveries(node) if d["state"] == "failed"], what="failed delivery", node=node
            )
            log = node.log_text()
        assert delivery["attempts"] == 1  # failed for good: no retry storm against a server that said no
        assert "401" in delivery["last_error"] and "credentials" in delivery["last_error"]
        assert wrong not in log and password not in log
        assert pacs.instances() == []
