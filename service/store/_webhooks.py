"""Webhook endpoints and their delivery log: the API's side (scoped to one project) and the
sender's side (any project's due deliveries, claimed so two senders never send one twice).

The deliveries themselves are written by ``_outbox`` with each state change; the sender
(``service.webhooks``) claims the due ones, posts them and records each attempt here.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, delete, func, or_, select

from service.lifecycle import JobState
from service.models import Project, WebhookDelivery, WebhookEndpoint
from service.store._base import StoreBase
from service.store._outbox import DELIVERY_DELIVERED, DELIVERY_FAILED, DELIVERY_PENDING
from service.store._records import StoreError, decode_cursor, encode_cursor

SECRET_PREFIX = "whsec_"
_ANY_DUE = (
    select(WebhookDelivery.id)
    .where(
        WebhookDelivery.status == DELIVERY_PENDING,
        WebhookDelivery.next_attempt_at <= bindparam("now"),
    )
    .limit(1)
)


class WebhookNotFound(StoreError):  # noqa: N818 - reads as the condition it reports
    """No such webhook in this project (another project's reads the same)."""

    def __init__(self, webhook_id: str) -> None:
        super().__init__(
            f"webhook {webhook_id} not found in this project; list yours with GET /v1/webhooks"
        )
        self.webhook_id = webhook_id


class WebhookLimitReached(StoreError):  # noqa: N818 - reads as the condition it reports
    """The project already has as many endpoints as it may; nothing was stored."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"this project already has {limit} webhooks, the most it may have "
            "(MASKD_MAX_WEBHOOKS_PER_PROJECT); delete one with DELETE /v1/webhooks/{id} first"
        )
        self.limit = limit


@dataclass(frozen=True)
class WebhookRecord:
    """A registered endpoint as its project may see it: never the secret."""

    id: str
    project_id: str
    url: str
    states: tuple[JobState, ...] | None
    created_at: datetime


@dataclass(frozen=True)
class DeliveryRecord:
    """One line of an endpoint's delivery log."""

    id: str
    webhook_id: str
    job_id: str
    event: str
    from_state: JobState | None
    to_state: JobState
    status: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    created_at: datetime


@dataclass(frozen=True)
class DeliveryAttempt:
    """How one attempt went, as the sender reports it: ``retry_after`` None on a failure
    means no attempts are left."""

    delivery_id: str
    delivered: bool
    status_code: int | None
    error: str | None
    retry_after: timedelta | None


@dataclass(frozen=True)
class DueDelivery:
    """What the sender needs to make one attempt: where, signed with what, and the body."""

    id: str
    url: str
    secret: str
    event: str
    payload: dict[str, Any]
    attempts: int


def _webhook_record(endpoint: WebhookEndpoint) -> WebhookRecord:
    return WebhookRecord(
        id=endpoint.id,
        project_id=endpoint.project_id,
        url=endpoint.url,
        states=None if endpoint.states is None else tuple(JobState(s) for s in endpoint.states),
        created_at=endpoint.created_at,
    )


def _delivery_record(delivery: WebhookDelivery) -> DeliveryRecord:
    data = delivery.payload["data"]
    return DeliveryRecord(
        id=delivery.id,
        webhook_id=delivery.endpoint_id,
        job_id=delivery.job_id,
        event=delivery.event,
        from_state=None if data["from_state"] is None else JobState(data["from_state"]),
        to_state=JobState(data["to_state"]),
        status=delivery.status,
        attempts=delivery.attempts,
        last_status_code=delivery.last_status_code,
        last_error=delivery.last_error,
        next_attempt_at=delivery.next_attempt_at,
        delivered_at=delivery.delivered_at,
        created_at=delivery.created_at,
    )


class WebhooksMixin(StoreBase):
    """``JobStore``'s methods for webhook endpoints and deliveries."""

    def create_webhook(
        self,
        project_id: str,
        url: str,
        states: Sequence[JobState] | None,
        *,
        max_per_project: int,
    ) -> tuple[WebhookRecord, str]:
        """Register ``url`` for the project; returns the endpoint and its new signing secret,
        which is shown to the caller this once.

        Raises ``WebhookLimitReached`` when the project has ``max_per_project`` endpoints
        already; the count and the insert share a transaction holding the project's row lock.
        The URL is checked by the caller (``service.webhooks.check_webhook_url``).
        """
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        with self._sessions.begin() as session:
            session.get(Project, project_id, with_for_update={"key_share": True})
            count = session.scalar(
                select(func.count())
                .select_from(WebhookEndpoint)
                .where(WebhookEndpoint.project_id == project_id)
            )
            if (count or 0) >= max_per_project:
                raise WebhookLimitReached(max_per_project)
            endpoint = WebhookEndpoint(
                id=str(uuid.uuid4()),
                project_id=project_id,
                url=url,
                secret=secret,
                states=None if states is None else sorted({state.value for state in states}),
                created_at=self._clock(),
            )
            session.add(endpoint)
            session.flush()
            return _webhook_record(endpoint), secret

    def list_webhooks(self, project_id: str) -> list[WebhookRecord]:
        """The project's endpoints, oldest first."""
        with self._sessions.begin() as session:
            endpoints = session.scalars(
                select(WebhookEndpoint)
                .where(WebhookEndpoint.project_id == project_id)
                .order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
            )
            return [_webhook_record(endpoint) for endpoint in endpoints]

    def delete_webhook(self, project_id: str, webhook_id: str) -> None:
        """Remove the endpoint and its delivery log; pending deliveries are not sent.

        Raises ``WebhookNotFound`` when it is not this project's.
        """
        with self._sessions.begin() as session:
            endpoint = session.get(WebhookEndpoint, webhook_id)
            if endpoint is None or endpoint.project_id != project_id:
                raise WebhookNotFound(webhook_id)
            session.execute(
                delete(WebhookDelivery).where(WebhookDelivery.endpoint_id == webhook_id)
            )
            session.delete(endpoint)

    def list_deliveries(
        self, project_id: str, webhook_id: str, *, cursor: str | None = None, limit: int = 50
    ) -> tuple[list[DeliveryRecord], str | None]:
        """One page of the endpoint's delivery log, newest first, and the next page's cursor.

        Raises ``WebhookNotFound`` when the endpoint is not this project's, and
        ``InvalidCursor`` for a cursor this store did not produce.
        """
        with self._sessions.begin() as session:
            endpoint = session.get(WebhookEndpoint, webhook_id)
            if endpoint is None or endpoint.project_id != project_id:
                raise WebhookNotFound(webhook_id)
            query = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == webhook_id)
            if cursor is not None:
                after_time, after_id = decode_cursor(cursor)
                query = query.where(
                    or_(
                        WebhookDelivery.created_at < after_time,
                        and_(
                            WebhookDelivery.created_at == after_time,
                            WebhookDelivery.id < after_id,
                        ),
                    )
                )
            rows = list(
                session.scalars(
                    query.order_by(
                        WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc()
                    ).limit(limit + 1)
                )
            )
            records = [_delivery_record(row) for row in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            next_cursor = encode_cursor(records[-1].created_at, records[-1].id)
        return records, next_cursor

    def claim_due_deliveries(self, limit: int, claim_seconds: float) -> list[DueDelivery]:
        """Up to ``limit`` pending deliveries whose time has come, oldest first, each pushed
        ``claim_seconds`` into the future so no other sender takes it meanwhile.

        PostgreSQL skips rows another sender has locked (``FOR UPDATE SKIP LOCKED``); SQLite
        serialises writers. A sender that dies mid-attempt leaves its claim to lapse, and
        the delivery is tried again (receivers drop the duplicate by its id). The sender asks
        every second, mostly to find nothing: that answer is one indexed read on the
        autocommit engine, which on SQLite takes no write lock.
        """
        now = self._clock()
        anything_due = self._autocommit(
            lambda connection: connection.execute(_ANY_DUE, {"now": now}).first()
        )
        if anything_due is None:
            return []
        with self._sessions.begin() as session:
            due = list(
                session.execute(
                    select(WebhookDelivery, WebhookEndpoint.url, WebhookEndpoint.secret)
                    .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
                    .where(
                        WebhookDelivery.status == DELIVERY_PENDING,
                        WebhookDelivery.next_attempt_at <= now,
                    )
                    .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
                    .limit(limit)
                    .with_for_update(of=WebhookDelivery, skip_locked=True)
                )
            )
            claimed_until = now + timedelta(seconds=claim_seconds)
            claimed = []
            for delivery, url, secret in due:
                delivery.next_attempt_at = claimed_until
                claimed.append(
                    DueDelivery(
                        id=delivery.id,
                        url=url,
                        secret=secret,
                        event=delivery.event,
                        payload=dict(delivery.payload),
                        attempts=delivery.attempts,
                    )
                )
            return claimed

    def record_delivery_attempts(self, attempts: Sequence[DeliveryAttempt]) -> None:
        """Log a pass's attempts in one transaction: each ``delivered``, or failed with its
        ``status_code``/``error`` and tried again ``retry_after`` from now, or, when that is
        None, no more (``failed``). A delivery whose endpoint was deleted meanwhile is
        skipped."""
        now = self._clock()
        with self._sessions.begin() as session:
            for attempt in attempts:
                delivery = session.get(WebhookDelivery, attempt.delivery_id, with_for_update=True)
                if delivery is None:
                    continue
                delivery.attempts += 1
                delivery.last_status_code = attempt.status_code
                delivery.last_error = attempt.error
                if attempt.delivered:
                    delivery.status = DELIVERY_DELIVERED
                    delivery.delivered_at = now
                    delivery.next_attempt_at = None
                elif attempt.retry_after is None:
                    delivery.status = DELIVERY_FAILED
                    delivery.next_attempt_at = None
                else:
                    delivery.next_attempt_at = now + attempt.retry_after
