"""How ``maskd jobs … --follow`` shows a running job, and the summary it ends with.

On a terminal: one progress bar per stage (tqdm), events and evaluation lines printed above the
bars. Piped into a file or another program: plain lines, a progress line every tenth of a
stage. With ``-o json``: one JSON object per line (``{"event": ..., "data": ...}``), the
final job last, and nothing else on stdout.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from tqdm import tqdm

from maskd_cli.api_session import ExitCode, print_json
from service.client import ApiError, Event, Job, MaskdClient, Progress, StreamItem

PLAIN_PROGRESS_STEPS = 10
"""Plain output prints a stage's progress each time it passes another tenth of the stage."""


class FollowView(Protocol):
    def show(self, item: StreamItem) -> None: ...

    def close(self) -> None: ...


def make_view(output: str, stream: Any = None) -> FollowView:
    """The view for ``-o`` ``output`` writing to ``stream`` (stdout by default)."""
    out = stream or sys.stdout
    if output == "json":
        return JsonView()
    if out.isatty():
        return TerminalView(out)
    return PlainView(out)


def describe_event(event: Event) -> str:
    change = f"{event.from_state or '-'} -> {event.to_state}  " if event.to_state else ""
    marker = "ERROR " if event.kind == "error" else ""
    return f"{event.created_at:%H:%M:%S}  {marker}{change}{event.message or ''}".rstrip()


def _metrics_text(metrics: Mapping[str, float]) -> str:
    return "  ".join(f"{name} {value:.4g}" for name, value in sorted(metrics.items()))


class JsonView:
    def show(self, item: StreamItem) -> None:
        kind = item.kind if isinstance(item, Event) else None
        event = kind or ("progress" if isinstance(item, Progress) else "end")
        print_json({"event": event, "data": item.model_dump(mode="json")})

    def close(self) -> None:
        """Nothing is held open."""


class PlainView:
    """Lines for logs: events as they come, each stage's progress every tenth."""

    def __init__(self, out: Any) -> None:
        self._out = out
        self._printed_tenth: dict[str, int] = {}

    def show(self, item: StreamItem) -> None:
        if isinstance(item, Event):
            self._line(describe_event(item))
        elif isinstance(item, Progress):
            for stage, progress in item.progress.items():
                tenth = progress.step * PLAIN_PROGRESS_STEPS // max(progress.total, 1)
                if self._printed_tenth.get(stage) == tenth:
                    continue
                self._printed_tenth[stage] = tenth
                line = f"{stage} step {progress.step}/{progress.total}"
                if stage == item.stage and item.metrics:
                    line += f"  {_metrics_text(item.metrics)}"
                self._line(line)

    def close(self) -> None:
        self._out.flush()

    def _line(self, text: str) -> None:
        print(text, file=self._out, flush=True)


class TerminalView:
    """A tqdm bar per stage. Stages run one after another, so one bar is live at a time: a
    finished stage's bar is closed at its last step and stays on screen above the next one."""

    def __init__(self, out: Any) -> None:
        self._out = out
        self._stage: str | None = None
        self._bar: Any = None

    def show(self, item: StreamItem) -> None:
        if isinstance(item, Event):
            tqdm.write(describe_event(item), file=self._out)
        elif isinstance(item, Progress) and item.stage in item.progress:
            if item.stage != self._stage:
                if self._bar is not None and self._stage is not None:
                    self._advance(item.progress[self._stage].step)
                    self._bar.close()
                self._stage = item.stage
                # initial: a job followed halfway through starts its bar where the stage is.
                self._bar = tqdm(
                    initial=item.progress[item.stage].step,
                    total=item.progress[item.stage].total,
                    desc=item.stage,
                    unit="step",
                    file=self._out,
                    dynamic_ncols=True,
                )
            self._advance(item.progress[item.stage].step)
            if item.metrics:
                self._bar.set_postfix_str(_metrics_text(item.metrics))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def _advance(self, step: int) -> None:
        self._bar.update(step - self._bar.n)


def follow_job(client: MaskdClient, job_id: str, output: str) -> Job:
    """Show the job's stream until it ends; the final job. A Ctrl-C goes to the caller."""
    view = make_view(output)
    try:
        for item in client.follow(job_id):
            view.show(item)
    finally:
        view.close()
    return client.get_job(job_id)


def print_summary(client: MaskdClient, job: Job) -> None:
    """The end of a followed job: state, metrics, comparison table, pairing, model and MLflow
    run."""
    print(f"job {job.id} ({job.name}) {job.state}")
    if job.state != "SUCCEEDED":
        reason = " ".join(part for part in (job.failure_kind, job.message) if part)
        if reason:
            print(f"  reason: {reason}")
    metrics = job.outputs.get("metrics") or job.metrics
    if metrics:
        print("  metrics:")
        for name, value in sorted(metrics.items()):
            print(f"    {name:<28} {value:.4f}")
    comparison = job.outputs.get("comparison")
    if comparison:
        for line in comparison_lines(comparison):
            print(f"  {line}")
    pairing = job.outputs.get("pairing")
    if pairing:
        for line in pairing_lines(pairing):
            print(f"  {line}")
    single = job.outputs.get("model")
    models = job.outputs.get("models") or ([single] if single else [])
    for model in models:
        label = f" ({model['method']}, seed {model['seed']})" if "method" in model else ""
        print(f"  registered model: {model['name']} version {model['version']}{label}")
    mlflow = job.outputs.get("mlflow")
    if mlflow:
        print(f"  MLflow run: {_run_link(client, models) or mlflow.get('run_id')}")


def _run_link(client: MaskdClient, models: Iterable[Mapping[str, Any]]) -> str | None:
    """The MLflow UI's address of the job's run, which the API gives with a model version
    (when the service tracks to an MLflow server rather than a database)."""
    for model in models:
        try:
            version = client.get_version(model["name"], str(model["version"]))
        except ApiError:
            return None
        if version.run_link:
            return version.run_link
    return None


def comparison_lines(table: Mapping[str, Any]) -> list[str]:
    """A comparison job's table as aligned text: each method's mean ± std over seeds."""
    primary = table.get("primary_metric", "metric")
    lines = [
        f"comparison ({primary}, {table.get('iterations')} steps, seeds {table.get('seeds')}, "
        f"teacher {_number(table.get('teacher'))}):",
        f"  {'method':<14} {'mean':>8} {'std':>8} {'s/step':>8}  failed",
    ]
    for row in table.get("methods", []):
        failed = ", ".join(f"seed {f['seed']}: {f['reason']}" for f in row.get("failed", []))
        lines.append(
            f"  {row['method']:<14} {_number(row.get('mean')):>8} {_number(row.get('std')):>8} "
            f"{_number(row.get('seconds_per_step')):>8}  {failed or '-'}"
        )
    return lines


def pairing_lines(pairing: Mapping[str, Any]) -> list[str]:
    """A job's ``outputs.pairing`` as aligned text: where each side's layers came from, then per
    level the teacher's layer and the student's distilled against it (channels, size, stride
    when known), the align and any resize; the aux heads last."""
    sources = ", ".join(f"{role} {source}" for role, source in pairing["layers_from"].items())
    rows = [("level", "teacher", "student", "align", "resize")]
    for level in pairing["levels"]:
        rows.append(
            (
                str(level["level"]),
                _tap(level["teacher_layer"], level["teacher"]),
                _tap(level["student_layer"], level["student"]),
                level["align"],
                level.get("resize") or "-",
            )
        )
    aux = pairing.get("aux")
    if aux:
        rows.append(
            (
                "aux",
                _tap(aux["layer"], aux["teacher"]),
                _tap(aux["layer"], aux["student"]),
                "-",
                "-",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = [f"pairing (layers: {sources}):"]
    for index, (level, teacher, student, align, resize) in enumerate(rows):
        arrow = "  " if index == 0 else "->"
        lines.append(
            f"  {level:<{widths[0]}}  {teacher:<{widths[1]}} {arrow} {student:<{widths[2]}}  "
            f"{align:<{widths[3]}}  {resize}"
        )
    return lines


def _tap(layer: str, side: Mapping[str, Any]) -> str:
    """One side of a level: ``backbone 64ch 8x8 stride 8`` (no stride for a layer the spec
    named, whose stride only its size tells)."""
    height, width = side["size"]
    stride = f" stride {side['stride']}" if side.get("stride") is not None else ""
    return f"{layer} {side['channels']}ch {height}x{width}{stride}"


def _number(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4f}"


def follow_to_end(client: MaskdClient, job_id: str, output: str) -> int:
    """``--follow``: the stream, then the summary (or the job as JSON); 0 only on SUCCEEDED.

    A Ctrl-C detaches: the job is the server's, so it goes on, and the message says how to
    pick it up again.
    """
    try:
        job = follow_job(client, job_id, output)
    except KeyboardInterrupt:
        print(
            f"detached; job {job_id} goes on — follow again with "
            f"`maskd jobs events {job_id} --follow`",
            file=sys.stderr,
        )
        return ExitCode.INTERRUPTED
    if output == "json":
        print_json({"event": "job", "data": job.model_dump(mode="json")})
    else:
        print_summary(client, job)
    return ExitCode.OK if job.state == "SUCCEEDED" else ExitCode.FAILED
