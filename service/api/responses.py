"""Answers serialised once, straight from their response model.

A route that returns a pydantic model has FastAPI validate it again against the route's
response model (in the thread pool, for a plain ``def`` route: one more thread hop), then turn
it into dicts and those into JSON. For the hot reads that work is most of a request's cost, so
they return ``ModelResponse``: the JSON pydantic writes in one pass. The route's
``response_model`` still documents the body, and the bytes are the same.
"""

from __future__ import annotations

from pydantic import BaseModel
from starlette.responses import Response


class ModelResponse(Response):
    """``model`` as a JSON response."""

    media_type = "application/json"

    def __init__(self, model: BaseModel, status_code: int = 200) -> None:
        super().__init__(model.__pydantic_serializer__.to_json(model), status_code=status_code)
