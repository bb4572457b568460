"""``maskd mlflow``: the MLflow tracking server, sized for a small machine and offline use.

Workers and the API log over HTTP to this one server instead of opening the MLflow database
each (SQLite locks and migration races under concurrent writers). The defaults that matter:

- one web worker and no job runner (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``): about
  500 MB instead of the default's 3 GB, ready in seconds;
- ``--serve-artifacts`` into ``<data_dir>/mlartifacts``, so clients upload through the server and
  artifacts never land in ``./mlartifacts`` of whatever directory it was started in;
- loopback unless told otherwise, and telemetry off.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def register(subparsers: Any) -> None:
    server = subparsers.add_parser(
        "mlflow", help="run the MLflow tracking server (runs, masks, model registry)"
    )
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    server.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    server.add_argument(
        "--backend-store-uri",
        help="database of runs and registered models (default: MASKD_MLFLOW_TRACKING_URI when "
        "that is a database URI, else sqlite:///<data_dir>/mlflow.db)",
    )
    server.add_argument(
        "--artifacts-destination",
        help="where served artifacts are stored (default: <data_dir>/mlartifacts)",
    )
    server.add_argument(
        "--allowed-hosts",
        help="comma-separated Host headers the server accepts; needed when clients reach it "
        "by a name other than localhost (e.g. 'mlflow:5000' in compose). Default: localhost "
        "only, or any host when binding a non-loopback address",
    )
    server.set_defaults(func=_mlflow)


def mlflow_server_command(
    backend_store_uri: str,
    artifacts_destination: str,
    host: str = "127.0.0.1",
    port: int = 5000,
    allowed_hosts: str | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of a lean ``mlflow server``; tests start it the same way."""
    argv = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--workers",
        "1",
        "--host",
        host,
        "--port",
        str(port),
        "--backend-store-uri",
        backend_store_uri,
        "--serve-artifacts",
        "--artifacts-destination",
        artifacts_destination,
    ]
    if allowed_hosts is None and host not in ("127.0.0.1", "localhost", "::1"):
        # Binding a public address means clients come by name; the operator chose exposure.
        allowed_hosts = "*"
    if allowed_hosts:
        argv += ["--allowed-hosts", allowed_hosts]
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }
    return argv, env


def _mlflow(args: argparse.Namespace) -> int:
    from service.config import get_settings

    settings = get_settings()
    data_dir = settings.data_dir.resolve()
    backend = args.backend_store_uri
    if backend is None:
        configured = settings.mlflow_tracking_uri
        is_server = configured.startswith(("http://", "https://"))
        backend = f"sqlite:///{data_dir / 'mlflow.db'}" if is_server else configured
    artifacts = args.artifacts_destination or str(settings.mlflow_artifacts_dir.resolve())
    data_dir.mkdir(parents=True, exist_ok=True)
    argv, env = mlflow_server_command(backend, artifacts, args.host, args.port, args.allowed_hosts)
    os.execve(argv[0], argv, env)
