"""``maskd worker --gpus``: the queues, concurrency and GPU count a worker runs with."""

from __future__ import annotations

import pytest

from maskd_cli import build_parser, main
from maskd_cli.service_commands import WorkerPlan, worker_plan


def plan(*flags: str) -> WorkerPlan:
    return worker_plan(build_parser().parse_args(["worker", *flags]))


def test_a_gpu_count_implies_the_queues_and_one_job_per_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert plan("--gpus", "4") == WorkerPlan(gpus=4, concurrency=4, queues="gpu,gpu2,gpu3,gpu4")
    assert plan("--gpus", "1") == WorkerPlan(gpus=1, concurrency=1, queues="gpu")
    assert plan("--gpus", "0") == WorkerPlan(gpus=0, concurrency=1, queues="gpu")


def test_queues_and_concurrency_flags_override_what_the_gpus_imply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert plan("--gpus", "8", "--queues", "gpu8", "--concurrency", "1") == WorkerPlan(
        gpus=8, concurrency=1, queues="gpu8"
    )


def test_without_the_flag_the_visible_gpus_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert plan() == WorkerPlan(gpus=2, concurrency=2, queues="gpu,gpu2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # none visible: a CPU worker
    assert plan() == WorkerPlan(gpus=0, concurrency=1, queues="gpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,-1,1")  # CUDA stops at the first invalid
    assert plan().gpus == 1


def test_more_gpus_than_visible_is_refused_before_the_worker_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert main(["worker", "--gpus", "2"]) == 2
    assert "--gpus 2 but CUDA_VISIBLE_DEVICES shows 1 GPU(s)" in capsys.readouterr().err


@pytest.mark.parametrize("count", ["-1", "two", "65"])
def test_a_gpu_count_is_a_whole_number_within_the_largest_job(
    count: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--gpus", count])
    assert "is not a GPU count" in capsys.readouterr().err
