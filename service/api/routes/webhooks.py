"""``/v1/webhooks``: register URLs told of every state change of the project's jobs, and read
each URL's delivery log.

A project sees and deletes only its own endpoints; another project's reads as missing (404).
The signing secret is returned once, by the ``POST`` that creates the endpoint. Deliveries are
sent by the webhook sender beside the reconciler (``service.webhooks``); docs/webhooks.md
says how receivers verify them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field

from service.api.deps import CurrentProject, SettingsDep, StoreDep
from service.api.schemas import error_responses
from service.lifecycle import JobState
from service.store import (
    DeliveryRecord,
    InvalidCursor,
    WebhookLimitReached,
    WebhookNotFound,
    WebhookRecord,
)
from service.webhook_signing import DELIVERY_HEADER, SIGNATURE_HEADER
from service.webhooks import MAX_URL_LENGTH, WebhookUrlRefused, check_webhook_url

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


class WebhookIn(BaseModel):
    """An endpoint to register."""

    model_config = {"extra": "forbid"}

    url: str = Field(
        min_length=1,
        max_length=MAX_URL_LENGTH,
        description="Where to POST: an http(s) URL without credentials, whose host resolves "
        "to public addresses (unless the operator allows private ones).",
    )
    states: list[JobState] | None = Field(
        default=None,
        min_length=1,
        description="Only transitions into these states, e.g. [SUCCEEDED, FAILED]; "
        "leave it out for every state change.",
    )


class WebhookOut(BaseModel):
    """A registered endpoint (its secret is never shown again)."""

    id: str
    url: str
    states: list[JobState] | None = Field(description="The states it is told of; null: all.")
    created_at: datetime

    @classmethod
    def from_record(cls, record: WebhookRecord) -> WebhookOut:
        return cls(
            id=record.id,
            url=record.url,
            states=None if record.states is None else list(record.states),
            created_at=record.created_at,
        )


class WebhookCreatedOut(WebhookOut):
    secret: str = Field(
        description=f"The signing secret, shown this once: verify each delivery's "
        f"{SIGNATURE_HEADER} header with it (HMAC-SHA256 of '<t>.<body>'). Store it now; to "
        "change it, register a new endpoint and delete this one."
    )


class WebhookPage(BaseModel):
    data: list[WebhookOut]


class DeliveryOut(BaseModel):
    """One event for the endpoint, and how sending it went."""

    id: str = Field(description=f"The delivery id, sent as {DELIVERY_HEADER} on every attempt.")
    event: str = Field(description="The event type: job.state_changed.")
    job_id: str
    from_state: JobState | None
    to_state: JobState
    status: str = Field(
        description="pending (next_attempt_at says when), delivered, or failed (no retries left)."
    )
    attempts: int = Field(description="Attempts made so far.")
    last_status_code: int | None = Field(description="The HTTP status of the last attempt.")
    last_error: str | None = Field(description="Why the last attempt failed, if it did.")
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    created_at: datetime

    @classmethod
    def from_record(cls, record: DeliveryRecord) -> DeliveryOut:
        return cls(
            id=record.id,
            event=record.event,
            job_id=record.job_id,
            from_state=record.from_state,
            to_state=record.to_state,
            status=record.status,
            attempts=record.attempts,
            last_status_code=record.last_status_code,
            last_error=record.last_error,
            next_attempt_at=record.next_attempt_at,
            delivered_at=record.delivered_at,
            created_at=record.created_at,
        )


class DeliveryPage(BaseModel):
    data: list[DeliveryOut]
    next_cursor: str | None


def _webhook_not_found(error: WebhookNotFound) -> HTTPException:
    return HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail=str(error))


@router.post("", status_code=status.HTTP_201_CREATED, responses=error_responses(409))
def create_webhook(
    body: WebhookIn, project: CurrentProject, store: StoreDep, settings: SettingsDep
) -> WebhookCreatedOut:
    """Register a URL for the project's job state changes; the answer holds the signing
    secret, shown only this once. 422 names what is wrong with the URL; 409 when the project
    has MASKD_MAX_WEBHOOKS_PER_PROJECT endpoints already."""
    try:
        url = check_webhook_url(body.url, settings.webhook_allow_private_addresses)
    except WebhookUrlRefused as error:
        raise RequestValidationError(
            [{"loc": ["body", "url"], "msg": str(error), "type": "webhook_url"}]
        ) from error
    try:
        record, secret = store.create_webhook(
            project.id, url, body.states, max_per_project=settings.max_webhooks_per_project
        )
    except WebhookLimitReached as error:
        raise HTTPException(status_code=status.HTTP_409_CONFLICT, detail=str(error)) from error
    return WebhookCreatedOut(**WebhookOut.from_record(record).model_dump(), secret=secret)


@router.get("")
def list_webhooks(project: CurrentProject, store: StoreDep) -> WebhookPage:
    """The project's endpoints, oldest first (without their secrets)."""
    return WebhookPage(
        data=[WebhookOut.from_record(record) for record in store.list_webhooks(project.id)]
    )


@router.delete(
    "/{webhook_id}", status_code=status.HTTP_204_NO_CONTENT, responses=error_responses(404)
)
def delete_webhook(webhook_id: str, project: CurrentProject, store: StoreDep) -> Response:
    """Stop sending to the endpoint and drop its delivery log (pending ones are not sent)."""
    try:
        store.delete_webhook(project.id, webhook_id)
    except WebhookNotFound as error:
        raise _webhook_not_found(error) from error
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{webhook_id}/deliveries", responses=error_responses(404))
def list_webhook_deliveries(
    webhook_id: str,
    project: CurrentProject,
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 50,
    cursor: Annotated[
        str | None, Query(description="The `next_cursor` of the previous page.")
    ] = None,
) -> DeliveryPage:
    """The endpoint's delivery log, newest first: each event, its attempts, the last status
    code or error, and when it was delivered or will be tried again."""
    try:
        records, next_cursor = store.list_deliveries(
            project.id, webhook_id, cursor=cursor, limit=limit
        )
    except WebhookNotFound as error:
        raise _webhook_not_found(error) from error
    except InvalidCursor as error:
        raise RequestValidationError(
            [{"loc": ["query", "cursor"], "msg": str(error), "type": "invalid_cursor"}]
        ) from error
    return DeliveryPage(
        data=[DeliveryOut.from_record(record) for record in records], next_cursor=next_cursor
    )
