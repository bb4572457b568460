"""The Celery settings both sides share: pool processes are kept between jobs, bounded by memory."""

from __future__ import annotations

from pathlib import Path

from service.config import Settings
from service.dispatch import celery_config


def test_pool_processes_run_job_after_job_until_their_memory_limit(tmp_path: Path) -> None:
    config = celery_config(Settings(data_dir=tmp_path, worker_max_memory_per_child_mib=512))

    assert "worker_max_tasks_per_child" not in config
    assert config["worker_max_memory_per_child"] == 512 * 1024  # Celery counts KiB
    assert config["task_acks_late"] is True and config["worker_prefetch_multiplier"] == 1
    unlimited = Settings(data_dir=tmp_path, worker_max_memory_per_child_mib=0)
    assert celery_config(unlimited)["worker_max_memory_per_child"] is None
