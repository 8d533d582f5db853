"""Results of a study that came before its sender was configured as a peer (issue 11, item 2).

The node runs in its own process with the tests' pipeline (tests/support/runners.py); DCMTK
storescu is the modality and, once the operator has added it under ``peers``, DCMTK storescp
is its storage SCP. Where a delivery goes is decided when it is tried, from the configuration
in force then: the delivery waits (no attempt, no giving up) until its peer is known, and
``ainode outbox retry`` with the fixed configuration delivers it.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file

from tests.support.cli import ainode, status
from tests.support.nodeproc import NodeProcess, node_section
from tests.support.peers import StoreSCP, storescu
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.dcmtk]

SENDER_AE = "CT1"


def config_without_peers(tmp_path: Path) -> dict:
    return {
        "node": node_section(tmp_path),
        "peers": {},
        "routes": [
            {
                "name": "ct-test",
                "match": {"Modality": "CT"},
                "pipeline": "thumbnail",
                "destinations": ["sender"],
                "stable_after_s": 1,
            }
        ],
        "delivery": {"initial_delay_s": 0.5, "factor": 2, "max_delay_s": 2},
    }


def test_results_wait_for_an_unconfigured_sender_and_go_out_once_it_is_configured(tmp_path):
    config = config_without_peers(tmp_path)
    ct = get_testdata_file("CT_small.dcm")
    scp = StoreSCP(tmp_path / "modality", "+xa", aet=SENDER_AE)
    try:
        with NodeProcess(config, tmp_path / "n") as node:
            assert storescu(ct, node.port, called_ae="AINODE", calling_ae=SENDER_AE).returncode == 0
            st = wait_for(
                lambda: (s := status(node))["deliveries"] and s["deliveries"][0]["state"] == "waiting" and s,
                node=node,
                what="a waiting delivery",
            )
            (job,) = st["jobs"]
            assert job["state"] == "done"
            (delivery,) = st["deliveries"]
            assert delivery["attempts"] == 0
            assert delivery["last_error"].startswith(
                f"waiting for a peer: the sender {SENDER_AE}@127.0.0.1 has no entry under peers"
            )
            text = ainode("status", "--config", str(node.config_path), env=node.env)
            assert "waiting" in text.stdout and "has no entry under peers" in text.stdout
            # That a waiting delivery is never tried nor given up, however long it waits, is shown with an
            # injected clock in tests/unit/test_delivering.py (no sleep stands in for it here).

            # The operator adds the modality, first without the kind of result this pipeline makes.
            fixed = yaml.safe_load(node.config_path.read_text())
            fixed["peers"]["ct1"] = {"ae_title": SENDER_AE, "host": "127.0.0.1", "port": scp.port}
            wrong_outputs = tmp_path / "fixed-without-sc.yaml"
            wrong_outputs.write_text(yaml.safe_dump(fixed))
            refused = ainode("outbox", "retry", "--config", str(wrong_outputs), env=node.env)
            assert refused.returncode == 1, refused.stdout + refused.stderr
            assert "0 delivered" in refused.stdout and "1 failed" in refused.stdout
            assert "peer ct1 takes seg, sr, not sc results" in refused.stdout
            (delivery,) = status(node)["deliveries"]
            assert (delivery["state"], delivery["attempts"]) == ("failed", 0)
            assert scp.received() == []

            fixed["peers"]["ct1"]["outputs"] = ["sc"]
            good = tmp_path / "fixed.yaml"
            good.write_text(yaml.safe_dump(fixed))
            sent = ainode("outbox", "retry", "--config", str(good), env=node.env)
            assert sent.returncode == 0, sent.stdout + sent.stderr
            assert "1 deliveries due now: 1 delivered" in sent.stdout

            (delivery,) = status(node)["deliveries"]
            assert (delivery["state"], delivery["attempts"]) == ("delivered", 1)
            assert delivery["peer"] == f"{SENDER_AE}@127.0.0.1:{scp.port}"  # the address last tried
            (received_file,) = scp.received()
            received = pydicom.dcmread(received_file, stop_before_pixels=True)
            assert received.SOPInstanceUID == delivery["sop_instance_uid"]
            assert received.StudyInstanceUID == pydicom.dcmread(ct, stop_before_pixels=True).StudyInstanceUID
            assert "has no entry under peers" in node.log_text()
    finally:
        scp.stop()


def test_outbox_retry_reports_what_still_waits(tmp_path):
    config = config_without_peers(tmp_path)
    with NodeProcess(config, tmp_path / "n") as node:
        assert storescu(get_testdata_file("CT_small.dcm"), node.port, calling_ae=SENDER_AE).returncode == 0
        wait_for(lambda: any(d["state"] == "waiting" for d in status(node)["deliveries"]), node=node)
        still = ainode("outbox", "retry", "--config", str(node.config_path), env=node.env)
        assert still.returncode == 1
        assert "1 waiting for a peer" in still.stdout
        assert f"delivery 1 waiting: waiting for a peer: the sender {SENDER_AE}@127.0.0.1" in still.stdout
        (delivery,) = status(node)["deliveries"]
        assert (delivery["state"], delivery["attempts"]) == ("waiting", 0)
