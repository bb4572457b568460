"""Which jobs still have a message waiting in the broker: so the reconciler re-sends only lost ones.

A QUEUED job that waits longer than ``redispatch_after_seconds`` looks lost to the database, but
after a burst it is usually just waiting its turn. Re-sending it then adds a duplicate for every
reconciler pass, and the workers must wade through them all. So before re-sending, the
reconciler asks the broker what it holds: the job queues (``gpu``, ``gpu2``, ...: one per GPU
count, ``service.dispatch``), and the messages workers have reserved but not acknowledged. Every
message ``Dispatcher.send_job`` sends names its job in a header (``JOB_ID_HEADER``), read here
without decoding the body.

Redis and the embedded filesystem broker can be read this way; for any other broker, or a queue
too long to read, or a broker that cannot be reached, the answer is None and the reconciler
falls back to re-sending (duplicates are harmless, only wasteful: claims are compare-and-set).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis

logger = logging.getLogger(__name__)

JOB_ID_HEADER = "maskd_job_id"
"""The message header naming the job a ``maskd.run_job`` message is for."""

MAX_READ_MESSAGES = 100_000
"""Past this many waiting messages the queue is not read (None: re-send as if unknown)."""

REDIS_UNACKED_KEY = "unacked"
"""kombu's hash of messages workers reserved and have not acknowledged yet."""

REDIS_TIMEOUT_SECONDS = 5.0


def waiting_job_ids(
    broker_url: str, transport_options: Mapping[str, Any], queues: Collection[str]
) -> frozenset[str] | None:
    """Ids of jobs with a message in any of ``queues`` or reserved by a worker; None when
    unknown.

    ``broker_url`` and ``transport_options`` are the Celery app's (``dispatch.celery_config``).
    """
    try:
        scheme = urlsplit(broker_url).scheme
        if scheme == "filesystem":
            return _from_folder(Path(transport_options["data_folder_in"]), queues)
        if scheme in {"redis", "rediss"}:
            return _from_redis(broker_url, queues)
    except (OSError, KeyError, redis.RedisError):
        logger.warning("could not read the broker's queue", exc_info=True)
    return None


def _from_redis(url: str, queues: Collection[str]) -> frozenset[str] | None:
    """Counts every queue in one round trip (most are empty), then reads the ones that hold
    something."""
    client = redis.Redis.from_url(
        url, socket_timeout=REDIS_TIMEOUT_SECONDS, socket_connect_timeout=REDIS_TIMEOUT_SECONDS
    )
    names = list(queues)
    try:
        counting = client.pipeline(transaction=False)
        for queue in names:
            counting.llen(queue)
        counting.hlen(REDIS_UNACKED_KEY)
        counts: list[int] = counting.execute()
        if sum(counts) > MAX_READ_MESSAGES:
            return None
        reading = client.pipeline(transaction=False)
        for queue, count in zip(names, counts[:-1], strict=True):
            if count:
                reading.lrange(queue, 0, -1)
        waiting: list[bytes | str] = [raw for listed in reading.execute() for raw in listed]
        # An unacknowledged entry is [message, exchange, routing key].
        reserved = [_first(raw) for raw in client.hvals(REDIS_UNACKED_KEY)]
    finally:
        client.close()
    return _job_ids([*waiting, *reserved])


def _from_folder(folder: Path, queues: Collection[str]) -> frozenset[str] | None:
    """kombu's filesystem transport keeps one ``<time>_<uuid>.<queue>.msg`` file per message
    and moves it away when a worker takes it (so there is nothing reserved to read). The folder
    is listed once, whatever the number of queues."""
    wanted = {f".{queue}.msg" for queue in queues}
    messages: list[bytes] = []
    count = 0
    for path in folder.glob("*.msg"):
        if path.name[path.name.find(".") :] not in wanted:
            continue
        count += 1
        if count > MAX_READ_MESSAGES:
            return None
        try:
            messages.append(path.read_bytes())
        except FileNotFoundError:  # taken by a worker meanwhile
            continue
    return _job_ids(messages)


def _first(raw: bytes | str) -> Any:
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    return entry[0] if isinstance(entry, list) and entry else None


def _job_ids(messages: Iterable[Any]) -> frozenset[str]:
    found: set[str] = set()
    for message in messages:
        try:
            payload = json.loads(message) if isinstance(message, bytes | str) else message
        except ValueError:
            continue
        headers = payload.get("headers") if isinstance(payload, dict) else None
        job_id = headers.get(JOB_ID_HEADER) if isinstance(headers, dict) else None
        if isinstance(job_id, str):
            found.add(job_id)
    return frozenset(found)
