"""MLflow around one attempt of a job: registry weights, stage-1 reuse and the tracker.

Before the core runs, the spec's local paths are checked against the input policy again
(``service.inputs``: a link in the project's folder may have changed since the API accepted the
job), ``models:/`` weights are resolved to cached files (the core only reads local files),
tokens of an earlier matching stage 1 are put in the work directory when there are any, and
the job's MLflow runs are opened (or found again, on a redelivery). The tracker's runs end as
the attempt ends: FINISHED, KILLED (cancelled) or FAILED.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from maskd_core.spec import JobSpec
from maskd_core.workdir import WorkDir
from service.config import Settings
from service.inputs import check_input_paths
from service.mlflow_names import experiment_name
from service.model_uris import resolve_registry_weights
from service.store import JobStore
from workers.mlflow_tracker import MlflowTracker
from workers.token_reuse import reuse_stage1_tokens, stage1_fingerprint


@contextmanager
def tracked_attempt(
    store: JobStore,
    settings: Settings,
    job_id: str,
    project_id: str,
    spec: JobSpec,
    workdir: WorkDir,
) -> Iterator[tuple[MlflowTracker, JobSpec]]:
    """Yields the tracker and the spec to run (``models:/`` weights replaced by cached files)."""
    project = store.get_project(project_id)
    if project is None:
        raise RuntimeError(f"job {job_id} belongs to unknown project {project_id}")
    check_input_paths(spec, project.name, settings)
    uri = settings.mlflow_tracking_uri
    resolved = resolve_registry_weights(spec, project.name, uri, settings.model_cache_dir)
    reused = reuse_stage1_tokens(uri, project.name, resolved, workdir)
    with MlflowTracker(
        uri,
        experiment=experiment_name(project.name),
        job_id=job_id,
        project=project.name,
        spec=resolved,
        fingerprint=stage1_fingerprint(resolved),
        source_spec=spec,
        artifact_root=settings.mlflow_artifacts_dir,
    ) as tracker:
        if reused is not None:
            tracker.mark_stage1_reused(reused)
            store.add_event(job_id, f"stage 1 reused from job {reused.job_id}")
        yield tracker, resolved
