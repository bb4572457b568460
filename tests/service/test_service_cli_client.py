"""`maskd jobs …`, `maskd models …` and the client's event stream against a real API server
(uvicorn on loopback), a real database and a real MLflow registry.

A job's progress is written the way a worker writes it, through the store's worker calls
(claim, transitions, progress, outputs), so the commands see exactly what a running job shows.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from service_testkit import spec_body

from maskd_cli import main
from maskd_cli.api_session import ExitCode
from maskd_cli.demo import start_api_thread
from maskd_cli.follow_view import TerminalView
from service.client import (
    Event,
    MaskdClient,
    Progress,
    RetryPolicy,
    StageProgress,
    StreamEnd,
)
from service.config import Settings
from service.lifecycle import JobState
from service.store import JobStore

ROOT = Path(__file__).resolve().parents[2]
WORKER = "test-worker"
MODEL = {"name": "acme.tiny-seg-student", "version": "1", "uri": "models:/acme.tiny-seg-student/1"}
COMPARISON = {
    "format": "maskd-comparison/2",
    "job": "tiny-seg",
    "task": "segmentation",
    "primary_metric": "miou",
    "teacher": 0.61,
    "masked_teacher": None,
    "iterations": 10,
    "seeds": [1, 2],
    "methods": [
        {
            "method": "maskd",
            "params": {},
            "seeds": [1, 2],
            "values": [0.51, 0.53],
            "mean": 0.52,
            "std": 0.01,
            "seconds_per_step": 0.2,
            "failed": [],
        },
        {
            "method": "fitnet",
            "params": {},
            "seeds": [],
            "values": [],
            "mean": None,
            "std": None,
            "seconds_per_step": None,
            "failed": [{"seed": 1, "error": "RunError", "reason": "loss diverged"}],
        },
    ],
    "failed_runs": 1,
}


@pytest.fixture
def server(service_settings: Settings) -> Iterator[str]:
    with ExitStack() as stack:
        yield start_api_thread(stack, service_settings)


def run_cli(url: str, key: str, *args: str, group: str = "jobs") -> int:
    return main([group, "--url", url, "--api-key", key, "--retries", "1", *args])


def submit(url: str, key: str, spec_file: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert run_cli(url, key, "submit", str(spec_file), "-o", "json") == 0
    job_id: str = json.loads(capsys.readouterr().out)["id"]
    return job_id


def stored_events(url: str, key: str, job_id: str) -> list[Event]:
    """The job's whole history as the API reads it from the database."""
    with MaskdClient.connect(url, key) as client:
        return client.list_events(job_id)


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec_body()))
    return path


def run_like_a_worker(store: JobStore, job_id: str, pause: float = 0.0) -> None:
    """Stage 2 in three progress writes, an evaluation, the outputs a comparison job records,
    and SUCCEEDED: the store calls ``workers.tasks`` and ``workers.reporting`` make."""
    assert store.claim(job_id, WORKER, lease_seconds=60) is not None
    assert store.transition(job_id, JobState.STAGE2, worker_id=WORKER)
    store.add_event(job_id, "stage2 started at step 0 of 10")
    for step in (0, 5, 10):
        store.record_progress(job_id, WORKER, "stage2", step, 10, {"loss": 1.0 / (step + 1)})
        time.sleep(pause)
    store.add_event(job_id, "stage2 evaluation at step 10: student_miou 0.5200")
    assert store.transition(job_id, JobState.REGISTERING, worker_id=WORKER)
    store.record_outputs(
        job_id,
        {
            "mlflow": {"run_id": "run-abc", "experiment_id": "7"},
            "model": MODEL,
            "metrics": {"teacher_miou": 0.61, "student_miou": 0.52},
            "comparison": COMPARISON,
        },
    )
    assert store.transition(job_id, JobState.SUCCEEDED, worker_id=WORKER, message="done")


# ------------------------------------------------------------------------ jobs


def test_submit_list_get_cancel_through_the_cli(
    server: str, job_store: JobStore, spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = job_store.create_api_key("acme")
    assert run_cli(server, key, "submit", str(spec_file), "--idempotency-key", "k1") == 0
    job_id = capsys.readouterr().out.split()[1]
    assert run_cli(server, key, "submit", str(spec_file), "--idempotency-key", "k1") == 0
    assert capsys.readouterr().out.split()[1] == job_id

    assert run_cli(server, key, "list") == 0
    assert job_id in capsys.readouterr().out
    assert run_cli(server, key, "cancel", job_id) == 0
    assert JobState.CANCELLED.value in capsys.readouterr().out
    assert run_cli(server, key, "get", job_id) == 0
    assert '"state": "CANCELLED"' in capsys.readouterr().out
    assert run_cli(server, key, "events", job_id) == 0
    assert "QUEUED -> CANCELLED" in capsys.readouterr().out


def test_every_jobs_command_prints_json_alone_with_o_json(
    server: str, job_store: JobStore, spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = job_store.create_api_key("acme")
    job_ids = [submit(server, key, spec_file, capsys) for _ in range(3)]

    def json_of(*args: str) -> Any:
        assert run_cli(server, key, *args, "-o", "json") == 0
        out = capsys.readouterr().out
        assert out.count("\n") == 1, f"one JSON document on one line: {out!r}"
        return json.loads(out)

    assert json_of("get", job_ids[0])["id"] == job_ids[0]
    assert json_of("cancel", job_ids[0])["state"] == "CANCELLED"
    assert [e["to_state"] for e in json_of("events", job_ids[0])["data"]] == [
        "QUEUED",
        "CANCELLED",
    ]
    # Pages newest first: --cursor continues where the previous page stopped, --all reads all.
    first = json_of("list", "--limit", "1")
    second = json_of("list", "--limit", "1", "--cursor", first["next_cursor"])
    assert [first["data"][0]["id"], second["data"][0]["id"]] == job_ids[:0:-1]
    everything = json_of("list", "--limit", "1", "--all")
    assert [job["id"] for job in everything["data"]] == job_ids[::-1]
    assert everything["next_cursor"] is None

    assert run_cli(server, key, "list", "--limit", "1") == 0
    assert "more: maskd jobs list --cursor" in capsys.readouterr().out

    spec_file.write_text(yaml.safe_dump(spec_body(labels={"team": "vision"})))
    labelled = submit(server, key, spec_file, capsys)
    assert [job["id"] for job in json_of("list", "--label", "team=vision")["data"]] == [labelled]
    with pytest.raises(SystemExit) as usage:
        run_cli(server, key, "list", "--label", "team")
    assert usage.value.code == ExitCode.USAGE
    assert "write a label as KEY=VALUE" in capsys.readouterr().err


@pytest.mark.slow
def test_follow_shows_progress_events_and_a_summary_then_json_lines(
    server: str,
    service_settings: Settings,
    job_store: JobStore,
    spec_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key = job_store.create_api_key("acme")
    job_id = submit(server, key, spec_file, capsys)
    worker = threading.Thread(target=run_like_a_worker, args=(job_store, job_id, 0.3))
    worker.start()
    # stdout is captured, not a terminal: plain lines, no progress bar escapes.
    assert run_cli(server, key, "events", job_id, "--follow") == ExitCode.OK
    worker.join()
    out = capsys.readouterr().out
    assert "\r" not in out and "\x1b" not in out, out
    lines = out.splitlines()
    for expected in (
        "QUEUED -> STAGE2",
        "stage2 evaluation at step 10: student_miou 0.5200",
        "stage2 step 10/10",
        f"job {job_id} (tiny-seg) SUCCEEDED",
        "student_miou",
        "registered model: acme.tiny-seg-student version 1",
        # The model is not in this registry, so the API gives no link: the run's id.
        "MLflow run: run-abc",
    ):
        assert any(expected in line for line in lines), f"{expected!r} not in:\n{out}"
    table = out[out.index("comparison (miou") :]
    assert re.search(r"maskd\s+0\.5200\s+0\.0100\s+0\.2000\s+-", table), table
    assert re.search(r"fitnet\s+-\s+-\s+-\s+seed 1: loss diverged", table), table
    assert out.index("stage2 evaluation") < out.index(f"job {job_id} (tiny-seg) SUCCEEDED")

    assert run_cli(server, key, "events", job_id, "--follow", "-o", "json") == ExitCode.OK
    messages = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ids = [m["data"]["id"] for m in messages if m["event"] in ("transition", "info")]
    assert ids == [event.id for event in stored_events(server, key, job_id)]
    assert [m["event"] for m in messages[-2:]] == ["end", "job"]
    assert messages[-1]["data"]["state"] == "SUCCEEDED"


def test_on_a_terminal_each_stage_gets_a_bar_with_the_events_above_it() -> None:
    at = datetime.now(UTC)
    screen = io.StringIO()
    view = TerminalView(screen)
    view.show(Event(id=1, kind="info", message="stage1 started", created_at=at))
    for step in (0, 40, 100):
        stage1 = {"stage1": StageProgress(step=step, total=100)}
        view.show(Progress(state="STAGE1", stage="stage1", progress=stage1))
    view.show(Event(id=2, kind="info", message="stage1 evaluation: dice 0.3", created_at=at))
    stage2 = {
        "stage1": StageProgress(step=100, total=100),
        "stage2": StageProgress(step=5, total=20),
    }
    view.show(Progress(state="STAGE2", stage="stage2", progress=stage2, metrics={"loss": 0.5}))
    view.close()
    # A finished bar ends its line; the next stage's bar is drawn below it.
    lines = screen.getvalue().split("\n")
    assert any(line.endswith("stage1 started") for line in lines)
    assert re.search(r"stage1: 100%.*100/100", screen.getvalue())
    stage2_line = next(line for line in lines if "stage2:" in line)
    assert re.search(r"stage2:  25%.*5/20.*loss 0\.5", stage2_line), stage2_line
    evaluation = next(i for i, line in enumerate(lines) if "stage1 evaluation" in line)
    assert evaluation < lines.index(stage2_line)


def test_a_failed_job_ends_follow_with_its_reason_and_status_1(
    server: str, job_store: JobStore, spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = job_store.create_api_key("acme")
    job_id = submit(server, key, spec_file, capsys)
    assert run_cli(server, key, "cancel", job_id) == 0
    capsys.readouterr()
    assert run_cli(server, key, "events", job_id, "--follow") == ExitCode.FAILED
    assert f"job {job_id} (tiny-seg) CANCELLED" in capsys.readouterr().out


# ------------------------------------------------------------------------ the event stream


class CuttingProxy:
    """A TCP proxy in front of the API that cuts its first connection right after the first
    event with an id has passed, as a flaky network or a restarting proxy would."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.requests: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._upstream)
            cut = not self.requests
            self.requests.append(b"")
            index = len(self.requests) - 1
            threading.Thread(target=self._up, args=(client, upstream, index), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, cut), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket, index: int) -> None:
        while chunk := _recv(client):
            self.requests[index] += chunk
            upstream.sendall(chunk)

    def _down(self, upstream: socket.socket, client: socket.socket, cut: bool) -> None:
        sent = b""
        while chunk := _recv(upstream):
            sent += chunk
            first_event = re.search(rb"id: \d+\n.*?\n\n", sent, re.DOTALL)
            if cut and first_event:
                client.sendall(chunk[: len(chunk) - (len(sent) - first_event.end())])
                break
            client.sendall(chunk)
        for end in (client, upstream):
            # shutdown, not just close: it sends the FIN at once and wakes the other
            # direction's thread, blocked reading from the same socket.
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()


def _recv(connection: socket.socket) -> bytes:
    try:
        return connection.recv(65536)
    except OSError:
        return b""


def test_follow_resumes_after_a_dropped_connection_without_losing_or_repeating_events(
    server: str, job_store: JobStore, spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = job_store.create_api_key("acme")
    job_id = submit(server, key, spec_file, capsys)
    for note in ("note one", "note two"):
        job_store.add_event(job_id, note)
    proxy = CuttingProxy(server)
    received: list[Any] = []
    retry = RetryPolicy(attempts=3, backoff=0.05)
    with MaskdClient.connect(proxy.url, key, retry=retry) as client:
        reader = threading.Thread(target=lambda: received.extend(client.follow(job_id)))
        reader.start()
        deadline = time.monotonic() + 30
        while len(proxy.requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        job_store.add_event(job_id, "note three")
        assert client.cancel_job(job_id).state == "CANCELLED"
        reader.join(30)
    proxy.close()

    streams = [r for r in proxy.requests if b"/events/stream" in r]
    assert len(streams) == 2, "the first connection was cut and the client came back"
    assert b"last-event-id: 1\r\n" in streams[1].lower()
    events = [item for item in received if isinstance(item, Event)]
    stored = stored_events(server, key, job_id)
    assert [e.id for e in events] == [e.id for e in stored], "each event once, in order"
    assert [e.message for e in events][1:4] == ["note one", "note two", "note three"]
    assert isinstance(received[-1], StreamEnd) and received[-1].state == "CANCELLED"


# ------------------------------------------------------------------------ errors


def test_cli_errors_are_one_line_with_an_exit_status_per_kind(
    server: str, job_store: JobStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = job_store.create_api_key("acme")
    other_key = job_store.create_api_key("globex")
    spec_file = tmp_path / "job.yaml"

    def one_line_error(expected_status: int, *args: str, key: str = key, url: str = server) -> str:
        assert run_cli(url, key, *args) == expected_status
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1, captured
        return captured.err

    spec_file.write_text(yaml.safe_dump(spec_body(stage1={"tokens": 0})))
    assert "tokens" in one_line_error(ExitCode.FAILED, "submit", str(spec_file))
    spec_file.write_text(yaml.safe_dump(spec_body()))
    job_id = submit(server, key, spec_file, capsys)
    assert "not found" in one_line_error(ExitCode.NOT_FOUND, "get", job_id, key=other_key)
    assert "create-key" in one_line_error(ExitCode.AUTH, "list", key="mk_wrong_key")
    assert "cannot read" in one_line_error(ExitCode.USAGE, "submit", str(tmp_path / "nope.yaml"))
    assert main(["jobs", "--url", server, "list"]) == ExitCode.AUTH
    assert "MASKD_API_KEY" in capsys.readouterr().err

    with socket.socket() as nothing_listens:
        nothing_listens.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{nothing_listens.getsockname()[1]}"
        error = one_line_error(ExitCode.UNREACHABLE, "list", "-o", "json", url=down)
    assert error.startswith(f"maskd jobs: cannot reach the maskd API at {down}"), error
    assert "MASKD_URL" in error


@pytest.mark.slow
def test_ctrl_c_detaches_from_a_followed_job_which_goes_on(
    server: str, job_store: JobStore, spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = job_store.create_api_key("acme")
    job_id = submit(server, key, spec_file, capsys)
    # Ctrl-C as a terminal delivers it, whatever this process inherited: a test run started in
    # the background by a shell without job control ignores SIGINT, and so would its children.
    command = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from maskd_cli import main; sys.exit(main())"
    )
    arguments = ["jobs", "--url", server, "--api-key", key, "events", job_id, "--follow"]
    follower = subprocess.Popen(
        [sys.executable, "-c", command, *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert follower.stdout is not None
    assert "-> QUEUED" in follower.stdout.readline(), "following before the interrupt"
    follower.send_signal(signal.SIGINT)
    _, err = follower.communicate(timeout=30)
    assert follower.returncode == ExitCode.INTERRUPTED
    assert err == (
        f"detached; job {job_id} goes on — follow again with "
        f"`maskd jobs events {job_id} --follow`\n"
    )
    with MaskdClient.connect(server, key) as client:
        assert client.get_job(job_id).state == "QUEUED"
