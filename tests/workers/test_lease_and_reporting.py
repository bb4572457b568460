"""The lease keeper and the store reporter against the real store (SQLite and PostgreSQL).

These are the pieces the job task leans on for "at most one run at a time" and for what users
read while a job trains, checked directly and fast, without a Celery worker.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from worker_testkit import an_hour_ago, store_on_clock, tiny_spec, wait_for

from maskd_core.callbacks import TEACHER, Stage
from maskd_core.spec import JobSpec
from service.db import make_engine, make_sessionmaker
from service.lifecycle import JobState
from service.store import JobRecord, JobStore
from workers.lease import LeaseKeeper, StopReason
from workers.reporting import StoreReporter

SPEC = JobSpec.model_validate(tiny_spec())
"""What the reporter is told a stage runs; it reads nothing from it."""

UNREACHABLE_DATABASE = "postgresql+psycopg://postgres@127.0.0.1:9/nothing?connect_timeout=1"


def running_job(store: JobStore, worker_id: str = "w1", lease_seconds: float = 30) -> JobRecord:
    """A job in STAGE1 whose lease ``worker_id`` holds, as the task leaves it after claiming."""
    project = store.create_project("p")
    job, _ = store.create_job(project.id, JobSpec.model_validate(tiny_spec()))
    assert store.claim(job.id, worker_id, lease_seconds) is not None
    assert store.transition(job.id, JobState.STAGE1, worker_id=worker_id)
    return job


def keeper(store: JobStore, job_id: str, worker_id: str = "w1", **limits: float) -> LeaseKeeper:
    return LeaseKeeper(
        store,
        job_id,
        worker_id,
        lease_seconds=limits.pop("lease_seconds", 30),
        interval_seconds=0.05,
        **limits,
    )


def current(store: JobStore, job_id: str) -> JobRecord:
    record = store.get_job_unscoped(job_id)
    assert record is not None
    return record


def test_keeper_renews_the_lease_and_reports_a_cancel(job_store: JobStore) -> None:
    job = running_job(job_store, lease_seconds=1)
    claimed_until = current(job_store, job.id).lease_expires_at
    assert claimed_until is not None

    with keeper(job_store, job.id, lease_seconds=30) as lease:
        wait_for(
            lambda: (current(job_store, job.id).lease_expires_at or claimed_until) > claimed_until,
            10,
            "a heartbeat",
        )
        assert not lease.should_stop()
        job_store.request_cancel(job.project_id, job.id)
        wait_for(lease.should_stop, 10, "the cancel to reach the keeper")

    assert lease.stop_reason is StopReason.CANCEL_REQUESTED
    assert current(job_store, job.id).lease_owner == "w1"


def test_keeper_sees_a_cancel_between_heartbeats_without_renewing(job_store: JobStore) -> None:
    job = running_job(job_store)
    claimed_until = current(job_store, job.id).lease_expires_at
    lease = LeaseKeeper(
        job_store, job.id, "w1", lease_seconds=30, interval_seconds=3600, poll_seconds=0.05
    )
    with lease:
        job_store.request_cancel(job.project_id, job.id)
        wait_for(lease.should_stop, 2, "the cancel to reach the keeper before any heartbeat")

    assert lease.stop_reason is StopReason.CANCEL_REQUESTED
    assert current(job_store, job.id).lease_expires_at == claimed_until, "it renewed the lease"


def test_lease_status_reads_what_a_heartbeat_would_answer(job_store: JobStore) -> None:
    job = running_job(job_store)
    assert job_store.lease_status(job.id, "w1") == job_store.heartbeat(job.id, "w1", 30)
    assert not job_store.lease_status(job.id, "w2").lease_held
    job_store.request_cancel(job.project_id, job.id)
    status = job_store.lease_status(job.id, "w1")
    assert status.lease_held and status.cancel_requested
    assert not job_store.lease_status("no-such-job", "w1").lease_held


def test_a_job_is_claimable_only_when_a_claim_could_win(
    job_store: JobStore, database_url: str
) -> None:
    project = job_store.create_project("p")
    queued, _ = job_store.create_job(project.id, JobSpec.model_validate(tiny_spec()))
    assert job_store.claimable(queued.id)
    running = running_job(job_store)
    assert not job_store.claimable(running.id), "a live worker holds it"
    with store_on_clock(database_url, an_hour_ago()) as past:
        orphan = running_job(past, worker_id="gone")
    assert job_store.claimable(orphan.id), "its worker's lease ran out: resumable"
    job_store.request_cancel(project.id, queued.id)
    assert not job_store.claimable(queued.id), "cancelled"
    assert not job_store.claimable("no-such-job")


def test_keeper_stops_the_run_when_another_worker_took_the_job(
    job_store: JobStore, database_url: str
) -> None:
    with store_on_clock(database_url, an_hour_ago()) as past:
        job = running_job(past, lease_seconds=30)  # w1's lease ran out long ago
    assert job_store.claim(job.id, "w2", 30) is not None  # w1 looked dead

    with keeper(job_store, job.id) as lease:
        wait_for(lease.should_stop, 10, "the keeper to notice")

    assert lease.stop_reason is StopReason.LEASE_LOST


def test_keeper_presumes_the_lease_lost_when_the_database_stays_unreachable() -> None:
    engine = make_engine(UNREACHABLE_DATABASE)
    try:
        with keeper(JobStore(make_sessionmaker(engine)), "job", lease_seconds=0.5) as lease:
            wait_for(lease.should_stop, 20, "the keeper to give up")
    finally:
        engine.dispose()
    assert lease.stop_reason is StopReason.LEASE_LOST


def test_keeper_asks_to_stop_at_the_time_limit_and_a_cancel_outranks_it(
    job_store: JobStore,
) -> None:
    job = running_job(job_store)
    with keeper(job_store, job.id, time_limit_seconds=0.2) as lease:
        wait_for(lease.should_stop, 10, "the time limit")
        assert lease.stop_reason is StopReason.TIME_LIMIT
        job_store.request_cancel(job.project_id, job.id)
        wait_for(lambda: lease.stop_reason is StopReason.CANCEL_REQUESTED, 10, "the cancel")


class ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def reporter_parts(job_store: JobStore) -> tuple[JobRecord, StoreReporter, ManualClock]:
    job = running_job(job_store)
    clock = ManualClock()
    lease = keeper(job_store, job.id)  # never started: only its stop flag is read
    reporter = StoreReporter(job_store, job.id, "w1", lease, state=JobState.STAGE1, clock=clock)
    return job, reporter, clock


def test_an_evaluation_after_a_teacher_job_s_training_belongs_to_its_teacher_stage(
    job_store: JobStore, reporter_parts: tuple[JobRecord, StoreReporter, ManualClock]
) -> None:
    job, reporter, _ = reporter_parts

    reporter.on_stage_start(TEACHER, 0, 20, SPEC)
    reporter.on_stage_end(TEACHER, 20, {"loss": 0.5})
    reporter.on_eval(Stage("eval"), 20, {"teacher_miou": 0.5})

    record = current(job_store, job.id)
    assert record.progress == {"teacher": {"step": 20, "total": 20}}
    assert record.metrics["teacher_miou"] == 0.5


def test_reporter_turns_stages_into_transitions_and_events(
    job_store: JobStore, reporter_parts: tuple[JobRecord, StoreReporter, ManualClock]
) -> None:
    job, reporter, _ = reporter_parts

    reporter.on_stage_start(Stage("stage1"), 0, 10, SPEC)
    reporter.on_stage_end(Stage("stage1"), 10, {"loss": 0.5})
    reporter.on_stage_start(Stage("stage2"), 120, 200, SPEC)
    reporter.on_eval(Stage("eval"), 200, {"student_miou": 0.75})

    record = current(job_store, job.id)
    assert [t.to_state for t in record.transitions][-2:] == [JobState.STAGE1, JobState.STAGE2]
    assert reporter.state is JobState.STAGE2
    messages = [e.message for e in job_store.list_events(job.project_id, job.id)]
    assert "stage1 started at step 0 of 10" in messages
    assert "stage2 resumed from checkpoint at step 120 of 200" in messages
    assert "eval evaluation at step 200: student_miou=0.75" in messages
    assert record.progress == {
        "stage1": {"step": 10, "total": 10},
        "stage2": {"step": 120, "total": 200},
    }
    assert record.metrics["student_miou"] == 0.75
    assert record.stage == "stage2"


def test_reporter_moves_a_comparison_to_stage2_with_progress_per_run(
    job_store: JobStore, reporter_parts: tuple[JobRecord, StoreReporter, ManualClock]
) -> None:
    job, reporter, _ = reporter_parts

    reporter.on_stage_start(Stage.comparison_run("mgd", 0), 0, 20, SPEC)
    reporter.on_stage_end(Stage.comparison_run("mgd", 0), 20, {"loss": 0.5})
    reporter.on_stage_start(Stage.comparison_run("mgd", 1), 0, 20, SPEC)

    record = current(job_store, job.id)
    assert [t.to_state for t in record.transitions][-1] is JobState.STAGE2
    assert reporter.state is JobState.STAGE2
    assert record.progress == {
        "stage2/mgd/seed0": {"step": 20, "total": 20},
        "stage2/mgd/seed1": {"step": 0, "total": 20},
    }


def test_progress_keeps_the_last_finite_metrics(job_store: JobStore) -> None:
    job = running_job(job_store)
    job_store.record_progress(job.id, "w1", "stage1", 1, 10, {"loss": 0.5, "kd_loss": 0.2})
    nan, inf = float("nan"), float("inf")
    job_store.record_progress(job.id, "w1", "stage1", 2, 10, {"loss": nan, "kd_loss": inf})

    record = current(job_store, job.id)
    assert record.metrics == {"loss": 0.5, "kd_loss": 0.2}
    assert record.progress["stage1"] == {"step": 2, "total": 10}


def test_reporter_moves_the_progress_to_every_checkpoint(
    job_store: JobStore, reporter_parts: tuple[JobRecord, StoreReporter, ManualClock]
) -> None:
    job, reporter, _ = reporter_parts
    reporter.on_stage_start(Stage("stage1"), 0, 100, SPEC)
    reporter.on_step(Stage("stage1"), 7, {"loss": 1.0})  # throttled: not written
    reporter.on_checkpoint(Stage("stage1"), 7, Path("checkpoint.pt"))

    assert current(job_store, job.id).progress["stage1"] == {"step": 7, "total": 100}


def test_reporter_writes_progress_about_once_a_second(
    job_store: JobStore, reporter_parts: tuple[JobRecord, StoreReporter, ManualClock]
) -> None:
    job, reporter, clock = reporter_parts
    reporter.on_stage_start(Stage("stage1"), 0, 100, SPEC)

    def step_written() -> int:
        return current(job_store, job.id).progress["stage1"]["step"]

    for step in range(1, 6):
        reporter.on_step(Stage("stage1"), step, {"loss": 1.0 / step})
    assert step_written() == 0
    clock.now = 1.0
    reporter.on_step(Stage("stage1"), 6, {"loss": 0.1})
    assert step_written() == 6


def test_reporter_stops_the_run_when_its_transition_is_refused(
    job_store: JobStore, reporter_parts: tuple[JobRecord, StoreReporter, ManualClock]
) -> None:
    job, reporter, _ = reporter_parts
    job_store.request_cancel(job.project_id, job.id)  # STAGE1 -> CANCELLING meanwhile

    reporter.on_stage_start(Stage("stage2"), 0, 10, SPEC)

    assert reporter.should_stop()
    assert reporter.state is JobState.STAGE1


def test_reporter_keeps_the_run_going_through_a_database_outage() -> None:
    engine = make_engine(UNREACHABLE_DATABASE)
    try:
        store = JobStore(make_sessionmaker(engine))
        lease = keeper(store, "job")  # never started: only its stop flag is read
        reporter = StoreReporter(store, "job", "w1", lease, state=JobState.STAGE2)
        reporter.on_step(Stage("stage2"), 7, {"loss": 0.5})
        reporter.on_eval(Stage("eval"), 7, {"student_miou": 0.5})
        reporter.on_stage_end(Stage("stage2"), 7, {"loss": 0.5})
    finally:
        engine.dispose()
    assert not reporter.should_stop()
