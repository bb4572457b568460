"""Submissions are validated in a bounded pool of processes, never in the API process itself."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from service_testkit import Api, open_api, spec_body

from maskd_core.spec import JobSpec
from service import validation_pool
from service.config import Settings
from service.db import make_engine, make_sessionmaker
from service.store import JobStore
from service.validation_pool import SpecProblem, Validated, ValidationBusy, ValidationPool

SUBMIT_IN_A_FRESH_PROCESS = """
import json, sys
from fastapi.testclient import TestClient
from service.main import create_app
body, key = json.loads(sys.argv[1]), sys.argv[2]
with TestClient(create_app()) as http:
    answer = http.post("/v1/jobs", json=body, headers={"Authorization": key})
print(json.dumps({"status": answer.status_code, "torch": "torch" in sys.modules}))
"""


def test_the_api_process_never_imports_torch(sqlite_url: str, tmp_path: Path) -> None:
    """The dry run needs torch; the API process answers the submission without loading it."""
    engine = make_engine(sqlite_url)
    try:
        key = JobStore(make_sessionmaker(engine)).create_api_key("acme")
    finally:
        engine.dispose()
    env = {
        **os.environ,
        "MASKD_DATABASE_URL": sqlite_url,
        "MASKD_BROKER_URL": "filesystem://",
        "MASKD_DATA_DIR": str(tmp_path / "var"),
        "MASKD_MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    done = subprocess.run(
        [sys.executable, "-c", SUBMIT_IN_A_FRESH_PROCESS, json.dumps(spec_body()), f"Bearer {key}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome == {"status": 201, "torch": False}, done.stderr[-2000:]


def test_a_full_validation_queue_answers_503_with_retry_after(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With MASKD_VALIDATION_QUEUE_LIMIT submissions waiting, the next is told to come back
    (and nothing of it is stored) instead of queueing without bound."""
    entered, release = threading.Event(), threading.Event()
    real_validate = validation_pool._validate

    def held_validate(*args: object) -> Validated | SpecProblem:
        entered.set()
        release.wait(timeout=60)
        return real_validate(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(validation_pool, "_validate", held_validate)
    settings = api.settings.model_copy(
        update={"validation_processes": 0, "validation_queue_limit": 1}
    )
    with open_api(settings, api.store) as busy:
        first: dict[str, int] = {}
        sender = threading.Thread(
            target=lambda: first.setdefault(
                "status",
                busy.http.post(
                    "/v1/jobs", json=spec_body("first"), headers=busy.headers()
                ).status_code,
            )
        )
        sender.start()
        assert entered.wait(timeout=60), "the first submission reached validation"
        refused = busy.http.post("/v1/jobs", json=spec_body("second"), headers=busy.headers())
        release.set()
        sender.join(timeout=60)
        listed = busy.http.get("/v1/jobs", headers=busy.headers()).json()["data"]

    assert refused.status_code == 503, refused.text
    assert refused.headers["Retry-After"] == str(validation_pool.BUSY_RETRY_AFTER_SECONDS)
    assert "MASKD_VALIDATION_QUEUE_LIMIT" in refused.json()["detail"]
    assert first == {"status": 201}
    assert [job["name"] for job in listed] == ["first"], "the refused one was not stored"


def test_a_killed_validation_process_costs_one_503_and_is_replaced(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "var")
    spec = JobSpec.model_validate(spec_body())
    pool = ValidationPool(processes=1, queue_limit=8)

    async def validate() -> Validated | SpecProblem:
        return await pool.validate(spec, spec, "acme", settings)

    try:
        assert isinstance(asyncio.run(validate()), Validated)
        # The executor's own record of its processes: there is no public one to read.
        [pid] = list(pool._executor._processes)  # type: ignore[union-attr]
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ValidationBusy, match="submit it again"):
            asyncio.run(validate())
        assert isinstance(asyncio.run(validate()), Validated), "a new process took over"
    finally:
        pool.shutdown()
