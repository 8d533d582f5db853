"""Compose the node from its config: receiver, assembler, workers, outbox, housekeeping.

One process runs everything on SQLite; many processes (``role``) share PostgreSQL and a
spool. Every loop keeps its state in the database, so a process may be killed at any
moment and a restart resumes from the database alone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from db.engine import make_engine, make_session_factory
from db.migrate import upgrade
from db.models import AuditEvent
from db.queue import process_identity, reclaim_dead_deliveries, reclaim_stale_jobs
from node import __version__
from node.assemble.assembler import StudyAssembler
from node.assemble.router import Router
from node.audit.forwarder import AuditForwarder, audit_loop
from node.config import Config, ConfigError, delivery_warnings, display_database_url
from node.deliver.outbox import Backoff, Outbox, outbox_loop
from node.deliver.scu import PeerAddress, StoreOutcome, store
from node.identity import MANUFACTURER, device_uid
from node.loops import Loop
from node.models import study_runner_from_config
from node.notify.record import WebhookRecorder
from node.notify.send import WebhookSender, webhook_loop
from node.receive.ingest import InstanceIndex, reconcile_spool
from node.receive.retention import Retention
from node.receive.scp import AssociationLimits, ListenError, StorageSCP, known_hosts, listen
from node.receive.spool import Spool
from node.tls import NodeTLS, https_context
from node.work.destinations import make_resolver, resolve_destinations, wanted_outputs
from node.work.prefetch import LEASE_S, Prefetcher, PreparesAhead
from node.work.slicestore import SliceStore
from node.work.worker import Worker, WorkerPool
from pipelines.headercache import HeaderCache
from pipelines.study import StudyRunner

if TYPE_CHECKING:
    from node.api.server import ApiServer

log = logging.getLogger("ainode")


def _model_label(runner: StudyRunner, name: str) -> str:
    """``lung-seg 1.0 (CPUExecutionProvider)`` for a model the runner loaded; the bare name otherwise."""
    registry = getattr(runner, "registry", None)
    if registry is None:
        return name
    model = registry.get(name)  # loaded by preload: no second session
    return f"{name} {model.manifest.version} ({', '.join(model.providers_in_use)})"


class NodeApp:
    """The running node. ``start()`` returns once the DICOM port is listening."""

    def __init__(
        self,
        config: Config,
        *,
        runner: StudyRunner | None = None,
        job_lease_s: float = 120.0,
        max_job_attempts: int = 3,
        assembler_poll_s: float = 0.5,
        assemble: bool = True,
    ) -> None:
        self.config = config
        #: Whether this process completes studies and queues their jobs (the assembler loop). A worker process that a
        #: node starts does not: the node does, and wakes every worker process then (a job queued by one of them would
        #: wake only its own workers, and the process that made the study's results ahead could miss it).
        self.assembles = assemble
        node = config.node
        #: Read (and checked: ConfigError naming the file) before the database is touched; again on SIGHUP.
        self.tls = NodeTLS(config) if node.tls is not None else None
        where = f"config error in {config.source.path}"
        self.api_ssl = https_context(config.api, where) if config.api is not None else None
        self.engine = make_engine(node.database_url)
        upgrade(self.engine)
        self.sessions: sessionmaker[Session] = make_session_factory(self.engine)
        self.spool = Spool(Path(node.spool_dir), min_free_bytes=node.min_free_disk_mb * 2**20)
        self.retention = Retention(self.sessions, self.spool, node.retention_days)
        #: Label rows of slices analysed while their study arrived (runtime.stream_inference), shared by all processes.
        self.slice_store = SliceStore(self.spool) if config.runtime.stream_inference else None
        #: Headers the analysis ahead parsed, which the job then does not parse again (this process's only).
        self.headers = HeaderCache() if config.runtime.stream_inference else None
        self.prefetcher: Prefetcher | None = None
        self.index = InstanceIndex(self.sessions, node.late_instances)
        self.device_uid = device_uid(config)
        self.identity = process_identity()
        # Webhook rows are written in the transaction of the job or delivery change they tell about (node/notify/),
        # whoever makes it: a worker, the outbox, an operator's command.
        node_id = {"ae_title": node.ae_title, "device_uid": self.device_uid}
        WebhookRecorder(config.webhooks, node_id).install(self.sessions)
        #: Sends them, in the roles where jobs end and deliveries fail (made in start()).
        self.webhook_sender: WebhookSender | None = None
        self.job_lease_s = job_lease_s
        self.max_job_attempts = max_job_attempts
        self._runner = runner
        self._assembler_poll_s = assembler_poll_s
        self.scp: StorageSCP | None = None
        self.pool: WorkerPool | None = None
        self.outbox_thread: Loop | None = None
        self.loops: list[Loop] = []
        #: The HTTP API (``api`` section), bound in start() right after the DICOM ports.
        self.api_server: ApiServer | None = None
        #: Routed pipelines whose model could not be loaded, and why; None until start() preloaded them.
        self.model_problems: dict[str, str] | None = None
        self._previous_sighup: Any = None
        #: Called when jobs were queued, beside waking this process's workers (the node's worker processes).
        self.on_jobs_queued: Callable[[], None] | None = None

    # -- parts -----------------------------------------------------------------------------
    def _make_runner(self) -> StudyRunner:
        if self._runner is not None:
            return self._runner
        return study_runner_from_config(
            self.config, self.slice_store.study if self.slice_store is not None else None, headers=self.headers
        )

    def _route_outputs(self, route: str, sender_ae: str | None, sender_host: str | None) -> frozenset[str]:
        """The kinds of result object a job of ``route`` makes for this sender (what the worker will resolve)."""
        names = next((r.destinations for r in self.config.routes if r.name == route), [])
        destinations, _ = resolve_destinations(make_resolver(self.config), names, sender_ae, sender_host)
        return wanted_outputs(destinations)

    def backoff(self) -> Backoff:
        d = self.config.delivery
        return Backoff(d.initial_delay_s, d.factor, d.max_delay_s, d.give_up_after_s)

    def make_outbox(self, owner: str | None = None) -> Outbox:
        # Each attempt resolves its destination from this (the process's) configuration.
        return Outbox(
            sessions=self.sessions,
            spool=self.spool,
            calling_ae=self.config.node.ae_title,
            backoff=self.backoff(),
            owner=owner or self.identity,
            resolve=make_resolver(self.config),
            store_fn=self._store,
        )

    def _store(self, calling_ae: str, peer: PeerAddress, items: Sequence[Any]) -> list[StoreOutcome]:
        """C-STORE to ``peer``, over TLS when the configured peer at that address has ``tls: true``."""
        if self.tls is not None and any(
            (p.ae_title, p.host, p.port) == (peer.ae_title, peer.host, peer.port) and p.tls
            for p in self.config.peers.values()
        ):
            # The client context in force now: certificates reloaded on SIGHUP apply from the next send.
            peer = dataclasses.replace(peer, tls=self.tls.contexts.client)
        return store(calling_ae, peer, items)

    def _rejected_instances(self) -> dict[str, int]:
        """The C-STOREs this process refused, by reason (for /metrics)."""
        return self.scp.rejected_counts() if self.scp is not None else {}

    # -- lifecycle -------------------------------------------------------------------------
    def start(
        self,
        listener: socket.socket | None = None,
        tls_listener: socket.socket | None = None,
        api_listener: socket.socket | None = None,
    ) -> None:
        """Bind the DICOM port, check the spool, start workers, outbox and loops, then accept associations.

        The port is bound first (or ``listener`` is used, bound by the caller before anything else):
        a port in use raises :class:`ListenError` before the spool clean-up, which would delete files
        another node on that port is writing. Associations are accepted only after the clean-up, so
        that it never removes a file an accepted association is writing. The same holds for the
        DICOM TLS port (``node.tls.port``, or ``tls_listener``); either port may be absent.
        """
        node = self.config.node
        receives = node.role in ("all", "receiver")
        if self.config.webhooks and node.role in ("all", "worker"):
            # Secrets are read from the environment now: an unset variable stops the start (ConfigError).
            self.webhook_sender = WebhookSender(
                sessions=self.sessions, hooks=self.config.webhooks, owner=self.identity, env=os.environ
            )
        if receives and listener is None and node.port is not None:
            listener = listen(node.host, node.port)
        if self.config.api is not None:
            # Imported only by a node that serves the API: FastAPI and its routes add 0.3 s to a start.
            from node.api.server import ApiServer, make_api

            self.api_server = ApiServer(
                self.config.api,
                make_api(
                    self.config.api,
                    self.sessions,
                    self.spool,
                    self.readiness_checks(),
                    self.wake_workers,
                    config=self.config,
                    on_delivery_due=self._wake_outbox,
                    rejected_instances=self._rejected_instances if receives else None,
                ),
                sock=api_listener,
                ssl_context=self.api_ssl,
            )
            if api_listener is None:
                try:
                    self.api_server.bind()
                except OSError as exc:  # the port in use: one line for the administrator, before the spool is touched
                    raise ListenError(exc.strerror or str(exc)) from None
        tls_port = node.tls.port if node.tls is not None else None
        if receives and tls_listener is None and tls_port is not None:
            tls_listener = listen(node.host, tls_port)
        removed = self.spool.remove_temp_files()
        indexed = reconcile_spool(self.spool, self.index)
        if removed or indexed:
            log.info("spool check: %d unacknowledged partial files removed, %d files re-indexed", removed, indexed)
        reclaimed = reclaim_stale_jobs(self.sessions, lease_s=self.job_lease_s, max_attempts=self.max_job_attempts)
        if reclaimed:
            log.info("reclaimed %d jobs left running by a stopped process: %s", len(reclaimed), reclaimed)
        released = reclaim_dead_deliveries(self.sessions)
        if released:
            log.warning("%d deliveries left by a stopped sender are sent again (same SOP Instance UIDs)", len(released))

        router = Router(self.config.routes, own_device_uid=self.device_uid, own_manufacturer=MANUFACTURER)
        assembler = StudyAssembler(self.sessions, self.spool, router, self.config.routes)

        models = f"none loaded (role {node.role})"
        if node.role in ("all", "worker"):
            runner = self._make_runner()
            preload = getattr(runner, "preload", None)
            routed = list(dict.fromkeys(r.pipeline for r in self.config.routes))
            problems = preload(routed) if preload is not None else {}
            self.model_problems = dict(problems)
            for name, problem in problems.items():
                log.error("model %s cannot be used; studies routed to it will fail: %s", name, problem)
            models = ", ".join(_model_label(runner, name) for name in routed if name not in problems) or "none"
            workers = [
                Worker(
                    sessions=self.sessions,
                    spool=self.spool,
                    runner=runner,
                    resolve=make_resolver(self.config),
                    worker_id=f"{self.identity}:w{i}",
                    on_result=lambda: self.outbox_thread.wake() if self.outbox_thread else None,
                    defer=self._held_by_another_process if self.slice_store is not None else None,
                )
                for i in range(node.workers)
            ]
            self.pool = WorkerPool(workers, self.sessions, heartbeat_s=max(1.0, self.job_lease_s / 4))
            self.pool.start()
            registry = getattr(runner, "registry", None)
            if self.slice_store is not None and registry is not None and getattr(runner, "slice_cache", None):
                pool = self.pool
                self.prefetcher = Prefetcher(
                    sessions=self.sessions,
                    spool=self.spool,
                    store=self.slice_store,
                    model=registry.get,
                    routes={r.name: r.pipeline for r in self.config.routes},
                    idle=lambda: pool.idle,
                    headers=getattr(runner, "headers", None),
                    owner=self.identity,
                    prepare=runner if isinstance(runner, PreparesAhead) else None,
                    route_outputs=self._route_outputs,
                    stable_after={r.name: r.stable_after_s for r in self.config.routes},
                )
            self.outbox_thread = outbox_loop(self.make_outbox())
            self.outbox_thread.start()

        def assemble() -> None:
            if assembler.tick():
                self.wake_workers()

        # A study is complete when its quiet period ends, not at the next poll after it.
        assemble_loop = Loop(
            "assembler", assemble, self._assembler_poll_s, log=log, due_in=lambda: assembler.next_due_s
        )
        self.loops = [
            *([assemble_loop] if self.assembles else []),
            Loop("reclaimer", self._reclaim, max(1.0, self.job_lease_s / 2), log=log),
            Loop("retention", self.retention.run, 600.0, log=log),
        ]
        if self.prefetcher is not None:  # slices analysed while their study arrives, between jobs
            self.loops.append(Loop("prefetch", self.prefetcher.step, 0.5, again_while_busy=True, log=log))
        if self.config.audit.syslog is not None:  # the audit trail, to the site's audit repository (node/audit/)
            self.loops.append(audit_loop(AuditForwarder.from_config(self.config, self.sessions, self.identity)))
        if self.webhook_sender is not None:
            self.loops.append(webhook_loop(self.webhook_sender))
        for loop in self.loops:
            loop.start()

        if node.role in ("all", "receiver"):

            def on_release(calling_ae: str, host: str, study_ids: set[int], released: bool) -> None:
                found = self.config.peer_for_caller(calling_ae, host)
                if released and found is not None and found[1].complete_on_release:
                    assembler.request_complete(study_ids)
                    assemble_loop.wake()

            self.scp = StorageSCP(
                ae_title=node.ae_title,
                spool=self.spool,
                sessions=self.sessions,
                index=self.index,
                allowed_callers=list(node.allowed_callers),
                on_release=on_release,
                maximum_pdu_size=node.max_pdu,
                acse_timeout_s=node.acse_timeout_s,
                dimse_timeout_s=node.dimse_timeout_s,
                network_timeout_s=node.network_timeout_s,
                limits=AssociationLimits(
                    total=node.max_associations,
                    per_host=node.max_associations_per_host,
                    reserved_for_known=node.reserved_for_known_peers,
                    establish_timeout_s=node.association_timeout_s,
                    known_hosts=known_hosts(
                        [p.host for p in self.config.peers.values() if p.host is not None]
                        + [c.partition("@")[2] for c in node.allowed_callers if "@" in c]
                    ),
                ),
                duplicates=node.duplicates,
            )
            if listener is not None:
                self.scp.start(node.host, node.port or 0, listener)
            if tls_listener is not None and self.tls is not None:
                self.scp.start(node.host, tls_port or 0, tls_listener, ssl_context=self.tls.contexts.server)
        if self.api_server is not None:
            self.api_server.start()
        if threading.current_thread() is threading.main_thread():
            # Signal handlers can only be set from the main thread (a node started in a test's thread has none).
            # Always: SIGHUP's default action ends the process without a word (systemd's ExecReload sends it).
            self._previous_sighup = signal.signal(signal.SIGHUP, lambda _signum, _frame: self._on_sighup())
        self._log_started(models)
        self._audit_application("start")

    def _on_sighup(self) -> None:
        if self.tls is None:
            log.info("SIGHUP: nothing to reload (no node.tls); the node goes on")
            return
        self.reload_tls()

    def reload_tls(self) -> bool:
        """SIGHUP: read the certificates again; new connections use them, associations in flight keep theirs.

        A file that cannot be used now leaves the certificates in force (one error line says why).
        """
        if self.tls is None:
            return False
        try:
            contexts = self.tls.reload()
        except ConfigError as exc:
            log.error("TLS certificates not reloaded, the node keeps those it has: %s", exc)
            return False
        if self.scp is not None:
            self.scp.use_ssl_context(contexts.server)
        tls = self.tls.settings
        log.info("TLS certificates reloaded (%s, %s, CA %s): new connections use them", tls.cert_file,
                 tls.key_file, tls.ca_file)  # fmt: skip
        return True

    def _log_started(self, models: str) -> None:
        """A few lines that say what this node runs with: where its state is, who it talks to, what it runs."""
        config, node = self.config, self.config.node
        log.info(
            "dicom-ai-node %s started: AE %s, role %s, %d workers, device UID %s",
            __version__,
            node.ae_title,
            node.role,
            node.workers if self.pool else 0,
            self.device_uid,
        )
        log.info(
            "config %s; database %s; spool %s",
            config.source,
            display_database_url(node.database_url),
            self.spool.root.absolute(),
        )
        peers = ", ".join(
            f"{k}={p.describe()}" for k, p in config.peers.items()
        ) or "none"  # fmt: skip
        routes = "; ".join(f"{r.name} -> {r.pipeline} -> {','.join(r.destinations)}" for r in config.routes) or "none"
        log.info("peers: %s", peers)
        log.info("routes: %s", routes)
        log.info("models: %s", models)
        for warning in delivery_warnings(config):
            log.warning("%s", warning)

    def _audit_application(self, what: str) -> None:
        """Application Activity in the audit trail (and as a DICOM audit message when forwarding is on)."""
        import getpass

        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # no passwd entry for this uid (containers)
            user = str(os.getuid())
        try:
            with self.sessions() as session, session.begin():
                session.add(AuditEvent(kind="application", actor=user[:128], subject=self.config.node.ae_title,
                                       detail=what))  # fmt: skip
        except Exception as exc:  # the database away at stop: the log still says it
            log.warning("node %s not recorded in the audit trail: %s", what, type(exc).__name__)

    def stop(self) -> None:
        if self.api_server is not None:
            self.api_server.stop()
        if self._previous_sighup is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        if self.scp is not None:
            self.scp.stop()
        for loop in self.loops:
            loop.stop()
        if self.pool is not None:
            self.pool.stop()
        if self.prefetcher is not None:  # after the workers: no job puts a file written ahead in place any more
            self.prefetcher.close()
        if self.outbox_thread is not None:
            self.outbox_thread.stop(30)
        self._audit_application("stop")  # forwarded by the next start if the forwarder has stopped already
        self.engine.dispose()

    # -- readiness (GET /readyz) ---------------------------------------------------------------
    def readiness_checks(self) -> dict[str, Callable[[], str | None]]:
        """What /readyz checks, by name: each returns None when ready, else why not."""
        checks: dict[str, Callable[[], str | None]] = {
            "database": self._database_problem,
            "spool": self._spool_problem,
        }
        if self.config.node.role in ("all", "worker"):
            checks["models"] = self._models_problem
        if self.config.node.role in ("all", "receiver"):
            checks["dicom"] = self._dicom_problem
        return checks

    def _database_problem(self) -> str | None:
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return None

    def _spool_problem(self) -> str | None:
        if not os.access(self.spool.root, os.W_OK):
            return f"spool {self.spool.root.absolute()} is not writable"
        return self.spool.below_watermark()

    def _models_problem(self) -> str | None:
        if self.model_problems is None:
            return "models not loaded yet"
        return "; ".join(f"{name}: {why}" for name, why in self.model_problems.items()) or None

    def _dicom_problem(self) -> str | None:
        node = self.config.node
        if self.scp is None:
            return "DICOM port not listening yet"
        try:
            if node.port is not None:
                _ = self.scp.port
            if node.tls is not None and node.tls.port is not None:
                _ = self.scp.tls_port
        except RuntimeError as exc:
            return str(exc)
        return None

    def _held_by_another_process(self, study_uid: str) -> bool:
        assert self.slice_store is not None
        return self.slice_store.study(study_uid).held_by_other(self.identity, LEASE_S)

    def wake_workers(self) -> None:
        """A job was queued (or queued again): the workers look for it now."""
        if self.pool is not None:
            self.pool.wake()
        if self.on_jobs_queued is not None:
            self.on_jobs_queued()

    def _wake_outbox(self) -> None:
        if self.outbox_thread is not None:
            self.outbox_thread.wake()

    # -- housekeeping ----------------------------------------------------------------------
    def _reclaim(self) -> None:
        if reclaim_stale_jobs(self.sessions, lease_s=self.job_lease_s, max_attempts=self.max_job_attempts):
            if self.pool is not None:
                self.pool.wake()
        released = reclaim_dead_deliveries(self.sessions)
        if released:
            log.warning("%d deliveries of a sender that died are sent again (same SOP Instance UIDs)", len(released))
