"""Commands that run the core library locally: ``maskd run``, ``maskd train-teacher``."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    del subparsers
    raise NotImplementedError("filled in by the core library work")
