"""What showing the pairing at submission adds to a submission: the pool process's answer
carries ``JobPlan.pairing`` (``service.validation_pool.Validated``) and the stored job's outputs
hold it, next to the dry run (``validate_job``) every submission already does.

Per spec, rounds alternate: the dry run as a submission's pool process does it (its model
probe warm, so a known pairing, the submission-burst case), then the added work alone: building
the pairing from the plan, pickling the answer across the process boundary and back, and
serialising the outputs as the store writes them. Medians of the rounds are compared; the bytes
added to the answer and to the job's row are printed too. Two specs: the API bench's tiny
segmentation job (one level) and a zero-config FCOS pair (five FPN levels, strides declared).

    .venv/bin/python bench/pairing_at_submission.py [--rounds 200]
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import time
from typing import Any

from service_stack import tiny_spec

from maskd_core.plan import JobPlan
from maskd_core.spec import JobSpec
from maskd_core.validate import validate_job
from service.validation_pool import Validated


def detection_spec() -> dict[str, Any]:
    size = {"backbone": "tiny", "min_size": 64, "max_size": 64}
    return {
        "name": "bench-fcos",
        "task": "detection",
        "device": "cpu",
        "dataset": {"name": "procedural_boxes", "args": {"num_samples": 2, "image_size": 64}},
        "teacher": {"arch": "fcos", "args": {**size, "fpn_channels": 64}},
        "student": {"arch": "fcos", "args": {**size, "fpn_channels": 32}},
    }


def added_work(plan: JobPlan) -> int:
    """What the pairing adds: the answer's pickle round trip and the outputs' JSON; its bytes."""
    answer = pickle.loads(pickle.dumps(Validated(plan.pairing())))
    return len(json.dumps({"pairing": answer.pairing}))


def measure(name: str, body: dict[str, Any], rounds: int) -> None:
    spec = JobSpec.model_validate(body)
    plan = validate_job(spec)  # warms the pool process's probe, as a known pairing is
    dry_run, added = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        validate_job(spec)
        middle = time.perf_counter()
        row_bytes = added_work(plan)
        ended = time.perf_counter()
        dry_run.append(middle - started)
        added.append(ended - middle)
    answer_bytes = len(pickle.dumps(Validated(plan.pairing()))) - len(pickle.dumps(None))
    dry, extra = statistics.median(dry_run), statistics.median(added)
    print(
        f"{name}: {len(plan.levels)} level(s); dry run {dry * 1e3:.2f} ms, pairing added "
        f"{extra * 1e6:.0f} us = {extra / dry:.2%} of it; answer +{answer_bytes} B pickled, "
        f"row +{row_bytes} B JSON"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    measure("tiny segmentation", tiny_spec(), args.rounds)
    measure("zero-config fcos", detection_spec(), args.rounds)


if __name__ == "__main__":
    main()
