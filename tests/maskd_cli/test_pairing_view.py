"""``maskd jobs`` shows a job's pairing as a table: from the submission's answer on (``submit``,
``get``), and in the summary a followed job ends with; over a real API server and database."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from maskd_cli import main
from maskd_cli.demo import start_api_thread
from maskd_cli.follow_view import pairing_lines, print_summary
from maskd_core.spec import JobSpec
from maskd_core.validate import validate_job
from service.client import Job, MaskdClient
from service.config import Settings
from service.store import JobStore

SPEC: dict[str, Any] = {
    "name": "zero-config",
    "task": "segmentation",
    "teacher": {"arch": "seg_tiny_teacher"},
    "student": {"arch": "seg_tiny_student"},
    "dataset": {"name": "procedural_shapes"},
    "stage1": {"iterations": 4},
    "stage2": {"iterations": 6},
    "batch_size": 2,
}
"""A spec without layers: the registry's default taps pair the two models' logits."""


def side(channels: int, size: int, stride: int | None) -> dict[str, Any]:
    return {"channels": channels, "size": [size, size], "stride": stride}


PAIRING: dict[str, Any] = {
    "layers_from": {"teacher": "registry defaults", "student": "spec"},
    "levels": [
        {
            "teacher_layer": "backbone",
            "student_layer": "features.3",
            "level": 0,
            "teacher": side(64, 8, 8),
            "student": side(32, 4, None),
            "align": "conv1x1 32->64",
            "resize": "bilinear 4x4->8x8",
        },
        {
            "teacher_layer": "backbone",
            "student_layer": "features.4",
            "level": 1,
            "teacher": side(64, 4, 16),
            "student": side(64, 4, None),
            "align": "identity",
            "resize": None,
        },
    ],
    "aux": {"layer": "aux_classifier", "teacher": side(5, 8, None), "student": side(5, 8, None)},
}


def test_the_pairing_table_lines_up_each_level_and_the_aux_heads() -> None:
    assert pairing_lines(PAIRING) == [
        "pairing (layers: teacher registry defaults, student spec):",
        "  level  teacher                        student                 align           resize",
        "  0      backbone 64ch 8x8 stride 8  -> features.3 32ch 4x4     conv1x1 32->64  "
        "bilinear 4x4->8x8",
        "  1      backbone 64ch 4x4 stride 16 -> features.4 64ch 4x4     identity        -",
        "  aux    aux_classifier 5ch 8x8      -> aux_classifier 5ch 8x8  -               -",
    ]


@pytest.fixture
def server(service_settings: Settings) -> Iterator[str]:
    with ExitStack() as stack:
        yield start_api_thread(stack, service_settings)


def run_cli(url: str, key: str, *args: str) -> int:
    return main(["jobs", "--url", url, "--api-key", key, "--retries", "1", *args])


def test_submit_and_get_print_the_pairing_of_a_queued_job(
    server: str, job_store: JobStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = job_store.create_api_key("acme")
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    table = pairing_lines(validate_job(JobSpec.model_validate(SPEC)).pairing())
    assert "pairing (layers: teacher registry defaults, student registry defaults):" in table
    assert any(line.startswith("  0      head 5ch") and " -> head 5ch" in line for line in table)

    assert run_cli(server, key, "submit", str(spec_file)) == 0
    submitted = capsys.readouterr().out.splitlines()
    job_id = submitted[0].split()[1]
    assert submitted == [f"job {job_id} QUEUED", *table]

    assert run_cli(server, key, "get", job_id) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[-len(table) :] == table
    assert run_cli(server, key, "get", job_id, "-o", "json") == 0
    assert "pairing (" not in capsys.readouterr().out, "JSON output stays JSON alone"


def test_a_followed_jobs_summary_ends_with_its_pairing(
    server: str, job_store: JobStore, capsys: pytest.CaptureFixture[str]
) -> None:
    job = Job.model_validate(
        {
            "id": "job-1",
            "name": "zero-config",
            "state": "CANCELLED",
            "created_at": datetime.now(UTC),
            "outputs": {"pairing": PAIRING},
        }
    )
    with MaskdClient.connect(server, job_store.create_api_key("acme")) as client:
        print_summary(client, job)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "job job-1 (zero-config) CANCELLED"
    assert out[1:] == [f"  {line}" for line in pairing_lines(PAIRING)]
