"""A comparison job's table: per stage-2 method, the student's primary metric over seeds.

Built from the runs' ``summary.json`` documents alone, so a comparison resumed after a crash
tabulates finished runs it read back exactly like the ones it just trained.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from maskd_core.methods import METHODS
from maskd_core.spec import JobSpec, MethodSpec

TABLE_FORMAT = "maskd-comparison/1"


def effective_params(method: MethodSpec) -> dict[str, Any]:
    """The method's params with its registry defaults spelled out."""
    params = METHODS.parse_args(method.name, method.params, field="comparison.methods")
    return params.model_dump(mode="json")


def comparison_table(
    spec: JobSpec,
    primary: str,
    teacher_metrics: Mapping[str, float],
    summaries: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """Mean and sample std over seeds of each method's student, and its speed.

    The std is the sample standard deviation (0 with one seed). Seconds per step are averaged
    over the runs that measured them: a run resumed at its last step measured nothing.
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
        rows.append(
            {
                "method": method.name,
                "params": effective_params(method),
                "seeds": [summary["seed"] for summary in mine],
                "values": values,
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "seconds_per_step": statistics.fmean(speeds) if speeds else None,
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
    }


def comparison_metrics(table: Mapping[str, Any]) -> dict[str, float]:
    """The table as flat metrics (``fitnet_miou_mean``, ``fitnet_miou_std``, ``teacher_miou``),
    the shape MLflow's compare view and the job's metrics take."""
    primary = table["primary_metric"]
    metrics = {f"teacher_{primary}": float(table["teacher"])}
    for row in table["methods"]:
        metrics[f"{row['method']}_{primary}_mean"] = float(row["mean"])
        metrics[f"{row['method']}_{primary}_std"] = float(row["std"])
        if row["seconds_per_step"] is not None:
            metrics[f"{row['method']}_seconds_per_step"] = float(row["seconds_per_step"])
    return metrics


def comparison_markdown(table: Mapping[str, Any]) -> str:
    """The table as markdown, for the CLI, MLflow's artifact view and the bench."""
    primary = table["primary_metric"]
    lines = [
        f"{table['job']}: student {primary} after {table['iterations']} steps, mean ± std over "
        f"seeds {', '.join(str(s) for s in table['seeds'])}",
        "",
        f"| method | {primary} | per seed | s/step | params |",
        "|---|---|---|---|---|",
        f"| teacher | {table['teacher']:.4f} | | | |",
    ]
    for row in table["methods"]:
        speed = row["seconds_per_step"]
        lines.append(
            f"| {row['method']} | {row['mean']:.4f} ± {row['std']:.4f} | "
            f"{', '.join(f'{v:.4f}' for v in row['values'])} | "
            f"{'' if speed is None else f'{speed:.4f}'} | "
            f"{json.dumps(row['params'], sort_keys=True)} |"
        )
    return "\n".join(lines) + "\n"
