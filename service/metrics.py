"""Prometheus metrics of the API, served unauthenticated at ``GET /metrics``.

Each app owns a ``CollectorRegistry`` (``ApiMetrics``), so several apps in one process (tests)
never share counters. Three kinds of families live there:

- measured in this process: request latency by route template (``RequestMetricsMiddleware``)
  and the Model Registry calls the API makes, by operation and outcome;
- read from the job database at scrape time (``JobsCollector``): jobs per state and the queue
  depth, one ``GROUP BY`` on the indexed ``state`` column;
- derived from ``job_events`` timestamps (also ``JobsCollector``): how long each visit to a
  stage lasted (from the transition into it to the one out of it, whatever ended it) and the
  claim latency (from a job becoming QUEUED to a worker's claim). The database is the one
  place that sees every transition (workers, the reconciler, cancels through the API), so
  these are complete and survive restarts. To stay cheap each scrape reads only events newer
  than the last one it saw, and re-reads the last ``RECHECK_EVENT_IDS`` ids, because on
  PostgreSQL an event id can become visible after a higher one (ids are handed out before
  their transaction commits). A fresh process reads the history once, at most
  ``MAX_EVENT_PAGES_PER_SCRAPE`` pages per scrape. Every API replica reports the same values
  for these families: aggregate them with ``max``, not ``sum``.

The queries use ``service.models`` directly, read-only. Metric names are listed in
docs/operations.md.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any, Literal

from fastapi.routing import APIRoute, RouteContext, iter_route_contexts
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import Engine, and_, func, or_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import aliased
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.lifecycle import JobState
from service.models import Job, JobEvent
from service.store import CLAIM_EVENT_PREFIX, EVENT_INFO, EVENT_TRANSITION

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds; a POST /v1/jobs runs a CPU dry run of both models (a second or two)."""
STAGE_BUCKETS = (
    *(1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0),
    *(3600.0, 7200.0, 14400.0, 28800.0, 57600.0, 86400.0),
)
"""Seconds, from tiny CPU jobs to the default 24-hour time limit."""
CLAIM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
"""Seconds from QUEUED to a worker's claim: a ready worker takes well under a second."""

TIMED_STAGES: dict[str, str] = {
    JobState.STAGE1.value: "stage1",
    JobState.STAGE2.value: "stage2",
    JobState.REGISTERING.value: "registering",
}
"""States whose visits ``maskd_job_stage_duration_seconds`` times, and their label (the job's
``stage`` field as the API shows it)."""

RECHECK_EVENT_IDS = 1000
EVENT_PAGE_SIZE = 1000
MAX_EVENT_PAGES_PER_SCRAPE = 20

UNMATCHED_ROUTE = "unmatched"
"""The route label of requests no route matched (404s), so random URLs add no series."""
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

RegistryOutcome = Literal["ok", "not_found", "invalid", "error"]
"""``invalid``: the registry refused the input (an alias name, a reference of the wrong kind)."""


class _Buckets:
    """A histogram kept by hand: cumulative families are built from it at each scrape."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        index = next((i for i, bound in enumerate(self.bounds) if value <= bound), -1)
        self.counts[index] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        running = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return buckets


class JobsCollector(Collector):
    """The database-derived families, computed when Prometheus scrapes (see the module doc)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._stages = {label: _Buckets(STAGE_BUCKETS) for label in TIMED_STAGES.values()}
        self._claims = _Buckets(CLAIM_BUCKETS)
        self._highest_seen = 0
        self._recent: set[int] = set()

    def describe(self) -> Iterable[Metric]:
        # The names, for the registry's duplicate check; no database read at registration.
        return list(self._families({}))

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            try:
                with self._engine.connect() as connection:
                    counts = connection.execute(select(Job.state, func.count()).group_by(Job.state))
                    states = {str(state): int(count) for state, count in counts}
                    self._read_new_events(connection)
            except SQLAlchemyError:
                return list(self._families(None))
            return list(self._families(states))

    def _families(self, states: dict[str, int] | None) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "maskd_database_up",
            "1 when the last scrape could read the job database, else 0 (and the job "
            "families below are left out of that scrape).",
        )
        up.add_metric([], 0.0 if states is None else 1.0)
        yield up
        if states is None:
            return
        jobs = GaugeMetricFamily("maskd_jobs", "Jobs in each lifecycle state.", labels=["state"])
        for state in JobState:
            jobs.add_metric([state.value], float(states.get(state.value, 0)))
        yield jobs
        queue = GaugeMetricFamily("maskd_queue_depth", "Jobs waiting for a worker (state QUEUED).")
        queue.add_metric([], float(states.get(JobState.QUEUED.value, 0)))
        yield queue
        durations = HistogramMetricFamily(
            "maskd_job_stage_duration_seconds",
            "Time from a job's transition into a stage to its transition out of it (to the "
            "next stage, a failure, a cancel or back to the queue), from job_events.",
            labels=["stage"],
        )
        for label, buckets in self._stages.items():
            durations.add_metric([label], buckets.cumulative(), buckets.total)
        yield durations
        claims = HistogramMetricFamily(
            "maskd_job_claim_latency_seconds",
            "Time from a job becoming QUEUED (submitted or re-queued) to a worker claiming "
            "it, from job_events.",
        )
        claims.add_metric([], self._claims.cumulative(), self._claims.total)
        yield claims

    def _read_new_events(self, connection: Any) -> None:
        event = aliased(JobEvent)
        earlier = aliased(JobEvent)
        previous = aliased(JobEvent)
        # The job's latest transition before the event: what the event ends or follows.
        previous_id = (
            select(func.max(earlier.id))
            .where(
                earlier.job_id == event.job_id,
                earlier.kind == EVENT_TRANSITION,
                earlier.id < event.id,
            )
            .correlate(event)
            .scalar_subquery()
        )
        relevant = or_(
            event.kind == EVENT_TRANSITION,
            and_(event.kind == EVENT_INFO, event.message.startswith(CLAIM_EVENT_PREFIX)),
        )
        after = max(self._highest_seen - RECHECK_EVENT_IDS, 0)
        for _ in range(MAX_EVENT_PAGES_PER_SCRAPE):
            rows = connection.execute(
                select(
                    event.id,
                    event.kind,
                    event.from_state,
                    event.created_at,
                    previous.to_state,
                    previous.created_at,
                )
                .outerjoin(previous, previous.id == previous_id)
                .where(event.id > after, relevant)
                .order_by(event.id)
                .limit(EVENT_PAGE_SIZE)
            ).all()
            for row in rows:
                if row[0] not in self._recent:
                    self._observe(*row)
                    self._recent.add(row[0])
                    self._highest_seen = max(self._highest_seen, row[0])
            if len(rows) < EVENT_PAGE_SIZE:
                break
            after = rows[-1][0]
        floor = self._highest_seen - RECHECK_EVENT_IDS
        self._recent = {event_id for event_id in self._recent if event_id > floor}

    def _observe(
        self,
        event_id: int,
        kind: str,
        from_state: str | None,
        at: datetime,
        previous_state: str | None,
        previous_at: datetime | None,
    ) -> None:
        if previous_at is None:
            return
        seconds = max((at - previous_at).total_seconds(), 0.0)
        if kind == EVENT_TRANSITION:
            label = TIMED_STAGES.get(from_state or "")
            if label is not None and previous_state == from_state:
                self._stages[label].observe(seconds)
        elif previous_state == JobState.QUEUED.value:
            self._claims.observe(seconds)


class ApiMetrics:
    """One app's registry: request latency, registry calls, process and database families."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Histogram(
            "maskd_http_request_duration_seconds",
            "API requests by method, route template (e.g. /v1/jobs/{job_id}) and status, "
            "from the request's arrival to the end of its response body.",
            ["method", "route", "status"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.registry_operations = Counter(
            "maskd_registry_operations",
            "Model Registry (MLflow) calls the API made, by operation and outcome (ok, "
            "not_found, invalid, error).",
            ["operation", "outcome"],
            registry=self.registry,
        )
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._jobs: JobsCollector | None = None

    def watch_database(self, engine: Engine) -> None:
        """Serve the job database's families (called once the app has its engine)."""
        self.forget_database()
        self._jobs = JobsCollector(engine)
        self.registry.register(self._jobs)

    def forget_database(self) -> None:
        if self._jobs is not None:
            self.registry.unregister(self._jobs)
            self._jobs = None

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in _METHODS else "OTHER"
        self.requests.labels(method, route, str(status)).observe(seconds)

    def count_registry_operation(self, operation: str, outcome: RegistryOutcome) -> None:
        self.registry_operations.labels(operation, outcome).inc()


class RequestMetricsMiddleware:
    """ASGI middleware timing each HTTP request into ``ApiMetrics.requests``.

    The route label is the matched route's full path template (``/v1/jobs/{job_id}``), never
    the raw URL, so ids in paths add no series; requests that match nothing are labelled
    ``unmatched``. FastAPI puts the matched route in the scope with the path it was declared
    with on its own router (``/jobs/{job_id}``); the full template, prefixes included, comes
    from the app's route contexts (``fastapi.routing.iter_route_contexts``), looked up once.
    A request whose handler raised is counted as 500, the answer the server-error middleware
    outside this one gives.
    """

    def __init__(
        self, app: ASGIApp, metrics: ApiMetrics, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.clock = clock
        self._contexts: dict[int, list[RouteContext]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = self.clock()
        status = 500

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            template = self._template(scope)
            self.metrics.observe_request(scope["method"], template, status, self.clock() - started)

    def _template(self, scope: Scope) -> str:
        # FastAPI's routes put themselves in the scope; Starlette's (/docs) only their endpoint.
        route = scope.get("route") or scope.get("endpoint")
        if route is None:
            return UNMATCHED_ROUTE
        contexts = self._route_contexts(scope, refresh=False).get(id(route))
        if contexts is None:  # a route added after the first request
            contexts = self._route_contexts(scope, refresh=True).get(id(route), [])
        if len(contexts) > 1:  # one router included at several prefixes
            path = scope.get("path", "")
            contexts = [c for c in contexts if c.path_regex.match(path)] or contexts
        if contexts and contexts[0].path_format:
            return str(contexts[0].path_format)
        return str(getattr(route, "path", None) or UNMATCHED_ROUTE)

    def _route_contexts(self, scope: Scope, *, refresh: bool) -> dict[int, list[RouteContext]]:
        if self._contexts is None or refresh:
            contexts: dict[int, list[RouteContext]] = {}
            for context in iter_route_contexts(getattr(scope.get("app"), "routes", [])):
                original = context.original_route
                key = original if isinstance(original, APIRoute) else context.endpoint
                contexts.setdefault(id(key), []).append(context)
            self._contexts = contexts
        return self._contexts
