"""GPU slots: the workers of one host share its GPUs, one job per GPU at a time.

A worker started with ``maskd worker --gpus N`` runs N pool processes and consumes the queues of
jobs of up to N GPUs (``service.dispatch.job_queues``), so it may hold a 4-GPU job and several
one-GPU jobs at once; other workers on the host may hold more. Which GPUs each job trains on is
decided here, host-wide, through one lock file per GPU in ``Settings.gpu_slot_dir``: a job
holds ``fcntl.flock`` locks on its GPUs' files until it ends. The kernel drops the locks of a
process however it ends, so a killed job frees its GPUs at once, and no file needs cleaning up.

Placing a job takes the exclusive allocation lock first and keeps it while it waits for enough
free GPUs. A big job waiting for GPUs to free up thus holds off the small jobs that come after
it, instead of watching them take each GPU as it frees (starvation); small jobs among
themselves are served in no particular order. Holding GPUs never waits on the allocation lock,
so nothing can deadlock: the job holding the allocation lock waits only for running jobs to
end.

A GPU's file is named by its ``CUDA_VISIBLE_DEVICES`` entry when that is set (an index or a
UUID), so workers that each see some of the host's GPUs share the right ones; the devices a job
is given are the indices its process sees (``cuda:<index>``).

This module imports no torch: ``maskd worker``'s parent counts the GPUs with it.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from maskd_core.spec import JobSpec
from service.config import Settings

ALLOCATION_LOCK = "allocate.lock"
"""The lock a job holds while it is being placed (see the module's docstring)."""

POLL_SECONDS = 0.2
"""How often a waiting job looks for free GPUs (and asks ``should_stop``)."""

NVIDIA_SMI_TIMEOUT_SECONDS = 10.0

_UNSAFE_IN_FILE_NAME = re.compile(r"[^A-Za-z0-9_.-]")


class NotEnoughGpus(Exception):  # noqa: N818 - reads as the condition it reports
    """A job needs more GPUs than this worker has: it was sent to a queue its worker should not
    consume (``maskd worker --queues`` naming a ``gpuN`` above ``--gpus``)."""


class SlotWaitStopped(Exception):  # noqa: N818 - reads as the condition it reports
    """``should_stop`` asked to stop while the job was waiting for GPUs; it holds none."""


def visible_devices() -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES``'s entries, up to the first invalid one (CUDA stops there too);
    None when it is unset."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    entries: list[str] = []
    for entry in (part.strip() for part in value.split(",")):
        if not entry or entry.startswith("-"):
            break
        entries.append(entry)
    return entries


def detect_gpus() -> int:
    """This host's GPUs, without torch: ``CUDA_VISIBLE_DEVICES``'s entries when it is set, else
    the lines of ``nvidia-smi -L``, else 0 (no NVIDIA driver: a CPU host)."""
    visible = visible_devices()
    if visible is not None:
        return len(visible)
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return 0
    try:
        listed = subprocess.run(
            [nvidia_smi, "-L"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_SECONDS,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in listed.stdout.splitlines())


def host_gpus(settings: Settings) -> list[str]:
    """The names of the GPUs this worker hands out, by the device index its jobs see: the first
    ``worker_gpus`` entries of ``CUDA_VISIBLE_DEVICES``, or ``0`` to ``worker_gpus - 1``."""
    count = settings.worker_gpus or 0
    visible = visible_devices()
    names = visible[:count] if visible is not None else [str(index) for index in range(count)]
    if len(names) < count:
        raise NotEnoughGpus(
            f"MASKD_WORKER_GPUS is {count} but CUDA_VISIBLE_DEVICES shows {len(names)} GPU(s); "
            f"start the worker with --gpus {len(names)} or make more GPUs visible"
        )
    return names


def slot_dir(settings: Settings) -> Path:
    """The folder of the host's GPU lock files (``Settings.gpu_slot_dir``)."""
    return settings.gpu_slot_dir or Path(tempfile.gettempdir()) / "maskd-gpu-slots"


def gpus_needed(spec: JobSpec, settings: Settings) -> int:
    """How many GPU slots ``spec`` takes on this worker: its ``resources.gpus``; one for a
    one-process job when the worker hands out GPUs (``worker_gpus``); none for CPU processes
    or ``device: cpu``. A one-process job on a worker without GPU slots takes none and uses
    the default device, as every job did before slots existed."""
    resources = spec.resources
    if resources.processes is not None or spec.device == "cpu":
        return 0
    if resources.gpus is not None and resources.gpus > 1:
        return resources.gpus
    return 1 if settings.worker_gpus else 0


@contextmanager
def gpu_slots(
    settings: Settings,
    count: int,
    *,
    on_wait: Callable[[str], object] | None = None,
    should_stop: Callable[[], bool] | None = None,
    poll_seconds: float = POLL_SECONDS,
) -> Iterator[list[int] | None]:
    """Hold ``count`` of this host's GPUs for the ``with`` block and yield their device
    indices (``cuda:<index>`` in this process); ``count`` 0 yields None at once (CPU).

    Waits while the GPUs are busy: ``on_wait`` hears what it waits for when the wait begins
    and whenever that changes (for the job's events), and ``should_stop`` is asked every
    ``poll_seconds`` (the lease keeper's: a cancel or a lost lease while waiting raises
    ``SlotWaitStopped``). Raises ``NotEnoughGpus`` when this worker has fewer than ``count``.
    """
    if count == 0:
        yield None
        return
    names = host_gpus(settings)
    if count > len(names):
        raise NotEnoughGpus(
            f"the job needs {count} GPUs but this worker has {len(names)} (maskd worker "
            f"--gpus); it must not consume queue gpu{count}: leave --queues out, or name only "
            f"queues of up to {len(names)} GPUs"
        )
    folder = slot_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    held: dict[int, int] = {}
    waiting = _Waiting(count, on_wait, should_stop, poll_seconds)
    try:
        allocation = _open(folder / ALLOCATION_LOCK)
        try:
            while not _try_lock(allocation):
                waiting.wait(f"waiting for {count} GPU(s): an earlier job gets its GPUs first")
            while True:
                for index, name in enumerate(names):
                    if len(held) < count and index not in held:
                        slot = _open(folder / f"gpu-{_UNSAFE_IN_FILE_NAME.sub('_', name)}.lock")
                        if _try_lock(slot):
                            held[index] = slot
                        else:
                            os.close(slot)
                if len(held) == count:
                    break
                waiting.wait(
                    f"waiting for {count} GPU(s): has {len(held)}, the other "
                    f"{len(names) - len(held)} of this worker's {len(names)} are busy"
                )
        finally:
            os.close(allocation)  # placed (or given up): the next job may be placed
        yield sorted(held)
    finally:
        for slot in held.values():
            os.close(slot)


class _Waiting:
    """One job's wait: reports each new reason once, honours ``should_stop``, sleeps."""

    def __init__(
        self,
        count: int,
        on_wait: Callable[[str], object] | None,
        should_stop: Callable[[], bool] | None,
        poll_seconds: float,
    ) -> None:
        self._count = count
        self._on_wait = on_wait
        self._should_stop = should_stop
        self._poll_seconds = poll_seconds
        self._reported: str | None = None

    def wait(self, reason: str) -> None:
        if reason != self._reported and self._on_wait is not None:
            self._on_wait(reason)
        self._reported = reason
        if self._should_stop is not None and self._should_stop():
            raise SlotWaitStopped(f"stopped while waiting for {self._count} GPU(s)")
        time.sleep(self._poll_seconds)


def _open(path: Path) -> int:
    """A lock file, read-only (flock needs no more) and never through a link: the default
    folder is in the shared temporary folder."""
    return os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)


def _try_lock(descriptor: int) -> bool:
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
