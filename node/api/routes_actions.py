"""``/api/v1`` actions: retry, cancel and reprocess for ``admin`` tokens, C-ECHO of a peer, and a route test.

Each action is the one ``ainode`` does (:mod:`node.actions`), audited as ``operator`` with the token's
name as actor; 404 for an unknown row, 409 for one in the wrong state. The route test only reads the
uploaded header, so a viewer may run it.

No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations at runtime.
"""

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BytesIO
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, HTTPException, Query, UploadFile
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from db.models import utcnow
from node import actions
from node.api.auth import ApiContext, admin_dependency
from node.config import ApiToken
from node.models import model_names

log = logging.getLogger("ainode.api")

#: An upload larger than this is refused (413) before it is parsed: a route test needs one header.
MAX_UPLOAD_BYTES = 64 * 2**20


@contextmanager
def _answered() -> Iterator[None]:
    """An action refused becomes the HTTP answer naming why: 404 for what does not exist, 409 for a wrong state."""
    try:
        yield
    except actions.NotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except actions.WrongState as exc:
        raise HTTPException(409, str(exc)) from None


def action_routes(ctx: ApiContext) -> APIRouter:
    client = ctx.client_dependency()
    Client = Annotated[ApiToken, Depends(client)]
    Admin = Annotated[ApiToken, Depends(admin_dependency(client))]
    router = APIRouter(prefix="/api/v1")
    config, sessions = ctx.config, ctx.sessions

    def act(what: Callable[..., Any], *args: Any) -> Any:
        with _answered(), sessions() as session, session.begin():
            return what(session, *args)

    @router.post("/jobs/{job_id}/retry", summary="Queue an ended job again (admin; `ainode jobs retry`)")
    def retry_job(job_id: int, token: Admin) -> dict[str, Any]:
        previous = act(actions.retry_job, job_id, token.name, utcnow()).value
        log.info("job %d queued again by API client %s (was %s)", job_id, token.name, previous)
        ctx.on_job_queued()
        return {"id": job_id, "state": "queued", "previous": previous}

    @router.post("/jobs/{job_id}/cancel", summary="End a queued job before it runs (admin)")
    def cancel_job(job_id: int, token: Admin) -> dict[str, Any]:
        act(actions.cancel_job, job_id, token.name, utcnow())
        log.info("job %d cancelled by API client %s", job_id, token.name)
        return {"id": job_id, "state": "failed", "reason": f"cancelled by {token.name}", "previous": "queued"}

    @router.post("/studies/{study_instance_uid}/reprocess",
                 summary="Run a study again (admin; `ainode studies reprocess`)")  # fmt: skip
    def reprocess_study(
        study_instance_uid: str,
        token: Admin,
        pipeline: Annotated[str | None, Query(description="run this pipeline, results to the sender")] = None,
    ) -> dict[str, Any]:
        if pipeline is not None:
            found = sorted(model_names(config))
            if pipeline not in found:
                raise HTTPException(422, f"no pipeline named {pipeline!r} (models found: {', '.join(found) or 'none'})")
        done = act(actions.reprocess_study, study_instance_uid, token.name, utcnow(), pipeline)
        log.info("study reprocessed by API client %s: %s", token.name, "; ".join(done.lines()))
        if done.queued:
            ctx.on_job_queued()
        return {"study_instance_uid": study_instance_uid, "queued": done.queued, "unchanged": done.unchanged}

    @router.post("/deliveries/{delivery_id}/retry",
                 summary="Make a delivery not yet delivered due now (admin; `ainode outbox retry ID`)")  # fmt: skip
    def retry_delivery(delivery_id: int, token: Admin) -> dict[str, Any]:
        previous = act(actions.retry_delivery, delivery_id, token.name, utcnow()).value
        log.info("delivery %d made due by API client %s (was %s)", delivery_id, token.name, previous)
        ctx.on_delivery_due()
        return {"id": delivery_id, "state": "pending", "previous": previous}

    @router.post("/peers/{name}/echo", summary="C-ECHO a configured peer (admin; `ainode echo`)")
    def echo_peer(name: str, _token: Admin) -> dict[str, Any]:
        with _answered():
            return actions.echo_peer(config, name)

    @router.post("/route-test", summary="Which route an uploaded DICOM file would take, and why (`ainode route-test`)")
    def route_test(_token: Client, file: Annotated[UploadFile, File(description="one DICOM file")]) -> dict[str, Any]:
        data = file.file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"a route test takes one DICOM file of at most {MAX_UPLOAD_BYTES // 2**20} MB")
        try:
            ds = dcmread(BytesIO(data), stop_before_pixels=True)
        except (InvalidDicomError, ValueError, EOFError, OSError) as exc:
            raise HTTPException(400, f"{file.filename or 'the upload'} cannot be read as DICOM: {exc}") from None
        return {"filename": file.filename, **actions.route_test(config, ds)}

    return router
