"""Commands that run the service: ``serve``, ``worker``, ``reconcile``, ``db``, ``admin``, ``demo``.

Each command imports the service, Celery and uvicorn inside its function, so ``maskd --help``
stays instant and ``maskd run`` never loads the service stack. ``serve --embedded`` is the whole
stack in one command (API, reconciler and a worker subprocess on SQLite and the filesystem
broker); in production each piece runs on its own (``serve``, ``worker`` per GPU).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Mapping
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from service.config import Settings
    from service.store import JobStore

logger = logging.getLogger(__name__)

WORKER_STOP_GRACE_SECONDS = 30.0
"""How long a worker subprocess gets after SIGTERM (warm shutdown) before it is killed."""


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
    serve.set_defaults(func=_serve)

    worker = subparsers.add_parser("worker", help="run a Celery worker that trains jobs")
    worker.add_argument(
        "--concurrency", type=int, default=1, help="jobs at once; keep 1 per GPU (default 1)"
    )
    worker.add_argument("--queues", default="gpu", help="comma-separated queues (default gpu)")
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
    create_key.set_defaults(func=_create_key)

    demo = subparsers.add_parser(
        "demo",
        help="train a tiny teacher, then run a MasKD job through the API and a worker, "
        "start to finish on this machine (no servers needed)",
    )
    demo.add_argument(
        "--dir", help="folder for the demo's database, broker and jobs (default: a new temp dir)"
    )
    demo.set_defaults(func=_demo)


def worker_argv(concurrency: int = 1, queues: str = "gpu") -> list[str]:
    """The ``celery worker`` arguments every maskd worker runs with.

    prefork (not solo) because only prefork enforces time limits and can be hard-killed; gossip
    and mingle are off because workers coordinate through the database, not through Celery.
    """
    return [
        "worker",
        "--queues",
        queues,
        "--concurrency",
        str(concurrency),
        "--pool",
        "prefork",
        "--hostname",
        f"maskd-{uuid.uuid4().hex[:8]}@%h",
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        "INFO",
    ]


def start_worker_subprocess(
    env: Mapping[str, str] | None = None,
    *,
    concurrency: int = 1,
    queues: str = "gpu",
    log: IO[bytes] | None = None,
) -> subprocess.Popen[bytes]:
    """A worker in its own process group, so stopping it also stops its prefork children.

    ``env`` replaces the environment (the worker reads its ``MASKD_*`` settings from it);
    ``log`` receives its output, which otherwise goes to this process's.
    """
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "--app", "workers.app", *worker_argv(concurrency, queues)],
        env=None if env is None else dict(env),
        stdout=log,
        stderr=None if log is None else subprocess.STDOUT,
        start_new_session=True,
    )


def stop_worker_subprocess(process: subprocess.Popen[bytes]) -> None:
    """Warm shutdown (SIGTERM: the running job is left to its lease), then kill if it hangs."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=WORKER_STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def open_store(settings: Settings) -> tuple[Engine, JobStore]:
    """The job store on the configured database, refusing an outdated schema."""
    from service.db import check_schema_current, make_engine, make_sessionmaker
    from service.store import JobStore

    engine = make_engine(settings.database_url)
    check_schema_current(engine)
    return engine, JobStore(make_sessionmaker(engine))


def _configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.config import get_settings
    from service.db import upgrade_to_head
    from service.dispatch import Dispatcher, make_celery_app
    from workers.reconciler import start_reconciler_thread

    _configure_logging()
    settings = get_settings()
    if args.embedded:
        upgrade_to_head(settings.database_url)
    engine, store = open_store(settings)
    worker = start_worker_subprocess() if args.embedded else None
    if worker is not None:
        logger.info("started a Celery worker subprocess, pid %d", worker.pid)
    dispatcher = Dispatcher(make_celery_app(settings, name="maskd-reconciler"), store)
    _thread, stop_reconciler = start_reconciler_thread(store, dispatcher, settings)
    try:
        uvicorn.run(
            "service.main:create_app",
            factory=True,
            host=args.host or settings.api_host,
            port=args.port or settings.api_port,
        )
    finally:
        stop_reconciler.set()
        if worker is not None:
            stop_worker_subprocess(worker)
        engine.dispose()
    return 0


def _worker(args: argparse.Namespace) -> int:
    from workers.app import app

    app.worker_main(argv=worker_argv(args.concurrency, args.queues))
    return 0


def _reconcile(args: argparse.Namespace) -> int:
    import threading

    from service.config import get_settings
    from service.dispatch import Dispatcher, make_celery_app
    from workers.reconciler import reconcile_once, run_reconciler

    _configure_logging()
    settings = get_settings()
    engine, store = open_store(settings)
    dispatcher = Dispatcher(make_celery_app(settings, name="maskd-reconciler"), store)
    try:
        if args.once:
            report = reconcile_once(store, dispatcher, settings)
            print(f"re-queued {len(report.requeued)}, re-dispatched {len(report.redispatched)}")
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


def _create_key(args: argparse.Namespace) -> int:
    from service.config import get_settings

    engine, store = open_store(get_settings())
    try:
        store.create_project(args.project)
        print(store.create_api_key(args.project))
    finally:
        engine.dispose()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from maskd_cli.demo import run_demo

    return run_demo(args.dir)
