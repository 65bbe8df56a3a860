"""One definition of EMMA's answer modes, shared by ChatSession and the server (emma.infer.modes)."""

from __future__ import annotations

import json

import pytest

from emma.errors import InputError
from emma.infer.modes import MODES, check_mode, interpret, model_sizes, user_text
from emma.infer.prompts import chat_prompt
from emma.infer.report import report_prompt
from emma.infer.structured import structured_prompt

ANSWER = {
    "findings": [{"description": "left lower lobe opacity", "box": [100, 200, 300, 400], "image_index": 0}],
    "triage_urgency": "urgent",
    "confidence": 0.6,
}


def test_each_mode_has_one_prompt() -> None:
    context = {"chief_complaint": "cough"}
    assert user_text("Q?", "chat", context, "qwen2_vl") == chat_prompt("Q?", context, "qwen2_vl")
    assert user_text("Q?", "structured", None, "qwen2_vl") == structured_prompt("Q?", None, "qwen2_vl")
    assert user_text("Q?", "report", context, None) == report_prompt(context, None, question="Q?")
    assert MODES == ("chat", "structured", "report")
    with pytest.raises(InputError, match="unknown mode"):
        check_mode("summary")


def test_structured_answer_reports_its_repair_and_boxes() -> None:
    fenced = "```json\n" + json.dumps(ANSWER)[:-1] + ",}\n```"  # a trailing comma: JSON needs repair
    answer = interpret(fenced, "structured", "fast_vlm", [(1000, 500)])
    assert answer.structured is not None and answer.structured_errors == []
    assert answer.structured_repaired
    (box,) = answer.boxes  # 0-1000 → canonical pixels of the 1000 x 500 image
    assert (box.x1, box.y1, box.x2, box.y2) == (100, 100, 300, 200)


def test_boxes_need_an_image() -> None:
    text = "Opacity <box>[[100,200,300,400]]</box>."
    with_image = interpret(text, "chat", "fast_vlm", [(1000, 1000)])
    assert [(b.x1, b.y1) for b in with_image.boxes] == [(100, 200)]
    without = interpret(text, "chat", "fast_vlm", [])
    assert without.boxes == [] and without.box_errors == []
    report = interpret("Findings: clear lungs.\nImpression: normal.", "report", None, [])
    assert report.report is not None and report.report.impression == "normal."


def test_model_sizes_unknown_family_or_size() -> None:
    assert model_sizes(None, None, [(10, 10)]) is None
    assert model_sizes("fast_vlm", None, [(0, 10)]) is None  # an invalid size: unknown, never a crash
    assert model_sizes("fast_vlm", None, [(640, 480)]) == [(224, 224)]
