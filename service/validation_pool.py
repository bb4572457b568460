"""Spec validation in a pool of processes, so submissions neither queue behind each other nor
stall the API's reads.

Validating a spec is a CPU dry run of both models (``maskd_core.validate.validate_job``): tens
of milliseconds for the tiny models, seconds for a detector. Done in the API process, a burst of
submissions ran one after another on one core and every read waited behind them. So each API
process validates in a small pool of processes (``Settings.validation_processes``) that import
torch once, when the API starts; the API process itself never imports torch. Each pool process
keeps ``maskd_core.model_probe``'s shapes, so a repeated pairing is validated in milliseconds.

The pool is bounded: with ``Settings.validation_queue_limit`` submissions already waiting, the
next one gets ``ValidationBusy`` (the API answers 503 with ``Retry-After``), rather than a queue
that grows until clients time out. A pool process that dies (out of memory, killed) costs the
submissions it held a 503 and is replaced.

``validation_processes: 0`` validates in the API process instead (in a thread), for a small
embedded deployment that would rather not hold more copies of torch, and for tests that patch
the core in-process.

The processes are spawned, not forked: the API process has threads and open connections that a
fork would copy half-way. As with uvicorn's own ``--workers``, a spawned process imports the
``__main__`` module again, so a script that builds and serves the app itself must keep that under
``if __name__ == "__main__":`` (``maskd serve`` and ``uvicorn --factory`` do). Pools are shared
by every app of a process with the same settings (tests build many apps), and stopped when the
process exits.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any, TypeVar

import anyio

from maskd_core.errors import SpecError
from maskd_core.spec import JobSpec
from service.config import Settings

BUSY_RETRY_AFTER_SECONDS = 2
"""A validation takes milliseconds to seconds, so a full queue drains in seconds."""


class ValidationBusy(Exception):  # noqa: N818 - reads as the condition it reports
    """Too many submissions are waiting for validation; retry after ``retry_after`` seconds."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.retry_after = BUSY_RETRY_AFTER_SECONDS


@dataclass(frozen=True)
class SpecProblem:
    """A ``SpecError`` as it crosses back from a pool process: its message and field."""

    message: str
    field: str | None


@dataclass(frozen=True)
class Validated:
    """A valid spec, with what its dry run learned that the job shows from submission on: its
    pairing (``JobPlan.pairing``), None for a teacher job, which pairs no levels. The plan is
    made anyway, so this costs its serialising alone."""

    pairing: dict[str, Any] | None


_Answer = TypeVar("_Answer")


def _import_validation() -> None:
    """Each pool process's initializer: torch and the registries, before any spec arrives."""
    import maskd_core.validate  # noqa: F401


def _ready() -> None:
    """A no-op task; submitting one per process makes the pool start them all at once."""


def _validate(
    spec: JobSpec, resolved: JobSpec, project: str, settings: Settings
) -> Validated | SpecProblem:
    """In a pool process: the input policy on the submitted spec, then the dry run of the one
    whose ``models:/`` weights are local files."""
    from maskd_core.validate import validate_job
    from service.inputs import check_input_paths

    try:
        check_input_paths(spec, project, settings)
        plan = validate_job(resolved)
    except SpecError as error:
        return SpecProblem(str(error), error.field)
    return Validated(plan.pairing() if plan.levels else None)


def _estimate(
    spec: JobSpec, resolved: JobSpec, project: str, settings: Settings
) -> dict[str, Any] | SpecProblem:
    """In a pool process: the input policy, then ``maskd_core.estimate.estimate_job`` (which
    validates as ``_validate`` does before it measures, and times its default, capped, number
    of steps). The estimate as its dict, or the spec's problem."""
    from maskd_core.estimate import estimate_job
    from service.inputs import check_input_paths

    try:
        check_input_paths(spec, project, settings)
        return estimate_job(resolved).to_dict()
    except SpecError as error:
        return SpecProblem(str(error), error.field)


class ValidationPool:
    """``Settings.validation_processes`` spawned processes and the count of waiting submissions."""

    def __init__(self, processes: int, queue_limit: int) -> None:
        self._processes = processes
        self._queue_limit = queue_limit
        self._lock = threading.Lock()
        self._waiting = 0
        self._executor = self._start()

    def _start(self) -> ProcessPoolExecutor | None:
        if self._processes == 0:
            return None
        executor = ProcessPoolExecutor(
            self._processes, mp_context=get_context("spawn"), initializer=_import_validation
        )
        for _ in range(self._processes):
            executor.submit(_ready)
        return executor

    async def validate(
        self, spec: JobSpec, resolved: JobSpec, project: str, settings: Settings
    ) -> Validated | SpecProblem:
        """Validate in a pool process; raises ``ValidationBusy`` when the queue is full or the
        process holding this submission died."""
        return await self._run(_validate, spec, resolved, project, settings)

    async def estimate(
        self, spec: JobSpec, resolved: JobSpec, project: str, settings: Settings
    ) -> dict[str, Any] | SpecProblem:
        """Validate and estimate (``maskd_core.estimate``) in a pool process, within the same
        queue limit as validations: an estimate is a dry run with a few steps more."""
        return await self._run(_estimate, spec, resolved, project, settings)

    async def _run(self, work: Callable[..., _Answer], *args: Any) -> _Answer:
        with self._lock:
            if self._waiting >= self._queue_limit:
                raise ValidationBusy(
                    f"{self._waiting} submissions are waiting for validation in this API "
                    f"process (MASKD_VALIDATION_QUEUE_LIMIT); retry in "
                    f"{BUSY_RETRY_AFTER_SECONDS} s"
                )
            self._waiting += 1
            executor = self._executor
        try:
            if executor is None:
                return await anyio.to_thread.run_sync(work, *args)
            future = executor.submit(work, *args)
            return await asyncio.wrap_future(future)
        except BrokenProcessPool as error:
            assert executor is not None
            self._replace(executor)
            raise ValidationBusy(
                "the process validating this submission stopped; submit it again"
            ) from error
        finally:
            with self._lock:
                self._waiting -= 1

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._executor is broken:
                self._executor = self._start()
        broken.shutdown(wait=False, cancel_futures=True)

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)


_shared: dict[tuple[int, int], ValidationPool] = {}
_shared_lock = threading.Lock()


def shared_validation_pool(settings: Settings) -> ValidationPool:
    """This process's pool for ``settings``, started on first use."""
    key = (settings.validation_processes, settings.validation_queue_limit)
    with _shared_lock:
        pool = _shared.get(key)
        if pool is None:
            pool = ValidationPool(*key)
            _shared[key] = pool
        return pool
