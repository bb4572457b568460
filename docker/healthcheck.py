#!/usr/bin/env python3
"""Container health checks for the maskd images, installed as ``maskd-healthcheck``.

The images are slim: no curl, no wget, no nc. This script uses the standard library only, starts
in a few milliseconds (it never imports maskd, torch or Celery) and exits 0 when healthy, 1 with
one line on stderr saying why not. Three checks:

``maskd-healthcheck http URL``
    GET the URL; healthy on a 2xx answer (the API's ``/readyz``, MLflow's and Flower's probes).
``maskd-healthcheck reach VAR [VAR ...]``
    Open a TCP connection to the host and port of the URL held by each environment variable
    (``MASKD_DATABASE_URL``, ``MASKD_BROKER_URL``, ...): the process can reach what it needs.
``maskd-healthcheck heartbeat PATH [--max-age SECONDS]``
    The file was touched within the last SECONDS: a process that touches it from its main loop
    is alive and not stuck.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from urllib.parse import urlsplit

DEFAULT_PORTS = {
    "http": 80,
    "https": 443,
    "postgresql": 5432,
    "postgres": 5432,
    "redis": 6379,
    "rediss": 6379,
    "amqp": 5672,
}
"""The port a URL without one means, by scheme (the part before any ``+driver``)."""


class UnhealthyError(Exception):
    """The reason the check failed, as one line an operator can act on."""


def check_http(url: str, timeout: float) -> str:
    request = urllib.request.Request(url, headers={"User-Agent": "maskd-healthcheck"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        raise UnhealthyError(f"{url} answered {error.code}: {_first_line(error)}") from error
    except (urllib.error.URLError, OSError) as error:
        raise UnhealthyError(f"{url} unreachable: {error}") from error
    if not 200 <= status < 300:
        raise UnhealthyError(f"{url} answered {status}")
    return f"{url} answered {status}"


def endpoint_of(url: str) -> tuple[str, int]:
    """Host and port of a database, broker or HTTP URL (``postgresql+psycopg://u:p@h:5432/db``)."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0].lower()
    if not parts.hostname:
        raise UnhealthyError(f"no host in the URL with scheme {parts.scheme!r}")
    try:
        port = parts.port
    except ValueError as error:
        raise UnhealthyError(f"bad port in the {parts.scheme!r} URL: {error}") from error
    if port is None:
        if scheme not in DEFAULT_PORTS:
            raise UnhealthyError(f"no port in the {parts.scheme!r} URL and no default for it")
        port = DEFAULT_PORTS[scheme]
    return parts.hostname, port


def check_reach(variables: Sequence[str], timeout: float) -> str:
    reached = []
    for name in variables:
        url = os.environ.get(name)
        if not url:
            raise UnhealthyError(f"{name} is not set")
        try:
            host, port = endpoint_of(url)
        except UnhealthyError as error:
            # Never echo the URL itself: it usually carries a password.
            raise UnhealthyError(f"{name}: {error}") from error
        try:
            with socket.create_connection((host, port), timeout=timeout):
                pass
        except OSError as error:
            raise UnhealthyError(f"{name}: {host}:{port} unreachable: {error}") from error
        reached.append(f"{name} ({host}:{port})")
    return "reached " + ", ".join(reached)


def check_heartbeat(path: str, max_age: float, now: float | None = None) -> str:
    try:
        touched = os.stat(path).st_mtime
    except FileNotFoundError as error:
        raise UnhealthyError(f"no heartbeat file {path}") from error
    age = (time.time() if now is None else now) - touched
    if age > max_age:
        raise UnhealthyError(f"heartbeat {path} is {age:.0f} s old (limit {max_age:.0f} s)")
    return f"heartbeat {age:.0f} s old"


def _first_line(error: urllib.error.HTTPError) -> str:
    try:
        body = error.read(300).decode("utf-8", "replace")
    except OSError:
        return error.reason or ""
    return body.strip().splitlines()[0] if body.strip() else str(error.reason)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskd-healthcheck", description=__doc__.split("\n")[0])
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per probe")
    checks = parser.add_subparsers(dest="check", required=True)
    http = checks.add_parser("http", help="GET a URL, healthy on 2xx")
    http.add_argument("url")
    reach = checks.add_parser("reach", help="TCP-connect to the URLs in these variables")
    reach.add_argument("variables", nargs="+", metavar="VAR")
    heartbeat = checks.add_parser("heartbeat", help="a file touched recently")
    heartbeat.add_argument("path")
    heartbeat.add_argument("--max-age", type=float, default=60.0, help="seconds (default 60)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.check == "http":
            message = check_http(args.url, args.timeout)
        elif args.check == "reach":
            message = check_reach(args.variables, args.timeout)
        else:
            message = check_heartbeat(args.path, args.max_age)
    except UnhealthyError as error:
        print(f"unhealthy: {error}", file=sys.stderr)
        return 1
    print(f"healthy: {message}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
