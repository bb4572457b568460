"""Webhooks: which URLs a project may register, and the sender that posts the outbox.

The store writes a delivery row with every state change (``service.store._outbox``); the
sender here claims the due rows, signs each body (``service.webhook_signing``), posts it, and
records the attempt: delivered on any 2xx, else retried with exponential backoff
(``Settings.webhook_retry_base_seconds`` doubling up to ``webhook_retry_max_seconds``) until
``webhook_max_attempts``, when the delivery is logged as failed. It runs as a thread beside
the reconciler (``workers.reconciler.run_reconciler`` starts it), so wherever lost jobs are
recovered (``maskd serve``, ``maskd reconcile``, ``maskd demo``) webhooks go out too.

Server-side request forgery: a webhook makes the service send requests where a tenant says.
URLs must be http(s) without credentials, and every address the host resolves to must be
public, unless ``Settings.webhook_allow_private_addresses``; link-local (cloud metadata at
169.254.169.254), multicast, unspecified and reserved addresses are refused always. The host
is checked at registration and resolved and checked again before every attempt (a name may
point elsewhere later). Redirects are not followed and proxies from the environment are not
used, so the request goes to the checked host. A name re-resolved between the check and the
connection (DNS rebinding) can still slip through: deployments that must exclude that route
the sender through an egress proxy or firewall as well.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from urllib.parse import urlsplit

import httpx

from service.config import Settings
from service.store import DeliveryAttempt, DueDelivery, JobStore
from service.webhook_signing import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    signature_header,
)

logger = logging.getLogger(__name__)

MAX_URL_LENGTH = 2048
SENDER_BATCH = 64
"""Deliveries claimed per pass of the sender."""
SENDER_CONCURRENCY = 8
"""Deliveries posted at once, so one slow receiver does not hold up the others."""
ERROR_TEXT_LENGTH = 500
USER_AGENT = "maskd-webhooks/1"

Resolver = Callable[[str, int], list[str]]
"""Host and port to the IP addresses a connection may use (``socket.getaddrinfo`` by default)."""


class WebhookUrlRefused(ValueError):  # noqa: N818 - reads as the condition it reports
    """A URL the service will not post to; the message says why and what to use instead."""


def resolve_host(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def address_refusal(address: str, allow_private: bool) -> str | None:
    """Why ``address`` may not receive webhooks, or None when it may."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_link_local:
        return f"{ip} is link-local (where cloud metadata services answer)"
    if ip.is_multicast or ip.is_unspecified or ip.is_reserved:
        return f"{ip} is a multicast, unspecified or reserved address"
    if not ip.is_global and not allow_private:
        return (
            f"{ip} is a private, loopback or otherwise non-public address; the operator can "
            "allow those with MASKD_WEBHOOK_ALLOW_PRIVATE_ADDRESSES=true"
        )
    return None


def _host_and_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def check_webhook_url(url: str, allow_private: bool, resolve: Resolver = resolve_host) -> str:
    """``url`` if webhooks may be posted to it now; raises ``WebhookUrlRefused`` otherwise."""
    if len(url) > MAX_URL_LENGTH:
        raise WebhookUrlRefused(f"the URL is longer than {MAX_URL_LENGTH} characters")
    if not url.isascii() or not url.isprintable() or any(c.isspace() for c in url):
        raise WebhookUrlRefused(
            "write the URL in ASCII without spaces or control characters (percent-encode "
            "the path, give international host names in punycode: xn--...)"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise WebhookUrlRefused(f"not a valid URL: {error}") from None
    if parts.scheme not in ("http", "https"):
        raise WebhookUrlRefused("use an http:// or https:// URL (https for anything public)")
    if not parts.hostname:
        raise WebhookUrlRefused("the URL names no host; write e.g. https://hooks.example.com/maskd")
    if parts.username is not None or parts.password is not None:
        raise WebhookUrlRefused(
            "the URL holds credentials (user:password@); remove them: deliveries are "
            "authenticated by their Maskd-Signature header, verify that instead"
        )
    if parts.fragment:
        raise WebhookUrlRefused("the URL has a #fragment, which is never sent; remove it")
    try:
        addresses = resolve(parts.hostname, port or (443 if parts.scheme == "https" else 80))
    except (OSError, ValueError) as error:
        raise WebhookUrlRefused(f"cannot resolve host {parts.hostname!r}: {error}") from None
    for address in addresses:
        refusal = address_refusal(address, allow_private)
        if refusal is not None:
            raise WebhookUrlRefused(f"host {parts.hostname!r} is not allowed: {refusal}")
    return url


def retry_delay(attempts: int, settings: Settings) -> timedelta:
    """The wait after the ``attempts``-th failed attempt: base, 2 x base, 4 x base, ... capped."""
    seconds = settings.webhook_retry_base_seconds * 2 ** min(attempts - 1, 32)
    return timedelta(seconds=min(seconds, settings.webhook_retry_max_seconds))


def delivery_body(delivery: DueDelivery) -> bytes:
    """The exact bytes posted and signed: the stored payload in a fixed JSON form, so every
    retry sends the same body."""
    return json.dumps(delivery.payload, sort_keys=True, separators=(",", ":")).encode("utf-8")


@dataclass
class SenderReport:
    """What one pass of the sender did, for logs and tests."""

    delivered: list[str] = field(default_factory=list)
    retrying: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Outcome:
    delivered: bool
    status_code: int | None
    error: str | None


def _attempt(
    client: httpx.Client, delivery: DueDelivery, allow_private: bool, resolve: Resolver
) -> _Outcome:
    try:
        check_webhook_url(delivery.url, allow_private, resolve)
    except WebhookUrlRefused as error:
        return _Outcome(False, None, f"not sent: {error}")
    body = delivery_body(delivery)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        SIGNATURE_HEADER: signature_header(delivery.secret, body, int(time.time())),
        DELIVERY_HEADER: delivery.id,
        EVENT_HEADER: delivery.event,
    }
    try:
        # The answer's body is never read: only its status counts.
        with client.stream("POST", delivery.url, content=body, headers=headers) as response:
            status = response.status_code
    except httpx.TimeoutException:
        return _Outcome(False, None, "timed out")
    except httpx.HTTPError as error:
        return _Outcome(False, None, f"{type(error).__name__}: {error}"[:ERROR_TEXT_LENGTH])
    if 200 <= status < 300:
        return _Outcome(True, status, None)
    return _Outcome(False, status, f"HTTP {status}")


def deliver_due(
    store: JobStore,
    settings: Settings,
    *,
    resolve: Resolver = resolve_host,
) -> SenderReport:
    """One pass: claim the due deliveries, post them (several at once) and log each attempt."""
    report = SenderReport()
    claim_seconds = 2 * settings.webhook_timeout_seconds + 30
    due = store.claim_due_deliveries(SENDER_BATCH, claim_seconds)
    if not due:
        return report
    timeout = httpx.Timeout(settings.webhook_timeout_seconds)
    allow_private = settings.webhook_allow_private_addresses
    with (
        httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client,
        ThreadPoolExecutor(min(SENDER_CONCURRENCY, len(due))) as pool,
    ):
        outcomes = list(
            pool.map(lambda delivery: _attempt(client, delivery, allow_private, resolve), due)
        )
    attempts = []
    for delivery, outcome in zip(due, outcomes, strict=True):
        retry_after = None
        if not outcome.delivered and delivery.attempts + 1 < settings.webhook_max_attempts:
            retry_after = retry_delay(delivery.attempts + 1, settings)
        attempts.append(
            DeliveryAttempt(
                delivery.id, outcome.delivered, outcome.status_code, outcome.error, retry_after
            )
        )
        if outcome.delivered:
            report.delivered.append(delivery.id)
        elif retry_after is not None:
            report.retrying.append(delivery.id)
        else:
            report.failed.append(delivery.id)
            logger.warning(
                "webhook delivery %s to %s failed after %d attempts: %s",
                delivery.id,
                delivery.url,
                delivery.attempts + 1,
                outcome.error,
            )
    store.record_delivery_attempts(attempts)
    return report


def run_webhook_sender(store: JobStore, settings: Settings, stop: threading.Event) -> None:
    """Sends due deliveries every ``webhook_poll_interval_seconds`` until ``stop`` is set."""
    while True:
        try:
            deliver_due(store, settings)
        except Exception:
            logger.exception("webhook sender pass failed; retrying next interval")
        if stop.wait(settings.webhook_poll_interval_seconds):
            return


def start_webhook_sender_thread(
    store: JobStore, settings: Settings, stop: threading.Event
) -> threading.Thread:
    """The sender on a daemon thread, ended by ``stop``."""
    thread = threading.Thread(
        target=run_webhook_sender,
        args=(store, settings, stop),
        name="maskd-webhook-sender",
        daemon=True,
    )
    thread.start()
    return thread
