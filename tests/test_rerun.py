"""Running a study again: ``ainode jobs retry`` and ``ainode studies reprocess`` (issue 11, item 1).

The node runs as ``ainode serve`` with the bundled chest-xray model, whose result UIDs are
derived from the model version and the source instances: the same model makes the same
objects again (one row, one copy in the PACS, sent again), a new model version makes new ones.
DCMTK storescu plays the modality, Orthanc the PACS (and the modality's own storage SCP).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, NoResultFound

from db.engine import make_engine, make_session_factory
from db.migrate import upgrade
from db.models import AuditEvent, Delivery, Job, Result, Study
from node.reasons import one_line_reason
from onnx_models.training.xray_phantom import make_xray_phantom
from pipelines.runtime import bundled_models_dir
from tests.support import REPO
from tests.support.cli import status
from tests.support.dicom import CR_IMAGE_STORAGE, radiograph_file
from tests.support.nodeproc import NodeProcess, node_config
from tests.support.peers import free_port, results_in_orthanc, storescu
from tests.support.waiting import wait_for

SENDER_AE = "CRSENDER"


def ainode(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.operate.cli", *args, "--config", str(node.config_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=node.env,
        timeout=120,
    )


def chest_config(tmp_path: Path, orthanc) -> dict:
    config = node_config(tmp_path, orthanc)
    config["peers"]["pacs"]["outputs"] = ["sr"]
    # The modality's storage SCP is played by Orthanc too (it answers any called AE title).
    config["peers"]["modality"] = {"ae_title": SENDER_AE, "host": "127.0.0.1", "port": orthanc.dicom_port,
                                   "outputs": ["sr"]}  # fmt: skip
    config["routes"] = [
        {"name": "cr-chest", "match": {"Modality": "CR"}, "pipeline": "chest-xray", "destinations": ["pacs"],
         "stable_after_s": 1}
    ]  # fmt: skip
    return config


def deliveries_made(sessions, sop_uid: str) -> int:
    """How many times a peer accepted ``sop_uid`` (the outbox's audit trail)."""
    with sessions() as session:
        return session.scalar(
            select(func.count(AuditEvent.id)).where(
                AuditEvent.kind == "delivery", AuditEvent.subject == sop_uid, AuditEvent.detail == "delivered"
            )
        )


def job_ended(node: NodeProcess, job_id: int) -> dict | None:
    job = next(j for j in status(node)["jobs"] if j["id"] == job_id)
    return job if job["state"] in ("done", "failed", "not-applicable") else None


@pytest.mark.orthanc
@pytest.mark.dcmtk
def test_retry_and_reprocess_send_the_same_results_again_and_a_new_model_version_new_ones(tmp_path, orthanc):
    orthanc.clear()
    phantom = make_xray_phantom(np.random.default_rng(4242), opacity=True)
    source = radiograph_file(tmp_path / "cr.dcm", phantom.image, "CR", CR_IMAGE_STORAGE, ViewPosition="PA",
                             BodyPartExamined="CHEST")  # fmt: skip
    study_uid = str(source.StudyInstanceUID)
    config = chest_config(tmp_path, orthanc)
    sessions = make_session_factory(make_engine(config["node"]["database_url"]))

    with NodeProcess(config, tmp_path / "n", cli=True) as node:
        assert storescu(tmp_path / "cr.dcm", node.port, calling_ae=SENDER_AE).returncode == 0
        (sr,) = wait_for(lambda: results_in_orthanc(orthanc, study_uid), timeout_s=120, what="SR", node=node)
        sr_uid = str(sr.SOPInstanceUID)
        wait_for(lambda: deliveries_made(sessions, sr_uid) == 1, node=node, what="first delivery recorded")

        # A done job run again makes the same SR: the row is reused and the delivery made again.
        retry = ainode(node, "jobs", "retry", "1")
        assert retry.returncode == 0, retry.stderr
        assert "job 1 queued again (was done)" in retry.stdout
        wait_for(lambda: job_ended(node, 1) and deliveries_made(sessions, sr_uid) == 2 or job_ended(node, 1)
                 and job_ended(node, 1)["state"] != "done", node=node, what="the retried job")  # fmt: skip
        st = status(node)
        (job,) = st["jobs"]
        assert (job["state"], job["reason"]) == ("done", None), job
        assert deliveries_made(sessions, sr_uid) == 2
        assert [(d["sop_instance_uid"], d["destination"], d["state"]) for d in st["deliveries"]] == [
            (sr_uid, "pacs", "delivered")
        ]
        assert len(orthanc.find_instances(SOPInstanceUID=sr_uid)) == 1

        unknown_pipeline = ainode(node, "studies", "reprocess", study_uid, "--pipeline", "no-such-model")
        assert unknown_pipeline.returncode == 2
        assert "no pipeline named 'no-such-model'" in unknown_pipeline.stderr
        assert "chest-xray" in unknown_pipeline.stderr
        unknown_study = ainode(node, "studies", "reprocess", "1.2.3.4.5.6.7")
        assert unknown_study.returncode == 1 and "no study 1.2.3.4.5.6.7" in unknown_study.stderr

        # "Run this study again": every job of its current version.
        again = ainode(node, "studies", "reprocess", study_uid)
        assert again.returncode == 0, again.stderr
        assert "job 1 (cr-chest) queued again (was done)" in again.stdout
        wait_for(lambda: deliveries_made(sessions, sr_uid) == 3, node=node, what="reprocessed study delivered")

        # One pipeline on the study, results to its sender.
        one = ainode(node, "studies", "reprocess", study_uid, "--pipeline", "chest-xray")
        assert one.returncode == 0, one.stderr
        assert "job 2 (reprocess:chest-xray, results to the sender) queued" in one.stdout
        st = wait_for(
            lambda: (s := status(node))["counts"]["deliveries"] == {"delivered": 2} and s, node=node, what="job 2"
        )
        job2 = next(j for j in st["jobs"] if j["id"] == 2)
        assert (job2["state"], job2["route"], job2["pipeline"]) == ("done", "reprocess:chest-xray", "chest-xray")
        assert {(d["sop_instance_uid"], d["destination"]) for d in st["deliveries"]} == {
            (sr_uid, "pacs"),
            (sr_uid, "modality"),  # the sender, CRSENDER
        }
        assert len(orthanc.find_instances(SOPInstanceUID=sr_uid)) == 1
        with sessions() as session:
            actors = [a for (a,) in session.execute(select(AuditEvent.actor).where(AuditEvent.kind == "operator"))]
            assert len(actors) == 3
            assert actors[0].startswith("ainode jobs retry (") and actors[1].startswith("ainode studies reprocess (")

    # A model upgrade: the same name with a new version, in the site's models folder.
    models = tmp_path / "models"
    shutil.copytree(bundled_models_dir() / "chest-xray", models / "chest-xray")
    manifest = models / "chest-xray" / "model.yaml"
    manifest.write_text(manifest.read_text().replace("version: 1.0.0", "version: 1.1.0"))
    config["node"]["models_dirs"] = [str(models)]
    config["node"]["port"] = free_port()
    with NodeProcess(config, tmp_path / "n2", cli=True) as node:
        upgraded = ainode(node, "studies", "reprocess", study_uid)
        assert upgraded.returncode == 0, upgraded.stderr
        assert "job 1 (cr-chest) queued again" in upgraded.stdout
        assert "job 2 (reprocess:chest-xray) queued again" in upgraded.stdout
        new_sr = wait_for(
            lambda: [ds for ds in results_in_orthanc(orthanc, study_uid) if ds.SOPInstanceUID != sr_uid],
            timeout_s=120,
            what="the new model version's SR",
            node=node,
        )
        (new_sr,) = new_sr
        st = wait_for(
            lambda: (s := status(node))["counts"]["deliveries"] == {"delivered": 4} and s, node=node, what="all sent"
        )
        assert [j["state"] for j in st["jobs"]] == ["done", "done"]
        assert {(d["sop_instance_uid"], d["destination"]) for d in st["deliveries"]} == {
            (sr_uid, "pacs"),
            (sr_uid, "modality"),
            (str(new_sr.SOPInstanceUID), "pacs"),
            (str(new_sr.SOPInstanceUID), "modality"),
        }
        assert len(results_in_orthanc(orthanc, study_uid)) == 2
    with sessions() as session:
        assert session.scalar(select(func.count(Result.id))) == 2


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/reasons.db"
    return request.getfixturevalue("postgres_url")


def test_a_database_error_becomes_a_one_line_job_reason_without_sql(database_url):
    engine = make_engine(database_url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    with sessions() as session, session.begin():
        study = Study(study_instance_uid="1.2.3.4")
        session.add(study)
        session.flush()
        job = Job(study_id=study.id, route="r", pipeline="p", destinations=[])
        session.add(job)
        session.flush()
        session.add(Result(job_id=job.id, kind="sr", sop_class_uid="1.2", sop_instance_uid="1.2.3.4.5.1",
                           series_instance_uid="1.2.3.4.5", path="results/a.dcm"))  # fmt: skip
    with pytest.raises(IntegrityError) as caught, sessions() as session, session.begin():
        session.add(Result(job_id=1, kind="sr", sop_class_uid="1.2", sop_instance_uid="1.2.3.4.5.1",
                           series_instance_uid="1.2.3.4.5", path="results/DOE^JANE/b.dcm"))  # fmt: skip
    assert "INSERT INTO results" in str(caught.value)  # what SQLAlchemy's own message carries
    reason = one_line_reason(caught.value)
    assert "\n" not in reason and "INSERT" not in reason and "SQL" not in reason and "DOE^JANE" not in reason
    if database_url.startswith("sqlite"):
        assert reason == "IntegrityError: UNIQUE constraint failed: results.sop_instance_uid"
    else:
        assert reason.startswith("UniqueViolation: duplicate key value violates unique constraint")
        assert "1.2.3.4.5.1" not in reason  # PostgreSQL's DETAIL line names the key's value

    with pytest.raises(NoResultFound) as missing, sessions() as session:
        session.execute(select(Delivery).where(Delivery.id == 99)).scalar_one()
    assert one_line_reason(missing.value) == "NoResultFound: No row was found when one was required"
    assert one_line_reason(RuntimeError("first line\nsecond line")) == "RuntimeError: first line"
