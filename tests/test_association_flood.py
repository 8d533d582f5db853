"""A flood of idle and half-open connections does not lock the scanners out (issue 12, item 1).

Before: 40 connections that sent the first 8 bytes of an A-ASSOCIATE-RQ and stalled were never closed,
and every real echoscu/storescu meanwhile got A-ASSOCIATE-RJ "Local Limit Exceeded". The attackers here
connect from other loopback addresses (127.0.0.2 and up, as other hosts would), the real sender is DCMTK
from 127.0.0.1, a configured peer.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from node.receive.scp import AssociationLimits
from tests.support.nodeproc import NodeProcess, node_section
from tests.support.peers import echoscu, storescu
from tests.support.waiting import wait_for

pytestmark = pytest.mark.dcmtk

LIMITS = {"max_associations": 32, "max_associations_per_host": 8, "reserved_for_known_peers": 8}


def connect_from(source: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def half_open_request(s: socket.socket) -> None:
    """The first 8 bytes of an A-ASSOCIATE-RQ (type 1, a length, protocol version) and nothing more."""
    s.sendall(struct.pack(">BBLH", 0x01, 0x00, 200, 0x0001))


def closed_by_peer(s: socket.socket) -> bool:
    s.settimeout(0.05)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:  # reset
        return True


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    config = {
        "node": node_section(tmp_path, association_timeout_s=2, **LIMITS),
        "peers": {"ct": {"ae_title": "STORESCU", "host": "127.0.0.1", "port": 104}},
        "routes": [],
    }
    with NodeProcess(config, tmp_path / "node") as n:
        yield n


def test_half_open_and_idle_connections_are_closed_and_a_known_sender_is_served_meanwhile(
    node: NodeProcess, tmp_path: Path
) -> None:
    attackers: list[socket.socket] = []
    try:
        for k in range(40):  # 40 half-open, from 10 hosts
            s = connect_from(f"127.0.0.{2 + k % 10}", node.port)
            half_open_request(s)
            attackers.append(s)
        for k in range(200):  # 200 idle, from 50 hosts
            attackers.append(connect_from(f"127.0.1.{1 + k % 50}", node.port))

        # While the flood holds its sockets: the scanner's echo and store go through.
        echo = echoscu(node.port, called_ae="AINODE", calling_ae="STORESCU")
        assert echo.returncode == 0, echo.stdout + echo.stderr
        sent = storescu(get_testdata_file("CT_small.dcm"), node.port, called_ae="AINODE")
        assert sent.returncode == 0, sent.stdout + sent.stderr

        # Every attacking connection is closed by the node (ARTIM 2 s, per-host and total limits).
        wait_for(lambda: all(closed_by_peer(s) for s in attackers), 60, "every flood connection closed", node)
    finally:
        for s in attackers:
            s.close()
    assert "refused" in node.log_text()


def test_one_host_gets_at_most_its_share_of_connections(node: NodeProcess) -> None:
    mine = [connect_from("127.0.0.77", node.port) for _ in range(12)]
    try:
        # Beyond max_associations_per_host (8) the node refuses the connection as it accepts it, saying why.
        wait_for(lambda: node.log_text().count("connections open from 127.0.0.77, limit per host 8") >= 4, 30,
                 "4 of 12 connections refused by the per-host limit", node)  # fmt: skip
        wait_for(lambda: sum(closed_by_peer(s) for s in mine) >= 4, 30, "4 of 12 connections closed", node)
    finally:
        for s in mine:
            s.close()


def test_the_last_slots_go_only_to_known_hosts() -> None:
    limits = AssociationLimits(total=32, per_host=8, reserved_for_known=8, known_hosts=frozenset({"10.0.0.5"}))

    assert limits.refusal("10.9.9.9", open_total=23, open_from_host=0) is None
    assert "kept for known peers" in (limits.refusal("10.9.9.9", open_total=24, open_from_host=0) or "")
    assert limits.refusal("10.0.0.5", open_total=31, open_from_host=0) is None
    assert "limit 32" in (limits.refusal("10.0.0.5", open_total=32, open_from_host=0) or "")
    assert "limit per host 8" in (limits.refusal("10.0.0.5", open_total=3, open_from_host=8) or "")
