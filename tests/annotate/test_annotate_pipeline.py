"""The annotation stages (coarse caption → ROI → fine caption) with a scripted teacher.

Unit tests call each step with a small Ask double that answers from a function of the prompt (the steps
only see ``ask(messages) -> str``); the last tests run the stages through the real runner against the
real scripted HTTP teacher on loopback.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from emma.annotate.pipeline import (
    INVALID_BOXES,
    INVALID_JSON,
    INVALID_REGION,
    INVALID_VALUE,
    CoarseCaption,
    FineCaption,
    RoiLocalisation,
    annotate,
    box_text,
    build_steps,
    parse_coarse,
    report_summary,
    sample_text,
)
from emma.annotate.quality import BOX_OUT_OF_RANGE, BOX_WHOLE_IMAGE, DISAGREEMENT
from emma.annotate.scripted_teacher import ScriptedRequest, ScriptedTeacher
from emma.annotate.steps import Item
from emma.data.schema import Box, CoordSpace, Gold, ImageRef, Meta, Sample, TaskType, Turn
from emma.data.store import DatasetWriter, open_dataset
from emma.errors import InputError
from emma.infer.types import Message, SamplingParams
from emma.model.families import model_image_size

TIME = "2026-01-01T00:00:00+00:00"
REPORT = "Small left apical pneumothorax. No pleural effusion. Heart size is normal."


class ScriptedAsk:
    """A test double of the runner's bound ``ask``: answers ``answer(prompt)`` and records the prompts."""

    def __init__(self, answer: str | Callable[[str], str], family: str | None = None) -> None:
        self.answer = answer
        self.teacher = "scripted"
        self.family = family
        self.times: list[str] = []
        self.prompts: list[str] = []
        self.images: list[int] = []

    def __call__(
        self, messages: Sequence[Message], *, call: str = "main", sampling: SamplingParams | None = None
    ) -> str:
        self.prompts.append(messages[-1].text_content)
        self.images.append(len(messages[-1].images))
        self.times.append(TIME)
        return self.answer(self.prompts[-1]) if callable(self.answer) else self.answer


def _image(width: int = 400, height: int = 300) -> Image.Image:
    image = Image.new("RGB", (width, height), (20, 20, 20))
    ImageDraw.Draw(image).ellipse((60, 40, 340, 260), fill=(200, 200, 200))
    return image


def _report_sample(report: str = REPORT, impression: str | None = "Pneumothorax.", **meta: object) -> Sample:
    return Sample(
        id="r1",
        task=TaskType.REPORT,
        images=[ImageRef(path="a.png", width=400, height=300)],
        turns=[
            Turn(role="user", content="Write the findings.", images=[0]),
            Turn(role="assistant", content=report),
        ],
        gold=Gold(answer=report),
        meta=Meta(split="train", extra={"impression": impression} if impression else {}, **meta),  # type: ignore[arg-type]
    )


def _coarse_json(**overrides: object) -> str:
    value: dict[str, object] = {
        "modality": "X-ray",
        "body_part": "chest",
        "view": "PA",
        "description": "Frontal chest radiograph with a small left apical pneumothorax.",
        "findings": ["left apical pneumothorax"],
        "confidence": 0.8,
    }
    value.update(overrides)
    return json.dumps(value)


# ------------------------------------------------------------------------------------- sample text


def test_sample_text_by_kind() -> None:
    report = sample_text(_report_sample())
    assert report.kind == "report" and report.reference is not None
    assert (
        "FINDINGS: Small left apical pneumothorax" in report.reference
        and "IMPRESSION: Pneumothorax." in report.text
    )
    qa = Sample(
        id="q",
        task=TaskType.MULTIPLE_CHOICE,
        turns=[Turn(role="user", content="Which organ?"), Turn(role="assistant", content="B. liver")],
        gold=Gold(answer="liver", options=["lung", "liver"], answer_index=1),
        meta=Meta(extra={"triage_note": "fall from height"}),
    )
    text = sample_text(qa)
    assert text.kind == "qa" and text.reference is None
    assert "Question: Which organ?" in text.text and "Options: lung; liver" in text.text
    assert "Answer: liver" in text.text and "Triage note: fall from height" in text.text
    caption = Sample(
        id="c", task=TaskType.CAPTION, turns=[Turn(role="user", content="?")], gold=Gold(answer="A CT.")
    )
    assert sample_text(caption).reference == "A CT."
    long = _report_sample("Pneumothorax. " * 1000)
    assert len(sample_text(long).text) < 3100 and sample_text(long).text.endswith("[truncated]")


# ----------------------------------------------------------------------------------------- parsing


def test_parse_coarse_maps_synonyms_and_rejects_bad_values() -> None:
    parsed = parse_coarse(
        _coarse_json(modality="Chest radiograph", body_part="Lungs", view="posteroanterior")
    )
    assert not isinstance(parsed, tuple)
    assert (parsed.modality, parsed.body_part, parsed.view) == ("xray", "chest", "pa")
    assert parsed.findings == ("left apical pneumothorax",) and parsed.confidence == 0.8
    assert parse_coarse(_coarse_json(view=None, body_part="unknown", confidence="70%")).body_part is None  # type: ignore[union-attr]
    assert parse_coarse(_coarse_json(modality="telepathy"))[0] == INVALID_VALUE  # type: ignore[index]
    assert parse_coarse(_coarse_json(body_part="spaceship"))[0] == INVALID_VALUE  # type: ignore[index]
    assert parse_coarse(_coarse_json(modality=None))[0] == INVALID_VALUE  # type: ignore[index]
    assert parse_coarse("I think it is a chest X-ray.")[0] == INVALID_JSON  # type: ignore[index]
    assert parse_coarse(_coarse_json(findings="pneumothorax"))[0] == INVALID_JSON  # type: ignore[index]
    assert parse_coarse(_coarse_json(description=""))[0] == INVALID_JSON  # type: ignore[index]
    too_many = parse_coarse(_coarse_json(findings=[f"finding {i}" for i in range(20)]))
    assert too_many[0] == INVALID_VALUE  # type: ignore[index]


# ------------------------------------------------------------------------------------------- coarse


def test_coarse_caption_annotates_meta_with_provenance() -> None:
    item = Item(_report_sample())
    ask = ScriptedAsk("Sure:\n```json\n" + _coarse_json() + "\n```")
    (out,) = CoarseCaption()(item, [_image()], ask)
    assert out.rejected is None
    meta = out.sample.meta
    assert (meta.modality, meta.body_part) == ("xray", "chest")
    assert meta.findings == ["left apical pneumothorax"]
    assert meta.extra["view"] == "pa" and "pneumothorax" in meta.extra["description"]
    record = meta.extra["annotation"]["coarse"]
    assert record["teacher"] == "scripted" and record["stage"] == "coarse" and record["time"] == TIME
    assert record["prompt_hash"] == CoarseCaption().prompt_hash and len(record["prompt_hash"]) == 16
    assert record["agreement"]["score"] == 1.0 and record["conflicts"] == {}
    assert record["confidence"] == pytest.approx((0.8 + 1.0) / 2)
    # the prompt carries the report inside the background block, and the image
    assert "Small left apical pneumothorax" in ask.prompts[0] and '"""' in ask.prompts[0]
    assert ask.images == [1]
    assert item.sample.meta.modality is None  # the input item is not changed


def test_coarse_caption_rejects_disagreement_with_the_report() -> None:
    ask = ScriptedAsk(_coarse_json(findings=["right rib fracture"], description="Rib fracture."))
    (out,) = CoarseCaption()(Item(_report_sample()), [_image()], ask)
    assert out.rejected == DISAGREEMENT
    assert out.detail == "agreement 0.00 < 0.50; missed: Pneumothorax; unsupported: Fracture"
    lenient = CoarseCaption(agreement_threshold=0.0)(Item(_report_sample()), [_image()], ask)[0]
    assert lenient.rejected is None


def test_coarse_caption_keeps_dataset_metadata_and_records_conflicts() -> None:
    sample = _report_sample(modality="ct", body_part="chest")
    (out,) = CoarseCaption()(Item(sample), [_image()], ScriptedAsk(_coarse_json(confidence=None)))
    assert out.sample.meta.modality == "ct"
    record = out.sample.meta.extra["annotation"]["coarse"]
    assert record["conflicts"] == {"modality": "xray"}
    assert record["confidence"] == pytest.approx(1.0 * 0.5)  # agreement 1.0, halved by the conflict


def test_coarse_caption_rejects_invalid_answers() -> None:
    for answer, reason in (
        ("not json at all", INVALID_JSON),
        (_coarse_json(modality="sonar"), INVALID_VALUE),
    ):
        (out,) = CoarseCaption()(Item(_report_sample()), [_image()], ScriptedAsk(answer))
        assert out.rejected == reason and out.detail


# ---------------------------------------------------------------------------------------------- roi


def _with_findings(*findings: str, boxes: list[Box] | None = None) -> Sample:
    sample = _report_sample()
    meta = sample.meta.model_copy(update={"findings": list(findings)})
    gold = sample.gold.model_copy(update={"boxes": boxes or []})
    return sample.model_copy(update={"meta": meta, "gold": gold})


def test_roi_converts_a_qwen2_5_vl_answer_to_canonical_pixels() -> None:
    image = _image(400, 300)
    mw, mh = model_image_size("qwen2_5_vl", 400, 300)
    assert (mw, mh) == (392, 308)
    answer = '```json\n[{"bbox_2d": [98, 77, 196, 154], "label": "left apical pneumothorax"}]\n```'
    ask = ScriptedAsk(answer, family="qwen2_5_vl")
    (out,) = RoiLocalisation()(Item(_with_findings("left apical pneumothorax")), [image], ask)
    assert out.rejected is None
    (box,) = out.sample.gold.boxes
    assert box.as_tuple() == pytest.approx((98 * 400 / 392, 77 * 300 / 308, 196 * 400 / 392, 154 * 300 / 308))
    assert box.label == "left apical pneumothorax"
    record = out.sample.meta.extra["annotation"]["roi"]
    assert record["source"] == "teacher" and record["family"] == "qwen2_5_vl" and record["confidence"] == 1.0
    assert "bbox_2d" in ask.prompts[0] and "1. left apical pneumothorax" in ask.prompts[0]


def test_roi_generic_family_and_partial_drops() -> None:
    answer = (
        "<ref>pneumothorax</ref><box>[[100,100,400,500]]</box> "
        "<ref>effusion</ref><box>[[100,100,2500,500]]</box>"  # far outside: dropped
    )
    ask = ScriptedAsk(answer)  # family None → EMMA's 0-1000 <box> form
    (out,) = RoiLocalisation()(Item(_with_findings("pneumothorax", "effusion")), [_image()], ask)
    assert out.rejected is None
    assert [b.as_tuple() for b in out.sample.gold.boxes] == [pytest.approx((40, 30, 160, 150))]
    record = out.sample.meta.extra["annotation"]["roi"]
    assert record["dropped"] == {BOX_OUT_OF_RANGE: 1} and record["confidence"] == 0.5
    assert "<box>[[x1,y1,x2,y2]]</box>" in ask.prompts[0]


def test_roi_rejects_when_no_box_survives() -> None:
    cases = (
        ("<box>[[0,0,1000,1000]]</box>", BOX_WHOLE_IMAGE),
        ("<box>[[100,100,3000,500]]</box>", BOX_OUT_OF_RANGE),
        ("The pneumothorax is at the left apex.", INVALID_BOXES),
    )
    for answer, reason in cases:
        (out,) = RoiLocalisation()(Item(_with_findings("pneumothorax")), [_image()], ScriptedAsk(answer))
        assert out.rejected == reason, answer


def test_roi_none_answer_no_findings_and_dataset_boxes() -> None:
    (none,) = RoiLocalisation()(Item(_with_findings("edema")), [_image()], ScriptedAsk("NONE."))
    assert none.rejected is None and none.sample.gold.boxes == []
    assert none.sample.meta.extra["annotation"]["roi"]["confidence"] == 0.0
    silent = ScriptedAsk("never asked")
    (normal,) = RoiLocalisation()(Item(_with_findings()), [_image()], silent)
    assert normal.rejected is None and silent.prompts == []
    assert normal.sample.meta.extra["annotation"]["roi"]["source"] == "none"
    boxes = [Box(x1=10, y1=10, x2=100, y2=90, label="mass"), Box(x1=0, y1=0, x2=400, y2=300)]
    (ds,) = RoiLocalisation()(Item(_with_findings("mass", boxes=boxes)), [_image()], silent)
    assert silent.prompts == [] and [b.label for b in ds.sample.gold.boxes] == ["mass"]
    record = ds.sample.meta.extra["annotation"]["roi"]
    assert (
        record["source"] == "dataset" and record["time"] is None and record["dropped"] == {BOX_WHOLE_IMAGE: 1}
    )
    (bad,) = RoiLocalisation()(Item(_with_findings("mass", boxes=boxes[1:])), [_image()], silent)
    assert bad.rejected == BOX_WHOLE_IMAGE


# --------------------------------------------------------------------------------------------- fine


def _roi_done(boxes: list[Box]) -> Sample:
    sample = _with_findings("left apical pneumothorax", boxes=boxes)
    meta = sample.meta.model_copy(
        update={"modality": "xray", "body_part": "chest", "extra": {**sample.meta.extra, "view": "pa"}}
    )
    return sample.model_copy(update={"meta": meta})


def test_fine_caption_cites_canonical_boxes_and_builds_a_caption_sample() -> None:
    box = Box(x1=40.4, y1=30, x2=160, y2=150.6, label="left apical pneumothorax")
    caption = (
        "Frontal chest radiograph showing a small left apical pneumothorax [R1] without mediastinal shift."
    )
    ask = ScriptedAsk(caption)
    source = _roi_done([box])
    (out,) = FineCaption()(Item(source), [_image()], ask)
    assert out.rejected is None
    s = out.sample
    assert s.task is TaskType.CAPTION
    assert [t.role for t in s.turns] == ["user", "assistant"] and s.turns[0].images == [0]
    assert "left apical pneumothorax <box>[[40,30,160,151]]</box> without" in s.gold.answer
    assert s.turns[1].content == s.gold.answer and s.gold.boxes == [box]
    assert s.gold.labels["Pneumothorax"] == 1 and s.gold.labels["Pleural Effusion"] == 0
    assert s.meta.extra["source_sample"]["task"] == "report"
    assert s.meta.extra["source_sample"]["answer"] == REPORT
    record = s.meta.extra["annotation"]["fine"]
    assert (
        record["regions_cited"] == 1 and record["labels_source"] == "report" and record["confidence"] == 1.0
    )
    # the prompt: region in the teacher's convention (generic 0-1000), study line, report findings
    prompt = ask.prompts[0]
    assert "[R1] left apical pneumothorax: [101, 100, 400, 502]" in prompt
    assert "Study: modality xray, body part chest, view pa." in prompt
    assert "present: pneumothorax; absent: cardiomegaly, pleural effusion" in prompt


def test_fine_caption_appends_report_findings_it_left_out() -> None:
    ask = ScriptedAsk("A frontal view of the chest with clear lungs and normal bones seen [R1].")
    (out,) = FineCaption()(Item(_roi_done([Box(x1=40, y1=30, x2=160, y2=150)])), [_image()], ask)
    assert out.rejected is None
    assert out.sample.gold.answer.endswith("Also stated in the report: pneumothorax.")
    assert out.sample.meta.extra["annotation"]["fine"]["appended_findings"] == ["pneumothorax"]


def test_fine_caption_rejections() -> None:
    boxes = [Box(x1=40, y1=30, x2=160, y2=150)]
    cases = (
        ("There is a left pneumothorax [R2] at the apex of the lung.", INVALID_REGION),
        ("No pneumothorax is seen; lungs are clear [R1] bilaterally.", DISAGREEMENT),
        ("Large left pleural effusion [R1] and a pneumothorax are seen.", DISAGREEMENT),
        ("Pneumothorax <box>[[1,2,3,4]]</box> at the left apex.", INVALID_VALUE),
        ("Too short.", INVALID_VALUE),
    )
    for answer, reason in cases:
        (out,) = FineCaption()(Item(_roi_done(boxes)), [_image()], ScriptedAsk(answer))
        assert out.rejected == reason, answer


def test_box_text_and_report_summary() -> None:
    assert box_text(Box(x1=1.4, y1=2.6, x2=10, y2=20)) == "<box>[[1,3,10,20]]</box>"
    assert box_text(Box(x1=1, y1=2, x2=10, y2=20, image_index=1)) == "<box image=1>[[1,2,10,20]]</box>"
    assert report_summary({"No Finding": 1, "Pneumothorax": 0}) == "no abnormal finding; absent: pneumothorax"
    assert report_summary(None) == ""


def test_build_steps_order_and_validation() -> None:
    assert [s.name for s in build_steps(["fine", "coarse"])] == ["coarse", "fine"]
    with pytest.raises(InputError):
        build_steps(["coarse", "polish"])
    with pytest.raises(InputError):
        build_steps([])
    # the family changes what the teacher is asked: it is part of the prompt hash
    assert RoiLocalisation(family="qwen2_5_vl").prompt_hash != RoiLocalisation().prompt_hash


# --------------------------------------------------------------------- real runner, scripted teacher


def scripted_teacher(request: ScriptedRequest) -> str:
    """A deterministic teacher: stage from the prompt, content from the sample text in it."""
    prompt = request.last_user_text
    if "classify the study" in prompt:
        if "GARBLED" in prompt:
            return "I am not sure what this is."
        return _coarse_json()
    if "Localise these findings" in prompt:
        return "<ref>left apical pneumothorax</ref><box>[[100,100,400,500]]</box>"
    return "Chest radiograph with a small left apical pneumothorax [R1]; the heart is normal in size."


def _source(root: Path, reports: list[tuple[str, str]], images: list[Image.Image]) -> Path:
    with DatasetWriter(root, name="reports") as writer:
        for (sid, report), image in zip(reports, images, strict=True):
            writer.add(_report_sample(report, impression=None).model_copy(update={"id": sid}), [image])
    return root


def test_annotate_through_the_runner_and_scripted_teacher(tmp_path: Path) -> None:
    a = _image()
    b = _image(300, 300).rotate(45)
    c = Image.new("RGB", (320, 240), (90, 10, 10))
    ImageDraw.Draw(c).rectangle((20, 20, 120, 200), fill=(250, 250, 0))
    src = _source(
        tmp_path / "src",
        [("s1", REPORT), ("s2", "GARBLED. " + REPORT), ("s3", REPORT), ("s4", "No acute abnormality.")],
        [a, b, a.copy(), c],
    )
    with ScriptedTeacher(scripted_teacher) as server:
        stats = annotate(src, tmp_path / "out", server.spec, progress=False, concurrency=2)
        requests = server.stats.requests
        again = annotate(src, tmp_path / "out", server.spec, progress=False, concurrency=2)
        assert server.stats.requests == requests  # resumed: nothing asked again
    assert stats.accepted == 1
    assert stats.rejected == {INVALID_JSON: 1, "duplicate_image": 1, DISAGREEMENT: 1}
    assert again.skipped == 4 and again.processed == 0
    out = open_dataset(tmp_path / "out")
    (ok,) = list(out.iter_samples("train"))
    assert ok.id == "s1" and ok.task is TaskType.CAPTION
    assert "<box>[[40,30,160,150]]</box>" in ok.gold.answer
    assert set(ok.meta.extra["annotation"]) == {"coarse", "roi", "fine"}
    assert all(r["teacher"] == "openai:loopback" and r["time"] for r in ok.meta.extra["annotation"].values())
    rejected = {s.id: s.meta.extra["rejected"] for s in out.iter_samples("rejected")}
    assert rejected["s2"]["reason"] == INVALID_JSON and rejected["s2"]["step"] == "coarse"
    assert rejected["s3"]["reason"] == "duplicate_image" and "sample s1" in rejected["s3"]["detail"]
    assert (
        rejected["s4"]["reason"] == DISAGREEMENT and "unsupported: Pneumothorax" in rejected["s4"]["detail"]
    )
    assert json.loads((tmp_path / "out" / "run_stats.json").read_text())["skipped"] == 4  # the last run's


def test_fine_caption_converts_dataset_boxes_of_other_spaces() -> None:
    box = Box(x1=100, y1=100, x2=400, y2=500, space=CoordSpace.NORM1000, label="pneumothorax")
    ask = ScriptedAsk("A small left apical pneumothorax [R1] is seen at the apex.")
    (out,) = FineCaption()(Item(_roi_done([box])), [_image()], ask)
    assert "pneumothorax <box>[[40,30,160,150]]</box> is seen" in out.sample.gold.answer
    (stored,) = out.sample.gold.boxes
    assert stored.space is CoordSpace.PIXEL and stored.as_tuple() == pytest.approx((40, 30, 160, 150))


def test_steps_survive_pickling_for_ray_workers() -> None:
    from emma.annotate.quality import Duplicate, DuplicateScan

    scan = DuplicateScan(duplicates={"x": Duplicate("r0", 0, 1)})
    steps = build_steps(family="internvl", duplicates=scan)
    copies = pickle.loads(pickle.dumps(steps))
    assert [(s.name, s.prompt_hash) for s in copies] == [(s.name, s.prompt_hash) for s in steps]
    ask = ScriptedAsk(_coarse_json())
    assert (
        copies[1](Item(_report_sample()), [_image()], ask)[0].sample
        == steps[1](Item(_report_sample()), [_image()], ask)[0].sample
    )
