"""Settings of the job service, read once from ``MASKD_*`` environment variables.

One class for the API, the workers and the CLI, so a deployment configures every process the
same way. The defaults describe the *embedded* mode (SQLite and Celery's filesystem transport
under ``var/``), which needs no server; production points ``MASKD_DATABASE_URL`` at PostgreSQL
and ``MASKD_BROKER_URL`` at Redis.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from maskd_core.spec import MAX_NESTING, MAX_WORLD_SIZE
from maskd_core.workdir import WorkDir

EMBEDDED_BROKER_URL = "filesystem://"
"""The broker URL that selects Celery's filesystem transport (folders under ``data_dir``)."""


class Settings(BaseSettings):
    """Every setting of the service; each field is the variable ``MASKD_<FIELD NAME>``."""

    model_config = SettingsConfigDict(env_prefix="MASKD_", frozen=True, extra="ignore")

    database_url: str = Field(
        default="sqlite:///var/maskd.db",
        description="SQLAlchemy URL of the job database. SQLite (embedded, the default) or "
        "PostgreSQL in production, e.g. 'postgresql+psycopg://maskd@db:5432/maskd'. The "
        "schema is created with `maskd db upgrade`.",
    )
    broker_url: str = Field(
        default=EMBEDDED_BROKER_URL,
        description="Celery broker. 'filesystem://' (the default) keeps messages in "
        "folders under data_dir/broker and needs no server, but API and workers must share "
        "that disk; production uses Redis, e.g. 'redis://127.0.0.1:6379/0'.",
    )
    data_dir: Path = Field(
        default=Path("var"),
        description="Folder for local state: the embedded broker's message folders and the "
        "jobs' work directories (checkpoints, tokens, student weights).",
    )
    job_time_limit_seconds: int = Field(
        default=24 * 3600,
        gt=0,
        description="Hard time limit of one job attempt: Celery kills the worker process "
        "after this long. The broker's visibility timeout is set above it, so a long job is "
        "never redelivered while it still runs.",
    )
    job_soft_time_limit_seconds: int = Field(
        default=24 * 3600 - 600,
        gt=0,
        description="Soft time limit: the job is asked to checkpoint and stop (failure kind "
        "'timeout'). Must be below the hard limit, leaving time to write the checkpoint.",
    )
    broker_visibility_margin_seconds: int = Field(
        default=3600,
        ge=0,
        description="Added to the hard time limit to give the Redis visibility timeout: how "
        "long an unacknowledged message waits before Redis hands it to another worker.",
    )
    lease_seconds: int = Field(
        default=60,
        gt=0,
        description="How long a worker's claim on a job lasts without a heartbeat. After "
        "it lapses the reconciler re-queues the job and it resumes from its checkpoint.",
    )
    heartbeat_seconds: int = Field(
        default=10,
        gt=0,
        description="How often a running job renews its lease and checks for a cancel "
        "request. Must be well below lease_seconds.",
    )
    cancel_poll_seconds: float = Field(
        default=0.5,
        gt=0,
        le=60,
        description="How often a running job reads whether it was cancelled, between "
        "heartbeats: a cancel stops training within this plus one training step.",
    )
    distributed_timeout_seconds: int = Field(
        default=1800,
        gt=0,
        description="How long a multi-process job's collective waits for its other "
        "processes before the attempt fails and the job resumes from its checkpoint: above "
        "the longest evaluation, which rank 0 runs while the others wait.",
    )
    redispatch_after_seconds: int = Field(
        default=300,
        gt=0,
        description="A QUEUED job whose last dispatch is older than this (and which no "
        "worker holds) is sent to the broker again, covering lost messages and a broker "
        "that was down when the job was submitted. Duplicates are harmless: claims are "
        "compare-and-set.",
    )
    reconcile_interval_seconds: int = Field(
        default=30,
        gt=0,
        description="How often the reconciler looks for lost jobs (expired leases, "
        "undelivered messages).",
    )
    api_host: str = Field(default="127.0.0.1", description="Address `maskd serve` binds to.")
    api_port: int = Field(
        default=8000, gt=0, lt=65536, description="Port `maskd serve` listens on."
    )
    mlflow_tracking_uri: str = Field(
        default="sqlite:///var/mlflow.db",
        description="MLflow tracking URI the workers log runs, masks and models to; keep "
        "it a separate database from database_url (MLflow runs its own migrations).",
    )
    input_roots: list[Path] | None = Field(
        default=None,
        description="Folders job specs may read local files from (weights, dataset roots), as "
        "a JSON list, e.g. '[\"/data\"]'. Unset (embedded default): any path outside data_dir. "
        "Set it in production so a spec cannot point a job at arbitrary files on a worker. "
        "Paths under data_dir are always refused, except data_dir/inputs/<project>.",
    )
    sse_poll_interval_seconds: float = Field(
        default=1.0,
        gt=0,
        description="How often an event stream (/v1/jobs/{id}/events/stream) polls the "
        "database for new events and progress.",
    )
    log_format: Literal["json", "text"] = Field(
        default="json",
        description="How `maskd serve`, `maskd worker` and `maskd reconcile` write their log "
        "lines (to stderr): 'json', one object per line with time, level, logger, message "
        "and, while a job is being handled, job_id, attempt and stage; or 'text', the same "
        "fields as a readable line (what `maskd demo` uses).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        default="INFO",
        description="The least severe log records the service processes write.",
    )
    worker_metrics_port: int = Field(
        default=0,
        ge=0,
        lt=65536,
        description="Port of the Prometheus endpoint a worker's parent process serves "
        "(`GET /metrics`), summing the counters of all its prefork children; 0 (the "
        "default) serves none. Give each worker on a host its own port.",
    )
    worker_metrics_host: str = Field(
        default="0.0.0.0",
        description="Address the worker's Prometheus endpoint binds to (when "
        "worker_metrics_port is set). Keep the port on the internal network.",
    )
    worker_heartbeat_file: Path | None = Field(
        default=None,
        description="A file the worker's parent touches at every Celery heartbeat (about every "
        "2 s while it is connected to the broker), for a liveness check that catches a hung "
        "worker: `maskd-healthcheck heartbeat FILE --max-age 60` in the worker image. Unset "
        "(the default): none.",
    )
    worker_torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch intra-op threads of each job a worker runs, set in the prefork "
        "child before training. Unset (the default): OMP_NUM_THREADS when the environment "
        "sets it, else the CPUs this worker may use (its CPU affinity) divided by its "
        "concurrency, at least 1, so concurrent jobs do not oversubscribe the cores. On a "
        "host busy with other work, fewer threads are faster: set it lower.",
    )
    worker_gpus: int | None = Field(
        default=None,
        ge=0,
        le=MAX_WORLD_SIZE,
        description="GPUs this worker hands out to its jobs, one job per GPU at a time "
        "(workers.gpu_slots); `maskd worker --gpus` sets it for its processes, the first GPUs "
        "of CUDA_VISIBLE_DEVICES when that is set. Unset (workers started otherwise, e.g. "
        "the embedded one): no GPU slots, a job uses the default device as it always did.",
    )
    gpu_slot_dir: Path | None = Field(
        default=None,
        description="Folder of the lock files through which every worker on a host shares "
        "its GPUs (one file per GPU). It must be on the host's local disk (never a network "
        "share, whose hosts have GPUs of the same numbers) and the same for every worker "
        "of the host, containers included. Unset: maskd-gpu-slots in the system's "
        "temporary folder.",
    )
    worker_max_memory_per_child_mib: int = Field(
        default=16384,
        ge=0,
        description="A worker's pool process runs job after job, warm (torch imported), and "
        "is replaced only after a job that took its peak resident memory above this many MiB, "
        "so leaked or fragmented host memory cannot pile up; the next job then waits for the "
        "new process to import torch. 0: never replaced for memory.",
    )
    mlflow_check_timeout_seconds: float = Field(
        default=3.0,
        gt=0,
        description="How long /readyz waits for the MLflow tracking store (an HTTP server's "
        "/health, or its database) before reporting it unavailable.",
    )
    validation_processes: int = Field(
        default=2,
        ge=0,
        le=64,
        description="Processes of each API process's pool that validate submitted specs (a "
        "CPU dry run of both models), so submissions neither serialise nor stall reads. Each "
        "holds torch (a few hundred MiB); one per core the API may use is plenty. Above 0, "
        "accepted submissions are also stored and sent by one more process, off the API's "
        "event loop. 0 validates, stores and sends in the API process itself (small embedded "
        "setups).",
    )
    validation_queue_limit: int = Field(
        default=256,
        ge=1,
        description="Submissions an API process lets wait (for their turn, or for a "
        "validation process); beyond it POST /v1/jobs answers 503 with Retry-After instead "
        "of queueing without bound.",
    )
    submissions_in_flight: int = Field(
        default=32,
        ge=1,
        le=1024,
        description="Submissions an API process works on at once (body, key check, validation, "
        "storing); more wait for their turn, unread, so that reads need not wait behind a "
        "whole burst on the event loop. A few times the validation processes keeps them busy.",
    )
    max_request_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Largest request body the API reads, in bytes; a larger one is refused "
        "with 413 before it is parsed (a job spec is a few KiB).",
    )
    max_json_depth: int = Field(
        default=32,
        ge=8,
        le=MAX_NESTING,
        description="How deeply a JSON request body may nest (objects and arrays); a deeper "
        f"one is refused with 422 before it is parsed. At most {MAX_NESTING}, which the job "
        "spec itself allows.",
    )
    max_iterations: int = Field(
        default=1_000_000,
        ge=1,
        description="Submission limit: the most steps a job's stage1.iterations or "
        "stage2.iterations may ask for (the paper's longest schedule is 175,920).",
    )
    max_batch_size: int = Field(
        default=256, ge=1, description="Submission limit: the largest batch_size of a job."
    )
    max_num_workers: int = Field(
        default=32,
        ge=0,
        description="Submission limit: the most data-loading processes (num_workers) a job "
        "may fork on a worker.",
    )
    max_image_size: int = Field(
        default=4096,
        ge=16,
        description="Submission limit, in pixels: the largest image side a job may ask for, "
        "in its detectors' min_size/max_size and its dataset's image_size.",
    )
    max_comparison_runs: int = Field(
        default=64,
        ge=1,
        description="Submission limit: the most students one comparison job may train "
        "(methods × seeds).",
    )
    max_job_gpus: int = Field(
        default=1,
        ge=1,
        le=MAX_WORLD_SIZE,
        description="Submission limit: the most GPUs one job may ask for (resources.gpus). Set "
        "it to the GPU count of the largest worker host (`maskd worker --gpus`): a job of N "
        "GPUs waits in queue gpuN for a host with at least N, and one asking for more than any "
        "host has would wait forever. The default, 1, suits hosts of one GPU or none.",
    )
    max_cpu_processes: int = Field(
        default=4,
        ge=1,
        le=MAX_WORLD_SIZE,
        description="Submission limit: the most CPU training processes (resources.processes, "
        "gloo) one job may ask for; each takes a share of the worker host's cores.",
    )
    max_queued_jobs_per_project: int = Field(
        default=1000,
        ge=0,
        description="Quota: while a project has this many jobs QUEUED, its new submissions "
        "are refused with 429 (and Retry-After) until some start or are cancelled; 0 means "
        "unlimited. An idempotent replay of an existing job is never refused.",
    )
    max_running_jobs_per_project: int = Field(
        default=0,
        ge=0,
        description="Quota: while a project has this many jobs running (STAGE1, STAGE2, "
        "REGISTERING or CANCELLING), its new submissions are refused with 429 (and "
        "Retry-After) until one ends; 0 (the default) means unlimited. It is checked at "
        "submission only: jobs already queued still start when a worker is free.",
    )
    max_webhooks_per_project: int = Field(
        default=10,
        ge=0,
        description="The most webhook endpoints one project may register (POST /v1/webhooks); "
        "each state change of its jobs is one delivery per endpoint.",
    )
    webhook_allow_private_addresses: bool = Field(
        default=False,
        description="Let webhooks reach private, loopback and other non-public addresses "
        "(10/8, 172.16/12, 192.168/16, 127/8, fc00::/7, ...). Off by default, so a tenant "
        "cannot make the service call into its own network (SSRF); turn it on for a receiver "
        "on the same host or network, e.g. in `maskd demo` or tests. Link-local addresses "
        "(169.254/16 with the cloud metadata service, fe80::/10), multicast and unspecified "
        "addresses are refused even then.",
    )
    webhook_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        le=60,
        description="How long one webhook delivery may take (connect and answer) before the "
        "attempt counts as failed.",
    )
    webhook_max_attempts: int = Field(
        default=8,
        ge=1,
        le=30,
        description="Attempts per webhook delivery before it is logged as failed. Retries wait "
        "webhook_retry_base_seconds, then twice as long each time, up to "
        "webhook_retry_max_seconds (the defaults retry for about 40 minutes).",
    )
    webhook_retry_base_seconds: float = Field(
        default=10.0,
        gt=0,
        description="The wait before a failed webhook delivery's first retry; doubled for "
        "each further retry.",
    )
    webhook_retry_max_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="The longest wait between two attempts of one webhook delivery.",
    )
    webhook_poll_interval_seconds: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="How often the webhook sender (beside the reconciler: `maskd serve`, "
        "`maskd reconcile`, `maskd demo`) looks for deliveries that are due.",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_capitals(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _limits_are_consistent(self) -> Self:
        if self.job_soft_time_limit_seconds >= self.job_time_limit_seconds:
            raise ValueError(
                "MASKD_JOB_SOFT_TIME_LIMIT_SECONDS must be below MASKD_JOB_TIME_LIMIT_SECONDS "
                "so a job has time to checkpoint before it is killed"
            )
        if self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError(
                "MASKD_HEARTBEAT_SECONDS must be below MASKD_LEASE_SECONDS, otherwise a "
                "healthy worker loses its lease between two heartbeats"
            )
        return self

    @property
    def broker_visibility_timeout_seconds(self) -> int:
        """Redis visibility timeout: above the hard limit, so a running job is not redelivered."""
        return self.job_time_limit_seconds + self.broker_visibility_margin_seconds

    @property
    def uses_embedded_broker(self) -> bool:
        return self.broker_url.startswith(EMBEDDED_BROKER_URL)

    @property
    def broker_dir(self) -> Path:
        """Root of the embedded broker's folders (unused with Redis)."""
        return self.data_dir / "broker"

    @property
    def jobs_dir(self) -> Path:
        """Parent of the per-job work directories."""
        return self.data_dir / "jobs"

    def job_workdir(self, job_id: str) -> WorkDir:
        """Where a job's checkpoints and outputs live (``maskd_core.workdir`` names the files)."""
        return WorkDir(self.jobs_dir / job_id)

    @property
    def model_cache_dir(self) -> Path:
        """Registry weights downloaded for jobs and API downloads (versions are immutable, so
        they are kept)."""
        return self.data_dir / "model-cache"

    @property
    def mlflow_artifacts_dir(self) -> Path:
        """Where MLflow artifacts go: experiments' artifact roots with a database tracking URI,
        the served store of ``maskd mlflow``."""
        return self.data_dir / "mlartifacts"

    def project_inputs_dir(self, project: str) -> Path:
        """The one place under data_dir where a project's own input files may live."""
        return self.data_dir / "inputs" / project


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings()
