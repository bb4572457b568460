"""`maskd models list|versions|download|alias` against a real API server and a real MLflow
registry holding a student registered the way a worker registers it."""

from __future__ import annotations

import os

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import json
import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from registry_testkit import register_a_student

from maskd_cli import main
from maskd_cli.api_session import ExitCode
from maskd_cli.demo import start_api_thread
from service.config import Settings
from service.store import JobStore

pytestmark = pytest.mark.slow
torch.set_num_threads(1)


@pytest.fixture
def server(service_settings: Settings) -> Iterator[str]:
    with ExitStack() as stack:
        yield start_api_thread(stack, service_settings)


def test_models_commands_list_download_and_promote(
    server: str,
    service_settings: Settings,
    job_store: JobStore,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    version, weights = register_a_student(service_settings.mlflow_tracking_uri, tmp_path)
    key = job_store.create_api_key("acme")
    other_key = job_store.create_api_key("globex")

    def models(*args: str, key: str = key) -> int:
        return main(["models", "--url", server, "--api-key", key, *args])

    assert models("list", "-o", "json") == 0
    listed = json.loads(capsys.readouterr().out)["data"]
    assert [(m["name"], m["aliases"]) for m in listed] == [(version.name, {"candidate": "1"})]
    assert models("versions", version.name) == 0
    assert re.match(r"\s+1  \S+ \S+  job job-acme", capsys.readouterr().out)

    assert models("alias", version.name, "champion", version.version, "-o", "json") == 0
    assert "champion" in json.loads(capsys.readouterr().out)["aliases"]
    assert models("list") == 0
    assert f"{version.name}  @candidate=1, @champion=1" in capsys.readouterr().out

    target = tmp_path / "downloads"
    target.mkdir()
    assert models("download", version.name, "@champion", "--dir", str(target), "-o", "json") == 0
    files = json.loads(capsys.readouterr().out)
    assert Path(files["weights"]) == target / f"{version.name}-v1.pt"
    state = torch.load(files["weights"], weights_only=True)
    assert set(state) == set(torch.load(weights, weights_only=True))
    details = json.loads(Path(files["details"]).read_text())
    assert details["tags"]["maskd.job_id"] == "job-acme" and "champion" in details["aliases"]
    assert sorted(p.name for p in target.iterdir()) == [
        f"{version.name}-v1.json",
        f"{version.name}-v1.pt",
    ], "no partial file is left behind"

    # Another project sees nothing of acme's: not found, in one line.
    assert models("versions", version.name, key=other_key) == ExitCode.NOT_FOUND
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "maskd models:" in captured.err
    download = ("download", version.name, "1", "--dir", str(target))
    assert models(*download, key=other_key) == ExitCode.NOT_FOUND
    assert "no model 'acme.seg-small-student' in project 'globex'" in capsys.readouterr().err
