"""What a worker exports to operators: task events, Prometheus metrics, JSON logs, torch threads.

The slow test runs ``maskd worker`` as operators do (a subprocess with a prefork pool of two, on
PostgreSQL and Redis), sends it jobs through the API, scrapes the parent's ``/metrics`` and reads
its log; the fast ones check the pieces (settings, thread count, step timing, imports).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from worker_testkit import Stack, Worker, settings_environment, tiny_spec, wait_for

from maskd_core.callbacks import STAGE1, STAGE2, Stage
from maskd_core.spec import JobSpec
from service.config import Settings
from service.dispatch import celery_config, make_celery_app
from workers.metrics import StepMetrics
from workers.observability import worker_torch_threads

ROOT = Path(__file__).resolve().parents[2]
MASKD = [sys.executable, "-c", "import sys; from maskd_cli import main; sys.exit(main())"]
METRICS_DIR = re.compile(r"children write to (\S+)\)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_task_events_are_on_for_the_api_and_the_workers(tmp_path: Path) -> None:
    for broker in ("filesystem://", "redis://127.0.0.1:6379/0"):
        settings = Settings(broker_url=broker, data_dir=tmp_path)
        config = celery_config(settings)
        assert config["worker_send_task_events"] is True
        assert config["task_send_sent_event"] is True
    producer = make_celery_app(Settings(data_dir=tmp_path))
    try:
        assert producer.conf.task_send_sent_event and producer.conf.worker_send_task_events
    finally:
        producer.close()
    from workers.app import app

    assert app.conf.worker_send_task_events and app.conf.task_send_sent_event


def test_torch_threads_come_from_the_setting_then_omp_then_the_usable_cpus() -> None:
    plain = Settings()
    assert (
        worker_torch_threads(Settings(worker_torch_threads=3), 4, 8, {"OMP_NUM_THREADS": "1"}) == 3
    )
    assert worker_torch_threads(plain, 4, cpus=8, environ={"OMP_NUM_THREADS": "2"}) == 2
    assert worker_torch_threads(plain, 3, cpus=8, environ={}) == 2
    assert worker_torch_threads(plain, 4, cpus=2, environ={}) == 1
    assert worker_torch_threads(plain, 1, cpus=6, environ={"OMP_NUM_THREADS": "4,2"}) == 6
    usable = len(os.sched_getaffinity(0))
    assert worker_torch_threads(plain, 1, environ={}) == usable


def test_step_metrics_count_steps_and_time_them_without_evaluations() -> None:
    now = [100.0]

    def sample(name: str, stage: str) -> float:
        return REGISTRY.get_sample_value(name, {"stage": stage}) or 0.0

    before = {
        stage: (
            sample("maskd_worker_training_steps_total", stage),
            sample("maskd_worker_step_seconds_count", stage),
            sample("maskd_worker_step_seconds_sum", stage),
        )
        for stage in ("stage1", "stage2")
    }
    steps = StepMetrics(clock=lambda: now[0])
    spec = JobSpec.model_validate(tiny_spec())
    steps.on_stage_start(STAGE2, 0, 3, spec)
    for step, seconds in enumerate((0.5, 0.25), start=1):
        now[0] += seconds
        steps.on_step(STAGE2, step, {})
    now[0] += 30.0  # an evaluation: not a step
    steps.on_eval(Stage("eval"), 2, {})
    now[0] += 0.125
    steps.on_step(Stage.comparison_run("mgd", 1), 3, {})  # labelled by kind: stage2

    count = sample("maskd_worker_step_seconds_count", "stage2") - before["stage2"][1]
    total = sample("maskd_worker_step_seconds_sum", "stage2") - before["stage2"][2]
    assert sample("maskd_worker_training_steps_total", "stage2") - before["stage2"][0] == 3
    assert (count, total) == (3, 0.875)
    assert sample("maskd_worker_training_steps_total", "stage1") == before["stage1"][0]
    assert STAGE1.kind == "stage1"


def test_the_worker_parent_loads_neither_prometheus_client_nor_torch() -> None:
    """prometheus-client must be first imported after the parent set its multiprocess folder
    (see workers.metrics), so the modules the parent loads must not import it."""
    script = textwrap.dedent(
        """
        import importlib, json, sys
        import workers.app
        for module in workers.app.app.conf.include:
            importlib.import_module(module)
        print(json.dumps(sorted(m for m in ("prometheus_client", "torch") if m in sys.modules)))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def reachable(url: str) -> bool:
    try:
        scrape(url)
    except OSError:
        return False
    return True


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.slow
def test_maskd_worker_serves_metrics_and_writes_json_logs(stack: Stack, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **settings_environment(stack.settings),
        "MASKD_WORKER_METRICS_PORT": str(port),
        "MASKD_WORKER_METRICS_HOST": "127.0.0.1",
        "MASKD_LOG_FORMAT": "json",
        # A tracking database of its own, so MLflow announces creating it (at INFO).
        "MASKD_MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'worker-mlflow.db'}",
    }
    env.pop("OMP_NUM_THREADS", None)  # the default thread count: usable CPUs / concurrency
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log_path = tmp_path / "maskd-worker.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*MASKD, "worker", "--concurrency", "2"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    stack.workers.append(Worker(process, log_path))
    url = f"http://127.0.0.1:{port}/metrics"
    wait_for(lambda: reachable(url), 60, "the worker's metrics endpoint")

    jobs = 3
    for _ in range(jobs):
        job_id = stack.client.submit_job(tiny_spec(stage2_iterations=10)).id
        finished = stack.wait_terminal(job_id, timeout=180)
        assert finished["state"] == "SUCCEEDED", finished["message"]

    # Counters of every child, summed by the parent (two children, each running jobs).
    succeeded = ("maskd_worker_jobs_finished_total", (("outcome", "succeeded"),))

    def all_counted() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        samples = scrape(url)
        return samples if samples.get(succeeded) == jobs else None

    samples = wait_for(all_counted, 30, "the last child's counts")
    assert samples[("maskd_worker_jobs_started_total", ())] == jobs
    # Stage 1 runs once: the later jobs reuse the first one's tokens (same teacher and data).
    assert samples[("maskd_worker_training_steps_total", (("stage", "stage1"),))] == 4
    assert samples[("maskd_worker_training_steps_total", (("stage", "stage2"),))] == 10 * jobs
    assert samples[("maskd_worker_step_seconds_count", (("stage", "stage2"),))] == 10 * jobs

    # Files are per pool slot, not per process: two per slot however many jobs ran.
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is a JSON object
    (announced,) = [r for r in records if "children write to" in r["message"]]
    metrics_dir = Path(METRICS_DIR.search(announced["message"]).group(1))  # type: ignore[union-attr]
    files = sorted(path.name for path in metrics_dir.iterdir())
    assert files and all(re.fullmatch(r"(counter|histogram)_slot[01]\.db", f) for f in files)
    assert len(files) <= 4, files

    parent = process.pid
    claims = [r for r in records if r["message"].startswith(f"job {job_id}: claimed by")]
    assert claims and claims[0]["job_id"] == job_id and claims[0]["attempt"] == 1
    expected_threads = max(1, len(os.sched_getaffinity(0)) // 2)
    threads = [r for r in records if r["message"].startswith("torch intra-op threads:")]
    assert len(threads) == jobs
    assert all(r["pid"] != parent and "job_id" in r for r in threads), threads
    assert all(
        r["message"].startswith(f"torch intra-op threads: {expected_threads} ") for r in threads
    )
    staged = [r for r in records if "stage" in r]
    # Stage 1 of the first job, the first step of the later ones (which reuse its tokens).
    assert {r["stage"] for r in staged} == {"stage1", "stage2", "registering"}, staged
    assert all("job_id" in r and "attempt" in r for r in staged)

    mlflow: list[dict[str, Any]] = [r for r in records if r["logger"].startswith("mlflow")]
    created = [r for r in mlflow if "Creating initial MLflow database tables" in r["message"]]
    assert created and all(r["level"] == "INFO" for r in created), created
    redirected = [r for r in records if r["logger"] == "celery.redirected"]
    assert not [r for r in redirected if "mlflow" in r["message"].lower()], redirected

    # A warm shutdown stops the endpoint and removes the folder it made.
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    assert not metrics_dir.exists()


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.slow
def test_a_live_worker_keeps_touching_its_heartbeat_file(stack: Stack, tmp_path: Path) -> None:
    """The file the worker image's healthcheck reads (``maskd-healthcheck heartbeat``)."""
    heartbeat = tmp_path / "worker.heartbeat"
    worker = stack.start_worker(MASKD_WORKER_HEARTBEAT_FILE=str(heartbeat))
    first = wait_for(
        lambda: heartbeat.exists() and heartbeat.stat().st_mtime_ns,
        60,
        f"the worker to touch its heartbeat file\n{worker.log()}",
    )
    wait_for(
        lambda: heartbeat.stat().st_mtime_ns > first,
        30,
        f"a second heartbeat\n{worker.log()}",
    )
    worker.kill()
