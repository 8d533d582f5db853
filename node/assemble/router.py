"""Declarative routing: first matching route wins; no eval, only data.

Conditions compare a tag's value with ``equals`` (strings after stripping DICOM padding;
numbers numerically), ``one_of``, ``regex`` (``re.search``) or a numeric ``range``
[min, max] inclusive. A multi-valued attribute (ImageType, say) matches when any of its
values does. A missing or empty attribute never matches.

Before any rule: the node never routes objects it made itself, because PACS often
forward everything they receive, our own results included, back to us.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.multival import MultiValue

from node.config import Condition, Config, Route
from node.identity import MANUFACTURER, device_uid
from pipelines.provenance import produced_by


@dataclass(frozen=True)
class RouteDecision:
    route: Route | None
    #: Human-readable: why this route, or why none.
    reason: str


@lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _values(ds: Dataset, tag: int) -> list[object]:
    if tag not in ds:
        return []
    value = ds[tag].value
    if value is None or value == "":
        return []
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    return [v.strip() if isinstance(v, str) else v for v in items if v is not None and v != ""]


def _as_number(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _same(actual: object, expected: str | float) -> bool:
    if isinstance(expected, int | float) and not isinstance(expected, bool):
        number = _as_number(actual)
        return number is not None and number == float(expected)
    return str(actual).strip() == str(expected).strip()


def _matches(cond: Condition, values: list[object]) -> bool:
    for v in values:
        if cond.equals is not None and _same(v, cond.equals):
            return True
        if cond.one_of is not None and any(_same(v, e) for e in cond.one_of):
            return True
        if cond.regex is not None and _compiled(cond.regex).search(str(v)):
            return True
        if cond.range is not None:
            number = _as_number(v)
            lo, hi = cond.range
            if number is not None and (lo is None or number >= lo) and (hi is None or number <= hi):
                return True
    return False


def _describe(cond: Condition) -> str:
    if cond.equals is not None:
        return f"== {cond.equals}"
    if cond.one_of is not None:
        return f"in {list(cond.one_of)}"
    if cond.regex is not None:
        return f"~ /{cond.regex}/"
    lo, hi = cond.range or (None, None)
    return f"in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"


class Router:
    def __init__(self, routes: Sequence[Route], own_device_uid: str, own_manufacturer: str = "dicom-ai-node") -> None:
        self.routes = list(routes)
        self.own_device_uid = own_device_uid
        self.own_manufacturer = own_manufacturer

    def route(self, ds: Dataset) -> RouteDecision:
        own = produced_by(ds, self.own_device_uid, self.own_manufacturer)
        if own is not None:
            return RouteDecision(None, f"ignored: produced by this node ({own})")
        misses = []
        for route in self.routes:
            why_not = None
            because = []
            for name, tag, cond in route.conditions():
                values = _values(ds, tag)
                if not values:
                    why_not = f"{name} missing"
                    break
                shown = values[0] if len(values) == 1 else "\\".join(map(str, values))
                if not _matches(cond, values):
                    why_not = f"{name} {shown} not {_describe(cond)}"
                    break
                because.append(f"{name} {shown} {_describe(cond)}")
            if why_not is None:
                return RouteDecision(route, f"route {route.name}: " + ("; ".join(because) or "matches everything"))
            misses.append(f"{route.name}: {why_not}")
        return RouteDecision(None, "no route matched" + (": " + "; ".join(misses) if misses else " (no routes)"))


def route_test_command(config: Config, files: Sequence[Path]) -> tuple[int, str]:
    """``ainode route-test FILE...`` (folders expanded by the CLI): per file, route, pipeline, destinations, why."""
    router = Router(config.routes, own_device_uid=device_uid(config), own_manufacturer=MANUFACTURER)
    lines = []
    failed = 0
    for path in files:
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            lines.append(f"{path}: cannot read as DICOM: {type(exc).__name__}: {exc}")
            failed += 1
            continue
        decision = router.route(ds)
        sop = ds.get("SOPInstanceUID", "?")
        if decision.route is None:
            lines.append(f"{path} [{sop}]: not routed — {decision.reason}")
        else:
            r = decision.route
            lines.append(
                f"{path} [{sop}]: route {r.name} -> pipeline {r.pipeline} -> {', '.join(r.destinations)} "
                f"(stable after {r.stable_after_s:g} s) — {decision.reason}"
            )
    if failed:
        lines.append(f"{failed} file(s) could not be read")
    return (1 if failed else 0), "\n".join(lines)
