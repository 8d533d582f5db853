"""Outgoing DICOM: C-ECHO and C-STORE as a service user (pynetdicom)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

log = logging.getLogger("ainode.scu")


class AssociationFailed(ConnectionError):
    """The peer could not be reached or refused the association."""


@dataclass(frozen=True)
class PeerAddress:
    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class StoreOutcome:
    #: DIMSE status of the C-STORE response, None when no response came.
    status: int | None
    error: str | None = None

    @property
    def accepted(self) -> bool:
        # Success (0x0000) and the warnings (0x0001, 0xB000, 0xB007, 0xB006): the peer kept
        # the instance, possibly with coercion. Anything else is a failure to retry.
        return self.status is not None and (self.status == 0x0000 or self.status in (0x0001, 0xB000, 0xB006, 0xB007))


def _ae(calling_ae: str, timeout_s: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    return ae


def echo(calling_ae: str, peer: PeerAddress, timeout_s: float = 10) -> int:
    """C-ECHO ``peer``; returns the DIMSE status (0 = success) or raises AssociationFailed."""
    ae = _ae(calling_ae, timeout_s)
    ae.add_requested_context(Verification)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        raise AssociationFailed(f"association with {peer} {'rejected' if assoc.is_rejected else 'failed'}")
    try:
        rsp = assoc.send_c_echo()
        if not rsp:
            raise AssociationFailed(f"no C-ECHO response from {peer}")
        return int(rsp.Status)
    finally:
        assoc.release()


def store(
    calling_ae: str,
    peer: PeerAddress,
    items: Sequence[Dataset | Path | str],
    timeout_s: float = 30,
) -> list[StoreOutcome]:
    """C-STORE every item over one association; one outcome per item, in order.

    Raises AssociationFailed when no association can be made (nothing was sent).
    """
    datasets = [item if isinstance(item, Dataset) else dcmread(item) for item in items]
    ae = _ae(calling_ae, timeout_s)
    contexts: dict[str, set[str]] = {}
    for ds in datasets:
        syntax = (
            str(ds.file_meta.TransferSyntaxUID) if "file_meta" in ds and "TransferSyntaxUID" in ds.file_meta else None
        )
        contexts.setdefault(str(ds.SOPClassUID), {ExplicitVRLittleEndian, ImplicitVRLittleEndian}).update(
            [syntax] if syntax else []
        )
    if len(contexts) > 128:
        raise ValueError("more than 128 SOP classes in one association")
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, sorted(syntaxes))
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        raise AssociationFailed(f"association with {peer} {'rejected' if assoc.is_rejected else 'failed'}")
    outcomes: list[StoreOutcome] = []
    try:
        for ds in datasets:
            if not assoc.is_established:
                outcomes.append(StoreOutcome(None, "association ended before this instance was sent"))
                continue
            try:
                rsp = assoc.send_c_store(ds)
            except ValueError as exc:  # no accepted presentation context for this SOP class / syntax
                outcomes.append(StoreOutcome(None, str(exc)[:200]))
                continue
            if not rsp or "Status" not in rsp:
                outcomes.append(StoreOutcome(None, "no C-STORE response (timeout or abort)"))
            else:
                status = int(rsp.Status)
                comment = rsp.get("ErrorComment")
                outcomes.append(StoreOutcome(status, f"status 0x{status:04X} {comment or ''}".strip()))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes
