"""``/api/v1`` endpoints that read: studies, jobs, deliveries, audit, associations, models, routes, peers.

Every one needs a token (viewer or admin). The patient's name and ID are in a study's answer only
for an ``admin`` token: a viewer's answer has no such keys (PHI discipline, issue 13).

No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations at runtime.
"""

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query

from db.models import DeliveryState, JobState, StudyState
from node.api.auth import ApiContext
from node.config import ApiToken
from node.models import registry_from_config
from node.status import (
    collect_status,
    job_detail,
    list_associations,
    list_audit,
    list_deliveries,
    list_jobs,
    list_studies,
    study_detail,
)

#: Most rows one page may have; more is asked for with ``offset``.
MAX_LIMIT = 500

Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description=f"rows per page (at most {MAX_LIMIT})")]
Offset = Annotated[int, Query(ge=0, description="rows to skip")]


def read_routes(ctx: ApiContext) -> APIRouter:
    client = ctx.client_dependency()
    Client = Annotated[ApiToken, Depends(client)]
    router = APIRouter(prefix="/api/v1")
    config, sessions, spool = ctx.config, ctx.sessions, ctx.spool

    @router.get("/whoami", summary="The token's name and role")
    def whoami(token: Client) -> dict[str, str]:
        return {"name": token.name, "role": token.role}

    @router.get("/status", summary="The whole status, as `ainode status --json` shows it")
    def status(_token: Client, limit: Limit = 50) -> dict[str, Any]:
        return collect_status(sessions, limit=limit, spool=spool)

    @router.get("/studies", summary="Studies, the most recently received first")
    def studies(
        token: Client,
        limit: Limit = 50,
        offset: Offset = 0,
        state: StudyState | None = None,
        since: Annotated[datetime | None, Query(description="only studies received at or after (ISO 8601)")] = None,
    ) -> dict[str, Any]:
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=UTC)  # a time without a zone is the node's: UTC
        return list_studies(sessions, spool, limit=limit, offset=offset, in_state=state, since=since,
                            with_patient=token.role == "admin")  # fmt: skip

    @router.get("/studies/{study_instance_uid}", summary="A study: series and their routes, jobs, results, deliveries")
    def study(study_instance_uid: str, token: Client) -> dict[str, Any]:
        found = study_detail(sessions, spool, study_instance_uid, with_patient=token.role == "admin")
        if found is None:
            raise HTTPException(404, f"no study {study_instance_uid}")
        return found

    @router.get("/jobs", summary="Jobs, the newest first")
    def jobs(_token: Client, limit: Limit = 50, offset: Offset = 0, state: JobState | None = None) -> dict[str, Any]:
        return list_jobs(sessions, limit=limit, offset=offset, in_state=state)

    @router.get("/jobs/{job_id}", summary="A job with its results and deliveries")
    def job(job_id: int, _token: Client) -> dict[str, Any]:
        found = job_detail(sessions, spool, job_id)
        if found is None:
            raise HTTPException(404, f"no job {job_id}")
        return found

    @router.get("/deliveries", summary="The outbox, the newest first")
    def deliveries(
        _token: Client, limit: Limit = 50, offset: Offset = 0, state: DeliveryState | None = None
    ) -> dict[str, Any]:
        return list_deliveries(sessions, limit=limit, offset=offset, in_state=state)

    @router.get("/audit", summary="The audit trail (operator actions, associations, jobs, deliveries), newest first")
    def audit(_token: Client, limit: Limit = 50, offset: Offset = 0, kind: str | None = None) -> dict[str, Any]:
        return list_audit(sessions, limit=limit, offset=offset, kind=kind)

    @router.get("/associations", summary="Associations accepted and rejected (with why), newest first")
    def associations(
        _token: Client,
        limit: Limit = 50,
        offset: Offset = 0,
        outcome: Annotated[str | None, Query(description="accepted, rejected, released or aborted")] = None,
    ) -> dict[str, Any]:
        return list_associations(sessions, limit=limit, offset=offset, outcome=outcome)

    @router.get("/models", summary="The models this node's config makes available (as `ainode models list`)")
    def models(_token: Client) -> dict[str, Any]:
        used: dict[str, list[str]] = {}
        for r in config.routes:
            used.setdefault(r.pipeline, []).append(r.name)
        items = [
            {
                "name": m.name,
                "version": m.version,
                "task": m.task.value,
                "modalities": list(m.modalities),
                "description": m.description,
                "sha256": m.sha256,
                "inputs": m.input.model_dump(mode="json"),
                "outputs": [o.kind.value for o in m.outputs],
                "routes": used.get(m.name, []),
            }
            for m in registry_from_config(config).list()  # manifests only: no model is loaded for this
        ]
        return {"items": items, "total": len(items)}

    @router.get("/routes", summary="The configured routes, in the order they are tried")
    def routes(_token: Client) -> dict[str, Any]:
        items = [
            {
                "name": r.name,
                "match": {k: c.model_dump(mode="json", exclude_none=True) for k, c in r.match.items()},
                "pipeline": r.pipeline,
                "destinations": list(r.destinations),
                "stable_after_s": r.stable_after_s,
                "priority": getattr(r, "priority", 0),
            }
            for r in config.routes
        ]
        return {"items": items, "total": len(items)}

    @router.get("/peers", summary="The configured peers (DICOM destinations)")
    def peers(_token: Client) -> dict[str, Any]:
        items = [
            {
                "name": name,
                "ae_title": p.ae_title,
                "host": p.host,
                "port": p.port,
                "outputs": sorted(o.value for o in p.outputs),
                "tls": p.tls,
                "complete_on_release": p.complete_on_release,
            }
            for name, p in sorted(config.peers.items())
        ]
        return {"items": items, "total": len(items)}

    return router
