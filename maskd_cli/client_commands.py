"""``maskd jobs …``: submit and follow jobs on a running service, over its REST API.

These commands are thin wrappers over ``service.client.MaskdClient``, so what a script does with
the Python client and what a person does on the command line are the same calls. The server
and key come from ``--url``/``--api-key`` or ``MASKD_URL``/``MASKD_API_KEY``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.client import MaskdClient

DEFAULT_URL = "http://127.0.0.1:8000"


def register(subparsers: Any) -> None:
    jobs = subparsers.add_parser("jobs", help="submit, inspect and cancel jobs on a service")
    jobs.add_argument("--url", default=os.environ.get("MASKD_URL", DEFAULT_URL))
    jobs.add_argument("--api-key", default=os.environ.get("MASKD_API_KEY"))
    commands = jobs.add_subparsers(dest="jobs_command", required=True, metavar="COMMAND")

    submit = commands.add_parser("submit", help="submit a job spec (YAML or JSON)")
    submit.add_argument("spec", type=Path)
    submit.add_argument("--idempotency-key", help="retry-safe: the same key returns the same job")
    submit.add_argument("--follow", action="store_true", help="stream events until it ends")
    submit.set_defaults(func=_submit)

    get = commands.add_parser("get", help="a job's state, progress, metrics and history")
    get.add_argument("job_id")
    get.set_defaults(func=_get)

    listing = commands.add_parser("list", help="this project's jobs, newest first")
    listing.add_argument("--state", action="append", help="filter by state (repeatable)")
    listing.add_argument("--name")
    listing.add_argument("--limit", type=int, default=20)
    listing.set_defaults(func=_list)

    cancel = commands.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("job_id")
    cancel.set_defaults(func=_cancel)

    events = commands.add_parser("events", help="a job's events; --follow streams them live")
    events.add_argument("job_id")
    events.add_argument("--follow", action="store_true")
    events.set_defaults(func=_events)


def _connect(args: argparse.Namespace) -> MaskdClient:
    from service.client import MaskdClient

    if not args.api_key:
        raise SystemExit(
            "maskd jobs: no API key; pass --api-key or set MASKD_API_KEY "
            "(an operator creates one with `maskd admin create-key --project NAME`)"
        )
    return MaskdClient.connect(args.url, args.api_key)


def _call(args: argparse.Namespace, action: Any) -> int:
    """Run ``action(client)``, turning API errors into a message and exit status 1."""
    from service.client import ApiError

    with _connect(args) as client:
        try:
            result: int = action(client)
        except ApiError as error:
            print(f"maskd jobs: {error}", file=sys.stderr)
            return 1
    return result


def _submit(args: argparse.Namespace) -> int:
    from maskd_cli.spec_files import SpecFileError, read_spec_file

    try:
        body = read_spec_file(args.spec)
    except SpecFileError as error:
        print(f"maskd jobs: {error}", file=sys.stderr)
        return 2

    def submit(client: MaskdClient) -> int:
        job = client.submit_job(body, idempotency_key=args.idempotency_key)
        print(f"job {job['id']} {job['state']}")
        return _follow(client, job["id"]) if args.follow else 0

    return _call(args, submit)


def _get(args: argparse.Namespace) -> int:
    def get(client: MaskdClient) -> int:
        print(json.dumps(client.get_job(args.job_id), indent=2, default=str))
        return 0

    return _call(args, get)


def _list(args: argparse.Namespace) -> int:
    def listing(client: MaskdClient) -> int:
        page = client.list_jobs(states=args.state, name=args.name, limit=args.limit)
        for job in page["data"]:
            print(f"{job['id']}  {job['state']:<12} {job['created_at']}  {job['name']}")
        if page.get("next_cursor"):
            print("(more: use the API's cursor to page on)")
        return 0

    return _call(args, listing)


def _cancel(args: argparse.Namespace) -> int:
    def cancel(client: MaskdClient) -> int:
        job = client.cancel_job(args.job_id)
        print(f"job {job['id']} {job['state']}")
        return 0

    return _call(args, cancel)


def _events(args: argparse.Namespace) -> int:
    def events(client: MaskdClient) -> int:
        if args.follow:
            return _follow(client, args.job_id)
        for event in client.list_events(args.job_id):
            print(_describe_event(event))
        return 0

    return _call(args, events)


def _describe_event(event: dict[str, Any]) -> str:
    change = f"{event['from_state']} -> {event['to_state']}  " if event.get("to_state") else ""
    return f"{event['created_at']}  {change}{event.get('message') or ''}"


def _follow(client: MaskdClient, job_id: str) -> int:
    """Print events and progress until the job ends; exit 0 only if it SUCCEEDED."""
    for kind, data in client.stream_events(job_id):
        if kind == "progress":
            print(f"  progress {json.dumps(data.get('progress'), default=str)}")
        elif kind != "end":
            print(f"  {_describe_event(data)}")
    job = client.get_job(job_id)
    print(f"job {job_id} {job['state']}")
    return 0 if job["state"] == "SUCCEEDED" else 1
