"""Request parameters every store below the API can hold, refused with a 422 naming them.

A path, query or header value reaches SQL (PostgreSQL text cannot hold NUL), SQLite (64-bit
integers), Python's ``datetime`` (years 1 to 9999, also after conversion to UTC) and MLflow's
registry (32-bit version numbers). Values outside those ranges are valid HTTP but no valid
request: they get a 422 here instead of a driver's error (a 500) later.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import AfterValidator, BeforeValidator
from pydantic_core import PydanticCustomError

from maskd_core.spec import INT64_MAX, check_label_key, check_label_value
from service.model_registry import MAX_VERSION, is_version_number

__all__ = [
    "INT64_MAX",
    "LabelFilter",
    "ModelVersionNumber",
    "UtcTime",
    "refuse_nul_characters",
    "split_label_filter",
    "version_or_alias",
]


async def refuse_nul_characters(request: Request) -> None:
    """A dependency of every ``/v1`` route: no path, query or header value may hold a NUL.

    It runs before the route's own dependencies (authentication included), so nothing passes
    such a value to a database.
    """
    sources = (
        ("path", request.path_params.items()),
        ("query", request.query_params.multi_items()),
        ("header", request.headers.items()),
    )
    problems = [
        {
            "loc": (where, ascii(name) if "\x00" in name else name),
            "msg": "contains a NUL character (\\x00), which no database or file name can "
            "hold; remove it",
            "type": "nul_character",
        }
        for where, items in sources
        for name, value in items
        if "\x00" in name or "\x00" in str(value)
    ]
    if problems:
        raise RequestValidationError(problems)


_ISO_DATE_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ]")


def _iso_text(value: object) -> object:
    """Only ISO 8601 date-times, as documented: pydantic alone would also read numbers as Unix
    times, and a date alone as its midnight."""
    if isinstance(value, str) and not _ISO_DATE_TIME.match(value):
        raise PydanticCustomError(
            "datetime_format", "give a date and time in ISO 8601, e.g. 2030-01-31T12:00:00Z"
        )
    return value


def _representable(moment: datetime) -> datetime:
    """``moment`` in UTC (a time without a zone is taken as UTC), if Python can hold it so."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise PydanticCustomError(
            "datetime_range",
            "this time lies outside what the service can represent: years 1 to 9999 in UTC",
        ) from None


UtcTime = Annotated[datetime, BeforeValidator(_iso_text), AfterValidator(_representable)]
"""A query time, normalised to UTC and within the years 1 to 9999 there."""


def _version_number(value: str) -> str:
    if not is_version_number(value):
        raise PydanticCustomError(
            "version_number", f"a version is a number from 1 to {MAX_VERSION}"
        )
    return value


def version_or_alias(value: str) -> str:
    """A path's version: a number MLflow can hold, or an alias written ``@champion``.

    For ``AfterValidator`` after FastAPI's ``Path(...)``, which must come first in ``Annotated``
    for its pattern to reach the OpenAPI document.
    """
    if value == "@" or not (value.startswith("@") or is_version_number(value)):
        raise PydanticCustomError(
            "version_or_alias",
            f"give a version number from 1 to {MAX_VERSION}, or an alias written '@champion'",
        )
    return value


ModelVersionNumber = Annotated[str, AfterValidator(_version_number)]
"""A registered model's version number, as a string of digits MLflow can hold."""


def split_label_filter(text: str) -> tuple[str, str]:
    """``key=value`` as ``(key, value)``, split at the first ``=`` (keys hold none)."""
    key, _, value = text.partition("=")
    return key, value


def _label_filter(text: str) -> str:
    """A ``label`` query value: ``key=value`` with a key and a value a job's labels can hold
    (``maskd_core.spec``), so a typo is a 422 rather than an empty page."""
    key, separator, value = text.partition("=")
    if not separator:
        raise PydanticCustomError(
            "label_filter",
            "{reason}",
            {"reason": f"{text!r} is no label filter: write key=value, e.g. label=team=vision"},
        )
    check_label_key(key)
    check_label_value(value)
    return text


LabelFilter = Annotated[str, AfterValidator(_label_filter)]
"""One ``?label=key=value`` of ``GET /v1/jobs``."""
