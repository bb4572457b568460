"""Commands that run the service: ``serve``, ``worker``, ``demo``, ``admin``."""

from __future__ import annotations

from typing import Any


def register(subparsers: Any) -> None:
    del subparsers
    raise NotImplementedError("filled in by the service work")
