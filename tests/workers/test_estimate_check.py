"""A job's recorded estimate against its actual loop times (``workers.reporting``): computed by
the formulas, and written by the store reporter as each loop ends, on the real store."""

from __future__ import annotations

from typing import Any

import pytest
from worker_testkit import tiny_spec

from maskd_core.callbacks import STAGE1, STAGE2
from maskd_core.spec import JobSpec
from service.api.schemas import JobOutputs
from service.lifecycle import JobState
from service.store import JobRecord, JobStore, NewJob
from workers.lease import LeaseKeeper
from workers.reporting import StoreReporter, estimate_with_actual


def stage(name: str, iterations: int, seconds_per_step: float) -> dict[str, Any]:
    evaluation = 1.0
    return {
        "stage": name,
        "iterations": iterations,
        "batch_per_process": 2,
        "seconds_per_step": seconds_per_step,
        "flops_per_step": 10**9,
        "peak_memory_bytes": 2**20,
        "evaluation_passes": 1,
        "evaluation_seconds": evaluation,
        "seconds": iterations * seconds_per_step + evaluation,
    }


ESTIMATE: dict[str, Any] = {
    "format": "maskd-estimate/1",
    "measured_on": {
        "device": "cpu",
        "device_name": "test CPU",
        "target_device": "cpu",
        "representative": True,
        "note": "",
    },
    "measured_steps": 2,
    "world_size": 1,
    "memory_method": "cpu_sum_of_held_tensors",
    "teacher": {"arch": "seg_tiny_teacher", "parameters": 10, "forward_flops_per_image": 100},
    "student": {"arch": "seg_tiny_student", "parameters": 5, "forward_flops_per_image": 50},
    "stages": [stage("stage1", 4, 0.25), stage("stage2", 6, 0.5)],
    "total_seconds": 6.0,
}


class ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def running_job(store: JobStore, outputs: dict[str, Any]) -> JobRecord:
    project = store.create_project("p")
    spec = JobSpec.model_validate(tiny_spec())
    [(job, _)] = store.create_jobs(project.id, [NewJob(spec, None, outputs)])  # type: ignore[misc]
    assert store.claim(job.id, "w1", 30) is not None
    assert store.transition(job.id, JobState.STAGE1, worker_id="w1")
    return job


def reporter(store: JobStore, job: JobRecord, clock: ManualClock) -> StoreReporter:
    lease = LeaseKeeper(store, job.id, "w1", lease_seconds=30, interval_seconds=1)
    return StoreReporter(store, job.id, "w1", lease, state=JobState.STAGE1, clock=clock)


def test_each_loop_is_compared_as_it_ends_and_the_total_once_all_have() -> None:
    first = estimate_with_actual(ESTIMATE, "stage1", 0.5)
    assert first is not None
    assert first["actual"] == {
        "stages": {"stage1": {"estimated_seconds": 1.0, "actual_seconds": 2.0, "ratio": 2.0}},
        "total": None,
    }
    both = estimate_with_actual(first, "stage2", 0.25)
    assert both is not None
    assert both["actual"]["stages"]["stage2"] == {
        "estimated_seconds": 3.0,
        "actual_seconds": 1.5,
        "ratio": 0.5,
    }
    assert both["actual"]["total"] == {
        "estimated_seconds": 4.0,
        "actual_seconds": 3.5,
        "ratio": pytest.approx(0.875),
    }
    assert both["stages"] == ESTIMATE["stages"], "the estimate itself is kept as it was"


def test_nothing_is_compared_without_an_estimate_or_for_a_loop_it_did_not_plan() -> None:
    assert estimate_with_actual(None, "stage1", 0.5) is None
    assert estimate_with_actual(ESTIMATE, "baseline", 0.5) is None


def test_the_reporter_records_the_actual_times_on_the_job(job_store: JobStore) -> None:
    job = running_job(job_store, {"estimate": ESTIMATE})
    clock = ManualClock()
    report = reporter(job_store, job, clock)
    spec = JobSpec.model_validate(tiny_spec())

    report.on_stage_start(STAGE1, 0, 4, spec)
    clock.now += 2.0
    report.on_stage_end(STAGE1, 4, {})
    report.on_stage_start(STAGE2, 2, 6, spec)  # resumed: 4 steps in 1 s, 0.25 s a step
    clock.now += 1.0
    report.on_stage_end(STAGE2, 6, {})

    stored = job_store.get_job_unscoped(job.id)
    assert stored is not None
    check = JobOutputs.model_validate(stored.outputs).estimate
    assert check is not None and check.actual is not None and check.actual.total is not None
    assert check.actual.stages["stage1"].ratio == pytest.approx(2.0)
    assert check.actual.stages["stage2"].actual_seconds == pytest.approx(1.5)
    assert check.actual.total.ratio == pytest.approx(0.875)
    assert check.total_seconds == ESTIMATE["total_seconds"]


def test_a_job_without_an_estimate_gets_none(job_store: JobStore) -> None:
    job = running_job(job_store, {})
    clock = ManualClock()
    report = reporter(job_store, job, clock)
    report.on_stage_start(STAGE1, 0, 4, JobSpec.model_validate(tiny_spec()))
    clock.now += 2.0
    report.on_stage_end(STAGE1, 4, {})

    stored = job_store.get_job_unscoped(job.id)
    assert stored is not None and "estimate" not in stored.outputs
