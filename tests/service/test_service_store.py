"""JobStore against real SQLite and PostgreSQL: leases, compare-and-set, reconciliation."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from service_testkit import FakeClock, make_spec
from sqlalchemy import text

from service.db import make_engine
from service.lifecycle import FailureKind, JobState
from service.store import (
    IdempotencyConflict,
    InvalidCursor,
    JobAlreadyFinished,
    JobNotFound,
    JobStore,
)

LEASE = 60


def running_job(store: JobStore, worker: str = "w1") -> str:
    """A job claimed by ``worker`` and moved to STAGE1."""
    project = store.create_project("acme")
    job, _ = store.create_job(project.id, make_spec())
    assert store.claim(job.id, worker, LEASE) is not None
    assert store.transition(job.id, JobState.STAGE1, worker_id=worker)
    return job.id


def test_create_job_is_queued_with_its_submission_recorded(job_store: JobStore) -> None:
    project = job_store.create_project("acme")
    job, created = job_store.create_job(project.id, make_spec("first"))
    assert created
    assert (job.state, job.name, job.attempt) == (JobState.QUEUED, "first", 0)
    assert [(t.from_state, t.to_state) for t in job.transitions] == [(None, JobState.QUEUED)]
    assert job_store.get_job(project.id, job.id) == job


def test_idempotency_key_replays_same_spec_and_refuses_another(job_store: JobStore) -> None:
    project = job_store.create_project("acme")
    job, _ = job_store.create_job(project.id, make_spec(), "key-1")
    replay, created = job_store.create_job(project.id, make_spec(), "key-1")
    assert (replay.id, created) == (job.id, False)
    with pytest.raises(IdempotencyConflict, match="key-1"):
        job_store.create_job(project.id, make_spec("changed"), "key-1")
    other = job_store.create_project("globex")
    _, created_elsewhere = job_store.create_job(other.id, make_spec(), "key-1")
    assert created_elsewhere, "keys are per project"


def test_concurrent_submissions_with_one_key_create_one_job(job_store: JobStore) -> None:
    project = job_store.create_project("acme")
    barrier = threading.Barrier(6)

    def submit(_: int) -> str:
        barrier.wait()
        return job_store.create_job(project.id, make_spec(), "same")[0].id

    with ThreadPoolExecutor(6) as pool:
        ids = set(pool.map(submit, range(6)))
    assert len(ids) == 1
    assert len(job_store.list_jobs(project.id)[0]) == 1


def test_only_one_of_many_concurrent_claims_wins(job_store: JobStore) -> None:
    project = job_store.create_project("acme")
    job, _ = job_store.create_job(project.id, make_spec())
    barrier = threading.Barrier(8)

    def claim(index: int) -> bool:
        barrier.wait()
        return job_store.claim(job.id, f"worker-{index}", LEASE) is not None

    with ThreadPoolExecutor(8) as pool:
        wins = list(pool.map(claim, range(8)))
    assert wins.count(True) == 1
    claimed = job_store.get_job_unscoped(job.id)
    assert claimed is not None and claimed.attempt == 1
    assert claimed.lease_owner == f"worker-{wins.index(True)}"


def test_claim_records_an_event_and_refuses_a_duplicate_delivery(job_store: JobStore) -> None:
    project = job_store.create_project("acme")
    job, _ = job_store.create_job(project.id, make_spec())
    claimed = job_store.claim(job.id, "w1", LEASE)
    assert claimed is not None and claimed.lease_owner == "w1"
    assert job_store.claim(job.id, "w2", LEASE) is None
    events = job_store.list_events(project.id, job.id)
    assert events[-1].kind == "info"
    assert events[-1].message == "claimed by worker w1, attempt 1"


def test_expired_lease_can_be_reclaimed_and_the_old_worker_is_fenced_off(
    clocked_store: JobStore, clock: FakeClock
) -> None:
    job_id = running_job(clocked_store, "w1")
    clock.advance(LEASE - 1)
    assert clocked_store.claim(job_id, "w2", LEASE) is None, "lease still live"
    clock.advance(2)
    reclaimed = clocked_store.claim(job_id, "w2", LEASE)
    assert reclaimed is not None
    assert (reclaimed.state, reclaimed.attempt, reclaimed.lease_owner) == (
        JobState.STAGE1,
        2,
        "w2",
    )
    assert clocked_store.heartbeat(job_id, "w1", LEASE).lease_held is False
    assert not clocked_store.transition(job_id, JobState.STAGE2, worker_id="w1")
    clocked_store.record_progress(job_id, "w1", "stage1", 99, 100, {"loss": 9.0})
    assert clocked_store.transition(job_id, JobState.STAGE2, worker_id="w2")
    job = clocked_store.get_job_unscoped(job_id)
    assert job is not None and job.progress == {} and job.state == JobState.STAGE2


def test_heartbeat_extends_the_lease_and_reports_a_cancel(
    clocked_store: JobStore, clock: FakeClock
) -> None:
    job_id = running_job(clocked_store, "w1")
    clock.advance(LEASE - 5)
    assert clocked_store.heartbeat(job_id, "w1", LEASE).lease_held
    clock.advance(LEASE - 5)
    assert clocked_store.claim(job_id, "w2", LEASE) is None, "heartbeat renewed the lease"
    job = clocked_store.get_job_unscoped(job_id)
    assert job is not None
    cancelling = clocked_store.request_cancel(job.project_id, job_id)
    assert cancelling.state == JobState.CANCELLING
    beat = clocked_store.heartbeat(job_id, "w1", LEASE)
    assert (beat.lease_held, beat.cancel_requested) == (True, True)
    assert clocked_store.transition(job_id, JobState.CANCELLED, worker_id="w1")
    done = clocked_store.get_job_unscoped(job_id)
    assert done is not None
    assert done.finished_at == clock.now and done.lease_owner is None


def test_transitions_follow_the_lifecycle_and_are_recorded(job_store: JobStore) -> None:
    job_id = running_job(job_store, "w1")
    assert not job_store.transition(job_id, JobState.SUCCEEDED, worker_id="w1"), "skips STAGE2"
    assert not job_store.transition(job_id, JobState.STAGE2, worker_id="intruder")
    assert job_store.transition(job_id, JobState.STAGE2, worker_id="w1", message="tokens ready")
    assert job_store.transition(job_id, JobState.FAILED, worker_id="w1", message="bad data")
    assert not job_store.transition(job_id, JobState.QUEUED, worker_id=None), "terminal"
    job = job_store.get_job_unscoped(job_id)
    assert job is not None
    assert job.failure_kind == FailureKind.INFRASTRUCTURE, "FAILED without a kind"
    assert (job.message, job.stage, job.lease_owner) == ("bad data", "stage2", None)
    assert job.started_at is not None and job.finished_at is not None
    assert [(t.from_state, t.to_state, t.message) for t in job.transitions][1:] == [
        (JobState.QUEUED, JobState.STAGE1, None),
        (JobState.STAGE1, JobState.STAGE2, "tokens ready"),
        (JobState.STAGE2, JobState.FAILED, "bad data"),
    ]


def test_failure_kind_is_kept(job_store: JobStore) -> None:
    job_id = running_job(job_store, "w1")
    assert job_store.transition(
        job_id,
        JobState.FAILED,
        worker_id="w1",
        message="ran too long",
        failure_kind=FailureKind.TIMEOUT,
    )
    job = job_store.get_job_unscoped(job_id)
    assert job is not None and job.failure_kind == FailureKind.TIMEOUT


def test_progress_metrics_outputs_and_notes(job_store: JobStore) -> None:
    job_id = running_job(job_store, "w1")
    job_store.add_event(job_id, "stage1 started at step 0 of 4")
    job_store.record_progress(job_id, "w1", "stage1", 4, 4, {"dice": 0.5, "loss": 2.0})
    job_store.record_progress(job_id, "w1", "stage2", 3, 6, {"loss": 1.0})
    job_store.record_outputs(job_id, {"student": "runs/x/student.pt"})
    job_store.record_outputs(job_id, {"mlflow_run": "abc"})
    job = job_store.get_job_unscoped(job_id)
    assert job is not None
    assert job.progress == {"stage1": {"step": 4, "total": 4}, "stage2": {"step": 3, "total": 6}}
    assert job.metrics == {"dice": 0.5, "loss": 1.0}
    assert job.outputs == {"student": "runs/x/student.pt", "mlflow_run": "abc"}
    assert job.stage == "stage2"
    notes = [e.message for e in job_store.list_events(job.project_id, job_id) if e.kind == "info"]
    assert "stage1 started at step 0 of 4" in notes


def test_cancel_queued_running_and_finished(job_store: JobStore) -> None:
    project = job_store.create_project("acme")
    queued, _ = job_store.create_job(project.id, make_spec())
    cancelled = job_store.request_cancel(project.id, queued.id)
    assert cancelled.state == JobState.CANCELLED and cancelled.finished_at is not None
    assert job_store.claim(queued.id, "w1", LEASE) is None, "a cancelled job never starts"
    with pytest.raises(JobAlreadyFinished, match="already finished"):
        job_store.request_cancel(project.id, queued.id)
    with pytest.raises(JobNotFound):
        job_store.request_cancel(job_store.create_project("globex").id, queued.id)


def test_cancel_of_a_claimed_but_unstarted_job_fences_the_worker(job_store: JobStore) -> None:
    project = job_store.create_project("acme")
    job, _ = job_store.create_job(project.id, make_spec())
    assert job_store.claim(job.id, "w1", LEASE) is not None
    assert job_store.request_cancel(project.id, job.id).state == JobState.CANCELLED
    assert not job_store.transition(job.id, JobState.STAGE1, worker_id="w1")
    beat = job_store.heartbeat(job.id, "w1", LEASE)
    assert (beat.lease_held, beat.cancel_requested) == (False, True)


def test_find_orphans_and_requeue_expired(clocked_store: JobStore, clock: FakeClock) -> None:
    project = clocked_store.create_project("acme")
    never_sent, _ = clocked_store.create_job(project.id, make_spec("never-sent"))
    sent, _ = clocked_store.create_job(project.id, make_spec("sent"))
    running = running_job(clocked_store, "w1")
    cancelling = running_job(clocked_store, "w2")
    clocked_store.request_cancel(project.id, cancelling)
    clock.advance(30)
    clocked_store.mark_dispatched([sent.id])
    assert clocked_store.find_orphans(clock.now, redispatch_after_seconds=20) == [never_sent.id]

    clock.advance(LEASE)
    orphans = clocked_store.find_orphans(clock.now, redispatch_after_seconds=20)
    assert set(orphans) == {never_sent.id, sent.id, running, cancelling}
    assert not clocked_store.requeue_expired(never_sent.id), "queued jobs are only re-sent"
    assert clocked_store.requeue_expired(running)
    assert not clocked_store.requeue_expired(cancelling), "nobody left to stop it"

    requeued = clocked_store.get_job_unscoped(running)
    assert requeued is not None
    assert (requeued.state, requeued.lease_owner) == (JobState.QUEUED, None)
    assert requeued.transitions[-1].message == "worker lost (lease expired); re-queued"
    finished = clocked_store.get_job_unscoped(cancelling)
    assert finished is not None and finished.state == JobState.CANCELLED
    reclaimed = clocked_store.claim(running, "w3", LEASE)
    assert reclaimed is not None and reclaimed.attempt == 2


def test_requeue_leaves_a_live_lease_alone(clocked_store: JobStore, clock: FakeClock) -> None:
    job_id = running_job(clocked_store, "w1")
    clock.advance(LEASE / 2)
    assert not clocked_store.requeue_expired(job_id)
    assert clocked_store.find_orphans(clock.now, redispatch_after_seconds=1) == []


def test_list_filters_apply_before_the_limit(clocked_store: JobStore, clock: FakeClock) -> None:
    project = clocked_store.create_project("acme")
    wanted = []
    for index in range(9):
        clock.advance(1)
        job, _ = clocked_store.create_job(project.id, make_spec("a" if index % 3 == 0 else "b"))
        if index % 3 == 0:
            wanted.append(job.id)
    seen: list[str] = []
    cursor = None
    while True:
        page, cursor = clocked_store.list_jobs(project.id, name="a", cursor=cursor, limit=2)
        seen += [job.id for job in page]
        if cursor is None:
            break
    assert seen == wanted[::-1], "newest first, every match exactly once"


def test_list_by_state_and_creation_time(clocked_store: JobStore, clock: FakeClock) -> None:
    project = clocked_store.create_project("acme")
    base = clock.now
    ids = []
    for _ in range(4):
        clock.advance(10)
        ids.append(clocked_store.create_job(project.id, make_spec())[0].id)
    clocked_store.request_cancel(project.id, ids[1])
    page, _ = clocked_store.list_jobs(project.id, states=[JobState.CANCELLED])
    assert [job.id for job in page] == [ids[1]]
    page, _ = clocked_store.list_jobs(
        project.id,
        created_after=base + timedelta(seconds=5),
        created_before=base + timedelta(seconds=35),
    )
    assert [job.id for job in page] == [ids[2], ids[1], ids[0]]
    with pytest.raises(InvalidCursor):
        clocked_store.list_jobs(project.id, cursor="not-a-cursor")


def test_api_keys_are_hashed_and_checked(job_store: JobStore, database_url: str) -> None:
    key = job_store.create_api_key("acme")
    project = job_store.authenticate(key)
    assert project is not None and project.name == "acme"
    prefix = key.split("_")[1]
    assert job_store.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert job_store.authenticate(f"mk_{'0' * len(prefix)}_whatever") is None
    assert job_store.authenticate("not a key") is None
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            stored = connection.execute(text("SELECT prefix, key_hash FROM api_keys")).one()
    finally:
        engine.dispose()
    assert stored.prefix == prefix and key not in stored.key_hash
    assert job_store.create_project("acme").id == project.id, "projects are unique by name"
