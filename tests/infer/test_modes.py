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


def test_eval_grounding_reads_boxes_at_the_processors_real_size(tiny_loaded) -> None:  # type: ignore[no-untyped-def]
    """Qwen2.5-VL boxes are pixels of the resized image: eval converts them with the engine's processor,
    as chat and serve do, not with the family's released defaults."""
    from emma.data.schema import Box, Gold, ImageRef, Sample, TaskType, Turn
    from emma.eval.score_adapters import GroundingAdapter
    from emma.eval.tasks.base import EvalItem
    from emma.model.families import model_image_size

    processor = tiny_loaded("qwen2_5_vl").processor
    width, height = 1000, 500
    seen_w, seen_h = model_image_size("qwen2_5_vl", width, height, processor)
    assert (seen_w, seen_h) != model_image_size("qwen2_5_vl", width, height)  # the tiny processor differs
    gold = Box(x1=100, y1=100, x2=500, y2=300)
    sample = Sample(
        id="g",
        task=TaskType.GROUNDING,
        images=[ImageRef(sha256="0" * 64, width=width, height=height)],
        turns=[Turn(role="user", content="Where is the lesion?")],
        gold=Gold(boxes=[gold]),
    )
    item = EvalItem(id="g", sample=sample, prompt="Where is the lesion?", images=tuple(sample.images))
    sx, sy = seen_w / width, seen_h / height
    box = [round(gold.x1 * sx), round(gold.y1 * sy), round(gold.x2 * sx), round(gold.y2 * sy)]
    answer = "```json\n" + json.dumps([{"bbox_2d": box, "label": "lesion"}]) + "\n```"
    assert GroundingAdapter("qwen2_5_vl", processor).score(item, answer).correct
    assert not GroundingAdapter("qwen2_5_vl").score(item, answer).correct  # defaults: the wrong scale
