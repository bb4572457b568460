"""The production-shaped service stack the service benches run against, and its clean-up.

Shared by the service benches (``api_speed.py``, ``submit_latency.py``, ``worker_start.py``,
``chaos.py``; not a bench itself): a fresh PostgreSQL database (migrated, with one project key)
and MLflow database, a Redis database of the bench's own, a temp folder for work directories,
the API (``uvicorn`` or ``maskd serve``) as a subprocess on a free loopback port and, on
request, ``maskd worker`` subprocesses, configured exactly as a deployment is (through
``MASKD_*`` variables). Everything lives in one ``ExitStack``, so processes are stopped, the
database dropped and the Redis database flushed however the bench ends (error, Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import redis
from sqlalchemy import create_engine, make_url, text

from service.db import make_engine, make_sessionmaker, upgrade_to_head
from service.store import JobStore

POSTGRES_ADMIN_URL = os.environ.get(
    "MASKD_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_SERVER_URL = os.environ.get("MASKD_BENCH_REDIS_URL", "redis://127.0.0.1:6379")
STOP_GRACE_SECONDS = 15.0


def tiny_spec(seed: int = 0) -> dict[str, Any]:
    """The smallest real job (seg_tiny models, 16x16 procedural images, a second of training).

    Stage-1 reuse is off: identical specs would otherwise take their tokens from the previous
    job's MLflow run and skip the stage whose start the latency bench times.
    """
    return {
        "name": "bench-tiny",
        "task": "segmentation",
        "device": "cpu",
        "seed": seed,
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
        "stage1": {"iterations": 4, "tokens": 2, "reuse": False},
        "stage2": {"iterations": 20},
        "batch_size": 2,
        "checkpoint_every": 50,
        "max_eval_batches": 1,
    }


def sigterm_as_interrupt() -> None:
    """SIGTERM and SIGINT unwind as ``KeyboardInterrupt``, so the clean-up runs for both.

    SIGINT is set explicitly because a shell starting the bench in the background makes it
    ignored, and a Ctrl-C (or ``kill -INT``) would then leave the stack running.
    """

    def _raise(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGINT, _raise)


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process and its children (own session), SIGKILL if they hang."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@dataclass
class ServiceStack:
    """One bench's database, Redis db, temp folder and subprocesses; use as a context manager."""

    redis_db: int
    cleanup: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    env: dict[str, str] = field(default_factory=dict)
    temp_dir: Path = Path()
    database_url: str = ""
    api_key: str = ""
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __enter__(self) -> ServiceStack:
        try:
            self._open()
        except BaseException:
            self.cleanup.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup.close()

    def _open(self) -> None:
        self.temp_dir = Path(
            self.cleanup.enter_context(tempfile.TemporaryDirectory(prefix="maskd-bench-"))
        )
        self.database_url = self._create_database()
        broker_url = f"{REDIS_SERVER_URL}/{self.redis_db}"
        broker = redis.Redis.from_url(broker_url)
        broker.flushdb()
        self.cleanup.callback(broker.close)
        self.cleanup.callback(broker.flushdb)
        upgrade_to_head(self.database_url)
        engine = make_engine(self.database_url)
        try:
            self.api_key = JobStore(make_sessionmaker(engine)).create_api_key("bench")
        finally:
            engine.dispose()
        self.env = {
            **os.environ,
            "MASKD_DATABASE_URL": self.database_url,
            "MASKD_BROKER_URL": broker_url,
            "MASKD_DATA_DIR": str(self.temp_dir / "var"),
            "MASKD_MLFLOW_TRACKING_URI": f"sqlite:///{self.temp_dir / 'mlflow.db'}",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "OMP_NUM_THREADS": "1",
        }
        self._create_mlflow_schema()

    def _create_mlflow_schema(self) -> None:
        """MLflow's tables, made now: a deployment's tracking database exists before the
        service starts, and creating it (seconds of migrations) in the first reconciler pass
        would land in the first measurements."""
        code = "import sys, mlflow; mlflow.MlflowClient(sys.argv[1]).search_experiments()"
        uri = self.env["MASKD_MLFLOW_TRACKING_URI"]
        subprocess.run([sys.executable, "-c", code, uri], env=self.env, check=True)

    def _create_database(self) -> str:
        name = f"maskd_bench_{uuid.uuid4().hex[:12]}"
        admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        self.cleanup.callback(admin.dispose)
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))

        def drop() -> None:
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

        self.cleanup.callback(drop)
        return make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(False)

    def _spawn(self, argv: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log_path = self.temp_dir / log_name
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.processes.append(process)
        self.cleanup.callback(stop_process_group, process)
        return process

    def log(self, log_name: str) -> str:
        return (self.temp_dir / log_name).read_text(errors="replace")

    def start_api(self, workers: int = 1, timeout: float = 60.0) -> str:
        """The API (``uvicorn --factory service.main:create_app``); returns its base URL once
        ``/healthz`` answers."""
        port = free_loopback_port()
        log_name = f"api-{port}.log"
        process = self._spawn(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "service.main:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                str(workers),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            log_name,
        )
        return self._wait_for_api(process, port, log_name, timeout)

    def start_maskd_serve(self, workers: int = 1, timeout: float = 60.0) -> str:
        """``maskd serve --workers N`` as deployed (access log and reconciler thread included);
        returns its base URL once ``/healthz`` answers."""
        port = free_loopback_port()
        maskd = Path(sys.executable).with_name("maskd")
        log_name = f"serve-{port}.log"
        argv = [str(maskd), "serve", "--port", str(port), "--workers", str(workers)]
        return self._wait_for_api(self._spawn(argv, log_name), port, log_name, timeout)

    def _wait_for_api(
        self, process: subprocess.Popen[bytes], port: int, log_name: str, timeout: float
    ) -> str:
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the API exited at start:\n{self.log(log_name)}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base_url}/healthz", timeout=2.0).status_code == 200:
                    return base_url
            if time.monotonic() > deadline:
                raise RuntimeError(f"the API did not answer in {timeout} s:\n{self.log(log_name)}")
            time.sleep(0.2)

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        stop_process_group(process)

    def start_worker(self, log_name: str = "worker.log") -> subprocess.Popen[bytes]:
        """``maskd worker`` (prefork, concurrency 1, one task per child), as deployed."""
        maskd = Path(sys.executable).with_name("maskd")
        return self._spawn([str(maskd), "worker"], log_name)

    def start_reconciler(self, log_name: str = "reconciler.log") -> subprocess.Popen[bytes]:
        """``maskd reconcile``: the reconciler as its own process, as deployed."""
        maskd = Path(sys.executable).with_name("maskd")
        return self._spawn([str(maskd), "reconcile"], log_name)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}
