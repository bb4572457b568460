"""One job over several processes with torch.distributed: the launcher and what ranks share.

A job with ``resources: {gpus: N}`` (NCCL) or ``{processes: N}`` (gloo, CPU) trains with N
processes, one per GPU, in data parallel (``DistributedDataParallel`` in ``maskd_core.stages``).
``run_in_processes`` starts them: the calling process is rank 0 and keeps the job's callbacks
(the worker's lease, database reports and MLflow run stay where they are); ranks 1..N-1 are
Python processes of their own that meet rank 0 at torch.distributed's ``TCPStore`` rendezvous
on a free local port (``init_process_group``): one job runs on one host's devices.

Every rank runs the same ``run_job`` (or ``run_teacher_job``); the code asks ``ranks()`` where
it must differ:

- rank 0 alone evaluates, writes files (checkpoints, tokens, the student, summaries) and
  reports through callbacks; the others' callbacks are empty and their evaluations skipped;
- each rank takes its share of every global batch (``maskd_core.loader``), so the global batch,
  the loss and a checkpoint mean the same at any N, and a checkpoint written at N processes
  resumes at M;
- decisions read from files (is stage 1 done? is this student finished?) are rank 0's,
  broadcast (``agree``), and a stop (cancel, lease lost) is agreed each step (``any_rank``).

A rank that dies does not hang the job: collectives time out after ``timeout_seconds``, rank 0
polls its helpers every step, and a lost helper ends the attempt with ``RankLost``, which the
worker hands to the lease/resume path. Helpers exit when rank 0's process goes away.
"""

from __future__ import annotations

import ctypes
import datetime
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import TCPStore  # type: ignore[attr-defined]  # re-exported untyped

from maskd_core.callbacks import Callback, CallbackList
from maskd_core.errors import JobCancelled, MaskdError, RankLost
from maskd_core.spec import JobSpec

R = TypeVar("R")
Entry = Callable[[JobSpec, Path, Any], R]
"""``entry(spec, workdir, callbacks)``: ``run_job`` or ``run_teacher_job``."""

DEFAULT_TIMEOUT_SECONDS = 1800.0
"""How long a collective waits for the other ranks before failing the attempt: longer than
rank 0's longest solo work between two steps (an evaluation over the validation data), which
the other ranks wait out in their next collective."""

HELPER_EXIT_SECONDS = 60.0
"""How long rank 0 waits for its helpers to exit after the job ended."""

PARENT_POLL_SECONDS = 2.0
"""How often a helper checks that rank 0's process is still its parent (where the kernel
cannot be asked to signal it)."""

LOST_HELPER_WAIT_SECONDS = 5.0
"""How long rank 0, its collective failed, waits for the peer that broke it to exit, so the
error names that rank instead of the collective's symptom."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job's process group."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that evaluates, writes files and reports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def ranks() -> Ranks:
    """The current process group's view; one process when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks(0, 1)


def agree(value: bool) -> bool:
    """Rank 0's ``value`` on every rank: for decisions read from files that rank 0 writes
    (is stage 1 done, is a student finished, is there a checkpoint to resume)."""
    if not ranks().distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def any_rank(flag: bool) -> bool:
    """True on every rank when any rank's ``flag`` is (a stop must be taken by all)."""
    if not ranks().distributed:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of ``values`` over the ranks (the global batch's loss)."""
    if not ranks().distributed:
        return values
    total = values.detach().to(_collective_device(), torch.float32).clone()
    dist.all_reduce(total)
    return total / ranks().world_size


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def wrap_for_training(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in ``DistributedDataParallel`` when the job runs on several processes.

    Unused parameters are allowed (a method's branches or a detector's heads may sit out a
    step); DDP averages the gradients over ranks in backward, so every rank steps alike.
    """
    if not ranks().distributed:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        module, device_ids=device_ids, find_unused_parameters=True
    )


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm over the global batch (``SyncBatchNorm``), as the official segmentation recipe
    trains its students, when the job runs on several GPUs. On CPU processes (gloo) torch has
    no SyncBatchNorm, and each rank normalises over its share of the batch."""
    if not ranks().distributed or device.type != "cuda":
        return model
    converted: nn.Module = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # type: ignore[no-untyped-call]
    return converted


class _Helpers:
    """Ranks 1..N-1, each a ``python`` process of its own.

    Started with ``subprocess`` rather than ``multiprocessing``: a Celery pool process is
    daemonic, and Python refuses daemonic processes children of their own. Each helper reads
    its ``_RankSettings`` on stdin and runs ``helper_main``; its output goes where rank 0's does.
    """

    def __init__(self, settings: _RankSettings) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []
        for rank in range(1, settings.world_size):
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from maskd_core.distributed import helper_main; helper_main()",
                ],
                stdin=subprocess.PIPE,
            )
            assert process.stdin is not None
            process.stdin.write(json.dumps({**asdict(settings), "rank": rank}).encode())
            process.stdin.close()
            self.processes.append(process)

    def lost(self, wait_seconds: float = 0.0) -> tuple[int, int | None] | None:
        """The first helper rank that has failed (exited other than cleanly), with its exit
        code; None while none has (after waiting up to ``wait_seconds`` for one to: a peer's
        failure can reach rank 0 before the peer's process is gone). A helper that finished
        cleanly is not lost: helpers skip evaluations and often end before rank 0."""
        deadline = time.monotonic() + wait_seconds
        while True:
            for rank, process in enumerate(self.processes, start=1):
                if process.poll() not in (None, 0):
                    return rank, process.returncode
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

    def wait(self) -> None:
        """Helpers finish with rank 0 (they skip its evaluations, so usually first)."""
        for rank, process in enumerate(self.processes, start=1):
            code = process.wait(timeout=HELPER_EXIT_SECONDS)
            if code != 0:
                raise RankLost(rank, code)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class _HelpersAlive(Callback):
    """Rank 0's check, every step, that no helper rank has exited."""

    def __init__(self, helpers: _Helpers) -> None:
        self.helpers = helpers

    def should_stop(self) -> bool:
        lost = self.helpers.lost()
        if lost is not None:
            raise RankLost(*lost)
        return False


def run_in_processes(
    entry: Entry[R],
    spec: JobSpec,
    workdir: str | Path,
    callbacks: Callback | Sequence[Callback] | None = None,
    *,
    devices: Sequence[int] | None = None,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
) -> R:
    """``entry(spec, workdir, callbacks)`` on ``spec.resources.world_size`` processes.

    ``entry`` is ``run_job`` or ``run_teacher_job`` (a ``maskd_core`` function, which the
    helpers import by name). One process calls ``entry`` directly. Otherwise this process is
    rank 0 and starts the others; ``devices`` are the CUDA device indices the job may use, one
    per rank (a GPU job); None means CPU processes or, for a GPU job, devices 0..N-1. Returns
    rank 0's result once every rank has finished; raises rank 0's error, or ``RankLost`` when
    a helper exited first.
    """
    world_size = spec.resources.world_size
    root = Path(workdir)
    if world_size == 1:
        if devices and torch.cuda.is_available():
            torch.cuda.set_device(devices[0])
        return entry(spec, root, callbacks)
    if not entry.__module__.startswith("maskd_core."):
        raise ValueError(f"helper ranks run maskd_core functions only, not {entry!r}")
    gpus = spec.resources.gpus is not None
    device_ids = list(devices) if devices is not None else list(range(world_size))
    if gpus and len(device_ids) < world_size:
        raise ValueError(f"a {world_size}-GPU job was given devices {device_ids}")
    store = TCPStore(
        "127.0.0.1",
        0,
        world_size,
        is_master=True,
        timeout=datetime.timedelta(seconds=timeout_seconds),
        wait_for_workers=False,
    )
    settings = _RankSettings(
        entry=f"{entry.__module__}:{entry.__name__}",
        spec_json=spec.model_dump_json(),
        workdir=str(root),
        world_size=world_size,
        port=store.port,
        backend="nccl" if gpus else "gloo",
        devices=device_ids if gpus else None,
        timeout_seconds=timeout_seconds,
        parent_pid=os.getpid(),
    )
    helpers = _Helpers(settings)
    threads = torch.get_num_threads()
    try:
        _join_group(settings, 0, store)
        own = [callbacks] if isinstance(callbacks, Callback) else list(callbacks or [])
        try:
            result = entry(spec, root, CallbackList([_HelpersAlive(helpers), *own]))
        except MaskdError:
            raise  # the job's own ending (stop, spec, data, divergence), met by every rank
        except Exception as error:
            # A collective that failed because a peer went away: name the rank that did.
            lost = helpers.lost(wait_seconds=LOST_HELPER_WAIT_SECONDS)
            if lost is not None:
                raise RankLost(*lost) from error
            raise
        helpers.wait()
        return result
    finally:
        torch.set_num_threads(threads)
        helpers.stop()
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass(frozen=True)
class _RankSettings:
    """What a helper rank needs to join the job, sent to it as JSON."""

    entry: str
    """``module:function`` of the ``maskd_core`` function every rank runs."""
    spec_json: str
    workdir: str
    world_size: int
    port: int
    backend: str
    devices: list[int] | None
    timeout_seconds: float
    parent_pid: int


def _join_group(settings: _RankSettings, rank: int, store: TCPStore) -> None:
    """Join the process group as ``rank``, on its GPU or its share of the CPU cores."""
    if settings.devices is not None:
        torch.cuda.set_device(settings.devices[rank])
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // settings.world_size))
    dist.init_process_group(
        settings.backend,
        store=store,
        rank=rank,
        world_size=settings.world_size,
        timeout=datetime.timedelta(seconds=settings.timeout_seconds),
    )


def helper_main() -> None:
    """A helper rank's process: the same job as rank 0, without callbacks; exits with rank 0.

    Its settings come on stdin from ``run_in_processes``; the entry is a ``maskd_core``
    function named there, never anything a job spec names."""
    given = json.loads(sys.stdin.read())
    rank = given.pop("rank")
    settings = _RankSettings(**given)
    module, name = settings.entry.split(":")
    if not module.startswith("maskd_core."):
        raise SystemExit(f"not a maskd_core entry: {settings.entry}")
    entry = getattr(importlib.import_module(module), name)
    _exit_with_parent(settings.parent_pid)
    store = TCPStore(
        "127.0.0.1",
        settings.port,
        settings.world_size,
        is_master=False,
        timeout=datetime.timedelta(seconds=settings.timeout_seconds),
    )
    _join_group(settings, rank, store)
    try:
        entry(JobSpec.model_validate_json(settings.spec_json), Path(settings.workdir), None)
    except JobCancelled:
        pass  # rank 0 stopped the job; all ranks agreed, and rank 0 reports it
    finally:
        dist.destroy_process_group()


PR_SET_PDEATHSIG = 1
"""Linux's ``prctl`` option: the signal a process gets when its parent exits."""


def _exit_with_parent(parent_pid: int) -> None:
    """Ends this helper when rank 0's process is gone (killed with its worker), rather than
    leaving it blocked in a collective until the timeout, or on a GPU that the host's slot
    allocator has already handed to the next job. On Linux the kernel kills it at once; the
    watch thread covers other systems and a parent that exited before the request."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="maskd-parent-watch", daemon=True).start()
