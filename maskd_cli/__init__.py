"""The ``maskd`` command line: one entry point over the core library and the service.

Each command group lives in its own module exposing ``register(subparsers)``; heavy imports
(torch, the API, Celery) happen inside the command functions, so ``maskd --help`` is instant
and a command never loads what it does not use.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from maskd_cli import client_commands, core_commands, mlflow_command, service_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskd", description="MasKD distillation: core library and job service"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    core_commands.register(subparsers)
    service_commands.register(subparsers)
    mlflow_command.register(subparsers)
    client_commands.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
