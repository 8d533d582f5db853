"""One DICOM audit message (PS3.15 A.5.1): what happened, who took part, what it was about, as XML.

The element and attribute names, their order and the enumerated values are those of the A.5.1
schema: EventIdentification, one or more ActiveParticipant, AuditSourceIdentification, then the
ParticipantObjectIdentification of each object. ParticipantObjectName is never written: this node
names no patient in its audit messages, it identifies studies and patients by their IDs only.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, datetime

from node.audit.codes import (
    APPLICATION_SERVER_PROCESS,
    Code,
    EventAction,
    EventOutcome,
    NetworkAccessPointType,
    ObjectIDType,
    ObjectRole,
    ObjectType,
)

# XML 1.0 allows no other control characters, even escaped.
_NOT_XML = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _xml_text(value: str) -> str:
    return _NOT_XML.sub("?", value)


def event_date_time(at: datetime) -> str:
    """xsd:dateTime in UTC with milliseconds (A.5.2.5: unambiguous as to the time zone)."""
    if at.tzinfo is None:
        raise ValueError("an audit event's time must be timezone-aware")
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def access_point_type(address: str) -> NetworkAccessPointType:
    """NetworkAccessPointTypeCode of ``address``: 2 for an IP address, 1 for a host name."""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return NetworkAccessPointType.MACHINE_NAME
    return NetworkAccessPointType.IP_ADDRESS


@dataclass(frozen=True)
class ActiveParticipant:
    """A person or process that took part: a sending or receiving AE, an operator, this node.

    Parameters
    ----------
    user_id
        Who: an AE title for a DICOM application, a login name for a person.
    user_is_requestor
        Whether this participant started the event (the calling AE of an association, the operator).
    roles
        RoleIDCode values, e.g. :attr:`RoleID.SOURCE` for the sender of instances.
    network_access_point
        The host name or IP address it acted from, when known.
    """

    user_id: str
    user_is_requestor: bool
    roles: tuple[Code, ...] = ()
    alternative_user_id: str | None = None
    network_access_point: str | None = None

    def __post_init__(self) -> None:
        if not self.user_id:
            raise ValueError("an active participant needs a user_id")


@dataclass(frozen=True)
class SOPClassCount:
    """Instances of one SOP class in a study object's ParticipantObjectDescription."""

    uid: str
    count: int
    instance_uids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.count < 0 or len(self.instance_uids) > self.count:
            raise ValueError(f"SOP class {self.uid}: count {self.count} for {len(self.instance_uids)} instance UIDs")


@dataclass(frozen=True)
class ParticipantObject:
    """An object the event was about: a study (by its UID), a patient (by the Patient ID), a node."""

    object_id: str
    id_type: Code
    type_code: ObjectType
    role: ObjectRole
    #: ParticipantObjectDetail: (type, value) pairs; values are written base64-encoded, as the schema wants.
    details: tuple[tuple[str, str], ...] = ()
    sop_classes: tuple[SOPClassCount, ...] = ()

    def __post_init__(self) -> None:
        if not self.object_id:
            raise ValueError("a participant object needs an object_id")

    @classmethod
    def study(cls, study_uid: str, sop_classes: tuple[SOPClassCount, ...] = ()) -> ParticipantObject:
        return cls(study_uid, ObjectIDType.STUDY_INSTANCE_UID, ObjectType.SYSTEM_OBJECT, ObjectRole.REPORT,
                   sop_classes=sop_classes)  # fmt: skip

    @classmethod
    def patient(cls, patient_id: str) -> ParticipantObject:
        # The Patient ID only: A.5.3 makes the patient's name optional, and this node never sends it.
        return cls(patient_id, ObjectIDType.PATIENT_NUMBER, ObjectType.PERSON, ObjectRole.PATIENT)


@dataclass(frozen=True)
class AuditSource:
    """AuditSourceIdentification: the system reporting the event (this node)."""

    source_id: str
    enterprise_site_id: str | None = None


@dataclass(frozen=True)
class AuditMessage:
    """One event as PS3.15 A.5 describes it; :meth:`to_xml` writes it.

    Parameters
    ----------
    event_id
        EventID, e.g. :attr:`EventID.INSTANCES_TRANSFERRED`.
    at
        When the event happened (timezone-aware): EventDateTime.
    participants
        At least one ActiveParticipant.
    objects
        ParticipantObjectIdentification, e.g. the study and its patient.
    """

    event_id: Code
    action: EventAction
    at: datetime
    outcome: EventOutcome
    participants: tuple[ActiveParticipant, ...]
    source: AuditSource
    objects: tuple[ParticipantObject, ...] = ()
    event_types: tuple[Code, ...] = ()
    outcome_description: str | None = None

    def __post_init__(self) -> None:
        if not self.participants:
            raise ValueError("an audit message needs at least one active participant")
        event_date_time(self.at)  # raises for a naive time

    def to_xml(self) -> str:
        """The message as an XML document (UTF-8 declared), element and attribute order as in A.5.1."""
        root = ET.Element("AuditMessage")
        event = ET.SubElement(
            root,
            "EventIdentification",
            EventActionCode=self.action.value,
            EventDateTime=event_date_time(self.at),
            EventOutcomeIndicator=self.outcome.value,
        )
        _coded(event, "EventID", self.event_id)
        for event_type in self.event_types:
            _coded(event, "EventTypeCode", event_type)
        if self.outcome_description:
            ET.SubElement(event, "EventOutcomeDescription").text = _xml_text(self.outcome_description)
        for p in self.participants:
            attributes = {"UserID": _xml_text(p.user_id)}
            if p.alternative_user_id:
                attributes["AlternativeUserID"] = _xml_text(p.alternative_user_id)
            attributes["UserIsRequestor"] = "true" if p.user_is_requestor else "false"
            if p.network_access_point:
                attributes["NetworkAccessPointID"] = _xml_text(p.network_access_point)
                attributes["NetworkAccessPointTypeCode"] = access_point_type(p.network_access_point).value
            element = ET.SubElement(root, "ActiveParticipant", attributes)
            for role in p.roles:
                _coded(element, "RoleIDCode", role)
        source = {"AuditSourceID": _xml_text(self.source.source_id)}
        if self.source.enterprise_site_id:
            source = {"AuditEnterpriseSiteID": _xml_text(self.source.enterprise_site_id), **source}
        source_element = ET.SubElement(root, "AuditSourceIdentification", source)
        ET.SubElement(source_element, "AuditSourceTypeCode", {"csd-code": APPLICATION_SERVER_PROCESS})
        for obj in self.objects:
            element = ET.SubElement(
                root,
                "ParticipantObjectIdentification",
                ParticipantObjectID=_xml_text(obj.object_id),
                ParticipantObjectTypeCode=obj.type_code.value,
                ParticipantObjectTypeCodeRole=obj.role.value,
            )
            _coded(element, "ParticipantObjectIDTypeCode", obj.id_type)
            for kind, value in obj.details:
                encoded = base64.b64encode(value.encode("utf-8")).decode("ascii")
                ET.SubElement(element, "ParticipantObjectDetail", type=kind, value=encoded)
            if obj.sop_classes:
                description = ET.SubElement(element, "ParticipantObjectDescription")
                for sop_class in obj.sop_classes:
                    counted = ET.SubElement(description, "SOPClass", UID=sop_class.uid,
                                            NumberOfInstances=str(sop_class.count))  # fmt: skip
                    for uid in sop_class.instance_uids:
                        ET.SubElement(counted, "Instance", UID=uid)
        return '<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(root, encoding="unicode")


def _coded(parent: ET.Element, name: str, code: Code) -> None:
    ET.SubElement(parent, name, {"csd-code": code.code, "codeSystemName": code.scheme, "originalText": code.meaning})
