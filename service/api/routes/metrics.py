"""``GET /metrics``: the API's Prometheus metrics, outside ``/v1`` and without authentication.

Like ``/healthz`` it needs no API key, so that Prometheus can scrape it; it shows job counts and
latencies, never a job's contents or a project's name. Operators keep it on the internal
network (a reverse proxy in front of the API should not route ``/metrics``). The families are
described in ``service.metrics`` and docs/operations.md.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import MetricsDep
from service.api.schemas import error_responses

router = APIRouter(tags=["operations"], responses=error_responses(413))


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text."}},
    summary="Prometheus metrics: jobs per state, queue depth, stage durations, latencies",
)
def metrics(metrics: MetricsDep) -> Response:
    # A plain def: the job families read the database, so this runs in the thread pool.
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
