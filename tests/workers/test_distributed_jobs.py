"""Jobs on two CPU processes (``resources: {processes: 2}``) through the worker.

Rank 0 runs in the worker's own process with the job's lease, reports and MLflow run; rank 1
is spawned beside it. A job must succeed and register one student, and a rank killed mid-job
must send the job down the lease/resume path (not hang, not fail it) to finish on attempt 2.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from worker_testkit import Stack, child_pids, tiny_spec, wait_for

from maskd_core.spec import JobSpec
from service.config import Settings
from service.store import JobStore
from workers.reconciler import reconcile_once
from workers.tasks import execute_job

pytestmark = pytest.mark.slow

RANK_LOST_EVENT = re.compile(r"^training process rank 1 exited during the job \(signal 9\)")
RESUME_EVENT = re.compile(r"^stage2 resumed from checkpoint at step (\d+) of (\d+)$")


def two_process_spec(stage2_iterations: int, checkpoint_every: int = 50) -> dict[str, object]:
    """``tiny_spec`` on two processes, with tokens of its own: the tests share one MLflow, and
    other tests' jobs must not find (and reuse) these jobs' registered tokens."""
    body = tiny_spec(stage2_iterations=stage2_iterations, checkpoint_every=checkpoint_every)
    return {**body, "stage1": {**body["stage1"], "tokens": 3}, "resources": {"processes": 2}}


def test_a_two_process_job_runs_both_stages_and_registers_one_student(
    job_store: JobStore, database_url: str, tmp_path: Path
) -> None:
    project = job_store.create_project("p")
    spec = JobSpec.model_validate(two_process_spec(stage2_iterations=4))
    job, _ = job_store.create_job(project.id, spec)
    settings = Settings(
        database_url=database_url,
        data_dir=tmp_path,
        mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )

    outcome = execute_job(job_store, settings, job.id, delivery="first")

    record = job_store.get_job_unscoped(job.id)
    assert record is not None
    assert outcome == "SUCCEEDED", record.message
    assert record.outputs["model"]["name"] == "p.tiny-worker-job-student"
    assert record.outputs["model"]["version"] == "1"
    summary = json.loads((tmp_path / "jobs" / job.id / "summary.json").read_text())
    assert summary["processes"] == 2
    assert record.progress["stage2"] == {"step": 4, "total": 4}


def _helper_ranks(stack: Stack) -> list[int]:
    """The spawned training processes under the worker's pool processes."""
    found = []
    for pool_pid in stack.workers[0].pool_pids():
        for child in child_pids(pool_pid):
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"helper_main" in cmdline:
                found.append(child)
    return found


def test_a_killed_rank_sends_the_job_back_to_the_queue_and_it_resumes(stack: Stack) -> None:
    stack.start_worker()
    job_id = stack.client.submit_job(two_process_spec(400, checkpoint_every=20)).id
    checkpoint = stack.workdir(job_id) / "stage2" / "checkpoint.pt"
    wait_for(checkpoint.exists, 180, "the first stage-2 checkpoint", poll=0.05)
    helper = wait_for(lambda: _helper_ranks(stack), 30, "the spawned rank 1")[0]

    os.kill(helper, signal.SIGKILL)
    wait_for(
        lambda: any(RANK_LOST_EVENT.match(m) for m in stack.event_messages(job_id)),
        60,
        "the worker to report the lost rank",
    )
    wait_for(
        lambda: job_id in reconcile_once(stack.store, stack.dispatcher, stack.settings).requeued,
        60,
        "the reconciler to re-queue the job whose lease was released",
        poll=0.5,
    )
    job = stack.wait_terminal(job_id, timeout=300)

    assert job["state"] == "SUCCEEDED", job["message"]
    assert job["attempt"] == 2
    resumed = [m for m in map(RESUME_EVENT.match, stack.event_messages(job_id)) if m]
    assert len(resumed) == 1 and 0 < int(resumed[0][1]) < 400
    assert job["outputs"]["model"]["version"] == "1"
    time.sleep(0.5)
    assert _helper_ranks(stack) == []  # the job's processes are gone with it
