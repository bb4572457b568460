"""The processes the service commands and ``maskd demo`` share: worker subprocesses, the store.

Its own module so that ``service_commands`` (which runs the demo) and ``demo`` (which starts a
worker and opens the store) both depend on it rather than on each other. Like the commands, it
imports the service only inside its functions.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Mapping
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from service.config import Settings
    from service.store import JobStore

WORKER_STOP_GRACE_SECONDS = 30.0
"""How long a worker subprocess gets after SIGTERM (warm shutdown) before it is killed."""


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
