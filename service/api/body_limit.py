"""The request-body limits, enforced before anything parses a body.

``RequestBodyLimit`` is a small ASGI middleware. It refuses a body whose ``Content-Length``
is above ``MASKD_MAX_REQUEST_BYTES`` without reading it, and counts the bytes of a body that
streams in (chunked, or lying about its length), refusing it with 413 the moment it passes the
limit. A JSON body that fits is then checked for nesting deeper than ``MASKD_MAX_JSON_DEPTH``
(422): deep nesting costs parsers recursion and time out of all proportion to its size, and
Python's JSON parser fails on it with a bare error instead of saying what is wrong. The body
is read once, here, and handed on to the app unchanged.
"""

from __future__ import annotations

import re

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.schemas import ErrorOut, FieldError, validation_error_body

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(byte for byte in range(256) if byte not in b"[]{}")
_OPENING = frozenset(b"[{")


class RequestBodyLimit:
    """413 for a body above ``max_bytes``, 422 for JSON nested deeper than ``max_depth``."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_depth: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "").strip()
        if declared.isdigit() and (len(declared) > 18 or int(declared) > self.max_bytes):
            await self._too_large(scope, receive, send, f"{declared} bytes")
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its whole body
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send, "more bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body and _read_as_json(headers) and nested_deeper_than(body, self.max_depth):
            problem = FieldError(
                loc=["body"],
                msg=f"the JSON body nests objects and arrays more than {self.max_depth} levels "
                "deep, the most this service reads (MASKD_MAX_JSON_DEPTH); a job spec needs "
                "far fewer: flatten the deepest value",
                type="json_too_deep",
            )
            response = JSONResponse(validation_error_body([problem]), status_code=422)
            await response(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, size: str) -> None:
        detail = (
            f"the request body ({size}) is larger than this service accepts: at most "
            f"{self.max_bytes} bytes (MASKD_MAX_REQUEST_BYTES); a job spec is a few KiB"
        )
        response = JSONResponse(ErrorOut(detail=detail).model_dump(), status_code=413)
        await response(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the app the body already read, then the client's messages
    (a disconnect) as they come."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if delivered:
            return await receive()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _read_as_json(headers: Headers) -> bool:
    """Whether FastAPI would parse this body as JSON: no content type, or a JSON one."""
    content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return (
        not content_type
        or content_type == "application/json"
        or (content_type.startswith("application/") and content_type.endswith("+json"))
    )


def nested_deeper_than(body: bytes, limit: int) -> bool:
    """Whether the JSON text ``body`` nests arrays and objects more than ``limit`` deep.

    Brackets inside strings do not count. Malformed JSON is measured all the same; the parser
    reports it afterwards.
    """
    brackets = _JSON_STRING.sub(b"", body).translate(None, delete=_NOT_BRACKETS)
    depth = 0
    for byte in brackets:
        if byte in _OPENING:
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False
