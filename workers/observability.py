"""What a worker sets up around Celery: its logs, its metrics endpoint and torch's threads.

``install(app)`` connects these to Celery's signals, so a worker gets them however it was
started (``maskd worker``, ``maskd serve --embedded``, ``celery -A workers.app worker``):

- ``setup_logging`` (parent): ``service.logs.configure_logging`` with ``MASKD_LOG_FORMAT`` and
  ``MASKD_LOG_LEVEL``; Celery then leaves logging alone. Stray writes to stdout/stderr are still
  turned into log records, as Celery does by default, in the parent and in its children.
- ``celeryd_init`` (parent): no banner in JSON mode, so every line on stderr is a JSON object.
- ``celeryd_after_setup`` (parent, before the pool forks): remembers the concurrency and, with
  ``MASKD_WORKER_METRICS_PORT``, serves ``/metrics`` from a thread of the parent. The children
  write their values to files in ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess
  mode; set here, before the children exist, unless the environment set it) and the parent's
  endpoint sums them. The folder is emptied at start; give each worker its own.
- ``worker_process_init`` (each child, before it reports for work): works out torch's
  intra-op thread count (``worker_torch_threads``), then imports what a job needs
  (``JOB_MODULES``: torch, torchvision, the core, MLflow's stores, the worker's job modules);
  each job applies the thread count when it starts (``apply_torch_threads``, which logs it). A
  job that arrives finds a warm child and reaches its first step without seconds of imports.
  Imports only: opening MLflow's store would create its tables in a new database, which the
  children of one worker, starting together, would race on. The parent never imports torch:
  the children import it after the fork, each for itself (``workers.app`` gives them time
  to). A failed import is logged and left to the job, whose own import then fails it with the
  error, rather than failing the child's start over and over.
- ``heartbeat_sent`` (parent, every Celery heartbeat): touches ``MASKD_WORKER_HEARTBEAT_FILE``
  when set, so a container healthcheck can tell a live worker from a hung one.
- ``worker_shutdown`` (parent): stops the endpoint and removes the folder it created.

This module imports neither torch nor prometheus_client at import time: the parent loads it.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery, signals

from service.config import Settings, get_settings
from service.logs import configure_logging

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

JOB_MODULES = (
    "torch",
    "torchvision",
    "maskd_core.runner",
    "workers.metrics",
    "workers.tracking",
    "workers.publishing",
    "workers.run_closer",
)
"""What ``workers.tasks`` imports in the child to run a job, imported when the child starts.
``workers.metrics`` among them is safe this early: the parent set ``PROMETHEUS_MULTIPROC_DIR``
before it forked."""

MLFLOW_DATABASE_STORES = (
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
)
"""MLflow imports the store of a database tracking URI on first use, a second or more of SQL
models; a tracking server's client comes with ``import mlflow``."""


@dataclass
class _MetricsEndpoint:
    server: Any
    thread: threading.Thread
    directory: Path
    owns_directory: bool


_app: Celery | None = None
_concurrency: int | None = None
"""The pool size, recorded in the parent before it forks (children inherit it)."""
_child_torch_threads: int | None = None
"""Set in a pool child by ``worker_process_init``; None elsewhere (tests, the parent)."""
_endpoint: _MetricsEndpoint | None = None


def install(app: Celery) -> None:
    """Connect the receivers (module functions, so Celery's weak references keep them)."""
    global _app
    _app = app
    signals.setup_logging.connect(_setup_logging)
    signals.celeryd_init.connect(_before_worker_init)
    signals.celeryd_after_setup.connect(_before_pool_starts)
    signals.worker_process_init.connect(_in_pool_child)
    signals.worker_shutdown.connect(_at_shutdown)
    signals.heartbeat_sent.connect(_touch_heartbeat_file)


def worker_torch_threads(
    settings: Settings,
    concurrency: int,
    cpus: int | None = None,
    environ: Mapping[str, str] = os.environ,
) -> int:
    """Intra-op threads per job: ``MASKD_WORKER_TORCH_THREADS``; else ``OMP_NUM_THREADS`` when
    the environment sets a count (torch's own default, which an operator may already rely on);
    else the CPUs this process may use (its affinity, e.g. a container's cpuset) shared among
    the pool's ``concurrency`` processes, at least 1."""
    if settings.worker_torch_threads is not None:
        return settings.worker_torch_threads
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    available = cpus if cpus is not None else len(os.sched_getaffinity(0))
    return max(1, available // max(1, concurrency))


def apply_torch_threads() -> int | None:
    """In a pool child, give torch the thread count worked out at the child's start.

    Returns the count torch now uses, or None outside a pool child (nothing is changed then).
    """
    if _child_torch_threads is None:
        return None
    import torch

    torch.set_num_threads(_child_torch_threads)
    threads = torch.get_num_threads()
    logger.info(
        "torch intra-op threads: %d (%d CPUs usable, worker concurrency %d)",
        threads,
        len(os.sched_getaffinity(0)),
        _concurrency or 1,
    )
    return threads


def _setup_logging(**_: Any) -> None:
    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)
    if _app is not None and _app.conf.worker_redirect_stdouts:
        _app.log.redirect_stdouts(_app.conf.worker_redirect_stdouts_level)


def _before_worker_init(instance: Any = None, **_: Any) -> None:
    if instance is not None and get_settings().log_format == "json":
        instance.quiet = True


def _before_pool_starts(instance: Any = None, **_: Any) -> None:
    global _concurrency, _endpoint
    concurrency = getattr(instance, "concurrency", None)
    _concurrency = concurrency if isinstance(concurrency, int) else None
    settings = get_settings()
    if settings.worker_metrics_port:
        _endpoint = _serve_metrics(settings)


def _serve_metrics(settings: Settings) -> _MetricsEndpoint:
    configured = os.environ.get(MULTIPROC_ENV)
    if configured:
        directory = Path(configured)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink()
    else:
        directory = Path(tempfile.mkdtemp(prefix="maskd-worker-metrics-"))
    # Before prometheus_client is imported anywhere in this process tree: it picks its value
    # store from the environment at import.
    os.environ[MULTIPROC_ENV] = str(directory)
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    server, thread = start_http_server(
        settings.worker_metrics_port, settings.worker_metrics_host, registry
    )
    logger.info(
        "worker metrics at http://%s:%d/metrics (children write to %s)",
        settings.worker_metrics_host,
        settings.worker_metrics_port,
        directory,
    )
    return _MetricsEndpoint(server, thread, directory, owns_directory=not configured)


def _touch_heartbeat_file(**_: Any) -> None:
    path = get_settings().worker_heartbeat_file
    if path is None:
        return
    try:
        path.touch()
    except OSError:
        logger.warning("cannot touch the heartbeat file %s", path, exc_info=True)


def warm_up_modules(settings: Settings) -> tuple[str, ...]:
    """The modules a pool child imports before it takes a job (see the module docstring)."""
    remote = settings.mlflow_tracking_uri.startswith(("http://", "https://"))
    return JOB_MODULES if remote else JOB_MODULES + MLFLOW_DATABASE_STORES


def _in_pool_child(**_: Any) -> None:
    global _child_torch_threads
    settings = get_settings()
    _child_torch_threads = worker_torch_threads(settings, _concurrency or 1)
    started = time.perf_counter()
    modules = warm_up_modules(settings)
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:
            logger.exception("pool child %d: cannot import %s; jobs will retry", os.getpid(), name)
            return
    logger.info(
        "pool child %d warm: imported %d modules in %.1f s",
        os.getpid(),
        len(modules),
        time.perf_counter() - started,
    )


def _at_shutdown(**_: Any) -> None:
    global _endpoint
    endpoint, _endpoint = _endpoint, None
    if endpoint is None:
        return
    endpoint.server.shutdown()
    endpoint.server.server_close()
    if endpoint.owns_directory:
        shutil.rmtree(endpoint.directory, ignore_errors=True)
