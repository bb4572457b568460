"""Response bodies of the API (request bodies are ``maskd_core.spec.JobSpec`` itself).

They are built from the store's records and from MLflow's registry entities, so neither the
database layout nor MLflow's classes are what clients see; internal fields (lease owner,
dispatch times) stay out.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from maskd_core.spec import JobSpec
from service.lifecycle import FailureKind, JobState
from service.store import EventRecord, JobRecord

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion, RegisteredModel


class StageProgress(BaseModel):
    step: int = Field(description="Steps done in this stage.")
    total: int = Field(description="Steps the stage runs in all.")


class Transition(BaseModel):
    """One state change; ``from_state`` is null for the submission."""

    from_state: JobState | None
    to_state: JobState
    at: datetime
    message: str | None


class JobLinks(BaseModel):
    """Where to find more about the job in this API."""

    self: str
    events: str
    stream: str
    cancel: str


class WorkerWritten(BaseModel):
    """A part of a job's outputs, as the workers write it (``workers/tasks.py``,
    ``workers/publishing.py``, ``maskd_core.comparison``).

    Keys a newer worker adds pass through (``additionalProperties`` in the schema), so a job
    stored by it still reads back rather than failing the whole answer.
    """

    model_config = ConfigDict(extra="allow")


class MlflowRunLink(WorkerWritten):
    """The job's MLflow run: open it in the MLflow UI under this experiment."""

    run_id: str
    experiment_id: str


class RegisteredModelLink(WorkerWritten):
    """A registered student version."""

    name: str
    version: str
    uri: str = Field(description="``models:/NAME/VERSION``: usable as a later job's weights.")


class ComparisonModelLink(RegisteredModelLink):
    """The registered student of one comparison run."""

    method: str
    seed: int


class FailedRunOut(WorkerWritten):
    """A comparison run that failed on its own settings (a diverged loss, say)."""

    seed: int
    error: str = Field(description="The error's class, e.g. 'TrainingDiverged'.")
    reason: str = Field(description="What went wrong and what to change.")


class ComparisonRowOut(WorkerWritten):
    """One method of a comparison: its student's primary metric over the seeds that finished."""

    method: str
    params: dict[str, Any] = Field(description="The method's params, its defaults included.")
    seeds: list[int]
    values: list[float] = Field(description="The primary metric per seed in ``seeds``.")
    mean: float | None = Field(description="Null when no seed finished.")
    std: float | None = Field(description="Sample standard deviation (0 with one seed).")
    seconds_per_step: float | None
    failed: list[FailedRunOut] = Field(default_factory=list)


class ComparisonOut(WorkerWritten):
    """A comparison job's table (``comparison.json``)."""

    format: str = Field(description="The table's version, e.g. 'maskd-comparison/2'.")
    job: str
    task: str
    primary_metric: str = Field(description="e.g. 'miou' or 'map'.")
    teacher: float = Field(description="The teacher's primary metric.")
    masked_teacher: float | None = None
    iterations: int
    seeds: list[int]
    methods: list[ComparisonRowOut]
    failed_runs: int = 0


class PairedSideOut(WorkerWritten):
    """One side of a distilled level."""

    channels: int
    size: list[int] = Field(description="Height and width of the map on the validated sample.")
    stride: int | None = Field(
        description="The level's stride when its layer is a default tap of the model (the "
        "registry declares it); null for a layer the spec named."
    )


class PairedLevelOut(WorkerWritten):
    """Level ``level`` of ``teacher_layer`` distilled against the same level of
    ``student_layer``."""

    teacher_layer: str
    student_layer: str
    level: int
    teacher: PairedSideOut
    student: PairedSideOut
    align: str = Field(description="'conv1x1 S->T' (student to teacher channels) or 'identity'.")
    resize: str | None = Field(
        description="'bilinear 8x8->16x16' when the student's map is resized onto the "
        "teacher's; null when their sizes agree."
    )


class PairedAuxOut(WorkerWritten):
    """The auxiliary heads' logits, distilled beside the levels (MasKD's ``aux_weight``)."""

    layer: str
    teacher: PairedSideOut
    student: PairedSideOut


class PairingOut(WorkerWritten):
    """What the job distilled against what (``maskd_core.plan.JobPlan.pairing``)."""

    layers_from: dict[str, str] = Field(
        description="Per model (teacher, student): 'spec' for the layers it named, "
        "'registry defaults' for those its architecture taps when it names none."
    )
    levels: list[PairedLevelOut]
    aux: PairedAuxOut | None = None


class ModelCostOut(BaseModel):
    """One network's size and the cost of one forward of one image through it."""

    arch: str
    parameters: int = Field(description="Sum of the parameters' element counts.")
    forward_flops_per_image: int = Field(
        description="FLOPs of one eval-mode forward of one image (torch's FlopCounterMode: "
        "matrix multiplies and convolutions)."
    )


class MeasuredOnOut(BaseModel):
    """Where the steps were measured; read ``representative`` before trusting the seconds."""

    device: str = Field(description="'cpu' or 'cuda'.")
    device_name: str
    target_device: str = Field(description="What the spec asks for: cpu, cuda or auto.")
    representative: bool = Field(
        description="False when measured on another kind of device than the job will run on "
        "(the API host's CPU for a GPU job): FLOPs, parameters and steps hold, seconds and "
        "memory do not."
    )
    note: str


class StageEstimateOut(BaseModel):
    """One training loop, named as the job's progress names it (stage1, stage2/mgd/seed1)."""

    stage: str
    iterations: int
    batch_per_process: int = Field(description="batch_size / the job's process count.")
    seconds_per_step: float = Field(description="Median of the measured steps after the first.")
    flops_per_step: int = Field(description="Forward and backward of the first measured step.")
    peak_memory_bytes: int = Field(description="Per device; see the estimate's memory_method.")
    evaluation_passes: int
    evaluation_seconds: float
    seconds: float = Field(description="iterations × seconds_per_step + evaluation_seconds.")


class JobEstimateOut(BaseModel):
    """What a job will cost (``maskd_core.estimate``), measured on a few real steps."""

    format: str = Field(description="The estimate's version, e.g. 'maskd-estimate/1'.")
    measured_on: MeasuredOnOut
    measured_steps: int = Field(description="Timed steps per stage (after one untimed step).")
    world_size: int = Field(description="The job's processes; each runs batch_per_process.")
    memory_method: str = Field(
        description="'cuda_max_memory_allocated', or on a CPU 'cpu_sum_of_held_tensors': "
        "weights, gradients, optimiser state, the batch and the tensors saved for backward."
    )
    teacher: ModelCostOut
    student: ModelCostOut | None = Field(description="Null for a teacher job.")
    stages: list[StageEstimateOut]
    total_seconds: float = Field(description="The ETA: every stage's seconds.")
    pairing: PairingOut | None = Field(
        default=None,
        description="The levels the job would distil, as its submission reports them "
        "(outputs.pairing); null for a teacher job.",
    )


class StageTimeOut(WorkerWritten):
    """A training loop's estimated and actual seconds: iterations × seconds per step on both
    sides, so evaluations between stages are left out of both."""

    estimated_seconds: float
    actual_seconds: float = Field(
        description="The loop's measured seconds per step × its iterations (extrapolated from "
        "the steps the last attempt ran when it resumed)."
    )
    ratio: float | None = Field(
        description="actual / estimated: above 1, slower than estimated (null when the "
        "estimate was 0 s)."
    )


class EstimateCheckOut(WorkerWritten):
    """The estimate against the job's actual times, filled in as each loop ends."""

    stages: dict[str, StageTimeOut] = Field(default_factory=dict)
    total: StageTimeOut | None = Field(
        default=None, description="Every estimated loop together, once all of them have ended."
    )


class RecordedEstimateOut(JobEstimateOut, WorkerWritten):
    """The estimate made at submission (``POST /v1/jobs?estimate=true``), and its check."""

    actual: EstimateCheckOut | None = None


class JobOutputs(WorkerWritten):
    """What a finished job left: files, final metrics, its MLflow run and registered students.

    Empty until the job registers its students; a single job has ``model``, a comparison
    ``models`` and ``comparison``, a teacher job ``model`` (its registered teacher).
    """

    files: dict[str, str] = Field(
        default_factory=dict,
        description="Path on the workers per file: student (teacher for a teacher job), "
        "summary, ...",
    )
    metrics: dict[str, float] = Field(
        default_factory=dict, description="Final metrics: teacher and student mIoU or mAP, ..."
    )
    mlflow: MlflowRunLink | None = None
    model: RegisteredModelLink | None = Field(
        default=None,
        description="The registered student of a single job, or the registered teacher of a "
        "teacher job.",
    )
    models: list[ComparisonModelLink] | None = Field(
        default=None, description="The registered students of a comparison, one per run."
    )
    comparison: ComparisonOut | None = None
    pairing: PairingOut | None = Field(
        default=None,
        description="A distillation job's pairing: each teacher level, the student level "
        "distilled against it, their channels, sizes and strides, the align and any resize. "
        "From submission on (the dry run's plan), recorded again as the worker starts the job.",
    )
    estimate: RecordedEstimateOut | None = Field(
        default=None,
        description="The estimate asked for at submission (POST /v1/jobs?estimate=true), and "
        "how the job's training loops compared with it (``actual``).",
    )


class JobOut(BaseModel):
    """A job as clients see it."""

    id: str
    name: str
    state: JobState
    stage: str | None = Field(description="The stage running or last run: stage1, stage2, ...")
    progress: dict[str, StageProgress] = Field(description="Step and total per stage.")
    metrics: dict[str, float] = Field(description="Latest value of each training metric.")
    outputs: JobOutputs
    failure_kind: FailureKind | None = Field(
        description="Why a FAILED job failed: validation (the spec), user (the data), training "
        "(the loss diverged: lower the learning rate or loss weight the message names), "
        "infrastructure or timeout."
    )
    message: str | None = Field(description="The latest human-readable status or failure reason.")
    attempt: int = Field(description="How many times a worker has started this job.")
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    spec: JobSpec
    transitions: list[Transition] = Field(
        description="Every state change with its time, oldest first (empty in list responses)."
    )
    links: JobLinks

    @classmethod
    def from_record(cls, job: JobRecord) -> JobOut:
        base = f"/v1/jobs/{job.id}"
        return cls(
            id=job.id,
            name=job.name,
            state=job.state,
            stage=job.stage,
            progress={
                stage: StageProgress(step=values["step"], total=values["total"])
                for stage, values in job.progress.items()
            },
            metrics=job.metrics,
            outputs=JobOutputs.model_validate(job.outputs),
            failure_kind=job.failure_kind,
            message=job.message,
            attempt=job.attempt,
            created_at=job.created_at,
            updated_at=job.updated_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            spec=job.spec,
            transitions=[
                Transition(
                    from_state=event.from_state,
                    to_state=event.to_state,
                    at=event.created_at,
                    message=event.message,
                )
                for event in job.transitions
                if event.to_state is not None
            ],
            links=JobLinks(
                self=base,
                events=f"{base}/events",
                stream=f"{base}/events/stream",
                cancel=f"{base}/cancel",
            ),
        )


class JobPage(BaseModel):
    data: list[JobOut]
    next_cursor: str | None = Field(
        description="Pass as `cursor` to get the next page; null on the last page."
    )


class EventOut(BaseModel):
    """A history line: a state transition (from/to set) or a note such as a stage resume."""

    id: int = Field(description="Increasing; pass the last one seen as `after` to poll.")
    kind: str
    from_state: JobState | None
    to_state: JobState | None
    message: str | None
    created_at: datetime

    @classmethod
    def from_record(cls, event: EventRecord) -> EventOut:
        return cls(
            id=event.id,
            kind=event.kind,
            from_state=event.from_state,
            to_state=event.to_state,
            message=event.message,
            created_at=event.created_at,
        )


class EventPage(BaseModel):
    data: list[EventOut]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    checks: dict[str, str] = Field(description="'ok' or the reason, per dependency.")


def _millis(value: int | None) -> datetime | None:
    return datetime.fromtimestamp(value / 1000, tz=UTC) if value else None


class RegisteredModelOut(BaseModel):
    """A registered model as the API shows it."""

    name: str
    description: str | None
    tags: dict[str, str]
    aliases: dict[str, str]
    """Alias → version number."""
    created_at: datetime | None
    updated_at: datetime | None

    @classmethod
    def from_entity(cls, model: RegisteredModel) -> RegisteredModelOut:
        return cls(
            name=model.name,
            description=model.description or None,
            tags=dict(model.tags),
            aliases={alias: str(version) for alias, version in model.aliases.items()},
            created_at=_millis(model.creation_timestamp),
            updated_at=_millis(model.last_updated_timestamp),
        )


class ModelVersionOut(BaseModel):
    """One version with its lineage: tags written at registration, metrics and run links."""

    name: str
    version: str
    aliases: list[str]
    tags: dict[str, str]
    status: str
    source: str
    run_id: str | None
    experiment_id: str | None
    run_link: str | None
    """URL of the run in the MLflow UI when the tracking URI is a server, else None."""
    metrics: dict[str, float]
    """The latest value of each metric of the job's run (teacher/student mIoU and the like)."""
    created_at: datetime | None

    @classmethod
    def from_entity(
        cls, version: ModelVersion, run: Run | None = None, tracking_uri: str = ""
    ) -> ModelVersionOut:
        """``run`` (the version's run) adds its metrics and, on a tracking server, a link."""
        experiment_id = run.info.experiment_id if run is not None else None
        run_link = None
        if experiment_id and tracking_uri.startswith(("http://", "https://")):
            base = tracking_uri.rstrip("/")
            run_link = f"{base}/#/experiments/{experiment_id}/runs/{version.run_id}"
        return cls(
            name=version.name,
            version=str(version.version),
            aliases=list(version.aliases),
            tags=dict(version.tags),
            status=str(version.status),
            source=str(version.source),
            run_id=version.run_id or None,
            experiment_id=experiment_id,
            run_link=run_link,
            metrics=dict(run.data.metrics) if run is not None else {},
            created_at=_millis(version.creation_timestamp),
        )


# ------------------------------------------------------------------------ errors


class ErrorOut(BaseModel):
    """An error answer (400, 401, 404, 409, 413, 415, 503): what is wrong and how to fix it."""

    detail: str = Field(description="What is wrong and how to fix it, in one sentence or two.")


class FieldError(BaseModel):
    """One problem with one field of the request."""

    loc: list[str | int] = Field(
        description="Where: 'body', 'query', 'path' or 'header', then the field's path, "
        "e.g. ['body', 'stage1', 'iterations']."
    )
    msg: str = Field(description="What is wrong with it and how to fix it.")
    type: str = Field(description="A stable code for the kind of problem, e.g. 'missing'.")


class ValidationErrorOut(BaseModel):
    """A 422: one entry per problem (the first 50), and all of them on one line in ``message``."""

    detail: list[FieldError]
    message: str = Field(description="Every problem on one line, for a terminal.")


class QuotaDetail(BaseModel):
    message: str = Field(description="Which quota is reached and when to submit again.")
    quota: str = Field(description="'queued_jobs' or 'running_jobs'.")
    limit: int = Field(description="The quota's value.")
    current: int = Field(description="How many such jobs the project has now.")


class QuotaErrorOut(BaseModel):
    """A 429: a project quota is reached; retry after ``Retry-After`` seconds."""

    detail: QuotaDetail


INVALID_REQUEST_HINT = (
    "fix the fields listed in detail and resend; the job spec schema is at /docs and /openapi.json"
)


MAX_LISTED_PROBLEMS = 50
"""How many problems a 422 lists; ``message`` counts the rest (a list of 100,000 bad values
gets an answer of a few KiB, not one larger than the request)."""


def validation_error_body(problems: list[FieldError]) -> dict[str, Any]:
    """The body of every 422 the API sends, as ``ValidationErrorOut`` describes it."""
    listed = problems[:MAX_LISTED_PROBLEMS]
    summary = "; ".join(
        f"{'.'.join(str(part) for part in problem.loc) or 'request'}: {problem.msg}"
        for problem in listed
    )
    if len(problems) > len(listed):
        summary += f"; and {len(problems) - len(listed)} more problems"
    body = ValidationErrorOut(
        detail=listed, message=f"invalid request: {summary}. {INVALID_REQUEST_HINT}"
    )
    return body.model_dump(mode="json")


_ERROR_DESCRIPTIONS: dict[int, tuple[type[BaseModel], str]] = {
    400: (ErrorOut, "The body could not be read as JSON."),
    401: (ErrorOut, "Missing or unknown API key; `detail` says how to get one."),
    404: (ErrorOut, "No such job or model in this project (another project's is reported alike)."),
    409: (ErrorOut, "The request conflicts with the resource's state; `detail` says how."),
    413: (ErrorOut, "The request body is larger than MASKD_MAX_REQUEST_BYTES."),
    415: (ErrorOut, "The body was not sent as JSON (`Content-Type: application/json`)."),
    422: (ValidationErrorOut, "Invalid request: each problem names its field."),
    429: (QuotaErrorOut, "A project quota is reached; retry after `Retry-After` seconds."),
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error status codes, each with its body model."""
    responses: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        model, description = _ERROR_DESCRIPTIONS[code]
        responses[code] = {"model": model, "description": description}
        if code == 401:
            responses[code]["headers"] = {
                "WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}
            }
        if code == 429:
            responses[code]["headers"] = {
                "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}
            }
    return responses
