"""One spool shared by several node processes (ARCHITECTURE.md, scale-out).

Each process remembers the folders it made, so that a write costs no ``mkdir``. Another process's
retention may delete a study folder behind its back: the next instance of that study must still be
kept (it used to fail with 0xA700 until the process restarted).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
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


_WRITE_AND_HOLD = """
import sys, time
from pathlib import Path
from node.receive.spool import temp_path
tmp = temp_path(Path(sys.argv[1]) / "being-written.dcm")
tmp.write_bytes(b"half an instance")
print(tmp, flush=True)
time.sleep(60)
"""


def test_a_starting_process_removes_only_the_temp_files_of_processes_that_stopped(tmp_path):
    # Worker processes of a node, or the workers of a scaled-out one, start while a receiver writes into the
    # same spool: its temp file is not theirs to remove (its C-STORE failed with "No such file" when it was).
    spool = Spool(tmp_path / "spool")
    folder = spool.root / STUDY
    folder.mkdir(parents=True)
    writer = subprocess.Popen([sys.executable, "-c", _WRITE_AND_HOLD, str(folder)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        in_progress = Path(writer.stdout.readline().strip())  # type: ignore[union-attr]
        ended = subprocess.run([sys.executable, "-c", _WRITE_AND_HOLD.replace("time.sleep(60)", ""), str(folder)],
                               cwd=REPO, capture_output=True, text=True, check=True)  # fmt: skip
        left_by_a_dead_process = Path(ended.stdout.strip())
        another_hosts = folder / "x.dcm.otherhost.123.abcd.part"
        another_hosts.write_bytes(b"")
        old = folder / "y.dcm.otherhost.456.abcd.part"
        old.write_bytes(b"")
        os.utime(old, (time.time() - 2 * 3600, time.time() - 2 * 3600))
        # Named after this very process: one written since it started is its own (results written ahead); one
        # older than it was left by an earlier process of the same PID (a container restarted as PID 1).
        ours = spool.write_ahead(f"{STUDY}/z.dcm", pydicom.dcmread(get_testdata_file("CT_small.dcm")))
        earlier_same_pid = spool.abspath(ours).with_name(spool.abspath(ours).name.replace("z.dcm", "w.dcm", 1))
        earlier_same_pid.write_bytes(b"")
        os.utime(earlier_same_pid, (time.time() - 7 * 86400, time.time() - 7 * 86400))

        assert Spool(tmp_path / "spool").remove_temp_files() == 3

        assert in_progress.exists() and another_hosts.exists() and spool.abspath(ours).exists()
        assert not left_by_a_dead_process.exists() and not old.exists() and not earlier_same_pid.exists()
    finally:
        writer.kill()
        writer.wait()
