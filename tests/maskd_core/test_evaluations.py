"""The frozen teacher's evaluations are stored in the work directory and read back on resume,
only under the key of the teacher, data and tokens they were computed for."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from maskd_core.callbacks import Callback, Stage
from maskd_core.errors import JobCancelled
from maskd_core.evaluations import evaluation_key, load_evaluation, save_evaluation
from maskd_core.runner import run_job
from maskd_core.spec import JobSpec
from maskd_core.workdir import WorkDir

VERSIONS = {"maskd": "1", "torch": "2"}
NOT_A_MIOU = 2.0
"""A value no evaluation yields (mIoU is at most 1): seen in a report, it was read back."""


def tiny_spec(**overrides: Any) -> JobSpec:
    data: dict[str, Any] = {
        "teacher": {
            "arch": "seg_tiny_teacher",
            "args": {"base_channels": 4, "context_blocks": 0},
            "layers": ["head"],
        },
        "student": {"arch": "seg_tiny_student", "args": {"base_channels": 4}, "layers": ["head"]},
        "dataset": {"name": "procedural_shapes", "args": {"num_samples": 12, "image_size": 16}},
        "stage1": {"iterations": 2, "tokens": 2},
        "stage2": {"iterations": 4},
        "device": "cpu",
        "batch_size": 2,
        "checkpoint_every": 2,
    }
    return JobSpec.model_validate(data | overrides)


class Reports(Callback):
    """Records evaluations and stops stage 2 at ``stop_at`` when given."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.evaluations: list[tuple[str, dict[str, float]]] = []
        self.stop_at = stop_at
        self.stage2_step = 0

    def on_eval(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
        self.evaluations.append((str(stage), dict(metrics)))

    def on_step(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
        if stage.kind == "stage2":
            self.stage2_step = step

    def should_stop(self) -> bool:
        return self.stop_at is not None and self.stage2_step >= self.stop_at


def teacher_reports(reports: Reports) -> dict[str, float]:
    return {
        name: value
        for _, metrics in reports.evaluations
        for name, value in metrics.items()
        if name.startswith(("teacher_", "masked_teacher_"))
    }


def test_a_resumed_job_reads_the_teacher_evaluations_back_instead_of_evaluating_again(
    tmp_path: Path,
) -> None:
    spec, workdir = tiny_spec(), WorkDir(tmp_path)
    first = Reports(stop_at=2)
    with pytest.raises(JobCancelled):
        run_job(spec, tmp_path, first)
    computed = teacher_reports(first)
    assert {"teacher_miou", "masked_teacher_miou"} <= set(computed)
    assert all(0.0 <= value <= 1.0 for value in computed.values())
    for name in ("teacher", "masked_teacher"):
        stored = json.loads(workdir.evaluation(name).read_text())
        assert stored["metrics"] == {k: v for k, v in computed.items() if k.startswith(name)}
        stored["metrics"] = dict.fromkeys(stored["metrics"], NOT_A_MIOU)
        workdir.evaluation(name).write_text(json.dumps(stored))

    resumed = Reports()
    result = run_job(spec, tmp_path, resumed)

    assert teacher_reports(resumed) == dict.fromkeys(computed, NOT_A_MIOU)
    assert result.metrics["teacher_miou"] == result.metrics["masked_teacher_miou"] == NOT_A_MIOU


def test_an_evaluation_is_stored_for_the_teacher_weights_content_and_the_tokens(
    tmp_path: Path,
) -> None:
    weights, same_weights, other_weights = (tmp_path / n for n in ("a.pt", "copy.pt", "b.pt"))
    weights.write_bytes(b"teacher A")
    same_weights.write_bytes(b"teacher A")
    other_weights.write_bytes(b"teacher B")
    tokens, other_tokens = tmp_path / "tokens.pt", tmp_path / "other-tokens.pt"
    tokens.write_bytes(b"tokens 1")
    other_tokens.write_bytes(b"tokens 2")

    def key(weights_file: Path, *, device: str = "cpu", tokens: Path | None = None) -> str:
        teacher = {
            "arch": "seg_tiny_teacher",
            "layers": ["head"],
            "weights": str(weights_file),
        }
        return evaluation_key(
            tiny_spec(teacher=teacher), device=device, versions=VERSIONS, tokens=tokens
        )

    path, metrics = tmp_path / "evaluations" / "teacher.json", {"teacher_miou": 0.5}
    save_evaluation(path, key(weights), metrics)

    assert load_evaluation(path, key(weights)) == metrics
    assert load_evaluation(path, key(same_weights)) == metrics, "keyed by the weights' path"
    for other in (
        key(other_weights),
        key(weights, device="cuda"),
        key(weights, tokens=tokens),
        evaluation_key(tiny_spec(max_eval_batches=1), device="cpu", versions=VERSIONS),
        evaluation_key(tiny_spec(), device="cpu", versions=VERSIONS | {"torch": "3"}),
    ):
        assert load_evaluation(path, other) is None
    assert key(weights, tokens=tokens) != key(weights, tokens=other_tokens)
    # Settings the teacher never sees share the key: a resumed job keeps its evaluation.
    base = evaluation_key(tiny_spec(), device="cpu", versions=VERSIONS)
    assert base == evaluation_key(
        tiny_spec(name="renamed", stage2={"iterations": 9}, num_workers=2),
        device="cpu",
        versions=VERSIONS,
    )

    path.write_text('{"format": "maskd-evaluation/1", "key": ')  # a torn write, say
    assert load_evaluation(path, key(weights)) is None
