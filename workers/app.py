"""The Celery application that GPU workers run: ``celery -A workers.app worker -Q gpu -c 1``.

Broker, queues, time limits and acknowledgement settings come from
``service.dispatch.celery_config`` so the API (which sends) and the workers (which receive)
cannot disagree. What is set here concerns only the receiving side: one fresh child process
per job, so CUDA contexts and leaked host memory die with the job.

This module must stay free of torch: the prefork parent imports it before forking children.
"""

from __future__ import annotations

from celery import Celery

from service.config import get_settings
from service.dispatch import celery_config

app = Celery("maskd", include=["workers.tasks"])
app.conf.update(celery_config(get_settings()))
app.conf.update(
    # Reserve exactly one job per process (acks_late + multiplier 1): a long GPU job must not
    # hold a second one hostage in its prefetch buffer.
    worker_prefetch_multiplier=1,
    worker_max_tasks_per_child=1,
)
