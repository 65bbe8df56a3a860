"""Fuzzing how a model's answer is read back (emma.infer.modes.interpret, used by the server and ``emma
chat`` for every answer): any text a model may write, in every mode and family, about images of any
size, gives a ModeAnswer whose boxes are finite and refer to an image of the request; never an exception.
A served model is untrusted input too: the tiny test model writes random tokens, a real one near-misses.
"""

from __future__ import annotations

import math

from fuzzing import fuzz_settings, hard_deadline
from hypothesis import given
from hypothesis import strategies as st

from emma.infer.modes import MODES, interpret
from emma.model.families import FAMILIES

FRAGMENTS = (
    "<box>",
    "</box>",
    "<box image=",
    "<box image=7>",
    ">",
    "<ref>",
    "</ref>",
    "<|box_start|>",
    "<|box_end|>",
    "<loc_0123>",
    "[[",
    "]]",
    "[",
    "]",
    "(",
    ")",
    ",",
    "1",
    "0",
    "-5",
    "0.5",
    "1e309",
    "NaN",
    "999999999999999999999",
    "{",
    "}",
    ":",
    "null",
    "true",
    '"findings"',
    '"diagnosis"',
    '"boxes"',
    '"bbox"',
    '"box"',
    '"label"',
    '"confidence"',
    "```json",
    "```",
    "Findings:",
    "Impression:",
    "\n",
    " ",
    "\u0000",
    "\u00e9",
)
answers = st.one_of(st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join), st.text(max_size=60))
sizes = st.lists(st.tuples(st.integers(1, 5000), st.integers(1, 5000)), max_size=3)


@fuzz_settings(examples=300)
@given(
    text=answers,
    mode=st.sampled_from(MODES),
    family=st.sampled_from([*sorted(FAMILIES), None]),
    image_sizes=sizes,
)
def test_any_answer_is_read_without_error(
    text: str, mode: str, family: str | None, image_sizes: list[tuple[int, int]]
) -> None:
    with hard_deadline():
        answer = interpret(text, mode, family, image_sizes)  # type: ignore[arg-type]
    assert answer.mode == mode
    for box in answer.boxes:
        assert all(math.isfinite(v) for v in (box.x1, box.y1, box.x2, box.y2)), box
        assert 0 <= box.image_index < len(image_sizes), box
