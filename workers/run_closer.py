"""Ends the MLflow runs that no worker is left to end, as the database says their job ended.

A worker's tracker ends its job's runs as its attempt ends (``workers.tracking``). A worker
killed outright (kill -9, out of memory, the hard time limit, a lost machine) ends none, and
its job can then end without any tracker: failed once its attempts are exhausted, cancelled
while queued after the crash, or cancelled by the reconciler when its lease expired while
cancelling. Its runs would show RUNNING forever. The job table knows how every job ended, so
each still-running run of a terminal job is ended as its job ended: FINISHED, FAILED, or KILLED
for a cancelled one. Runs of a job that is not over are left alone: its next attempt reopens
them, and a worker that lost its lease leaves them to the one that took the job over.

The reconciler sweeps all jobs each pass; a worker can end one job's runs right after it
recorded how its attempt ended. Both are best effort and never raise: MLflow being away must not
stop the reconciler re-queueing jobs, and the next pass tries again. Torch-free (the reconciler
runs beside the API); a pass with nothing to end costs two MLflow searches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TypeVar

from mlflow import MlflowClient
from mlflow.store.entities import PagedList

from service.lifecycle import JobState
from service.mlflow_names import EXPERIMENT_PREFIX, JOB_ID_TAG, quoted
from service.store import JobRecord, JobStore

logger = logging.getLogger(__name__)

RUN_STATUS_OF_ENDED_JOB: dict[JobState, str] = {
    JobState.SUCCEEDED: "FINISHED",
    JobState.FAILED: "FAILED",
    JobState.CANCELLED: "KILLED",
}
"""The MLflow status a terminal job's runs end with."""

T = TypeVar("T")


def close_runs_of_ended_jobs(store: JobStore, tracking_uri: str) -> list[str]:
    """Ends every still-RUNNING run of every terminal job; returns the ids of the runs ended."""
    return _close_runs(store, tracking_uri, job_id=None)


def close_runs_of_job(store: JobStore, tracking_uri: str, job_id: str) -> list[str]:
    """The same for one job: for its worker, once the attempt's end is recorded."""
    return _close_runs(store, tracking_uri, job_id=job_id)


def _close_runs(store: JobStore, tracking_uri: str, job_id: str | None) -> list[str]:
    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        running = _running_runs_by_job(client, job_id)
    except Exception:
        logger.warning("run closer: could not list MLflow's running runs", exc_info=True)
        return []
    closed: list[str] = []
    for owner, run_ids in running.items():
        try:
            job = store.get_job_unscoped(owner)
        except Exception:
            logger.warning("run closer: could not read job %s", owner, exc_info=True)
            continue
        if job is None or job.state not in RUN_STATUS_OF_ENDED_JOB:
            continue
        closed += _end_runs(client, job, run_ids)
    return closed


def _end_runs(client: MlflowClient, job: JobRecord, run_ids: list[str]) -> list[str]:
    """Ends ``run_ids`` with the job's status, at the time the job ended."""
    status = RUN_STATUS_OF_ENDED_JOB[job.state]
    end_time = int(job.finished_at.timestamp() * 1000) if job.finished_at else None
    ended: list[str] = []
    for run_id in run_ids:
        try:
            client.set_terminated(run_id, status=status, end_time=end_time)
        except Exception:
            logger.warning(
                "run closer: could not end run %s of job %s", run_id, job.id, exc_info=True
            )
            continue
        ended.append(run_id)
    if ended:
        logger.info(
            "run closer: job %s is %s; ended its runs %s as %s", job.id, job.state, ended, status
        )
    return ended


def _running_runs_by_job(client: MlflowClient, job_id: str | None) -> dict[str, list[str]]:
    """The RUNNING runs of maskd's experiments (of ``job_id`` only, when given), by job."""
    experiment_ids = [
        experiment.experiment_id
        for experiment in _all_pages(
            lambda token: client.search_experiments(
                filter_string=f"name LIKE '{EXPERIMENT_PREFIX}%'", page_token=token
            )
        )
    ]
    if not experiment_ids:
        return {}
    conditions = ["attributes.status = 'RUNNING'"]
    if job_id is not None:
        conditions.append(f"tags.{JOB_ID_TAG} = '{quoted(job_id)}'")
    by_job: dict[str, list[str]] = {}
    for run in _all_pages(
        lambda token: client.search_runs(
            experiment_ids, filter_string=" and ".join(conditions), page_token=token
        )
    ):
        owner = run.data.tags.get(JOB_ID_TAG)
        if owner:
            by_job.setdefault(owner, []).append(run.info.run_id)
    return by_job


def _all_pages(search: Callable[[str | None], PagedList[T]]) -> Iterator[T]:
    token: str | None = None
    while True:
        page = search(token)
        yield from page
        token = page.token
        if not token:
            return
