"""The whole node in its own process: receive, assemble, run, deliver to a real Orthanc (issue 2).

The pipeline here is defined in tests/support/runners.py (a Secondary Capture of the middle
image), so these tests exercise the node's backbone independently of the models.
"""

from __future__ import annotations

import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.support.cli import status
from tests.support.data import CT_STUDY_UID
from tests.support.nodeproc import NodeProcess, node_config
from tests.support.peers import results_in_orthanc, storescu
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.orthanc, pytest.mark.dcmtk]


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_quiet_study_is_processed_and_its_result_reaches_orthanc(tmp_path, orthanc, ct_dir, database, request):
    orthanc.clear()
    config = node_config(tmp_path, orthanc)
    if database == "postgresql":
        config["node"]["database_url"] = request.getfixturevalue("postgres_url")
    with NodeProcess(config, tmp_path / "n") as node:
        assert storescu(ct_dir, node.port, called_ae="AINODE", calling_ae="CTSCANNER").returncode == 0
        results = wait_for(lambda: results_in_orthanc(orthanc, CT_STUDY_UID), what="result in Orthanc", node=node)
        (sc,) = results
        source = pydicom.dcmread(next(ct_dir.rglob("*.dcm")), stop_before_pixels=True)
        assert sc.StudyInstanceUID == source.StudyInstanceUID
        assert sc.PatientID == source.PatientID
        st = wait_for(lambda: (s := status(node))["counts"]["deliveries"].get("delivered") and s, node=node)
        (job,) = st["jobs"]
        assert (job["state"], job["route"], job["pipeline"]) == ("done", "ct-test", "thumbnail")
        (study,) = st["studies"]
        assert (study["state"], study["instances"]) == ("processed", 60)
        assert [d["state"] for d in st["deliveries"]] == ["delivered"]
        log = node.log_text()
        # Operators read one line per association, study, job and delivery; never the patient's name or ID.
        for fragment in ("association", f"study {CT_STUDY_UID}", "job 1", "delivery 1"):
            assert fragment in log
        assert source.PatientID not in log and str(source.PatientName) not in log


def test_complete_on_release_sender_is_processed_without_waiting(tmp_path, orthanc):
    orthanc.clear()
    config = node_config(tmp_path, orthanc)
    config["routes"][0]["stable_after_s"] = 3600
    config["peers"]["scanner"] = {"ae_title": "CTSCANNER", "host": "127.0.0.1", "port": 1, "complete_on_release": True}
    ct = get_testdata_file("CT_small.dcm")
    study_uid = pydicom.dcmread(ct).StudyInstanceUID
    with NodeProcess(config, tmp_path / "n") as node:
        assert storescu(ct, node.port, called_ae="AINODE", calling_ae="CTSCANNER").returncode == 0
        wait_for(lambda: results_in_orthanc(orthanc, study_uid), timeout_s=60, what="result", node=node)


def test_send_to_ai_from_the_pacs_returns_results_to_the_sender(tmp_path, orthanc):
    """Orthanc plays the PACS: it C-STOREs a study to the node, results come back to it ("sender")."""
    orthanc.clear()
    config = node_config(tmp_path, orthanc)
    config["peers"]["pacs"]["complete_on_release"] = True
    config["routes"][0]["destinations"] = ["sender"]
    config["routes"][0]["stable_after_s"] = 3600
    ct = get_testdata_file("CT_small.dcm")
    study_uid = pydicom.dcmread(ct).StudyInstanceUID
    orthanc_study = orthanc.upload(ct)
    with NodeProcess(config, tmp_path / "n") as node:
        orthanc.add_modality("ainode", "AINODE", "127.0.0.1", node.port)
        orthanc.send_study_to_modality(orthanc_study, "ainode")
        wait_for(lambda: results_in_orthanc(orthanc, study_uid), what="result back in the PACS", node=node)


def test_pipeline_exception_fails_that_job_only(tmp_path, orthanc):
    orthanc.clear()
    config = node_config(tmp_path, orthanc)
    config["routes"].insert(
        0,
        {
            "name": "mr-broken",
            "match": {"Modality": "MR"},
            "pipeline": "broken",
            "destinations": ["pacs"],
            "stable_after_s": 1,
        },
    )
    with NodeProcess(config, tmp_path / "n", env={"AINODE_TEST_RUNNER_FAIL": "broken"}) as node:
        assert storescu(get_testdata_file("MR_small.dcm"), node.port, called_ae="AINODE").returncode == 0
        assert storescu(get_testdata_file("CT_small.dcm"), node.port, called_ae="AINODE").returncode == 0
        st = wait_for(
            lambda: (s := status(node)) and len([j for j in s["jobs"] if j["state"] in ("done", "failed")]) == 2 and s,
            node=node,
            what="both jobs ended",
        )
        jobs = {j["route"]: j for j in st["jobs"]}
        assert jobs["mr-broken"]["state"] == "failed"
        assert "crashed on purpose" in jobs["mr-broken"]["reason"]
        assert jobs["ct-test"]["state"] == "done"


def test_unrouted_study_is_recorded_with_the_reason(tmp_path, orthanc):
    with NodeProcess(node_config(tmp_path, orthanc), tmp_path / "n") as node:
        assert storescu(get_testdata_file("MR_small.dcm"), node.port, called_ae="AINODE").returncode == 0
        st = wait_for(lambda: (s := status(node))["counts"]["studies"].get("unrouted") and s, node=node)
        (study,) = st["studies"]
        assert "no route matched" in study["note"] and "MR" in study["note"]
        assert st["jobs"] == []


def test_destination_that_is_down_gets_its_results_once_it_is_back(tmp_path, orthanc_factory):
    pacs = orthanc_factory()
    config = node_config(tmp_path, pacs)
    ct = get_testdata_file("CT_small.dcm")
    study_uid = pydicom.dcmread(ct).StudyInstanceUID
    pacs.stop()
    with NodeProcess(config, tmp_path / "n") as node:
        assert storescu(ct, node.port, called_ae="AINODE").returncode == 0
        wait_for(
            lambda: any(d["attempts"] >= 2 and d["state"] == "pending" for d in status(node)["deliveries"]),
            node=node,
            what="failed delivery attempts",
        )
        pacs.start()
        wait_for(lambda: results_in_orthanc(pacs, study_uid), what="result after the PACS came back", node=node)
        st = wait_for(lambda: (s := status(node))["counts"]["deliveries"].get("delivered") and s, node=node)
        (delivery,) = st["deliveries"]
        assert delivery["state"] == "delivered" and delivery["attempts"] >= 3


def test_late_instances_make_a_new_version_of_a_processed_study(tmp_path, orthanc, ct_dir):
    orthanc.clear()
    first, second = (
        sorted((ct_dir / "series-3-B40f").glob("*.dcm"))[:10],
        sorted((ct_dir / "series-2-B70f").glob("*.dcm")),
    )
    with NodeProcess(node_config(tmp_path, orthanc), tmp_path / "n") as node:
        for f in first:
            assert storescu(f, node.port, called_ae="AINODE").returncode == 0
        wait_for(lambda: len(results_in_orthanc(orthanc, CT_STUDY_UID)) == 1, node=node, what="first result")
        assert storescu(second[0], node.port, called_ae="AINODE").returncode == 0
        wait_for(lambda: len(results_in_orthanc(orthanc, CT_STUDY_UID)) == 2, node=node, what="second version")
        st = status(node)
        assert sorted(j["version"] for j in st["jobs"]) == [1, 2]
        assert st["studies"][0]["version"] == 2
