"""``maskd jobs estimate`` and ``maskd jobs submit --estimate`` against a real API server
(uvicorn on loopback) and database."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml
from service_testkit import spec_body

from maskd_cli import main
from maskd_cli.client_commands import estimate_table
from maskd_cli.demo import start_api_thread
from service.client import JobEstimate
from service.config import Settings
from service.store import JobStore

pytestmark = pytest.mark.slow  # each estimate measures a few real training steps


@pytest.fixture
def server(service_settings: Settings) -> Iterator[str]:
    with ExitStack() as stack:
        yield start_api_thread(stack, service_settings)


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec_body()))
    return path


def run_cli(url: str, key: str, *args: str) -> int:
    return main(["jobs", "--url", url, "--api-key", key, "--retries", "1", *args])


def test_estimate_prints_a_table_and_queues_nothing(
    server: str, job_store: JobStore, spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = job_store.create_api_key("acme")

    assert run_cli(server, key, "estimate", str(spec_file)) == 0
    table = capsys.readouterr().out
    assert run_cli(server, key, "estimate", str(spec_file), "-o", "json") == 0
    estimate = JobEstimate.model_validate(json.loads(capsys.readouterr().out))

    lines = table.splitlines()
    assert lines[0].split() == ["model", "arch", "params", "GFLOPs/image"]
    assert lines[1].split()[:3] == ["teacher", "seg_tiny_teacher", f"{1395621:,}"]
    assert [line.split()[0] for line in lines[4:8]] == ["stage", "stage1", "stage2", "total"]
    assert [line.split()[1] for line in lines[5:7]] == ["4", "6"]
    assert "measured on" in table
    assert [stage.iterations for stage in estimate.stages] == [4, 6]
    project = job_store.create_project("acme")
    assert job_store.list_jobs(project.id) == ([], None)


def test_submit_with_estimate_records_it_on_the_job(
    server: str, job_store: JobStore, spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = job_store.create_api_key("acme")

    assert run_cli(server, key, "submit", str(spec_file), "--estimate", "-o", "json") == 0
    job = json.loads(capsys.readouterr().out)

    assert [stage["stage"] for stage in job["outputs"]["estimate"]["stages"]] == [
        "stage1",
        "stage2",
    ]


def test_the_table_reads_hours_minutes_and_seconds() -> None:
    stage = {
        "iterations": 40000,
        "batch_per_process": 8,
        "seconds_per_step": 0.25,
        "flops_per_step": 3 * 10**12,
        "peak_memory_bytes": 6 * 2**30,
        "evaluation_passes": 1,
        "evaluation_seconds": 60.0,
        "seconds": 10060.0,
    }
    estimate = JobEstimate.model_validate(
        {
            "format": "maskd-estimate/1",
            "measured_on": {
                "device": "cuda",
                "device_name": "NVIDIA H100",
                "target_device": "cuda",
                "representative": True,
                "note": "",
            },
            "measured_steps": 2,
            "world_size": 1,
            "memory_method": "cuda_max_memory_allocated",
            "teacher": {"arch": "t", "parameters": 10, "forward_flops_per_image": 10**9},
            "student": None,
            "stages": [
                {**stage, "stage": "stage2"},
                {**stage, "stage": "stage1", "seconds": 185.0, "iterations": 500},
            ],
            "total_seconds": 10245.0,
        }
    )
    rows = {line.split()[0]: line.split() for line in estimate_table(estimate).splitlines() if line}
    assert rows["stage2"][-1] == "2h47m" and rows["stage2"][-3] == "6144.0"
    assert rows["stage1"][-1] == "3m05s"
    assert rows["total"][-1] == "2h50m"
    assert "note:" not in estimate_table(estimate)
