"""The node's audit events as DICOM audit messages (PS3.15 A.5.3): an event makes none, one or several.

- association rejected: Security Alert (110113), type Node Authentication (110126), minor failure,
  with the calling AE, its host and the reason;
- association ended with instances stored: DICOM Instances Transferred (110104), Create, one per
  study, the calling AE as source and the node as destination;
- result delivered, or given up: DICOM Instances Transferred (110104), Read, the node as source and
  the peer as destination (given up: serious failure);
- ``ainode jobs retry``, ``ainode studies reprocess``, ``ainode outbox retry``: DICOM Instances
  Accessed (110103), Read, one per study, the operator (the OS user) as the requestor;
- the node started or stopped: Application Activity (110100), Application Start / Stop (110120 / 110121),
  the node as the application and the OS user as its launcher.

Other events (job transitions, series selection, duplicates, redeliveries) are the node's own
bookkeeping and make no message. A.5.3.7 allows one patient per message, so an event about several
studies makes one message per study. The patient is identified by the Patient ID the study was
received with; no name is ever written.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Association, AuditEvent, Delivery, Instance, Job, Result, Series, Study
from node.audit.codes import (
    Code,
    EventAction,
    EventID,
    EventOutcome,
    EventType,
    ObjectIDType,
    ObjectRole,
    ObjectType,
    RoleID,
)
from node.audit.message import ActiveParticipant, AuditMessage, AuditSource, ParticipantObject, SOPClassCount
from node.audit.trail import (
    APPLICATION,
    ASSOCIATION,
    DELIVERY,
    OPERATOR,
    AssociationEnded,
    read_association,
    split_caller,
    split_operator,
    split_peer,
)

#: The operator commands that make the node read a study again or send its results again.
_OPERATOR_TYPES = {
    "ainode jobs retry": EventType.JOB_RETRY,
    "ainode studies reprocess": EventType.STUDY_REPROCESS,
    "ainode outbox retry": EventType.RESULTS_RESEND,
}


@dataclass(frozen=True)
class NodeIdentity:
    """This node in its messages: its AE title as a participant, and the audit source."""

    ae_title: str
    source: AuditSource


def messages_for(session: Session, event: AuditEvent, node: NodeIdentity) -> list[AuditMessage]:
    """The DICOM audit messages ``event`` stands for (none for the node's own bookkeeping)."""
    if event.kind == ASSOCIATION:
        return _association(session, event, node)
    if event.kind == DELIVERY:
        return _delivery(session, event, node)
    if event.kind == OPERATOR:
        return _operator(session, event, node)
    if event.kind == APPLICATION:
        return _application(event, node)
    return []


def _application(event: AuditEvent, node: NodeIdentity) -> list[AuditMessage]:
    """Application Activity (A.5.3.1): the node started or stopped, launched by an OS user."""
    kind = {"start": EventType.APPLICATION_START, "stop": EventType.APPLICATION_STOP}.get(event.detail or "")
    if kind is None:
        return []
    participants = [ActiveParticipant(node.ae_title, False, (RoleID.APPLICATION,))]
    if event.actor:
        participants.append(ActiveParticipant(event.actor, True, (RoleID.APPLICATION_LAUNCHER,)))
    return [
        AuditMessage(
            EventID.APPLICATION_ACTIVITY,
            EventAction.EXECUTE,
            event.at,
            EventOutcome.SUCCESS,
            tuple(participants),
            node.source,
            event_types=(kind,),
        )
    ]


def _studies(session: Session, study_uids: Iterable[str]) -> list[tuple[str, str | None]]:
    """(Study Instance UID, Patient ID) of each UID, in the order given; the Patient ID None when not recorded."""
    uids = list(dict.fromkeys(study_uids))
    query = select(Study.study_instance_uid, Study.patient_id).where(Study.study_instance_uid.in_(uids))
    found: dict[str, str | None] = {uid: patient_id for uid, patient_id in session.execute(query)}
    return [(uid, found.get(uid)) for uid in uids]


def _objects(study_uid: str, patient_id: str | None, sop_classes: tuple[SOPClassCount, ...] = ()) -> tuple:
    study = ParticipantObject.study(study_uid, sop_classes)
    return (study, ParticipantObject.patient(patient_id)) if patient_id else (study,)


# -- associations -------------------------------------------------------------------------------
def _association(session: Session, event: AuditEvent, node: NodeIdentity) -> list[AuditMessage]:
    read = read_association(event.detail)
    calling_ae, host = split_caller(event.actor)
    peer_id = calling_ae or host or "unknown"
    if isinstance(read, str):
        # A.5.3.11: the node refused a node it could not authenticate (by AE title and host).
        alert_subject = ParticipantObject(
            event.actor or peer_id,
            ObjectIDType.NODE_ID,
            ObjectType.SYSTEM_OBJECT,
            ObjectRole.SECURITY_RESOURCE,
            details=(("Alert Description", read),),
        )
        return [
            AuditMessage(
                EventID.SECURITY_ALERT,
                EventAction.EXECUTE,
                event.at,
                EventOutcome.MINOR_FAILURE,
                (
                    ActiveParticipant(peer_id, True, network_access_point=host),
                    ActiveParticipant(node.ae_title, False, (RoleID.APPLICATION,)),
                ),
                node.source,
                (alert_subject,),
                event_types=(EventType.NODE_AUTHENTICATION,),
                outcome_description=read,
            )
        ]
    if not isinstance(read, AssociationEnded) or not read.study_uids:
        return []  # a C-ECHO, or nothing stored: no instance was transferred
    subject = event.subject or ""
    row = session.get(Association, int(subject)) if subject.isdigit() else None
    counts = _received_sop_classes(session, row.id) if row is not None else {}
    outcome, why = EventOutcome.SUCCESS, None
    if read.failed or read.outcome != "released":
        outcome = EventOutcome.MINOR_FAILURE
        why = f"association {read.outcome}: {read.stored} instances stored, {read.failed} refused"
    participants = (
        ActiveParticipant(peer_id, True, (RoleID.SOURCE,), network_access_point=host),
        ActiveParticipant(row.called_ae if row is not None else node.ae_title, False, (RoleID.DESTINATION,)),
    )
    return [
        AuditMessage(
            EventID.INSTANCES_TRANSFERRED,
            EventAction.CREATE,
            event.at,
            outcome,
            participants,
            node.source,
            _objects(uid, patient_id, counts.get(uid, ())),
            outcome_description=why,
        )
        for uid, patient_id in _studies(session, read.study_uids)
    ]


def _received_sop_classes(session: Session, association_id: int) -> dict[str, tuple[SOPClassCount, ...]]:
    """Per study, the SOP classes and counts of the instances an association stored (as far as still indexed)."""
    rows = session.execute(
        select(Study.study_instance_uid, Instance.sop_class_uid, func.count(Instance.id))
        .join(Series, Instance.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
        .where(Instance.association_id == association_id)
        .group_by(Study.study_instance_uid, Instance.sop_class_uid)
        .order_by(Study.study_instance_uid, Instance.sop_class_uid)
    )
    out: dict[str, tuple[SOPClassCount, ...]] = {}
    for uid, sop_class, count in rows:
        out[uid] = (*out.get(uid, ()), SOPClassCount(sop_class, count))
    return out


# -- deliveries ---------------------------------------------------------------------------------
def _delivery(session: Session, event: AuditEvent, node: NodeIdentity) -> list[AuditMessage]:
    detail = event.detail or ""
    subject = event.subject or ""
    if detail == "delivered" or detail.startswith("gave up: "):
        # The outbox's own events: the subject is the result's SOP Instance UID, the actor the peer.
        peer_ae, host = split_peer(event.actor)
        result = session.scalars(select(Result).where(Result.sop_instance_uid == subject)).first()
        why = detail.removeprefix("gave up: ") if detail != "delivered" else None
    elif subject.isdigit():
        # Held back (the peer does not take this kind of result, or gave up waiting): the subject is the delivery.
        row = session.get(Delivery, int(subject))
        if row is None:
            return []
        peer_ae, host, result, why = row.ae_title, row.host, row.result, detail
    else:
        return []
    if result is None:
        return []
    study = result.job.study
    sop_class = SOPClassCount(result.sop_class_uid, 1, (result.sop_instance_uid,))
    return [
        AuditMessage(
            EventID.INSTANCES_TRANSFERRED,
            EventAction.READ,  # A.5.3.7: the audit source is the sender, not the receiver
            event.at,
            EventOutcome.SUCCESS if why is None else EventOutcome.SERIOUS_FAILURE,
            (
                ActiveParticipant(node.ae_title, True, (RoleID.SOURCE,)),
                ActiveParticipant(peer_ae or "unknown", False, (RoleID.DESTINATION,), network_access_point=host),
            ),
            node.source,
            _objects(study.study_instance_uid, study.patient_id, (sop_class,)),
            outcome_description=why,
        )
    ]


# -- operator commands --------------------------------------------------------------------------
def _operator(session: Session, event: AuditEvent, node: NodeIdentity) -> list[AuditMessage]:
    command, user = split_operator(event.actor)
    event_type = _OPERATOR_TYPES.get(command)
    if event_type is None:
        return []
    subject = event.subject or ""
    studies: dict[str, tuple[SOPClassCount, ...]] = {}
    if subject.isdigit():  # a job run again
        job = session.get(Job, int(subject))
        if job is not None:
            studies[job.study.study_instance_uid] = ()
    elif subject == "deliveries":  # results made due again
        studies = _resent_results(session, _delivery_ids(event.detail or ""))
    else:
        return []
    return [
        _operator_message(event, node, event_type, user, uid, patient_id, studies[uid])
        for uid, patient_id in _studies(session, studies)
    ]


def _operator_message(
    event: AuditEvent,
    node: NodeIdentity,
    event_type: Code,
    user: str,
    study_uid: str,
    patient_id: str | None,
    sop_classes: tuple[SOPClassCount, ...],
) -> AuditMessage:
    return AuditMessage(
        EventID.INSTANCES_ACCESSED,
        EventAction.READ,
        event.at,
        EventOutcome.SUCCESS,
        (ActiveParticipant(user, True), ActiveParticipant(node.ae_title, False, (RoleID.APPLICATION,))),
        node.source,
        _objects(study_uid, patient_id, sop_classes),
        event_types=(event_type,),
    )


def _delivery_ids(detail: str) -> list[int]:
    """``made due: 1, 2, 3`` as ids; a detail cut at its 2000 characters loses its last, partial, id."""
    ids = [int(n) for n in re.findall(r"\d+", detail.removeprefix("made due:"))]
    return ids[:-1] if len(detail) >= 2000 else ids


def _resent_results(session: Session, delivery_ids: list[int]) -> dict[str, tuple[SOPClassCount, ...]]:
    """Per study, the SOP classes of the results whose deliveries were made due again."""
    rows = session.execute(
        select(Study.study_instance_uid, Result.sop_class_uid, Result.sop_instance_uid)
        .select_from(Delivery)
        .join(Result, Delivery.result_id == Result.id)
        .join(Job, Result.job_id == Job.id)
        .join(Study, Job.study_id == Study.id)
        .where(Delivery.id.in_(delivery_ids))
        .order_by(Study.study_instance_uid, Result.sop_class_uid, Result.sop_instance_uid)
    )
    instances: dict[str, dict[str, list[str]]] = {}
    for study_uid, sop_class, sop_uid in rows:
        uids = instances.setdefault(study_uid, {}).setdefault(sop_class, [])
        if sop_uid not in uids:
            uids.append(sop_uid)
    return {
        study: tuple(SOPClassCount(sop_class, len(uids), tuple(uids)) for sop_class, uids in classes.items())
        for study, classes in instances.items()
    }
