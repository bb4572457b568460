"""Commands that run the service: ``serve``, ``worker``, ``reconcile``, ``db``, ``admin``, ``demo``.

Each command imports the service, Celery and uvicorn inside its function, so ``maskd --help``
stays instant and ``maskd run`` never loads the service stack. ``serve --embedded`` is the whole
stack in one command (API, reconciler and a worker subprocess on SQLite and the filesystem
broker); in production each piece runs on its own (``serve``, ``worker`` per GPU). ``serve``,
``worker`` and ``reconcile`` log through ``service.logs.configure_logging`` (JSON lines by
default, ``MASKD_LOG_FORMAT=text`` for readable ones).
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any

from maskd_cli.processes import (
    open_store,
    start_worker_subprocess,
    stop_worker_subprocess,
    worker_argv,
)

if TYPE_CHECKING:
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
        "--no-reconciler",
        action="store_true",
        help="run no reconciler thread beside the API, for deployments that run `maskd "
        "reconcile` as its own service",
    )
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


def _configure_logging(settings: Settings) -> None:
    from service.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.config import get_settings
    from service.db import upgrade_to_head
    from service.dispatch import Dispatcher, make_celery_app
    from workers.reconciler import start_reconciler_thread

    settings = get_settings()
    _configure_logging(settings)
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
        uvicorn.run(
            "service.main:create_app",
            factory=True,
            host=args.host or settings.api_host,
            port=args.port or settings.api_port,
            # uvicorn's loggers (access lines included) go to the root handler set up above.
            log_config=None,
        )
    finally:
        if stop_reconciler is not None:
            stop_reconciler.set()
        if worker is not None:
            stop_worker_subprocess(worker)
        engine.dispose()
    return 0


def _worker(args: argparse.Namespace) -> int:
    from service.config import get_settings

    # The worker configures it again from Celery's setup_logging signal (workers.observability),
    # which also covers workers started as `celery -A workers.app worker`.
    _configure_logging(get_settings())
    from workers.app import app

    app.worker_main(argv=worker_argv(args.concurrency, args.queues))
    return 0


def _reconcile(args: argparse.Namespace) -> int:
    import threading

    from service.config import get_settings
    from service.dispatch import Dispatcher, make_celery_app
    from workers.reconciler import reconcile_once, run_reconciler

    settings = get_settings()
    _configure_logging(settings)
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
