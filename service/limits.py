"""What one job may ask of the service: the operator's limits, applied at submission.

The job spec (``maskd_core.spec``) keeps only structural bounds, the ones no deployment could
lift (integers within 64 bits, finite numbers). How much a job may consume is this service's
policy instead: a spec asking for 10^12 steps, a batch of a billion images, 10^5 data-loading
processes or 10^6-pixel images is valid in form but would tie up a worker (or exhaust the API
during its dry run), so the API refuses it with a 422 naming the field and the setting that
allows more. Every limit is a ``Settings`` field (``MASKD_MAX_*``) an operator can raise.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pydantic import JsonValue

from maskd_core.spec import JobSpec
from service.config import Settings

IMAGE_SIZE_ARGS = ("min_size", "max_size", "image_size")
"""Model and dataset arguments that set an image side in pixels: the detectors' own resize
(``maskd_core.models.detection``) and the datasets' ``image_size`` (``maskd_core.data``), an
int or a [height, width] pair. Memory and time grow with their square."""


@dataclass(frozen=True)
class LimitExceeded:
    """One value over a limit: where it is in the spec and what to do about it."""

    loc: tuple[str | int, ...]
    message: str


def limits_exceeded(spec: JobSpec, settings: Settings) -> list[LimitExceeded]:
    """Every value of ``spec`` above this service's limits (empty when it fits)."""
    return list(_exceeded(spec, settings))


def _exceeded(spec: JobSpec, settings: Settings) -> Iterator[LimitExceeded]:
    def over(loc: tuple[str | int, ...], value: float, limit: int, setting: str) -> LimitExceeded:
        field = ".".join(str(part) for part in loc)
        return LimitExceeded(
            loc,
            f"{field} is {value}, above this service's limit of {limit}; ask for at most "
            f"{limit} (the operator can raise it with MASKD_{setting.upper()})",
        )

    steps = [("stage1", spec.stage1.iterations), ("stage2", spec.stage2.iterations)]
    if spec.teacher_training is not None:
        steps.append(("teacher_training", spec.teacher_training.iterations))
    for stage, iterations in steps:
        if iterations > settings.max_iterations:
            yield over((stage, "iterations"), iterations, settings.max_iterations, "max_iterations")
    if spec.batch_size > settings.max_batch_size:
        yield over(("batch_size",), spec.batch_size, settings.max_batch_size, "max_batch_size")
    if spec.num_workers > settings.max_num_workers:
        yield over(("num_workers",), spec.num_workers, settings.max_num_workers, "max_num_workers")
    if spec.comparison is not None:
        runs = len(spec.comparison.methods) * len(spec.comparison.seeds)
        if runs > settings.max_comparison_runs:
            yield LimitExceeded(
                ("comparison",),
                f"comparison trains {runs} students (methods × seeds), above this service's "
                f"limit of {settings.max_comparison_runs}; compare fewer methods or seeds (the "
                "operator can raise it with MASKD_MAX_COMPARISON_RUNS)",
            )
    gpus, processes = spec.resources.gpus, spec.resources.processes
    if gpus is not None and gpus > settings.max_job_gpus:
        yield LimitExceeded(
            ("resources", "gpus"),
            f"resources.gpus is {gpus}, above the {settings.max_job_gpus} GPU(s) of the largest "
            f"worker host this service offers; ask for at most {settings.max_job_gpus} (the "
            "operator raises it with MASKD_MAX_JOB_GPUS once a host with more GPUs runs "
            "`maskd worker --gpus N`)",
        )
    if processes is not None and processes > settings.max_cpu_processes:
        yield over(
            ("resources", "processes"), processes, settings.max_cpu_processes, "max_cpu_processes"
        )
    sections = [(("teacher", "args"), spec.teacher.args), (("dataset", "args"), spec.dataset.args)]
    if spec.student is not None:
        sections.append((("student", "args"), spec.student.args))
    for where, args in sections:
        for name in IMAGE_SIZE_ARGS:
            for loc, side in _sides((*where, name), args.get(name)):
                if side > settings.max_image_size:
                    yield over(loc, side, settings.max_image_size, "max_image_size")


def _sides(
    loc: tuple[str | int, ...], value: JsonValue
) -> Iterator[tuple[tuple[str | int, ...], float]]:
    """The numbers of a size argument (a number or a list of them), by location: a float too,
    which the argument's model would take as an int (1e9). Anything else is left to that model,
    which the dry run reports."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        yield loc, value
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if isinstance(item, int | float) and not isinstance(item, bool):
                yield (*loc, index), item
