"""The job task under the failures Celery and Redis really have, with real workers.

Every test goes through the API and a ``celery worker`` subprocess on PostgreSQL and Redis; what
they check is the contract of ``docs/architecture.md``: a job runs once at a time whatever the
broker delivers, a dead worker's job resumes from its checkpoint elsewhere, a lost message is
re-sent, and a cancel stops a run at its next step with a checkpoint.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from worker_testkit import Stack, tiny_spec, wait_for

from service.dispatch import GPU_QUEUE
from workers.reconciler import reconcile_once

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

CLAIM_EVENT = re.compile(r"^claimed by worker ")
RESUME_EVENT = re.compile(r"^stage2 resumed from checkpoint at step (\d+) of (\d+)$")
DROPPED = re.compile(r"delivery \S+ dropped before the pool .*? in ([\d.]+) ms")
STALE_DELIVERIES = 40


def transitions(job: dict[str, Any]) -> list[str]:
    return [t["to_state"] for t in job["transitions"]]


def test_job_runs_end_to_end_through_api_and_worker(stack: Stack) -> None:
    stack.start_worker()
    job_id = stack.client.submit_job(tiny_spec(stage2_iterations=20)).id

    job = stack.wait_terminal(job_id)

    assert job["state"] == "SUCCEEDED", job["message"]
    assert transitions(job) == ["QUEUED", "STAGE1", "STAGE2", "REGISTERING", "SUCCEEDED"]
    assert job["attempt"] == 1
    assert job["progress"]["stage2"] == {"step": 20, "total": 20}
    workdir = stack.workdir(job_id)
    assert job["outputs"]["files"] == {
        "student": str(workdir / "student.pt"),
        "tokens": str(workdir / "tokens.pt"),
        "summary": str(workdir / "summary.json"),
    }
    assert all(Path(path).is_file() for path in job["outputs"]["files"].values())
    assert 0.0 <= job["outputs"]["metrics"]["student_miou"] <= 1.0
    messages = stack.event_messages(job_id)
    assert "stage1 started at step 0 of 4" in messages
    assert "stage2 started at step 0 of 20" in messages


def test_killed_worker_job_resumes_from_checkpoint_on_another_worker(stack: Stack) -> None:
    first = stack.start_worker()
    job_id = stack.client.submit_job(tiny_spec(stage2_iterations=400, checkpoint_every=25)).id
    checkpoint = stack.workdir(job_id) / "stage2" / "checkpoint.pt"
    wait_for(checkpoint.exists, 120, "the first stage-2 checkpoint", poll=0.02)

    first.kill()  # mid-stage-2, leaving the lease to expire and the message unacknowledged
    assert stack.job(job_id)["state"] == "STAGE2"
    stack.start_worker()
    wait_for(
        lambda: job_id in reconcile_once(stack.store, stack.dispatcher, stack.settings).requeued,
        30,
        "the reconciler to re-queue the job once its lease expired",
        poll=0.5,
    )
    job = stack.wait_terminal(job_id)

    assert job["state"] == "SUCCEEDED", job["message"]
    assert job["attempt"] == 2
    assert transitions(job)[:4] == ["QUEUED", "STAGE1", "STAGE2", "QUEUED"]
    resumed = [m for m in map(RESUME_EVENT.match, stack.event_messages(job_id)) if m]
    assert len(resumed) == 1
    assert 0 < int(resumed[0][1]) < 400
    assert "stage2 started at step 0 of 400" in stack.event_messages(job_id)


def test_duplicate_delivery_during_a_run_does_not_start_a_second_run(stack: Stack) -> None:
    worker = stack.start_worker(concurrency=2)
    job_id = stack.client.submit_job(tiny_spec(stage2_iterations=600)).id
    wait_for(lambda: stack.job(job_id)["state"] in {"STAGE1", "STAGE2"}, 120, "the job to run")

    running = stack.store.get_job_unscoped(job_id)
    assert running is not None
    stack.dispatcher.send_job(running)  # the same message again, e.g. a redelivery
    wait_for(
        lambda: DROPPED.search(worker.log()),
        60,
        "the second delivery to be turned away",
    )
    assert stack.job(job_id)["state"] in {"STAGE1", "STAGE2"}, "turned away while running"
    job = stack.wait_terminal(job_id)

    assert job["state"] == "SUCCEEDED", job["message"]
    assert job["attempt"] == 1
    assert sum(bool(CLAIM_EVENT.match(m)) for m in stack.event_messages(job_id)) == 1


def test_reconciler_resends_a_message_lost_with_a_flushed_redis(stack: Stack) -> None:
    broker = redis.Redis.from_url(stack.settings.broker_url)
    job_id = stack.client.submit_job(tiny_spec()).id
    assert broker.llen(GPU_QUEUE) == 1

    # Waiting long behind other jobs is not lost: the broker still holds its message.
    later = datetime.now(UTC) + timedelta(seconds=stack.settings.redispatch_after_seconds + 1)
    report = reconcile_once(stack.store, stack.dispatcher, stack.settings, now=later)
    assert (report.still_waiting, report.redispatched) == ([job_id], [])
    assert broker.llen(GPU_QUEUE) == 1

    broker.flushdb()  # Redis restarted without persistence, before any worker took the job
    assert reconcile_once(stack.store, stack.dispatcher, stack.settings).redispatched == []
    # The reconciler's next pass, once the message has been missing for long enough.
    report = reconcile_once(stack.store, stack.dispatcher, stack.settings, now=later)
    assert report.redispatched == [job_id]
    assert report.requeued == []
    assert broker.llen(GPU_QUEUE) == 1
    broker.close()

    stack.start_worker()
    job = stack.wait_terminal(job_id)
    assert job["state"] == "SUCCEEDED", job["message"]
    assert job["attempt"] == 1


def test_stale_deliveries_are_dropped_in_the_parent_without_using_a_pool_process(
    stack: Stack,
) -> None:
    """A cancelled job's message and many re-sends of it wait in the queue: a worker drops
    each in milliseconds, keeps its pool process, and then runs a real job as usual."""
    cancelled = stack.client.submit_job(tiny_spec()).id
    assert stack.client.cancel_job(cancelled).state == "CANCELLED"
    record = stack.store.get_job_unscoped(cancelled)
    assert record is not None
    for _ in range(STALE_DELIVERIES - 1):
        stack.dispatcher.send_job(record)
    broker = redis.Redis.from_url(stack.settings.broker_url)
    assert broker.llen(GPU_QUEUE) == STALE_DELIVERIES

    worker = stack.start_worker()
    pool = wait_for(lambda: worker.pool_pids() or None, 60, "the worker's pool process")
    drops = wait_for(
        lambda: len(found := DROPPED.findall(worker.log())) == STALE_DELIVERIES and found,
        60,
        f"{STALE_DELIVERIES} deliveries to be dropped",
    )
    assert broker.llen(GPU_QUEUE) == 0
    broker.close()
    assert worker.pool_pids() == pool, "a pool process was used (and replaced) for a drop"
    assert "not claimed by delivery" not in worker.log()
    milliseconds = sorted(float(ms) for ms in drops)
    print(f"drop: median {milliseconds[len(drops) // 2]:.1f} ms, max {milliseconds[-1]:.1f} ms")
    assert milliseconds[len(drops) // 2] < 100

    job_id = stack.client.submit_job(tiny_spec(stage2_iterations=10)).id
    job = stack.wait_terminal(job_id)
    assert job["state"] == "SUCCEEDED", job["message"]
    assert job["attempt"] == 1


def test_cancel_stops_a_running_job_within_a_second_with_its_checkpoint(stack: Stack) -> None:
    # Heartbeats far apart: the cancel must not wait for one.
    stack.start_worker(MASKD_HEARTBEAT_SECONDS="20", MASKD_LEASE_SECONDS="60")
    job_id = stack.client.submit_job(tiny_spec(stage2_iterations=100_000)).id
    wait_for(
        lambda: stack.job(job_id)["progress"].get("stage2", {}).get("step", 0) > 0,
        120,
        "stage 2 to make progress",
    )

    assert stack.client.cancel_job(job_id).state == "CANCELLING"
    asked = time.monotonic()
    job = stack.wait_terminal(job_id, timeout=30)
    took = time.monotonic() - asked

    assert job["state"] == "CANCELLED", job["message"]
    # A read every 0.5 s sees the request, one step stops, one checkpoint is written; the
    # rest is this test polling the API and a busy machine.
    print(f"cancel took {took:.2f} s")
    assert took < 3.0
    stopped = re.match(r"cancelled during stage2 at step (\d+)", job["message"])
    assert stopped, job["message"]
    assert job["progress"]["stage2"]["step"] == int(stopped[1]), "progress is not the checkpoint"
    assert (stack.workdir(job_id) / "stage2" / "checkpoint.pt").is_file()
    assert transitions(job)[-2:] == ["CANCELLING", "CANCELLED"]


def test_time_limit_stops_the_run_with_a_checkpoint_and_fails_it_as_timeout(stack: Stack) -> None:
    stack.start_worker(MASKD_JOB_SOFT_TIME_LIMIT_SECONDS="8", MASKD_JOB_TIME_LIMIT_SECONDS="60")
    job_id = stack.client.submit_job(tiny_spec(stage2_iterations=100_000)).id

    job = stack.wait_terminal(job_id, timeout=60)

    assert job["state"] == "FAILED", job["message"]
    assert job["failure_kind"] == "timeout"
    assert "time limit of 8 s" in job["message"]
    stage = job["stage"]
    assert (stack.workdir(job_id) / stage / "checkpoint.pt").is_file()
