"""``maskd jobs …``: submit and follow jobs on a running service, over its REST API.

These commands are thin wrappers over ``service.client.MaskdClient``, so what a script does with
the Python client and what a person does on the command line are the same calls. The server
and key come from ``--url``/``--api-key`` or ``MASKD_URL``/``MASKD_API_KEY``; every command
takes ``-o json`` for scripts, and errors are one line with a documented exit status
(``maskd_cli.api_session``). The client and the views are imported inside the commands, so
``maskd --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maskd_cli.api_session import (
    ExitCode,
    add_api_command_group,
    fail,
    print_json,
    run_with_client,
)

if TYPE_CHECKING:
    from service.client import Job, JobEstimate, MaskdClient


def register(subparsers: Any) -> None:
    commands, output = add_api_command_group(
        subparsers, "jobs", help="submit, inspect and cancel jobs on a service"
    )

    submit = commands.add_parser("submit", parents=output, help="submit a job spec (YAML/JSON)")
    submit.add_argument("spec", type=Path)
    submit.add_argument(
        "--idempotency-key",
        help="retry-safe: the same key returns the same job (one is made up when not given)",
    )
    submit.add_argument(
        "--follow", action="store_true", help="show its progress until it ends, then a summary"
    )
    submit.add_argument(
        "--estimate",
        action="store_true",
        help="measure its cost first and record the estimate on the job, where the worker "
        "compares it with the actual times (a few training steps at submission)",
    )
    submit.set_defaults(func=_submit)

    estimate = commands.add_parser(
        "estimate",
        parents=output,
        help="what a job spec would cost (params, FLOPs, memory, ETA); nothing is queued",
    )
    estimate.add_argument("spec", type=Path)
    estimate.set_defaults(func=_estimate)

    get = commands.add_parser(
        "get", parents=output, help="a job's state, progress, metrics and history"
    )
    get.add_argument("job_id")
    get.set_defaults(func=_get)

    listing = commands.add_parser("list", parents=output, help="this project's jobs, newest first")
    listing.add_argument("--state", action="append", help="filter by state (repeatable)")
    listing.add_argument("--name", help="only jobs with exactly this name")
    listing.add_argument(
        "--label",
        action="append",
        type=_label,
        metavar="KEY=VALUE",
        help="only jobs with this label (repeatable: every one must match)",
    )
    listing.add_argument("--limit", type=int, default=20, help="page size (1 to 100)")
    listing.add_argument("--cursor", help="the page after the one that printed this cursor")
    listing.add_argument("--all", action="store_true", help="every page, not just one")
    listing.set_defaults(func=_list)

    cancel = commands.add_parser("cancel", parents=output, help="cancel a queued or running job")
    cancel.add_argument("job_id")
    cancel.set_defaults(func=_cancel)

    events = commands.add_parser(
        "events", parents=output, help="a job's events; --follow shows them live"
    )
    events.add_argument("job_id")
    events.add_argument(
        "--follow", action="store_true", help="progress bars and events until it ends"
    )
    events.set_defaults(func=_events)


def _submit(args: argparse.Namespace) -> int:
    from maskd_cli.spec_files import SpecFileError, read_spec_file

    try:
        body = read_spec_file(args.spec)
    except SpecFileError as error:
        return fail(args, str(error), ExitCode.USAGE)

    def submit(client: MaskdClient) -> int:
        from maskd_cli.follow_view import follow_to_end

        job = client.submit_job(body, idempotency_key=args.idempotency_key, estimate=args.estimate)
        if args.output == "json":
            print_json({"event": "job", "data": _json(job)} if args.follow else _json(job))
        else:
            print(f"job {job.id} {job.state}", flush=True)
            _print_pairing(job)
        return follow_to_end(client, job.id, args.output) if args.follow else ExitCode.OK

    return run_with_client(args, submit)


def _estimate(args: argparse.Namespace) -> int:
    from maskd_cli.spec_files import SpecFileError, read_spec_file

    try:
        body = read_spec_file(args.spec)
    except SpecFileError as error:
        return fail(args, str(error), ExitCode.USAGE)

    def estimate(client: MaskdClient) -> int:
        answer = client.estimate_job(body)
        if args.output == "json":
            print_json(answer.model_dump(mode="json"))
        else:
            print(estimate_table(answer))
        return ExitCode.OK

    return run_with_client(args, estimate)


def estimate_table(estimate: JobEstimate) -> str:
    """The estimate for a terminal: the models, one row per training loop, the total and
    where it was measured."""
    lines = [
        f"{'model':<8} {'arch':<28} {'params':>12} {'GFLOPs/image':>13}",
    ]
    for role, cost in (("teacher", estimate.teacher), ("student", estimate.student)):
        if cost is not None:
            lines.append(
                f"{role:<8} {cost.arch:<28} {cost.parameters:>12,} "
                f"{cost.forward_flops_per_image / 1e9:>13.3f}"
            )
    lines += [
        "",
        f"{'stage':<24} {'steps':>8} {'batch':>6} {'s/step':>9} {'GFLOPs/step':>12} "
        f"{'peak MiB':>9} {'eval s':>8} {'ETA':>10}",
    ]
    for stage in estimate.stages:
        lines.append(
            f"{stage.stage:<24} {stage.iterations:>8} {stage.batch_per_process:>6} "
            f"{stage.seconds_per_step:>9.4f} {stage.flops_per_step / 1e9:>12.3f} "
            f"{stage.peak_memory_bytes / 2**20:>9.1f} {stage.evaluation_seconds:>8.1f} "
            f"{_duration(stage.seconds):>10}"
        )
    lines += [
        f"{'total':<24} {'':>8} {'':>6} {'':>9} {'':>12} {'':>9} {'':>8} "
        f"{_duration(estimate.total_seconds):>10}",
        "",
        f"measured on {estimate.measured_on.device} ({estimate.measured_on.device_name}), "
        f"{estimate.measured_steps} timed steps per stage, {estimate.world_size} process(es); "
        f"memory: {estimate.memory_method}",
    ]
    if not estimate.measured_on.representative:
        lines.append(f"note: {estimate.measured_on.note}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``4.2s``: an ETA as people read one."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _get(args: argparse.Namespace) -> int:
    def get(client: MaskdClient) -> int:
        job = client.get_job(args.job_id)
        # The whole job, in text mode too: it is already the readable form of a job; its
        # pairing, a table of every level, reads better as one below it.
        if args.output == "json":
            print_json(_json(job))
        else:
            print(json.dumps(_json(job), indent=2))
            _print_pairing(job)
        return ExitCode.OK

    return run_with_client(args, get)


def _list(args: argparse.Namespace) -> int:
    def listing(client: MaskdClient) -> int:
        filters = {"states": args.state, "name": args.name, "labels": dict(args.label or ())}
        if args.all:
            jobs = list(client.iter_jobs(**filters, page_size=args.limit))
            next_cursor = None
        else:
            page = client.list_jobs(**filters, limit=args.limit, cursor=args.cursor)
            jobs, next_cursor = page.data, page.next_cursor
        if args.output == "json":
            print_json({"data": [_json(job) for job in jobs], "next_cursor": next_cursor})
            return ExitCode.OK
        for job in jobs:
            print(f"{job.id}  {job.state:<12} {job.created_at:%Y-%m-%d %H:%M:%S}  {job.name}")
        if next_cursor:
            print(f"more: maskd jobs list --cursor {next_cursor} (or --all)")
        return ExitCode.OK

    return run_with_client(args, listing)


def _cancel(args: argparse.Namespace) -> int:
    def cancel(client: MaskdClient) -> int:
        job = client.cancel_job(args.job_id)
        if args.output == "json":
            print_json(_json(job))
        else:
            print(f"job {job.id} {job.state}")
        return ExitCode.OK

    return run_with_client(args, cancel)


def _events(args: argparse.Namespace) -> int:
    def events(client: MaskdClient) -> int:
        from maskd_cli.follow_view import describe_event, follow_to_end

        if args.follow:
            return follow_to_end(client, args.job_id, args.output)
        history = client.list_events(args.job_id)
        if args.output == "json":
            print_json({"data": [event.model_dump(mode="json") for event in history]})
        else:
            for event in history:
                print(describe_event(event))
        return ExitCode.OK

    return run_with_client(args, events)


def _label(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: write a label as KEY=VALUE, e.g. team=vision")
    return key, value


def _print_pairing(job: Job) -> None:
    """The job's pairing as a table, when it has one: from submission on (the dry run planned
    it), so a user sees what will be distilled before the job runs."""
    from maskd_cli.follow_view import pairing_lines

    pairing = job.outputs.get("pairing")
    if pairing:
        print("\n".join(pairing_lines(pairing)), flush=True)


def _json(job: Job) -> dict[str, Any]:
    return job.model_dump(mode="json")
