"""``/v1/jobs``: submit, inspect, list, cancel and follow distillation jobs.

The two hot reads (a job, a page of jobs) are ``async def`` over ``JobReads``, which checks the
key and reads without leaving the event loop on PostgreSQL. The other handlers that touch the
database are plain ``def`` functions, so FastAPI runs them in its thread pool; spec validation
(a CPU dry run of both models) runs in the validation pool's processes. Another project's job is
reported exactly like a missing one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from functools import partial
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse

from maskd_core.errors import SpecError
from maskd_core.spec import MAX_LABELS, JobSpec
from service.api.deps import (
    ApiKeyDep,
    CurrentProject,
    MetricsDep,
    ReadsDep,
    SettingsDep,
    StoreDep,
    SubmissionsDep,
    ValidationsDep,
    caller,
    refusing_ended_keys,
)
from service.api.params import INT64_MAX, LabelFilter, UtcTime, split_label_filter
from service.api.responses import ModelResponse
from service.api.schemas import (
    ErrorOut,
    EventOut,
    EventPage,
    JobEstimateOut,
    JobOut,
    JobPage,
    QuotaErrorOut,
    error_responses,
)
from service.config import Settings
from service.lifecycle import JobState
from service.limits import limits_exceeded
from service.logs import bind_job
from service.metrics import ApiMetrics, RegistryOutcome
from service.model_uris import names_registered_models, resolve_registry_weights
from service.store import (
    IdempotencyConflict,
    InvalidCursor,
    JobAlreadyFinished,
    JobFilter,
    JobNotFound,
    JobRecord,
    JobStore,
    NewJob,
    QuotaExceeded,
)
from service.validation_pool import SpecProblem, ValidationBusy, ValidationPool

logger = logging.getLogger(__name__)


async def _job_in_logs(request: Request) -> None:
    """Every log line of a request on ``/jobs/{job_id}…`` carries the job id.

    An async dependency runs in the request's own context, which the handler's thread (and
    the server's access log line) inherit.
    """
    job_id = request.path_params.get("job_id")
    if job_id:
        bind_job(str(job_id))


router = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[Depends(_job_in_logs)])

KEEPALIVE_SECONDS = 15.0
QUOTA_RETRY_AFTER_SECONDS = 60
"""The ``Retry-After`` of a submission refused by a quota: jobs take minutes, so a minute."""
_JOB_LINKS = {
    # For clients and stateful API tests: what the job's id opens. (Not the event stream,
    # which stays open until the job ends.)
    "GetJob": {
        "operationId": "getJob",
        "parameters": {"job_id": "$response.body#/id"},
    },
    "CancelJob": {
        "operationId": "cancelJob",
        "parameters": {"job_id": "$response.body#/id"},
    },
    "ListEvents": {
        "operationId": "listEvents",
        "parameters": {"job_id": "$response.body#/id"},
    },
}
_QUOTA_ERROR = {
    "description": "A project quota (MASKD_MAX_QUEUED_JOBS_PER_PROJECT or "
    "MASKD_MAX_RUNNING_JOBS_PER_PROJECT) is reached; nothing was stored. `detail` holds "
    "`quota` (`queued_jobs` or `running_jobs`), its `limit`, the project's `current` count "
    "and a `message`. Retry after `Retry-After` seconds.",
    "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}},
    "content": {"application/json": {}},
}


_BUSY_ERROR = {
    "model": ErrorOut,
    "description": "The API process has MASKD_VALIDATION_QUEUE_LIMIT submissions waiting for "
    "validation (or the process validating this one stopped); nothing was stored. Retry after "
    "`Retry-After` seconds.",
    "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}},
}


def job_not_found(job_id: str) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_404_NOT_FOUND,
        detail=f"job {job_id} not found in this project; list your jobs with GET /v1/jobs",
    )


def quota_exceeded(error: QuotaExceeded) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_429_TOO_MANY_REQUESTS,
        detail={
            "message": str(error),
            "quota": error.quota,
            "limit": error.limit,
            "current": error.current,
        },
        headers={"Retry-After": str(QUOTA_RETRY_AFTER_SECONDS)},
    )


async def validate_spec(
    spec: JobSpec,
    project: str,
    settings: Settings,
    validations: ValidationPool,
    metrics: ApiMetrics | None = None,
    *,
    estimate: bool = False,
) -> dict[str, Any]:
    """Run the core's full validation; a ``SpecError`` becomes a 422 pointing at its field.

    The answer is the outputs the job starts with: its ``pairing``, which the dry run planned
    (none for a teacher job), or with ``estimate``, as the pool then measures the job too
    (``maskd_core.estimate``, which validates first), its ``estimate``.

    The service's limits (``service.limits``: steps, batch size, image sizes, ...) come first
    of all, so an absurd spec costs no dry run.

    ``models:/`` weights are checked against the project's registry and downloaded (in a
    thread: it is network and disk), and the dry run validates the downloaded files; the
    stored spec keeps the URIs (the worker resolves them again, as an alias may move before
    the job runs). With ``metrics``, that lookup is counted as the registry operation
    ``resolve_weights``.

    The dry run happens in the validation pool (``service.validation_pool``), which checks
    local paths against the input policy before anything opens them. Raises
    ``ValidationBusy`` when the pool's queue is full.
    """
    exceeded = limits_exceeded(spec, settings)
    if exceeded:
        raise RequestValidationError(
            [
                {"loc": ["body", *problem.loc], "msg": problem.message, "type": "limit_exceeded"}
                for problem in exceeded
            ]
        )
    try:
        resolved = spec
        if names_registered_models(spec):
            resolved = await anyio.to_thread.run_sync(
                _resolved_weights, spec, project, settings, metrics
            )
    except SpecError as error:
        raise _invalid_spec(str(error), error.field) from error
    if estimate:
        answer = await validations.estimate(spec, resolved, project, settings)
        if isinstance(answer, SpecProblem):
            raise _invalid_spec(answer.message, answer.field)
        pairing = answer["pairing"]
        return {"estimate": answer} | ({"pairing": pairing} if pairing is not None else {})
    validated = await validations.validate(spec, resolved, project, settings)
    if isinstance(validated, SpecProblem):
        raise _invalid_spec(validated.message, validated.field)
    return {"pairing": validated.pairing} if validated.pairing is not None else {}


def _invalid_spec(message: str, field: str | None) -> RequestValidationError:
    loc = ["body", *field.split(".")] if field else ["body"]
    return RequestValidationError([{"loc": loc, "msg": message, "type": "spec_error"}])


def validation_busy(error: ValidationBusy) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        detail=str(error),
        headers={"Retry-After": str(error.retry_after)},
    )


def _resolved_weights(
    spec: JobSpec, project: str, settings: Settings, metrics: ApiMetrics | None
) -> JobSpec:
    """``spec`` with its ``models:/`` weights as local files (see ``validate_spec``)."""

    def resolve() -> JobSpec:
        return resolve_registry_weights(
            spec, project, settings.mlflow_tracking_uri, settings.model_cache_dir
        )

    if metrics is None:
        return resolve()
    outcome: RegistryOutcome = "error"
    try:
        resolved = resolve()
        outcome = "ok"
    except SpecError:
        outcome = "invalid"
        raise
    finally:
        metrics.count_registry_operation("resolve_weights", outcome)
    return resolved


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobOut,
    responses={
        200: {
            "model": JobOut,
            "description": "Replay: this Idempotency-Key made this job.",
            "links": _JOB_LINKS,
        },
        201: {"description": "The job, QUEUED.", "links": _JOB_LINKS},
        **error_responses(400, 409),
        429: {**_QUOTA_ERROR, "model": QuotaErrorOut},
        503: _BUSY_ERROR,
    },
)
async def submit_job(
    spec: JobSpec,
    key: ApiKeyDep,
    reads: ReadsDep,
    submissions: SubmissionsDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    validations: ValidationsDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=255,
            description="Retry-safe submission: the same key and spec return the same job.",
        ),
    ] = None,
    estimate: Annotated[
        bool,
        Query(
            description="Measure the job's cost first (as POST /v1/jobs/estimate) and record "
            "it as outputs.estimate, which the worker compares with the actual times. Costs "
            "a few training steps at submission."
        ),
    ] = False,
) -> ModelResponse:
    """Validate the spec completely, store the job as QUEUED and send it to the workers.

    The job carries its pairing from here on (``outputs.pairing``, as the dry run planned it;
    the worker records it again when it starts the job). Nothing is stored when validation
    fails. If the broker is unreachable the job is still
    accepted: it stays QUEUED and the reconciler sends it once the broker is back.

    Over a project quota the answer is 429 with ``Retry-After``: checked cheaply before the
    validation, in the key check's round trip (so a tenant at its quota costs no dry runs),
    and again, authoritatively, in the transaction that stores the job. A replay of an
    existing job is never refused.

    The handler is ``async`` so that a submission waiting for its dry run (in the validation
    pool) or for its batch to be stored and sent (``service.submissions``) holds no thread.
    With the validation queue full the answer is 503 with ``Retry-After``.
    """
    try:
        with refusing_ended_keys():
            project = caller(await reads.submitter(key, idempotency_key, submissions.quotas))
        outputs = await validate_spec(
            spec, project.name, settings, validations, metrics, estimate=estimate
        )
        job, created = await submissions.submit(project.id, NewJob(spec, idempotency_key, outputs))
    except ValidationBusy as error:
        raise validation_busy(error) from error
    except IdempotencyConflict as error:
        raise HTTPException(status_code=status.HTTP_409_CONFLICT, detail=str(error)) from error
    except QuotaExceeded as error:
        raise quota_exceeded(error) from error
    bind_job(job.id)
    return ModelResponse(
        JobOut.from_record(job),
        status_code=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
    )


@router.post(
    "/estimate",
    response_model=JobEstimateOut,
    responses={**error_responses(400), 503: _BUSY_ERROR},
)
async def estimate_job(
    spec: JobSpec,
    project: CurrentProject,
    settings: SettingsDep,
    metrics: MetricsDep,
    validations: ValidationsDep,
) -> ModelResponse:
    """What the job would cost: parameters and FLOPs of both models, peak memory per device,
    seconds per step measured on a few real steps of each stage, and the ETA per stage and in
    total. Nothing is stored or queued.

    Validated exactly as a submission (a bad spec is a 422 naming its field) and measured in
    the same validation pool, behind the same submission gate and queue limit (503 with
    ``Retry-After`` when full), so estimates cannot crowd out submissions or reads.
    ``measured_on`` says where the steps ran: the API host's CPU unless it has a GPU, which
    ``representative: false`` flags for a job that will run on a GPU worker.
    """
    try:
        outputs = await validate_spec(
            spec, project.name, settings, validations, metrics, estimate=True
        )
    except ValidationBusy as error:
        raise validation_busy(error) from error
    return ModelResponse(JobEstimateOut.model_validate(outputs["estimate"]))


@router.get("", response_model=JobPage)
async def list_jobs(
    key: ApiKeyDep,
    reads: ReadsDep,
    state: Annotated[
        list[JobState] | None, Query(description="Only jobs in these states (repeatable).")
    ] = None,
    name: Annotated[str | None, Query(description="Only jobs with exactly this name.")] = None,
    created_after: Annotated[
        UtcTime | None, Query(description="Only jobs created after this time (UTC if no zone).")
    ] = None,
    created_before: Annotated[
        UtcTime | None, Query(description="Only jobs created before this time (UTC if no zone).")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
    cursor: Annotated[
        str | None, Query(description="The `next_cursor` of the previous page.")
    ] = None,
    label: Annotated[
        list[LabelFilter] | None,
        Query(
            max_length=MAX_LABELS,
            description="Only jobs with this label, written key=value, e.g. team=vision "
            "(repeatable: a job must have every one).",
        ),
    ] = None,
) -> ModelResponse:
    """The project's jobs, newest first. Filters apply before the page is cut."""
    page = JobFilter(
        states=tuple(state or ()),
        name=name,
        created_after=_as_utc(created_after),
        created_before=_as_utc(created_before),
        labels=tuple(split_label_filter(text) for text in label or ()),
        cursor=cursor,
        limit=limit,
    )
    try:
        with refusing_ended_keys():
            project, jobs, next_cursor = await reads.jobs(key, page)
        caller(project)
    except InvalidCursor as error:
        raise RequestValidationError(
            [{"loc": ["query", "cursor"], "msg": str(error), "type": "invalid_cursor"}]
        ) from error
    return ModelResponse(
        JobPage(data=[JobOut.from_record(job) for job in jobs], next_cursor=next_cursor)
    )


@router.get("/{job_id}", response_model=JobOut, responses=error_responses(404))
async def get_job(job_id: str, key: ApiKeyDep, reads: ReadsDep) -> ModelResponse:
    """The job's spec, state, progress, metrics, transitions, failure reason and outputs."""
    with refusing_ended_keys():
        project, job = await reads.job(key, job_id)
    caller(project)
    if job is None:
        raise job_not_found(job_id)
    return ModelResponse(JobOut.from_record(job))


@router.post(
    "/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    responses=error_responses(404, 409),
)
def cancel_job(job_id: str, project: CurrentProject, store: StoreDep) -> JobOut:
    """Stop a job: a queued one is CANCELLED at once, a running one goes CANCELLING and stops
    at its next checkpoint (poll the job or stream its events to see it end)."""
    try:
        job = store.request_cancel(project.id, job_id)
    except JobNotFound as error:
        raise job_not_found(job_id) from error
    except JobAlreadyFinished as error:
        raise HTTPException(status_code=status.HTTP_409_CONFLICT, detail=str(error)) from error
    logger.info("job %s: cancel requested by project %s, now %s", job_id, project.name, job.state)
    return JobOut.from_record(job)


@router.get("/{job_id}/events", responses=error_responses(404))
def list_events(
    job_id: str,
    project: CurrentProject,
    store: StoreDep,
    after: Annotated[
        int, Query(ge=0, le=INT64_MAX, description="Only events with a larger id.")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many events.")] = 1000,
) -> EventPage:
    """The job's history, oldest first: transitions and notes such as stage starts/resumes."""
    try:
        events = store.list_events(project.id, job_id, after_id=after, limit=limit)
    except JobNotFound as error:
        raise job_not_found(job_id) from error
    return EventPage(data=[EventOut.from_record(event) for event in events])


@router.get(
    "/{job_id}/events/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **error_responses(404)},
)
def stream_events(
    job_id: str,
    request: Request,
    project: CurrentProject,
    store: StoreDep,
    settings: SettingsDep,
    after: Annotated[
        int, Query(ge=0, le=INT64_MAX, description="Only events with a larger id.")
    ] = 0,
    last_event_id: Annotated[
        int | None,
        Header(ge=0, le=INT64_MAX, description="Sent by EventSource when it reconnects."),
    ] = None,
) -> StreamingResponse:
    """Server-sent events: ``transition``/``info`` events as they are written (``id`` is the
    event id), ``progress`` when steps or metrics change, and ``end`` once the job is terminal.
    """
    if store.get_job(project.id, job_id) is None:
        raise job_not_found(job_id)
    start_after = max(after, last_event_id or 0)
    return StreamingResponse(
        _event_stream(
            request, store, project.id, job_id, start_after, settings.sse_poll_interval_seconds
        ),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _event_stream(
    request: Request,
    store: JobStore,
    project_id: str,
    job_id: str,
    after_id: int,
    poll_seconds: float,
) -> AsyncIterator[str]:
    last_progress: dict[str, Any] | None = None
    last_sent = anyio.current_time()
    while not await request.is_disconnected():
        # The job is read before its events: a terminal state is then never reported ahead of
        # the events that led to it, which were committed with it.
        job = await anyio.to_thread.run_sync(store.get_job, project_id, job_id)
        if job is None:
            return
        events = await anyio.to_thread.run_sync(
            partial(store.list_events, project_id, job_id, after_id=after_id)
        )
        for event in events:
            after_id = event.id
            yield _sse(event.kind, EventOut.from_record(event).model_dump(mode="json"), event.id)
        progress = _progress_snapshot(job)
        if progress != last_progress:
            last_progress = progress
            yield _sse("progress", progress)
            last_sent = anyio.current_time()
        if events:
            last_sent = anyio.current_time()
        if job.is_terminal:
            yield _sse("end", {"state": job.state.value, "failure_kind": job.failure_kind})
            return
        if anyio.current_time() - last_sent > KEEPALIVE_SECONDS:
            yield ": keepalive\n\n"
            last_sent = anyio.current_time()
        await anyio.sleep(poll_seconds)


def _progress_snapshot(job: JobRecord) -> dict[str, Any]:
    return {
        "state": job.state.value,
        "stage": job.stage,
        "progress": job.progress,
        "metrics": job.metrics,
    }


def _sse(event: str, data: dict[str, Any], event_id: int | None = None) -> str:
    lines = [f"event: {event}", f"data: {json.dumps(data)}"]
    if event_id is not None:
        lines.insert(0, f"id: {event_id}")
    return "\n".join(lines) + "\n\n"


def _as_utc(moment: datetime | None) -> datetime | None:
    """Query times without a zone are taken as UTC, the zone every stored time is in."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)
