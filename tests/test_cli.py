"""The operator's commands, run as a PACS administrator would run them (issue 2, items 2, 5, 7, 8, 9)."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.data import get_testdata_file

from db.engine import make_engine, make_session_factory
from db.migrate import upgrade
from db.models import Job, JobState, Study, StudyState
from tests.support import REPO
from tests.support.cli import ainode, write_config
from tests.support.peers import free_port


def test_config_check_accepts_the_example_config():
    result = ainode("config", "check", str(REPO / "deploy" / "ainode.example.yaml"))
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout and "AINODE" in result.stdout


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("node: {port: 70000}", "node.port: Input should be less than or equal to 65535 (got 70000)"),
        ("node: {ae_title: THIS_TITLE_IS_TOO_LONG}", "node.ae_title: an AE title has at most 16 characters"),
        ("node: {prot: 11112}", "node.prot: unknown key"),
        ("routes: [{name: ct, pipeline: lung-seg, destinations: [pacs]}]", "destination 'pacs' is neither"),
        ("routes: [{name: ct, pipeline: x, match: {Modality: {regex: '('}}}]", "match.Modality: invalid regex"),
        ("routes: [{name: ct, pipeline: x, match: {Modalty: CT}}]", "'Modalty' is not a DICOM keyword or tag"),
        ("node: {port: [", "not valid YAML at line 1"),
    ],
)
def test_bad_config_is_one_clear_message_and_exit_code_2(tmp_path, yaml_text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    for args in (["config", "check", str(path)], ["serve", "--config", str(path)]):
        result = ainode(*args)
        assert result.returncode == 2
        assert expected in result.stderr
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_environment_overrides_any_key(tmp_path):
    path = write_config(tmp_path, {"node": {"port": 11112}})
    result = ainode("config", "check", str(path), env={"AINODE_NODE__PORT": "70000"})
    assert result.returncode == 2 and "node.port" in result.stderr
    result = ainode("config", "check", str(path), env={"AINODE_NODE__AE_TITLE": "OTHERNODE"})
    assert result.returncode == 0 and "OTHERNODE" in result.stdout
    result = ainode("config", "check", str(path), env={"AINODE_NODE__NO_SUCH_KEY": "1"})
    assert result.returncode == 2 and "node.no_such_key: unknown key" in result.stderr


def test_a_config_without_routes_keeps_the_default_routes_and_a_routes_list_replaces_them(tmp_path):
    defaults = "ct-lungs -> lung-seg -> sender; cr-dx-chest -> chest-xray -> sender; mg-density -> breast-density"
    result = ainode("config", "check", str(write_config(tmp_path, {"node": {"port": 11113}})))
    assert result.returncode == 0 and f"routes: {defaults}" in result.stdout, result.stdout
    only_ct = {"routes": [{"name": "ct", "match": {"Modality": "CT"}, "pipeline": "lung-seg"}]}
    result = ainode("config", "check", str(write_config(tmp_path, only_ct)))
    assert result.returncode == 0 and "routes: ct -> lung-seg -> sender\n" in result.stdout + "\n", result.stdout
    result = ainode("config", "check", str(write_config(tmp_path, {"routes": []})))
    assert result.returncode == 0 and "routes: none" in result.stdout, result.stdout


def test_route_test_explains_each_file():
    ct, mr = get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")
    result = ainode("route-test", ct, mr)
    assert result.returncode == 0, result.stderr
    ct_line, mr_line = result.stdout.splitlines()
    assert "route ct-lungs -> pipeline lung-seg" in ct_line and "Modality CT == CT" in ct_line
    assert "not routed" in mr_line and "Modality MR not == CT" in mr_line
    # Identified by UIDs, never by the patient's name or ID.
    assert str(pydicom.dcmread(ct).PatientName) not in result.stdout


def test_route_test_reports_unreadable_files(tmp_path):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    result = ainode("route-test", str(junk))
    assert result.returncode == 1
    assert "cannot read as DICOM" in result.stdout


@pytest.mark.orthanc
def test_echo_and_send_to_a_configured_peer(tmp_path, orthanc):
    path = write_config(
        tmp_path,
        {
            "node": {"database_url": f"sqlite:///{tmp_path}/n.db", "spool_dir": str(tmp_path / "spool")},
            "peers": {
                "pacs": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port},
                "down": {"ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port()},
            },
        },
    )
    ok = ainode("echo", "pacs", "--config", str(path))
    assert ok.returncode == 0 and "status 0x0000 success" in ok.stdout
    down = ainode("echo", "down", "--config", str(path))
    assert down.returncode == 1 and "association with NOBODY" in down.stderr
    unknown = ainode("echo", "nope", "--config", str(path))
    assert unknown.returncode == 2 and "no peer named 'nope'" in unknown.stderr

    mr = get_testdata_file("MR_small.dcm")
    sent = ainode("send", mr, "--to", "pacs", "--config", str(path))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert orthanc.find_instances(SOPInstanceUID=pydicom.dcmread(mr).SOPInstanceUID)


def test_jobs_retry_requeues_a_failed_job_and_status_shows_it(tmp_path):
    url = f"sqlite:///{tmp_path}/n.db"
    engine = make_engine(url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    with sessions() as session, session.begin():
        study = Study(study_instance_uid="1.2.3", state=StudyState.PROCESSED)
        session.add(study)
        session.flush()
        session.add(Job(study_id=study.id, route="r", pipeline="p", destinations=[], state=JobState.FAILED,
                        reason="boom"))  # fmt: skip
    path = write_config(tmp_path, {"node": {"database_url": url}})
    before = ainode("status", "--config", str(path))
    assert before.returncode == 0 and "failed" in before.stdout and "boom" in before.stdout
    result = ainode("jobs", "retry", "1", "--config", str(path))
    assert result.returncode == 0, result.stderr
    with sessions() as session:
        job = session.get(Job, 1)
        assert job.state == JobState.QUEUED and "retried by operator (was failed)" in job.reason
        assert session.get(Study, 1).state == StudyState.QUEUED
    again = ainode("jobs", "retry", "1", "--config", str(path))
    assert again.returncode == 1 and "nothing to retry" in again.stderr
    missing = ainode("jobs", "retry", "99", "--config", str(path))
    assert missing.returncode == 1 and "no job 99" in missing.stderr


def test_db_upgrade_creates_the_schema(tmp_path):
    path = write_config(tmp_path, {"node": {"database_url": f"sqlite:///{tmp_path}/fresh.db"}})
    result = ainode("db", "upgrade", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "database at revision 0005 (was empty)" in result.stdout
