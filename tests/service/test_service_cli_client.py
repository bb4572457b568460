"""`maskd jobs …` against a real API server (uvicorn on loopback) and a real database."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml
from service_testkit import spec_body

from maskd_cli import main
from maskd_cli.demo import start_api_thread
from service.config import Settings
from service.lifecycle import JobState
from service.store import JobStore


@pytest.fixture
def server(service_settings: Settings) -> Iterator[str]:
    with ExitStack() as stack:
        yield start_api_thread(stack, service_settings)


def run_cli(url: str, key: str, *args: str) -> int:
    return main(["jobs", "--url", url, "--api-key", key, *args])


def test_submit_list_get_cancel_through_the_cli(
    server: str, job_store: JobStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = job_store.create_api_key("acme")
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(spec_body("from-cli")))

    assert run_cli(server, key, "submit", str(spec_file), "--idempotency-key", "k1") == 0
    job_id = capsys.readouterr().out.split()[1]
    assert run_cli(server, key, "submit", str(spec_file), "--idempotency-key", "k1") == 0
    assert capsys.readouterr().out.split()[1] == job_id

    assert run_cli(server, key, "list") == 0
    assert job_id in capsys.readouterr().out
    assert run_cli(server, key, "cancel", job_id) == 0
    assert JobState.CANCELLED.value in capsys.readouterr().out
    assert run_cli(server, key, "get", job_id) == 0
    assert '"state": "CANCELLED"' in capsys.readouterr().out
    assert run_cli(server, key, "events", job_id) == 0
    assert "QUEUED -> CANCELLED" in capsys.readouterr().out


def test_cli_errors_say_what_to_fix(
    server: str, job_store: JobStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = job_store.create_api_key("acme")
    other_key = job_store.create_api_key("globex")
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(spec_body(stage1={"tokens": 0})))
    assert run_cli(server, key, "submit", str(spec_file)) == 1
    assert "tokens" in capsys.readouterr().err

    spec_file.write_text(yaml.safe_dump(spec_body()))
    assert run_cli(server, key, "submit", str(spec_file)) == 0
    job_id = capsys.readouterr().out.split()[1]
    assert run_cli(server, other_key, "get", job_id) == 1
    assert "not found" in capsys.readouterr().err
    assert run_cli(server, "mk_wrong_key", "list") == 1
    assert "create-key" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="MASKD_API_KEY"):
        main(["jobs", "--url", server, "list"])
