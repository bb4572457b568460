"""MLflow around one attempt of a job: registry weights, stage-1 reuse and the tracker.

Before the core runs, the spec's local paths are checked against the input policy again
(``service.inputs``: a link in the project's folder may have changed since the API accepted the
job), ``models:/`` weights are resolved to cached files (the core only reads local files),
the registered tokens the spec names (``stage1.from_model``), or else those of an earlier
matching stage 1, are put in the work directory when there are any, and
the job's MLflow runs are opened (or found again, on a redelivery).

The runs end with the attempt when how the job ends is already certain: FINISHED once
registered, FAILED after an error (``workers.outcomes`` fails the job for every error but a
stop), KILLED when the job is being cancelled. Runs stopped for any other reason are left
open: after the time limit the job's failure is recorded only after this, and after a lost
lease the runs are the next worker's. ``workers.run_closer`` ends those once the job's end is
in the database.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from maskd_core.errors import JobCancelled
from maskd_core.models import with_default_layers
from maskd_core.spec import JobSpec
from maskd_core.workdir import WorkDir
from service.config import Settings
from service.inputs import check_input_paths
from service.lifecycle import JobState
from service.mlflow_names import TOKENS_FROM_MODEL_TAG, experiment_name
from service.model_uris import resolve_registry_weights
from service.store import JobStore
from workers.mlflow_tracker import MlflowTracker
from workers.token_reuse import reuse_stage1_tokens, stage1_fingerprint

logger = logging.getLogger(__name__)


@contextmanager
def tracked_attempt(
    store: JobStore,
    settings: Settings,
    job_id: str,
    project_id: str,
    spec: JobSpec,
    workdir: WorkDir,
) -> Iterator[tuple[MlflowTracker, JobSpec]]:
    """Yields the tracker and the spec to run (``models:/`` weights replaced by cached files).

    Token reuse and the tracker (the runs' params, the tokens' tags) read the layers resolved,
    left-out ones replaced by the registry's defaults; the spec to run keeps them left out, as
    the core resolves them itself once its plan has recorded which layers are defaults (the
    pairing's ``layers_from`` and strides)."""
    project = store.get_project(project_id)
    if project is None:
        raise RuntimeError(f"job {job_id} belongs to unknown project {project_id}")
    check_input_paths(spec, project.name, settings)
    uri = settings.mlflow_tracking_uri
    resolved = resolve_registry_weights(spec, project.name, uri, settings.model_cache_dir)
    tapped = with_default_layers(resolved)
    reused = reuse_stage1_tokens(uri, project.name, tapped, workdir, settings.model_cache_dir)
    tracker = job_tracker(
        uri, project.name, job_id, tapped, settings.mlflow_artifacts_dir, source_spec=spec
    )
    try:
        if reused is not None:
            tracker.mark_stage1_reused(reused)
            if reused.model_uri is not None:
                tracker.client.set_tag(tracker.run_id, TOKENS_FROM_MODEL_TAG, reused.model_uri)
            store.add_event(job_id, reused.event_message)
        yield tracker, resolved
    except BaseException as error:
        try:
            _end_runs(tracker, _run_status_after(store, job_id, error))
        except Exception:
            logger.warning("job %s: could not end its MLflow runs", job_id, exc_info=True)
        raise
    _end_runs(tracker, _run_status_after(store, job_id, None))


def job_tracker(
    tracking_uri: str,
    project: str,
    job_id: str,
    spec: JobSpec,
    artifact_root: Path,
    **options: Any,
) -> MlflowTracker:
    """The tracker of job ``job_id`` of ``project`` running ``spec``: its runs in the project's
    experiment, its stage 1 tagged with the fingerprint later jobs reuse it by. ``options`` are
    ``MlflowTracker``'s own (``source_spec``, ``max_points_per_curve``, ...)."""
    return MlflowTracker(
        tracking_uri,
        experiment=experiment_name(project),
        job_id=job_id,
        project=project,
        spec=spec,
        fingerprint=stage1_fingerprint(spec),
        artifact_root=artifact_root,
        **options,
    )


_CANCEL_STATES = frozenset({JobState.CANCELLING, JobState.CANCELLED})


def _run_status_after(store: JobStore, job_id: str, error: BaseException | None) -> str | None:
    """The status the attempt's runs end with, or None to leave them running (see the module
    docstring).

    A ``BaseException`` that is not an ``Exception`` (the worker shutting down) ends no job:
    the job is re-queued once its lease expires, so its runs stay open for the next attempt.
    """
    if error is not None and not isinstance(error, JobCancelled):
        return "FAILED" if isinstance(error, Exception) else None
    try:
        job = store.get_job_unscoped(job_id)
    except Exception:
        logger.warning("job %s: state unreadable, its MLflow runs left open", job_id, exc_info=True)
        return None
    state = job.state if job is not None else None
    if state in _CANCEL_STATES:
        return "KILLED"
    if error is None and state is JobState.REGISTERING:
        return "FINISHED"
    return None


def _end_runs(tracker: MlflowTracker, status: str | None) -> None:
    """Sends what the tracker still holds, and ends its runs with ``status`` unless None."""
    if status is None:
        tracker.leave_open()
    else:
        tracker.finish(status)
