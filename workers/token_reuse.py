"""Stage-1 reuse: tokens an earlier job of the project learned for the same teacher and data.

Stage 1 depends only on the teacher, the data and its own settings (never on the student), so a
job whose stage-1 fingerprint matches a finished stage-1 run of its project takes that run's
tokens instead of learning them again. The fingerprint and the checksum are tags on that run
(``service.mlflow_names``); the tracker writes them when it uploads tokens.

A job may also name its tokens: ``stage1.from_model`` is a version of one of the project's
registered tokens models (``workers.publishing`` registers every learned stage 1). Those are
taken whatever the fingerprint says, once they are checked to fit the job's teacher.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient

from maskd_core.errors import SpecError
from maskd_core.files import file_sha256
from maskd_core.spec import JobSpec
from maskd_core.workdir import WorkDir
from service.mlflow_names import (
    FINGERPRINT_TAG,
    JOB_ID_TAG,
    PROJECT_TAG,
    STAGE_TAG,
    TOKENS_ARTIFACT,
    TOKENS_JOB_ID_TAG,
    TOKENS_SHA256_TAG,
    VERSION_TEACHER_SHA256_TAG,
    experiment_name,
    quoted,
)
from service.model_registry import ModelRegistry, use_process_tracking_uri

logger = logging.getLogger(__name__)

FINGERPRINT_FORMAT = "maskd-stage1-fingerprint/1"


def stage1_fingerprint(spec: JobSpec) -> str:
    """SHA-256 over everything stage 1's result depends on, so equal fingerprints mean
    interchangeable tokens.

    In: the task, the teacher (arch, args, tapped layers and the SHA-256 of its weights file,
    not its path), every stage-1 setting but ``reuse``, the dataset spec, the batch size and
    mixed precision (they change the optimisation), and the seed: it fixes the token
    initialisation and the batch order, so a different seed is a different stage 1, and a user
    who changes it on purpose (to measure variance) must get a fresh one. ``val_dataset`` when
    set: with it stage 1 learns on the whole training dataset, without it on the part
    ``dataset.val_fraction`` leaves; it is added only then, so fingerprints of jobs without one
    (all those made before it existed) are unchanged.

    Out: the student and stage 2 (stage 1 never sees them, which is the point of reuse),
    ``device`` and ``num_workers`` (the batches are step-indexed and identical on any device up
    to floating-point noise), evaluation and checkpoint cadence.

    ``spec`` must have local weight paths (after ``resolve_registry_weights``). Neither
    ``reuse`` nor ``from_model`` is in: they say where tokens come from, not what they are.
    """
    teacher = spec.teacher
    payload = {
        "format": FINGERPRINT_FORMAT,
        "task": spec.task,
        "teacher": {
            "arch": teacher.arch,
            "args": teacher.args,
            "layers": teacher.tapped_layers,
            "weights_sha256": file_sha256(teacher.weights) if teacher.weights else None,
        },
        "stage1": spec.stage1.model_dump(mode="json", exclude={"reuse", "from_model"}),
        "dataset": spec.dataset.model_dump(mode="json"),
        "seed": spec.seed,
        "batch_size": spec.batch_size,
        "mixed_precision": spec.mixed_precision,
    }
    if spec.val_dataset is not None:
        payload["val_dataset"] = spec.val_dataset.model_dump(mode="json")
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def data_fingerprint(spec: JobSpec) -> str:
    """SHA-256 of the data stage 1 learned on (the dataset spec, and the validation dataset's
    when set): the lineage a registered tokens version records about its data."""
    payload: dict[str, object] = {"dataset": spec.dataset.model_dump(mode="json")}
    if spec.val_dataset is not None:
        payload["val_dataset"] = spec.val_dataset.model_dump(mode="json")
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ReusedTokens:
    """Where reused tokens came from: the job, its stage-1 run, and the fingerprint matched;
    ``model_uri`` (``models:/NAME/VERSION``) when the spec named a registered version."""

    job_id: str
    run_id: str
    fingerprint: str
    model_uri: str | None = None

    @property
    def event_message(self) -> str:
        """What the job's event list says about where stage 1 came from."""
        if self.model_uri is not None:
            return f"stage 1 tokens from {self.model_uri} (learned by job {self.job_id})"
        return f"stage 1 reused from job {self.job_id}"


def reuse_stage1_tokens(
    tracking_uri: str,
    project: str,
    spec: JobSpec,
    workdir: WorkDir,
    cache_dir: Path | None = None,
) -> ReusedTokens | None:
    """Puts the tokens of an earlier matching stage 1 at ``workdir.tokens``, or returns None.

    When the spec names registered tokens (``stage1.from_model``), those, checked against the
    job (``_place_registered_tokens``; ``cache_dir``, ``Settings.model_cache_dir``, keeps
    downloaded versions, else they are downloaded for this job alone). Otherwise only
    finished stage-1 runs of the same project count (the project's experiment, and the
    run's project tag as a second check). Nothing happens when ``stage1.reuse`` is false or the
    job already has tokens (a resumed job keeps its own). The file is verified against the
    SHA-256 recorded with it and moved into place atomically, so the core either sees a whole
    artifact or none and then runs stage 1 itself.
    """
    from maskd_core.methods import job_needs_tokens

    target = workdir.tokens
    if not job_needs_tokens(spec) or target.exists():
        return None
    if spec.stage1.from_model is not None:
        return _place_registered_tokens(
            tracking_uri, project, spec, spec.stage1.from_model, workdir, cache_dir
        )
    if not spec.stage1.reuse:
        return None
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name(project))
    if experiment is None:
        return None
    fingerprint = stage1_fingerprint(spec)
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=(
            f"tags.`{FINGERPRINT_TAG}` = '{fingerprint}' and tags.`{PROJECT_TAG}` = "
            f"'{quoted(project)}' and tags.{STAGE_TAG} = 'stage1' and "
            "attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.end_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    run = runs[0]
    workdir.create()
    use_process_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory(dir=workdir.root, prefix=".tokens-") as tmp:
        downloaded = Path(client.download_artifacts(run.info.run_id, TOKENS_ARTIFACT, dst_path=tmp))
        expected = run.data.tags.get(TOKENS_SHA256_TAG)
        if expected is not None and file_sha256(downloaded) != expected:
            logger.warning("tokens of run %s fail their checksum; relearning", run.info.run_id)
            return None
        os.replace(downloaded, target)
    return ReusedTokens(
        job_id=run.data.tags.get(JOB_ID_TAG, "?"), run_id=run.info.run_id, fingerprint=fingerprint
    )


def _place_registered_tokens(
    tracking_uri: str,
    project: str,
    spec: JobSpec,
    uri: str,
    workdir: WorkDir,
    cache_dir: Path | None,
) -> ReusedTokens:
    """Copies the registered tokens version ``uri`` (the spec's ``stage1.from_model``) to
    ``workdir.tokens``.

    The version is resolved again here, not trusted from the API's check: an alias may have
    moved since. The teacher's weights checksum is compared now, after the worker has checked
    the teacher's path against the input policy (the API never hashes a file before that
    check). The core still checks levels and channels when it loads the file.
    """
    from service.model_uris import registered_tokens

    registry = ModelRegistry(tracking_uri)
    version = registered_tokens(uri, spec, project, registry)
    name, number = version.name, str(version.version)
    teacher_sha256 = file_sha256(spec.teacher.weights) if spec.teacher.weights else "none"
    learned_on = version.tags.get(VERSION_TEACHER_SHA256_TAG)
    if learned_on != teacher_sha256:
        raise SpecError(
            f"{uri!r} ({name} version {number}) was learned on teacher "
            f"weights with SHA-256 {learned_on}, but this job's teacher.weights has "
            f"{teacher_sha256}; name tokens learned on this teacher, or drop stage1.from_model "
            "to learn them",
            field="stage1.from_model",
        )
    workdir.create()
    with tempfile.TemporaryDirectory(dir=workdir.root, prefix=".tokens-") as tmp:
        downloaded = registry.download_weights(project, name, number, cache_dir or Path(tmp))
        staged = Path(tmp) / f".{workdir.tokens.name}"
        shutil.copyfile(downloaded, staged)
        os.replace(staged, workdir.tokens)
    return ReusedTokens(
        job_id=version.tags.get(TOKENS_JOB_ID_TAG, "?"),
        run_id=version.run_id or "",
        fingerprint=version.tags.get(FINGERPRINT_TAG, ""),
        model_uri=f"models:/{name}/{number}",
    )
