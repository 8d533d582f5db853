"""Receiving over DICOM: DCMTK's echoscu/storescu play the scanner (issue 2, item 3)."""

from __future__ import annotations

import gc
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import HTJ2K, HTJ2KLossless
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from tests.support.inprocess import start_receiver
from tests.support.peers import echoscu, htj2k_encode, storescu

pytestmark = pytest.mark.dcmtk


@pytest.fixture
def receiver(tmp_path):
    r = start_receiver(tmp_path)
    yield r
    r.stop()


def test_echoscu_gets_success(receiver):
    result = echoscu(receiver.port, called_ae="AINODE")
    assert result.returncode == 0, result.stderr


def test_every_ct_instance_sent_by_storescu_is_acknowledged_and_kept(receiver, ct_dir):
    result = storescu(ct_dir, receiver.port, called_ae="AINODE", calling_ae="CTSCANNER")
    assert result.returncode == 0, result.stderr
    sent = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in sorted(ct_dir.rglob("*.dcm"))}
    kept = receiver.instances()
    assert set(kept) == set(sent)
    for sop_uid, original in list(sent.items())[::10]:
        stored = pydicom.dcmread(receiver.spool.abspath(kept[sop_uid].path))
        source = pydicom.dcmread(original)
        assert stored.PixelData == source.PixelData
        assert stored.StudyInstanceUID == source.StudyInstanceUID
    (assoc,) = receiver.ended_associations(1)
    assert (assoc.calling_ae, assoc.outcome, assoc.stored, assoc.failed) == ("CTSCANNER", "released", len(sent), 0)


# Compressed and unusual encodings from pydicom's own test files, each sent by DCMTK
# storescu with the option that proposes its transfer syntax (storescu proposes only
# uncompressed syntaxes unless told).
ENCODED = [
    ("JPEG2000.dcm", "-xw"),  # JPEG 2000
    ("MR_small_jp2klossless.dcm", "-xv"),  # JPEG 2000 lossless
    ("MR_small_RLE.dcm", "-xr"),  # RLE lossless
    ("MR_small_jpeg_ls_lossless.dcm", "-xt"),  # JPEG-LS lossless
    ("SC_rgb_jpeg_dcmtk.dcm", "-xy"),  # JPEG baseline
    ("JPGExtended.dcm", "-xx"),  # JPEG extended
    ("MR_small_bigendian.dcm", "-xb"),  # explicit VR big endian
    ("image_dfl.dcm", "-xd"),  # deflated explicit VR little endian
]


def _check_kept_as_sent(receiver, path: Path) -> None:
    source = pydicom.dcmread(path)
    kept = receiver.instances()[source.SOPInstanceUID]
    assert kept.transfer_syntax_uid == source.file_meta.TransferSyntaxUID
    stored = pydicom.dcmread(receiver.spool.abspath(kept.path))
    # Kept byte-for-byte as encoded by the sender: nothing decoded on the receive path.
    assert stored.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
    assert stored.PixelData == source.PixelData


@pytest.mark.parametrize(("name", "option"), ENCODED)
def test_compressed_transfer_syntaxes_are_received_as_sent(receiver, name, option):
    path = Path(get_testdata_file(name))
    result = storescu(path, receiver.port, called_ae="AINODE", extra_args=[option])
    assert result.returncode == 0, result.stderr
    _check_kept_as_sent(receiver, path)


# Compressed twins of a real CT slice made by DCMTK's own encoders.
DCMTK_ENCODERS = [
    (["/usr/bin/dcmcjpeg"], "1.2.840.10008.1.2.4.70", "-xs"),  # JPEG lossless SV1
    (["/usr/bin/dcmcjpls", "+en"], "1.2.840.10008.1.2.4.81", "-xu"),  # JPEG-LS near-lossless
    (["/usr/bin/dcmcrle"], "1.2.840.10008.1.2.5", "-xr"),  # RLE
]


@pytest.mark.parametrize(("encoder", "syntax", "option"), DCMTK_ENCODERS)
def test_real_ct_compressed_by_dcmtk_is_received_as_sent(receiver, tmp_path, ct_dir, encoder, syntax, option):
    compressed = tmp_path / "compressed.dcm"
    made = subprocess.run([*encoder, str(next(ct_dir.rglob("*.dcm"))), str(compressed)], capture_output=True)
    assert made.returncode == 0, made.stderr
    assert pydicom.dcmread(compressed).file_meta.TransferSyntaxUID == syntax
    assert storescu(compressed, receiver.port, called_ae="AINODE", extra_args=[option]).returncode == 0
    _check_kept_as_sent(receiver, compressed)


@pytest.mark.parametrize(("syntax", "options"), [(HTJ2KLossless, ["-reversible", "true"]), (HTJ2K, ["-qstep", "0.01"])])
def test_high_throughput_jpeg_2000_is_received_as_sent(receiver, tmp_path, syntax, options):
    # DCMTK 3.6.7 knows no HTJ2K syntax, so pynetdicom sends what OpenJPH encoded (a CT slice from pydicom).
    compressed = tmp_path / "htj2k.dcm"
    htj2k_encode(Path(get_testdata_file("CT_small.dcm")), compressed, syntax, *options)
    ae = AE(ae_title="HTJ2KSCU")
    ae.add_requested_context(CTImageStorage, [syntax])
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="AINODE")
    assert assoc.is_established
    try:
        (context,) = assoc.accepted_contexts
        assert context.transfer_syntax[0] == syntax
        assert int(assoc.send_c_store(pydicom.dcmread(compressed)).Status) == 0x0000
    finally:
        assoc.release()
    _check_kept_as_sent(receiver, compressed)


def test_instance_without_study_uid_is_refused_with_a_specific_status(receiver):
    # A real file from the wild (pydicom's JPEG-LS test file) that lacks Study/Series Instance UID.
    result = storescu(get_testdata_file("JPEGLSNearLossless_16.dcm"), receiver.port, extra_args=["-xu", "-v"])
    assert result.returncode != 0
    assert "Error: DataSetDoesNotMatchSOPClass" in result.stdout + result.stderr  # status 0xA900
    assert receiver.instances() == {}
    (assoc,) = receiver.ended_associations(1)
    assert (assoc.stored, assoc.failed) == (0, 1)


def test_same_instance_twice_is_idempotent(receiver):
    path = get_testdata_file("CT_small.dcm")
    for _ in range(2):
        assert storescu(path, receiver.port, called_ae="AINODE").returncode == 0
    kept = receiver.instances()
    assert len(kept) == 1
    with receiver.sessions() as session:
        from db.models import Series, Study

        assert session.query(Study).one().instance_count == 1
        assert session.query(Series).count() == 1


def test_unknown_caller_is_rejected_and_audited(tmp_path):
    r = start_receiver(tmp_path, allowed_callers=["CTSCANNER", "PACS@127.0.0.1", "OTHER@10.9.9.9"])
    try:
        assert echoscu(r.port, called_ae="AINODE", calling_ae="CTSCANNER").returncode == 0
        assert echoscu(r.port, called_ae="AINODE", calling_ae="PACS").returncode == 0
        intruder = echoscu(r.port, called_ae="AINODE", calling_ae="INTRUDER")
        assert intruder.returncode != 0
        assert "Calling AE Title Not Recognized" in intruder.stderr + intruder.stdout
        # OTHER is allowed only from another host: from loopback it is an unknown caller.
        assert echoscu(r.port, called_ae="AINODE", calling_ae="OTHER").returncode != 0
        outcomes = [(a.calling_ae, a.outcome) for a in r.ended_associations(4)]
        assert ("INTRUDER", "rejected") in outcomes and ("OTHER", "rejected") in outcomes
        assert ("CTSCANNER", "released") in outcomes
    finally:
        r.stop()


def test_wrong_called_ae_title_is_rejected(receiver):
    assert echoscu(receiver.port, called_ae="NOTME").returncode != 0


def _store_with_pynetdicom(port: int, path: str) -> int:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(pydicom.dcmread(path)).Status)
    finally:
        assoc.release()


def test_store_returns_out_of_resources_when_file_size_limit_is_hit(tmp_path):
    """A real write failure from the OS (RLIMIT_FSIZE), in a node process of its own."""
    import resource
    import signal

    from tests.support.nodeproc import NodeProcess
    from tests.support.peers import free_port

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))

    port = free_port()
    config = {
        "node": {"port": port, "spool_dir": str(tmp_path / "spool"), "database_url": f"sqlite:///{tmp_path}/n.db"},
        "routes": [],
    }
    big = tmp_path / "big.dcm"
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PixelData = bytes(3_000_000)
    ds.Rows, ds.Columns = 1000, 1500
    ds.save_as(big)
    with NodeProcess(config, tmp_path / "node", preexec_fn=limit_file_size) as node:
        status = _store_with_pynetdicom(node.port, str(big))
        assert status == 0xA700
        small = _store_with_pynetdicom(node.port, get_testdata_file("CT_small.dcm"))
        assert small == 0x0000, node.log_text()
    assert not any(p.suffix == ".part" for p in (tmp_path / "spool").rglob("*"))


def test_store_returns_failure_when_database_unavailable(tmp_path):
    from tests.support.peers import PostgresServer

    second = tmp_path / "second.dcm"
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(second)
    with PostgresServer() as pg:
        r = start_receiver(tmp_path, database_url=pg.url)
        try:
            assert _store_with_pynetdicom(r.port, get_testdata_file("CT_small.dcm")) == 0
            pg.stop()
            assert _store_with_pynetdicom(r.port, str(second)) == 0xA700
            # Its file was flushed while the row was written, and never put in place: nothing is left of it.
            first = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True).SOPInstanceUID
            assert [p.name for p in r.spool.root.rglob("*") if p.is_file()] == [f"{first}.dcm"]
            pg.start()
            # The node kept serving: once the database is back, the same instance is accepted.
            assert _store_with_pynetdicom(r.port, str(second)) == 0x0000
            assert len(r.instances()) == 2
        finally:
            r.stop()


def test_the_listener_does_not_collect_garbage_every_few_seconds_between_c_stores(receiver, monkeypatch):
    # pynetdicom's accept loop runs a full gc.collect() every 60 turns; each holds the interpreter in the
    # middle of C-STOREs. The node polls its accept loop often (for a prompt stop), and must not collect
    # more often than pynetdicom does at its own 0.5 s poll: once in 30 s.
    collections: list[float] = []
    monkeypatch.setattr(gc, "collect", lambda *args: collections.append(time.monotonic()) or 0)
    time.sleep(4)
    assert collections == []


def test_a_c_store_whose_file_cannot_be_flushed_to_the_disk_is_refused_and_leaves_no_row_or_file(tmp_path, monkeypatch):
    """The file is flushed in the background while its row is written; the row commits only once it is on the
    disk. A flush that fails (an I/O error) refuses the C-STORE with 0xA700 and rolls the row back."""
    import errno
    import os as real_os

    import node.receive.spool as spool_module

    flushed: list[int] = []
    fail = [True]
    real_fsync = real_os.fsync

    def fsync(fd: int) -> None:
        if fail[0] and real_os.fstat(fd).st_size > 100_000:  # the instance's file, not a folder
            raise OSError(errno.EIO, "Input/output error")
        flushed.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(spool_module.os, "fsync", fsync)
    r = start_receiver(tmp_path)
    try:
        ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ct.PixelData = bytes(200_000)
        ct.Rows, ct.Columns = 250, 400
        path = tmp_path / "ct.dcm"
        ct.save_as(path)
        assert _store_with_pynetdicom(r.port, str(path)) == 0xA700
        assert r.instances() == {}
        assert not [p for p in r.spool.root.rglob("*") if p.is_file()]  # neither the file nor its temp file
        fail[0] = False
        assert _store_with_pynetdicom(r.port, str(path)) == 0x0000  # the node goes on: the next one is kept
        (row,) = r.instances().values()
        assert r.spool.abspath(row.path).stat().st_size == row.size_bytes
        assert flushed  # flushed before it was acknowledged
    finally:
        r.stop()
