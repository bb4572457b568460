"""A job on two CPU processes (gloo) trains what one process trains, and survives losing one.

The models use GroupNorm and no dropout, so the student's step is a function of the global batch
alone: on two processes each takes half of it, DDP averages the gradients, and the result must
equal one process's to float rounding (1e-6 absolute on weights and losses).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from maskd_core.callbacks import Callback, Stage
from maskd_core.distributed import Ranks, ranks, run_in_processes
from maskd_core.errors import JobCancelled, RankLost
from maskd_core.runner import JobResult, run_job, run_teacher_job
from maskd_core.spec import JobSpec

pytestmark = pytest.mark.slow

TOLERANCE = 1e-6


def spec(processes: int | None, **overrides: Any) -> JobSpec:
    body: dict[str, Any] = {
        "teacher": {
            "arch": "seg_tiny_teacher",
            "args": {"base_channels": 8, "context_blocks": 1, "norm": "groupnorm", "dropout": 0},
            "layers": ["backbone", "head"],
        },
        "student": {
            "arch": "seg_tiny_student",
            "args": {"base_channels": 4, "norm": "groupnorm", "dropout": 0},
            "layers": ["backbone", "head"],
        },
        "dataset": {
            "name": "procedural_shapes",
            "args": {"num_samples": 12, "image_size": 32},
            "augment": False,
        },
        "stage1": {"iterations": 3},
        "stage2": {"iterations": 4, "optimizer": {"lr": 0.05, "momentum": 0.9}},
        "device": "cpu",
        "batch_size": 4,
        "checkpoint_every": 1,
        "resources": {} if processes is None else {"processes": processes},
        **overrides,
    }
    return JobSpec.model_validate(body)


class Losses(Callback):
    """Rank 0's reported losses by (stage, step); stops the job at ``stop_at`` of stage 2, or
    kills helper rank 1 there with ``kill_helper``."""

    def __init__(self, stop_at: int | None = None, kill_helper: bool = False) -> None:
        self.losses: dict[tuple[str, int], float] = {}
        self.stop_at = stop_at
        self.kill_helper = kill_helper
        self.step = 0
        self.stage = ""
        self.killed: int | None = None

    def on_step(self, stage: Stage, step: int, metrics: Any) -> None:
        self.losses[str(stage), step] = metrics["loss"]
        self.stage, self.step = str(stage), step

    def should_stop(self) -> bool:
        due = self.stop_at is not None and self.stage == "stage2" and self.step >= self.stop_at
        if due and self.kill_helper and self.killed is None:
            self.killed = helper_ranks()[0]
            os.kill(self.killed, signal.SIGKILL)
            return False
        return due and not self.kill_helper


def helper_ranks() -> list[int]:
    """The pids of this process's helper ranks (``maskd_core.distributed.helper_main``)."""
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").glob("*"):
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"helper_main" in cmdline:
                pids.append(int(child))
    return pids


def tensors(value: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a saved file (a state dict, or the tokens document), by its path."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return {}
    return {k: t for key, item in items for k, t in tensors(item, f"{prefix}/{key}").items()}


def assert_same_weights(left: Path, right: Path) -> None:
    a = tensors(torch.load(left, weights_only=True))
    b = tensors(torch.load(right, weights_only=True))
    assert a and a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), atol=TOLERANCE, rtol=0), name


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Losses]:
    workdir = tmp_path_factory.mktemp("one")
    losses = Losses()
    run_in_processes(run_job, spec(None), workdir, losses)
    return workdir, losses


def test_two_processes_train_the_same_tokens_and_student_as_one(
    one_process: tuple[Path, Losses], tmp_path: Path
) -> None:
    """Same global batch, same losses at every step of both stages, same weights after them:
    DDP's averaged gradient over two halves of the batch is the one process's gradient."""
    reference, reference_losses = one_process
    losses = Losses()
    result = run_in_processes(run_job, spec(2), tmp_path, losses)

    assert isinstance(result, JobResult)
    assert result.runs[0].summary["processes"] == 2
    assert losses.losses.keys() == reference_losses.losses.keys()
    for key, loss in losses.losses.items():
        assert loss == pytest.approx(reference_losses.losses[key], abs=TOLERANCE), key
    assert_same_weights(tmp_path / "tokens.pt", reference / "tokens.pt")
    assert_same_weights(tmp_path / "student.pt", reference / "student.pt")
    assert ranks() == Ranks(0, 1)  # the process group is gone with the job


def test_a_two_process_checkpoint_resumes_on_one_process(
    one_process: tuple[Path, Losses], tmp_path: Path
) -> None:
    """A job stopped at stage-2 step 2 on two processes finishes on one, with the student an
    uninterrupted run trains: the checkpoint does not depend on the number of processes."""
    reference, _ = one_process
    with pytest.raises(JobCancelled):
        run_in_processes(run_job, spec(2), tmp_path, Losses(stop_at=2))
    assert not (tmp_path / "student.pt").exists()

    resumed = Losses()
    run_in_processes(run_job, spec(None), tmp_path, resumed)

    assert min(step for stage, step in resumed.losses if stage == "stage2") == 3
    assert_same_weights(tmp_path / "student.pt", reference / "student.pt")


def test_a_killed_process_ends_the_attempt_and_the_job_resumes(
    one_process: tuple[Path, Losses], tmp_path: Path
) -> None:
    """SIGKILL on rank 1 mid-stage-2: rank 0 raises RankLost instead of hanging, its helpers
    are gone, and the next attempt resumes from the checkpoint to the same student."""
    reference, _ = one_process
    killer = Losses(stop_at=2, kill_helper=True)
    with pytest.raises(RankLost) as lost:
        run_in_processes(run_job, spec(2), tmp_path, killer, timeout_seconds=60)
    assert lost.value.rank == 1
    assert lost.value.exitcode == -signal.SIGKILL
    assert "signal 9" in str(lost.value)
    assert helper_ranks() == []

    run_in_processes(run_job, spec(2), tmp_path, Losses())

    assert_same_weights(tmp_path / "student.pt", reference / "student.pt")


def test_a_teacher_job_trains_on_two_processes_as_on_one(tmp_path: Path) -> None:
    recipe = {"teacher_training": {"iterations": 3, "optimizer": {"lr": 0.05}}}
    for name, processes in (("one", None), ("two", 2)):
        teacher_spec = spec(processes, kind="teacher", student=None, **recipe)
        run_in_processes(run_teacher_job, teacher_spec, tmp_path / name)
    assert_same_weights(tmp_path / "one" / "teacher.pt", tmp_path / "two" / "teacher.pt")


def test_a_comparison_on_two_processes_tabulates_every_run_on_rank_0(tmp_path: Path) -> None:
    """Only rank 0 evaluates, so only it builds the table; the job succeeds on attempt one."""
    comparison = {"comparison": {"methods": ["maskd", "fitnet"], "seeds": [0]}}
    result = run_in_processes(run_job, spec(2, **comparison), tmp_path, Losses())

    assert isinstance(result, JobResult) and result.comparison is not None
    assert [run.method.name for run in result.runs] == ["maskd", "fitnet"]
    assert (tmp_path / "comparison.json").is_file()
    assert helper_ranks() == []
