"""Every name maskd writes into MLflow: tags, aliases, experiments, registered models, artifacts.

MLflow knows nothing of projects, jobs or stages; maskd carries them in names and tags that the
workers write and the API and workers read back (to enforce tenancy, to find a job's runs, to
reuse stage 1, to check downloaded weights). A name spelled twice is a name that can drift, so
each lives here once. Torch-free and MLflow-free: importing it costs nothing.

Runs: one parent run per job, tagged ``job_id``, ``stage`` = ``job`` and the project, and one
nested run per stage (``stage`` = ``stage1``, ``stage2``, ``baseline`` or a comparison run's
``stage2/<method>/seed<n>``). Registered models: ``<project>.<job name>-student``, tagged with
the project, one version per student with lineage tags, ``<project>.<teacher>-tokens``, one
version per stage-1 result learned on that teacher architecture, and
``<project>.<teacher>-teacher``, one version per teacher job (``kind: teacher``) training that
architecture.
"""

from __future__ import annotations

from collections.abc import Mapping

from maskd_core.workdir import (
    EXPORT_FILES,
    EXPORT_REPORT_FILE,
    STUDENT_FILE,
    TEACHER_FILE,
    TOKENS_FILE,
)

# -- tenancy ----------------------------------------------------------------------------------

PROJECT_TAG = "maskd.project"
"""On experiments, runs, registered models and versions: the owning project, the tenancy
boundary. A model whose tag names another project is answered like a missing one."""


EXPERIMENT_PREFIX = "maskd/"
"""Every project's experiment is named so: how a sweep over all of maskd's runs finds them."""


def experiment_name(project: str) -> str:
    return f"{EXPERIMENT_PREFIX}{project}"


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
"""MLflow's own experiment tag saying what the experiment is for; its UI offers the GenAI
pages (traces, overview) for ``genai_development`` and the runs table and charts for
``custom_model_development``."""
TRAINING_EXPERIMENT_KIND = "custom_model_development"
"""Every maskd experiment trains models: its runs table and chart view are what people read."""
UI_TRAINING_QUERY = "workflowType=machine_learning"
"""The query that opens MLflow's UI (3.17) in its "Model training" mode. That UI picks GenAI or
model training from a switch it remembers per browser, not from the experiment's kind tag, so
links maskd gives out carry it: ``<server>/#/experiments/<id>?workflowType=machine_learning``."""


def experiment_ui_path(experiment_id: str) -> str:
    """The UI route (after ``#``) of an experiment's runs table."""
    return f"/experiments/{experiment_id}?{UI_TRAINING_QUERY}"


def _name_part(text: str, fallback: str) -> str:
    """``text`` with the characters MLflow refuses in model names replaced by ``-``."""
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in text).strip("-")
    return safe or fallback


def registered_model_name(project: str, job_name: str) -> str:
    """``<project>.<job name>-student``, with characters MLflow refuses in names replaced.

    The project prefix keeps two projects' job names from colliding (names are registry-wide).
    """
    return f"{project}.{_name_part(job_name, 'job')}-student"


def tokens_model_name(project: str, teacher_arch: str) -> str:
    """``<project>.<teacher arch>-tokens``: every stage-1 result learned on that architecture.

    One model per architecture, not per weights file: a person browsing finds a teacher's
    tokens in one place, and the versions' teacher tags tell weights apart.
    """
    return f"{project}.{_name_part(teacher_arch, 'teacher')}-tokens"


def teacher_model_name(project: str, teacher_arch: str) -> str:
    """``<project>.<teacher arch>-teacher``: every teacher a teacher job of the project trained
    on that architecture, so a distillation job names the newest as
    ``models:/<project>.<arch>-teacher@candidate``. The suffix keeps it apart from the same
    architecture's tokens and from any job's students (``-student``)."""
    return f"{project}.{_name_part(teacher_arch, 'teacher')}-teacher"


def has_project_prefix(project: str, name: str) -> bool:
    return name.startswith(f"{project}.")


def quoted(value: str) -> str:
    """``value`` safe inside the single quotes of an MLflow search filter."""
    return value.replace("\\", "\\\\").replace("'", "\\'")


MODEL_KIND_TAG = "maskd.kind"
"""On registered models: what their versions hold, ``student``, ``teacher`` or ``tokens``.
Student models registered before the tag existed have none and are students."""
STUDENT_KIND = "student"
TEACHER_KIND = "teacher"
TOKENS_KIND = "tokens"


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
PAIRING_TAG = "maskd.pairing"
"""On a distillation job's run: what was distilled against what, in one line
(``backbone->backbone (5 levels)``); the whole pairing is its ``PAIRING_ARTIFACT``."""
PAIRING_ARTIFACT = "pairing.json"

# -- stage 1 reuse ----------------------------------------------------------------------------

FINGERPRINT_TAG = "maskd.tokens_fingerprint"
"""On a finished stage-1 run (and the job's parent run): what its tokens depend on."""
TOKENS_SHA256_TAG = "maskd.tokens_sha256"
TOKENS_ARTIFACT_DIR = "tokens"
TOKENS_ARTIFACT = f"{TOKENS_ARTIFACT_DIR}/{TOKENS_FILE}"
REUSED_FROM_JOB_TAG = "maskd.stage1_reused_from_job"
REUSED_FROM_RUN_TAG = "maskd.stage1_reused_from_run"
TOKENS_FROM_MODEL_TAG = "maskd.stage1_tokens_from_model"
"""On a job's run and its student versions: the ``models:/NAME/VERSION`` its tokens came from
when the spec named them (``stage1.from_model``)."""

# -- registered tokens ------------------------------------------------------------------------

TOKENS_MODEL_NAME = "tokens"
"""Name of the logged model (and its artifact folder) holding one stage-1 result."""
TOKENS_MODEL_TYPE = "maskd-tokens"
MODEL_TOKENS_ARTIFACT = TOKENS_FILE
"""The tokens file inside a logged tokens model's folder."""
MODEL_MASKS_ARTIFACT_DIR = "masks"
"""The stage-1 run's mask images, copied into the logged tokens model so they travel with it."""
TOKENS_JOB_ID_TAG = "maskd.tokens.job_id"
"""The job whose stage 1 learned the version (not ``maskd.job_id``: that one names students)."""
TOKENS_COUNT_TAG = "maskd.tokens.count"
TOKENS_MASK_WEIGHTING_TAG = "maskd.tokens.mask_weighting"
TOKENS_TEACHER_LAYERS_TAG = "maskd.teacher.layers"
"""JSON list of the tapped teacher layers: the levels the tokens were learned on."""
DATA_FINGERPRINT_TAG = "maskd.data_fingerprint"
"""SHA-256 of the dataset (and validation dataset) spec stage 1 learned on."""

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

# -- a student's deployable exports (``maskd_core.export``) -----------------------------------

MODEL_EXPORT_ARTIFACT_DIR = "export"
"""Inside a logged student model: its accepted exports and their report (``export.json``)."""
MODEL_EXPORT_REPORT_ARTIFACT = f"{MODEL_EXPORT_ARTIFACT_DIR}/{EXPORT_REPORT_FILE}"


def model_export_artifact(export_format: str) -> str:
    """The exported student of ``export_format`` ("onnx", "torch_export") in its model."""
    return f"{MODEL_EXPORT_ARTIFACT_DIR}/{EXPORT_FILES[export_format]}"


def export_status_tag(export_format: str) -> str:
    """Version tag: ``accepted``, ``refused``, ``failed`` or ``unsupported``."""
    return f"maskd.export.{export_format}"


def export_sha256_tag(export_format: str) -> str:
    """Version tag with the SHA-256 of an accepted export, checked after every download."""
    return f"maskd.export.{export_format}.sha256"


def export_parity_tag(export_format: str, number: str) -> str:
    """Version tag with a parity number of an export: ``max_abs_diff`` or ``metric_delta``."""
    return f"maskd.export.{export_format}.{number}"


def latency_tag(model: str) -> str:
    """Version tag: median batch-1 latency in ms of ``teacher``, ``student`` or an export."""
    return f"maskd.latency_ms.{model}"


def speedup_tag(model: str) -> str:
    """Version tag: the teacher's latency over ``model``'s (``student`` or an export)."""
    return f"maskd.speedup.{model}"


def latency_metric(model: str) -> str:
    """The logged model's metric beside ``latency_tag`` (charted by MLflow's UI)."""
    return f"latency_ms.{model}"


def speedup_metric(model: str) -> str:
    """The logged model's metric beside ``speedup_tag``."""
    return f"speedup.{model}"


def export_parity_metric(export_format: str, number: str) -> str:
    """The logged model's metric beside ``export_parity_tag``."""
    return f"export.{export_format}.{number}"


# -- registered teachers ----------------------------------------------------------------------

TEACHER_MODEL_NAME = "teacher"
"""Name of the logged model (and its artifact folder) on a teacher job's run; its versions carry
the students' lineage tags that apply (job, task, seed, arch, weights checksum, and
``VERSION_TEACHER_WEIGHTS_TAG`` for the weights it was fine-tuned from, ``none`` from scratch)
plus ``DATA_FINGERPRINT_TAG``."""
TEACHER_MODEL_TYPE = "maskd-teacher"
MODEL_TEACHER_WEIGHTS_ARTIFACT = f"artifacts/{TEACHER_FILE}"
"""The state dict inside a logged teacher model's folder."""

# -- job labels -------------------------------------------------------------------------------

LABEL_TAG_PREFIX = "maskd.label."
"""Every run of a job carries each of its spec's labels as ``maskd.label.<key>``, so the MLflow
UI and ``search_runs`` filter on them as ``GET /v1/jobs?label=`` does."""


def label_tags(labels: Mapping[str, str]) -> dict[str, str]:
    """A job's labels as MLflow run tags."""
    return {f"{LABEL_TAG_PREFIX}{key}": value for key, value in labels.items()}
