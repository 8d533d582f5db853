"""What an operator may do to the node's state, written once for ``ainode`` and the HTTP API.

Each action works inside the caller's transaction (``session.begin()``), moves states only
through :mod:`db.states`, and records an ``operator`` audit event naming ``actor`` (a token's
name for the API, the command and OS user for the CLI). It raises :class:`NotFound` or
:class:`WrongState` with the one line an operator reads; the API answers 404 / 409 with it,
the CLI prints it and exits 1. Waking the workers or the outbox is the caller's business.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydicom import Dataset
from sqlalchemy import func, select, true
from sqlalchemy.orm import Session

from db.models import (
    AuditEvent,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Series,
    Study,
    StudyState,
)
from db.states import OPEN_JOB_STATES, finish_job, make_delivery_due, queue_study_for, requeue_job, set_job_state
from node.assemble.router import Router
from node.config import Config
from node.deliver.scu import AssociationFailed, PeerAddress, echo, status_text
from node.identity import MANUFACTURER, device_uid


class ActionRefused(Exception):
    """The action cannot be done; ``str()`` is the one line shown to the operator."""


class NotFound(ActionRefused):
    """No such job, study or delivery."""


class WrongState(ActionRefused):
    """The row is in a state the action does not apply to (a running job cannot be retried)."""


def _audit(session: Session, actor: str, subject: str, detail: str) -> None:
    session.add(AuditEvent(kind="operator", actor=actor[:128], subject=subject[:128], detail=detail[:2000]))


def retry_job(session: Session, job_id: int, actor: str, now: datetime) -> JobState:
    """Queue an ended job again (``ainode jobs retry``); returns the state it had."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        raise NotFound(f"no job {job_id}")
    if job.state in OPEN_JOB_STATES:
        raise WrongState(f"job {job_id} is {job.state.value}; nothing to retry")
    previous = requeue_job(session, job, f"retried by operator (was {job.state.value})", now)
    _audit(session, actor, str(job.id), previous.value)
    return previous


def cancel_job(session: Session, job_id: int, actor: str, now: datetime) -> None:
    """End a queued job as failed, "cancelled by <actor>", before any worker claims it.

    The row lock (or SQLite's serialised writers) makes this and a worker's claim exclusive: a
    worker claims only queued jobs, so none ever runs a cancelled one, and its study is processed
    once its other jobs have ended. It never ran: no attempt is counted and it has no start time.
    A cancelled job can be retried like any failed one.
    """
    job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
    if job is None:
        raise NotFound(f"no job {job_id}")
    if job.state is not JobState.QUEUED:
        raise WrongState(f"job {job_id} is {job.state.value}; only a queued job can be cancelled")
    reason = f"cancelled by {actor}"
    finish_job(session, job, JobState.FAILED, reason[:2000], now)
    _audit(session, actor, str(job.id), "cancelled (was queued)")


@dataclass
class Reprocessed:
    """What reprocessing a study did: jobs queued again or made, and jobs left because they are open."""

    study_instance_uid: str
    queued: list[dict[str, object]] = field(default_factory=list)
    unchanged: list[dict[str, object]] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = []
        for j in self.queued:
            if j["previous"] is None:
                out.append(f"job {j['id']} ({j['route']}, results to the sender) queued")
            else:
                out.append(f"job {j['id']} ({j['route']}) queued again (was {j['previous']})")
        out += [f"job {j['id']} ({j['route']}) is {j['state']} already" for j in self.unchanged]
        return out


def reprocess_study(
    session: Session, study_uid: str, actor: str, now: datetime, pipeline: str | None = None
) -> Reprocessed:
    """Run a study again (``ainode studies reprocess``): its jobs of the current version, or one pipeline.

    With ``pipeline`` (a name the caller checked against the models), a job of route
    ``reprocess:<pipeline>`` runs it with results to the sender, made when it does not exist yet.
    """
    route = f"reprocess:{pipeline}"[:64] if pipeline is not None else None
    study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).first()
    if study is None:
        raise NotFound(f"no study {study_uid}")
    if study.state == StudyState.RECEIVING:
        raise WrongState(f"study {study_uid} is still receiving; it is processed once complete")
    images = session.scalar(select(func.count(Instance.id)).join(Series).where(Series.study_id == study.id))
    if not images:
        raise WrongState(f"study {study_uid} has no received images left ({study.note or 'none indexed'})")
    jobs = session.scalars(
        select(Job)
        .where(Job.study_id == study.id, Job.study_version == study.version)
        .where(Job.route == route if route is not None else true())
        .order_by(Job.id)
    ).all()
    done = Reprocessed(study_uid)
    if route is not None and not jobs:
        assert pipeline is not None
        job = Job(study_id=study.id, study_version=study.version, route=route, pipeline=pipeline,
                  destinations=["sender"], sender_ae=study.sender_ae, sender_host=study.sender_host)  # fmt: skip
        set_job_state(job, JobState.QUEUED, "reprocess requested by operator", now)
        session.add(job)
        session.flush()
        queue_study_for(study, job, now)
        _audit(session, actor, str(job.id), f"study {study_uid}: new {route}")
        done.queued.append({"id": job.id, "route": route, "previous": None})
        return done
    if not jobs:
        why = f"study {study_uid} has no jobs of version {study.version}"
        raise WrongState(f"{why}; name a pipeline (--pipeline NAME, ?pipeline=NAME)")
    for job in jobs:
        if job.state in OPEN_JOB_STATES:
            done.unchanged.append({"id": job.id, "route": job.route, "state": job.state.value})
            continue
        previous = requeue_job(session, job, f"reprocessed by operator (was {job.state.value})", now).value
        _audit(session, actor, str(job.id), f"study {study_uid}: was {previous}")
        done.queued.append({"id": job.id, "route": job.route, "previous": previous})
    return done


def retry_delivery(session: Session, delivery_id: int, actor: str, now: datetime) -> DeliveryState:
    """Make one delivery not yet delivered due now, with a fresh retry window; returns the state it had.

    The outbox of any process sends it on its next pass (``ainode outbox retry`` does the same and
    then tries it itself). A sender holding its lease now keeps it and records its attempt.
    """
    row = session.get(Delivery, delivery_id, with_for_update=True)
    if row is None:
        raise NotFound(f"no delivery {delivery_id}")
    if row.state is DeliveryState.DELIVERED:
        raise WrongState(f"delivery {delivery_id} is delivered; nothing to retry")
    previous = row.state
    make_delivery_due(row, now)
    _audit(session, actor, "deliveries", f"made due: {delivery_id} (was {previous.value})")
    return previous


# -- peers and routes: what `ainode echo` and `ainode route-test` do ------------------------------
def peer_address(config: Config, name: str) -> PeerAddress:
    """Where the configured peer ``name`` listens; over TLS (the node's certificate and site CA) when it has ``tls``."""
    peer = config.peers.get(name)
    if peer is None:
        known = ", ".join(sorted(config.peers)) or "none configured"
        raise NotFound(f"no peer named {name!r} (known: {known})")
    if peer.ae_title is None or peer.host is None or peer.port is None:
        raise WrongState(f"peer {name!r} is reached by {peer.describe()}, not by DICOM: no C-ECHO")
    if peer.tls:  # the node's own certificate and site CA, as its outbox uses them
        from node.tls import NodeTLS

        return PeerAddress(peer.ae_title, peer.host, peer.port, tls=NodeTLS(config).contexts.client)
    return PeerAddress(peer.ae_title, peer.host, peer.port)


def echo_peer(config: Config, name: str, timeout_s: float = 10) -> dict[str, Any]:
    """C-ECHO the configured peer ``name``: ``ok``, the DIMSE ``status`` (None without an answer) and why not."""
    peer = peer_address(config, name)
    try:
        status = echo(config.node.ae_title, peer, timeout_s=timeout_s)
    except AssociationFailed as exc:
        return {"peer": name, "address": str(peer), "ok": False, "status": None, "error": str(exc)}
    error = None if status == 0 else f"status 0x{status:04X} {status_text(status)}"
    return {"peer": name, "address": str(peer), "ok": status == 0, "status": status, "error": error}


def route_test(config: Config, ds: Dataset) -> dict[str, Any]:
    """Which route (pipeline, destinations) a header would take with ``config``'s routes, and why, or why none."""
    router = Router(config.routes, own_device_uid=device_uid(config), own_manufacturer=MANUFACTURER)
    decision = router.route(ds)
    r = decision.route
    return {
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "")) or None,
        "modality": str(ds.get("Modality", "")) or None,
        "routed": r is not None,
        "route": r.name if r is not None else None,
        "pipeline": r.pipeline if r is not None else None,
        "destinations": list(r.destinations) if r is not None else [],
        "stable_after_s": r.stable_after_s if r is not None else None,
        "priority": getattr(r, "priority", 0) if r is not None else None,
        "reason": decision.reason,
    }
