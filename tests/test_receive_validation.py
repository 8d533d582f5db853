"""What a C-STORE status promises (README "Receiving"): damaged or inconsistent datasets are refused, not kept.

Issue 12, items 2 and 5: a dataset with its Pixel Data cut in half was acknowledged 0x0000 and
stored damaged; a CT instance declaring 2147483647 frames was acknowledged and then exhausted a
worker's memory; garbage got 0xA900 where the README promises 0xC000; a CT sent on an MR
context was recorded as MR; an over-long Affected SOP Instance UID aborted the association.
Each is sent here by a real pynetdicom SCU, as raw file bytes where the SCU would otherwise fix
the dataset up, to the node's own SCP.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage, EnhancedMRImageStorage, MRImageStorage  # type: ignore[attr-defined]

from tests.support.inprocess import Receiver, start_receiver
from tests.support.series import ct_series

SUCCESS, MISMATCH, CANNOT_UNDERSTAND = 0x0000, 0xA900, 0xC000


@pytest.fixture
def receiver(tmp_path: Path):
    r = start_receiver(tmp_path)
    yield r
    r.stop()


def send(receiver: Receiver, ds: pydicom.Dataset, context=CTImageStorage, syntax=ExplicitVRLittleEndian) -> int:
    """One C-STORE of ``ds`` from a pynetdicom SCU, on a context of ``context`` and ``syntax``."""
    body = encode(ds, is_implicit_vr=False, is_little_endian=True)
    assert body is not None
    return send_raw(receiver, body, str(ds.SOPClassUID), str(ds.SOPInstanceUID), context, syntax)


def send_raw(receiver: Receiver, body: bytes, sop_class: str, sop_instance: str, context: str, syntax: str) -> int:
    """A C-STORE request as a faulty or hostile SCU makes it: the request's UIDs and the dataset bytes as given.

    pynetdicom's own ``send_c_store`` checks and re-encodes what it sends; a scanner's firmware does not.
    """
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(context, [syntax])
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="AINODE")
    assert assoc.is_established
    try:
        (accepted,) = assoc.accepted_contexts
        request = C_STORE()
        request.MessageID = 1
        request.Priority = 2
        request.AffectedSOPClassUID = sop_class
        request._affected_sop_instance_uid = UID(sop_instance)  # past pynetdicom's own UID check
        request.DataSet = io.BytesIO(body)
        # As send_c_store does: pause the association's reactor so that the response comes to us.
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        try:
            assoc.dimse.send_msg(request, accepted.context_id)
            _, response = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        assert response is not None, "the association was aborted instead of answering a status"
        return int(response.Status)
    finally:
        if assoc.is_established:
            assoc.release()


def one_ct_slice():
    (ds,) = ct_series(1)
    return ds


def test_native_pixel_data_shorter_than_its_header_declares_is_refused(receiver: Receiver) -> None:
    ds = one_ct_slice()
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]

    assert send(receiver, ds) == MISMATCH
    assert receiver.instances() == {}


def test_a_frame_count_the_pixel_data_cannot_hold_is_refused_before_anything_is_allocated(receiver: Receiver) -> None:
    ds = one_ct_slice()
    ds.NumberOfFrames = 2147483647

    assert send(receiver, ds) == MISMATCH
    assert receiver.instances() == {}


def test_encapsulated_pixel_data_with_fewer_fragments_than_frames_is_refused(receiver: Receiver) -> None:
    ds = pydicom.dcmread(get_testdata_file("emri_small_jpeg_2k_lossless.dcm"))  # 10 frames, 10 fragments
    ds.NumberOfFrames = 1000

    assert send(receiver, ds, EnhancedMRImageStorage, JPEG2000Lossless) == MISMATCH
    assert receiver.instances() == {}


def test_a_whole_instance_is_still_kept(receiver: Receiver) -> None:
    assert send(receiver, one_ct_slice()) == SUCCESS
    assert len(receiver.instances()) == 1


def test_garbage_is_answered_cannot_understand(receiver: Receiver) -> None:
    rng = np.random.default_rng(12)
    # Element-shaped garbage: private group 0x0009 tags that decode, but name nothing a composite instance has.
    body = b"".join(b"\x09\x00" + int(e).to_bytes(2, "little") + b"OB\x00\x00" + (16).to_bytes(4, "little")
                    + rng.bytes(16) for e in range(0x1000, 0x1040))  # fmt: skip

    assert send_raw(receiver, body, CTImageStorage, generate_uid(), CTImageStorage, ExplicitVRLittleEndian) == (
        CANNOT_UNDERSTAND
    )
    assert receiver.instances() == {}


def test_a_ct_dataset_sent_on_an_mr_context_is_refused_as_a_sop_class_mismatch(receiver: Receiver) -> None:
    ds = one_ct_slice()
    body = encode(ds, is_implicit_vr=False, is_little_endian=True)
    assert body is not None

    status = send_raw(receiver, body, MRImageStorage, str(ds.SOPInstanceUID), MRImageStorage, ExplicitVRLittleEndian)

    assert status == MISMATCH
    assert receiver.instances() == {}
    (assoc,) = receiver.ended_associations(1)
    assert (assoc.stored, assoc.failed) == (0, 1)


def test_an_over_long_sop_instance_uid_gets_a_status_not_an_abort(receiver: Receiver) -> None:
    ds = one_ct_slice()
    long_uid = "1.2." + "3" * 70
    ds.SOPInstanceUID = long_uid
    body = encode(ds, is_implicit_vr=False, is_little_endian=True)
    assert body is not None

    assert send_raw(receiver, body, CTImageStorage, long_uid, CTImageStorage, ExplicitVRLittleEndian) == MISMATCH
    assert receiver.instances() == {}
    # The node still serves the next sender.
    assert send(receiver, one_ct_slice()) == SUCCESS
