"""Loop prevention: is an incoming object one of this node's own results?

PACS often forward everything they receive, our results included; the router must never analyse
what the node produced. This reads the attributes :func:`pipelines.dicom.air.add_air_attributes`
writes. It needs pydicom only, so the receiving side can check a header without loading the writers.
"""

from __future__ import annotations

from pydicom.dataset import Dataset


def produced_by(ds: Dataset, device_uid: str, manufacturer: str) -> str | None:
    """Why ``ds`` is a result of this node (or of another node of the same software), or None: loop prevention.

    It reads the attributes :func:`pipelines.dicom.air.add_air_attributes` writes, Contributing Equipment
    items first, then General Equipment, and names the one that matched (for the router's "ignored:
    produced by this node").

    Parameters
    ----------
    ds
        An incoming dataset (headers suffice).
    device_uid
        This node's Device UID, as written into Contributing Equipment and General Equipment.
    manufacturer
        Our Manufacturer value; any node of the same software counts as "own" to avoid ping-pong between nodes.
    """
    for item in ds.get("ContributingEquipmentSequence", []):
        if item.get("DeviceUID") == device_uid:
            return f"ContributingEquipmentSequence DeviceUID {device_uid}"
        if str(item.get("Manufacturer", "")).strip() == manufacturer:
            return f"ContributingEquipmentSequence Manufacturer {manufacturer}"
    if ds.get("DeviceUID") == device_uid:
        return f"DeviceUID {device_uid}"
    if str(ds.get("Manufacturer", "")).strip() == manufacturer:
        return f"Manufacturer {manufacturer}"
    return None
