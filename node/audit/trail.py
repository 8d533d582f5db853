"""How the node's own audit events (``audit_events``) are worded, written and read in one place.

The receiver writes an association's events with these functions, and :mod:`node.audit.events`
reads them back to make DICOM audit messages: the wording changes here or nowhere. Details hold
AE titles, hosts, counts and UIDs; never a patient's name or ID.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

#: ``kind`` of an association's event: rejected at once, or (accepted) when it ended.
ASSOCIATION = "association"
#: ``kind`` of the outbox's events (results sent, or given up) and of an operator's commands.
DELIVERY = "delivery"
OPERATOR = "operator"
#: ``kind`` of the node's own start and stop (``detail`` "start" or "stop", ``actor`` the OS user).
APPLICATION = "application"

_ENDED = re.compile(
    r"^(?P<outcome>released|aborted): (?P<stored>\d+) stored, (?P<failed>\d+) failed(?:; studies (?P<uids>.*))?$"
)
_OPERATOR = re.compile(r"^(?P<command>.*) \((?P<user>[^()]*)\)$")


def caller(calling_ae: str, host: str | None) -> str:
    """The ``actor`` of an association's event: ``AE@host``."""
    return f"{calling_ae}@{host or ''}"[:128]


def association_rejected(reason: str) -> str:
    return f"rejected: {reason}"


def association_ended(outcome: str, stored: int, failed: int, study_uids: Iterable[str]) -> str:
    """``released: 30 stored, 0 failed; studies UID UID``: an accepted association, once it ended."""
    uids = " ".join(sorted(study_uids))
    return f"{outcome}: {stored} stored, {failed} failed" + (f"; studies {uids}" if uids else "")


@dataclass(frozen=True)
class AssociationEnded:
    outcome: str
    stored: int
    failed: int
    study_uids: tuple[str, ...]


def read_association(detail: str | None) -> AssociationEnded | str | None:
    """An association event's detail: :class:`AssociationEnded`, the rejection's reason (str), or None."""
    detail = detail or ""
    if detail.startswith("rejected: "):
        return detail.removeprefix("rejected: ")
    found = _ENDED.match(detail)
    if found is None:
        return None
    uids = tuple((found.group("uids") or "").split())
    return AssociationEnded(found.group("outcome"), int(found.group("stored")), int(found.group("failed")), uids)


def split_caller(actor: str | None) -> tuple[str, str | None]:
    """An association's actor, ``AE@host``, as (AE title, host or None)."""
    ae, _, host = (actor or "").partition("@")
    return ae, host or None


def split_peer(actor: str | None) -> tuple[str, str | None]:
    """The outbox's actor, ``AE@host:port`` (node.deliver.scu.PeerAddress), as (AE title, host or None)."""
    ae, _, address = (actor or "").partition("@")
    host, _, port = address.rpartition(":")  # the port is last: an IPv6 host keeps its colons
    return ae, (host if port.isdigit() else address) or None


def split_operator(actor: str | None) -> tuple[str, str]:
    """An operator command's actor, ``ainode jobs retry (alice)``, as (command, user)."""
    found = _OPERATOR.match(actor or "")
    if found is None:
        return actor or "", "unknown"
    return found.group("command"), found.group("user") or "unknown"
