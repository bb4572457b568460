"""Signing and verifying maskd's webhook deliveries: the sender's half and the receiver's half.

Standard library only, so a receiver verifies deliveries with the bare client install
(``pip install maskd``: no FastAPI, no database driver, no torch)::

    from service.webhook_signing import ReplayGuard, WebhookSignatureError, verify_signature

    guard = ReplayGuard()

    def handle(headers, body: bytes) -> int:
        try:
            sent_at = verify_signature(SECRET, headers["Maskd-Signature"], body)
        except WebhookSignatureError:
            return 400
        if not guard.accept(headers["Maskd-Delivery"], sent_at):
            return 200  # a replay, or a retry of a delivery already handled
        ...

Every delivery carries ``Maskd-Signature: t=<unix seconds>,v1=<hex>``, where the hex is
HMAC-SHA256 under the endpoint's secret of ``"<t>." + body`` (the exact bytes received). The
timestamp is signed with the body, so an attacker who captured a delivery cannot send it again
later with a fresh time: ``verify_signature`` refuses signatures older (or further in the
future) than ``tolerance_s``, and ``ReplayGuard`` refuses a delivery id seen within that window.
A retry of an undelivered event is signed anew (new ``t``) under the same delivery id.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time

SIGNATURE_HEADER = "Maskd-Signature"
DELIVERY_HEADER = "Maskd-Delivery"
"""The delivery's id: the same on every retry of one event to one endpoint."""
EVENT_HEADER = "Maskd-Event"
SIGNATURE_SCHEME = "v1"
DEFAULT_TOLERANCE_SECONDS = 300
"""How old a signature ``verify_signature`` accepts by default (and how far in the future,
for clocks slightly apart): five minutes, as common webhook senders use."""


class WebhookSignatureError(ValueError):
    """The delivery is not authentic or not fresh; the message says which check failed."""


def signature(secret: str, body: bytes, timestamp: int) -> str:
    """The hex HMAC-SHA256 of ``"<timestamp>." + body`` under ``secret``."""
    signed = f"{timestamp}.".encode("ascii") + body
    return hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).hexdigest()


def signature_header(secret: str, body: bytes, timestamp: int) -> str:
    """The ``Maskd-Signature`` value of ``body`` sent at ``timestamp`` (Unix seconds)."""
    return f"t={timestamp},{SIGNATURE_SCHEME}={signature(secret, body, timestamp)}"


def verify_signature(
    secret: str,
    header: str,
    body: bytes,
    tolerance_s: float = DEFAULT_TOLERANCE_SECONDS,
    *,
    now: float | None = None,
) -> int:
    """Check a delivery's ``Maskd-Signature`` header against its raw ``body``; return its
    timestamp (Unix seconds), or raise ``WebhookSignatureError``.

    Pass the body exactly as received, before any JSON parsing: re-encoded JSON differs in its
    bytes. Several ``v1=`` entries may appear (one per secret while a secret is rotated); one
    matching suffices. The comparison takes constant time.
    """
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isascii() and value.isdigit():
            timestamp = int(value)
        elif name == SIGNATURE_SCHEME and value:
            candidates.append(value)
    if timestamp is None or not candidates:
        raise WebhookSignatureError(
            f"malformed {SIGNATURE_HEADER} header: expected 't=<unix seconds>,"
            f"{SIGNATURE_SCHEME}=<hex>'"
        )
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        raise WebhookSignatureError(
            f"signature timestamp {timestamp} is {current - timestamp:.0f} s from now, outside "
            f"the {tolerance_s:.0f} s tolerance: a replayed or delayed delivery (or a wrong clock)"
        )
    expected = signature(secret, body, timestamp)
    if not any(hmac.compare_digest(expected, candidate) for candidate in candidates):
        raise WebhookSignatureError(
            "signature does not match the body: it was changed on the way, or signed with "
            "another secret"
        )
    return timestamp


class ReplayGuard:
    """Remembers the delivery ids a receiver accepted within the signature tolerance, so the
    same delivery is handled once even when it arrives twice inside that window.

    Older deliveries need no memory: ``verify_signature`` refuses their timestamps. Keep one
    guard per receiving process (it is thread-safe); a receiver with several processes keeps
    the ids in its own shared store instead, by the same rule.
    """

    def __init__(self, tolerance_s: float = DEFAULT_TOLERANCE_SECONDS) -> None:
        self._tolerance_s = tolerance_s
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def accept(self, delivery_id: str, timestamp: int, *, now: float | None = None) -> bool:
        """True the first time ``delivery_id`` is offered, False for a repeat (or for a
        timestamp outside the tolerance)."""
        current = time.time() if now is None else now
        if abs(current - timestamp) > self._tolerance_s:
            return False
        with self._lock:
            horizon = current - 2 * self._tolerance_s
            self._seen = {key: at for key, at in self._seen.items() if at >= horizon}
            if delivery_id in self._seen:
                return False
            self._seen[delivery_id] = current
            return True

    def forget(self, delivery_id: str) -> None:
        """Let ``delivery_id`` be accepted again: call it when handling an accepted delivery
        failed and the receiver answers an error, so maskd's retry is handled."""
        with self._lock:
            self._seen.pop(delivery_id, None)
