"""API latency (p50/p99), throughput and errors at 100 concurrent clients, GET and POST jobs.

The API runs as it is deployed: ``uvicorn --factory service.main:create_app`` in its own process
on PostgreSQL and Redis (a fresh database and a Redis db of this bench's own); the load comes
from this process over loopback, 100 asyncio tasks sharing one ``httpx.AsyncClient`` with 100
keep-alive connections, each sending its next request as soon as the last one answered (a
closed loop, so the figures are what 100 busy clients see, queueing included). No worker runs:
submitted jobs stay QUEUED, their messages wait in Redis.

``GET /v1/jobs/{id}`` reads jobs picked at random among those the warm-up created (two
transactions: the API key, then the job with its transitions). ``POST /v1/jobs`` submits the
tiny segmentation spec with a different seed each time, without an Idempotency-Key, so every
request runs the full path: the spec's dry-run validation (torch, CPU), the insert, the Redis
send and the dispatch timestamp. Before measuring, every uvicorn process gets warm (the first
POST in a process imports torch, seconds). The load generator shares the machine's cores with
the server; its own CPU time is printed, so its share is visible. Non-2xx answers and
exceptions (timeouts, resets) count as errors.

    .venv/bin/python bench/api_load.py [--gets 2000 --posts 300 --clients 100 --api-workers 1 2]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from service_stack import ServiceStack, sigterm_as_interrupt, tiny_spec

REQUEST_TIMEOUT_SECONDS = 120.0


@dataclass
class Phase:
    """What one endpoint's run measured."""

    endpoint: str
    api_workers: int
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    wall_seconds: float = 0.0
    client_cpu_seconds: float = 0.0

    @property
    def errors(self) -> int:
        return sum(count for status, count in self.statuses.items() if not status.startswith("2"))


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * fraction // 1))
    return ordered[int(rank) - 1]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def closed_loop(
    http: httpx.AsyncClient,
    phase: Phase,
    total: int,
    clients: int,
    make_request: Callable[[int], httpx.Request],
) -> None:
    """``clients`` tasks send ``total`` requests between them, each one after its last answer."""
    counter = iter(range(total))

    async def client() -> None:
        for index in counter:
            request = make_request(index)
            start = time.perf_counter()
            try:
                response = await http.send(request)
                await response.aclose()
                status = str(response.status_code)
            except httpx.HTTPError as error:
                status = type(error).__name__
            phase.latencies.append(time.perf_counter() - start)
            phase.statuses[status] += 1

    cpu_before, wall_before = cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    phase.wall_seconds = time.perf_counter() - wall_before
    phase.client_cpu_seconds = cpu_seconds() - cpu_before


async def load_api(
    stack: ServiceStack, base_url: str, args: argparse.Namespace, api_workers: int
) -> list[Phase]:
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(
        base_url=base_url, headers=stack.auth, limits=limits, timeout=REQUEST_TIMEOUT_SECONDS
    ) as http:
        job_ids = await warm_up(http, api_workers, args.warmup_jobs)
        seeds = iter(range(10_000, 10_000 + args.posts))
        get = Phase("GET /v1/jobs/{id}", api_workers)
        await closed_loop(
            http,
            get,
            args.gets,
            args.clients,
            lambda _: http.build_request("GET", f"/v1/jobs/{random.choice(job_ids)}"),
        )
        post = Phase("POST /v1/jobs", api_workers)
        await closed_loop(
            http,
            post,
            args.posts,
            args.clients,
            lambda _: http.build_request("POST", "/v1/jobs", json=tiny_spec(next(seeds))),
        )
    return [get, post]


async def warm_up(http: httpx.AsyncClient, api_workers: int, jobs: int) -> list[str]:
    """Jobs for the GETs to read; submitted in concurrent waves so every uvicorn process has
    imported torch (and opened its pools) before anything is timed."""
    job_ids: list[str] = []
    seed = 0
    while len(job_ids) < jobs:
        wave = max(2 * api_workers, 4)
        responses = await asyncio.gather(
            *(http.post("/v1/jobs", json=tiny_spec(seed + i)) for i in range(wave))
        )
        seed += wave
        for response in responses:
            response.raise_for_status()
            job_ids.append(response.json()["id"])
    await asyncio.gather(*(http.get(f"/v1/jobs/{job_id}") for job_id in job_ids))
    return job_ids


def print_results(args: argparse.Namespace, phases: list[Phase]) -> None:
    print(
        f"API under load: {args.clients} concurrent clients (closed loop, one process, httpx) on "
        "loopback\nuvicorn + PostgreSQL + Redis, no worker (jobs stay QUEUED), 2 shared cores\n"
    )
    header = (
        f"{'endpoint':20} {'uvicorn':>7} {'requests':>8} {'errors':>6} {'req/s':>7} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'client CPU':>10}"
    )
    print(header)
    for phase in phases:
        latencies = phase.latencies
        print(
            f"{phase.endpoint:20} {phase.api_workers:>7} {len(latencies):>8} {phase.errors:>6} "
            f"{len(latencies) / phase.wall_seconds:7.1f} "
            f"{statistics.median(latencies) * 1000:7.0f} "
            f"{percentile(latencies, 0.99) * 1000:7.0f} {max(latencies) * 1000:7.0f} "
            f"{phase.client_cpu_seconds / phase.wall_seconds:10.0%}"
        )
    for phase in phases:
        if phase.errors:
            print(f"errors of {phase.endpoint} with {phase.api_workers} uvicorn: {phase.statuses}")
    print("(client CPU: the load generator's own CPU time / wall time, of 200% available)")
    workers = " ".join(str(count) for count in args.api_workers)
    print(
        f"\ncommand: .venv/bin/python bench/api_load.py --gets {args.gets} --posts {args.posts} "
        f"--clients {args.clients} --api-workers {workers}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gets", type=int, default=2000, help="GET requests per API setting")
    parser.add_argument("--posts", type=int, default=300, help="POST requests per API setting")
    parser.add_argument("--clients", type=int, default=100, help="concurrent clients")
    parser.add_argument(
        "--api-workers", type=int, nargs="+", default=[1, 2], help="uvicorn --workers to try"
    )
    parser.add_argument("--warmup-jobs", type=int, default=20, help="jobs the GETs read")
    parser.add_argument("--redis-db", type=int, default=12, help="a Redis db no test uses")
    args = parser.parse_args()
    sigterm_as_interrupt()

    phases: list[Phase] = []
    with ServiceStack(redis_db=args.redis_db) as stack:
        for api_workers in args.api_workers:
            base_url = stack.start_api(workers=api_workers)
            try:
                phases += asyncio.run(load_api(stack, base_url, args, api_workers))
            finally:
                stack.stop(stack.processes[-1])
    print_results(args, phases)


if __name__ == "__main__":
    main()
