"""Context refinement: leak detection (answer, synonyms, labeler findings, yes/no statements, boxes) and
the rewrite-or-reject step, with an in-test ``Ask`` answering from a dict."""

from __future__ import annotations

import json
from typing import Any

import pytest
from annotate_test_steps import ScriptedAsk

from emma.annotate.refine import Refine, find_leaks
from emma.annotate.steps import Item
from emma.annotate.synth import REGION, SynthRecord, record_of, render
from emma.data.schema import Box, Meta, Sample, TaskType, Turn


def _record(**kw: Any) -> SynthRecord:
    base: dict[str, Any] = {
        "task": "text_qa",
        "kind": "open",
        "source_id": "s",
        "question": "What is the diagnosis?",
        "context": "",
        "answer": "pneumothorax",
    }
    base.update(kw)
    return SynthRecord(**base)


def _codes(record: SynthRecord) -> list[str]:
    return [f"{leak.code}@{leak.where}" for leak in find_leaks(record)]


# ------------------------------------------------------------------------------------------- leaks


@pytest.mark.parametrize(
    ("context", "expected"),
    [
        ("A tall 25-year-old with sudden pleuritic chest pain.", []),
        ("The answer is Pneumothorax.", ["answer_in_context@context"]),
        ("CXR shows a collapsed lung on the left.", ["answer_in_context@context"]),  # synonym
        ("There is a small hydropneumothorax.", ["finding_in_context@context"]),  # labeler, no table entry
        ("Possible PTX at the apex.", ["finding_in_context@context"]),  # abbreviation found by the labeler
        ("Tell us about the chest pain.", []),  # "us" is never read as ultrasound in text
        ("History of pneumothorax-like pain.", ["answer_in_context@context"]),
    ],
)
def test_answer_and_synonym_leaks(context: str, expected: list[str]) -> None:
    assert _codes(_record(context=context)) == expected


def test_answer_in_question_and_offered_alternatives() -> None:
    assert _codes(_record(question="Is the pneumothorax large?")) == ["answer_in_question@question"]
    assert _codes(_record(kind="closed", question="Is it a pneumothorax or an effusion?")) == []
    assert _codes(_record(kind="open", question="Is it a pneumothorax or an effusion?")) == [
        "answer_in_question@question"
    ]
    left = _record(kind="closed", answer="left", question="Is the effusion on the left or the right?")
    assert _codes(left) == []
    assert _codes(left.model_copy(update={"context": "Pain in the left chest."})) == [
        "answer_in_context@context"
    ]
    assert _codes(_record(kind="closed", answer="left", question="Which side, left?")) == [
        "answer_in_question@question"
    ]


def test_multiple_choice_is_checked_without_its_options() -> None:
    mc = _record(
        task="mc_subimage",
        kind="choice",
        question="Which abnormality is shown?",
        options=["effusion", "pneumothorax", "edema"],
        answer_index=1,
    )
    assert _codes(mc) == []
    assert _codes(mc.model_copy(update={"question": "Which abnormality (a pneumothorax?) is shown?"})) == [
        "answer_in_question@question"
    ]


@pytest.mark.parametrize(
    ("answer", "question", "context", "leaks"),
    [
        ("yes", "Is there a pneumothorax?", "Chest X-ray shows a large pneumothorax.", True),
        ("no", "Is there a pneumothorax?", "The lungs are clear. No pneumothorax.", True),
        ("yes", "Is there a pneumothorax?", "A 25-year-old with chest pain after a fall.", False),
        (
            "yes",
            "Is the nasogastric tube in the stomach?",
            "The nasogastric tube tip is in the stomach, as seen.",
            True,
        ),
        ("no", "Is the nasogastric tube in the stomach?", "Nasogastric tube not in the stomach.", True),
        ("yes", "Is the nasogastric tube in the stomach?", "Check tube position after placement.", False),
        ("yes", "Is there a pneumothorax?", "", False),
    ],
)
def test_yes_no_statements(answer: str, question: str, context: str, leaks: bool) -> None:
    record = _record(kind="closed", answer=answer, question=question, context=context)
    assert _codes(record) == (["answer_stated@context"] if leaks else [])


def test_box_leaks_for_grounding() -> None:
    gold = Box(x1=10, y1=20, x2=60, y2=70, label="pneumothorax", image_index=0)
    grounding = _record(
        task="bbox_vqa",
        kind="grounding",
        answer="<box>[[10,20,60,70]]</box>",
        label="pneumothorax",
        question="Where is the pneumothorax?",
        boxes=[gold],
    )
    assert _codes(grounding) == []  # the label in the question is what is asked for, not the answer
    near = grounding.model_copy(update={"context": "Look near [12, 22, 58, 69]."})
    assert _codes(near) == ["box_in_text@context"]
    tagged = grounding.model_copy(
        update={"question": "Where is the pneumothorax, <box>[[10,20,60,70]]</box>?"}
    )
    assert _codes(tagged) == ["box_in_text@question"]
    other_image = grounding.model_copy(update={"context": "Compare <box image=1>[[10,20,60,70]]</box>."})
    assert _codes(other_image) == []
    far = grounding.model_copy(update={"context": "Not at [100, 100, 150, 150]."})
    assert _codes(far) == []


def test_region_placeholder_and_dialogue_probe() -> None:
    region = Box(x1=1, y1=2, x2=30, y2=40, label="liver")
    record = _record(task="bbox_vqa", answer="liver", question=f"What organ is in {REGION}?", region=region)
    assert _codes(record) == []
    from emma.annotate.synth import Dialogue

    dialogue = Dialogue(
        complaint="Sudden dyspnoea; known pneumothorax last year.",
        findings="Large left pneumothorax.",
        differential=["Pneumothorax", "Bulla"],
        next_step="Chest drain.",
    )
    probe = _record(task="dialogue", context=dialogue.complaint, answer="Pneumothorax", dialogue=dialogue)
    assert _codes(probe) == ["answer_in_context@context"]  # the findings turn may name it, the complaint not
    clean = dialogue.model_copy(update={"complaint": "Sudden dyspnoea in a tall young man."})
    assert _codes(probe.model_copy(update={"dialogue": clean, "context": clean.complaint})) == []


# -------------------------------------------------------------------------------------------- step


def _sample(record: SynthRecord) -> Sample:
    base = Sample(
        id="src/text_qa",
        task=TaskType.OPEN_VQA,
        turns=[Turn(role="user", content="-")],
        meta=Meta(split="train"),
    )
    return render(record, base)


def test_clean_item_passes_without_a_call() -> None:
    item = Item(_sample(_record(context="Sudden chest pain in a tall young man.")))
    ask = ScriptedAsk({}, day=2)
    (out,) = Refine()(item, [], ask)
    assert out.rejected is None and ask.calls == []
    prov = out.sample.meta.extra["annotation"]["refine"]
    assert prov["confidence"] == 1.0 and prov["time"] is None and prov["source"] == "rules"
    assert out.sample.turns == item.sample.turns


def test_leaking_item_is_rewritten_then_checked_again() -> None:
    item = Item(_sample(_record(context="Chest X-ray shows a collapsed lung.")))
    rewrite = json.dumps(
        {
            "context": "Sudden chest pain in a tall young man.",
            "question": "What is the most likely diagnosis?",
        }
    )
    ask = ScriptedAsk({"rewrite1": rewrite}, day=2)
    (out,) = Refine()(item, [], ask)
    assert out.rejected is None
    assert [c for c, _ in ask.calls] == ["rewrite1"]
    prompt = ask.calls[0][1][-1].text_content
    assert "answer_in_context" in prompt and "Answer (must not appear): pneumothorax" in prompt
    assert (
        out.sample.turns[0].content
        == "Sudden chest pain in a tall young man.\n\nWhat is the most likely diagnosis?"
    )
    record = record_of(out.sample)
    assert record.rewrites == 1 and record.context == "Sudden chest pain in a tall young man."
    prov = out.sample.meta.extra["annotation"]["refine"]
    assert prov["confidence"] == 0.75 and prov["time"] == "2026-01-02T00:00:00+00:00"


def test_still_leaking_or_unusable_rewrites_are_rejected() -> None:
    item = Item(_sample(_record(context="Chest X-ray shows a collapsed lung.")))
    still = json.dumps({"context": "The film shows a pneumothorax.", "question": "Diagnosis?"})
    (out,) = Refine(max_rewrites=2)(item, [], ScriptedAsk({"rewrite1": still, "rewrite2": still}, day=2))
    assert out.rejected == "leak" and out.detail == "answer_in_context after 2 rewrite(s)"
    assert record_of(out.sample).context == "The film shows a pneumothorax."  # the last attempt is kept
    (out,) = Refine()(item, [], ScriptedAsk({"rewrite1": "I cannot do that."}, day=2))
    assert out.rejected == "leak" and "rewrite 1 unusable (invalid_json)" in out.detail
    ask = ScriptedAsk({}, day=2)
    (out,) = Refine(max_rewrites=0)(item, [], ask)
    assert out.rejected == "leak" and ask.calls == []


def test_rewrite_must_keep_the_region() -> None:
    region = Box(x1=1, y1=2, x2=30, y2=40, label="liver")
    record = _record(
        task="bbox_vqa", answer="liver", question=f"What is in {REGION}, the liver?", region=region
    )
    item = Item(_sample(record))
    lost = json.dumps({"question": "What organ is this?", "context": ""})
    (out,) = Refine()(item, [], ScriptedAsk({"rewrite1": lost}, day=2))
    assert out.rejected == "leak" and "invalid_value" in out.detail
    kept = json.dumps({"question": f"What organ is in {REGION}?", "context": ""})
    ask = ScriptedAsk({"rewrite1": kept}, day=2)
    (out,) = Refine()(item, [], ask)
    assert (
        out.rejected is None and out.sample.turns[0].content == "What organ is in <box>[[1,2,30,40]]</box>?"
    )
    assert REGION in ask.calls[0][1][-1].text_content and "Keep the token" in ask.calls[0][1][-1].text_content


def test_non_synthetic_items_are_rejected() -> None:
    sample = Sample(id="x", task=TaskType.OPEN_VQA, turns=[Turn(role="user", content="?")])
    (out,) = Refine()(Item(sample), [], ScriptedAsk({}, day=2))
    assert out.rejected == "not_synthetic"
