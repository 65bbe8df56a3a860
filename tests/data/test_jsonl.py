"""emma.data.jsonl: the JSON Lines reading loop shared by importers, predictions files and run folders."""

from __future__ import annotations

from emma.data.jsonl import INVALID, json_lines


def test_json_lines_numbers_lines_skips_blanks_and_marks_invalid() -> None:
    lines = ['{"a": 1}\n', "\n", "   \n", "not json\n", "[1, 2]\n", "null"]
    assert list(json_lines(lines)) == [(1, {"a": 1}), (4, INVALID), (5, [1, 2]), (6, None)]
