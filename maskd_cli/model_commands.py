"""``maskd models …``: the project's registered students, over the API's ``/v1/models``.

List the models and their versions, download a version's weights or a student's deployable
export (``--format onnx``/``torch_export``, with its parity and latency report), with its
lineage beside them, and move an alias such as ``champion`` to promote a version. Same
options, output modes and exit statuses as ``maskd jobs`` (``maskd_cli.api_session``).
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
    from service.client import MaskdClient

EXPORT_SUFFIXES = {
    "onnx": (".onnx", "run with onnxruntime.InferenceSession(path)"),
    "torch_export": (".pt2", "load with torch.export.load(path).module()"),
}
"""Each export format's file suffix and how to run what it holds."""
DOWNLOAD_FORMATS = ("weights", *EXPORT_SUFFIXES)


def register(subparsers: Any) -> None:
    commands, output = add_api_command_group(
        subparsers, "models", help="registered models: list, download, promote"
    )

    listing = commands.add_parser("list", parents=output, help="this project's models")
    listing.set_defaults(func=_list)

    versions = commands.add_parser(
        "versions", parents=output, help="a model's versions, newest first"
    )
    versions.add_argument("name")
    versions.set_defaults(func=_versions)

    download = commands.add_parser(
        "download",
        parents=output,
        help="a version's weights (a state dict) or export, and its details (JSON), into a "
        "directory",
    )
    download.add_argument("name")
    download.add_argument("version", help="a number, or an alias written @champion")
    download.add_argument("--dir", type=Path, default=Path("."), help="default: here")
    download.add_argument(
        "--format",
        choices=DOWNLOAD_FORMATS,
        default="weights",
        help="weights (default: the PyTorch state dict), onnx (run with onnxruntime) or "
        "torch_export (a .pt2 for torch.export.load); an export comes with its report "
        "(parity with the PyTorch student, latencies)",
    )
    download.set_defaults(func=_download)

    alias = commands.add_parser(
        "alias", parents=output, help="point an alias (e.g. champion) at a version"
    )
    alias.add_argument("name")
    alias.add_argument("alias")
    alias.add_argument("version", help="the version number")
    alias.set_defaults(func=_alias)


def _list(args: argparse.Namespace) -> int:
    def listing(client: MaskdClient) -> int:
        models = client.list_models()
        if args.output == "json":
            print_json({"data": [model.model_dump(mode="json") for model in models]})
            return ExitCode.OK
        for model in models:
            aliases = ", ".join(f"@{alias}={number}" for alias, number in model.aliases.items())
            print(f"{model.name}  {aliases or '(no aliases)'}")
        return ExitCode.OK

    return run_with_client(args, listing)


def _versions(args: argparse.Namespace) -> int:
    def versions(client: MaskdClient) -> int:
        found = client.list_versions(args.name)
        if args.output == "json":
            print_json({"data": [version.model_dump(mode="json") for version in found]})
            return ExitCode.OK
        for version in found:
            aliases = " ".join(f"@{alias}" for alias in version.aliases)
            created = f"{version.created_at:%Y-%m-%d %H:%M}" if version.created_at else "-"
            job = version.tags.get("maskd.job_id", "-")
            print(f"{version.version:>4}  {created}  job {job}  {aliases}".rstrip())
        return ExitCode.OK

    return run_with_client(args, versions)


def _download(args: argparse.Namespace) -> int:
    if not args.dir.is_dir():
        return fail(args, f"--dir {args.dir} is not a directory; create it first", ExitCode.USAGE)

    def download(client: MaskdClient) -> int:
        # The number first, so the files are named after the version an alias pointed at.
        version = client.get_version(args.name, args.version)
        stem = f"{version.name}-v{version.version}"
        if args.format != "weights":
            return _download_export(args, client, version.name, version.version, stem)
        weights = client.download_weights(version.name, version.version, args.dir / f"{stem}.pt")
        details = args.dir / f"{stem}.json"
        details.write_text(json.dumps(version.model_dump(mode="json"), indent=2) + "\n")
        if args.output == "json":
            print_json({"weights": str(weights), "details": str(details)})
        else:
            print(f"{weights}  (load with torch.load(path, weights_only=True))")
            print(f"{details}  (lineage tags, metrics and run of version {version.version})")
        return ExitCode.OK

    return run_with_client(args, download)


def _download_export(
    args: argparse.Namespace, client: MaskdClient, name: str, version: str, stem: str
) -> int:
    """The export of ``--format`` and its report beside it."""
    suffix, how = EXPORT_SUFFIXES[args.format]
    exported = client.download_export(name, version, args.format, args.dir / f"{stem}{suffix}")
    report = args.dir / f"{stem}.export.json"
    report.write_text(json.dumps(client.get_export_report(name, version), indent=2) + "\n")
    if args.output == "json":
        print_json({args.format: str(exported), "report": str(report)})
    else:
        print(f"{exported}  ({how})")
        print(f"{report}  (what its outputs contain, parity with the PyTorch student, latency)")
    return ExitCode.OK


def _alias(args: argparse.Namespace) -> int:
    def alias(client: MaskdClient) -> int:
        moved = client.set_alias(args.name, args.alias, args.version)
        if args.output == "json":
            print_json(moved.model_dump(mode="json"))
        else:
            print(f"{moved.name} @{args.alias} -> version {moved.version}")
        return ExitCode.OK

    return run_with_client(args, alias)
