"""The Celery application that GPU workers run: ``celery -A workers.app worker -Q gpu -c 1``.

Broker, queues, acknowledgement, prefetch and process-recycling settings come from
``service.dispatch.celery_config``, so the API (which sends) and the workers (which receive)
cannot disagree. The one thing changed here is the receiving side's soft time limit, because a
job gets three chances to end on time, from gentlest to hardest:

1. at ``job_soft_time_limit_seconds`` the lease keeper asks the training loop to stop; it
   writes a checkpoint and the job ends FAILED (timeout);
2. halfway from there to the hard limit Celery's soft limit raises ``SoftTimeLimitExceeded``,
   in case the loop stopped polling (stuck in an evaluation, say);
3. at ``job_time_limit_seconds`` Celery kills the process.

Its logs, its Prometheus endpoint, torch's thread count and the warm-up of each pool child (the
imports a job needs, done before the child takes one) are set up through Celery's signals
(``workers.observability``), so they apply however the worker was started. A child reports for
work only once warm, which takes seconds (10 to 25 s on two busy CPU cores), while Celery kills
a child that has not reported within 4 s by default: ``CHILD_WARM_UP_TIMEOUT_SECONDS`` replaces
that limit.

This module must stay free of torch: the prefork parent imports it before forking children.
"""

from __future__ import annotations

from celery import Celery

from service.config import Settings, get_settings
from service.dispatch import celery_config
from workers import observability

CHILD_WARM_UP_TIMEOUT_SECONDS = 300.0
"""How long a new pool child may take to import torch and the rest before Celery gives up on
it (``worker_proc_alive_timeout``): far above a healthy warm-up, so only a hung one is killed."""


def backstop_soft_time_limit(settings: Settings) -> int:
    """Celery's soft limit: after the cooperative stop, with time left before the hard kill."""
    soft, hard = settings.job_soft_time_limit_seconds, settings.job_time_limit_seconds
    return soft + (hard - soft) // 2


settings = get_settings()
app = Celery("maskd", include=["workers.tasks"])
app.conf.update(celery_config(settings))
app.conf.update(
    task_soft_time_limit=backstop_soft_time_limit(settings),
    worker_proc_alive_timeout=CHILD_WARM_UP_TIMEOUT_SECONDS,
)
observability.install(app)
