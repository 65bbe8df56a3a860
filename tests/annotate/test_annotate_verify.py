"""Generator–verifier: the verifier's answer is compared with the eval harness's extraction and scorers
(choice letters, closed, open token F1 and synonyms, boxes in the verifier's family convention)."""

from __future__ import annotations

from typing import Any

import pytest
from annotate_test_steps import ScriptedAsk
from PIL import Image

from emma.annotate.steps import Item
from emma.annotate.synth import REGION, SynthRecord, render
from emma.annotate.verify import Verify, judge, verify_prompt
from emma.data.schema import Box, Meta, Sample, TaskType, Turn
from emma.infer.types import ImagePart


def _record(**kw: Any) -> SynthRecord:
    base: dict[str, Any] = {
        "task": "text_qa",
        "kind": "open",
        "source_id": "s",
        "question": "Q?",
        "answer": "pneumothorax",
    }
    base.update(kw)
    return SynthRecord(**base)


MC = _record(
    task="mc_subimage",
    kind="choice",
    question="Which abnormality is shown?",
    options=["effusion", "pneumothorax", "edema", "atelectasis"],
    answer_index=1,
    answer="pneumothorax",
)
GOLD_BOX = Box(x1=100, y1=50, x2=200, y2=150, label="pneumothorax")
GROUNDING = _record(
    task="bbox_vqa",
    kind="grounding",
    question="Where is the pneumothorax?",
    answer="<box>[[100,50,200,150]]</box>",
    label="pneumothorax",
    boxes=[GOLD_BOX],
)
SIZES = [(400, 200)]


@pytest.mark.parametrize(
    ("record", "answer", "ok", "status"),
    [
        (MC, "B", True, "ok"),
        (MC, "(B) pneumothorax", True, "ok"),
        (MC, "The answer is pneumothorax.", True, "ok"),
        (MC, "A", False, "wrong option"),
        (MC, "A or B", False, "unparseable"),
        (_record(kind="closed", answer="yes"), "Yes, there is.", True, "ok"),
        (_record(kind="closed", answer="yes"), "No.", False, "wrong answer"),
        (_record(kind="closed", answer="yes"), "The lung is abnormal", False, "unparseable"),
        (_record(kind="closed", answer="left"), "On the left side", True, "ok"),
        (_record(kind="closed", answer="left"), "right", False, "wrong answer"),
        (_record(), "Pneumothorax.", True, "ok"),
        (_record(), "Answer: collapsed lung", True, "ok"),  # a synonym of the gold
        (_record(), "left pneumothorax", True, "ok"),  # token F1 0.67
        (_record(), "tension pneumothorax on the left side", False, "token F1 0.33 < 0.50"),
        (_record(), "", False, "unparseable"),
    ],
)
def test_judge_text_answers(record: SynthRecord, answer: str, ok: bool, status: str) -> None:
    verdict = judge(record, answer, [], None)
    assert (verdict.ok, verdict.status) == (ok, status)


def test_judge_boxes_in_the_verifiers_convention() -> None:
    # 0-1000 (Qwen2-VL tokens): (250, 250, 500, 750) of a 400 x 200 image is the gold box
    qwen2 = "<|object_ref_start|>pneumothorax<|object_ref_end|><|box_start|>(250,250),(500,750)<|box_end|>"
    v = judge(GROUNDING, qwen2, SIZES, "qwen2_vl")
    assert v.ok and v.score == pytest.approx(1.0)
    assert judge(GROUNDING, "<box>[[250,250,500,750]]</box>", SIZES, None).ok  # generic: EMMA 0-1000
    pixels = judge(GROUNDING, "<box>[[100,50,200,150]]</box>", SIZES, None)  # pixels read as 0-1000
    assert not pixels.ok and pixels.status == "IoU 0.00 < 0.50"
    assert judge(GROUNDING, "I cannot tell.", SIZES, None).status == "no box"
    other_image = GROUNDING.model_copy(update={"boxes": [GOLD_BOX.model_copy(update={"image_index": 1})]})
    assert judge(other_image, "<box>[[250,250,500,750]]</box>", SIZES * 2, None).status == "no box"
    assert judge(other_image, "<box image=1>[[250,250,500,750]]</box>", SIZES * 2, None).ok
    assert judge(GROUNDING, "<box>[[250,250,375,750]]</box>", SIZES, None).ok  # IoU 0.5: the bound counts
    low = judge(GROUNDING, "<box>[[250,250,350,750]]</box>", SIZES, None)
    assert not low.ok and low.score == pytest.approx(0.4) and low.status == "IoU 0.40 < 0.50"


def test_prompt_hides_the_answer_and_converts_the_region() -> None:
    region = _record(task="bbox_vqa", question=f"What is in {REGION}?", answer="liver", region=GOLD_BOX)
    # the region in the verifier's 0-1000 convention, never with its label (the label is the answer)
    assert verify_prompt(region, SIZES, "qwen2_vl").startswith("What is in <box>[[250,250,500,750]]</box>?")
    qwen25 = verify_prompt(region, SIZES, "qwen2_5_vl")  # resized-image pixels (smart_resize of 400 x 200)
    assert "<box>[[" in qwen25 and "[[250,250,500,750]]" not in qwen25
    mc = verify_prompt(MC, [], None)
    assert "A. effusion\nB. pneumothorax" in mc and mc.endswith(
        "Answer with the letter of the correct option only."
    )
    assert "Answer: " not in verify_prompt(_record(rationale="Because."), [], None)
    assert verify_prompt(_record(kind="closed", answer="no"), [], None).endswith(
        "Answer with yes or no only."
    )


def _item(record: SynthRecord, n_images: int = 1) -> tuple[Item, list[Image.Image]]:
    images = [Image.new("RGB", SIZES[0], (20, 20, 20)) for _ in range(n_images)]
    base = Sample(
        id="src/x", task=TaskType.OPEN_VQA, turns=[Turn(role="user", content="-")], meta=Meta(split="train")
    )
    return Item(render(record, base)), images


def test_step_accepts_and_records_the_agreement() -> None:
    item, images = _item(
        _record(context="Sudden chest pain.", question="Diagnosis?", rationale="Pleural line.")
    )
    ask = ScriptedAsk("Left pneumothorax", day=3)
    (out,) = Verify()(item, images, ask)
    assert out.rejected is None
    call, messages = ask.calls[0]
    assert call == "verify" and messages[0].role == "system"
    assert [type(p) for p in messages[1].content].count(ImagePart) == 1
    text = messages[1].text_content
    assert (
        "Sudden chest pain.\n\nDiagnosis?" in text
        and "Pleural line" not in text
        and "pneumothorax" not in text
    )
    assert out.sample.meta.extra["verify"] == {"score": 0.6667, "status": "ok"}
    prov = out.sample.meta.extra["annotation"]["verify"]
    assert prov["confidence"] == pytest.approx(2 / 3) and prov["time"] == "2026-01-03T00:00:00+00:00"
    assert out.sample.turns == item.sample.turns


def test_step_rejects_unverified_items_and_keeps_new_images() -> None:
    item, images = _item(MC)
    item = Item(item.sample, images=images)  # e.g. a compound figure made by the generator
    (out,) = Verify()(item, images, ScriptedAsk("C", day=3))
    assert (out.rejected, out.detail) == ("unverified", "wrong option") and out.images is images
    (out,) = Verify()(item, images, ScriptedAsk("B", day=3))
    assert out.rejected is None and out.images is images


def test_step_reads_boxes_with_the_teachers_family() -> None:
    item, images = _item(GROUNDING)
    ask = ScriptedAsk("<|box_start|>(250,250),(500,750)<|box_end|>", family="qwen2_vl", day=3)
    (out,) = Verify()(item, images, ask)
    assert out.rejected is None
    assert ask.calls[0][1][1].text_content.startswith(
        "Where is the pneumothorax?\n\nAnswer with the bounding box"
    )
    (out,) = Verify(box_iou=0.9)(
        item, images, ScriptedAsk("<|box_start|>(250,250),(450,750)<|box_end|>", family="qwen2_vl", day=3)
    )
    assert out.rejected == "unverified" and out.detail.startswith("IoU 0.80")


def test_thresholds_are_validated_and_hashed() -> None:
    assert Verify().prompt_hash != Verify(open_f1=0.8).prompt_hash
    with pytest.raises(ValueError):
        Verify(open_f1=0.0)
    with pytest.raises(ValueError):
        Verify(box_iou=1.5)


def test_panel_answers_of_compound_figures() -> None:
    from emma.annotate.synth import Panel, panel_letter

    assert [panel_letter(t, "ABC") for t in ("A", "(b)", "Panel C.", "panel a shows it", "D", "A or B", "")] == [
        "A", "B", "C", "A", None, None, None,
    ]  # fmt: skip
    panels = [Panel(letter=x, box=(0, 0, 1, 1), image_index=i) for i, x in enumerate("AB")]
    record = _record(
        task="compound_figure", kind="closed", answer="A", panels=panels, question="Which panel?"
    )
    assert verify_prompt(record, [], None).endswith("Answer with the panel letter only.")
    assert judge(record, "Panel A", [], None).ok and judge(record, "A.", [], None).ok
    assert judge(record, "B", [], None).status == "wrong panel"
    assert judge(record, "A or B", [], None).status == "unparseable"
    # a compound-figure answer that is not a panel is compared as text
    finding = record.model_copy(update={"answer": "pneumothorax", "kind": "open"})
    assert judge(finding, "pneumothorax", [], None).ok
