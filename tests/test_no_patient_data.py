"""No patient-identifying value in what the node records about a study (issue 12, item 12).

A non-standard birth date (``1962-03-05``) once failed a job and appeared in the ERROR log line and in
the job reason ``ainode status`` shows. Studies here carry distinctive names, IDs, birth dates and
accession numbers (some invalid, some non-ASCII); everything the node writes besides the DICOM files
(its log, the text columns of its database, ``status``) is searched for them.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import pytest
from pydicom import Dataset

from node.phi import REDACTED, identifying_values, redact
from tests.support.cli import ainode
from tests.support.nodeproc import NodeProcess, node_section
from tests.support.peers import StoreSCP, storescu
from tests.support.runners import models_without_domain
from tests.support.series import ct_series, save
from tests.support.waiting import wait_for

NAME = "Quaxelbrink^Hortensia^Ysolde"
PATIENT_ID = "PHI-ID-938172"
BIRTH_DATE = "1962-03-05"  # not a DA value: pydicom and highdicom quote it when they refuse it
ACCESSION = "ACC77Q3"
#: What must appear nowhere but in DICOM files.
SECRETS = ("Quaxelbrink", "Hortensia", "Ysolde", PATIENT_ID, BIRTH_DATE, ACCESSION)


def with_patient(slices: list[Dataset]) -> list[Dataset]:
    for ds in slices:
        ds.PatientName = NAME
        ds.PatientID = PATIENT_ID
        ds.AccessionNumber = ACCESSION
        ds.add_new("PatientBirthDate", "DA", None)
        ds["PatientBirthDate"]._value = BIRTH_DATE  # as a scanner wrote it, past pydicom's check
        ds.SeriesDescription = "Thorax"
    return slices


def test_reasons_are_said_without_the_values_of_identifying_attributes() -> None:
    (ds,) = with_patient(ct_series(1))
    values = identifying_values([ds])
    reason = f"ValueError: Invalid value for VR DA: '{BIRTH_DATE}' of {NAME.replace('^', ' ')} (id {PATIENT_ID})"

    said = redact(reason, values)

    assert said is not None and not any(secret.lower() in said.lower() for secret in SECRETS)
    assert said.startswith("ValueError: Invalid value for VR DA: ") and REDACTED in said


def test_a_job_that_fails_on_a_value_records_and_logs_its_reason_without_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.support.node_parts import STABLE_AFTER_S, build_node

    class QuotingRunner:  # what a library does when it refuses a value: it quotes it
        def run(self, pipeline, series_files, outputs):  # type: ignore[no-untyped-def]
            raise ValueError(f"Invalid value for VR DA: '{BIRTH_DATE}' (patient {PATIENT_ID}, {NAME})")

    node = build_node(tmp_path)
    node.receive(with_patient(ct_series(3)))
    assert node.assembler.tick(now=node.clock.advance(STABLE_AFTER_S + 1))
    caplog.set_level(logging.DEBUG)

    assert node.worker(runner=QuotingRunner()).run_once()

    (job,) = node.jobs()
    assert job.state.value == "failed" and job.reason.startswith("ValueError: Invalid value for VR DA: ")
    for secret in SECRETS:
        assert secret not in job.reason
        assert secret not in caplog.text


@pytest.mark.dcmtk
def test_nothing_the_node_writes_besides_dicom_files_names_the_patient(tmp_path: Path) -> None:
    pacs = StoreSCP(tmp_path / "pacs")
    slices = with_patient(ct_series(20))
    folder = tmp_path / "study"
    folder.mkdir()
    for k, ds in enumerate(slices):
        save(ds, folder / f"{k}.dcm")
    # A 32 x 32 synthetic CT is outside lung-seg's validated domain: the node analyses it with a copy of the
    # model that declares none (what matters here is what the node writes while a real job runs).
    models = models_without_domain(tmp_path / "models")
    config = {
        "node": node_section(tmp_path, log_level="DEBUG", models_dirs=[str(models)]),
        "peers": {"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.port}},
        "routes": [
            {
                "name": "ct",
                "match": {"Modality": "CT"},
                "pipeline": "lung-seg",
                "destinations": ["pacs"],
                "stable_after_s": 1,
            }
        ],  # fmt: skip
    }
    try:
        with NodeProcess(config, tmp_path / "node", cli=True) as node:
            assert storescu(folder, node.port, called_ae="AINODE").returncode == 0
            wait_for(lambda: len(pacs.received()) >= 2, 180, "SEG and SR at the PACS", node)
            status = ainode("status", "--config", str(node.config_path))
            status_json = ainode("status", "--json", "--config", str(node.config_path))
            log = node.log_text()
    finally:
        pacs.stop()

    database = sqlite3.connect(tmp_path / "node.db")
    text_columns = {
        "jobs": ("reason",),
        "audit_events": ("detail", "actor", "subject"),
        "deliveries": ("last_error",),
        "associations": ("reason",),
        "studies": ("note",),
        "series": ("route_reason",),
    }
    recorded = [
        str(value)
        for table, columns in text_columns.items()
        for row in database.execute(f"SELECT {', '.join(columns)} FROM {table}")
        for value in row
        if value is not None
    ]
    assert json.loads(status_json.stdout)["jobs"], "the study made a job"
    for secret in SECRETS:
        for where, text in (("log", log), ("status", status.stdout), ("status --json", status_json.stdout)):
            assert secret.lower() not in text.lower(), f"{secret} in {where}"
        assert not [t for t in recorded if secret.lower() in t.lower()], f"{secret} in the database's text columns"
