"""The API's speed, each figure beside its reference in one run: reads under load, and a burst
of submissions with reads going on meanwhile.

The API runs as deployed: ``maskd serve --workers N`` (access log and reconciler thread
included) on PostgreSQL and Redis, a fresh database and a Redis db of this bench's own, no
worker (submitted jobs stay QUEUED). The load comes from other processes over loopback: wrk
(2 threads) where it is installed, otherwise this script's own asyncio client (httpx) run as a
separate process; the output says which. Both are closed loops: each connection sends its next
request when the last one is answered.

Reads: ``/healthz`` (a constant: the reference), ``GET /v1/jobs/{id}`` and ``GET /v1/jobs``
(one job in the table, as when the targets were set), each for ``--seconds`` at 100 connections
(throughput) and at 10 (latency). Burst: ``--burst`` valid submissions sent at once, one per
connection (the tiny spec, each with its own seed, no Idempotency-Key), while 10 connections
keep reading one job; the submissions' latencies (from the request sent to its answer) and the
reads' latencies during the burst are reported. wrk sends the burst from a Lua script that
stops each connection after its one submission; the fallback is an asyncio client in a process
of its own.

Targets (issue 16): reads at 100 connections >= 0.5 x /healthz and >= 800 req/s per API
process with 0 errors; p99 <= 20 ms at 10 connections; the burst all answered with p99 <= 2 s,
reads within their target meanwhile.

    .venv/bin/python bench/api_speed.py [--seconds 10 --burst 200 --api-workers 1 2]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
from service_stack import ServiceStack, sigterm_as_interrupt, tiny_spec

from maskd_core.spec import JobSpec
from service.db import make_engine, make_sessionmaker
from service.store import JobStore

REQUEST_TIMEOUT_SECONDS = 60.0
BURST_SECONDS = 10
"""How long wrk waits for a burst's answers (it returns after this, answered or not)."""
READ_TARGET_RPS = 800.0
READ_TARGET_RATIO = 0.5
READ_TARGET_P99_MS = 20.0
BURST_TARGET_P99_MS = 2000.0
WARM_UP_SECONDS = 120.0


@dataclass
class Load:
    """What one closed-loop load measured."""

    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


@dataclass
class Burst:
    """A burst of submissions: how many were answered with which status, and how fast."""

    statuses: Counter[int | str] = field(default_factory=Counter)
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0

    @classmethod
    def of(cls, latencies_ms: list[float], statuses: Counter[int | str]) -> Burst:
        return cls(
            statuses=statuses,
            p50_ms=percentile(latencies_ms, 0.5),
            p99_ms=percentile(latencies_ms, 0.99),
            max_ms=max(latencies_ms),
        )


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * fraction // 1))
    return ordered[int(rank) - 1]


def load_generator() -> str:
    return "wrk" if shutil.which("wrk") else "python"


def run_load(url: str, key: str, connections: int, seconds: float) -> Load:
    """``connections`` closed-loop clients on ``url`` for ``seconds``, from another process."""
    if load_generator() == "wrk":
        return _wrk(url, key, connections, seconds)
    command = [sys.executable, __file__, "client", url, key, str(connections), str(seconds)]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return Load(**json.loads(output))


def _wrk(url: str, key: str, connections: int, seconds: float) -> Load:
    threads = min(2, connections)
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency"]
    command += ["--timeout", f"{REQUEST_TIMEOUT_SECONDS:g}s", "-H", f"Authorization: Bearer {key}"]
    output = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    done = re.search(r"(\d+) requests in ([\d.]+)(m?s)", output)
    if done is None:
        raise RuntimeError(f"wrk printed no totals:\n{output}")
    elapsed = float(done.group(2)) / (1000 if done.group(3) == "ms" else 1)
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", output))
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    return Load(
        requests=int(done.group(1)),
        errors=errors,
        seconds=elapsed,
        p50_ms=_wrk_percentile(output, "50"),
        p99_ms=_wrk_percentile(output, "99"),
    )


def _wrk_percentile(output: str, which: str) -> float:
    match = re.search(rf"^\s+{which}%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"wrk printed no {which}th percentile:\n{output}")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]
    return float(match.group(1)) * scale


async def python_client(url: str, key: str, connections: int, seconds: float) -> Load:
    """The load wrk would give, from asyncio and httpx (the fallback, run as its own process)."""
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(
        headers=headers, limits=limits, timeout=REQUEST_TIMEOUT_SECONDS
    ) as http:
        started = time.perf_counter()
        deadline = started + seconds

        async def client() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                try:
                    response = await http.get(url)
                    ok = response.is_success
                except httpx.HTTPError:
                    ok = False
                latencies.append((time.perf_counter() - sent) * 1000)
                errors += not ok

        await asyncio.gather(*(client() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    return Load(
        requests=len(latencies),
        errors=errors,
        seconds=elapsed,
        p50_ms=percentile(latencies, 0.5),
        p99_ms=percentile(latencies, 0.99),
    )


def run_burst(base_url: str, key: str, count: int, first_seed: int) -> Burst:
    """``count`` submissions sent at once, each on its own connection, from another process:
    wrk where it is installed, else ``submit_burst`` (asyncio and httpx, which spends more CPU
    than the API on each submission and so slows the burst it measures on a 2-core machine)."""
    if load_generator() == "wrk":
        return _wrk_burst(base_url, key, count, first_seed)
    command = [sys.executable, __file__, "burst", base_url, key, str(count), str(first_seed)]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    found = json.loads(output)
    return Burst(**{**found, "statuses": Counter(found["statuses"])})


WRK_BURST_SCRIPT = """
-- One POST /v1/jobs per connection, then silence: a burst of as many submissions as
-- connections. Each body is the tiny spec with its own seed.
local threads = {}
function setup(thread)
  thread:set("index", #threads)
  table.insert(threads, thread)
end
function init(args)
  template, per_thread, first_seed = args[1], tonumber(args[2]), tonumber(args[3])
  sent, ok, refused = 0, 0, 0
  wrk.headers["Content-Type"] = "application/json"  -- beside -H's Authorization
end
function request()
  local seed = first_seed + index * per_thread + sent
  sent = sent + 1
  local body = template:gsub("@SEED@", tostring(seed))
  return wrk.format("POST", "/v1/jobs", nil, body)
end
function delay()
  if sent < per_thread then return 0 end
  return 3600000
end
function response(status, headers, body)
  if status == 201 then ok = ok + 1 else refused = refused + 1 end
  if ok + refused >= per_thread then wrk.thread:stop() end
end
function done(summary, latency, requests)
  local ok_all, refused_all = 0, 0
  for _, thread in ipairs(threads) do
    ok_all = ok_all + thread:get("ok")
    refused_all = refused_all + thread:get("refused")
  end
  io.write(string.format("BURST %d %d %.3f %.3f %.3f\\n", ok_all, refused_all,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
"""


def _wrk_burst(base_url: str, key: str, count: int, first_seed: int) -> Burst:
    threads = 2 if count % 2 == 0 else 1
    template = json.dumps(tiny_spec(0)).replace('"seed": 0', '"seed": @SEED@')
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(WRK_BURST_SCRIPT)
        script.flush()
        command = ["wrk", f"-t{threads}", f"-c{count}", f"-d{BURST_SECONDS}s", "-s", script.name]
        command += ["--timeout", f"{BURST_SECONDS}s", "-H", f"Authorization: Bearer {key}"]
        command += [f"{base_url}/v1/jobs", "--", template, str(count // threads), str(first_seed)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    found = re.search(r"^BURST (\d+) (\d+) ([\d.]+) ([\d.]+) ([\d.]+)$", output, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"wrk printed no burst summary:\n{output}")
    ok, refused = int(found.group(1)), int(found.group(2))
    statuses: Counter[int | str] = Counter({201: ok, "other": refused})
    statuses["unanswered"] = count - ok - refused
    return Burst(
        statuses=+statuses,
        p50_ms=float(found.group(3)),
        p99_ms=float(found.group(4)),
        max_ms=float(found.group(5)),
    )


async def submit_burst(base_url: str, key: str, count: int, first_seed: int) -> Burst:
    """The burst from asyncio and httpx (the fallback, run as its own process)."""
    latencies_ms: list[float] = []
    statuses: Counter[int | str] = Counter()
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(
        base_url=base_url,
        headers={"Authorization": f"Bearer {key}"},
        limits=limits,
        timeout=REQUEST_TIMEOUT_SECONDS,
    ) as http:

        async def submit(seed: int) -> None:
            sent = time.perf_counter()
            try:
                response = await http.post("/v1/jobs", json=tiny_spec(seed))
                status: int | str = response.status_code
            except httpx.HTTPError as error:
                status = type(error).__name__
            latencies_ms.append((time.perf_counter() - sent) * 1000)
            statuses[status] += 1

        await asyncio.gather(*(submit(first_seed + index) for index in range(count)))
    return Burst.of(latencies_ms, statuses)


def seed_job(stack: ServiceStack) -> str:
    """The one job the reads read, stored directly (it is read, never run)."""
    engine = make_engine(stack.database_url)
    try:
        store = JobStore(make_sessionmaker(engine))
        project = store.authenticate(stack.api_key)
        assert project is not None
        job, _ = store.create_job(project.id, JobSpec.model_validate(tiny_spec(0)))
        return job.id
    finally:
        engine.dispose()


def submitter_key(stack: ServiceStack) -> str:
    """A key of a second project, which sends the submissions, so the project whose jobs are
    read keeps one job in its table in every run."""
    engine = make_engine(stack.database_url)
    try:
        return JobStore(make_sessionmaker(engine)).create_api_key("bench-submitter")
    finally:
        engine.dispose()


def measure(
    stack: ServiceStack, workers: int, job_id: str, submitter: str, args: argparse.Namespace
) -> list[str]:
    """Start ``maskd serve --workers N``, measure everything, stop it; the report's lines."""
    base_url = stack.start_maskd_serve(workers=workers)
    key = stack.api_key
    try:
        job_url = f"{base_url}/v1/jobs/{job_id}"
        warm_up(base_url, submitter, workers)
        reads = {
            "/healthz": f"{base_url}/healthz",
            "GET /v1/jobs/{id}": job_url,
            "GET /v1/jobs": f"{base_url}/v1/jobs",
        }
        loaded = {name: run_load(url, key, 100, args.seconds) for name, url in reads.items()}
        latency = {
            name: run_load(url, key, 10, args.seconds)
            for name, url in reads.items()
            if name != "/healthz"
        }
        with_burst, burst = read_during_burst(base_url, job_url, key, submitter, args)
    finally:
        stack.stop(stack.processes[-1])
    return report(workers, loaded, latency, with_burst, burst)


def warm_up(base_url: str, submitter: str, workers: int) -> None:
    """Submit until every API process has validated and stored (its pools start torch and
    the store): right after a change, compiling the changed modules in the spawned processes
    can outlast one warm-up burst, whose submissions then land in the measured one."""
    deadline = time.monotonic() + WARM_UP_SECONDS
    for attempt in itertools.count():
        burst = run_burst(base_url, submitter, 4 * workers, first_seed=1 + 4 * workers * attempt)
        if burst.statuses == Counter({201: 4 * workers}):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the API did not warm up in {WARM_UP_SECONDS} s: {burst}")


def read_during_burst(
    base_url: str, job_url: str, key: str, submitter: str, args: argparse.Namespace
) -> tuple[Load, Burst]:
    """10 connections read one job while ``args.burst`` submissions arrive at once."""
    seconds = max(args.seconds, 5.0)
    outcome: dict[str, Load] = {}

    async def both() -> Burst:
        reads = asyncio.create_task(
            asyncio.to_thread(
                lambda: outcome.setdefault("reads", run_load(job_url, key, 10, seconds))
            )
        )
        await asyncio.sleep(1.0)  # the reads are under way first
        burst = await asyncio.to_thread(run_burst, base_url, submitter, args.burst, 1000)
        await reads
        return burst

    burst = asyncio.run(both())
    return outcome["reads"], burst


def report(
    workers: int,
    loaded: dict[str, Load],
    latency: dict[str, Load],
    with_burst: Load,
    burst: Burst,
) -> list[str]:
    reference = loaded["/healthz"].rps
    lines = [f"\nmaskd serve --workers {workers}"]
    lines.append(
        f"{'reads':20} {'conns':>5} {'requests':>8} {'errors':>6} {'req/s':>8} "
        f"{'x healthz':>9} {'p50 ms':>8} {'p99 ms':>8}"
    )
    for name, load in loaded.items():
        lines.append(
            f"{name:20} {100:>5} {load.requests:>8} {load.errors:>6} {load.rps:8.0f} "
            f"{load.rps / reference:9.2f} {load.p50_ms:8.1f} {load.p99_ms:8.1f}"
        )
    for name, load in latency.items():
        lines.append(
            f"{name:20} {10:>5} {load.requests:>8} {load.errors:>6} {load.rps:8.0f} "
            f"{'':>9} {load.p50_ms:8.1f} {load.p99_ms:8.1f}"
        )
    lines.append(
        f"{'GET /v1/jobs/{id}':20} {10:>5} {with_burst.requests:>8} {with_burst.errors:>6} "
        f"{with_burst.rps:8.0f} {'':>9} {with_burst.p50_ms:8.1f} {with_burst.p99_ms:8.1f}"
        "   (during the burst)"
    )
    statuses = ", ".join(
        f"{status}: {count}" for status, count in sorted(burst.statuses.items(), key=str)
    )
    lines.append(
        f"burst of {burst.statuses.total()} POST /v1/jobs: {statuses}; "
        f"p50 {burst.p50_ms:.0f} ms, p99 {burst.p99_ms:.0f} ms, max {burst.max_ms:.0f} ms"
    )
    per_process = {name: load.rps / workers for name, load in loaded.items()}
    for name in ("GET /v1/jobs/{id}", "GET /v1/jobs"):
        ratio = loaded[name].rps / reference
        lines.append(
            f"{name}: {ratio:.2f} x healthz (target >= {READ_TARGET_RATIO}), "
            f"{per_process[name]:.0f} req/s per API process (target >= {READ_TARGET_RPS:.0f}), "
            f"p99 at 10 connections {latency[name].p99_ms:.1f} ms "
            f"(target <= {READ_TARGET_P99_MS:.0f})"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each read load")
    parser.add_argument("--burst", type=int, default=200, help="submissions sent at once")
    parser.add_argument(
        "--api-workers", type=int, nargs="+", default=[1, 2], help="maskd serve --workers"
    )
    parser.add_argument("--redis-db", type=int, default=12, help="a Redis db no test uses")
    args = parser.parse_args()
    sigterm_as_interrupt()
    lines = [
        f"load generator: {load_generator()} (closed loop, another process), loopback; "
        "maskd serve on PostgreSQL + Redis, no worker; one job in the table"
    ]
    with ServiceStack(redis_db=args.redis_db) as stack:
        submitter = submitter_key(stack)
        job_id = seed_job(stack)
        for workers in args.api_workers:
            lines += measure(stack, workers, job_id, submitter, args)
    print("\n".join(lines))
    workers = " ".join(str(count) for count in args.api_workers)
    print(
        f"\ncommand: .venv/bin/python bench/api_speed.py --seconds {args.seconds:g} "
        f"--burst {args.burst} --api-workers {workers}"
    )


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "client":
        url, key, connections, seconds = sys.argv[2:]
        load = asyncio.run(python_client(url, key, int(connections), float(seconds)))
        print(json.dumps(load.__dict__))
    elif len(sys.argv) == 6 and sys.argv[1] == "burst":
        url, key, count, first_seed = sys.argv[2:]
        burst = asyncio.run(submit_burst(url, key, int(count), int(first_seed)))
        print(json.dumps(burst.__dict__))
    else:
        main()
