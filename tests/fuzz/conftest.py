"""Fixtures of the fuzz battery (its helpers live in ``fuzzing.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fuzzing import MemoryWatch


@pytest.fixture()
def memory_watch() -> Iterator[MemoryWatch]:
    """A :class:`MemoryWatch` started for the test (``.sample()`` it, then check ``growth_mib``)."""
    yield MemoryWatch()
