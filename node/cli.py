"""``ainode``: serve, status, jobs, echo, send, route-test, run, config, db, models.

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

from node.config import Config, ConfigError, check_config_command, load_config
from node.logs import setup_logging

log = logging.getLogger("ainode")


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _sessions(config: Config):  # type: ignore[no-untyped-def]
    from db.engine import make_engine, make_session_factory
    from db.migrate import upgrade

    engine = make_engine(config.node.database_url)
    upgrade(engine)
    return make_session_factory(engine)


# -- commands --------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from node.app import NodeApp

    config = _load(args)
    if args.role:
        config.node.role = args.role
    setup_logging(config.node.log_level)
    app = NodeApp(config)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    app.start()
    stop.wait()
    app.stop()
    log.info("stopped")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    code, message = check_config_command(args.file)
    print(message, file=sys.stdout if code == 0 else sys.stderr)
    return code


def cmd_route_test(args: argparse.Namespace) -> int:
    from node.router import route_test_command

    code, text = route_test_command(_load(args), [Path(f) for f in args.files])
    print(text)
    return code


def cmd_status(args: argparse.Namespace) -> int:
    from node.status import collect_status, format_status

    status = collect_status(_sessions(_load(args)), limit=args.limit)
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def cmd_jobs_retry(args: argparse.Namespace) -> int:
    from db.models import AuditEvent, Job, JobState, Study, StudyState

    sessions = _sessions(_load(args))
    with sessions() as session, session.begin():
        job = session.get(Job, args.id)
        if job is None:
            print(f"no job {args.id}", file=sys.stderr)
            return 1
        if job.state in (JobState.QUEUED, JobState.RUNNING):
            print(f"job {args.id} is {job.state.value}; nothing to retry", file=sys.stderr)
            return 1
        previous = job.state.value
        job.state, job.reason, job.claimed_by = JobState.QUEUED, f"retried by operator (was {previous})", None
        study = session.get(Study, job.study_id)
        if study is not None and study.state == StudyState.PROCESSED:
            study.state = StudyState.QUEUED
        session.add(AuditEvent(kind="operator", actor="ainode jobs retry", subject=str(job.id), detail=previous))
    print(f"job {args.id} queued again (was {previous})")
    return 0


def cmd_outbox_retry(args: argparse.Namespace) -> int:
    from node.app import NodeApp

    app = NodeApp(_load(args))
    n = app.make_outbox().retry_now(args.ids or None)
    print(f"{n} deliveries due now")
    return 0


def _peer(config: Config, name: str):  # type: ignore[no-untyped-def]
    from node.scu import PeerAddress

    peer = config.peers.get(name)
    if peer is None:
        known = ", ".join(sorted(config.peers)) or "none configured"
        raise ConfigError(f"no peer named {name!r} (known: {known})")
    return PeerAddress(peer.ae_title, peer.host, peer.port)


def cmd_echo(args: argparse.Namespace) -> int:
    from node.scu import AssociationFailed, echo

    config = _load(args)
    peer = _peer(config, args.peer)
    try:
        status = echo(config.node.ae_title, peer)
    except AssociationFailed as exc:
        print(f"C-ECHO {args.peer} ({peer}): {exc}", file=sys.stderr)
        return 1
    print(f"C-ECHO {args.peer} ({peer}): status 0x{status:04X} {'success' if status == 0 else 'failure'}")
    return 0 if status == 0 else 1


def _expand(paths: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        files.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    return files


def cmd_send(args: argparse.Namespace) -> int:
    from node.scu import AssociationFailed, store

    config = _load(args)
    peer = _peer(config, args.to)
    files = _expand(args.files)
    try:
        outcomes = store(config.node.ae_title, peer, files)
    except AssociationFailed as exc:
        print(f"send to {args.to} ({peer}): {exc}", file=sys.stderr)
        return 1
    failed = 0
    for f, o in zip(files, outcomes, strict=True):
        print(f"{f}: {'accepted' if o.accepted else 'FAILED'} {o.error or ''}".rstrip())
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
    from pipelines.modelcheck import models_list_rows
    from pipelines.runtime import ModelRegistry, bundled_models_dir

    config = _load(args)
    rt = config.runtime
    registry = ModelRegistry(
        [bundled_models_dir(), *map(Path, config.node.models_dirs)],
        providers=None if rt.providers == "auto" else list(rt.providers),
    )
    rows = models_list_rows(registry)
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
    from node.offline import run_offline

    outputs = set(args.outputs.split(",")) if args.outputs else None
    return run_offline(_load(args), _expand(args.inputs), Path(args.out), args.pipeline, outputs)


# -- parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ainode", description="DICOM AI node")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", "-c", help="YAML config file (default: embedded defaults; env AINODE_CONFIG)")
        return p

    p = with_config(sub.add_parser("serve", help="run the node"))
    p.add_argument("--role", choices=["all", "receiver", "worker"], help="override node.role")
    p.set_defaults(func=cmd_serve)

    cfg = sub.add_parser("config", help="configuration").add_subparsers(dest="config_command", required=True)
    p = cfg.add_parser("check", help="validate a config file without starting")
    p.add_argument("file")
    p.set_defaults(func=cmd_config_check)

    p = with_config(sub.add_parser("route-test", help="which route and pipeline each file would take, and why"))
    p.add_argument("files", nargs="+")
    p.set_defaults(func=cmd_route_test)

    p = with_config(sub.add_parser("status", help="studies, jobs and outbox"))
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_status)

    jobs = sub.add_parser("jobs", help="jobs").add_subparsers(dest="jobs_command", required=True)
    p = with_config(jobs.add_parser("retry", help="queue a failed / not-applicable / done job again"))
    p.add_argument("id", type=int)
    p.set_defaults(func=cmd_jobs_retry)

    outbox = sub.add_parser("outbox", help="deliveries").add_subparsers(dest="outbox_command", required=True)
    p = with_config(outbox.add_parser("retry", help="make pending or given-up deliveries due now"))
    p.add_argument("ids", nargs="*", type=int)
    p.set_defaults(func=cmd_outbox_retry)

    p = with_config(sub.add_parser("echo", help="C-ECHO a configured peer"))
    p.add_argument("peer")
    p.set_defaults(func=cmd_echo)

    p = with_config(sub.add_parser("send", help="C-STORE files to a configured peer"))
    p.add_argument("files", nargs="+")
    p.add_argument("--to", required=True, help="peer name")
    p.set_defaults(func=cmd_send)

    db = sub.add_parser("db", help="database").add_subparsers(dest="db_command", required=True)
    p = with_config(db.add_parser("upgrade", help="apply migrations"))
    p.set_defaults(func=cmd_db_upgrade)

    models = sub.add_parser("models", help="ONNX models").add_subparsers(dest="models_command", required=True)
    p = with_config(models.add_parser("list", help="models available to routes"))
    p.set_defaults(func=cmd_models_list)
    p = models.add_parser("check", help="validate a model folder (manifest, checksum, dummy run)")
    p.add_argument("dir")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("serve",):
        setup_logging("WARNING")
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
