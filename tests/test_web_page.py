"""The administrator's web page at ``/`` (issue 13), in headless Chromium, on a node that received real studies.

The node (with an ``api`` section: an admin and a viewer token) receives CT_small from DCMTK ``storescu``,
whose thumbnail result it delivers to Orthanc, and MR_small, routed to a pipeline that fails on purpose.
Python Playwright drives Debian's chromium, as the OHIF tests do. What an administrator relies on:

- the study appears in the list, and its detail shows the results' series numbers and the delivery "delivered";
- a failed job shows its reason, and "Retry" on the page queues it again (checked through the API);
- the C-ECHO button of a peer reports success against Orthanc;
- a viewer token sees UIDs but no patient name and no action buttons;
- a wrong token is asked for again; the token is asked once per browser session;
- the page fetches nothing from any host but the node (hospital networks are offline).

Screenshots go to ``tests/.cache/web-page/`` (the study list, a study's detail, the failed job, the peers after
a C-ECHO).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file

from tests.support import REPO
from tests.support.nodeproc import NodeProcess, node_config
from tests.support.peers import free_port, storescu
from tests.support.viewer.ohif import CHROMIUM, CHROMIUM_ARGS
from tests.support.waiting import wait_for

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = [pytest.mark.orthanc, pytest.mark.dcmtk]

ADMIN_TOKEN = "page-admin-token"
VIEWER_TOKEN = "page-viewer-token"
SHOTS = REPO / "tests" / ".cache" / "web-page"
TIMEOUT_MS = 60_000  # per step; the machine is slow and shares its 2 cores


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Served:
    """The node, its API's base URL and the two studies it received."""

    node: NodeProcess
    base: str
    ct: pydicom.Dataset
    mr: pydicom.Dataset

    def get(self, path: str, token: str = ADMIN_TOKEN) -> Any:
        r = requests.get(self.base + path, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert r.status_code == 200, f"GET {path}: {r.status_code} {r.text}"
        return r.json()

    def study(self, uid: str) -> dict[str, Any]:
        return self.get(f"/api/v1/studies/{uid}")  # type: ignore[no-any-return]

    def failed_job(self) -> dict[str, Any]:
        (job,) = self.study(str(self.mr.StudyInstanceUID))["jobs"]
        return job  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    pytest.importorskip("playwright.sync_api", reason="Python playwright missing (pip install -e '.[test]')")
    if not CHROMIUM.is_file():
        pytest.skip(f"chromium missing at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def served(orthanc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A node that delivered CT_small's result to Orthanc and failed MR_small's job."""
    tmp_path = tmp_path_factory.mktemp("web-page")
    config = node_config(tmp_path, orthanc)
    config["routes"].insert(
        0,
        {"name": "mr-broken", "match": {"Modality": "MR"}, "pipeline": "broken", "destinations": ["pacs"],
         "stable_after_s": 1},
    )  # fmt: skip
    config["api"] = {
        "host": "127.0.0.1",
        "port": free_port(),
        "tokens": [
            {"name": "pacs-admin", "role": "admin", "sha256": _sha256(ADMIN_TOKEN)},
            {"name": "dashboard", "role": "viewer", "sha256": _sha256(VIEWER_TOKEN)},
        ],
    }
    env = {"AINODE_TEST_RUNNER_FAIL": "broken"}
    ct_file, mr_file = str(get_testdata_file("CT_small.dcm")), str(get_testdata_file("MR_small.dcm"))
    with NodeProcess(config, tmp_path / "n", env=env) as node:
        served = Served(node, f"http://127.0.0.1:{config['api']['port']}", pydicom.dcmread(ct_file),
                        pydicom.dcmread(mr_file))  # fmt: skip
        wait_for(lambda: _answers(served.base), 30, "the HTTP API answering", node)
        for path in (ct_file, mr_file):
            sent = storescu(path, node.port, calling_ae="CT_SCANNER1")
            assert sent.returncode == 0, sent.stdout + sent.stderr
        ct_uid = str(served.ct.StudyInstanceUID)
        wait_for(
            lambda: [d["state"] for d in served.study(ct_uid)["deliveries"]] == ["delivered"],
            120,
            "CT_small's result delivered to Orthanc",
            node,
        )
        wait_for(lambda: served.failed_job()["state"] == "failed", 120, "MR_small's job failed", node)
        yield served


def _answers(base: str) -> bool:
    try:
        return requests.get(base + "/healthz", timeout=2).ok
    except requests.ConnectionError:
        return False


def _open(browser: Browser, served: Served, token: str) -> Page:
    """A fresh browser session (its own sessionStorage) on the page, signed in with ``token``."""
    page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(served.base + "/")
    page.locator("#token").fill(token)
    page.locator("#login-form button[type=submit]").click()
    page.locator("#studies-table tbody tr").first.wait_for()
    return page


def _shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _study_row(page: Page, uid: str) -> Any:
    return page.locator(f'#studies-table tr[data-uid="{uid}"]')


# -- what an administrator sees ------------------------------------------------------------------
def test_admin_sees_the_study_and_its_detail_shows_the_delivery_delivered_and_the_results_series_numbers(
    browser, served
):
    page = _open(browser, served, ADMIN_TOKEN)
    uid = str(served.ct.StudyInstanceUID)
    row = _study_row(page, uid)
    row.wait_for()
    listed = next(s for s in served.get("/api/v1/studies")["items"] if s["study_instance_uid"] == uid)
    assert listed["patient_name"], "the API gives an admin token the patient name"
    text = row.inner_text()
    assert uid in text and listed["state"] in text and "CT_SCANNER1" in text
    assert str(listed["patient_name"]) in text
    _shot(page, "studies")

    row.click()
    page.locator("#deliveries-table tbody tr[data-delivery]").first.wait_for()
    detail = served.study(uid)
    (delivery,) = detail["deliveries"]
    delivery_row = page.locator(f'#deliveries-table tr[data-delivery="{delivery["id"]}"]')
    assert "delivered" in delivery_row.inner_text()
    results = page.locator("#results-table tbody").inner_text()
    assert detail["results"], "the thumbnail pipeline made a result"
    for result in detail["results"]:
        assert str(result["series_number"]) in results and result["sop_instance_uid"] in results
    series = page.locator("#series-table tbody").inner_text()
    assert all(s["series_instance_uid"] in series for s in detail["series"])
    assert page.locator("#study-uid").inner_text() == uid
    # The page reads the node again every few seconds and keeps the open detail.
    page.wait_for_timeout(6000)
    assert page.locator("#view-study").is_visible() and page.locator("#study-uid").inner_text() == uid
    _shot(page, "study-detail")
    page.context.close()


def test_a_failed_job_shows_its_reason_and_retry_on_the_page_queues_it_again(browser, served):
    uid = str(served.mr.StudyInstanceUID)
    before = served.failed_job()
    assert "crashed on purpose" in before["reason"]
    from playwright.sync_api import expect

    page = _open(browser, served, ADMIN_TOKEN)
    listed = _study_row(page, uid)
    expect(listed).to_contain_text("broken failed")  # the list says what became of the study, and why
    expect(listed).to_contain_text("crashed on purpose")
    listed.click()
    job_row = page.locator(f'#jobs-table tr[data-job="{before["id"]}"]')
    job_row.wait_for()
    assert "failed" in job_row.inner_text() and "crashed on purpose" in job_row.inner_text()
    _shot(page, "failed-job")

    job_row.get_by_role("button", name="Retry").click()
    page.locator("#message.ok").wait_for()
    assert f"Retry job {before['id']}" in page.locator("#message").inner_text()
    # The server queued it again: audited under the admin token's name, and run again (it fails again).
    audit = served.get("/api/v1/audit")["items"]
    assert any(
        e["kind"] == "operator" and e["actor"] == "pacs-admin" and e["subject"] == str(before["id"]) for e in audit
    ), audit
    wait_for(
        lambda: (
            (job := served.failed_job())["state"] in ("queued", "running") or job["started_at"] != before["started_at"]
        ),
        60,
        "the retried job queued or run again",
        served.node,
    )
    page.context.close()


def test_the_echo_button_reports_success_against_orthanc(browser, served):
    from playwright.sync_api import expect

    page = _open(browser, served, ADMIN_TOKEN)
    page.locator("#nav a[data-view=peers]").click()
    peer = page.locator('#peers-table tr[data-peer="pacs"]')
    peer.get_by_role("button", name="Echo").click()
    message = page.locator("#message")
    message.wait_for()
    expect(message).to_contain_text("C-ECHO pacs:")
    assert message.get_attribute("class") == "ok", message.inner_text()
    assert "C-ECHO pacs: ok" in message.inner_text()
    _shot(page, "peers-echo")
    page.context.close()


# -- what a viewer sees ----------------------------------------------------------------------------
def test_a_viewer_sees_uids_but_no_patient_name_and_no_action_buttons(browser, served):
    page = _open(browser, served, VIEWER_TOKEN)
    uid = str(served.ct.StudyInstanceUID)
    _study_row(page, uid).wait_for()
    assert page.locator("#who").inner_text() == "dashboard (viewer)"
    names = [str(ds.PatientName) for ds in (served.ct, served.mr)]
    patient_ids = [str(ds.PatientID) for ds in (served.ct, served.mr)]
    assert not any(name in page.content() for name in names)
    assert "Patient" not in page.locator("#studies-table thead").inner_text()

    _study_row(page, str(served.mr.StudyInstanceUID)).click()
    page.locator("#jobs-table tbody tr[data-job]").first.wait_for()
    html = page.content()
    assert str(served.mr.StudyInstanceUID) in page.locator("#study-uid").inner_text()
    assert not any(value in html for value in names + patient_ids if value)
    assert page.locator("button.action").count() == 0
    assert not page.locator("#reprocess").is_visible()

    page.locator("#nav a[data-view=peers]").click()
    page.locator('#peers-table tr[data-peer="pacs"]').wait_for()
    assert page.locator("#peers-table button").count() == 0
    page.context.close()


# -- the token ---------------------------------------------------------------------------------------
def test_a_wrong_token_shows_the_login_again(browser, served):
    from playwright.sync_api import expect

    page = browser.new_context().new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(served.base + "/")
    page.locator("#token").fill("not-a-token")
    page.locator("#login-form button[type=submit]").click()
    # (expect, not wait_for_function: the page's CSP forbids the eval that polling a string needs)
    expect(page.locator("#login-error")).to_contain_text("not accepted")
    assert page.locator("#login").is_visible() and not page.locator("#view-studies").is_visible()
    page.context.close()


def test_the_token_is_asked_once_per_session_and_again_when_the_node_refuses_it(browser, served):
    page = _open(browser, served, ADMIN_TOKEN)
    page.reload()
    page.locator("#studies-table tbody tr").first.wait_for()
    assert not page.locator("#login").is_visible()
    # The stored token stops being accepted (e.g. removed from the config): the next refresh asks again.
    page.evaluate("sessionStorage.setItem('ainode-token', 'revoked-token')")
    page.locator("#login").wait_for()
    assert "enter it again" in page.locator("#login-error").inner_text()
    assert page.evaluate("sessionStorage.getItem('ainode-token')") is None
    assert str(served.ct.PatientName) not in page.content()  # what the old token read is gone, not just hidden
    page.context.close()


# -- offline and locked down -------------------------------------------------------------------------
def test_the_page_requests_nothing_but_the_node_and_forbids_inline_script(browser, served):
    page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    response = page.goto(served.base + "/")
    assert response is not None
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "unsafe-inline" not in policy
    page.locator("#token").fill(ADMIN_TOKEN)
    page.locator("#login-form button[type=submit]").click()
    _study_row(page, str(served.ct.StudyInstanceUID)).click()
    page.locator("#deliveries-table tbody tr[data-delivery]").first.wait_for()
    for view in ("models", "routes", "peers", "audit", "associations"):
        page.locator(f"#nav a[data-view={view}]").click()
        page.locator(f"#{view}-table tbody tr").first.wait_for()
    assert requested and all(url.startswith(served.base + "/") for url in requested), requested
    assert any("/static/app.js" in url for url in requested)
    assert any("/api/v1/studies/" in url for url in requested)
    page.context.close()


def test_the_page_files_need_no_token_and_nothing_else_of_the_node_is_served_as_a_file(served):
    for path, kind in (("/", "text/html"), ("/static/app.js", "text/javascript"), ("/static/app.css", "text/css")):
        r = requests.get(served.base + path, timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), (path, r.status_code)
        assert (
            r.headers["x-content-type-options"] == "nosniff"
            and "frame-ancestors 'none'" in r.headers["content-security-policy"]
        )
    for path in ("/static/page.py", "/static/..%2Fpage.py", "/static/%2E%2E%2Fserver.py", "/static/"):
        assert requests.get(served.base + path, timeout=10).status_code == 404, path
    assert "/static/{name}" not in requests.get(served.base + "/openapi.json", timeout=10).json()["paths"]


# -- last: it runs the CT study again ------------------------------------------------------------------
def test_reprocess_on_the_page_asks_first_then_queues_the_studys_job_again(browser, served):
    uid = str(served.ct.StudyInstanceUID)
    (job,) = served.study(uid)["jobs"]
    page = _open(browser, served, ADMIN_TOKEN)
    _study_row(page, uid).click()
    page.locator(f'#jobs-table tr[data-job="{job["id"]}"]').wait_for()
    page.once("dialog", lambda dialog: dialog.dismiss())
    page.locator("#reprocess").click()
    assert page.locator("#message").is_hidden()  # dismissed: nothing asked of the node
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#reprocess").click()
    page.locator("#message.ok").wait_for()
    assert "Reprocess study: ok (1 job(s) queued)" in page.locator("#message").inner_text()
    audit = served.get("/api/v1/audit")["items"]
    assert any(
        e["kind"] == "operator" and e["actor"] == "pacs-admin" and e["subject"] == str(job["id"]) and uid in e["detail"]
        for e in audit
    ), audit
    wait_for(
        lambda: (again := served.study(uid)["jobs"][0])["state"] == "done" and again["started_at"] != job["started_at"],
        90,
        "the reprocessed job done again",
        served.node,
    )
    page.context.close()
