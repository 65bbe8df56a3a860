"""Image commands: ``emma info``, ``emma convert``, ``emma deid``."""

from __future__ import annotations

from emma.cli import app  # noqa: F401
