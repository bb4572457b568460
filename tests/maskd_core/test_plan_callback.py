"""``Callback.on_plan``: a job hands its plan to every callback once, before the teacher's
evaluation and any stage, so reporters can show the pairing while the job runs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
from maskd_core_toys import seg_spec

from maskd_core.callbacks import Callback, Stage
from maskd_core.plan import JobPlan
from maskd_core.runner import run_job
from maskd_core.spec import JobSpec
from maskd_core.validate import validate_job


class Reports(Callback):
    def __init__(self) -> None:
        self.events: list[str] = []
        self.plans: list[JobPlan] = []

    def on_plan(self, plan: JobPlan) -> None:
        self.events.append("plan")
        self.plans.append(plan)

    def on_eval(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
        self.events.append(f"eval {stage}")

    def on_stage_start(
        self, stage: Stage, start_step: int, total_steps: int, spec: JobSpec
    ) -> None:
        self.events.append(f"start {stage}")


@pytest.mark.slow
def test_every_callback_gets_the_plan_once_before_anything_else(tmp_path: Path) -> None:
    body = seg_spec(teacher={"layers": None}, student={"layers": None})
    spec = JobSpec.model_validate(
        {**body, "comparison": {"methods": ["maskd", "none"], "seeds": [0]}}
    )
    first, second = Reports(), Reports()

    run_job(spec, tmp_path, [first, second])

    expected = validate_job(spec).pairing()
    for reports in (first, second):
        assert reports.events[0] == "plan", reports.events
        assert reports.events.count("plan") == 1, "once per job, comparison runs included"
        [plan] = reports.plans
        assert plan.pairing() == expected
        assert plan.pairing()["layers_from"]["teacher"] == "registry defaults"
