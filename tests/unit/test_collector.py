"""node/operate/collector.py: what a started node loaded is left out of the collector's scans; new garbage is not."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from node.operate.collector import YOUNG_THRESHOLD, settle


@pytest.fixture
def restored_collector() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _cycle() -> weakref.ref[_Node]:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_settle_freezes_what_is_alive_and_still_frees_cycles_made_after(restored_collector: None) -> None:
    kept = [_Node() for _ in range(100)]  # alive at start: the node's loaded libraries
    frozen = settle()
    assert frozen >= len(kept) and gc.get_freeze_count() == frozen
    scanned = {id(o) for o in gc.get_objects()}
    assert all(gc.is_tracked(k) and id(k) not in scanned for k in kept)  # out of every generation's scan
    assert gc.get_threshold()[0] == YOUNG_THRESHOLD
    # A reference cycle made while serving (a job's datasets) is still found and freed.
    ref = _cycle()
    assert ref() is not None
    gc.collect()
    assert ref() is None
