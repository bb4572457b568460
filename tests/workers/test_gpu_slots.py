"""The host's GPU slots, held by real processes: exclusive, fair to a big job, freed by a kill."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Iterator
from multiprocessing.context import SpawnContext, SpawnProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import pytest

from maskd_core.spec import JobSpec
from service.config import Settings
from workers.gpu_slots import (
    NotEnoughGpus,
    SlotWaitStopped,
    gpu_slots,
    gpus_needed,
    slot_dir,
)

SPAWN: SpawnContext = multiprocessing.get_context("spawn")
WAIT_SECONDS = 60.0


def host(tmp_path: Path, gpus: int) -> Settings:
    return Settings(data_dir=tmp_path / "var", worker_gpus=gpus, gpu_slot_dir=tmp_path / "slots")


def hold(
    settings: Settings,
    name: str,
    count: int,
    events: Queue[tuple[str, str, Any]],
    release: Event,
    poll_seconds: float,
    visible: str | None,
) -> None:
    """A job in its own process: takes ``count`` slots, says so, holds them until ``release``."""
    if visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    with gpu_slots(
        settings,
        count,
        on_wait=lambda message: events.put((name, "waiting", message)),
        poll_seconds=poll_seconds,
    ) as devices:
        events.put((name, "holds", devices))
        release.wait(WAIT_SECONDS)
    events.put((name, "released", None))


class Jobs:
    """Job processes of one test, ended (killed if need be) when it ends."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.events: Queue[tuple[str, str, Any]] = SPAWN.Queue()
        self.releases: dict[str, Event] = {}
        self.processes: dict[str, SpawnProcess] = {}
        self.seen: list[tuple[str, str, Any]] = []

    def start(
        self, name: str, count: int, poll_seconds: float = 0.05, visible: str | None = None
    ) -> None:
        release = self.releases[name] = SPAWN.Event()
        process = SPAWN.Process(
            target=hold,
            args=(self.settings, name, count, self.events, release, poll_seconds, visible),
        )
        process.start()
        self.processes[name] = process

    def next_event(self) -> tuple[str, str, Any]:
        event = self.events.get(timeout=WAIT_SECONDS)
        self.seen.append(event)
        return event

    def until(self, name: str, what: str) -> Any:
        """The value of ``name``'s first ``what``, seen already or waited for."""
        for who, event, value in self.seen:
            if (who, event) == (name, what):
                return value
        while True:
            who, event, value = self.next_event()
            if (who, event) == (name, what):
                return value

    def close(self) -> None:
        for name, release in self.releases.items():
            # Not a killed one's: setting an event waits for its sleepers to wake.
            if self.processes[name].is_alive():
                release.set()
        for process in self.processes.values():
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()


@pytest.fixture
def four_gpus(tmp_path: Path) -> Iterator[Jobs]:
    jobs = Jobs(host(tmp_path, 4))
    try:
        yield jobs
    finally:
        jobs.close()


def test_a_cpu_job_takes_no_slot_and_a_job_bigger_than_the_worker_is_refused(
    tmp_path: Path,
) -> None:
    settings = host(tmp_path, 2)
    with gpu_slots(settings, 0) as devices:
        assert devices is None
    with (
        pytest.raises(NotEnoughGpus, match="needs 4 GPUs but this worker has 2"),
        gpu_slots(settings, 4),
    ):
        pytest.fail("four GPUs handed out by a worker of two")
    with gpu_slots(settings, 2) as devices:
        assert devices == [0, 1]


def test_what_a_job_needs_follows_its_spec_and_the_worker() -> None:
    body: dict[str, Any] = {
        "name": "n",
        "task": "segmentation",
        "teacher": {"arch": "seg_tiny_teacher", "layers": ["backbone"]},
        "student": {"arch": "seg_tiny_student", "layers": ["backbone"]},
        "dataset": {"name": "procedural_shapes"},
        "batch_size": 4,
    }
    gpu_host, old_worker = Settings(worker_gpus=4), Settings()
    one = JobSpec.model_validate(body)
    four = JobSpec.model_validate({**body, "resources": {"gpus": 4}})
    cpu = JobSpec.model_validate({**body, "resources": {"processes": 2}})
    on_cpu = JobSpec.model_validate({**body, "device": "cpu"})
    assert [gpus_needed(spec, gpu_host) for spec in (one, four, cpu, on_cpu)] == [1, 4, 0, 0]
    # A worker that hands out no GPUs runs a one-process job on the default device.
    assert [gpus_needed(spec, old_worker) for spec in (one, four, cpu, on_cpu)] == [0, 4, 0, 0]


@pytest.mark.slow
def test_slots_are_exclusive_across_processes(four_gpus: Jobs, tmp_path: Path) -> None:
    four_gpus.start("three", 3)
    held = four_gpus.until("three", "holds")
    assert len(held) == 3

    # Two more would oversubscribe: the job waits, says why, and stops when asked to.
    heard: list[str] = []
    with (
        pytest.raises(SlotWaitStopped),
        gpu_slots(four_gpus.settings, 2, on_wait=heard.append, should_stop=lambda: bool(heard)),
    ):
        pytest.fail("two GPUs handed out while only one is free")
    assert heard == ["waiting for 2 GPU(s): has 1, the other 3 of this worker's 4 are busy"]
    with gpu_slots(four_gpus.settings, 1) as devices:
        assert devices is not None and set(devices).isdisjoint(held) and len(devices) == 1

    four_gpus.releases["three"].set()
    four_gpus.until("three", "released")
    with gpu_slots(four_gpus.settings, 4) as devices:
        assert devices == [0, 1, 2, 3]
    assert sorted(path.name for path in slot_dir(four_gpus.settings).iterdir()) == [
        "allocate.lock",
        *(f"gpu-{index}.lock" for index in range(4)),
    ]


@pytest.mark.slow
def test_a_waiting_big_job_is_served_before_a_later_small_one(tmp_path: Path) -> None:
    jobs = Jobs(host(tmp_path, 2))
    try:
        jobs.start("small-first", 1)
        jobs.until("small-first", "holds")
        # The big job looks for free GPUs once a second, the later small job 100 times as
        # often: only the allocation lock keeps the small one off the GPU that frees up.
        jobs.start("big", 2, poll_seconds=1.0)
        jobs.until("big", "waiting")
        jobs.start("small-later", 1, poll_seconds=0.01)
        assert jobs.until("small-later", "waiting").endswith("an earlier job gets its GPUs first")

        jobs.releases["small-first"].set()
        holder = next(event for event in iter(jobs.next_event, None) if event[1] == "holds")
        assert holder == ("big", "holds", [0, 1])
        time.sleep(0.5)  # the small job keeps waiting while the big one runs
        while not jobs.events.empty():
            jobs.next_event()
        assert ("small-later", "holds") not in {(who, what) for who, what, _ in jobs.seen}
        jobs.releases["big"].set()
        assert len(jobs.until("small-later", "holds")) == 1
    finally:
        jobs.close()


@pytest.mark.slow
def test_a_killed_job_frees_its_gpus(four_gpus: Jobs) -> None:
    four_gpus.start("killed", 4)
    assert four_gpus.until("killed", "holds") == [0, 1, 2, 3]
    heard: list[str] = []
    killed_at: list[float] = []

    def kill_once_waiting(message: str) -> None:
        heard.append(message)
        four_gpus.processes["killed"].kill()  # SIGKILL: no cleanup of any kind
        killed_at.append(time.monotonic())

    with gpu_slots(four_gpus.settings, 2, on_wait=kill_once_waiting) as devices:
        assert devices == [0, 1]
        assert time.monotonic() - killed_at[0] < 5
    assert len(heard) == 1, "reported once, not every poll"


@pytest.mark.slow
def test_workers_seeing_different_gpus_share_them_by_their_names(tmp_path: Path) -> None:
    """Two one-GPU workers (CUDA_VISIBLE_DEVICES=2 and =3) each see their GPU as device 0, and
    must not wait for each other; a worker seeing both (3,2) must wait for both."""
    jobs = Jobs(host(tmp_path, 1))
    try:
        jobs.start("sees-2", 1, visible="2")
        jobs.start("sees-3", 1, visible="3")
        assert jobs.until("sees-2", "holds") == [0]
        assert jobs.until("sees-3", "holds") == [0]
        names = sorted(path.name for path in slot_dir(jobs.settings).glob("gpu-*"))
        assert names == ["gpu-2.lock", "gpu-3.lock"]
        jobs.settings = host(tmp_path, 2)
        jobs.start("sees-both", 2, visible="3,2")
        jobs.until("sees-both", "waiting")
        jobs.releases["sees-2"].set()
        jobs.releases["sees-3"].set()
        assert jobs.until("sees-both", "holds") == [0, 1]
    finally:
        jobs.close()
