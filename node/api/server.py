"""The HTTP API in a thread of the node: FastAPI served by uvicorn on a socket bound before it starts.

``/healthz``, ``/readyz`` and ``/metrics`` answer anyone who reaches the port (bind it to
loopback or a management network); ``/api/v1`` needs ``Authorization: Bearer <token>`` of a
token in ``api.tokens``, and ``admin`` for actions. Only the tokens' SHA-256 is configured.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime, and
# they name dependencies (client, admin) local to make_api.
import hashlib
import hmac
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.orm import Session, sessionmaker

from db.models import AuditEvent, Job, utcnow
from db.states import OPEN_JOB_STATES, requeue_job
from node import __version__
from node.api.metrics import NodeCollector, make_registry
from node.config import ApiSettings, ApiToken
from node.receive.spool import Spool
from node.status import collect_status

log = logging.getLogger("ainode.api")

#: A readiness check: None when ready, else why not (one line).
Check = Callable[[], str | None]


def _check_token(tokens: list[ApiToken], presented: str | None) -> ApiToken | None:
    if not presented:
        return None
    digest = hashlib.sha256(presented.encode()).hexdigest()
    found = None
    for token in tokens:  # every hash compared, in constant time each
        if hmac.compare_digest(digest, token.sha256):
            found = token
    return found


def make_api(
    settings: ApiSettings,
    sessions: sessionmaker[Session],
    spool: Spool,
    checks: Mapping[str, Check],
    on_job_queued: Callable[[], None] = lambda: None,
) -> FastAPI:
    """The FastAPI application of one node.

    Parameters
    ----------
    checks
        Readiness checks by name (database, spool, models, dicom): ``/readyz`` is 503 naming those that fail.
    on_job_queued
        Called after a job was queued again (wakes this process's workers).
    """
    api = FastAPI(title="dicom-ai-node", version=__version__)
    registry = make_registry(NodeCollector(sessions, spool))
    bearer = HTTPBearer(auto_error=False)

    def client(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> ApiToken:
        token = _check_token(settings.tokens, credentials.credentials if credentials is not None else None)
        if token is None:
            raise HTTPException(401, "a valid token is needed (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        return token

    def admin(token: Annotated[ApiToken, Depends(client)]) -> ApiToken:
        if token.role != "admin":
            raise HTTPException(403, f"token {token.name!r} is a viewer; this needs an admin token")
        return token

    @api.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    def readyz(response: Response) -> dict[str, Any]:
        results = {}
        for name, check in checks.items():
            try:
                problem = check()
            except Exception as exc:  # noqa: BLE001 - a check that raises is a check that fails, with why
                problem = f"{type(exc).__name__}: {exc}"
            results[name] = {"ok": problem is None, **({"problem": problem} if problem else {})}
        failing = [name for name, r in results.items() if not r["ok"]]
        if failing:
            response.status_code = 503
        return {"status": "not ready" if failing else "ready", "failing": failing, "checks": results}

    @api.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @api.get("/api/v1/studies")
    def studies(_token: Annotated[ApiToken, Depends(client)], limit: int = 50) -> dict[str, Any]:
        """What ``ainode status --json`` shows: studies, jobs, deliveries and rejected associations."""
        return collect_status(sessions, limit=limit, spool=spool)

    @api.post("/api/v1/jobs/{job_id}/retry")
    def retry_job(job_id: int, token: Annotated[ApiToken, Depends(admin)]) -> dict[str, Any]:
        """Queue an ended job again, as ``ainode jobs retry`` does; the audit trail names the token."""
        with sessions() as session, session.begin():
            job = session.get(Job, job_id)
            if job is None:
                raise HTTPException(404, f"no job {job_id}")
            if job.state in OPEN_JOB_STATES:
                raise HTTPException(409, f"job {job_id} is {job.state.value}; nothing to retry")
            previous = requeue_job(session, job, f"retried by operator (was {job.state.value})", utcnow()).value
            session.add(AuditEvent(kind="operator", actor=token.name, subject=str(job.id), detail=previous))
        log.info("job %d queued again by API client %s (was %s)", job_id, token.name, previous)
        on_job_queued()
        return {"id": job_id, "state": "queued", "previous": previous}

    return api


class ApiServer:
    """uvicorn in a daemon thread, on a socket bound by :meth:`bind` (a port in use fails there, early)."""

    def __init__(self, settings: ApiSettings, app: FastAPI, sock: socket.socket | None = None) -> None:
        """``sock``: the HTTP port, already bound and listening (``ainode serve`` binds every port first)."""
        self.settings = settings
        self.app = app
        self._socket: socket.socket | None = sock
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def bind(self) -> None:
        """Bind the HTTP port; raises ``OSError`` naming it when it is in use."""
        host, port = self.settings.host, self.settings.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"api: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        sock.listen(128)
        self._socket = sock

    def start(self, timeout_s: float = 10.0) -> None:
        if self._socket is None:
            self.bind()
        assert self._socket is not None
        # log_config None: uvicorn's loggers go through the node's logging; no access log (clients' paths).
        config = uvicorn.Config(
            self.app,
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(config)
        sockets = [self._socket]
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": sockets}, name="http-api",
                                        daemon=True)  # fmt: skip
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self._server.started:
            raise RuntimeError(f"api: the HTTP server on {self.settings.host}:{self.settings.port} did not start")
        log.info("HTTP API on http://%s:%d (healthz, readyz, metrics, api/v1)", self.settings.host, self.settings.port)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None
