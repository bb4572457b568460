"""Submission-to-running latency with an idle worker, on PostgreSQL and Redis, and where it goes.

What a user waits for between ``POST /v1/jobs`` and a job that runs: the API validates the spec
completely (a CPU dry run of both models) before it stores the job, the message goes through
Redis to an idle ``maskd worker`` (prefork), the child claims the job and moves it to STAGE1,
then opens the MLflow runs and builds the models before stage 1's first step. (Written when
every job ran in a freshly forked child that imported torch after the claim; pool children are
warm and kept now, which ``bench/worker_start.py`` measures.)

Jobs are submitted one at a time through the REST API, each after the previous one finished and
an idle pause, so the worker is idle at every submission. Two pauses alternate job by job: a
short one and one longer than Celery's 5 s pool-maintenance timer, because the replacement
child is forked only when the pool notices the old one exited, and that is what the two
compare. One warm-up job is left out of the figures and reported on its own: its POST imports
torch into the API process. Per job, the time from sending the POST is split at timestamps the
system records itself: the job's QUEUED transition (written after validation), the worker's
"received" log line (Redis delivery), the fork of the child that ran it (seen in
``/proc/<worker>/task/<worker>/children``, so Linux only), the "claimed by worker" event (the
child connected to the database), the STAGE1 transition and the "stage1 started" event (the
first step is next). Server times are UTC wall clock on this machine, as is the client's.

A fresh interpreter also times the imports the child does after STAGE1 (the core runner with
torch, and MLflow), with the worker parent's modules already loaded, as they are after a fork.

    .venv/bin/python bench/submit_latency.py [--jobs 12 --settle 1.0 5.5 --redis-db 13]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime

import httpx
from service_stack import ServiceStack, sigterm_as_interrupt, tiny_spec

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
WORKER_LOG = "worker.log"
RECEIVED_LINE = re.compile(
    r"^\[(?P<at>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): INFO/MainProcess\] "
    r"Task maskd\.run_job\[[^\]]+\] received"
)
CLAIM_MESSAGE = re.compile(r"^claimed by worker .*:(?P<pid>\d+):[0-9a-f]+, attempt")
IMPORT_PROBE = """
import json, time
import workers.tasks  # what the prefork parent holds before it forks the child
t0 = time.perf_counter()
import maskd_core.runner  # torch, torchvision, the core
t1 = time.perf_counter()
import workers.tracking  # mlflow
t2 = time.perf_counter()
print(json.dumps({"maskd_core.runner (torch)": t1 - t0, "workers.tracking (mlflow)": t2 - t1}))
"""
POINTS = [
    ("POST response (validation + insert + send)", "post"),
    ("QUEUED transition (after validation)", "queued"),
    ("worker received the message", "received"),
    ("child that ran it forked (if later)", "child_ready"),
    ("child claimed the job", "claimed"),
    ("STAGE1 transition  <- submit-to-running", "stage1"),
    ("stage1 started (first step next)", "first_step"),
]
SEGMENTS = [
    ("sent -> QUEUED (spec validation, dry run)", "queued", None),
    ("QUEUED -> received (dispatch + Redis)", "received", "queued"),
    ("received -> child forked (pool replacing it)", "child_ready", "received"),
    ("child ready -> claimed (DB connect, claim)", "claimed", "child_ready"),
    ("claimed -> STAGE1 (one transaction)", "stage1", "claimed"),
]


@dataclass
class Sample:
    """Seconds from sending the POST to each recorded point of one job."""

    post: float
    queued: float
    received: float
    child_ready: float
    claimed: float
    stage1: float
    first_step: float


class ChildWatcher:
    """Records when each pool child of the worker first appears (its fork, within 10 ms)."""

    def __init__(self, worker_pid: int) -> None:
        self._path = f"/proc/{worker_pid}/task/{worker_pid}/children"
        self.first_seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.01):
            try:
                with open(self._path) as children:
                    pids = [int(pid) for pid in children.read().split()]
            except OSError:
                continue
            now = time.time()
            for pid in pids:
                self.first_seen.setdefault(pid, now)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def received_times(worker_log: str) -> list[float]:
    """The worker parent's "Task ... received" times (local wall clock), in log order."""
    times = []
    for line in worker_log.splitlines():
        match = RECEIVED_LINE.match(line)
        if match:
            times.append(datetime.strptime(match["at"], "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return times


def wait_ready(stack: ServiceStack, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while " ready." not in stack.log(WORKER_LOG):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not start:\n{stack.log(WORKER_LOG)}")
        time.sleep(0.1)


def run_job(
    http: httpx.Client, stack: ServiceStack, children: ChildWatcher, seed: int, timeout: float
) -> Sample:
    """Submit one job, wait for its end, and place its recorded times against the send time."""
    received_before = len(received_times(stack.log(WORKER_LOG)))
    sent = time.time()
    response = http.post("/v1/jobs", json=tiny_spec(seed), headers=stack.auth)
    post = time.time() - sent
    response.raise_for_status()
    job_id = response.json()["id"]
    deadline = time.monotonic() + timeout
    while (job := http.get(f"/v1/jobs/{job_id}", headers=stack.auth).json())["state"] not in (
        TERMINAL
    ):
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} still {job['state']} after {timeout} s")
        time.sleep(0.05)
    if job["state"] != "SUCCEEDED":
        raise RuntimeError(f"job {job_id} ended {job['state']}:\n{stack.log(WORKER_LOG)}")
    events = http.get(f"/v1/jobs/{job_id}/events", headers=stack.auth).json()["data"]
    at = {t["to_state"]: epoch(t["at"]) for t in job["transitions"]}
    claim = next(e for e in events if CLAIM_MESSAGE.match(e["message"] or ""))
    claim_match = CLAIM_MESSAGE.match(claim["message"])
    assert claim_match is not None
    forked = children.first_seen.get(int(claim_match["pid"]), 0.0)
    first_step = next(
        epoch(e["created_at"]) for e in events if (e["message"] or "").startswith("stage1 started")
    )
    received = received_times(stack.log(WORKER_LOG))[received_before]
    return Sample(
        post=post,
        queued=at["QUEUED"] - sent,
        received=received - sent,
        child_ready=max(received, forked) - sent,
        claimed=epoch(claim["created_at"]) - sent,
        stage1=at["STAGE1"] - sent,
        first_step=first_step - sent,
    )


def import_times(stack: ServiceStack, rounds: int) -> dict[str, float]:
    """Median cold-import seconds of what the child imports after STAGE1."""
    runs = []
    for _ in range(rounds):
        out = subprocess.run(
            [sys.executable, "-c", IMPORT_PROBE],
            env=stack.env,
            capture_output=True,
            text=True,
            check=True,
            cwd=stack.temp_dir,
        ).stdout
        runs.append(json.loads(out.splitlines()[-1]))
    return {name: statistics.median(run[name] for run in runs) for name in runs[0]}


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (p95 of 12 samples is the largest)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * fraction // 1))
    return ordered[int(rank) - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=12, help="measured jobs per idle pause")
    parser.add_argument(
        "--settle",
        type=float,
        nargs="+",
        default=[1.0, 5.5],
        help="idle seconds between a job's end and the next submission; alternated",
    )
    parser.add_argument("--redis-db", type=int, default=13, help="a Redis db no test uses")
    parser.add_argument("--job-timeout", type=float, default=120.0)
    args = parser.parse_args()
    sigterm_as_interrupt()

    samples: dict[float, list[Sample]] = {settle: [] for settle in args.settle}
    with ServiceStack(redis_db=args.redis_db) as stack:
        base_url = stack.start_api()
        worker = stack.start_worker(WORKER_LOG)
        wait_ready(stack, worker, timeout=60)
        children = ChildWatcher(worker.pid)
        stack.cleanup.callback(children.close)
        with httpx.Client(base_url=base_url, timeout=args.job_timeout) as http:
            warmup = run_job(http, stack, children, seed=0, timeout=args.job_timeout)
            for round_index in range(args.jobs):
                for offset, settle in enumerate(args.settle):
                    time.sleep(settle)
                    seed = 1 + round_index * len(args.settle) + offset
                    samples[settle].append(
                        run_job(http, stack, children, seed=seed, timeout=args.job_timeout)
                    )
        imports = import_times(stack, rounds=3)

    print_results(args, samples, warmup, imports)


def print_results(
    args: argparse.Namespace,
    samples: dict[float, list[Sample]],
    warmup: Sample,
    imports: dict[str, float],
) -> None:
    print(
        f"submission latency: {args.jobs} jobs per idle pause, one at a time, on an idle "
        "worker\nPostgreSQL + Redis, 1 uvicorn worker, `maskd worker` (prefork, concurrency 1, "
        "1 task per child), 2 shared cores"
    )
    for settle, runs in samples.items():

        def column(name: str, runs: list[Sample] = runs) -> list[float]:
            return [getattr(run, name) for run in runs]

        print(f"\nidle pause {settle} s before each submission")
        print(f"{'from POST sent to (ms)':46} {'median':>8} {'p95':>8} {'max':>8} {'warm-up':>8}")
        for label, name in POINTS:
            values = column(name)
            print(
                f"{label:46} {ms(statistics.median(values))} {ms(percentile(values, 0.95))} "
                f"{ms(max(values))} {ms(getattr(warmup, name))}"
            )
        stage1_mean = statistics.mean(column("stage1"))
        print(f"{'segment (ms)':46} {'median':>8} {'p95':>8} {'mean':>8} {'% mean':>8}")
        for label, later, earlier in SEGMENTS:
            values = [
                getattr(run, later) - (getattr(run, earlier) if earlier else 0.0) for run in runs
            ]
            mean = statistics.mean(values)
            print(
                f"{label:46} {ms(statistics.median(values))} {ms(percentile(values, 0.95))} "
                f"{ms(mean)} {mean / stage1_mean:8.0%}"
            )
        after = [run.first_step - run.stage1 for run in runs]
        print(
            f"{'STAGE1 -> stage1 started (imports, MLflow)':46} "
            f"{ms(statistics.median(after))} {ms(percentile(after, 0.95))} "
            f"{ms(statistics.mean(after))}"
        )
    print("\ncold imports in the child after STAGE1 (fresh interpreter, median of 3):")
    for name, seconds in imports.items():
        print(f"  {name:28} {seconds * 1000:6.0f} ms")
    settles = " ".join(str(settle) for settle in args.settle)
    print(
        "\ncommand: .venv/bin/python bench/submit_latency.py "
        f"--jobs {args.jobs} --settle {settles} --redis-db {args.redis_db}"
    )


if __name__ == "__main__":
    main()
