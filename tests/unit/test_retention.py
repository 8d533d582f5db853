"""Retention: received images of studies whose results went out are deleted after ``retention_days``.

Retention runs as the node runs it (``Retention.run()`` computes its cutoff from ``utcnow()``), so
the studies here are dated in the past instead of moving an injected clock forward. Their rows are
made directly, in the states the flow leaves them in, so that the dates of receipt and delivery can
be chosen independently.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from db.models import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Result,
    Series,
    Study,
    StudyState,
    utcnow,
)
from node.receive.spool import Spool
from tests.support.node_parts import NodeParts, build_node, make_config, run_retention
from tests.support.runners import ThumbnailRunner
from tests.support.series import ct_series

DAY_S = 86400


def _study(
    node: NodeParts,
    *,
    received_days_ago: float,
    delivery: DeliveryState | None = DeliveryState.DELIVERED,
    delivered_days_ago: float | None = None,
    job: JobState = JobState.DONE,
) -> str:
    """A study of 3 received images and one result, received (and delivered) that many days ago."""
    received = utcnow() - timedelta(days=received_days_ago)
    slices = ct_series(3, study_uid=generate_uid())
    study_uid, series_uid = str(slices[0].StudyInstanceUID), str(slices[0].SeriesInstanceUID)
    files = []
    with node.sessions() as session, session.begin():
        study = Study(
            study_instance_uid=study_uid,
            state=StudyState.PROCESSED,
            sender_ae="CT1",
            first_received_at=received,
            last_received_at=received,
            instance_count=3,
        )
        session.add(study)
        session.flush()
        series = Series(study_id=study.id, series_instance_uid=series_uid, modality="CT", routed=True, route="ct")
        session.add(series)
        session.flush()
        for ds in slices:
            relpath = Spool.instance_relpath(study_uid, series_uid, str(ds.SOPInstanceUID))
            size = node.spool.write_dataset(relpath, ds)
            files.append(node.spool.abspath(relpath))
            session.add(
                Instance(
                    series_id=series.id,
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    path=relpath,
                    sop_class_uid=str(ds.SOPClassUID),
                    transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                    size_bytes=size,
                    received_at=received,
                )
            )
        row = Job(study_id=study.id, route="ct", pipeline="thumbnail", destinations=["pacs"], state=job)
        session.add(row)
        session.flush()
        (sc,) = ThumbnailRunner().run("thumbnail", {series_uid: files}, {"sc"}).datasets
        relpath = Spool.result_relpath(study_uid, str(sc.SeriesInstanceUID), str(sc.SOPInstanceUID))
        node.spool.write_dataset(relpath, sc)
        result = Result(
            job_id=row.id,
            kind="sc",
            sop_class_uid=str(sc.SOPClassUID),
            path=relpath,
            sop_instance_uid=str(sc.SOPInstanceUID),
            series_instance_uid=str(sc.SeriesInstanceUID),
        )
        session.add(result)
        session.flush()
        if delivery is not None:
            delivered = utcnow() - timedelta(
                days=delivered_days_ago if delivered_days_ago is not None else received_days_ago
            )
            session.add(
                Delivery(
                    result_id=result.id,
                    destination="pacs",
                    ae_title="PACS",
                    host="127.0.0.1",
                    port=104,
                    state=delivery,
                    attempts=1,
                    delivered_at=delivered if delivery == DeliveryState.DELIVERED else None,
                )
            )
    return study_uid


def _images(node: NodeParts, study_uid: str) -> int:
    with node.sessions() as session:
        return session.scalar(
            select(func.count(Instance.id)).join(Series).join(Study).where(Study.study_instance_uid == study_uid)
        )


def _retention_node(tmp_path: Path, days: float | None) -> NodeParts:
    return build_node(tmp_path, config=make_config(tmp_path, node={"retention_days": days}))


def test_received_images_of_a_delivered_study_are_deleted_after_retention_days_and_its_results_kept(tmp_path):
    node = _retention_node(tmp_path, 30)
    old = _study(node, received_days_ago=41, delivered_days_ago=40)
    recent = _study(node, received_days_ago=2, delivered_days_ago=1)

    run_retention(node.config)

    assert _images(node, old) == 0
    assert not (node.spool.root / old).exists()
    study = node.study(old)
    assert study.note == "received images removed by retention (3 instances)"
    # What the node made stays: the result row, its file and its delivery record.
    old_results = [r for r in node.results() if node.spool.abspath(r.path).parts[-3] == old]
    assert len(old_results) == 1 and node.spool.abspath(old_results[0].path).is_file()
    assert len(node.deliveries()) == 2
    # A study delivered within retention_days keeps its images.
    assert _images(node, recent) == 3
    assert len(list((node.spool.root / recent).rglob("*.dcm"))) == 3


@pytest.mark.parametrize(
    ("why", "study"),
    [
        ("a delivery is still pending", {"delivery": DeliveryState.PENDING}),
        ("a job is still queued", {"job": JobState.QUEUED, "delivery": None}),
        ("a job is still running", {"job": JobState.RUNNING, "delivery": None}),
    ],
    ids=["pending-delivery", "queued-job", "running-job"],
)
def test_received_images_are_kept_while_the_study_is_not_done(tmp_path, why: str, study: dict) -> None:
    node = _retention_node(tmp_path, 30)
    uid = _study(node, received_days_ago=41, **study)

    run_retention(node.config)

    assert _images(node, uid) == 3, why
    assert len(list((node.spool.root / uid).rglob("*.dcm"))) == 3, why


def test_without_retention_days_received_images_are_kept_for_ever(tmp_path) -> None:
    node = _retention_node(tmp_path, None)
    uid = _study(node, received_days_ago=3650)

    run_retention(node.config)

    assert _images(node, uid) == 3


def test_retention_days_count_from_the_delivery_not_from_the_receipt(tmp_path) -> None:
    node = _retention_node(tmp_path, 30)
    # Received 41 days ago; the PACS was down and took the results only yesterday.
    uid = _study(node, received_days_ago=41, delivered_days_ago=1)

    run_retention(node.config)

    assert _images(node, uid) == 3
