"""Evaluation during the loops (``eval_every``): curves that end on the final value, once.

The student's metric is evaluated every ``eval_every`` steps and at the last step, reported at
its step on the stage (one comparison run's stage each), so the tracker can draw curves that
overlay across methods; the last of them is the run's final value and is not computed again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from maskd_core_toys import seg_spec

from maskd_core.callbacks import Callback, Stage
from maskd_core.runner import run_job
from maskd_core.spec import JobSpec


class Evaluations(Callback):
    """Every evaluation reported, in order, as (stage, step, metrics)."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, int, dict[str, float]]] = []

    def on_eval(self, stage: Stage, step: int, metrics: Any) -> None:
        self.reports.append((str(stage), step, dict(metrics)))

    def student(self) -> list[tuple[str, int, dict[str, float]]]:
        return [report for report in self.reports if "student_miou" in report[2]]


def test_a_comparison_run_evaluates_at_the_interval_and_its_last_step_once(
    tmp_path: Path,
) -> None:
    body = seg_spec(stage1={"iterations": 1}, stage2={"iterations": 4}, eval_every=2)
    body["comparison"] = {"methods": ["maskd", "none"], "seeds": [0]}
    evaluations = Evaluations()
    result = run_job(JobSpec.model_validate(body), tmp_path, evaluations)

    assert [(stage, step) for stage, step, _ in evaluations.student()] == [
        ("stage2/maskd/seed0", 2),
        ("stage2/maskd/seed0", 4),
        ("stage2/none/seed0", 2),
        ("stage2/none/seed0", 4),
    ]
    # The last evaluation is each run's final value, as its summary and the table hold it.
    finals = [metrics for _, step, metrics in evaluations.student() if step == 4]
    for run, final in zip(result.runs, finals, strict=True):
        summary = json.loads(run.workdir.summary.read_text())
        assert summary["metrics"]["student_miou"] == final["student_miou"]


def test_a_single_job_closes_its_curves_and_reports_the_final_values_as_the_job_s(
    tmp_path: Path,
) -> None:
    spec = JobSpec.model_validate(seg_spec(stage2={"iterations": 3}, eval_every=2))
    evaluations = Evaluations()
    run_job(spec, tmp_path, evaluations, baseline=True)
    for model, stage in (("student", "stage2"), ("baseline", "baseline")):
        reports = [report for report in evaluations.reports if f"{model}_miou" in report[2]]
        assert [(where, step) for where, step, _ in reports] == [
            (stage, 2),
            (stage, 3),
            ("eval", 3),
        ]
        assert reports[1][2] == reports[2][2]


def test_without_eval_every_only_the_final_value_is_evaluated(tmp_path: Path) -> None:
    evaluations = Evaluations()
    run_job(JobSpec.model_validate(seg_spec()), tmp_path, evaluations)
    assert [(stage, step) for stage, step, _ in evaluations.student()] == [("eval", 2)]
