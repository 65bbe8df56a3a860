"""Reading JSON Lines: the one loop over numbered, non-blank lines, each parsed as JSON.

Callers differ only in what they do with a line that is not what they want (importers stop with the
file and line number, a predictions file counts it, a run's per-sample file stops), so
:func:`json_lines` never raises on a bad line: it gives :data:`INVALID` in its place. The file is
opened (and its encoding chosen) by the caller.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any, Final

__all__ = ["INVALID", "json_lines"]


class _Invalid:
    """The value of a line that is not valid JSON (not a dict, a list or any other JSON value)."""

    def __repr__(self) -> str:
        return "INVALID"


INVALID: Final = _Invalid()


def json_lines(lines: Iterable[str]) -> Iterator[tuple[int, Any]]:
    """``(line number from 1, parsed value)`` for each non-blank line; :data:`INVALID` for a line that
    is not valid JSON."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            value = INVALID
        yield lineno, value
