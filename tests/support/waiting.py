"""Wait on a condition with a bound, instead of sleeping for a time that stands in for it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from tests.support.nodeproc import NodeProcess

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    timeout_s: float = 60,
    what: str = "condition",
    node: NodeProcess | None = None,
    step_s: float = 0.3,
) -> T:
    """Poll ``predicate`` until it returns something true and return that; fail after ``timeout_s``.

    The failure names ``what`` and, with ``node``, shows the end of the node's log.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step_s)
    log = node.log_text()[-3000:] if node else ""
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{log}")
