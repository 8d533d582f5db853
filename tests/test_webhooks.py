"""Webhooks (issue 13, notifications): rows written with the change they tell about, sent with backoff, PHI-free.

The unit tests drive the recorder and the sender on a real SQLite database with an injected clock; the
node tests send a real study with DCMTK ``storescu`` to a node process and receive its webhooks on a
real HTTP server in a thread.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
import threading
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.engine import make_engine, make_session_factory
from db.migrate import upgrade
from db.models import AuditEvent, Delivery, DeliveryState, Job, JobState, Result, Study, WebhookEvent, WebhookState
from db.states import finish_job, set_delivery_state
from node.config import ConfigError, Webhook, load_config
from node.notify.record import WebhookRecorder
from node.notify.send import WebhookError, WebhookPass, WebhookSender, post_json
from tests.support.cli import ainode, write_config
from tests.support.nodeproc import NodeProcess, node_section
from tests.support.peers import free_port, storescu
from tests.support.waiting import wait_for

T0 = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
PATIENT_NAME, PATIENT_ID, BIRTH_DATE, ACCESSION = "Yamada^Tarou", "PID-778899", "19620305", "ACC-123456"
NODE_ID = {"ae_title": "AINODE", "device_uid": "1.2.3.4"}


# -- a real HTTP receiver -------------------------------------------------------------------------------
class Receiver:
    """An HTTP server in a thread recording every POST; 500 to the first ``fail_first`` POSTs of each event id."""

    def __init__(self, fail_first: int = 0) -> None:
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = fail_first
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    receiver.posts.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    seen = sum(
                        1
                        for h, _ in receiver.posts
                        if h.get("x-ainode-event-id") == self.headers.get("X-AINode-Event-Id")
                    )
                status = 500 if seen <= receiver.fail_first else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/ainode"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def events(self, name: str | None = None) -> list[tuple[dict[str, str], dict[str, Any]]]:
        with self._lock:
            found = [(h, json.loads(b)) for h, b in self.posts]
        return [(h, b) for h, b in found if name is None or b["event"] == name]

    def raw_bodies(self) -> list[bytes]:
        with self._lock:
            return [b for _, b in self.posts]


# -- unit: the recorder -----------------------------------------------------------------------------------
@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(f"sqlite:///{tmp_path}/unit.db")
    upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


def _hook(name: str = "ris", events: list[str] | None = None, **extra: Any) -> Webhook:
    events = events or ["job.done", "job.failed", "job.not_analysed", "delivery.failed"]
    return Webhook.model_validate({"name": name, "url": "http://127.0.0.1:9/h", "events": events, **extra})


def _running_job(sessions: sessionmaker[Session]) -> int:
    with sessions() as session, session.begin():
        study = Study(study_instance_uid="1.2.3", patient_id=PATIENT_ID, accession_number=ACCESSION, state="queued")
        session.add(study)
        session.flush()
        job = Job(study_id=study.id, route="ct", pipeline="lung-seg", destinations=["pacs"], state=JobState.RUNNING,
                  claimed_by="w", attempts=1)  # fmt: skip
        session.add(job)
        session.flush()
        result = Result(job_id=job.id, kind="seg", sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                        sop_instance_uid="1.2.3.9", series_instance_uid="1.2.3.8", path="x")  # fmt: skip
        session.add(result)
        session.flush()
        session.add(Delivery(result_id=result.id, destination="pacs", ae_title="PACS", host="h", port=104))
        return job.id


def _end_job(sessions: sessionmaker[Session], job_id: int, state: JobState, reason: str | None) -> None:
    with sessions() as session, session.begin():
        job = session.get(Job, job_id, with_for_update=True)
        assert job is not None
        finish_job(session, job, state, reason, T0)


def _rows(sessions: sessionmaker[Session]) -> list[WebhookEvent]:
    with sessions() as session:
        return list(session.scalars(select(WebhookEvent).order_by(WebhookEvent.id)))


def test_a_job_done_writes_one_row_per_subscribed_hook_in_its_transaction(sessions):
    WebhookRecorder([_hook("ris"), _hook("chat", ["job.failed"])], NODE_ID, clock=lambda: T0).install(sessions)
    job_id = _running_job(sessions)
    _end_job(sessions, job_id, JobState.DONE, None)
    (row,) = _rows(sessions)
    assert (row.hook, row.event, row.subject, row.state) == ("ris", "job.done", f"job {job_id}", WebhookState.PENDING)
    p = row.payload
    assert (p["event"], p["study_instance_uid"], p["job_id"], p["route"], p["pipeline"], p["state"]) == (
        "job.done", "1.2.3", job_id, "ct", "lung-seg", "done"
    )  # fmt: skip
    assert p["results"] == [{"kind": "seg", "sop_instance_uid": "1.2.3.9", "series_instance_uid": "1.2.3.8"}]
    assert p["counts"]["results"] == 1 and p["counts"]["deliveries"] == 1
    assert p["node"] == NODE_ID and p["at"] == T0.isoformat()
    assert PATIENT_ID not in json.dumps(p) and ACCESSION not in json.dumps(p)


def test_a_rolled_back_job_end_leaves_no_webhook_row(sessions):
    WebhookRecorder([_hook()], NODE_ID, clock=lambda: T0).install(sessions)
    job_id = _running_job(sessions)
    with sessions() as session:
        session.begin()
        job = session.get(Job, job_id)
        assert job is not None
        finish_job(session, job, JobState.FAILED, "boom", T0)
        session.flush()
        session.rollback()
    assert _rows(sessions) == []


def test_failed_and_not_analysed_jobs_carry_their_reason_with_patient_values_redacted(sessions):
    WebhookRecorder([_hook()], NODE_ID, clock=lambda: T0).install(sessions)
    first, second = _running_job(sessions), None
    _end_job(sessions, first, JobState.FAILED, f"pipeline crashed reading {PATIENT_ID}")
    with sessions() as session, session.begin():
        study = Study(study_instance_uid="1.2.4", state="queued")
        session.add(study)
        session.flush()
        job = Job(study_id=study.id, route="ct", pipeline="p", destinations=[], state=JobState.RUNNING)
        session.add(job)
        session.flush()
        second = job.id
    _end_job(sessions, second, JobState.NOT_APPLICABLE, "volume-too-large: 5000 MB")
    failed, not_analysed = _rows(sessions)
    assert (failed.event, failed.payload["reason"]) == ("job.failed", "pipeline crashed reading <patient data>")
    assert (not_analysed.event, not_analysed.payload["state"]) == ("job.not_analysed", "not-applicable")
    assert not_analysed.payload["reason"] == "volume-too-large: 5000 MB"


def test_a_delivery_given_up_writes_a_delivery_failed_row(sessions):
    WebhookRecorder([_hook(events=["delivery.failed"])], NODE_ID, clock=lambda: T0).install(sessions)
    job_id = _running_job(sessions)
    _end_job(sessions, job_id, JobState.DONE, None)  # not subscribed: no row
    with sessions() as session, session.begin():
        delivery = session.scalars(select(Delivery)).one()
        delivery.attempts = 7
        set_delivery_state(delivery, DeliveryState.PENDING, "refused", T0)
    assert _rows(sessions) == []  # a retry is no event
    with sessions() as session, session.begin():
        delivery = session.scalars(select(Delivery)).one()
        set_delivery_state(delivery, DeliveryState.FAILED, "association rejected by PACS", T0)
    (row,) = _rows(sessions)
    p = row.payload
    assert (row.event, p["destination"], p["destination_ae_title"], p["reason"]) == (
        "delivery.failed", "pacs", "PACS", "association rejected by PACS"
    )  # fmt: skip
    assert (p["job_id"], p["study_instance_uid"], p["counts"]) == (job_id, "1.2.3", {"attempts": 7})
    assert p["results"][0]["sop_instance_uid"] == "1.2.3.9"


def test_a_node_without_webhooks_installs_nothing_and_writes_nothing(sessions):
    assert WebhookRecorder([], NODE_ID).install(sessions) is False
    _end_job(sessions, _running_job(sessions), JobState.DONE, None)
    assert _rows(sessions) == []


# -- unit: the sender -------------------------------------------------------------------------------------
class ScriptedPost:
    """Answers each POST from a script of statuses (None: connection refused); records what was sent."""

    def __init__(self, *answers: int | None) -> None:
        self.answers = list(answers)
        self.sent: list[tuple[str, bytes, dict[str, str]]] = []

    def __call__(self, url: str, body: bytes, headers: Any, timeout_s: float) -> int:
        self.sent.append((url, body, dict(headers)))
        status = self.answers.pop(0) if self.answers else 200
        if status is None:
            raise WebhookError("cannot reach it: connection refused")
        if not 200 <= status < 300:
            raise WebhookError(f"HTTP {status}", status)
        return status


def _pending_row(sessions: sessionmaker[Session], hook: str = "ris") -> int:
    with sessions() as session, session.begin():
        row = WebhookEvent(hook=hook, event="job.done", subject="job 1", payload={"job_id": 1, "results": []},
                           state=WebhookState.PENDING, attempts=0, created_at=T0, next_attempt_at=T0)  # fmt: skip
        session.add(row)
        session.flush()
        return row.id


def test_a_failing_receiver_gets_the_same_event_id_until_it_answers_2xx(sessions):
    retry = {"initial_delay_s": 5, "factor": 2, "max_delay_s": 600, "give_up_after_s": 3600}
    post = ScriptedPost(500, 500, 200)
    sender = WebhookSender(sessions=sessions, hooks=[_hook(retry=retry)], owner="a", env={}, post=post)
    row_id = _pending_row(sessions)
    assert sender.run_pass(now=T0).retrying == 1
    assert sender.run_pass(now=T0 + timedelta(seconds=4)).retrying == 0  # not due before its backoff (5 s)
    assert sender.run_pass(now=T0 + timedelta(seconds=5)).retrying == 1
    assert sender.run_pass(now=T0 + timedelta(seconds=14)).retrying == 0  # 10 s after the second attempt
    assert sender.run_pass(now=T0 + timedelta(seconds=15)).delivered == 1
    bodies = [json.loads(body) for _, body, _ in post.sent]
    assert [b["id"] for b in bodies] == [row_id] * 3
    assert len({body for _, body, _ in post.sent}) == 1  # the same bytes each time
    assert {h["X-AINode-Event-Id"] for _, _, h in post.sent} == {str(row_id)}
    (row,) = _rows(sessions)
    assert (row.state, row.attempts, row.last_status, row.last_error) == (WebhookState.DELIVERED, 3, 200, None)


def test_a_receiver_that_stays_down_is_given_up_after_the_window_with_the_last_error(sessions):
    retry = {"initial_delay_s": 1, "factor": 2, "max_delay_s": 600, "give_up_after_s": 5}
    sender = WebhookSender(sessions=sessions, hooks=[_hook(retry=retry)], owner="a", env={}, post=ScriptedPost(
        None, None, None, None, None))  # fmt: skip
    _pending_row(sessions)
    now = T0
    for _ in range(10):
        sender.run_pass(now=now)
        now += timedelta(seconds=60)
    (row,) = _rows(sessions)
    assert (row.state, row.attempts) == (WebhookState.FAILED, 4)  # 1 + 2 + 4 s of backoff >= 5 s
    assert "connection refused" in (row.last_error or "")
    with sessions() as session:
        audit = session.scalars(select(AuditEvent).where(AuditEvent.kind == "webhook")).one()
    assert audit.subject == "ris" and "gave up" in (audit.detail or "")


def test_a_leased_row_is_not_sent_by_a_second_process(sessions):
    _pending_row(sessions)
    slow, other = ScriptedPost(200), ScriptedPost(200)
    first = WebhookSender(sessions=sessions, hooks=[_hook()], owner="host:1", env={}, post=slow)
    second = WebhookSender(sessions=sessions, hooks=[_hook()], owner="host:2", env={}, post=other)
    assert first._lease(T0)  # host:1 holds it (its POST under way)
    assert second.run_pass(now=T0).delivered == 0 and other.sent == []


@pytest.mark.postgres
def test_on_postgresql_a_job_end_is_recorded_and_sent_by_one_process_only(postgres_url):
    engine = make_engine(postgres_url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    try:
        WebhookRecorder([_hook()], NODE_ID, clock=lambda: T0).install(sessions)
        _end_job(sessions, _running_job(sessions), JobState.DONE, None)
        first, second = ScriptedPost(200), ScriptedPost(200)
        one = WebhookSender(sessions=sessions, hooks=[_hook()], owner="host:1", env={}, post=first)
        two = WebhookSender(sessions=sessions, hooks=[_hook()], owner="host:2", env={}, post=second)
        (leased,) = one._lease(T0)
        assert two.run_pass(now=T0).delivered == 0 and second.sent == []
        assert first.sent == [] and leased[2] == "job.done"  # leased, its POST not made yet
        one._record(leased[0], T0, WebhookPass(), one.hooks["ris"], 200, None)
        (row,) = _rows(sessions)
        assert (row.state, row.attempts, row.payload["study_instance_uid"]) == (WebhookState.DELIVERED, 1, "1.2.3")
    finally:
        engine.dispose()


def test_signature_and_bearer_token_come_from_the_named_environment_variables(sessions):
    hook = _hook(secret_env="RIS_SECRET", bearer_token_env="RIS_TOKEN")
    post = ScriptedPost(200)
    env = {"RIS_SECRET": "s3cret", "RIS_TOKEN": "tok"}
    _pending_row(sessions)
    WebhookSender(sessions=sessions, hooks=[hook], owner="a", env=env, post=post).run_pass(now=T0)
    (_, body, headers) = post.sent[0]
    assert headers["X-AINode-Signature"] == "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert headers["Authorization"] == "Bearer tok" and headers["X-AINode-Event"] == "job.done"
    with pytest.raises(ConfigError, match=r"webhooks\.0\.secret_env: environment variable RIS_SECRET is not set"):
        WebhookSender(sessions=sessions, hooks=[hook], owner="a", env={}, post=post)


def test_post_json_reports_a_refused_connection_and_a_non_2xx_status():
    with pytest.raises(WebhookError, match="cannot reach"):
        post_json(f"http://127.0.0.1:{free_port()}/h", b"{}", {}, 2)
    with Receiver(fail_first=1) as receiver:
        with pytest.raises(WebhookError, match="HTTP 500") as caught:
            post_json(receiver.url, b"{}", {"X-AINode-Event-Id": "1"}, 5)
        assert caught.value.status == 500
        assert post_json(receiver.url, b"{}", {"X-AINode-Event-Id": "1"}, 5) == 200


# -- unit: the config -------------------------------------------------------------------------------------
def test_config_names_a_bad_webhook_url_and_a_bad_event_one_line_each(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("routes: []\nwebhooks:\n  - {name: ris, url: 'ftp://ris/h', events: [job.done, job.exploded]}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    lines = str(caught.value).splitlines()
    assert len(lines) == 2
    assert "webhooks.0.url: a webhook URL is http:// or https://" in lines[0]
    assert "webhooks.0.events.1:" in lines[1] and "job.exploded" in lines[1]


def test_serve_stops_in_one_line_when_a_webhook_secret_variable_is_unset(tmp_path):
    hook = {
        "name": "ris",
        "url": "https://ris.example/h",
        "events": ["job.done"],
        "secret_env": "AINODE_TEST_NO_SUCH_VAR",
    }
    path = write_config(tmp_path, {"node": node_section(tmp_path), "routes": [], "webhooks": [hook]})
    result = ainode("serve", "--config", str(path), env={"AINODE_TEST_NO_SUCH_VAR": ""})
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "config error: webhooks.0.secret_env: environment variable AINODE_TEST_NO_SUCH_VAR is not set"
    )


# -- the node, through its real interfaces --------------------------------------------------------------------
def _study_copy(folder: Path, name: str) -> tuple[Path, pydicom.Dataset]:
    """CT_small with new UIDs and identifying values that the webhooks must never carry."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber = (
        PATIENT_NAME,
        PATIENT_ID,
        BIRTH_DATE,
        ACCESSION,
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.dcm"
    ds.save_as(path)
    return path, ds


def _node_config(tmp_path: Path, webhooks: list[dict[str, Any]], peer_port: int | None = None) -> dict[str, Any]:
    return {
        "node": node_section(tmp_path),
        # Nothing listens at this peer: every delivery fails, and is given up after about a second.
        "peers": {
            "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": peer_port or free_port(), "outputs": ["sc"]}
        },
        "routes": [
            {
                "name": "ct-test",
                "match": {"Modality": "CT"},
                "pipeline": "thumbnail",
                "destinations": ["pacs"],
                "stable_after_s": 1,
            }
        ],  # fmt: skip
        "delivery": {"initial_delay_s": 0.3, "factor": 1, "max_delay_s": 0.3, "give_up_after_s": 0.5},
        "webhooks": webhooks,
    }


def _webhook_rows(node: NodeProcess) -> list[tuple[str, str, str, int, str | None]]:
    db = Path(node.config["node"]["database_url"].removeprefix("sqlite:///"))
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT hook, event, state, attempts, last_error FROM webhook_events ORDER BY id"
        ).fetchall()


def _assert_phi_free(raw: bytes) -> None:
    text = raw.decode()
    for value in (PATIENT_NAME, "Yamada", "Tarou", PATIENT_ID, BIRTH_DATE, ACCESSION, "CompressedSamples"):
        assert value not in text, f"{value} in a webhook body: {text}"


@pytest.fixture(scope="module")
def notified(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A node with two hooks, one (``ris``) answering 500 twice per event then 200, one (``down``) unreachable;
    it received one study, ran its job, gave its delivery up; then received a second study."""
    tmp_path = tmp_path_factory.mktemp("webhooks")
    with Receiver(fail_first=2) as receiver:
        hooks = [
            {"name": "ris", "url": receiver.url, "events": ["job.done", "job.failed", "delivery.failed"],
             "secret_env": "AINODE_WEBHOOK_RIS_SECRET", "timeout_s": 5,
             "retry": {"initial_delay_s": 0.2, "factor": 2, "max_delay_s": 1, "give_up_after_s": 120}},
            {"name": "down", "url": f"http://127.0.0.1:{free_port()}/hook", "events": ["job.done"],
             "retry": {"initial_delay_s": 0.2, "factor": 1, "max_delay_s": 0.2, "give_up_after_s": 0.5}},
        ]  # fmt: skip
        env = {"AINODE_WEBHOOK_RIS_SECRET": "ris-secret"}
        config = {**_node_config(tmp_path, hooks), "api": {"host": "127.0.0.1", "port": free_port()}}
        with NodeProcess(config, tmp_path / "n", env=env) as node:
            first, ds = _study_copy(tmp_path / "in", "first")
            sent = storescu(first, node.port, calling_ae="CT_SCANNER1")
            assert sent.returncode == 0, sent.stdout + sent.stderr
            wait_for(lambda: ("down", "job.done", "failed") in [r[:3] for r in _webhook_rows(node)], 90,
                     "the unreachable hook given up", node)  # fmt: skip
            wait_for(lambda: receiver.events("delivery.failed"), 90, "delivery.failed at the receiver", node)
            # The node goes on after a hook was given up: a second study is analysed and told about.
            second, second_ds = _study_copy(tmp_path / "in", "second")
            assert storescu(second, node.port, calling_ae="CT_SCANNER1").returncode == 0
            wait_for(lambda: len({b["id"] for _, b in receiver.events("job.done")}) == 2, 90, "a second job.done", node)
            wait_for(lambda: all(r[2] != "pending" for r in _webhook_rows(node)), 60, "every row ended", node)
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{config['api']['port']}/metrics", timeout=10).read()
            yield {"receiver": receiver, "node": node, "first": ds, "second": second_ds, "rows": _webhook_rows(node),
                   "metrics": metrics.decode()}  # fmt: skip


@pytest.mark.dcmtk
def test_job_done_arrives_with_the_study_uids_and_no_patient_values(notified):
    receiver, ds = notified["receiver"], notified["first"]
    headers, body = next(
        (h, b) for h, b in receiver.events("job.done") if b["study_instance_uid"] == ds.StudyInstanceUID
    )
    assert (body["route"], body["pipeline"], body["state"], body["node"]["ae_title"]) == (
        "ct-test",
        "thumbnail",
        "done",
        "AINODE",
    )
    (result,) = body["results"]
    assert result["kind"] == "sc" and result["sop_instance_uid"].startswith("1.") and body["counts"]["instances"] == 1
    assert headers["x-ainode-event"] == "job.done" and headers["x-ainode-event-id"] == str(body["id"])
    for raw in receiver.raw_bodies():
        _assert_phi_free(raw)
        expected = "sha256=" + hmac.new(b"ris-secret", raw, hashlib.sha256).hexdigest()
        assert expected in {h.get("x-ainode-signature") for h, b in receiver.posts if b == raw}


@pytest.mark.dcmtk
def test_a_receiver_answering_500_twice_gets_the_same_event_id_three_times_and_the_row_ends_delivered(notified):
    receiver, ds = notified["receiver"], notified["first"]
    ids = [b["id"] for _, b in receiver.events("job.done") if b["study_instance_uid"] == ds.StudyInstanceUID]
    assert len(ids) == 3 and len(set(ids)) == 1
    ris_rows = [r for r in notified["rows"] if r[0] == "ris"]
    assert ris_rows and all(state == "delivered" for _, _, state, _, _ in ris_rows)
    assert all(attempts == 3 for _, _, _, attempts, _ in ris_rows)


@pytest.mark.dcmtk
def test_an_unreachable_receiver_is_retried_then_given_up_while_the_node_keeps_working(notified):
    down = [r for r in notified["rows"] if r[0] == "down"]
    assert [r[:3] for r in down] == [("down", "job.done", "failed")] * 2
    assert all(attempts >= 2 and "cannot reach" in (error or "") for _, _, _, attempts, error in down)
    second = notified["second"]
    assert any(b["study_instance_uid"] == second.StudyInstanceUID for _, b in notified["receiver"].events("job.done"))


@pytest.mark.dcmtk
def test_delivery_failed_is_told_when_the_outbox_gives_up_on_an_unreachable_peer(notified):
    _, body = notified["receiver"].events("delivery.failed")[0]
    assert body["study_instance_uid"] == notified["first"].StudyInstanceUID
    assert (body["destination"], body["destination_ae_title"], body["state"]) == ("pacs", "PACS", "failed")
    assert body["reason"] and body["counts"]["attempts"] >= 2
    assert body["results"][0]["kind"] == "sc"


@pytest.mark.dcmtk
def test_job_failed_is_told_with_its_reason(tmp_path):
    with Receiver() as receiver:
        hooks = [{"name": "ris", "url": receiver.url, "events": ["job.failed"]}]
        env = {"AINODE_TEST_RUNNER_FAIL": "thumbnail"}
        with NodeProcess(_node_config(tmp_path, hooks), tmp_path / "n", env=env) as node:
            path, ds = _study_copy(tmp_path / "in", "study")
            assert storescu(path, node.port, calling_ae="CT_SCANNER1").returncode == 0
            (_, body), *_ = wait_for(lambda: receiver.events("job.failed"), 90, "job.failed", node)
    assert (body["study_instance_uid"], body["state"], body["results"]) == (ds.StudyInstanceUID, "failed", [])
    assert "pipeline thumbnail crashed on purpose" in body["reason"]
    _assert_phi_free(receiver.raw_bodies()[0])


@pytest.mark.dcmtk
def test_metrics_count_webhook_rows_by_hook_and_state(notified):
    samples = {
        (s.name, s.labels.get("hook"), s.labels.get("state")): s.value
        for family in text_string_to_metric_families(notified["metrics"])
        for s in family.samples
        if s.name == "ainode_webhook_events"
    }
    assert samples == {
        ("ainode_webhook_events", "ris", "delivered"): 4.0,  # job.done and delivery.failed of each study
        ("ainode_webhook_events", "down", "failed"): 2.0,
    }
