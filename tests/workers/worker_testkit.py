"""Helpers of the worker tests: tiny job specs, real Celery worker subprocesses, waiting.

Workers are real ``celery worker`` processes (prefork pool, as in production) started the way
``maskd serve --embedded`` starts them, configured through ``MASKD_*`` variables; each runs in its
own process group so a test can SIGKILL the parent and its children together, like a machine
that disappears.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from maskd_cli.service_commands import start_worker_subprocess
from service.client import MaskdClient
from service.config import Settings
from service.db import make_engine, make_sessionmaker
from service.dispatch import Dispatcher
from service.store import JobStore

T = TypeVar("T")

FAST_SETTINGS: dict[str, Any] = {
    "lease_seconds": 3,
    "heartbeat_seconds": 1,
    "redispatch_after_seconds": 2,
    "reconcile_interval_seconds": 1,
    "job_time_limit_seconds": 600,
    "job_soft_time_limit_seconds": 540,
}
"""Short leases and heartbeats, so lost workers are noticed in seconds, not minutes."""

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


def tiny_spec(stage2_iterations: int = 30, checkpoint_every: int = 50) -> dict[str, Any]:
    """A job that trains in about a second (random teacher: these tests are about plumbing)."""
    return {
        "name": "tiny-worker-job",
        "task": "segmentation",
        "device": "cpu",
        "teacher": {
            "arch": "seg_tiny_teacher",
            "args": {"base_channels": 4, "context_blocks": 0},
            "layers": ["head"],
        },
        "student": {
            "arch": "seg_tiny_student",
            "args": {"base_channels": 4, "context_blocks": 0},
            "layers": ["head"],
        },
        "dataset": {"name": "procedural_shapes", "args": {"num_samples": 16, "image_size": 16}},
        "stage1": {"iterations": 4, "tokens": 2},
        "stage2": {"iterations": stage2_iterations},
        "batch_size": 2,
        "checkpoint_every": checkpoint_every,
        "max_eval_batches": 1,
    }


def settings_environment(settings: Settings) -> dict[str, str]:
    """The ``MASKD_*`` variables that make a worker process read ``settings``."""
    fields = {
        "database_url",
        "broker_url",
        "data_dir",
        "mlflow_tracking_uri",
        *FAST_SETTINGS,
    }
    env = {f"MASKD_{name.upper()}": str(getattr(settings, name)) for name in sorted(fields)}
    return {
        **os.environ,
        **env,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "OMP_NUM_THREADS": "1",
    }


def wait_for(check: Callable[[], T | None], timeout: float, what: str, poll: float = 0.1) -> T:
    """Polls ``check`` until it returns something other than None or False."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


class StoreClock:
    """A settable clock for ``JobStore(clock=...)``, so leases expire without sleeping."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def an_hour_ago() -> StoreClock:
    """A store clock an hour behind: leases it hands out are long expired for everyone else."""
    return StoreClock(datetime.now(UTC) - timedelta(hours=1))


@contextmanager
def store_on_clock(database_url: str, clock: StoreClock) -> Iterator[JobStore]:
    """A second store on ``database_url`` whose writes are stamped by ``clock``."""
    engine = make_engine(database_url)
    try:
        yield JobStore(make_sessionmaker(engine), clock=clock)
    finally:
        engine.dispose()


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pool_pids(self) -> set[int]:
        """The pids of the worker's pool processes (children of Celery's parent process)."""
        return child_pids(self.process.pid)

    def kill(self) -> None:
        """SIGKILL the worker and its pool children at once: no cleanup, no acks."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


def child_pids(pid: int) -> set[int]:
    children: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children.update(int(child) for child in (task / "children").read_text().split())
        except OSError:
            continue
    return children


@dataclass
class Stack:
    """API client, store, dispatcher and the worker processes of one test."""

    settings: Settings
    store: JobStore
    client: MaskdClient
    dispatcher: Dispatcher
    log_dir: Path
    workers: list[Worker] = field(default_factory=list)

    def start_worker(self, concurrency: int = 1, **env_overrides: str) -> Worker:
        """A worker on this stack's settings, with ``env_overrides`` (``MASKD_*=...``) on top."""
        log_path = self.log_dir / f"worker-{len(self.workers)}.log"
        env = {**settings_environment(self.settings), **env_overrides}
        with log_path.open("wb") as log:
            process = start_worker_subprocess(env, concurrency=concurrency, log=log)
        worker = Worker(process, log_path)
        self.workers.append(worker)
        return worker

    def workdir(self, job_id: str) -> Path:
        return self.settings.jobs_dir / job_id

    def job(self, job_id: str) -> dict[str, Any]:
        """The job's JSON as the API sent it, which the tests read field by field."""
        return self.client.get_job(job_id).model_dump(mode="json")

    def wait_terminal(self, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
        return wait_for(
            lambda: (job := self.job(job_id))["state"] in TERMINAL and job,
            timeout,
            f"job {job_id} to finish",
            poll=0.25,
        )

    def event_messages(self, job_id: str) -> list[str]:
        return [event.message or "" for event in self.client.list_events(job_id)]

    def worker_logs(self) -> str:
        return "\n".join(f"--- {w.log_path.name}\n{w.log()}" for w in self.workers)
