"""How ``ainode status`` shows the node's state (:func:`node.status.collect_status`): studies, jobs (with the
series each pipeline chose), the outbox with their states, and the associations the node rejected, with why."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def format_status(status: dict[str, Any]) -> str:
    lines = []
    spool = status.get("spool")
    if spool is not None:
        if spool["refusing"]:
            lines.append(f"spool: REFUSING instances (C-STORE 0xA700): {spool['refusing']}")
        else:
            lines.append(f"spool: {spool['free_mb']} MB free (min_free_disk_mb {spool['min_free_mb']})")
    c = status["counts"]
    for title in ("studies", "jobs", "deliveries"):
        parts = ", ".join(f"{k} {v}" for k, v in sorted(c[title].items())) or "none"
        lines.append(f"{title}: {parts}")
    lines.append("")
    lines += _table(
        ("STUDY INSTANCE UID", "STATE", "V", "INST", "SENDER", "NOTE"),
        [
            (s["study_instance_uid"], s["state"], s["version"], s["instances"], s["sender"], s["note"])
            for s in status["studies"]
        ],
    )
    lines.append("")
    lines += _table(
        ("JOB", "STATE", "ROUTE/PIPELINE", "TRIES", "REASON"),
        [(j["id"], j["state"], f"{j['route']}/{j['pipeline']}", j["attempts"], j["reason"]) for j in status["jobs"]],
    )
    chosen = [j for j in status["jobs"] if j.get("selection")]
    if chosen:
        lines.append("")
        lines.append("SERIES SELECTION")
        for j in chosen:
            lines.append(f"job {j['id']} study {j['study_instance_uid']}: {j['selection']}")
    lines.append("")
    rows = []
    for d in status["deliveries"]:
        extra = d["next_attempt_at"] or d["delivered_at"] or ""
        if d["last_error"]:
            extra = f"{extra} {d['last_error']}".strip()
        rows.append((d["id"], d["state"], d["kind"], f"{d['destination']} {d['peer']}", d["attempts"], extra))
    lines += _table(("DELIVERY", "STATE", "KIND", "DESTINATION", "TRIES", "NEXT / ERROR"), rows)
    rejected = status.get("rejected_associations") or []
    if rejected:
        lines.append("")
        lines += _table(
            ("REJECTED ASSOCIATION", "CALLING AE", "HOST", "REASON"),
            [(a["at"], a["calling_ae"], a["host"], a["reason"]) for a in rejected],
        )
    return "\n".join(lines)


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Header and rows, each column as wide as its widest cell (two spaces between); the last runs free.

    Widths come from the data, so a long route, pipeline or destination shifts its column rather than
    the cells after it. An empty cell shows as "-" so that every column starts where its header does.
    """
    cells = [[str(v) if v not in (None, "") else "-" for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join([*(v.ljust(w) for v, w in zip(values[:-1], widths, strict=False)), values[-1]]).rstrip()

    return [line(headers), *(line(r) for r in cells)]
