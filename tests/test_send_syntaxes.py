"""``ainode send`` in every transfer syntax, and failures that say their cause in one line (issue 11, items 4, 9).

The CLI runs as a subprocess. The peers are real: DCMTK ``storescp`` (``+xa`` accepts every syntax
it knows; by default only uncompressed ones; ``+xi`` only Implicit VR Little Endian), Orthanc, and
a running ``ainode serve``. The outbox delivers results through the same ``node.deliver.scu.store``.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom.association import Association

from node.deliver.scu import PeerAddress, store
from tests.support.cli import ainode, write_config
from tests.support.nodeproc import NodeProcess
from tests.support.peers import DCMTK, OrthancServer, StoreSCP, free_port, htj2k_encode

pytestmark = pytest.mark.dcmtk

# pydicom's own test files, one per transfer syntax they cover.
PYDICOM_FILES = [
    ("MR_small.dcm", ExplicitVRLittleEndian),
    ("MR_small_implicit.dcm", ImplicitVRLittleEndian),
    ("MR_small_bigendian.dcm", ExplicitVRBigEndian),
    ("image_dfl.dcm", DeflatedExplicitVRLittleEndian),
    ("SC_rgb_jpeg_dcmtk.dcm", JPEGBaseline8Bit),
    ("JPGExtended.dcm", JPEGExtended12Bit),
    ("SC_rgb_jpeg_gdcm.dcm", JPEGLosslessSV1),
    ("MR_small_jpeg_ls_lossless.dcm", JPEGLSLossless),
    ("JPEGLSNearLossless_16.dcm", JPEGLSNearLossless),
    ("MR_small_jp2klossless.dcm", JPEG2000Lossless),
    ("693_J2KI.dcm", JPEG2000),
    ("MR_small_RLE.dcm", RLELossless),
]
# Images as scanners send them, compressed by DCMTK (OpenJPH for HTJ2K) from pydicom's CT_small.dcm
# ("ct_") or, for near-lossless JPEG-LS, which DCMTK writes for unsigned pixels only, from an MR ("mr_").
MADE = [
    ("ct_jpeg_lossless_p14.dcm", JPEGLossless),
    ("ct_jpeg_lossless_sv1.dcm", JPEGLosslessSV1),
    ("ct_jpeg_ls_lossless.dcm", JPEGLSLossless),
    ("mr_jpeg_ls_near_lossless.dcm", JPEGLSNearLossless),
    ("ct_rle.dcm", RLELossless),
]
_DCMTK_ENCODERS = {
    JPEGLossless: ["dcmcjpeg", "+el"],
    JPEGLosslessSV1: ["dcmcjpeg", "+e1"],
    JPEGLSLossless: ["dcmcjpls", "+el"],
    JPEGLSNearLossless: ["dcmcjpls", "+en"],
    RLELossless: ["dcmcrle"],
}
# Every syntax the peers here take as they are (storescp +xa and Orthanc 1.10 know no HTJ2K).
ALL_SYNTAXES = PYDICOM_FILES + MADE
# storescp's +xa leaves out JPEG lossless with a selection value other than 1: it gets it converted (below).
DCMTK_ACCEPTS = [(name, syntax) for name, syntax in ALL_SYNTAXES if syntax != JPEGLossless]
# Orthanc refuses pydicom's near-lossless JPEG-LS file for what it lacks (Patient ID, Study and
# Series Instance UID), not for its syntax: the CT made by dcmcjpls covers that syntax.
ORTHANC_CASES = [(name, syntax) for name, syntax in ALL_SYNTAXES if name != "JPEGLSNearLossless_16.dcm"]


def source_file(name: str, syntax: UID, tmp_path: Path) -> Path:
    made_from = {"ct_": "CT_small.dcm", "mr_": "examples_overlay.dcm"}.get(name[:3])
    path = get_testdata_file(made_from or name)
    assert path is not None, f"pydicom test file {made_from or name} missing"
    if made_from is None:
        return Path(path)
    out = tmp_path / name
    if syntax == HTJ2KLossless:
        htj2k_encode(Path(path), out, syntax, "-reversible", "true")
    else:
        tool, *options = _DCMTK_ENCODERS[syntax]
        subprocess.run([str(DCMTK / tool), *options, path, str(out)], check=True, capture_output=True, timeout=60)
    assert pydicom.dcmread(out).file_meta.TransferSyntaxUID == syntax
    return out


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., StoreSCP]]:
    started: list[StoreSCP] = []

    def start(*options: str, aet: str = "STORESCP") -> StoreSCP:
        scp = StoreSCP(tmp_path / f"received{len(started)}", *options, aet=aet)
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


def peer_config(tmp_path: Path, ae_title: str = "AINODE", **peers: tuple[str, int]) -> str:
    node = {"ae_title": ae_title, "database_url": f"sqlite:///{tmp_path}/n.db", "spool_dir": str(tmp_path / "spool")}
    addresses = {name: {"ae_title": ae, "host": "127.0.0.1", "port": port} for name, (ae, port) in peers.items()}
    return str(write_config(tmp_path, {"node": node, "peers": addresses}))


def assert_quiet(result: subprocess.CompletedProcess[str]) -> None:
    """No library warning (pydicom's UserWarning), log line or traceback around the command's own output."""
    for noise in ("UserWarning", "Warning", "WARNING", "ERROR", "Traceback"):
        assert noise not in result.stderr, result.stderr


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(("name", "syntax"), DCMTK_ACCEPTS, ids=[n for n, _ in DCMTK_ACCEPTS])
def test_send_keeps_each_files_own_transfer_syntax_with_dcmtk(tmp_path, storescp, name, syntax):
    scp = storescp("+xa")
    src = source_file(name, syntax, tmp_path)
    result = ainode("send", str(src), "--to", "pacs", "--config", peer_config(tmp_path, pacs=(scp.aet, scp.port)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert_quiet(result)
    assert f"accepted status 0x0000 (success), as {syntax.name}" in result.stdout
    [received] = scp.received()
    original, got = pydicom.dcmread(src), pydicom.dcmread(received)
    assert original.file_meta.TransferSyntaxUID == syntax
    assert got.file_meta.TransferSyntaxUID == syntax
    assert got.SOPInstanceUID == original.SOPInstanceUID
    assert got.PixelData == original.PixelData  # the very same encoded pixel data: nothing was re-encoded


@pytest.mark.orthanc
@pytest.mark.parametrize(("name", "syntax"), ORTHANC_CASES, ids=[n for n, _ in ORTHANC_CASES])
def test_send_keeps_each_files_own_transfer_syntax_with_orthanc(tmp_path, orthanc: OrthancServer, name, syntax):
    src = source_file(name, syntax, tmp_path)
    original = pydicom.dcmread(src)
    for old in orthanc.find_instances(SOPInstanceUID=original.SOPInstanceUID):  # pydicom's MR files share one UID
        orthanc.request("DELETE", f"/instances/{old}")
    config = peer_config(tmp_path, pacs=(orthanc.aet, orthanc.dicom_port))
    result = ainode("send", str(src), "--to", "pacs", "--config", config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_quiet(result)
    [instance] = orthanc.find_instances(SOPInstanceUID=original.SOPInstanceUID)
    got = orthanc.instance_dataset(instance)
    assert got.file_meta.TransferSyntaxUID == syntax
    assert got.SOPInstanceUID == original.SOPInstanceUID
    assert got.PixelData == original.PixelData


CONVERTED = [
    ("MR_small_jpeg_ls_lossless.dcm", JPEGLSLossless),
    ("SC_rgb_jpeg_gdcm.dcm", JPEGLosslessSV1),
    ("MR_small_jp2klossless.dcm", JPEG2000Lossless),
    ("MR_small_RLE.dcm", RLELossless),
    ("ct_jpeg_lossless_p14.dcm", JPEGLossless),
    ("ct_jpeg_ls_lossless.dcm", JPEGLSLossless),
    ("ct_htj2k_lossless.dcm", HTJ2KLossless),
    ("SC_rgb_jpeg_dcmtk.dcm", JPEGBaseline8Bit),  # lossy: the pixels as decoded, not the original's
]


@pytest.mark.parametrize(("name", "syntax"), CONVERTED, ids=[n for n, _ in CONVERTED])
def test_a_peer_without_the_files_syntax_receives_it_decompressed(tmp_path, storescp, name, syntax):
    scp = storescp()  # DCMTK's default: uncompressed syntaxes only
    src = source_file(name, syntax, tmp_path)
    result = ainode("send", str(src), "--to", "pacs", "--config", peer_config(tmp_path, pacs=(scp.aet, scp.port)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert_quiet(result)
    assert f"converted from {syntax.name} to Explicit VR Little Endian" in result.stdout
    [received] = scp.received()
    original, got = pydicom.dcmread(src), pydicom.dcmread(received)
    assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert got.SOPInstanceUID == original.SOPInstanceUID
    assert np.array_equal(got.pixel_array, original.pixel_array)


def test_big_endian_goes_to_an_implicit_vr_only_peer_with_the_same_pixels(tmp_path, storescp):
    scp = storescp("+xi")
    src = Path(get_testdata_file("MR_small_bigendian.dcm"))
    result = ainode("send", str(src), "--to", "pacs", "--config", peer_config(tmp_path, pacs=(scp.aet, scp.port)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert_quiet(result)
    assert "converted from Explicit VR Big Endian to Implicit VR Little Endian" in result.stdout
    [received] = scp.received()
    original, got = pydicom.dcmread(src), pydicom.dcmread(received)
    assert got.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert got.SOPInstanceUID == original.SOPInstanceUID
    assert np.array_equal(got.pixel_array, original.pixel_array)
    assert got.PatientName == original.PatientName and got.Rows == original.Rows


def test_a_file_that_cannot_be_converted_fails_alone_with_its_reason(tmp_path, storescp):
    scp = storescp()
    broken = tmp_path / "broken_jpeg_ls.dcm"
    ds = pydicom.dcmread(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + b"\x00" * 64])  # a JPEG-LS start, then nothing decodable
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(broken)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    good = get_testdata_file("CT_small.dcm")
    config = peer_config(tmp_path, pacs=(scp.aet, scp.port))
    result = ainode("send", str(broken), str(junk), good, "--to", "pacs", "--config", config)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines()[:3])
    assert lines[str(broken)].startswith("FAILED not sent: the peer accepts MR Image Storage only as ")
    assert "JPEG-LS Lossless Image Compression could not be converted to Explicit VR Little" in lines[str(broken)]
    assert lines[str(junk)].startswith("FAILED cannot read as DICOM")
    assert lines[good].startswith("accepted status 0x0000")
    assert result.stdout.splitlines()[-1] == "1 sent, 2 failed"
    assert [pydicom.dcmread(p).SOPInstanceUID for p in scp.received()] == [pydicom.dcmread(good).SOPInstanceUID]


# -- failures in one line ------------------------------------------------------------------------
def test_echo_to_a_port_nobody_listens_on_says_connection_refused_in_one_line(tmp_path):
    port = free_port()
    result = ainode("echo", "down", "--config", peer_config(tmp_path, down=("NOBODY", port)))
    assert result.returncode == 1
    line = one_line(result)
    assert "connection refused" in line and f"127.0.0.1:{port}" in line

    sent = ainode("send", get_testdata_file("CT_small.dcm"), "--to", "down", "--config", str(tmp_path / "ainode.yaml"))
    assert sent.returncode == 1 and "connection refused" in one_line(sent)


@pytest.mark.parametrize("when", ["--abort-after", "--abort-during"])
def test_a_peer_that_aborts_the_store_is_named_in_each_files_line(tmp_path, storescp, when):
    scp = storescp(when)  # A-ABORT after (or while) receiving the C-STORE request, before answering
    files = [get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")]
    result = ainode("send", *files, "--to", "pacs", "--config", peer_config(tmp_path, pacs=(scp.aet, scp.port)))
    assert result.returncode == 1
    assert_quiet(result)
    first, second, total = result.stdout.splitlines()
    assert first.startswith(f"{files[0]}: FAILED no C-STORE response: the peer aborted the association")
    # The abort may reach us before or after the second request went out: either way its line names it.
    assert second.startswith(f"{files[1]}: FAILED ") and "the peer aborted the association" in second
    assert total == "0 sent, 2 failed"


@pytest.mark.parametrize("when", ["--abort-after", "--abort-during"])
def test_an_abort_ends_the_wait_for_the_response_even_when_pynetdicoms_reactor_is_slow_to_pause(
    storescp, monkeypatch, when
):
    # pynetdicom's reactor thread may pass its pause checkpoint just before a C-STORE pauses it;
    # it then takes the abort's wake-up item off the DIMSE queue and the C-STORE waited its whole
    # timeout (seen in loaded suite runs). Here the reactor is made slow after its checkpoint so the
    # window is always open; the abort must still end the wait at once, not after the timeout.
    original_init = Association.__init__

    def slow_reactor(self: Association, *args: object, **kwargs: object) -> None:
        original_init(self, *args, **kwargs)
        checkpoint, passed = self._reactor_checkpoint, self._reactor_checkpoint.wait

        def wait(*a: object, **k: object) -> bool:
            result = passed(*a, **k)  # type: ignore[arg-type]
            if threading.current_thread() is self:
                time.sleep(0.05)
            return result

        checkpoint.wait = wait  # type: ignore[method-assign]

    monkeypatch.setattr(Association, "__init__", slow_reactor)
    scp = storescp(when)
    files = [get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")]
    timeout_s, started = 60, time.monotonic()
    outcomes = store("AINODE", PeerAddress(scp.aet, "127.0.0.1", scp.port), files, timeout_s=timeout_s)
    # Not a speed check: without the fix each C-STORE waits the whole timeout.
    assert time.monotonic() - started < timeout_s / 2, "a C-STORE waited out its DIMSE timeout after the abort"
    assert [o.status for o in outcomes] == [None, None]
    assert all("the peer aborted the association" in str(o.error) for o in outcomes), outcomes


def test_echo_and_send_rejected_by_dcmtk_say_it_was_rejected_and_why(tmp_path, storescp):
    scp = storescp("--refuse")
    config = peer_config(tmp_path, pacs=(scp.aet, scp.port))
    result = ainode("echo", "pacs", "--config", config)
    assert result.returncode == 1
    assert "rejected: no reason given (permanent)" in one_line(result)
    sent = ainode("send", get_testdata_file("CT_small.dcm"), "--to", "pacs", "--config", config)
    assert sent.returncode == 1 and "rejected: no reason given (permanent)" in one_line(sent)


@pytest.fixture
def running_node(tmp_path: Path) -> Iterator[NodeProcess]:
    """``ainode serve`` that takes calls from PROBE (the start-up check) and SENDER only."""
    config = {
        "node": {
            "ae_title": "AINODE",
            "host": "127.0.0.1",
            "port": free_port(),
            "spool_dir": str(tmp_path / "node" / "spool"),
            "database_url": f"sqlite:///{tmp_path}/node/node.db",
            "workers": 1,
            "allowed_callers": ["PROBE", "SENDER"],
        },
        "routes": [],
    }
    node = NodeProcess(config, tmp_path / "node", cli=True).start()
    yield node
    node.stop()


def test_a_running_node_names_why_it_rejects_and_why_it_refuses_an_instance(tmp_path, running_node):
    port = running_node.port
    sender = tmp_path / "sender"
    sender.mkdir()
    config = peer_config(sender, "SENDER", node=("AINODE", port), wrong=("NOTTHENODE", port))
    stranger = tmp_path / "stranger"
    stranger.mkdir()

    ok = ainode("echo", "node", "--config", config)
    assert ok.returncode == 0 and "status 0x0000 success" in one_line(ok)
    wrong_called = ainode("echo", "wrong", "--config", config)
    assert wrong_called.returncode == 1
    assert "rejected: called AE title not recognised (permanent)" in one_line(wrong_called)
    wrong_calling = ainode("echo", "node", "--config", peer_config(stranger, "STRANGER", node=("AINODE", port)))
    assert wrong_calling.returncode == 1
    assert "rejected: calling AE title not recognised (permanent)" in one_line(wrong_calling)

    # The node answers 0xA900 for an instance without a Series Instance UID: the status, its
    # meaning and the node's comment in the file's own line.
    no_series = tmp_path / "no_series.dcm"
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.SeriesInstanceUID
    ds.save_as(no_series)
    sent = ainode("send", str(no_series), "--to", "node", "--config", config)
    assert sent.returncode == 1
    assert_quiet(sent)
    line = sent.stdout.splitlines()[0]
    assert line.startswith(f"{no_series}: FAILED status 0xA900 (data set does not match sop class): missing attribute")
