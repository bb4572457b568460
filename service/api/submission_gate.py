"""How many submissions an API process works on at once, so that reads keep their latency
while a burst of submissions arrives.

Every step of a request runs on the one event loop: reading and checking the body, the key
check, handing the spec to the validation pool, writing the answer. When 200 submissions arrive
together, 200 such steps become ready at once, and a read that arrives behind them waits for
all of them: hundreds of milliseconds. ``SubmissionGate`` lets ``in_flight`` submissions
(``MASKD_SUBMISSIONS_IN_FLIGHT``) past it at a time, before their bodies are read; the rest
wait here, which costs nothing, and a read waits behind a few steps at most. A burst takes
about as long as before, since the work is the same and the validation processes were its
bottleneck already.

The wait is bounded too: with ``queue_limit`` submissions already waiting
(``MASKD_VALIDATION_QUEUE_LIMIT``), the next is answered 503 with ``Retry-After`` at once,
instead of waiting until its client gives up.
"""

from __future__ import annotations

import asyncio

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.schemas import ErrorOut
from service.validation_pool import BUSY_RETRY_AFTER_SECONDS

SUBMISSIONS_PATHS = ("/v1/jobs", "/v1/jobs/estimate")
"""Submissions, and estimates: a dry run and a few training steps in the same pool."""


class SubmissionGate:
    """At most ``in_flight`` ``POST /v1/jobs`` at once past this point, and at most
    ``queue_limit`` waiting for their turn (503 beyond); other requests pass straight on."""

    def __init__(self, app: ASGIApp, in_flight: int, queue_limit: int) -> None:
        self.app = app
        self.in_flight = in_flight
        self.queue_limit = queue_limit
        self._waiting = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._turns = asyncio.Semaphore(in_flight)

    @property
    def waiting(self) -> int:
        """Submissions waiting for their turn now."""
        return self._waiting

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"].rstrip("/") in SUBMISSIONS_PATHS
        ):
            await self.app(scope, receive, send)
            return
        if self._waiting >= self.queue_limit:
            await self._busy(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a semaphore serves the one loop it first waited in
            self._loop, self._turns = loop, asyncio.Semaphore(self.in_flight)
        turns = self._turns
        self._waiting += 1
        try:
            await turns.acquire()
        finally:
            self._waiting -= 1
        try:
            await self.app(scope, receive, send)
        finally:
            turns.release()

    async def _busy(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = (
            f"{self._waiting} submissions are waiting in this API process "
            f"(MASKD_VALIDATION_QUEUE_LIMIT); retry in {BUSY_RETRY_AFTER_SECONDS} s"
        )
        response = JSONResponse(
            ErrorOut(detail=detail).model_dump(),
            status_code=503,
            headers={"Retry-After": str(BUSY_RETRY_AFTER_SECONDS)},
        )
        await response(scope, receive, send)
