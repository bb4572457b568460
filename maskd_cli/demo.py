"""``maskd demo``: the whole service, start to finish, on one machine with nothing installed.

It is the README's first command, so it must work on a fresh machine without servers or
downloads: everything runs in embedded mode (SQLite and Celery's filesystem broker) under a new
folder. The teacher is trained here first (no pretrained weights can be downloaded), then the
quickstart job goes through the same path as a production job: REST API → database → broker →
a Celery worker subprocess → both MasKD stages → results read back through the API.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from contextlib import ExitStack
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from maskd_cli.processes import open_store, start_worker_subprocess, stop_worker_subprocess
from maskd_core.callbacks import Callback

if TYPE_CHECKING:
    import uvicorn

    from maskd_core.callbacks import Stage
    from maskd_core.spec import JobSpec
    from service.client import Event, Job, MaskdClient
    from service.config import Settings
    from service.store import JobStore

QUICKSTART_SPEC = "quickstart-segmentation.yaml"
"""In ``examples/``, installed as the package ``maskd_examples``."""
TEACHER_ITERATIONS = 1200
"""What examples/README.md trains the quickstart teacher for: a teacher worth distilling."""
JOB_TIMEOUT_SECONDS = 1800.0
PROJECT = "demo"
STEP_PRINT_SECONDS = 5.0


def run_demo(directory: str | None) -> int:
    """Runs the demo; 0 when the job SUCCEEDED, 1 otherwise."""
    started = time.monotonic()
    root = Path(directory or tempfile.mkdtemp(prefix="maskd-demo-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    env = demo_environment(root)
    os.environ.update(env)
    print(f"maskd demo: everything lives in {root} (SQLite database, filesystem broker, jobs)")

    from service.config import get_settings
    from service.db import upgrade_to_head

    get_settings.cache_clear()
    settings = get_settings()
    upgrade_to_head(settings.database_url)

    engine, store = open_store(settings)
    api_key = store.create_api_key(PROJECT)
    print(f"[1/5] database at {settings.database_url}; project {PROJECT!r} has a new API key")

    spec = yaml.safe_load((files("maskd_examples") / QUICKSTART_SPEC).read_text())
    # The one folder under the data directory a project's specs may read from.
    teacher_path = settings.project_inputs_dir(PROJECT) / "teacher.pt"
    print(
        f"[2/5] training the quickstart teacher ({spec['teacher']['arch']}, "
        f"{TEACHER_ITERATIONS} steps) - no pretrained weights are downloaded"
    )
    teacher_metrics = train_demo_teacher(spec, teacher_path)
    print(f"      teacher ready: {_pick(teacher_metrics, 'miou')} -> {teacher_path}")
    spec["teacher"]["weights"] = str(teacher_path)

    with ExitStack() as stack:
        stack.callback(engine.dispose)
        base_url = start_api_thread(stack, settings)
        _start_worker(stack, env, root / "worker.log")
        _start_reconciler(stack, store, settings)
        print(f"[3/5] API on {base_url}, a Celery worker (log: {root / 'worker.log'})")

        from service.client import MaskdClient

        client = stack.enter_context(MaskdClient.connect(base_url, api_key))
        job = client.submit_job(spec)
        print(f"[4/5] submitted job {job.id} through POST /v1/jobs; following it:")
        final = follow_job(client, job.id)
        _print_result(final, time.monotonic() - started)
        return 0 if final.state == "SUCCEEDED" else 1


def demo_environment(root: Path) -> dict[str, str]:
    """Embedded settings confined to ``root``, for this process and the worker alike."""
    return {
        "MASKD_DATA_DIR": str(root),
        "MASKD_DATABASE_URL": f"sqlite:///{root / 'maskd.db'}",
        "MASKD_BROKER_URL": "filesystem://",
        "MASKD_MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # The worker's log (worker.log) stays readable; the service commands default to JSON.
        "MASKD_LOG_FORMAT": os.environ.get("MASKD_LOG_FORMAT", "text"),
        # Tiny models on a few cores: extra threads oversubscribe and slow them down a lot.
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }


def train_demo_teacher(spec: Mapping[str, Any], out_path: Path) -> dict[str, float]:
    import torch

    from maskd_core.runner import train_teacher
    from maskd_core.spec import JobSpec

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    return train_teacher(
        JobSpec.model_validate(spec), out_path, TEACHER_ITERATIONS, callbacks=[_StepPrinter()]
    )


def follow_job(client: MaskdClient, job_id: str) -> Job:
    """Prints the job's events and, every few seconds, its progress, until it is terminal."""
    deadline = time.monotonic() + JOB_TIMEOUT_SECONDS
    last_event = 0
    last_printed = 0.0
    last_line = ""
    while True:
        job = client.get_job(job_id)
        for event in client.list_events(job_id, after=last_event):
            last_event = event.id
            print(f"      event: {_describe_event(event)}")
        if job.is_terminal:
            return job
        progress = job.progress.get(job.stage or "")
        if progress and time.monotonic() - last_printed >= STEP_PRINT_SECONDS:
            loss = job.metrics.get("loss")
            line = f"{job.state:<11} {job.stage} step {progress.step}/{progress.total}"
            if line != last_line:
                print(f"      {line}" + (f"  loss {loss:.4f}" if loss is not None else ""))
                last_printed, last_line = time.monotonic(), line
        if time.monotonic() > deadline:
            print(f"      gave up after {JOB_TIMEOUT_SECONDS:.0f} s", file=sys.stderr)
            return job
        time.sleep(0.5)


def _describe_event(event: Event) -> str:
    if event.to_state:
        text = f"{event.from_state or '-'} -> {event.to_state}"
        return f"{text} ({event.message})" if event.message else text
    return str(event.message)


def _pick(metrics: Mapping[str, Any], name: str) -> str:
    values = [f"{key} {value:.3f}" for key, value in metrics.items() if key.endswith(name)]
    return ", ".join(values) or "no metrics"


def _print_result(job: Job, seconds: float) -> None:
    print(f"[5/5] job {job.id}: {job.state} ({seconds:.0f} s in all)")
    if job.state != "SUCCEEDED":
        print(f"      {job.failure_kind or ''} {job.message or ''}".rstrip())
        return
    metrics = job.outputs.get("metrics", {})
    for name in ("teacher_miou", "masked_teacher_miou", "student_miou"):
        if name in metrics:
            print(f"      {name:<20} {metrics[name]:.3f}")
    for name, path in job.outputs.get("files", {}).items():
        print(f"      {name:<20} {path}")
    if "model" in job.outputs:
        print(f"      {'registered model':<20} {job.outputs['model']['uri']}")


class _StepPrinter(Callback):
    """Prints local training progress every few seconds."""

    def __init__(self) -> None:
        self._totals: dict[str, int] = {}
        self._last_printed = 0.0

    def on_stage_start(
        self, stage: Stage, start_step: int, total_steps: int, spec: JobSpec
    ) -> None:
        self._totals[str(stage)] = total_steps

    def on_step(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
        if time.monotonic() - self._last_printed < STEP_PRINT_SECONDS:
            return
        self._last_printed = time.monotonic()
        total = self._totals.get(str(stage), "?")
        print(f"      {stage} step {step}/{total}  loss {metrics.get('loss', float('nan')):.4f}")


def start_api_thread(stack: ExitStack, settings: Settings) -> str:
    """Uvicorn in a thread on a free loopback port; stopped when ``stack`` closes."""
    import uvicorn

    from service.main import create_app

    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="warning")
    )
    thread = threading.Thread(target=server.run, name="maskd-demo-api", daemon=True)
    thread.start()
    stack.callback(_stop_server, server, thread)
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the API failed to start; see the messages above")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _stop_server(server: uvicorn.Server, thread: threading.Thread) -> None:
    server.should_exit = True
    thread.join(timeout=10)


def _start_worker(stack: ExitStack, env: Mapping[str, str], log_path: Path) -> None:
    log = stack.enter_context(log_path.open("wb"))
    worker = start_worker_subprocess({**os.environ, **env}, log=log)
    stack.callback(stop_worker_subprocess, worker)


def _start_reconciler(stack: ExitStack, store: JobStore, settings: Settings) -> None:
    from service.dispatch import Dispatcher, make_celery_app
    from workers.reconciler import start_reconciler_thread

    celery_app = make_celery_app(settings, name="maskd-demo-reconciler")
    thread, stop = start_reconciler_thread(store, Dispatcher(celery_app, store), settings)
    # An ExitStack unwinds last-in first-out: stop, wait, then close the connection.
    stack.callback(celery_app.close)
    stack.callback(thread.join, 5)
    stack.callback(stop.set)
