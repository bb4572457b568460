"""Chaos: workers killed at random stages, a broker flush and a database purge, over many jobs.

The stack is deployed as in production, on PostgreSQL and Redis (``service_stack``): the API
(uvicorn), ``maskd reconcile`` as its own process and ``maskd worker`` processes, with short
leases so a lost worker is noticed in seconds (``FAST``). Jobs are submitted through the REST
API, then, while they run:

- ``--kills`` times, a worker is killed with SIGKILL (its whole process group, like a machine
  that vanishes) while one of its jobs is in the next stage of STAGE1 → STAGE2 → REGISTERING,
  and a fresh worker is started in its place. A job is killed at most ``MAX_KILLS_PER_JOB``
  times, so that each one can still finish within the attempt limit;
- once a third of the jobs ended, the Redis database of the broker is flushed (queued messages
  and the ones workers reserved are gone);
- once half of them ended, every connection to the job database is terminated
  (``pg_terminate_backend``), as a failover or a proxy restart does.

It prints jobs finished / lost / failed, registered versions per job (a duplicate is a job with
more than one version for its student) and the recovery time of each kill: from the kill to
the reconciler re-queueing the job it interrupted (lease expiry plus at most one pass), and to
the next "claimed by worker" event of that job. The second includes the wait behind the jobs
queued before it, since a re-queued job goes to the back of the queue. Exit status 1 unless
every job SUCCEEDED with exactly one version and no MLflow run is left RUNNING.

    .venv/bin/python bench/chaos.py [--jobs 12 --workers 2 --kills 6 --redis-db 11]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import redis
from mlflow import MlflowClient
from service_stack import ServiceStack, sigterm_as_interrupt, tiny_spec
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from service.mlflow_names import VERSION_JOB_ID_TAG, registered_model_name

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
TARGET_STAGES = ["STAGE1", "STAGE2", "REGISTERING"]
MAX_KILLS_PER_JOB = 2
"""Three claims per job (``workers.outcomes.MAX_ATTEMPTS``): two kills leave the last one."""

FAST = {
    "MASKD_LEASE_SECONDS": "4",
    "MASKD_HEARTBEAT_SECONDS": "1",
    "MASKD_REDISPATCH_AFTER_SECONDS": "3",
    "MASKD_RECONCILE_INTERVAL_SECONDS": "1",
}
JOB_NAME = "chaos"


@dataclass
class Kill:
    job_id: str
    stage: str
    at: datetime
    requeued_after: float | None = None
    recovered_after: float | None = None


@dataclass
class Chaos:
    stack: ServiceStack
    http: httpx.Client
    workers: list[Any] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    kills_per_job: Counter[str] = field(default_factory=Counter)
    flushed_at: float | None = None
    purged_at: float | None = None
    started_workers: int = 0

    def start_worker(self) -> None:
        self.started_workers += 1
        self.workers.append(self.stack.start_worker(f"worker-{self.started_workers}.log"))

    def jobs(self) -> list[dict[str, Any]]:
        page = self.http.get("/v1/jobs", params={"limit": 100}).raise_for_status().json()
        jobs: list[dict[str, Any]] = page["data"]
        return jobs

    def kill_one_in(self, stage: str, jobs: list[dict[str, Any]]) -> bool:
        """SIGKILL the worker running a job in ``stage``; False when no such job runs now."""
        candidates = [
            job
            for job in jobs
            if job["state"] == stage and self.kills_per_job[job["id"]] < MAX_KILLS_PER_JOB
        ]
        random.shuffle(candidates)
        for job in candidates:
            worker = self._worker_running(job["id"])
            if worker is None:
                continue
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
            self.workers.remove(worker)
            self.kills.append(Kill(job["id"], stage, datetime.now(UTC)))
            self.kills_per_job[job["id"]] += 1
            self.start_worker()
            return True
        return False

    def _worker_running(self, job_id: str) -> Any:
        """The worker process whose pool child holds ``job_id``'s lease right now."""
        with _connect(self.stack.database_url) as connection:
            owner = connection.execute(
                text("SELECT lease_owner FROM jobs WHERE id = :id"), {"id": job_id}
            ).scalar()
        if not owner:
            return None
        child = int(owner.split(":")[-2])  # "<host>:<pid>:<delivery>"
        try:
            group = os.getpgid(child)
        except ProcessLookupError:
            return None
        return next((w for w in self.workers if w.pid == group and w.poll() is None), None)

    def flush_broker(self) -> None:
        client = redis.Redis.from_url(self.stack.env["MASKD_BROKER_URL"])
        client.flushdb()
        client.close()

    def purge_database_connections(self) -> int:
        with _connect(self.stack.database_url) as connection:
            return len(
                connection.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                ).all()
            )


def _connect(url: str) -> Any:
    """A connection of its own, closed after use: the purge must not break the bench."""
    return create_engine(url, poolclass=NullPool).connect()


def measure_recoveries(chaos: Chaos) -> None:
    """Per kill: when the reconciler re-queued the job, and when a worker claimed it again."""
    first_after = text(
        "SELECT min(created_at) FROM job_events WHERE job_id = :id "
        "AND message LIKE :message AND created_at > :at"
    )
    with _connect(chaos.stack.database_url) as connection:
        for kill in chaos.kills:
            found = {}
            for name, message in (("requeued", "worker lost%"), ("claimed", "claimed by worker %")):
                found[name] = connection.execute(
                    first_after, {"id": kill.job_id, "message": message, "at": kill.at}
                ).scalar()
            if found["requeued"] is not None:
                kill.requeued_after = (found["requeued"] - kill.at).total_seconds()
            if found["claimed"] is not None:
                kill.recovered_after = (found["claimed"] - kill.at).total_seconds()


def runs_left_running(stack: ServiceStack, patience: float = 15.0) -> int:
    """MLflow runs still RUNNING once every job ended, after giving the reconciler (which ends
    those a killed worker left open) ``patience`` seconds."""
    client = MlflowClient(stack.env["MASKD_MLFLOW_TRACKING_URI"])
    deadline = time.monotonic() + patience
    while True:
        experiments = [e.experiment_id for e in client.search_experiments()]
        running = client.search_runs(experiments, "attributes.status = 'RUNNING'")
        if not running or time.monotonic() > deadline:
            return len(running)
        time.sleep(1.0)


def versions_per_job(stack: ServiceStack) -> Counter[str]:
    client = MlflowClient(stack.env["MASKD_MLFLOW_TRACKING_URI"])
    name = registered_model_name("bench", JOB_NAME)
    versions = client.search_model_versions(f"name = '{name}'")
    return Counter(version.tags.get(VERSION_JOB_ID_TAG, "?") for version in versions)


def run(args: argparse.Namespace) -> int:
    random.seed(args.seed)
    with ServiceStack(redis_db=args.redis_db) as stack:
        stack.env.update(FAST)
        base_url = stack.start_api()
        stack.start_reconciler()
        with httpx.Client(base_url=base_url, headers=stack.auth, timeout=120) as http:
            chaos = Chaos(stack, http)
            for _ in range(args.workers):
                chaos.start_worker()
            spec = {
                **tiny_spec(),
                "name": JOB_NAME,
                "stage2": {"iterations": args.stage2_iterations},
                "checkpoint_every": 10,
            }
            submitted = [
                http.post("/v1/jobs", json={**spec, "seed": seed}).raise_for_status().json()["id"]
                for seed in range(args.jobs)
            ]
            print(f"submitted {len(submitted)} jobs to {args.workers} workers", flush=True)
            started = time.monotonic()
            targets = [TARGET_STAGES[i % len(TARGET_STAGES)] for i in range(args.kills)]
            jobs = chaos.jobs()
            while time.monotonic() - started < args.timeout:
                try:
                    jobs = chaos.jobs()
                except httpx.HTTPError as error:  # the purge may cut the API's connections
                    print(f"  API answered {error!r}; retrying", flush=True)
                    time.sleep(0.5)
                    continue
                ended = sum(job["state"] in TERMINAL for job in jobs)
                if ended == len(submitted):
                    break
                if targets and chaos.kill_one_in(targets[0], jobs):
                    kill = chaos.kills[-1]
                    print(f"  killed the worker of {kill.job_id[:8]} in {kill.stage}", flush=True)
                    targets.pop(0)
                if chaos.flushed_at is None and ended >= len(submitted) / 3:
                    chaos.flush_broker()
                    chaos.flushed_at = time.monotonic() - started
                    print(f"  flushed the broker at {chaos.flushed_at:.0f} s", flush=True)
                if chaos.purged_at is None and ended >= len(submitted) / 2:
                    purged = chaos.purge_database_connections()
                    chaos.purged_at = time.monotonic() - started
                    print(
                        f"  terminated {purged} database connections at {chaos.purged_at:.0f} s",
                        flush=True,
                    )
                time.sleep(0.1)
            wall = time.monotonic() - started
            measure_recoveries(chaos)
            versions = versions_per_job(stack)
            running = runs_left_running(stack)
            return report(args, jobs, chaos, versions, running, wall, len(targets))


def report(
    args: argparse.Namespace,
    jobs: list[dict[str, Any]],
    chaos: Chaos,
    versions: Counter[str],
    running_runs: int,
    wall: float,
    kills_not_done: int,
) -> int:
    states = Counter(job["state"] for job in jobs)
    succeeded = [job for job in jobs if job["state"] == "SUCCEEDED"]
    lost = [job for job in jobs if job["state"] not in TERMINAL]
    duplicated = {job_id: n for job_id, n in versions.items() if n > 1}
    unregistered = [job["id"] for job in succeeded if versions[job["id"]] == 0]
    requeues = [k.requeued_after for k in chaos.kills if k.requeued_after is not None]
    recoveries = [k.recovered_after for k in chaos.kills if k.recovered_after is not None]
    print(f"\nchaos over {len(jobs)} jobs, {args.workers} workers, {wall:.0f} s wall")
    print(f"  kills: {len(chaos.kills)} ({Counter(k.stage for k in chaos.kills)})")
    if kills_not_done:
        print(f"  kills not made (no job in the stage before the end): {kills_not_done}")
    flushed, purged = chaos.flushed_at is not None, chaos.purged_at is not None
    print(f"  broker flushed: {flushed}, db purged: {purged}")
    print(f"  jobs: {dict(states)}")
    print(f"  finished (SUCCEEDED): {len(succeeded)} / {len(jobs)}")
    print(f"  lost (not finished): {len(lost)}")
    for job in jobs:
        if job["state"] == "FAILED":
            print(f"  FAILED {job['id'][:8]} ({job['failure_kind']}): {job['message'][:200]}")
    print(f"  registered versions: {sum(versions.values())}, duplicated: {len(duplicated)}")
    print(f"  MLflow runs left RUNNING after every job ended: {running_runs}")
    if unregistered:
        print(f"  SUCCEEDED without a version: {unregistered}")
    if requeues:
        print(
            "  kill to re-queued (lease expiry + a reconciler pass): "
            f"mean {statistics.mean(requeues):.1f} s, max {max(requeues):.1f} s"
        )
    if recoveries:
        print(
            "  recovery after a kill (to the next claim): "
            f"mean {statistics.mean(recoveries):.1f} s, max {max(recoveries):.1f} s "
            f"over {len(recoveries)} kills"
        )
    ok = len(succeeded) == len(jobs) and not duplicated and not unregistered and not running_runs
    print("RESULT:", "ok" if ok else "FAILED")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--stage2-iterations", type=int, default=150)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--redis-db", type=int, default=11)
    args = parser.parse_args()
    sigterm_as_interrupt()
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
