"""The HTTP API in a thread of the node: FastAPI served by uvicorn on a socket bound before it starts.

``/healthz``, ``/readyz`` and ``/metrics`` answer anyone who reaches the port (bind it to
loopback or a management network); ``/api/v1`` needs ``Authorization: Bearer <token>`` of a
token in ``api.tokens``, and ``admin`` for actions. Only the tokens' SHA-256 is configured.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime.
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import uvicorn
from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.orm import Session, sessionmaker

from node import __version__
from node.api.auth import ApiContext
from node.api.metrics import NodeCollector, make_registry
from node.api.page import page_router
from node.api.routes_actions import action_routes
from node.api.routes_read import read_routes
from node.config import ApiSettings, Config
from node.receive.spool import Spool

log = logging.getLogger("ainode.api")

#: A readiness check: None when ready, else why not (one line).
Check = Callable[[], str | None]


def make_api(
    settings: ApiSettings,
    sessions: sessionmaker[Session],
    spool: Spool,
    checks: Mapping[str, Check],
    on_job_queued: Callable[[], None] = lambda: None,
    *,
    config: Config | None = None,
    on_delivery_due: Callable[[], None] = lambda: None,
    rejected_instances: Callable[[], Mapping[str, int]] | None = None,
) -> FastAPI:
    """The FastAPI application of one node.

    Parameters
    ----------
    checks
        Readiness checks by name (database, spool, models, dicom): ``/readyz`` is 503 naming those that fail.
    on_job_queued
        Called after a job was queued again (wakes this process's workers).
    config
        The node's config, for its models, routes and peers (and the route test); None: no routes, no peers.
    on_delivery_due
        Called after a delivery was made due again (wakes this process's outbox).
    rejected_instances
        C-STOREs this process refused, by reason (a receiving role's metric); None: not a receiver.
    """
    api = FastAPI(title="dicom-ai-node", version=__version__)
    registry = make_registry(NodeCollector(sessions, spool, rejected_instances=rejected_instances))
    ctx = ApiContext(
        config=(config if config is not None else Config()).model_copy(update={"api": settings}),
        sessions=sessions,
        spool=spool,
        on_job_queued=on_job_queued,
        on_delivery_due=on_delivery_due,
    )

    @api.get("/healthz", summary="The process is alive (no token)")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", summary="Database, spool, models and DICOM port ready; 503 naming what is not (no token)")
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

    @api.get("/metrics", summary="Prometheus metrics, no patient data in any label (no token)")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    api.include_router(read_routes(ctx))
    api.include_router(action_routes(ctx))
    api.include_router(page_router())
    return api


class ApiServer:
    """uvicorn in a daemon thread, on a socket bound by :meth:`bind` (a port in use fails there, early)."""

    def __init__(
        self,
        settings: ApiSettings,
        app: FastAPI,
        sock: socket.socket | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """``sock``: the HTTP port, already bound and listening (``ainode serve`` binds every port first);
        ``ssl_context``: HTTPS (:func:`node.tls.https_context`), else plain HTTP."""
        self.settings = settings
        self.app = app
        self.ssl_context = ssl_context
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
            ssl_context_factory=self._https_context if self.ssl_context is not None else None,
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
        scheme = "https" if self.ssl_context is not None else "http"
        log.info("HTTP API on %s://%s:%d (healthz, readyz, metrics, api/v1)", scheme, self.settings.host,
                 self.settings.port)  # fmt: skip

    def _https_context(self, _config: uvicorn.Config, _default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        """uvicorn's ssl_context_factory: the node's hardened context instead of uvicorn's default one."""
        assert self.ssl_context is not None
        return self.ssl_context

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None
