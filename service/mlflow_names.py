"""Every name maskd writes into MLflow: tags, aliases, experiments, registered models, artifacts.

MLflow knows nothing of projects, jobs or stages; maskd carries them in names and tags that the
workers write and the API and workers read back (to enforce tenancy, to find a job's runs, to
reuse stage 1, to check downloaded weights). A name spelled twice is a name that can drift, so
each lives here once. Torch-free and MLflow-free: importing it costs nothing.

Runs: one parent run per job, tagged ``job_id``, ``stage`` = ``job`` and the project, and one
nested run per stage (``stage`` = ``stage1``, ``stage2``, ``baseline`` or a comparison run's
``stage2/<method>/seed<n>``). Registered models: ``<project>.<job name>-student``, tagged with
the project, one version per student with lineage tags.
"""

from __future__ import annotations

from maskd_core.workdir import STUDENT_FILE, TOKENS_FILE

# -- tenancy ----------------------------------------------------------------------------------

PROJECT_TAG = "maskd.project"
"""On experiments, runs, registered models and versions: the owning project, the tenancy
boundary. A model whose tag names another project is answered like a missing one."""


EXPERIMENT_PREFIX = "maskd/"
"""Every project's experiment is named so: how a sweep over all of maskd's runs finds them."""


def experiment_name(project: str) -> str:
    return f"{EXPERIMENT_PREFIX}{project}"


def registered_model_name(project: str, job_name: str) -> str:
    """``<project>.<job name>-student``, with characters MLflow refuses in names replaced.

    The project prefix keeps two projects' job names from colliding (names are registry-wide).
    """
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in job_name).strip("-")
    return f"{project}.{safe or 'job'}-student"


def has_project_prefix(project: str, name: str) -> bool:
    return name.startswith(f"{project}.")


def quoted(value: str) -> str:
    """``value`` safe inside the single quotes of an MLflow search filter."""
    return value.replace("\\", "\\\\").replace("'", "\\'")


# -- runs -------------------------------------------------------------------------------------

JOB_ID_TAG = "job_id"
STAGE_TAG = "stage"
"""``job`` on the parent run, ``str(Stage)`` on a nested one."""
PARENT_STAGE = "job"
RUN_PROJECT_TAG = "project"
"""The project again, under the short name people filter by in the UI."""
TEACHER_TAG = "teacher"
STUDENT_TAG = "student"
METHOD_TAG = "method"
"""The run's method; on a comparison's parent run, every method it compares, comma-separated."""
SEED_TAG = "seed"
TASK_TAG = "task"
PARENT_RUN_TAG = "mlflow.parentRunId"
"""MLflow's own tag that nests a run under another in the UI."""
FAILURE_TAG = "maskd.failure"
"""On a comparison run ended FAILED while its job went on: why it failed."""

# -- stage 1 reuse ----------------------------------------------------------------------------

FINGERPRINT_TAG = "maskd.tokens_fingerprint"
"""On a finished stage-1 run (and the job's parent run): what its tokens depend on."""
TOKENS_SHA256_TAG = "maskd.tokens_sha256"
TOKENS_ARTIFACT_DIR = "tokens"
TOKENS_ARTIFACT = f"{TOKENS_ARTIFACT_DIR}/{TOKENS_FILE}"
REUSED_FROM_JOB_TAG = "maskd.stage1_reused_from_job"
REUSED_FROM_RUN_TAG = "maskd.stage1_reused_from_run"

# -- registered students ----------------------------------------------------------------------

CANDIDATE_ALIAS = "candidate"
"""Alias a worker gives each new version of a single job; users promote by moving ``champion``."""
STUDENT_MODEL_NAME = "student"
"""Name of the logged model (and its artifact folder) on the run."""
STUDENT_MODEL_TYPE = "maskd-student"
MODEL_WEIGHTS_ARTIFACT = f"artifacts/{STUDENT_FILE}"
"""The state dict inside a logged student model's folder."""
WEIGHTS_SHA256_TAG = "maskd.weights_sha256"
"""Version tag with the SHA-256 of the weights file, checked after every download."""
VERSION_JOB_ID_TAG = "maskd.job_id"
VERSION_METHOD_TAG = "maskd.method"
VERSION_SEED_TAG = "maskd.seed"
VERSION_TASK_TAG = "maskd.task"
VERSION_ARCH_TAG = "maskd.arch"
"""The student's architecture: a later job naming the version as weights must use it."""
VERSION_TEACHER_ARCH_TAG = "maskd.teacher.arch"
VERSION_TEACHER_WEIGHTS_TAG = "maskd.teacher.weights"
VERSION_TEACHER_SHA256_TAG = "maskd.teacher.weights_sha256"
VERSION_METRIC_TAG_PREFIX = "maskd.metric."
