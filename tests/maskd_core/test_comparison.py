"""Comparison jobs: several methods over seeds on one teacher, one split and one stage 1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from maskd_core_toys import Recorder, refused, seg_spec

from maskd_cli import main
from maskd_core.callbacks import Stage
from maskd_core.comparison import (
    comparison_markdown,
    comparison_metrics,
    comparison_table,
    failure_record,
)
from maskd_core.errors import ComparisonFailed, JobCancelled, UnknownNameError
from maskd_core.methods import FITNET_LOGITS_WEIGHT
from maskd_core.plan import JobPlan
from maskd_core.runner import run_job
from maskd_core.spec import JobSpec
from maskd_core.workdir import WorkDir


def compare_spec(**comparison: Any) -> JobSpec:
    body = seg_spec(stage1={"iterations": 1}, stage2={"iterations": 2})
    body["comparison"] = {"methods": ["maskd", "fitnet"], "seeds": [0, 1], **comparison}
    return JobSpec.model_validate(body)


def test_two_methods_two_seeds_share_stage1_and_give_four_runs_and_a_table(
    tmp_path: Path,
) -> None:
    recorder = Recorder()
    result = run_job(compare_spec(), tmp_path, recorder)

    starts = [event.split()[1] for event in recorder.events if event.startswith("start")]
    assert starts == ["stage1"] + [
        f"stage2/{m}/seed{s}" for m in ("maskd", "fitnet") for s in (0, 1)
    ]
    # Each run's callbacks get that run's own spec: its method and seed, no comparison.
    assert [(s.stage2.method.name, s.seed, s.comparison) for s in recorder.specs[1:]] == [
        (m, seed, None) for m in ("maskd", "fitnet") for seed in (0, 1)
    ]
    assert [(run.method.name, run.seed) for run in result.runs] == [
        ("maskd", 0),
        ("maskd", 1),
        ("fitnet", 0),
        ("fitnet", 1),
    ]
    for run in result.runs:
        assert run.workdir == WorkDir(tmp_path / "runs" / f"{run.method.name}-seed{run.seed}")
        assert run.stage == Stage.comparison_run(run.method.name, run.seed)
        assert run.workdir.student.is_file() and run.workdir.model_spec.is_file()
        assert run.summary["method"] == run.method.name and run.summary["seed"] == run.seed
    assert result.tokens_path == tmp_path / "tokens.pt" and result.tokens_path.is_file()
    # The seed changes the student: same method, different seeds, different weights.
    assert (
        result.runs[0].workdir.student.read_bytes() != result.runs[1].workdir.student.read_bytes()
    )

    table = json.loads((tmp_path / "comparison.json").read_text())
    assert table == result.comparison
    assert table["primary_metric"] == "miou" and table["seeds"] == [0, 1]
    rows = {row["method"]: row for row in table["methods"]}
    assert set(rows) == {"maskd", "fitnet"}
    fitnet = rows["fitnet"]
    assert fitnet["values"] == [r.metrics["student_miou"] for r in result.runs[2:]]
    assert fitnet["mean"] == pytest.approx(sum(fitnet["values"]) / 2)
    # Registry defaults spelled out: the taps include the logits ("head"), hence FitNet's
    # weight for logits.
    assert fitnet["params"] == {"weight": FITNET_LOGITS_WEIGHT}
    assert fitnet["failed"] == [] and table["failed_runs"] == 0
    assert fitnet["seconds_per_step"] > 0
    markdown = (tmp_path / "comparison.md").read_text()
    assert markdown == comparison_markdown(table)
    assert "| teacher |" in markdown and "| fitnet |" in markdown


def test_a_half_finished_comparison_skips_finished_runs_and_resumes_the_cut_one(
    tmp_path: Path,
) -> None:
    spec = compare_spec()
    # Stops during the third run's first step (two runs of two steps finished, plus stage 1).
    with pytest.raises(JobCancelled) as stopped:
        run_job(spec, tmp_path, Recorder(stop_at=1 + 2 + 2 + 1))
    assert stopped.value.stage == "stage2/fitnet/seed0"
    finished = (tmp_path / "runs" / "maskd-seed0" / "student.pt").read_bytes()

    recorder = Recorder()
    result = run_job(spec, tmp_path, recorder)
    starts = [event for event in recorder.events if event.startswith("start")]
    assert starts == ["start stage2/fitnet/seed0 1/2", "start stage2/fitnet/seed1 0/2"]
    assert result.runs[0].workdir.student.read_bytes() == finished
    assert result.comparison is not None and len(result.comparison["methods"]) == 2


DIVERGING_FITNET = {"name": "fitnet", "params": {"weight": 1e30}}
"""Blows the student up at its first step: the loss is NaN at the second."""


def test_a_diverging_run_is_tabulated_as_failed_and_the_other_runs_finish(
    tmp_path: Path,
) -> None:
    recorder = Recorder()
    result = run_job(compare_spec(methods=["none", DIVERGING_FITNET]), tmp_path, recorder)

    assert [e for e in recorder.events if e.startswith(("start", "failed"))] == [
        "start stage2/none/seed0 0/2",
        "start stage2/none/seed1 0/2",
        "start stage2/fitnet/seed0 0/2",
        "failed stage2/fitnet/seed0",
        "start stage2/fitnet/seed1 0/2",
        "failed stage2/fitnet/seed1",
    ]
    assert recorder.reasons[0].startswith("training diverged at stage2/fitnet/seed0 step 2")
    # Only the finished students are results (and so registered by the worker).
    assert [(run.method.name, run.seed) for run in result.runs] == [("none", 0), ("none", 1)]
    assert [(f["method"], f["seed"], f["error"]) for f in result.failed] == [
        ("fitnet", 0, "TrainingDiverged"),
        ("fitnet", 1, "TrainingDiverged"),
    ]
    rundir = WorkDir(tmp_path).run("fitnet", 0)
    assert json.loads(rundir.failure.read_text()) == result.failed[0]
    assert not rundir.summary.exists() and not rundir.student.exists()

    table = json.loads((tmp_path / "comparison.json").read_text())
    assert table == result.comparison and table["failed_runs"] == 2
    none, fitnet = table["methods"]
    assert none["failed"] == [] and none["mean"] is not None
    assert (fitnet["mean"], fitnet["std"], fitnet["values"], fitnet["seeds"]) == (
        None,
        None,
        [],
        [],
    )
    assert [(f["seed"], f["reason"]) for f in fitnet["failed"]] == [
        (0, recorder.reasons[0]),
        (1, recorder.reasons[1]),
    ]
    assert not any(name.startswith("fitnet") for name in result.metrics)
    markdown = (tmp_path / "comparison.md").read_text()
    assert "| fitnet | failed | failed, failed |" in markdown
    assert f"- fitnet seed 0 failed: {recorder.reasons[0]}" in markdown


def test_a_rerun_retries_failed_runs_and_reuses_finished_ones(tmp_path: Path) -> None:
    run_job(compare_spec(methods=["none", DIVERGING_FITNET], seeds=[0]), tmp_path)
    finished = (tmp_path / "runs" / "none-seed0" / "student.pt").read_bytes()

    # The failure record does not mark the run finished: a rerun trains it again, and only it.
    again = Recorder()
    run_job(compare_spec(methods=["none", DIVERGING_FITNET], seeds=[0]), tmp_path, again)
    assert [e for e in again.events if e.startswith(("start", "failed"))] == [
        "start stage2/fitnet/seed0 0/2",
        "failed stage2/fitnet/seed0",
    ]

    # With a weight that trains, the retried run finishes and its failure record goes.
    fixed = Recorder()
    result = run_job(compare_spec(methods=["none", "fitnet"], seeds=[0]), tmp_path, fixed)
    assert [e for e in fixed.events if e.startswith(("start", "failed"))] == [
        "start stage2/fitnet/seed0 0/2"
    ]
    assert (tmp_path / "runs" / "none-seed0" / "student.pt").read_bytes() == finished
    assert not WorkDir(tmp_path).run("fitnet", 0).failure.exists()
    assert result.failed == [] and result.comparison is not None
    assert result.comparison["failed_runs"] == 0
    assert [row["mean"] is not None for row in result.comparison["methods"]] == [True, True]


def test_a_comparison_whose_every_run_failed_fails_naming_each_and_keeps_its_table(
    tmp_path: Path,
) -> None:
    with pytest.raises(ComparisonFailed) as failed:
        run_job(compare_spec(methods=[DIVERGING_FITNET]), tmp_path)
    assert [run for run, _ in failed.value.failures] == [
        "stage2/fitnet/seed0",
        "stage2/fitnet/seed1",
    ]
    message = str(failed.value)
    assert message.startswith("every comparison run failed. stage2/fitnet/seed0: training diverged")
    assert "stage2/fitnet/seed1: training diverged" in message
    table = json.loads((tmp_path / "comparison.json").read_text())
    assert table["failed_runs"] == 2 and table["methods"][0]["mean"] is None


def test_a_method_with_some_failed_seeds_averages_the_others_and_says_so() -> None:
    spec = compare_spec(methods=["none"], seeds=[0, 1, 2])

    def summary(seed: int, miou: float) -> dict[str, Any]:
        return {
            "method": "none",
            "seed": seed,
            "metrics": {"student_miou": miou},
            "seconds_per_step": {"stage2": 0.5},
        }

    failure = failure_record("none", 1, "stage2/none/seed1", RuntimeError("boom"))
    table = comparison_table(
        spec,
        JobPlan(num_classes=4, levels=[]),
        "miou",
        {"teacher_miou": 0.9},
        [summary(0, 0.4), summary(2, 0.6)],
        [failure],
    )
    (row,) = table["methods"]
    assert (row["seeds"], row["values"], row["mean"]) == ([0, 2], [0.4, 0.6], pytest.approx(0.5))
    assert row["failed"] == [{"seed": 1, "error": "RuntimeError", "reason": "boom"}]
    assert comparison_metrics(table)["none_miou_mean"] == pytest.approx(0.5)
    markdown = comparison_markdown(table)
    assert "| none | 0.5000 ± 0.1414 (2 of 3 seeds) | 0.4000, failed, 0.6000 |" in markdown
    assert markdown.endswith("- none seed 1 failed: boom\n")


def test_stages_are_typed_values_written_one_way() -> None:
    run = Stage.comparison_run("mgd", 12)
    assert (run.kind, run.method, run.seed, str(run)) == ("stage2", "mgd", 12, "stage2/mgd/seed12")
    assert run.is_comparison_run and not Stage("stage2").is_comparison_run
    assert str(Stage("stage1")) == "stage1"


def test_methods_inside_a_comparison_are_checked_through_the_registry() -> None:
    body = seg_spec()
    body["comparison"] = {"methods": ["maskd", "mgdd"], "seeds": [0]}
    err = refused(body)
    assert isinstance(err, UnknownNameError) and err.field == "comparison.methods[1].name"
    assert all(name in str(err) for name in ("amd", "fitnet", "maskd", "mgd", "none"))
    body["comparison"] = {"methods": [{"name": "mgd", "params": {"a": 1}}], "seeds": [0]}
    err = refused(body)
    assert err.field == "comparison.methods[0].params"
    assert "Allowed arguments: alpha, mask_ratio" in str(err)


def test_maskd_weight_stays_with_maskd_runs_and_other_methods_keep_their_own() -> None:
    body = seg_spec(stage2={"loss_weight": 0.1})
    body["comparison"] = {"methods": ["maskd", "mgd"], "seeds": [0]}
    spec = JobSpec.model_validate(body)
    maskd = spec.run_spec(spec.methods()[0], 3)
    assert maskd.stage2.method.params["loss_weight"] == 0.1
    mgd = spec.run_spec(spec.methods()[1], 3)
    assert (mgd.stage2.method.params, mgd.seed, mgd.comparison) == ({}, 3, None)


@pytest.mark.parametrize(
    ("comparison", "message"),
    [
        ({"methods": [], "seeds": [0]}, "at least 1"),
        ({"methods": ["fitnet"], "seeds": []}, "at least 1"),
        ({"methods": ["fitnet", {"name": "fitnet"}], "seeds": [0]}, "more than once"),
        ({"methods": ["fitnet"], "seeds": [1, 1]}, "distinct"),
    ],
)
def test_malformed_comparisons_are_refused_by_the_spec(
    comparison: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        JobSpec.model_validate({**seg_spec(), "comparison": comparison})


def test_a_comparison_takes_no_baseline(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="method 'none'"):
        run_job(compare_spec(), tmp_path, baseline=True)


def test_maskd_run_prints_the_table_of_a_comparison_spec(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = compare_spec(methods=["none", "fitnet"], seeds=[0])
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    assert main(["run", str(path), "--workdir", str(tmp_path / "work")]) == 0
    printed = capsys.readouterr().out
    assert (
        comparison_markdown(json.loads((tmp_path / "work" / "comparison.json").read_text()))
        in printed
    )
    assert main(["run", str(path), "--workdir", str(tmp_path / "work"), "--baseline"]) == 2
