"""Per-project quotas on queued and running jobs: the store's check and the API's 429."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from service_testkit import Api, make_spec, open_api, spec_body

from service.client import ApiError, MaskdClient
from service.config import Settings
from service.lifecycle import JobState
from service.store import JobQuotas, JobStore, QuotaExceeded

LEASE = 60


def queued_count(store: JobStore, project_id: str) -> int:
    return len(store.list_jobs(project_id, states=[JobState.QUEUED], limit=100)[0])


# ------------------------------------------------------------------------ store


def test_the_queued_quota_refuses_the_next_job_and_stores_nothing(job_store: JobStore) -> None:
    key = job_store.create_api_key("acme")
    project = job_store.create_project("acme")
    quotas = JobQuotas(max_queued=2)
    for index in range(2):
        assert job_store.create_job(project.id, make_spec(f"j{index}"), quotas=quotas)[1]
    with pytest.raises(QuotaExceeded) as error:
        job_store.create_job(project.id, make_spec("j2"), quotas=quotas)
    assert (error.value.quota, error.value.limit, error.value.current) == ("queued_jobs", 2, 2)
    assert "2 queued jobs and may have at most 2" in str(error.value)
    with pytest.raises(QuotaExceeded):
        job_store.submitter_for_key(key, None, quotas)
    assert queued_count(job_store, project.id) == 2

    other = job_store.create_project("globex")
    assert job_store.create_job(other.id, make_spec(), quotas=quotas)[1], "quotas are per project"
    assert job_store.create_job(project.id, make_spec("unlimited"))[1], "no quotas, no limit"


def test_a_replay_is_never_refused_by_a_quota(job_store: JobStore) -> None:
    key = job_store.create_api_key("acme")
    project = job_store.create_project("acme")
    quotas = JobQuotas(max_queued=1)
    job, _ = job_store.create_job(project.id, make_spec(), "key-1", quotas=quotas)
    assert job_store.submitter_for_key(key, "key-1", quotas) == project, "a replay's pre-check"
    with pytest.raises(QuotaExceeded):
        job_store.submitter_for_key(key, "key-2", quotas)
    replay, created = job_store.create_job(project.id, make_spec(), "key-1", quotas=quotas)
    assert (replay.id, created) == (job.id, False)
    with pytest.raises(QuotaExceeded):
        job_store.create_job(project.id, make_spec(), "key-2", quotas=quotas)


def test_finished_and_cancelled_jobs_free_the_quota(job_store: JobStore) -> None:
    project = job_store.create_project("acme")
    quotas = JobQuotas(max_queued=1)
    job, _ = job_store.create_job(project.id, make_spec(), quotas=quotas)
    job_store.request_cancel(project.id, job.id)
    assert job_store.create_job(project.id, make_spec(), quotas=quotas)[1]


def test_the_running_quota_counts_every_state_holding_a_worker(job_store: JobStore) -> None:
    project = job_store.create_project("acme")
    quotas = JobQuotas(max_running=2)
    first, _ = job_store.create_job(project.id, make_spec("first"), quotas=quotas)
    second, _ = job_store.create_job(project.id, make_spec("second"), quotas=quotas)
    for job, worker in ((first, "w1"), (second, "w2")):
        assert job_store.claim(job.id, worker, LEASE) is not None
        assert job_store.transition(job.id, JobState.STAGE1, worker_id=worker)
    # Two running (STAGE1) and none queued: a new job would be a third.
    with pytest.raises(QuotaExceeded) as error:
        job_store.create_job(project.id, make_spec("third"), quotas=quotas)
    assert (error.value.quota, error.value.limit, error.value.current) == ("running_jobs", 2, 2)
    assert "2 running jobs" in str(error.value)

    job_store.request_cancel(project.id, first.id)  # CANCELLING still holds its worker
    with pytest.raises(QuotaExceeded):
        job_store.create_job(project.id, make_spec("third"), quotas=quotas)
    assert job_store.transition(first.id, JobState.CANCELLED, worker_id="w1")
    assert job_store.create_job(project.id, make_spec("third"), quotas=quotas)[1]


def test_concurrent_submissions_never_exceed_the_quota(job_store: JobStore) -> None:
    """Ten submissions at once under a quota of three: three stored, seven refused. The count
    and the insert share one transaction behind the project's row lock (PostgreSQL) or
    SQLite's write lock, so no two of them can both count the same free place."""
    project = job_store.create_project("acme")
    quotas = JobQuotas(max_queued=3)
    barrier = threading.Barrier(10)

    def submit(index: int) -> bool:
        barrier.wait()
        try:
            return job_store.create_job(project.id, make_spec(f"j{index}"), quotas=quotas)[1]
        except QuotaExceeded:
            return False

    for _ in range(3):
        with ThreadPoolExecutor(10) as pool:
            created = list(pool.map(submit, range(10)))
        assert queued_count(job_store, project.id) == 3
        assert created.count(True) == 3
        for job in job_store.list_jobs(project.id, states=[JobState.QUEUED])[0]:
            job_store.request_cancel(project.id, job.id)


def test_concurrent_replays_at_the_quota_all_get_the_one_job(job_store: JobStore) -> None:
    """The same Idempotency-Key from six threads under a quota of one: the first stores the
    job, the others (which may have waited for its lock) replay it instead of a 429."""
    project = job_store.create_project("acme")
    quotas = JobQuotas(max_queued=1)
    barrier = threading.Barrier(6)

    def submit(_: int) -> str:
        barrier.wait()
        return job_store.create_job(project.id, make_spec(), "same", quotas=quotas)[0].id

    with ThreadPoolExecutor(6) as pool:
        ids = set(pool.map(submit, range(6)))
    assert len(ids) == 1
    assert queued_count(job_store, project.id) == 1


# ------------------------------------------------------------------------ API


@pytest.fixture
def quota_api(service_settings: Settings, job_store: JobStore) -> Iterator[Api]:
    settings = service_settings.model_copy(update={"max_queued_jobs_per_project": 2})
    with open_api(settings, job_store) as opened:
        yield opened


def test_the_submission_over_the_queued_quota_is_429_with_retry_after(quota_api: Api) -> None:
    api = quota_api
    for index in range(2):
        response = api.http.post(
            "/v1/jobs",
            json=spec_body(f"j{index}"),
            headers={**api.headers(), "Idempotency-Key": f"k{index}"},
        )
        assert response.status_code == 201, response.text

    response = api.http.post("/v1/jobs", json=spec_body("j2"), headers=api.headers())
    assert response.status_code == 429, response.text
    assert int(response.headers["Retry-After"]) > 0
    detail = response.json()["detail"]
    assert (detail["quota"], detail["limit"], detail["current"]) == ("queued_jobs", 2, 2)
    assert "at most 2" in detail["message"]
    # Refused before the dry run of the models: a tenant at its quota costs no validation.
    unchecked = spec_body(teacher={"arch": "seg_tiny_teacher", "layers": ["no_such_layer"]})
    assert api.http.post("/v1/jobs", json=unchecked, headers=api.headers()).status_code == 429
    with pytest.raises(ApiError, match="HTTP 429: quota reached: this project has 2 queued"):
        MaskdClient(api.http, api.key).submit_job(spec_body("j3"))
    assert queued_count(api.store, api.project.id) == 2, "nothing stored"
    assert len(api.queued_messages()) == 2, "nothing sent"

    replay = api.http.post(
        "/v1/jobs", json=spec_body("j0"), headers={**api.headers(), "Idempotency-Key": "k0"}
    )
    assert replay.status_code == 200, "a replay is never refused"
    other = api.http.post("/v1/jobs", json=spec_body(), headers=api.headers(api.other_key))
    assert other.status_code == 201, "another project has its own quota"


def test_the_429_is_documented_and_the_quotas_default_to_documented_values(api: Api) -> None:
    operation = api.http.get("/openapi.json").json()["paths"]["/v1/jobs"]["post"]
    assert "Retry-After" in operation["responses"]["429"]["headers"]
    fields = Settings.model_fields
    assert fields["max_queued_jobs_per_project"].default == 1000
    assert fields["max_running_jobs_per_project"].default == 0, "0: unlimited"
