"""One spool shared by several node processes (ARCHITECTURE.md, scale-out).

Each process remembers the folders it made, so that a write costs no ``mkdir``. Another process's
retention may delete a study folder behind its back: the next instance of that study must still be
kept (it used to fail with 0xA700 until the process restarted).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from node.receive.spool import Spool
from tests.support import REPO
from tests.support.inprocess import start_receiver

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = f"{STUDY}.1"

# The retention of another node process: its own Spool on the same folder removes the study.
_RETENTION = "import sys; from pathlib import Path; from node.receive.spool import Spool; Spool(Path(sys.argv[1])).remove_study(sys.argv[2])"  # noqa: E501


def remove_study_in_another_process(root: Path, study_uid: str) -> None:
    subprocess.run([sys.executable, "-c", _RETENTION, str(root), study_uid], cwd=REPO, check=True, timeout=120)
    assert not (root / study_uid).exists()


def ct_instance(study_uid: str, series_uid: str, sop_uid: str) -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    return ds


def test_a_write_is_kept_after_another_process_removed_its_study_folder(tmp_path):
    spool = Spool(tmp_path / "spool")
    first = Spool.instance_relpath(STUDY, SERIES, f"{SERIES}.1")
    spool.write_dataset(first, ct_instance(STUDY, SERIES, f"{SERIES}.1"))

    remove_study_in_another_process(spool.root, STUDY)

    second = Spool.instance_relpath(STUDY, SERIES, f"{SERIES}.2")
    size = spool.write_dataset(second, ct_instance(STUDY, SERIES, f"{SERIES}.2"))
    assert spool.abspath(second).stat().st_size == size
    assert spool.read(second).SOPInstanceUID == f"{SERIES}.2"
    assert not list(spool.root.rglob("*.part"))


@pytest.fixture
def receiver(tmp_path):
    r = start_receiver(tmp_path)
    yield r
    r.stop()


def test_c_store_succeeds_after_another_process_removed_the_study_folder(receiver):
    study, series = f"{STUDY}.2", f"{STUDY}.2.1"
    ae = AE(ae_title="CTSCANNER")
    ae.add_requested_context(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, pydicom.uid.ImplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30

    def store(sop_uid: str) -> int:
        assoc = ae.associate("127.0.0.1", receiver.port, ae_title="AINODE")
        assert assoc.is_established
        try:
            status = assoc.send_c_store(ct_instance(study, series, sop_uid))
        finally:
            assoc.release()
        return int(status.Status)

    assert store(f"{series}.1") == 0x0000
    remove_study_in_another_process(receiver.spool.root, study)

    assert store(f"{series}.2") == 0x0000
    kept = receiver.instances()[f"{series}.2"]
    assert receiver.spool.abspath(kept.path).is_file()
