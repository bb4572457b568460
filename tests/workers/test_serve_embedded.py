"""``maskd serve --embedded``: the one-command stack on SQLite and the filesystem broker.

This is how the README runs the service without any server, so it is tested as a user runs it:
the CLI in subprocesses (``db upgrade``, ``admin create-key``, ``serve --embedded``), a job
through HTTP, and Ctrl-C at the end, which must also stop the worker it started.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from worker_testkit import FAST_SETTINGS, settings_environment, tiny_spec, wait_for

from service.client import MaskdClient, MaskdClientError
from service.config import Settings

MASKD = [sys.executable, "-c", "import sys; from maskd_cli import main; sys.exit(main())"]
WORKER_STARTED = re.compile(r"started a Celery worker subprocess, pid (\d+)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def maskd(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([*MASKD, *args], env=env, check=True, capture_output=True, text=True)
    return done.stdout


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    log_path: Path
    base_url: str

    def worker_pids(self) -> list[int]:
        return [int(pid) for pid in WORKER_STARTED.findall(self.log_path.read_text())]


@pytest.fixture
def embedded_env(tmp_path: Path, mlflow_tracking_uri: str) -> dict[str, str]:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'maskd.db'}",
        broker_url="filesystem://",
        data_dir=tmp_path / "var",
        mlflow_tracking_uri=mlflow_tracking_uri,
        **FAST_SETTINGS,
    )
    return {**settings_environment(settings), "MASKD_API_PORT": str(free_port())}


@pytest.fixture
def api_key(embedded_env: dict[str, str]) -> str:
    """A key made by the CLI, on a database the CLI migrated (before `serve` migrates again)."""
    maskd(embedded_env, "db", "upgrade")
    return maskd(embedded_env, "admin", "create-key", "--project", "p").strip()


@pytest.fixture
def served(embedded_env: dict[str, str], api_key: str, tmp_path: Path) -> Iterator[Served]:
    """``maskd serve --embedded`` in its own process group; killed with its worker if left."""
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*MASKD, "serve", "--embedded"],
            env=embedded_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    opened = Served(process, log_path, f"http://127.0.0.1:{embedded_env['MASKD_API_PORT']}")
    try:
        yield opened
    finally:
        print(log_path.read_text(errors="replace"))
        for pid in opened.worker_pids():
            if pid_alive(pid):
                os.killpg(pid, signal.SIGKILL)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.slow
def test_serve_embedded_runs_a_job_and_stops_its_worker_on_ctrl_c(
    served: Served, api_key: str
) -> None:
    with MaskdClient.connect(served.base_url, api_key) as client:
        wait_for(lambda: _healthy(client), 60, "the API to answer")
        job_id = client.submit_job(tiny_spec()).id
        job = client.wait(job_id, timeout=120, poll_seconds=0.25)
    assert job.state == "SUCCEEDED", job.message

    served.process.send_signal(signal.SIGINT)
    assert served.process.wait(timeout=60) == 0
    (worker_pid,) = served.worker_pids()
    assert not pid_alive(worker_pid), "the embedded worker outlived `maskd serve`"


@pytest.mark.slow
def test_sigterm_stops_serve_embedded_and_its_worker(served: Served, api_key: str) -> None:
    """A process manager (docker stop, systemd) stops the service with SIGTERM, to it alone."""
    with MaskdClient.connect(served.base_url, api_key) as client:
        wait_for(lambda: _healthy(client), 60, "the API to answer")
    wait_for(lambda: bool(served.worker_pids()), 60, "the worker to start")

    served.process.send_signal(signal.SIGTERM)
    served.process.wait(timeout=60)
    (worker_pid,) = served.worker_pids()
    wait_for(lambda: not pid_alive(worker_pid), 60, "the embedded worker to stop")


def _healthy(client: MaskdClient) -> bool:
    try:
        client.healthz()
    except MaskdClientError:
        return False
    return True
