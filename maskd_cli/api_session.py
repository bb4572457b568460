"""What every command over the REST API (``maskd jobs``, ``maskd models``) shares: the server,
key and output options, one-line errors and the exit status each kind of error gets.

A person reads one line that says what went wrong and what to do; a script reads the exit
status (``ExitCode``, listed in the README) and, with ``-o json``, JSON alone on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from enum import IntEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.client import MaskdClient

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_RETRIES = 3


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    """The job ended FAILED or CANCELLED, or the server refused the request (409, 422, ...)."""
    USAGE = 2
    """Bad arguments or an unreadable spec file (argparse's own status for bad arguments)."""
    AUTH = 3
    """No API key, or the server does not accept it (401/403)."""
    NOT_FOUND = 4
    """No such job or model in this project (404)."""
    UNREACHABLE = 5
    """The server cannot be reached or keeps failing (5xx) after the retries."""
    INTERRUPTED = 130
    """Ctrl-C (128 + SIGINT, as shells report it)."""


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    """``--url``, ``--api-key`` and ``--retries`` of a command group (before its command)."""
    parser.add_argument(
        "--url",
        default=os.environ.get("MASKD_URL", DEFAULT_URL),
        help="the API's address (default: $MASKD_URL or %(default)s)",
    )
    parser.add_argument(
        "--api-key", default=os.environ.get("MASKD_API_KEY"), help="default: $MASKD_API_KEY"
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=DEFAULT_RETRIES,
        help="retries of a request that fails on the way (server restarting, 502/503/504, 429)",
    )


def add_api_command_group(
    subparsers: Any, name: str, help: str
) -> tuple[Any, list[argparse.ArgumentParser]]:
    """The ``maskd NAME COMMAND`` group of commands over the API, with the connection options
    (``add_connection_options``); returns its subparsers, to add the commands to, and the
    parents every command takes (``-o``)."""
    group = subparsers.add_parser(name, help=help)
    add_connection_options(group)
    commands = group.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")
    return commands, [output_options()]


def output_options() -> argparse.ArgumentParser:
    """The ``-o`` option every command takes, as a parent parser."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "-o",
        "--output",
        choices=("text", "json"),
        default="text",
        help="json: machine-readable JSON only on stdout (one object per line when following)",
    )
    return parent


def print_json(value: Any) -> None:
    print(json.dumps(value, default=str), flush=True)


def fail(args: argparse.Namespace, message: str, code: ExitCode) -> int:
    """One line on stderr, whatever the output mode; the status for the caller to return."""
    one_line = " ".join(message.split())
    print(f"maskd {args.command}: {one_line}", file=sys.stderr)
    return code


def run_with_client(args: argparse.Namespace, action: Callable[[MaskdClient], int]) -> int:
    """Run ``action(client)``; every client error becomes one line and its exit status."""
    from service.client import (
        ApiError,
        MaskdClient,
        RetryPolicy,
        ServerUnreachableError,
    )

    if not args.api_key:
        return fail(
            args,
            "no API key; pass --api-key or set MASKD_API_KEY (an operator creates one with "
            "`maskd admin create-key --project NAME`)",
            ExitCode.AUTH,
        )
    if args.retries < 0:
        return fail(args, f"--retries must be 0 or more, not {args.retries}", ExitCode.USAGE)
    retry = RetryPolicy(attempts=args.retries + 1)
    try:
        with MaskdClient.connect(args.url, args.api_key, retry=retry) as client:
            return action(client)
    except ServerUnreachableError as error:
        return fail(
            args,
            f"{error}; is the server running at that address? (set --url or MASKD_URL)",
            ExitCode.UNREACHABLE,
        )
    except ApiError as error:
        return fail(args, str(error), _exit_code_of(error.status_code))
    except KeyboardInterrupt:
        return fail(args, "interrupted", ExitCode.INTERRUPTED)


def _exit_code_of(status_code: int) -> ExitCode:
    if status_code in (401, 403):
        return ExitCode.AUTH
    if status_code == 404:
        return ExitCode.NOT_FOUND
    if status_code >= 500:
        return ExitCode.UNREACHABLE
    return ExitCode.FAILED
