"""Schemathesis against the live app: generated requests never get a 500, and every answer is
one the OpenAPI document describes (status code, content type, headers and body schema).

The app runs in-process (ASGI) with the embedded settings: SQLite, the filesystem broker and a
SQLite MLflow store in a temporary folder, so it needs no shared server. Every operation gets
requests that fit the schema and, where it has inputs, requests that do not (negative mode),
about 1,800 in all. The stateful run follows the OpenAPI links from a submitted job to reading,
cancelling and listing the events of that job.

``positive_data_acceptance`` is left out: a spec can fit the schema and still name a model that
does not exist, which only the dry run finds (a 422 by design).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from service_testkit import spec_body
from sqlalchemy import delete

from maskd_core.spec import JobSpec
from maskd_core.validate import validate_job
from service.config import Settings
from service.db import make_engine, make_sessionmaker, upgrade_to_head
from service.main import create_app
from service.models import Job, JobEvent
from service.store import JobStore

pytestmark = pytest.mark.slow

EXAMPLES_PER_OPERATION = 100
"""Per operation and generation mode; operations without inputs have one case only."""

STATEFUL_SCENARIOS = 80
"""Enough that the links from a submitted job (read it, cancel it) are followed in every run:
each step picks among all the API's operations, and 40 left the cancel out now and then once
the estimate and export routes were added."""

REQUEST_TIMEOUT_SECONDS = 60

EXCLUDED_CHECKS = [schemathesis.checks.positive_data_acceptance]


@dataclass
class FuzzedApi:
    app: FastAPI
    key: str
    database_url: str

    def forget_jobs(self) -> None:
        """Delete every job and its events, as if none had been submitted."""
        engine = make_engine(self.database_url)
        try:
            with engine.begin() as connection:
                connection.execute(delete(JobEvent))
                connection.execute(delete(Job))
        finally:
            engine.dispose()


@pytest.fixture(scope="module")
def fuzzed_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzedApi]:
    # Torch loads and the first models build here, not inside a timed request.
    validate_job(JobSpec.model_validate(spec_body()))
    root: Path = tmp_path_factory.mktemp("fuzz")
    url = f"sqlite:///{root / 'maskd.db'}"
    upgrade_to_head(url)
    engine = make_engine(url)
    try:
        key = JobStore(make_sessionmaker(engine)).create_api_key("acme")
        settings_ = Settings(
            database_url=url,
            broker_url="filesystem://",
            data_dir=root / "var",
            mlflow_tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
            sse_poll_interval_seconds=0.01,
        )
        yield FuzzedApi(create_app(settings_), key, url)
    finally:
        engine.dispose()


def _schema(api: FuzzedApi) -> Any:
    schema = schemathesis.openapi.from_asgi("/openapi.json", api.app)
    # A valid submission runs a dry run of two models: seconds on a busy 2-core machine.
    schema.config.update(
        headers={"Authorization": f"Bearer {api.key}"}, request_timeout=REQUEST_TIMEOUT_SECONDS
    )
    # A queued job's event stream stays open until the job ends: read its first event (the
    # stream always opens with one, the job's progress or its history), not until the timeout.
    schema.config.max_stream_events = 1
    return schema


def _has_inputs(operation: Any) -> bool:
    definition = operation.definition.raw
    return bool(definition.get("parameters") or definition.get("requestBody"))


def test_generated_requests_get_documented_answers_and_no_server_error(
    fuzzed_api: FuzzedApi,
) -> None:
    schema = _schema(fuzzed_api)
    sent: Counter[str] = Counter()
    failures: dict[str, str] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [GenerationMode.POSITIVE]
        if _has_inputs(operation):
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            _fuzz(operation, mode, sent, failures)
    total = sum(sent.values())
    print(f"{total} generated requests: {dict(sent)}")  # shown with pytest -s / -rP
    assert not failures, f"{len(failures)} distinct failures in {total} requests:\n\n" + (
        "\n\n".join(failures.values())
    )
    assert total >= 1000, f"only {total} requests were generated: {dict(sent)}"


def _fuzz(operation: Any, mode: Any, sent: Counter[str], failures: dict[str, str]) -> None:
    label = f"{operation.label} ({mode.value})"

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        sent[label] += 1
        try:
            case.call_and_validate(excluded_checks=EXCLUDED_CHECKS)
        except BaseException as error:  # a failed check: kept, and the fuzzing goes on
            if not isinstance(error, Exception | BaseExceptionGroup):
                raise
            failures.setdefault(f"{label}: {str(error)[:300]}", f"{label}: {error}")

    try:
        run()
    except Exception as error:
        # Hypothesis finds nothing to generate for an operation whose inputs allow no
        # schema-violating value (a bare string path parameter, say): not a failure.
        if "Unable to satisfy assumptions" not in str(error):
            raise


def test_links_from_a_submitted_job_lead_to_documented_answers(fuzzed_api: FuzzedApi) -> None:
    """Stateful: submit jobs (a valid spec in two of three submissions, so the links have a
    job to follow), then read, cancel and list the events of the jobs the answers link to.

    Every scenario starts with no jobs. Schemathesis also infers links from the job list, and
    Hypothesis requires a scenario's steps to depend on its own draws only: jobs left by
    earlier scenarios would make the same draws meet a different list, which Hypothesis
    reports as flaky data generation.
    """
    schema = _schema(fuzzed_api)
    auth = {"Authorization": f"Bearer {fuzzed_api.key}"}
    valid_spec = spec_body("fuzzed")
    answers: Counter[str] = Counter()

    class Workflow(schema.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            fuzzed_api.forget_jobs()

        def after_call(self, response: Any, case: Any) -> None:
            answers[f"{case.operation.label} {response.status_code}"] += 1
            super().after_call(response, case)

        def before_call(self, case: Any) -> None:
            if case.operation.label != "POST /v1/jobs":
                return
            # Decided by the generated body itself, so Hypothesis replays a scenario alike; and
            # no Idempotency-Key, whose replay would answer differently the second time.
            if len(repr(case.body)) % 3:
                case.body = dict(valid_spec)
            if case.headers:
                case.headers = {
                    name: value
                    for name, value in case.headers.items()
                    if name.lower() != "idempotency-key"
                }

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            # A swapped body no longer matches the mode it was generated in, so the checks
            # that compare the answer with that mode are skipped here.
            case.validate_response(
                response,
                headers=auth,
                excluded_checks=[
                    *EXCLUDED_CHECKS,
                    schemathesis.checks.negative_data_rejection,
                ],
            )

    run: Callable[..., None] = Workflow.run
    run(
        settings=settings(
            max_examples=STATEFUL_SCENARIOS,
            stateful_step_count=8,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
    )
    print(f"{sum(answers.values())} stateful requests: {dict(answers)}")
    followed = {"GET /v1/jobs/{job_id} 200", "POST /v1/jobs/{job_id}/cancel 202"}
    assert followed <= set(answers), f"the links were not followed: {dict(answers)}"
