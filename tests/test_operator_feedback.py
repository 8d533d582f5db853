"""What the operator reads: log lines, ``ainode status``, ``--help`` and ``--version`` (issue 11, items 3, 11)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from db.engine import make_engine, make_session_factory
from db.migrate import upgrade
from db.models import Association, Delivery, DeliveryState, Job, JobState, Result, Study, StudyState
from node import __version__
from node.operate.cli import build_parser
from onnx_models.training.xray_phantom import make_xray_phantom
from tests.support.cli import ainode, write_config
from tests.support.dicom import CR_IMAGE_STORAGE, radiograph_file
from tests.support.inprocess import start_receiver
from tests.support.nodeproc import NodeProcess, node_section
from tests.support.peers import echoscu, storescu
from tests.support.waiting import wait_for


def _node_config(tmp_path: Path, **node: object) -> dict:
    return {
        "node": node_section(tmp_path, **node),
        "routes": [],
    }


def _status(node: NodeProcess, *extra: str):  # type: ignore[no-untyped-def]
    result = ainode("status", "--config", str(node.config_path), *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if "--json" in extra else result.stdout


# -- item 3: why an association was rejected ------------------------------------------------------
@pytest.mark.dcmtk
def test_wrong_called_ae_title_is_logged_and_shown_as_such_not_as_a_calling_ae_problem(tmp_path):
    expected = "called AE title 'AI_NODE' not recognised (this node is 'AINODE'), caller 'CT_SCANNER1' from 127.0.0.1"
    ct = get_testdata_file("CT_small.dcm")
    with NodeProcess(_node_config(tmp_path), tmp_path / "n") as node:
        sent = storescu(ct, node.port, called_ae="AI_NODE", calling_ae="CT_SCANNER1")
        assert sent.returncode != 0
        assert "Called AE Title Not Recognized" in sent.stdout + sent.stderr
        assert echoscu(node.port, called_ae="AI_NODE", calling_ae="CT_SCANNER1").returncode != 0
        log = wait_for(lambda: (t := node.log_text()).count(expected) == 2 and t, 90, "two rejections logged", node)
        assert "not allowed" not in log
        st = _status(node, "--json")
        rejected = st["rejected_associations"]
        assert [(r["calling_ae"], r["host"], r["reason"]) for r in rejected] == [
            ("CT_SCANNER1", "127.0.0.1", expected)
        ] * 2
        assert all(r["at"] for r in rejected)
        text = _status(node)
        assert "REJECTED" in text and expected in text


@pytest.mark.dcmtk
def test_caller_outside_allowed_callers_is_rejected_with_that_reason(tmp_path):
    r = start_receiver(tmp_path, allowed_callers=["CTSCANNER"])
    try:
        assert echoscu(r.port, called_ae="AINODE", calling_ae="INTRUDER").returncode != 0
        assert echoscu(r.port, called_ae="NOTME", calling_ae="INTRUDER").returncode != 0
        reasons = [a.reason for a in r.ended_associations(2)]
        assert reasons[0] == "calling AE title 'INTRUDER' from 127.0.0.1 not in allowed_callers"
        assert reasons[1] == (
            "called AE title 'NOTME' not recognised (this node is 'AINODE'), caller 'INTRUDER' from 127.0.0.1;"
            " calling AE title 'INTRUDER' from 127.0.0.1 not in allowed_callers"
        )
        # The row keeps the title the peer called, not ours.
        assert [a.called_ae for a in r.associations()] == ["AINODE", "NOTME"]
    finally:
        r.stop()


# -- item 11: route-test, --version, --help --------------------------------------------------------
def test_route_test_accepts_a_folder(tmp_path):
    folder = tmp_path / "study"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "ct.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), folder / "sub" / "mr.dcm")
    result = ainode("route-test", str(folder))
    assert result.returncode == 0, result.stdout + result.stderr
    ct_line, mr_line = result.stdout.splitlines()
    assert "ct.dcm" in ct_line and "route ct-lungs -> pipeline lung-seg" in ct_line
    assert "mr.dcm" in mr_line and "not routed" in mr_line


def test_version_prints_the_package_version():
    result = ainode("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ainode {__version__}"


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*prefix, name))
            return
    yield prefix, parser


def test_every_argument_and_option_of_every_command_has_help():
    commands = list(_commands(build_parser()))
    assert len(commands) >= 12
    missing = []
    for path, parser in commands:
        assert parser.description, f"ainode {' '.join(path)} --help has no description"
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"ainode {' '.join(path)}: {'/'.join(action.option_strings) or action.dest}")
    assert missing == []
    # And the real CLI prints them.
    result = ainode("status", "--help")
    assert result.returncode == 0 and "--limit" in result.stdout
    limit_help = next(a.help for a in dict(commands)[("status",)]._actions if "--limit" in a.option_strings)
    assert " ".join(limit_help.split()[:3]) in " ".join(result.stdout.split())


# -- item 11: status --------------------------------------------------------------------------------
def _columns_align(text: str, header_start: str) -> None:
    """Every row of the table whose header starts with ``header_start`` has its cells under the headers."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    header = lines[start]
    # Headers are separated by two spaces or more ("STUDY INSTANCE UID" is one header).
    positions = [0, *(m.end() for m in re.finditer(r"  +", header))]
    assert len(positions) >= 4, header
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        rows.append(line)
    assert rows, header
    for row in rows:
        for p in positions[1:]:
            # A cell starts at each header's column: the character before it is a space, the cell is not.
            assert row[p - 1] == " " and row[p] != " ", f"\n{header}\n{row}\n{' ' * p}^"


def test_status_columns_stay_aligned_with_long_values_and_rejections_are_listed(tmp_path):
    url = f"sqlite:///{tmp_path}/n.db"
    engine = make_engine(url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    long_route, long_pipeline, long_dest = "r" * 40, "p" * 35, "a-destination-with-a-very-long-name"
    with sessions() as session, session.begin():
        study = Study(study_instance_uid="1.2.3", state=StudyState.PROCESSED, instance_count=12345, sender_ae="CT1")
        session.add(study)
        session.flush()
        for route, pipeline in ((long_route, long_pipeline), ("ct", "lung-seg")):
            job = Job(study_id=study.id, route=route, pipeline=pipeline, destinations=[], state=JobState.DONE,
                      attempts=1)  # fmt: skip
            session.add(job)
            session.flush()
            result = Result(job_id=job.id, kind="seg", sop_class_uid="1.2", sop_instance_uid=f"1.2.3.{job.id}",
                            series_instance_uid="1.2.3.9", path="x")  # fmt: skip
            session.add(result)
            session.flush()
            for dest in (long_dest, "pacs"):
                session.add(Delivery(result_id=result.id, destination=dest, ae_title="PACSAE", host="10.1.2.3",
                                     port=104, state=DeliveryState.DELIVERED, attempts=2))  # fmt: skip
        why = "calling AE title 'INTRUDER' not in allowed_callers"
        session.add(Association(calling_ae="INTRUDER", called_ae="AINODE", peer_host="10.9.8.7", peer_port=5000,
                                outcome="rejected", reason=why))  # fmt: skip
    path = write_config(tmp_path, {"node": {"database_url": url}})
    result = ainode("status", "--config", str(path))
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert long_route in text and long_dest in text
    for header in ("STUDY INSTANCE UID", "JOB", "DELIVERY", "REJECTED"):
        _columns_align(text, header)
    assert "INTRUDER" in text and "10.9.8.7" in text and "not in allowed_callers" in text


def _chest_study(folder: Path) -> tuple[str, str, str]:
    """A frontal and a lateral radiograph of one study, as two series; returns (study, PA, LAT) UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    phantom = make_xray_phantom(np.random.default_rng(11), opacity=False)
    pa = radiograph_file(folder / "pa.dcm", phantom.image, "CR", CR_IMAGE_STORAGE, ViewPosition="PA",
                         SeriesNumber=2, SeriesDescription="CHEST PA", BodyPartExamined="CHEST")  # fmt: skip
    lat = radiograph_file(folder / "lat.dcm", phantom.image, "CR", CR_IMAGE_STORAGE, ViewPosition="LL",
                          SeriesNumber=3, SeriesDescription="CHEST LAT", BodyPartExamined="CHEST",
                          StudyInstanceUID=pa.StudyInstanceUID)  # fmt: skip
    return pa.StudyInstanceUID, pa.SeriesInstanceUID, lat.SeriesInstanceUID


@pytest.mark.dcmtk
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_status_shows_which_series_the_pipeline_chose_and_why_others_were_skipped(tmp_path):
    config = _node_config(tmp_path)
    config["routes"] = [{"name": "chest", "match": {"Modality": "CR"}, "pipeline": "chest-xray",
                         "destinations": [], "stable_after_s": 1}]  # fmt: skip
    study_uid, pa_uid, lat_uid = _chest_study(tmp_path / "both")
    # A second study with the lateral view only: not analysed, and the operator sees why.
    lateral_only = tmp_path / "lat-only"
    lateral_only.mkdir()
    ds = pydicom.dcmread(tmp_path / "both" / "lat.dcm")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(lateral_only / "lat.dcm")
    with NodeProcess(config, tmp_path / "n", cli=True) as node:
        assert storescu(tmp_path / "both", node.port, calling_ae="CR1").returncode == 0
        assert storescu(lateral_only, node.port, calling_ae="CR1").returncode == 0
        st = wait_for(
            lambda: (
                (s := _status(node, "--json"))
                and {j["state"] for j in s["jobs"]} == {"done", "not-applicable"}
                and len(s["jobs"]) == 2
                and s
            ),
            90,
            "both jobs ended",
            node,
        )
        jobs = {j["study_instance_uid"]: j for j in st["jobs"]}
        chosen = jobs[study_uid]["selection"]
        assert chosen.startswith(f"chose series 2 'CHEST PA' {pa_uid}")
        assert f"skipped series 3 'CHEST LAT' {lat_uid}: lateral view (LL)" in chosen
        none = jobs[ds.StudyInstanceUID]["selection"]
        assert none.startswith("no series chosen") and f"series 3 'CHEST LAT' {ds.SeriesInstanceUID}" in none
        assert "lateral view (LL)" in none
        text = _status(node)
        assert f"chose series 2 'CHEST PA' {pa_uid}" in text and "no series chosen" in text
        assert "Synthetic" not in text and "SYN-001" not in text


# -- item 11: an already processed study sent again --------------------------------------------------
@pytest.mark.dcmtk
def test_resending_a_processed_study_says_so_once_in_the_log(tmp_path, ct_dir):
    config = _node_config(tmp_path)
    config["routes"] = [{"name": "ct", "match": {"Modality": "CT"}, "pipeline": "thumbnail", "destinations": [],
                         "stable_after_s": 1}]  # fmt: skip
    series = ct_dir / "series-3-B40f"
    study_uid = pydicom.dcmread(next(series.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
    files = sorted(series.glob("*.dcm"))[:5]
    with NodeProcess(config, tmp_path / "n") as node:
        assert storescu(files, node.port, calling_ae="CT1").returncode == 0
        wait_for(lambda: _status(node, "--json")["counts"]["studies"].get("processed"), 90, "study processed", node)
        assert storescu(files, node.port, calling_ae="CT1").returncode == 0
        expected = f"study {study_uid} was already processed; 5 duplicate instances ignored"
        log = wait_for(lambda: expected in (t := node.log_text()) and t, 90, "the duplicate line", node)
        assert log.count(f"study {study_uid} was already processed") == 1
        assert " INFO " in next(line for line in log.splitlines() if expected in line)
