"""``ainode``: serve, status, jobs, echo, send, route-test, run, export, config, db, models.

Exit codes: 0 success, 1 the operation failed (peer down, job not found, ...), 2 bad
usage or bad configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from node.config import Config, ConfigError, delivery_warnings, display_database_url, load_config
from node.operate.logs import exit_after_stop, setup_logging

log = logging.getLogger("ainode")


class CommandFailed(Exception):
    """The command cannot do what was asked; ``str()`` is the one line printed, exit code 1."""


def _load(args: argparse.Namespace) -> Config:
    """The config ``serve`` would read: --config, AINODE_CONFIG, ./ainode.yaml, /etc/ainode/ainode.yaml, defaults."""
    return load_config(args.config)


def _sessions(config: Config):  # type: ignore[no-untyped-def]
    """Sessions on the database of the node that ``config`` describes; never created or migrated here.

    The node creates and migrates its database when it starts (and ``ainode db upgrade`` does):
    a command run in another folder, or with another config, says so instead of quietly making
    an empty database there and reporting that nothing happened.
    """
    from alembic.script import ScriptDirectory
    from sqlalchemy.exc import SQLAlchemyError

    from db.engine import make_engine, make_session_factory
    from db.migrate import alembic_config, current_revision
    from node.config import sqlite_path

    url = config.node.database_url
    shown = display_database_url(url)
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        raise CommandFailed(
            f"no database at {path} (database_url from {config.source}); run it where the node runs or pass --config"
        )
    engine = make_engine(url)
    try:
        revision = current_revision(engine)
    except SQLAlchemyError as exc:
        why = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise CommandFailed(f"cannot open database {shown} (database_url from {config.source}): {why}") from None
    head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
    if revision != head:
        raise CommandFailed(
            f"database {shown} is at schema revision {revision or 'none'}, this ainode reads {head}: "
            "start the node or run 'ainode db upgrade' with the same config"
        )
    print(f"config {config.source}; database {shown}", file=sys.stderr)
    return make_session_factory(engine)


# -- commands --------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from node.operate.allocator import ARENAS, limit_arenas

    arenas_limited = limit_arenas()  # first, before any thread: they share two heaps, not one each
    from node.app import NodeApp
    from node.models import model_names, unknown_pipelines
    from node.receive.scp import ListenError, listen

    config = _load(args)
    if args.role:
        config.node.role = args.role
    if args.no_api:
        config.api = None
    node = config.node
    setup_logging(node.log_level, tag=args.process_tag)
    if node.role in ("all", "worker"):  # a receiver only routes: the models are the workers' business
        problems = unknown_pipelines(config, model_names(config))
        if problems:
            raise ConfigError("\n".join(problems))
    children = jobs = None
    if node.role == "all":
        # The jobs run in worker processes started here, if any; this one receives (node/operate/supervise.py).
        from node.operate.supervise import WorkerProcesses, plan, usable_cpus, usable_memory_bytes

        providers: list[str] = []
        if node.worker_processes == "auto":
            from pipelines.runtime import choose_providers

            providers = choose_providers(None if config.runtime.providers == "auto" else config.runtime.providers)
        jobs = plan(node.worker_processes, node.workers, cpus=usable_cpus(), memory_bytes=usable_memory_bytes(),
                    providers=providers)  # fmt: skip
        if jobs.processes:
            auto = node.worker_processes == "auto"
            children = WorkerProcesses(config.source.path, jobs.processes, threads=jobs.threads if auto else None)
            node.role = "receiver"
        node.worker_processes = jobs.processes
    else:
        node.worker_processes = 0
    if args.no_assembler and node.role != "worker":
        # Only a worker process may leave completing studies to another: a receiver's studies would never complete.
        raise ConfigError(f"--no-assembler is for worker processes (role worker), not role {node.role}")
    listener = tls_listener = api_listener = None
    # Every port is bound before the database, the spool or a worker is touched: a second node on a port
    # in use stops here, in one line.
    try:
        if node.role in ("all", "receiver"):
            listener = listen(node.host, node.port) if node.port is not None else None
            if node.tls is not None and node.tls.port is not None:
                tls_listener = listen(node.host, node.tls.port)
    except ListenError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        if config.api is not None:  # the HTTP API serves every role
            api_listener = listen(config.api.host, config.api.port)
    except ListenError as exc:
        print(f"HTTP API: {exc}", file=sys.stderr)
        return 2
    app = NodeApp(config, assemble=not args.no_assembler)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if children is not None:
        app.on_jobs_queued = children.wake
    app.start(listener, tls_listener, api_listener)
    from node.operate.collector import settle

    frozen = settle()  # what start loaded stays: left out of the collector's full scans
    log.debug("garbage collector: %d objects of the start frozen", frozen)
    log.debug("C allocator: %s", f"{ARENAS} heaps for all threads" if arenas_limited else "as the environment says")
    if jobs is not None:
        where = f"{jobs.processes} worker processes of {jobs.threads} job thread{'s' if jobs.threads != 1 else ''} each"
        log.info("jobs run in %s (%s)", where if jobs.processes else f"this process's {jobs.threads} threads", jobs.why)
    if children is not None:
        children.start()
        node_reload = signal.getsignal(signal.SIGHUP)

        def on_sighup(signum: int, frame: FrameType | None) -> None:
            if callable(node_reload):
                node_reload(signum, frame)
            children.reload()

        signal.signal(signal.SIGHUP, on_sighup)
    elif node.role == "worker":
        # Woken by the node that started this process when it queued a job (node.worker_processes).
        signal.signal(signal.SIGUSR1, lambda _signum, _frame: app.wake_workers())
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})  # blocked by that node until now
    stop.wait()
    app.stop()
    if children is not None:
        children.stop()
    log.info("stopped")
    exit_after_stop(0)


def cmd_config_check(args: argparse.Namespace) -> int:
    code, message = check_config_command(args.file)
    print(message, file=sys.stdout if code == 0 else sys.stderr)
    return code


def check_config_command(path: Path | str) -> tuple[int, str]:
    """``ainode config check FILE``: exit code (0 or 2) and the message to print."""
    from node.models import model_names, unknown_pipelines

    try:
        cfg = load_config(path)
    except ConfigError as exc:
        return 2, str(exc)
    problems = unknown_pipelines(cfg, model_names(cfg))
    if problems:
        return 2, "\n".join(problems)
    n = cfg.node
    if n.tls is not None:
        from node.tls import NodeTLS

        try:
            NodeTLS(cfg)  # the certificate, key and CA files as serve reads them
        except ConfigError as exc:
            return 2, str(exc)
    if cfg.api is not None:
        from node.tls import https_context

        try:
            https_context(cfg.api, f"config error in {cfg.source.path}")  # the API's HTTPS files, as serve reads them
        except ConfigError as exc:
            return 2, str(exc)
    listening = [f"{n.host}:{n.port}"] if n.port is not None else []
    listening += [f"{n.host}:{n.tls.port} (TLS)"] if n.tls is not None and n.tls.port is not None else []
    ports = " and ".join(listening) or "no port"
    peers = ", ".join(f"{k}={p.describe()}" for k, p in cfg.peers.items()) or "none"
    routes = "; ".join(f"{r.name} -> {r.pipeline} -> {','.join(r.destinations)}" for r in cfg.routes) or "none"
    warnings = "".join(f"\n  warning: {w}" for w in delivery_warnings(cfg))
    return 0, (
        f"config OK: {path}\n  AE title {n.ae_title}, listening on {ports}, {n.workers} workers, "
        f"role {n.role}\n  database {display_database_url(n.database_url)}\n  peers: {peers}\n"
        f"  routes: {routes}{warnings}"
    )


def cmd_route_test(args: argparse.Namespace) -> int:
    from node.assemble.router import route_test_command

    code, text = route_test_command(_load(args), _expand(args.files))
    print(text)
    return code


def cmd_status(args: argparse.Namespace) -> int:
    from node.operate.status import format_status
    from node.receive.spool import Spool
    from node.status import collect_status

    config = _load(args)
    root = Path(config.node.spool_dir)  # status only reads: a spool not made yet is not made here
    spool = Spool(root, min_free_bytes=config.node.min_free_disk_mb * 2**20) if root.is_dir() else None
    status = collect_status(_sessions(config), limit=args.limit, spool=spool)
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def _operator(command: str) -> str:
    """Who ran an operator action, for the audit trail: the command and the OS user."""
    import getpass
    import os

    try:
        user = os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid (containers)
        user = f"uid {os.getuid()}"
    return f"{command} ({user})"[:128]


def cmd_jobs_retry(args: argparse.Namespace) -> int:
    from db.models import utcnow
    from node.actions import ActionRefused, retry_job

    sessions = _sessions(_load(args))
    try:
        with sessions() as session, session.begin():
            previous = retry_job(session, args.id, _operator("ainode jobs retry"), utcnow()).value
    except ActionRefused as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"job {args.id} queued again (was {previous})")
    return 0


def cmd_studies_reprocess(args: argparse.Namespace) -> int:
    """Run a study again: its jobs of the current version, or one pipeline (results to the sender)."""
    from db.models import utcnow
    from node.actions import ActionRefused, reprocess_study
    from node.models import model_names

    config = _load(args)
    if args.pipeline is not None:
        found = sorted(model_names(config))
        if args.pipeline not in found:
            print(f"no pipeline named {args.pipeline!r} (models found: {', '.join(found) or 'none'})", file=sys.stderr)
            return 2
    actor = _operator("ainode studies reprocess")
    sessions = _sessions(config)
    try:
        with sessions() as session, session.begin():
            done = reprocess_study(session, args.study_uid, actor, utcnow(), args.pipeline)
    except ActionRefused as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"study {args.study_uid}: " + "; ".join(done.lines()))
    return 0


def cmd_outbox_retry(args: argparse.Namespace) -> int:
    """Make deliveries due, then try them once now with this configuration (peers as fixed by the operator)."""
    from sqlalchemy import select

    from db.models import Delivery, DeliveryState
    from db.queue import process_identity
    from node.app import NodeApp

    app = NodeApp(_load(args))
    try:
        outbox = app.make_outbox(owner=process_identity("outbox-retry"))
        ids = outbox.retry_now(args.ids or None, actor=_operator("ainode outbox retry"))
        if not ids:
            print("no delivery to retry")
            return 0
        # The lease keeps a running node's outbox and this pass from sending the same row twice.
        done = outbox.run_pass(only=ids)
        with app.sessions() as session:
            rows = session.execute(
                select(Delivery.id, Delivery.state, Delivery.last_error)
                .where(Delivery.id.in_(ids))
                .order_by(Delivery.id)
            ).all()
    finally:
        app.engine.dispose()
    for delivery_id, state, error in rows:
        if state != DeliveryState.DELIVERED and error:
            print(f"delivery {delivery_id} {state.value}: {error}")
    elsewhere = len(ids) - (done.delivered + done.retrying + done.failed + done.waiting)
    print(
        f"{len(ids)} deliveries due now: {done.delivered} delivered, {done.retrying} not accepted (retry scheduled), "
        f"{done.waiting} waiting for a peer, {done.failed} failed"
        + (f", {elsewhere} being sent by another process" if elsewhere else "")
    )
    return 0 if done.delivered + elsewhere == len(ids) else 1


def _peer(config: Config, name: str):  # type: ignore[no-untyped-def]
    from node.actions import ActionRefused, peer_address

    try:
        return peer_address(config, name)
    except ActionRefused as exc:  # an unknown peer, or one not reached by DICOM, is a configuration matter
        raise ConfigError(str(exc)) from None


def cmd_echo(args: argparse.Namespace) -> int:
    from node.deliver.scu import AssociationFailed, echo, status_text

    config = _load(args)
    peer = _peer(config, args.peer)
    if config.node.log_level != "DEBUG":  # the one line below says why; pynetdicom's log lines repeat it
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    try:
        status = echo(config.node.ae_title, peer)
    except AssociationFailed as exc:
        print(f"C-ECHO {args.peer}: {exc}", file=sys.stderr)
        return 1
    print(f"C-ECHO {args.peer} ({peer}): status 0x{status:04X} {status_text(status)}")
    return 0 if status == 0 else 1


def _expand(paths: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        files.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    return files


def cmd_send(args: argparse.Namespace) -> int:
    from node.deliver.scu import AssociationFailed, TooManySopClasses, store

    config = _load(args)
    peer = _peer(config, args.to)
    files = _expand(args.files)
    if config.node.log_level != "DEBUG":  # each file's line says why; pynetdicom's and codecs' log lines repeat it
        for library in ("pynetdicom", "pydicom"):
            logging.getLogger(library).setLevel(logging.CRITICAL)
    try:
        outcomes = store(config.node.ae_title, peer, files)
    except (AssociationFailed, TooManySopClasses) as exc:
        print(f"send to {args.to}: {exc}", file=sys.stderr)
        return 1
    failed = 0
    for f, o in zip(files, outcomes, strict=True):
        print(f"{f}: {'accepted' if o.accepted else 'FAILED'} {o.describe()}")
        failed += not o.accepted
    print(f"{len(files) - failed} sent, {failed} failed")
    return 1 if failed else 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from db.engine import make_engine
    from db.migrate import current_revision, upgrade

    engine = make_engine(_load(args).node.database_url)
    before = current_revision(engine)
    upgrade(engine)
    print(f"database at revision {current_revision(engine)} (was {before or 'empty'})")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from node.models import registry_from_config
    from pipelines.modelcheck import models_list_rows

    rows = models_list_rows(registry_from_config(_load(args)))
    print(f"{'NAME':<20} {'VERSION':<9} {'TASK':<15} {'MODALITIES':<12} PROVIDER")
    for r in rows:
        print(f"{r['name']:<20} {r['version']:<9} {r['task']:<15} {','.join(r['modalities']):<12} {r['provider']}")
    return 0


def cmd_models_check(args: argparse.Namespace) -> int:
    from pipelines.modelcheck import check_model_dir

    report = check_model_dir(Path(args.dir))
    print(report)
    return 0 if report.ok else 1


def cmd_run(args: argparse.Namespace) -> int:
    from node.operate.offline import run_offline

    outputs = set(args.outputs.split(",")) if args.outputs else None
    return run_offline(_load(args), _expand(args.inputs), Path(args.out), args.pipeline, outputs)


def cmd_export(args: argparse.Namespace) -> int:
    """Research export: one row per result report, pseudonymous unless --with-phi (node/operate/export.py)."""
    from node.models import registry_from_config
    from node.operate.export import (
        ExportFormat,
        ExportQuery,
        PseudonymKeyMissing,
        parse_time,
        pseudonym_key,
        run_export,
    )

    config = _load(args)
    try:
        key = pseudonym_key(config.export)
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until, end_of_day=True) if args.until else None
        query = ExportQuery(since=since, until=until, pipeline=args.pipeline, with_phi=args.with_phi)
        if args.out is None and args.format == "parquet":
            raise ValueError("parquet is written to a file: pass -o FILE")
    except (PseudonymKeyMissing, ValueError) as exc:
        print(f"ainode export: {exc}", file=sys.stderr)
        return 2
    models = {(m.name, m.version): m.sha256 for m in registry_from_config(config).list()}
    out = Path(args.out) if args.out else None
    actor = _operator("ainode export")
    spool = Path(config.node.spool_dir)
    n = run_export(_sessions(config), spool, key, query, models, ExportFormat(args.format), out, actor)
    if out is not None:
        print(f"{n} result(s) written to {out}", file=sys.stderr)
    return 0


# -- parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from node import __version__

    parser = argparse.ArgumentParser(prog="ainode", description="DICOM AI node")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--config",
            "-c",
            help="YAML config file (default: $AINODE_CONFIG, else ./ainode.yaml, else /etc/ainode/ainode.yaml, "
            "else the embedded defaults)",
        )
        return p

    p = with_config(sub.add_parser("serve", help="run the node"))
    p.add_argument(
        "--role",
        choices=["all", "receiver", "worker"],
        help="override node.role: all (receive, run, deliver), receiver (DICOM only) or worker (jobs only)",
    )
    p.add_argument("--no-api", action="store_true", help="do not serve the HTTP API (the node's worker processes)")
    p.add_argument("--process-tag", help="name this process in every log line (the node's worker processes)")
    p.add_argument(
        "--no-assembler",
        action="store_true",
        help="do not complete studies nor queue jobs (the node's worker processes: the node does, and wakes them)",
    )
    p.set_defaults(func=cmd_serve)

    cfg = sub.add_parser("config", help="configuration").add_subparsers(dest="config_command", required=True)
    p = cfg.add_parser("check", help="validate a config file without starting")
    p.add_argument("file", help="the YAML config file to check (AINODE_... environment overrides apply)")
    p.set_defaults(func=cmd_config_check)

    p = with_config(sub.add_parser("route-test", help="which route and pipeline each file would take, and why"))
    p.add_argument("files", nargs="+", help="DICOM files or folders (read recursively); only headers are read")
    p.set_defaults(func=cmd_route_test)

    p = with_config(sub.add_parser("status", help="studies, jobs and outbox"))
    p.add_argument("--json", action="store_true", help="print the status as JSON, for scripts and monitoring")
    p.add_argument("--limit", type=int, default=50, help="show at most this many of each (default: 50)")
    p.set_defaults(func=cmd_status)

    jobs = sub.add_parser("jobs", help="jobs").add_subparsers(dest="jobs_command", required=True)
    p = with_config(jobs.add_parser("retry", help="queue a failed / not-applicable / done job again"))
    p.add_argument("id", type=int, help="the job's number, as 'ainode status' shows it")
    p.set_defaults(func=cmd_jobs_retry)

    studies = sub.add_parser("studies", help="studies").add_subparsers(dest="studies_command", required=True)
    p = with_config(
        studies.add_parser(
            "reprocess",
            help="run a study again (e.g. after a model upgrade)",
            epilog="exit codes: 0 queued; 1 no such study, or nothing to run; 2 unknown pipeline",
        )
    )
    p.add_argument("study_uid", metavar="STUDY_UID", help="the Study Instance UID, as 'ainode status' shows it")
    p.add_argument(
        "--pipeline",
        help="run this pipeline on the study, results to its sender (default: again every job of its current version)",
    )
    p.set_defaults(func=cmd_studies_reprocess)

    outbox = sub.add_parser("outbox", help="deliveries").add_subparsers(dest="outbox_command", required=True)
    p = with_config(
        outbox.add_parser(
            "retry",
            help="make deliveries not yet delivered due now and try them once with this configuration",
            epilog="exit codes: 0 every delivery delivered (or being sent by a running node); 1 some wait or failed",
        )
    )
    p.add_argument("ids", nargs="*", type=int, help="delivery numbers as 'ainode status' shows them (default: all)")
    p.set_defaults(func=cmd_outbox_retry)

    p = with_config(sub.add_parser("echo", help="C-ECHO a configured peer"))
    p.add_argument("peer", help="a peer's name under 'peers:' in the config")
    p.set_defaults(func=cmd_echo)

    p = with_config(sub.add_parser("send", help="C-STORE files to a configured peer"))
    p.add_argument("files", nargs="+", help="DICOM files or folders (sent recursively)")
    p.add_argument("--to", required=True, help="the peer's name under 'peers:' in the config")
    p.set_defaults(func=cmd_send)

    db = sub.add_parser("db", help="database").add_subparsers(dest="db_command", required=True)
    p = with_config(db.add_parser("upgrade", help="apply migrations"))
    p.set_defaults(func=cmd_db_upgrade)

    models = sub.add_parser("models", help="ONNX models").add_subparsers(dest="models_command", required=True)
    p = with_config(models.add_parser("list", help="models available to routes"))
    p.set_defaults(func=cmd_models_list)
    p = models.add_parser("check", help="validate a model folder (manifest, checksum, dummy run)")
    p.add_argument("dir", help="a model folder: model.onnx, model.yaml (manifest) and MODEL_CARD.md")
    p.set_defaults(func=cmd_models_check)

    p = with_config(
        sub.add_parser(
            "run",
            help="route, run and write results offline, as the node would send them",
            epilog="exit codes: 0 results written; 1 an unreadable file or a failed pipeline; "
            "3 nothing failed but no result was written (unrouted or not analysed; reasons printed)",
        )
    )
    p.add_argument("inputs", nargs="+", help="DICOM files or folders")
    p.add_argument("--out", required=True, help="folder for the result objects")
    p.add_argument("--pipeline", help="skip routing and run this pipeline")
    p.add_argument("--outputs", help="comma-separated result kinds to write (default: seg,sr,sc)")
    p.set_defaults(func=cmd_run)

    p = with_config(sub.add_parser("export", help="research export: one row per result, pseudonymous (no PHI)"))
    p.add_argument("--since", help="results made at or after this time (YYYY-MM-DD or ISO 8601, UTC)")
    p.add_argument("--until", help="results made before this time; a date includes that whole day")
    p.add_argument("--format", choices=["parquet", "csv"], default="parquet", help="file format (default: parquet)")
    p.add_argument("--pipeline", help="only results of this pipeline")
    p.add_argument("--with-phi", action="store_true", help="also patient name, ID, birth date, accession, UIDs")
    p.add_argument("-o", "--out", help="output file (default: stdout, CSV only)")
    p.set_defaults(func=cmd_export)
    _describe_commands(parser)
    return parser


def _describe_commands(parser: argparse.ArgumentParser) -> None:
    """Give each subcommand's own ``--help`` the one-line help its parent lists it with."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                if sub.description is None:
                    sub.description = helps.get(name)
                _describe_commands(sub)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("serve",):
        setup_logging("WARNING")
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except CommandFailed as exc:
        print(str(exc), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
