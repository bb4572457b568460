"""Commands that run the service: ``serve``, ``worker``, ``reconcile``, ``db``, ``admin``, ``demo``.

Each command imports the service, Celery and uvicorn inside its function, so ``maskd --help``
stays instant and ``maskd run`` never loads the service stack. ``serve --embedded`` is the whole
stack in one command (API, reconciler and a worker subprocess on SQLite and the filesystem
broker); in production each piece runs on its own (``serve``, ``worker`` per GPU host). ``serve``,
``worker`` and ``reconcile`` log through ``service.logs.configure_logging`` (JSON lines by
default, ``MASKD_LOG_FORMAT=text`` for readable ones).
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from maskd_cli.processes import (
    open_store,
    start_worker_subprocess,
    stop_worker_subprocess,
    worker_argv,
)

if TYPE_CHECKING:
    from types import FrameType

    from service.config import Settings

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    serve = subparsers.add_parser("serve", help="run the REST API (and the reconciler)")
    serve.add_argument(
        "--embedded",
        action="store_true",
        help="also migrate the database and run a worker subprocess: the whole stack in one "
        "command (SQLite and the filesystem broker by default)",
    )
    serve.add_argument("--host", help="address to bind (default: MASKD_API_HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (default: MASKD_API_PORT)")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="API processes sharing the port (uvicorn's --workers); each validates specs in "
        "its own pool of MASKD_VALIDATION_PROCESSES (default 1)",
    )
    serve.add_argument(
        "--no-reconciler",
        action="store_true",
        help="run no reconciler thread beside the API, for deployments that run `maskd "
        "reconcile` as its own service",
    )
    serve.set_defaults(func=_serve)

    worker = subparsers.add_parser("worker", help="run a Celery worker that trains jobs")
    worker.add_argument(
        "--gpus",
        type=_gpu_count,
        help="GPUs this worker hands out, one job per GPU at a time (shared with the host's "
        "other workers through MASKD_GPU_SLOT_DIR); it takes jobs of up to this many GPUs "
        "(queues gpu, gpu2, ..., gpuN). Default: CUDA_VISIBLE_DEVICES's count when set, "
        "else the GPUs `nvidia-smi -L` lists, else 0 (a CPU host: queue gpu only)",
    )
    worker.add_argument(
        "--concurrency",
        type=int,
        help="jobs at once (default: one per GPU, at least 1); a multi-GPU job counts as one",
    )
    worker.add_argument(
        "--queues",
        help="comma-separated queues, replacing those --gpus implies (gpu, gpu2, ..., gpuN)",
    )
    worker.set_defaults(func=_worker)

    reconcile = subparsers.add_parser("reconcile", help="re-dispatch lost or orphaned jobs")
    reconcile.add_argument("--once", action="store_true", help="one pass, then exit")
    reconcile.set_defaults(func=_reconcile)

    db = subparsers.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    db_commands.add_parser("upgrade", help="apply pending migrations").set_defaults(
        func=_db_upgrade
    )

    admin = subparsers.add_parser("admin", help="administration")
    admin_commands = admin.add_subparsers(dest="admin_command", required=True, metavar="COMMAND")
    create_key = admin_commands.add_parser(
        "create-key", help="create a project if needed and print a new API key for it"
    )
    create_key.add_argument("--project", required=True, help="project (tenant) name")
    expiry = create_key.add_mutually_exclusive_group()
    expiry.add_argument(
        "--expires-in",
        type=parse_duration,
        metavar="DURATION",
        help="the key stops working after this long: a number and a unit, s m h d or w "
        "(e.g. 30d, 12h); default: never",
    )
    expiry.add_argument(
        "--expires-at",
        type=parse_moment,
        metavar="ISO",
        help="the key stops working at this moment, ISO 8601 (e.g. 2031-01-31T00:00:00Z; "
        "UTC when no zone is given); default: never",
    )
    create_key.set_defaults(func=_create_key)

    list_keys = admin_commands.add_parser(
        "list-keys",
        help="list API keys: id, prefix, project, created, expires, revoked (never the secret)",
    )
    list_keys.add_argument("--project", help="only this project's keys")
    list_keys.set_defaults(func=_list_keys)

    revoke_key = admin_commands.add_parser(
        "revoke-key", help="revoke an API key at once: its next request gets 401"
    )
    revoke_key.add_argument(
        "key", metavar="KEY_ID_OR_PREFIX", help="the key's id or prefix, as list-keys shows it"
    )
    revoke_key.set_defaults(func=_revoke_key)

    demo = subparsers.add_parser(
        "demo",
        help="train a tiny teacher, then run a MasKD job through the API and a worker, "
        "start to finish on this machine (no servers needed)",
    )
    demo.add_argument(
        "--dir", help="folder for the demo's database, broker and jobs (default: a new temp dir)"
    )
    demo.set_defaults(func=_demo)


def _configure_logging(settings: Settings) -> None:
    from service.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)


def _tcp_listener(host: str, port: int) -> socket.socket:
    """The listening socket the API's worker processes share, with Nagle's algorithm off.

    uvicorn binds its own for ``--workers`` above 1 as a socket of protocol 0, and asyncio
    turns Nagle off only on sockets that say they are TCP: every answer written as headers
    then body then waited for the client's delayed ACK, 40 ms a request at low load. (One
    process lets asyncio create the socket, which says so.) Connections accepted here inherit
    ``TCP_NODELAY`` too.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.bind((host, port))
    listener.set_inheritable(True)
    return listener


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _serve(args: argparse.Namespace) -> int:
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from service.config import get_settings
    from service.db import upgrade_to_head
    from service.dispatch import Dispatcher, make_celery_app
    from workers.reconciler import start_reconciler_thread

    settings = get_settings()
    _configure_logging(settings)
    # uvicorn stops gracefully on SIGTERM and then raises it again, and its default action ends
    # the process on the spot, before the `finally` below stops the embedded worker: a process
    # manager's stop left the worker running. As KeyboardInterrupt it unwinds like Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    if args.embedded:
        upgrade_to_head(settings.database_url)
    engine, store = open_store(settings)
    worker = start_worker_subprocess() if args.embedded else None
    if worker is not None:
        logger.info("started a Celery worker subprocess, pid %d", worker.pid)
    stop_reconciler = None
    if not args.no_reconciler:
        dispatcher = Dispatcher(make_celery_app(settings, name="maskd-reconciler"), store)
        _thread, stop_reconciler = start_reconciler_thread(store, dispatcher, settings)
    try:
        options: dict[str, Any] = {
            "factory": True,
            "host": args.host or settings.api_host,
            "port": args.port or settings.api_port,
            "workers": args.workers,
            # uvicorn's loggers (access lines included) go to the root handler set up above.
            "log_config": None,
        }
        if args.workers > 1:
            config = uvicorn.Config("service.main:create_app", **options)
            Multiprocess(config, sockets=[_tcp_listener(config.host, config.port)]).run()
        else:
            uvicorn.run("service.main:create_app", **options)
    except KeyboardInterrupt:
        pass  # Ctrl-C or SIGTERM: a normal stop
    finally:
        if stop_reconciler is not None:
            stop_reconciler.set()
        if worker is not None:
            stop_worker_subprocess(worker)
        engine.dispose()
    return 0


def _gpu_count(text: str) -> int:
    from maskd_core.spec import MAX_WORLD_SIZE

    if not text.isdigit() or int(text) > MAX_WORLD_SIZE:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a GPU count: give a whole number from 0 to {MAX_WORLD_SIZE}"
        )
    return int(text)


@dataclass(frozen=True)
class WorkerPlan:
    """What ``maskd worker`` runs with, from its flags and the host."""

    gpus: int
    concurrency: int
    queues: str


def worker_plan(args: argparse.Namespace) -> WorkerPlan:
    """``--gpus`` (else the GPUs found), and the concurrency and queues it implies unless
    ``--concurrency`` or ``--queues`` say otherwise. Raises ``ValueError`` for more GPUs than
    ``CUDA_VISIBLE_DEVICES`` shows, which the slots could never hand out."""
    from service.dispatch import job_queues
    from workers.gpu_slots import detect_gpus, visible_devices

    gpus: int = detect_gpus() if args.gpus is None else args.gpus
    visible = visible_devices()
    if visible is not None and gpus > len(visible):
        raise ValueError(
            f"--gpus {gpus} but CUDA_VISIBLE_DEVICES shows {len(visible)} GPU(s); give "
            f"--gpus {len(visible)} or make more GPUs visible"
        )
    return WorkerPlan(
        gpus=gpus,
        concurrency=args.concurrency or max(1, gpus),
        queues=args.queues or ",".join(job_queues(gpus)),
    )


def _worker(args: argparse.Namespace) -> int:
    import os

    try:
        plan = worker_plan(args)
    except ValueError as error:
        print(f"maskd worker: {error}", file=sys.stderr)
        return 2
    # The pool processes Celery forks read it through their settings (workers.gpu_slots), so
    # it is in the environment before the settings are first read.
    os.environ["MASKD_WORKER_GPUS"] = str(plan.gpus)
    from service.config import get_settings

    get_settings.cache_clear()
    # The worker configures it again from Celery's setup_logging signal (workers.observability),
    # which also covers workers started as `celery -A workers.app worker`.
    _configure_logging(get_settings())
    logger.info(
        "worker with %d GPU(s), %d job(s) at once, queues %s",
        plan.gpus,
        plan.concurrency,
        plan.queues,
    )
    from workers.app import app

    app.worker_main(argv=worker_argv(plan.concurrency, plan.queues))
    return 0


def _reconcile(args: argparse.Namespace) -> int:
    import threading

    from service.config import get_settings
    from service.dispatch import Dispatcher, make_celery_app
    from service.webhooks import deliver_due
    from workers.reconciler import reconcile_once, run_reconciler
    from workers.run_closer import close_runs_of_ended_jobs

    settings = get_settings()
    _configure_logging(settings)
    engine, store = open_store(settings)
    dispatcher = Dispatcher(make_celery_app(settings, name="maskd-reconciler"), store)
    try:
        if args.once:
            report = reconcile_once(store, dispatcher, settings)
            closed = close_runs_of_ended_jobs(store, settings.mlflow_tracking_uri)
            sent = deliver_due(store, settings)
            print(
                f"re-queued {len(report.requeued)}, re-dispatched {len(report.redispatched)}, "
                f"left waiting in the broker {len(report.still_waiting)}, "
                f"MLflow runs ended {len(closed)}, webhooks delivered {len(sent.delivered)} "
                f"(to retry {len(sent.retrying)}, failed {len(sent.failed)})"
            )
        else:
            run_reconciler(store, dispatcher, settings, threading.Event())
    except KeyboardInterrupt:
        pass
    finally:
        engine.dispose()
    return 0


def _db_upgrade(args: argparse.Namespace) -> int:
    from service.config import get_settings
    from service.db import upgrade_to_head

    upgrade_to_head(get_settings().database_url)
    return 0


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``45s`` or ``2w`` as a positive ``timedelta``."""
    amount, unit = text.strip()[:-1], text.strip()[-1:].lower()
    if unit not in _DURATION_UNITS or not amount.isdigit() or int(amount) <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: write a positive whole number and a unit, "
            "s m h d or w, e.g. 30d or 12h"
        )
    return timedelta(seconds=int(amount) * _DURATION_UNITS[unit])


def parse_moment(text: str) -> datetime:
    """An ISO 8601 moment (a trailing ``Z`` allowed), taken as UTC when it has no zone."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 moment, e.g. 2031-01-31T00:00:00Z"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _create_key(args: argparse.Namespace) -> int:
    from service.config import get_settings

    expires_at: datetime | None = args.expires_at
    if args.expires_in is not None:
        expires_at = datetime.now(UTC) + args.expires_in
    if expires_at is not None and expires_at <= datetime.now(UTC):
        print(
            f"maskd admin create-key: --expires-at {expires_at.isoformat()} is in the past; "
            "give a later moment, or --expires-in such as 30d",
            file=sys.stderr,
        )
        return 2
    engine, store = open_store(get_settings())
    try:
        store.create_project(args.project)
        print(store.create_api_key(args.project, expires_at=expires_at))
    finally:
        engine.dispose()
    if expires_at is not None:
        print(f"the key expires at {_moment(expires_at)}", file=sys.stderr)
    return 0


def _list_keys(args: argparse.Namespace) -> int:
    from service.config import get_settings

    engine, store = open_store(get_settings())
    try:
        keys = store.list_api_keys(args.project)
    finally:
        engine.dispose()
    if not keys:
        where = f" for project {args.project!r}" if args.project else ""
        print(f"no API keys{where}; create one with `maskd admin create-key`", file=sys.stderr)
        return 0
    now = datetime.now(UTC)
    rows = [("ID", "PREFIX", "PROJECT", "CREATED", "EXPIRES", "REVOKED", "STATUS")]
    rows += [
        (
            key.id,
            key.display_prefix,
            key.project_name,
            _moment(key.created_at),
            _moment(key.expires_at, "never"),
            _moment(key.revoked_at, "-"),
            key.status(now),
        )
        for key in keys
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0


def _moment(moment: datetime | None, missing: str = "") -> str:
    return missing if moment is None else moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _revoke_key(args: argparse.Namespace) -> int:
    from service.config import get_settings
    from service.store import ApiKeyNotFound

    engine, store = open_store(get_settings())
    try:
        key, revoked_now = store.revoke_api_key(args.key)
    except ApiKeyNotFound as error:
        print(f"maskd admin revoke-key: {error}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    assert key.revoked_at is not None
    when = _moment(key.revoked_at)
    if revoked_now:
        print(f"revoked {key.display_prefix} (id {key.id}, project {key.project_name}) at {when}")
    else:
        print(f"{key.display_prefix} (id {key.id}) was already revoked at {when}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from maskd_cli.demo import run_demo

    return run_demo(args.dir)
