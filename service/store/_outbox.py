"""The webhook outbox: a delivery row per matching endpoint, written with each state change.

Called inside the transaction that writes the transition (``StoreBase._apply`` for workers,
the reconciler and cancels; ``create_job`` for the submission), so a delivery exists exactly
when its transition committed. The sender (``service.webhooks``) reads the rows later; nothing
here talks to the network. A plain module rather than a mixin, so both ``_base`` and
``_jobs_api`` use it without importing each other.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import Table, bindparam, insert, select
from sqlalchemy.orm import Session

from service.lifecycle import JobState
from service.models import WebhookDelivery, WebhookEndpoint

EVENT_STATE_CHANGED = "job.state_changed"
"""The one event kind so far: a job moved into another state (its submission included)."""
DELIVERY_PENDING = "pending"
DELIVERY_DELIVERED = "delivered"
DELIVERY_FAILED = "failed"

_endpoints = cast(Table, WebhookEndpoint.__table__)
_deliveries = cast(Table, WebhookDelivery.__table__)
_PROJECT_ENDPOINTS = select(_endpoints.c.id, _endpoints.c.states).where(
    _endpoints.c.project_id == bindparam("project_id")
)
"""Built once: it runs in every transition's transaction."""


def project_endpoints(session: Session, project_id: str) -> list[tuple[str, list[str] | None]]:
    """The project's endpoints as ``(id, states)``: one indexed read (a handful of rows)."""
    rows = session.execute(_PROJECT_ENDPOINTS, {"project_id": project_id}).all()
    return [(endpoint_id, states) for endpoint_id, states in rows]


@dataclass(frozen=True)
class StateChange:
    """A job's transition as its webhook deliveries describe it."""

    job_id: str
    job_name: str
    labels: Mapping[str, str]
    event_id: int
    from_state: JobState | None
    to_state: JobState
    failure_kind: str | None
    message: str | None
    at: datetime


def enqueue_state_change(session: Session, project_id: str, change: StateChange) -> None:
    """Queue a ``job.state_changed`` delivery for each of the project's endpoints that wants
    ``change.to_state``: one read of the endpoints, and one insert when any matches."""
    insert_deliveries(
        session, state_change_deliveries(project_endpoints(session, project_id), change)
    )


def insert_deliveries(session: Session, rows: list[dict[str, object]]) -> None:
    """Insert the delivery rows of several state changes (``state_change_deliveries``) at once."""
    if rows:
        session.execute(insert(_deliveries), rows)


def state_change_deliveries(
    endpoints: Sequence[tuple[str, Sequence[str] | None]], change: StateChange
) -> list[dict[str, object]]:
    """The delivery rows of one state change: one per endpoint (of ``project_endpoints``) that
    wants its ``to_state``."""
    wanted = [
        endpoint_id
        for endpoint_id, states in endpoints
        if states is None or change.to_state.value in states
    ]
    if not wanted:
        return []
    # The body receivers get, fixed when the transition commits: every retry sends the same
    # bytes. ``event_id`` orders one job's events (retries can reorder deliveries).
    data = {
        "job_id": change.job_id,
        "job_name": change.job_name,
        "event_id": change.event_id,
        "from_state": None if change.from_state is None else change.from_state.value,
        "to_state": change.to_state.value,
        "failure_kind": change.failure_kind,
        "message": change.message,
        "labels": dict(change.labels),
        "links": {"job": f"/v1/jobs/{change.job_id}"},
    }
    rows: list[dict[str, object]] = []
    for endpoint_id in wanted:
        delivery_id = str(uuid.uuid4())
        payload = {
            "id": delivery_id,
            "type": EVENT_STATE_CHANGED,
            "created_at": change.at.isoformat(),
            "data": data,
        }
        rows.append(
            {
                "id": delivery_id,
                "endpoint_id": endpoint_id,
                "job_id": change.job_id,
                "event": EVENT_STATE_CHANGED,
                "payload": payload,
                "status": DELIVERY_PENDING,
                "attempts": 0,
                "last_status_code": None,
                "last_error": None,
                "next_attempt_at": change.at,
                "delivered_at": None,
                "created_at": change.at,
            }
        )
    return rows
