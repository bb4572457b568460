"""A job's MLflow runs end as the job ended, whoever ends it: its attempt, or the run closer.

Runs are left RUNNING the way a worker killed with -9 leaves them (opened by the tracker and
never ended), the job is ended in the store the way the API, the reconciler or a later attempt
ends it, and ``workers.run_closer`` is asked to end them. Attempts that end in the worker go
through ``workers.tracking.tracked_attempt``. Real SQLite job store and MLflow store, no mocks.
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient
from worker_testkit import an_hour_ago, store_on_clock, tiny_spec

from maskd_core.callbacks import STAGE1, STAGE2
from maskd_core.errors import JobCancelled
from maskd_core.spec import JobSpec
from service.config import Settings
from service.db import make_engine, make_sessionmaker
from service.lifecycle import FailureKind, JobState
from service.store import JobStore, ProjectRecord
from workers.mlflow_tracker import MlflowTracker
from workers.run_closer import close_runs_of_ended_jobs, close_runs_of_job
from workers.tracking import job_tracker, tracked_attempt

# A real MLflow store (its schema takes seconds to create) behind every test.
pytestmark = pytest.mark.slow

SPEC = JobSpec.model_validate(tiny_spec())


@dataclass
class Jobs:
    """A job store, the settings a worker would have, and a project of the test's own (the
    MLflow store is the session's: the project keeps its experiment apart)."""

    store: JobStore
    settings: Settings
    project: ProjectRecord

    @property
    def tracking_uri(self) -> str:
        return self.settings.mlflow_tracking_uri

    def create(self) -> str:
        job, _ = self.store.create_job(self.project.id, SPEC)
        return job.id

    def tracker(self, job_id: str) -> MlflowTracker:
        return job_tracker(
            self.tracking_uri,
            self.project.name,
            job_id,
            SPEC,
            self.settings.mlflow_artifacts_dir,
        )

    def statuses(self, run_ids: list[str]) -> list[str]:
        client = MlflowClient(self.tracking_uri)
        return [str(client.get_run(run_id).info.status) for run_id in run_ids]


@pytest.fixture
def jobs(sqlite_url: str, mlflow_tracking_uri: str, tmp_path: Path) -> Iterator[Jobs]:
    engine = make_engine(sqlite_url)
    try:
        store = JobStore(make_sessionmaker(engine))
        settings = Settings(
            database_url=sqlite_url,
            data_dir=tmp_path / "var",
            mlflow_tracking_uri=mlflow_tracking_uri,
        )
        yield Jobs(store, settings, store.create_project(f"closer-{uuid.uuid4().hex[:8]}"))
    finally:
        engine.dispose()


@dataclass
class KilledAttempt:
    job_id: str
    ended: str
    """Stage 1's run, ended before the worker was killed."""
    left_running: list[str]
    """The parent run and stage 2's, which the killed worker never ended."""


def killed_in_stage2(jobs: Jobs, job_id: str | None = None) -> KilledAttempt:
    """The runs of a job whose worker was killed with -9 in stage 2."""
    job_id = job_id or jobs.create()
    tracker = jobs.tracker(job_id)
    tracker.on_stage_start(STAGE1, 0, 4, SPEC)
    tracker.on_stage_end(STAGE1, 4, {})
    tracker.on_stage_start(STAGE2, 0, 30, SPEC)
    tracker.on_step(STAGE2, 1, {"kd_loss": 0.5})
    stage1, stage2 = tracker.stage_run(STAGE1), tracker.stage_run(STAGE2)
    assert stage1 is not None and stage2 is not None
    return KilledAttempt(job_id, stage1, [tracker.run_id, stage2])


def fail_after_attempts_exhausted(jobs: Jobs, job_id: str) -> None:
    """The reconciler re-queued the job; its next delivery found its attempts used up."""
    assert jobs.store.transition(
        job_id,
        JobState.FAILED,
        worker_id=None,
        message="attempts exhausted",
        failure_kind=FailureKind.INFRASTRUCTURE,
    )


def cancel_while_queued(jobs: Jobs, job_id: str) -> None:
    """Re-queued after the crash, then cancelled through the API before a worker took it."""
    jobs.store.request_cancel(jobs.project.id, job_id)


def cancel_with_the_lease_expired(jobs: Jobs, job_id: str) -> None:
    """Cancelled while running; its worker is dead, so the reconciler finds the lease expired
    and cancels it."""
    with store_on_clock(jobs.settings.database_url, an_hour_ago()) as past:
        assert past.claim(job_id, "killed-worker", lease_seconds=60) is not None
        assert past.transition(job_id, JobState.STAGE2, worker_id="killed-worker")
    jobs.store.request_cancel(jobs.project.id, job_id)
    assert not jobs.store.requeue_expired(job_id)


def succeed_without_reopening(jobs: Jobs, job_id: str) -> None:
    """A later attempt succeeded without reopening these runs (say it found stage 1 done)."""
    for state in (JobState.STAGE2, JobState.REGISTERING, JobState.SUCCEEDED):
        assert jobs.store.transition(job_id, state, worker_id=None)


@pytest.mark.parametrize(
    ("end_job", "status"),
    [
        (fail_after_attempts_exhausted, "FAILED"),
        (cancel_while_queued, "KILLED"),
        (cancel_with_the_lease_expired, "KILLED"),
        (succeed_without_reopening, "FINISHED"),
    ],
)
def test_runs_a_killed_worker_left_end_as_its_job_ended(
    jobs: Jobs, end_job: Callable[[Jobs, str], None], status: str
) -> None:
    attempt = killed_in_stage2(jobs)
    end_job(jobs, attempt.job_id)

    closed = close_runs_of_ended_jobs(jobs.store, jobs.tracking_uri)

    assert sorted(closed) == sorted(attempt.left_running)
    assert jobs.statuses(attempt.left_running) == [status, status]
    assert jobs.statuses([attempt.ended]) == ["FINISHED"]
    job = jobs.store.get_job_unscoped(attempt.job_id)
    assert job is not None and job.finished_at is not None
    client = MlflowClient(jobs.tracking_uri)
    finished_ms = int(job.finished_at.timestamp() * 1000)
    assert {client.get_run(run).info.end_time for run in closed} == {finished_ms}
    assert close_runs_of_ended_jobs(jobs.store, jobs.tracking_uri) == []


def test_runs_of_jobs_not_over_are_left_to_their_next_attempt(jobs: Jobs) -> None:
    """Re-queued, running (another worker took over) and cancelling jobs are not over; a job
    this database does not know (another deployment's, on a shared MLflow) is not ours."""
    queued = killed_in_stage2(jobs)
    running = killed_in_stage2(jobs)
    assert jobs.store.transition(running.job_id, JobState.STAGE2, worker_id=None)
    cancelling = killed_in_stage2(jobs)
    assert jobs.store.transition(cancelling.job_id, JobState.STAGE2, worker_id=None)
    jobs.store.request_cancel(jobs.project.id, cancelling.job_id)
    unknown = killed_in_stage2(jobs, job_id=str(uuid.uuid4()))

    assert close_runs_of_ended_jobs(jobs.store, jobs.tracking_uri) == []

    for attempt in (queued, running, cancelling, unknown):
        assert jobs.statuses(attempt.left_running) == ["RUNNING", "RUNNING"]


def test_one_jobs_runs_end_alone(jobs: Jobs) -> None:
    """``close_runs_of_job``, for a worker that just recorded how its attempt ended."""
    mine, other = killed_in_stage2(jobs), killed_in_stage2(jobs)
    fail_after_attempts_exhausted(jobs, mine.job_id)
    fail_after_attempts_exhausted(jobs, other.job_id)

    closed = close_runs_of_job(jobs.store, jobs.tracking_uri, mine.job_id)

    assert sorted(closed) == sorted(mine.left_running)
    assert jobs.statuses(other.left_running) == ["RUNNING", "RUNNING"]


def test_mlflow_away_is_logged_not_raised(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The reconciler calls the closer in its pass: MLflow being down must not break it."""
    attempt = killed_in_stage2(jobs)
    fail_after_attempts_exhausted(jobs, attempt.job_id)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port once the socket is closed.

    with caplog.at_level(logging.WARNING, logger="workers.run_closer"):
        assert close_runs_of_ended_jobs(jobs.store, f"http://127.0.0.1:{port}") == []

    assert "could not list MLflow's running runs" in caplog.text
    assert jobs.statuses(attempt.left_running) == ["RUNNING", "RUNNING"]


def job_in(jobs: Jobs, state: JobState) -> str:
    """A job moved to ``state`` the way its worker and the API would."""
    job_id = jobs.create()
    assert jobs.store.transition(job_id, JobState.STAGE2, worker_id=None)
    if state is JobState.REGISTERING:
        assert jobs.store.transition(job_id, state, worker_id=None)
    elif state is JobState.CANCELLING:
        jobs.store.request_cancel(jobs.project.id, job_id)
    return job_id


def attempt_ending_with(jobs: Jobs, job_id: str, error: Exception | None) -> list[str]:
    """Runs an attempt's MLflow part that opens stage 2's run and ends with ``error`` (or
    normally); returns the parent and stage-2 runs."""
    workdir = jobs.settings.job_workdir(job_id).create()
    opened: list[str] = []
    raised: Exception | None = None
    try:
        with tracked_attempt(jobs.store, jobs.settings, job_id, jobs.project.id, SPEC, workdir) as (
            tracker,
            resolved,
        ):
            tracker.on_stage_start(STAGE2, 0, 30, resolved)
            tracker.on_step(STAGE2, 1, {"kd_loss": 0.5})
            stage2 = tracker.stage_run(STAGE2)
            assert stage2 is not None
            opened += [tracker.run_id, stage2]
            if error is not None:
                raise error
    except Exception as caught:
        raised = caught
    assert raised is error
    return opened


@pytest.mark.parametrize(
    ("state", "error", "status"),
    [
        (JobState.REGISTERING, None, "FINISHED"),
        (JobState.STAGE2, RuntimeError("CUDA error"), "FAILED"),
        (JobState.CANCELLING, JobCancelled("stage2", 1), "KILLED"),
    ],
    ids=["registered", "failed", "cancelled"],
)
def test_an_attempt_whose_end_is_certain_ends_its_runs(
    jobs: Jobs, state: JobState, error: Exception | None, status: str
) -> None:
    runs = attempt_ending_with(jobs, job_in(jobs, state), error)
    assert jobs.statuses(runs) == [status, status]


def test_an_attempt_stopped_otherwise_leaves_its_runs_to_the_jobs_end(jobs: Jobs) -> None:
    """Stopped for the time limit (the job is failed after the attempt's MLflow part) or a
    lost lease (the job goes on elsewhere): the runs stay open until the job's end is known."""
    timed_out, lease_lost = job_in(jobs, JobState.STAGE2), job_in(jobs, JobState.STAGE2)
    timed_out_runs = attempt_ending_with(jobs, timed_out, JobCancelled("stage2", 1))
    lease_lost_runs = attempt_ending_with(jobs, lease_lost, JobCancelled("stage2", 1))
    assert jobs.statuses(timed_out_runs + lease_lost_runs) == ["RUNNING"] * 4

    assert jobs.store.transition(
        timed_out, JobState.FAILED, worker_id=None, failure_kind=FailureKind.TIMEOUT
    )
    assert jobs.store.transition(lease_lost, JobState.QUEUED, worker_id=None)
    close_runs_of_ended_jobs(jobs.store, jobs.tracking_uri)

    assert jobs.statuses(timed_out_runs) == ["FAILED", "FAILED"]
    assert jobs.statuses(lease_lost_runs) == ["RUNNING", "RUNNING"]
