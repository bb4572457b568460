"""The ``maskd`` command line: one entry point over the core library and the service.

Each command group lives in its own module exposing ``register(subparsers)``; heavy imports
(torch, the API, Celery) happen inside the command functions, so ``maskd --help`` is instant
and a command never loads what it does not use.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from maskd_cli import (
    client_commands,
    core_commands,
    mlflow_command,
    model_commands,
    service_commands,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskd", description="MasKD distillation: core library and job service"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    core_commands.register(subparsers)
    service_commands.register(subparsers)
    mlflow_command.register(subparsers)
    client_commands.register(subparsers)
    model_commands.register(subparsers)
    return parser


EXTRA_OF_MODULE = {
    **dict.fromkeys(("torch", "torchvision", "numpy", "PIL"), "core"),
    **dict.fromkeys(
        (
            "fastapi",
            "uvicorn",
            "pydantic_settings",
            "sqlalchemy",
            "alembic",
            "psycopg",
            "celery",
            "kombu",
            "redis",
            "mlflow",
            "prometheus_client",
        ),
        "service",
    ),
    "pycocotools": "detection",
}
"""The extra that brings each third-party package a command may need: the bare package is the
API client, ``maskd jobs`` and ``maskd models`` only."""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except ModuleNotFoundError as error:
        extra = EXTRA_OF_MODULE.get((error.name or "").partition(".")[0])
        if extra is None:
            raise
        print(
            f"maskd {args.command}: this installation lacks {error.name!r}; install the role "
            f"that brings it: pip install 'maskd[{extra}]' (or 'maskd[worker]' for everything)",
            file=sys.stderr,
        )
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
