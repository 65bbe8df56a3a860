"""Synthetic instruction data: task definitions, output samples, compound figures, distractors.

The step logic is tested with an in-test ``Ask`` that answers from a dict by call name (a test double of
the runner's bound ask, which is tested in test_annotate_runner.py); the end-to-end test through a real
HTTP teacher and the real runner is test_annotate_synth_cli.py.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest
from annotate_test_steps import ScriptedAsk
from PIL import Image

from emma.annotate.distractors import (
    VOCABULARIES,
    category_of,
    concepts_of,
    make_options,
    same_concept,
    searchable_forms,
)
from emma.annotate.steps import Item
from emma.annotate.synth import (
    REGION,
    TASKS,
    Synthesize,
    compound_figure,
    parse_tasks,
    record_of,
    source_text,
)
from emma.annotate.teacher import TeacherError
from emma.data.schema import Box, Gold, ImageRef, Meta, Sample, TaskType, Turn
from emma.data.store import encode_png
from emma.infer.types import ImagePart, Message
from emma.text.normalize import normalize_answer

Answer = str | Callable[[list[Message]], str] | Exception


def _image(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> Image.Image:
    return Image.new("RGB", size, color)


def _ref(image: Image.Image) -> ImageRef:
    return ImageRef(
        sha256=hashlib.sha256(encode_png(image)).hexdigest(), width=image.width, height=image.height
    )


def _sample(
    images: list[Image.Image],
    *,
    sid: str = "cxr-1",
    report: str = "Large left pneumothorax.",
    boxes: list[Box] | None = None,
) -> Sample:
    return Sample(
        id=sid,
        task=TaskType.REPORT,
        images=[_ref(im) for im in images],
        turns=[Turn(role="user", content="Write the findings.", images=list(range(len(images))))],
        gold=Gold(answer=report, boxes=boxes or []),
        meta=Meta(modality="xray", body_part="chest", split="test", source="iu-xray", patient_key="p1"),
    )


def _json(**kw: Any) -> str:
    return json.dumps(kw)


ANSWERS: dict[str, Answer] = {
    "text_qa": _json(
        context="A 25-year-old tall man has sudden pleuritic chest pain after coughing.",
        question="Which condition is most likely?",
        answer="Spontaneous pneumothorax",
        answer_type="open",
    ),
    "single_subimage": "```json\n"
    + _json(
        context="",
        question="Is the lung edge visible at the apex?",
        answer="yes",
        answer_type="closed",
        rationale="A thin visceral pleural line is seen.",
    )
    + "\n```",
    "multi_subimage": _json(
        question="On which image is the abnormality easier to see?",
        answer="Image 1",
        answer_type="open",
        rationale="The frontal view shows it best.",
        images=[1, 2],
    ),
    "mc_subimage": _json(
        question="Which abnormality is shown?",
        answer="Pneumothorax",
        category="finding",
        distractors=[
            "Collapsed lung",
            "CT",
            "pleural effusion",
            "Pleural  Effusion",
            "Left pneumothorax",
            "Atelectasis",
        ],
    ),
    "compound_figure": _json(
        question="Which panel shows the lateral view?",
        answer="Panel B",
        answer_type="open",
        panels=["A", "B"],
    ),
    "dialogue": _json(
        complaint="A 24-year-old man with sudden shortness of breath.",
        findings="Left apical visceral pleural line without lung markings beyond it.",
        differential=["Pneumothorax", "Bulla", "Skin fold"],
        next_step="Needle decompression if unstable, else chest drain.",
    ),
    "bbox_vqa": lambda msgs: _json(
        question=f"What is seen in {REGION}?"
        if "marked with a rectangle" in msgs[-1].text_content
        else "Where is the pneumothorax?",
        context="",
    ),
}


def _run(
    step: Synthesize, sample: Sample, images: list[Image.Image], answers: dict[str, Answer] | None = None
) -> tuple[list[Item], ScriptedAsk]:
    ask = ScriptedAsk(answers if answers is not None else ANSWERS)
    return step(Item(sample), images, ask), ask


# ------------------------------------------------------------------------------------------- tasks


def test_parse_tasks() -> None:
    assert parse_tasks(None) == list(TASKS) == parse_tasks("all")
    assert parse_tasks("mc-subimage, text_qa,text_qa") == ["mc_subimage", "text_qa"]
    with pytest.raises(ValueError, match="unknown synth task"):
        parse_tasks("text_qa,vqa")
    with pytest.raises(ValueError, match="no synth task"):
        parse_tasks(" , ")


def test_single_image_sample_makes_every_applicable_task() -> None:
    images = [_image((40, 40, 40))]
    sample = _sample(images)
    items, ask = _run(Synthesize(), sample, images)
    by_task = {it.sample.meta.question_type: it for it in items}
    # one image, no boxes: no bbox, multi-image or compound-figure item
    assert sorted(by_task) == sorted(["text_qa", "single_subimage", "mc_subimage", "dialogue"])
    assert all(it.rejected is None for it in items), [(it.sample.id, it.rejected, it.detail) for it in items]
    assert [c for c, _ in ask.calls] == ["text_qa", "single_subimage", "mc_subimage", "dialogue"]

    text = by_task["text_qa"].sample
    assert text.id == "cxr-1/text_qa" and text.task is TaskType.OPEN_VQA
    assert text.images == [] and text.turns[0].images == []
    assert text.turns[0].content.startswith("A 25-year-old") and text.turns[0].content.endswith(
        "most likely?"
    )
    assert text.turns[1].content == "Spontaneous pneumothorax" == text.gold.answer
    assert text.meta.split == "test" and text.meta.patient_key == "p1" and text.meta.answer_type == "open"
    prov = text.meta.extra["annotation"]["synth"]
    assert prov["teacher"] == "scripted" and prov["stage"] == "synth" and len(prov["prompt_hash"]) == 16
    assert prov["time"] == "2026-01-01T00:00:00+00:00" and prov["confidence"] == 1.0
    assert ask.calls[0][1][-1].images == []  # pure-text QA is generated without the image

    single = by_task["single_subimage"].sample
    assert single.task is TaskType.REASONING and single.meta.answer_type == "closed"
    assert single.turns[1].content == "A thin visceral pleural line is seen.\nAnswer: yes"
    assert single.images == sample.images and single.turns[0].images == [0]

    dialogue = by_task["dialogue"].sample
    assert dialogue.task is TaskType.REASONING and len(dialogue.turns) == 6
    assert [t.role for t in dialogue.turns] == ["user", "assistant"] * 3
    assert dialogue.turns[3].content == "1. Pneumothorax\n2. Bulla\n3. Skin fold"
    assert dialogue.gold.answer == "Pneumothorax"
    # each item's provenance carries the time of its own teacher call
    assert dialogue.meta.extra["annotation"]["synth"]["time"] == "2026-01-01T00:00:03+00:00"
    record = record_of(dialogue)
    assert record.context == "A 24-year-old man with sudden shortness of breath." and record.kind == "open"


def test_multiple_choice_options_are_plausible_distinct_and_seeded() -> None:
    images = [_image((40, 40, 40))]
    items, _ = _run(Synthesize(tasks=["mc_subimage"]), _sample(images), images)
    (item,) = items
    s = item.sample
    assert (
        s.task is TaskType.MULTIPLE_CHOICE and s.gold.options is not None and s.gold.answer_index is not None
    )
    options = s.gold.options
    assert len(options) == 4 and options[s.gold.answer_index] == "Pneumothorax"
    assert len({normalize_answer(o) for o in options}) == 4
    # the teacher's synonym, the modality, the duplicate and the option containing the answer are dropped
    assert "Collapsed lung" not in options and "CT" not in options and "Left pneumothorax" not in options
    assert options.count("pleural effusion") == 1 and "Atelectasis" in options
    letter = "ABCD"[s.gold.answer_index]
    assert s.turns[1].content == f"{letter}. Pneumothorax"
    assert f"\n{letter}. Pneumothorax\n" in s.turns[0].content + "\n"
    again, _ = _run(Synthesize(tasks=["mc_subimage"]), _sample(images), images)
    assert again[0].sample == s  # deterministic


def test_multi_image_sample_and_compound_figure() -> None:
    images = [_image((200, 0, 0)), _image((0, 200, 0), (48, 64)), _image((0, 0, 200))]
    sample = _sample(images, sid="study-7")
    items, ask = _run(
        Synthesize(tasks=["multi_subimage", "compound_figure", "single_subimage"]), sample, images
    )
    by_task = {it.sample.meta.question_type: it for it in items}
    assert all(it.rejected is None for it in items)
    multi = by_task["multi_subimage"].sample
    assert record_of(multi).focus == [0, 1] and multi.turns[0].images == [0, 1, 2]
    single = record_of(by_task["single_subimage"].sample)
    assert len(single.focus) == 1 and 0 <= single.focus[0] < 3
    name = f"Image {single.focus[0] + 1}"
    single_prompt = dict(ask.calls)["single_subimage"][-1].text_content
    assert f"about {name} only" in single_prompt

    compound = by_task["compound_figure"]
    assert compound.images is not None and len(compound.images) == 1
    figure = compound.images[0]
    s = compound.sample
    assert len(s.images) == 1 and s.images[0].sha256 == hashlib.sha256(encode_png(figure)).hexdigest()
    assert s.task is TaskType.CLOSED_VQA and s.gold.answer == "B"  # "Panel B" is kept as the letter
    record = record_of(s)
    assert [p.letter for p in record.panels] == ["A", "B", "C"] and record.focus == [0, 1]
    assert [p.sha256 for p in record.panels] == [ref.sha256 for ref in sample.images]
    # the teacher saw the figure, not the separate images
    sent = dict(ask.calls)["compound_figure"][-1]
    assert [type(p) for p in sent.content].count(ImagePart) == 1 and sent.images[0].size == figure.size


def test_compound_figure_layout() -> None:
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    for n in (2, 3, 4):
        figure, panels = compound_figure([_image(c, (100, 50)) for c in colors[:n]], panel_size=128)
        cols, rows = (2, 2) if n == 4 else (n, 1)
        assert figure.size == (cols * 128 + (cols + 1) * 8, rows * 128 + (rows + 1) * 8)
        assert [p.letter for p in panels] == list("ABCD"[:n])
        for i, (panel, color) in enumerate(zip(panels, colors, strict=False)):
            x1, y1, x2, y2 = panel.box
            assert (x2 - x1, y2 - y1) == (128, 64)  # aspect kept, fitted to the panel
            assert figure.getpixel(((x1 + x2) // 2, (y1 + y2) // 2)) == color
            cx, cy = 8 + (i % cols) * 136, 8 + (i // cols) * 136  # the cell's top-left corner
            assert (x1, y1) == (cx, cy + 32)  # centred in its cell
            letter = figure.crop((cx, cy, cx + 16, cy + 16))
            assert letter.convert("L").getextrema()[1] > 200  # the white letter on black
            assert figure.getpixel((cx - 1, cy)) == (255, 255, 255)  # the gap between cells
    a, _ = compound_figure([_image(c) for c in colors[:2]])
    b, _ = compound_figure([_image(c) for c in colors[:2]])
    assert encode_png(a) == encode_png(b)
    with pytest.raises(ValueError):
        compound_figure([_image(colors[0])])


def _ids_with_direction(direction: str, box: Box, images: list[Image.Image]) -> Item:
    for k in range(40):
        sample = _sample(images, sid=f"box-{k}", boxes=[box])
        (item,) = Synthesize(tasks=["bbox_vqa"])(Item(sample), images, ScriptedAsk(ANSWERS))
        if record_of(item.sample).kind == direction:
            return item
    raise AssertionError(f"no id gave direction {direction}")


def test_bbox_questions_in_both_directions() -> None:
    images = [_image((30, 30, 30), (200, 100)), _image((90, 90, 90), (200, 100))]
    box = Box(x1=10, y1=20, x2=60.4, y2=70, label="Pneumothorax", image_index=1)
    region = _ids_with_direction("open", box, images)
    s = region.sample
    assert s.task is TaskType.OPEN_VQA and s.gold.answer == "Pneumothorax"
    assert s.turns[0].content == "What is seen in <box image=1>[[10,20,60,70]]</box>?"
    assert record_of(s).region == box.model_copy(update={"label": None}) and s.gold.boxes == []
    locate = _ids_with_direction("grounding", box, images)
    s = locate.sample
    assert s.task is TaskType.GROUNDING and s.gold.boxes == [box] and s.gold.answer == "Pneumothorax"
    assert s.turns[1].content == "<ref>Pneumothorax</ref><box image=1>[[10,20,60,70]]</box>"
    # a question without the region placeholder is rejected
    bad = {**ANSWERS, "bbox_vqa": _json(question="What is it?", context="")}
    for k in range(40):
        sample = _sample(images, sid=f"box-{k}", boxes=[box])
        (item,) = Synthesize(tasks=["bbox_vqa"])(Item(sample), images, ScriptedAsk(bad))
        if item.rejected is not None:
            assert item.rejected == "invalid_value" and REGION in item.detail
            break
    else:
        raise AssertionError("the region direction never came up")


def test_bad_teacher_answers_are_rejected_per_task() -> None:
    images = [_image((40, 40, 40))]
    answers = {
        **ANSWERS,
        "text_qa": "Sure! Here is a question about pneumothorax.",
        "single_subimage": _json(question="Q?", answer="", answer_type="open", rationale="r"),
        "mc_subimage": _json(question="Which?", answer="Pneumothorax", category="drug", distractors=[]),
        "dialogue": TeacherError("timeout", "teacher call failed: timeout after 5 attempts"),
    }
    items, _ = _run(Synthesize(), _sample(images), images, answers)
    got = {it.sample.id: (it.rejected, it.detail) for it in items}
    assert got["cxr-1/text_qa"][0] == "invalid_json"
    assert got["cxr-1/single_subimage"] == ("invalid_value", "field 'answer' is empty")
    assert got["cxr-1/mc_subimage"][0] == "invalid_value" and "category" in got["cxr-1/mc_subimage"][1]
    assert got["cxr-1/dialogue"] == ("timeout", "teacher call failed (timeout)")
    # rejected items keep the source's images (written to the rejected split with them)
    assert all(it.sample.images == _sample(images).images for it in items)


def test_no_applicable_task_rejects_the_source() -> None:
    sample = Sample(id="empty", task=TaskType.CAPTION, turns=[], meta=Meta(split="train"))
    items, ask = _run(Synthesize(tasks=["text_qa", "mc_subimage"]), sample, [])
    assert [(it.sample.id, it.rejected) for it in items] == [("empty", "no_task")]
    assert ask.calls == []


def test_source_text_is_bounded_and_complete() -> None:
    sample = _sample([_image((1, 1, 1))], report="Small right effusion. " * 400)
    sample.meta.extra["impression"] = "Effusion."
    text = source_text(sample)
    assert text.startswith("impression: Effusion.\nreport: Small right effusion.")
    assert text.endswith("\nquestion: Write the findings.") and len(text) <= 4000
    assert len(text.split("\n")[1]) <= 2000
    vqa = Sample(
        id="q",
        task=TaskType.CLOSED_VQA,
        turns=[Turn(role="user", content="Is there a fracture?")],
        gold=Gold(answer="no"),
    )
    assert source_text(vqa) == "question: Is there a fracture?\nanswer: no"


def test_prompt_hash_follows_parameters() -> None:
    assert Synthesize().prompt_hash == Synthesize().prompt_hash
    assert Synthesize(n_options=5).prompt_hash != Synthesize().prompt_hash
    assert Synthesize(tasks=["text_qa"]).prompt_hash != Synthesize().prompt_hash
    with pytest.raises(ValueError):
        Synthesize(n_options=1)


# ------------------------------------------------------------------------------------- distractors


def test_synonyms_and_categories() -> None:
    assert same_concept("X-ray", "radiograph") and same_concept("US", "ultrasound")
    assert same_concept("PTX", "pneumothorax") and not same_concept("pneumothorax", "pleural effusion")
    assert concepts_of("mass") == {"lung lesion", "tumor"}
    assert (
        category_of("MRI") == "modality"
        and category_of("Hepatic") == "organ"
        and category_of("zebra") is None
    )
    forms = searchable_forms("pneumothorax")
    assert "collapsed lung" in forms and "ptx" not in forms  # abbreviations are never searched in text


def test_make_options_rules() -> None:
    options = make_options(
        "CT", "modality", "s1", ["Computed tomography", "MRI", "mri ", "Liver"], n_options=5
    )
    assert options is not None
    assert options.options[options.answer_index] == "CT" and len(options.options) == 5
    assert (
        "MRI" in options.options
        and "Computed tomography" not in options.options
        and "Liver" not in options.options
    )
    assert options.from_teacher == 1 and options.from_vocabulary == 3
    lowered = [normalize_answer(o) for o in options.options]
    assert (
        len(set(lowered)) == 5 and "ct scan" not in lowered and lowered[options.options.index("MRI")] == "mri"
    )
    # the same sample id gives the same options; the position follows the id
    assert (
        make_options("CT", "modality", "s1", ["Computed tomography", "MRI", "mri ", "Liver"], n_options=5)
        == options
    )
    positions = {make_options("CT", "modality", f"id-{k}").answer_index for k in range(40)}  # type: ignore[union-attr]
    assert positions == {0, 1, 2, 3}
    # too few usable candidates → None
    assert make_options("liver", "organ", "s", ["hepatic"], vocabulary=["liver", "kidney"]) is None
    assert make_options("", "organ", "s") is None
    for category, terms in VOCABULARIES.items():
        assert len(terms) >= 8, category


def test_samples_with_many_images_are_bounded() -> None:
    images = [_image((10 * k, 0, 0)) for k in range(12)]
    sample = _sample(images, sid="ct-series")
    items, ask = _run(Synthesize(tasks=["single_subimage", "dialogue"], max_images=5), sample, images)
    assert all(it.rejected is None for it in items)
    for call, messages in ask.calls:
        assert len(messages[-1].images) == 5, call
    for it in items:
        assert it.sample.images == sample.images[:5] and it.sample.turns[0].images == [0, 1, 2, 3, 4]
    assert record_of(items[0].sample).focus[0] < 5


def test_steps_pickle_for_ray_workers() -> None:
    import pickle

    from emma.annotate.synth_steps import synth_steps

    steps = synth_steps("text_qa,mc_subimage", n_options=5, max_rewrites=2)
    assert [s.name for s in steps] == ["synth", "refine", "verify"]
    copies = pickle.loads(pickle.dumps(steps))
    assert [(c.name, c.prompt_hash) for c in copies] == [(s.name, s.prompt_hash) for s in steps]
    images = [_image((40, 40, 40))]
    assert copies[0](Item(_sample(images)), images, ScriptedAsk(ANSWERS)) == steps[0](
        Item(_sample(images)), images, ScriptedAsk(ANSWERS)
    )


def test_source_text_of_an_annotated_sample() -> None:
    """The shape `emma annotate` writes: a caption sample that keeps its input's report."""
    sample = Sample(
        id="a",
        task=TaskType.CAPTION,
        turns=[
            Turn(role="user", content="Describe the image in detail."),
            Turn(role="assistant", content="Left apical pneumothorax <box>[[1,2,3,4]]</box>."),
        ],
        gold=Gold(answer="Left apical pneumothorax <box>[[1,2,3,4]]</box>."),
        meta=Meta(
            extra={
                "description": "Frontal chest radiograph.",
                "source_sample": {"task": "report", "turns": [], "answer": "Small left pneumothorax."},
            }
        ),
    )
    assert source_text(sample) == (
        "description: Frontal chest radiograph.\nreport: Small left pneumothorax.\n"
        "caption: Left apical pneumothorax.\nquestion: Describe the image in detail."
    )
