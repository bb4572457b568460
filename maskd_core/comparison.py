"""A comparison job's table: per stage-2 method, the student's primary metric over seeds.

Built from the runs' ``summary.json`` documents alone, so a comparison resumed after a crash
tabulates finished runs it read back exactly like the ones it just trained. A run that failed on
its own (``RunError``: a diverged loss, say) has a failure record instead (``failure_record``);
its method's row lists it under ``failed`` with the reason and averages the seeds that finished,
so one bad (method, seed) costs one cell of the table rather than the table.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from maskd_core.methods import effective_params, method_setup
from maskd_core.plan import JobPlan
from maskd_core.spec import JobSpec

TABLE_FORMAT = "maskd-comparison/2"
"""Version 2 added the failed runs: ``failed`` per row, and ``mean``/``std`` null for a method
with no finished run."""
FAILURE_FORMAT = "maskd-run-failure/1"


def failure_record(method: str, seed: int, stage: str, error: Exception) -> dict[str, Any]:
    """What a failed run's ``failure.json`` holds: which run, the error's class and message."""
    return {
        "format": FAILURE_FORMAT,
        "method": method,
        "seed": seed,
        "stage": stage,
        "error": type(error).__name__,
        "reason": str(error),
    }


def comparison_table(
    spec: JobSpec,
    plan: JobPlan,
    primary: str,
    teacher_metrics: Mapping[str, float],
    summaries: Sequence[Mapping[str, Any]],
    failures: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Mean and sample std over seeds of each method's student, its speed and its params (with
    the defaults it ran with, a weight the taps in ``plan`` chose included).

    The std is the sample standard deviation (0 with one seed). Seconds per step are averaged
    over the runs that measured them: a run resumed at its last step measured nothing. Failed
    runs (``failures``, ``failure_record`` documents) are listed in their method's row and left
    out of its mean, which is null when none of its seeds finished.
    """
    if spec.comparison is None:
        raise ValueError("a comparison table needs a spec with a comparison section")
    rows = []
    for method in spec.comparison.methods:
        mine = [summary for summary in summaries if summary["method"] == method.name]
        values = [float(summary["metrics"][f"student_{primary}"]) for summary in mine]
        speeds = [
            float(speed)
            for summary in mine
            if (speed := summary["seconds_per_step"]["stage2"]) is not None
        ]
        failed = [
            {"seed": failure["seed"], "error": failure["error"], "reason": failure["reason"]}
            for failure in failures
            if failure["method"] == method.name
        ]
        rows.append(
            {
                "method": method.name,
                "params": effective_params(method_setup(spec, plan, method, None)),
                "seeds": [summary["seed"] for summary in mine],
                "values": values,
                "mean": statistics.fmean(values) if values else None,
                "std": (statistics.stdev(values) if len(values) > 1 else 0.0) if values else None,
                "seconds_per_step": statistics.fmean(speeds) if speeds else None,
                "failed": failed,
            }
        )
    return {
        "format": TABLE_FORMAT,
        "job": spec.name,
        "task": spec.task,
        "primary_metric": primary,
        "teacher": teacher_metrics[f"teacher_{primary}"],
        "masked_teacher": teacher_metrics.get(f"masked_teacher_{primary}"),
        "iterations": spec.stage2.iterations,
        "seeds": list(spec.comparison.seeds),
        "methods": rows,
        "failed_runs": len(failures),
    }


def comparison_metrics(table: Mapping[str, Any]) -> dict[str, float]:
    """The table as flat metrics (``fitnet_miou_mean``, ``fitnet_miou_std``, ``teacher_miou``),
    the shape MLflow's compare view and the job's metrics take. A method whose every seed
    failed has no metrics: its row in the table says why."""
    primary = table["primary_metric"]
    metrics = {f"teacher_{primary}": float(table["teacher"])}
    for row in table["methods"]:
        if row["mean"] is None:
            continue
        metrics[f"{row['method']}_{primary}_mean"] = float(row["mean"])
        metrics[f"{row['method']}_{primary}_std"] = float(row["std"])
        if row["seconds_per_step"] is not None:
            metrics[f"{row['method']}_seconds_per_step"] = float(row["seconds_per_step"])
    return metrics


def comparison_markdown(table: Mapping[str, Any]) -> str:
    """The table as markdown, for the CLI, MLflow's artifact view and the bench.

    A failed run reads "failed" in its seed's place, a mean over fewer seeds than the table's
    says over how many, and the reasons follow the table, one line per failed run.
    """
    primary = table["primary_metric"]
    lines = [
        f"{table['job']}: student {primary} after {table['iterations']} steps, mean ± std over "
        f"seeds {', '.join(str(s) for s in table['seeds'])}",
        "",
        f"| method | {primary} | per seed | s/step | params |",
        "|---|---|---|---|---|",
        f"| teacher | {table['teacher']:.4f} | | | |",
    ]
    reasons = []
    for row in table["methods"]:
        failed = row["failed"]
        by_seed = dict(zip(row["seeds"], row["values"], strict=True))
        per_seed = [f"{by_seed[s]:.4f}" if s in by_seed else "failed" for s in table["seeds"]]
        if row["mean"] is None:
            summary = "failed"
        else:
            summary = f"{row['mean']:.4f} ± {row['std']:.4f}"
            if failed:
                summary += f" ({len(row['values'])} of {len(table['seeds'])} seeds)"
        speed = row["seconds_per_step"]
        lines.append(
            f"| {row['method']} | {summary} | {', '.join(per_seed)} | "
            f"{'' if speed is None else f'{speed:.4f}'} | "
            f"{json.dumps(row['params'], sort_keys=True)} |"
        )
        reasons += [f"- {row['method']} seed {f['seed']} failed: {f['reason']}" for f in failed]
    if reasons:
        lines += ["", "Failed runs (a rerun of the job retries them):", *reasons]
    return "\n".join(lines) + "\n"
