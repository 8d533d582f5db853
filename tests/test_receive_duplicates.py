"""A SOP Instance UID received again (issue 12, item 4), sent by DCMTK storescu as a scanner or PACS would.

Before: the same UID in another study was filed under the new study while its database row still
pointed to the old one; the same UID with other pixels silently overwrote the kept file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from db.models import AuditEvent, Study
from tests.support.inprocess import Receiver, start_receiver
from tests.support.peers import storescu
from tests.support.series import ct_series, save

pytestmark = pytest.mark.dcmtk

PATIENT = "DUP-PATIENT-777"


def audit(receiver: Receiver) -> list[AuditEvent]:
    with receiver.sessions() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.kind == "duplicate").order_by(AuditEvent.id)))


def kept(receiver: Receiver, sop_uid: str) -> pydicom.Dataset:
    instance = receiver.instances()[sop_uid]
    return pydicom.dcmread(receiver.spool.abspath(instance.path))


@pytest.fixture
def original(tmp_path: Path) -> pydicom.Dataset:
    (ds,) = ct_series(1)
    ds.PatientID = PATIENT
    ds.PatientName = "Dup^Licate"
    return ds


def send(receiver: Receiver, ds: pydicom.Dataset, path: Path):
    return storescu(save(ds, path), receiver.port, called_ae="AINODE", extra_args=["-v"])


def test_an_identical_resend_succeeds_and_changes_nothing(tmp_path: Path, original: pydicom.Dataset) -> None:
    receiver = start_receiver(tmp_path)
    try:
        assert send(receiver, original, tmp_path / "a.dcm").returncode == 0
        before = receiver.spool.abspath(receiver.instances()[original.SOPInstanceUID].path).stat().st_mtime_ns
        assert send(receiver, original, tmp_path / "b.dcm").returncode == 0

        after = receiver.spool.abspath(receiver.instances()[original.SOPInstanceUID].path).stat().st_mtime_ns
        assert after == before  # not rewritten
        (event,) = audit(receiver)
        assert event.subject == original.SOPInstanceUID and event.detail == "identical: identical"
    finally:
        receiver.stop()


def test_changed_pixels_under_the_same_uid_keep_the_first_by_default_and_audit_what_differed(
    tmp_path: Path, original: pydicom.Dataset
) -> None:
    receiver = start_receiver(tmp_path)
    try:
        assert send(receiver, original, tmp_path / "a.dcm").returncode == 0
        changed = pydicom.dcmread(tmp_path / "a.dcm")
        changed.PixelData = (np.frombuffer(changed.PixelData, np.uint16) + 7).astype(np.uint16).tobytes()
        changed.SeriesDescription = "edited"
        assert send(receiver, changed, tmp_path / "b.dcm").returncode == 0

        np.testing.assert_array_equal(kept(receiver, original.SOPInstanceUID).pixel_array, original.pixel_array)
        (event,) = audit(receiver)
        assert event.detail.startswith("kept-first: kept the stored instance (duplicates: keep-first); differed:")
        assert "pixel data" in event.detail and "SeriesDescription" in event.detail
        assert "edited" not in event.detail  # keywords, never values
    finally:
        receiver.stop()


def test_with_replace_the_changed_instance_is_kept_and_the_count_is_unchanged(
    tmp_path: Path, original: pydicom.Dataset
) -> None:
    receiver = start_receiver(tmp_path, duplicates="replace")
    try:
        assert send(receiver, original, tmp_path / "a.dcm").returncode == 0
        changed = pydicom.dcmread(tmp_path / "a.dcm")
        changed.PixelData = (np.frombuffer(changed.PixelData, np.uint16) + 7).astype(np.uint16).tobytes()
        assert send(receiver, changed, tmp_path / "b.dcm").returncode == 0

        np.testing.assert_array_equal(kept(receiver, original.SOPInstanceUID).pixel_array, changed.pixel_array)
        (event,) = audit(receiver)
        assert event.detail.startswith("replaced: replaced the stored instance; differed: pixel data")
        with receiver.sessions() as session:
            assert session.scalars(select(Study)).one().instance_count == 1
    finally:
        receiver.stop()


@pytest.mark.parametrize(
    ("move", "where"),
    [
        ("StudyInstanceUID", "in another study"),
        ("SeriesInstanceUID", "in another series"),
        ("PatientID", "for another patient"),
    ],  # fmt: skip
)
def test_a_uid_that_moves_to_another_study_series_or_patient_is_refused_and_the_first_stays(
    tmp_path: Path, original: pydicom.Dataset, move: str, where: str
) -> None:
    receiver = start_receiver(tmp_path)
    try:
        assert send(receiver, original, tmp_path / "a.dcm").returncode == 0
        moved = pydicom.dcmread(tmp_path / "a.dcm")
        setattr(moved, move, "1.2.826.0.1.3680043.8.498.999" if move != "PatientID" else "SOMEONE-ELSE")

        result = send(receiver, moved, tmp_path / "b.dcm")

        assert result.returncode != 0
        assert "DataSetDoesNotMatchSOPClass" in result.stdout + result.stderr  # 0xA900
        (instance,) = receiver.instances().values()
        assert kept(receiver, original.SOPInstanceUID).StudyInstanceUID == original.StudyInstanceUID
        assert instance.path.startswith(str(original.StudyInstanceUID))
        spool_files = [p for p in receiver.spool.root.rglob("*.dcm")]
        assert len(spool_files) == 1, "nothing of the refused instance is kept"
        (event,) = audit(receiver)
        assert event.detail == f"moved: SOP Instance UID already stored {where}"
    finally:
        receiver.stop()


def test_an_instance_whose_file_went_missing_is_kept_again_when_resent_unless_it_names_another_patient(
    tmp_path: Path, original: pydicom.Dataset
) -> None:
    receiver = start_receiver(tmp_path)
    try:
        assert send(receiver, original, tmp_path / "a.dcm").returncode == 0
        (instance,) = receiver.instances().values()
        path = receiver.spool.abspath(instance.path)
        path.unlink()  # an operator, a disk repair: the row stays, its file is gone
        other = pydicom.dcmread(tmp_path / "a.dcm")
        other.PatientID = "SOMEONE-ELSE"
        refused = send(receiver, other, tmp_path / "b.dcm")
        assert refused.returncode != 0 and "DataSetDoesNotMatchSOPClass" in refused.stdout + refused.stderr
        assert not path.exists(), "the other patient's instance is not kept in its place"

        assert send(receiver, original, tmp_path / "c.dcm").returncode == 0
        assert kept(receiver, original.SOPInstanceUID).PatientID == PATIENT
        assert [e.detail for e in audit(receiver)] == [
            "moved: SOP Instance UID already stored for another patient",
            "replaced: the stored file was missing",
        ]
        with receiver.sessions() as session:
            assert session.scalars(select(Study)).one().instance_count == 1
    finally:
        receiver.stop()
