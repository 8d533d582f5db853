"""The unit lane: the node's parts built directly, no peers, no subprocesses (``pytest tests/unit``, < 60 s)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.node_parts import Clock, NodeParts, build_node


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def node(tmp_path: Path, clock: Clock) -> NodeParts:
    """A node's parts on a fresh SQLite database, with the default test config (CT -> thumbnail -> pacs)."""
    return build_node(tmp_path, clock)
