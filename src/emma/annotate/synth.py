"""Synthetic instruction data: the generator step of ``emma synth``.

:class:`Synthesize` is a runner step (:mod:`emma.annotate.steps`): from one source sample (its images
plus whatever text it carries: report, caption, impression, triage note, question and answer) it asks
the teacher for one item per requested task and returns them as canonical samples. The later steps
check them: :class:`emma.annotate.refine.Refine` (the question and its context must not give the answer
away) and :class:`emma.annotate.verify.Verify` (a second teacher pass must find the answer).

**Tasks** (:data:`TASKS`). A *sub-image* is one image of a multi-image sample (IU X-ray frontal +
lateral, a CT series' slices) or one panel of a compound figure. "Image k" in a question is the k-th
image (1-based) shown with it.

- ``text_qa`` (pure-text QA): a medical-knowledge question answerable from text alone, with a short
  clinical vignette as context that never states the answer. Any sample with text; the output has no
  image; closed or open VQA.
- ``bbox_vqa`` (spatial VQA): for one labelled box of the sample (seeded choice), either "what is in
  <box>?" (answer: the box's label; open VQA) or "where is the <label>?" (answer: the box; grounding);
  the direction is seeded by the sample id. Samples with labelled boxes (``gold.boxes``, e.g. from
  ``emma annotate``'s ROI stage or the dataset).
- ``single_subimage`` (single sub-image reasoning): a reasoning question about one image, with a
  short rationale. One image: that image; several: one chosen by a generator seeded with the sample id,
  named "Image k" while every image is shown. Reasoning.
- ``multi_subimage`` (multiple sub-images): a question that needs two or more of the images together
  (the teacher lists which). Samples with >= 2 images. Reasoning.
- ``mc_subimage`` (multiple choice over sub-images): multiple choice about one image (chosen as for
  ``single_subimage``) whose answer is a finding, modality, organ or body part; distractors of that
  category (:mod:`emma.annotate.distractors`). Multiple choice.
- ``compound_figure`` (compound-figure understanding): the sample's first 2-``max_panels`` images tiled
  into one new figure with panel letters A, B, ... (:func:`compound_figure`); a question that names
  panels. Samples with >= 2 images; the output has the figure as its only image; closed or open VQA.
- ``dialogue`` (multi-turn diagnostic dialogue, emergency case): complaint → findings → differential
  → next step, three user/assistant rounds (6 turns). Samples with >= 1 image. Reasoning.

A sample with more than ``max_images`` images (default 8; a CT series) is used with its first
``max_images`` only, so every teacher request stays bounded. A source sample to which no requested task
applies is returned rejected (``no_task``). Each task asks the teacher once (call name = the task name)
for one JSON object; an answer that is not a JSON object is rejected ``invalid_json``; missing, empty,
over-long or out-of-range fields ``invalid_value``; too few usable distractors ``few_distractors``; a
failed teacher call (after the teacher's own retries) rejects that task's item with the
:class:`~emma.annotate.teacher.TeacherError` reason, leaving the source's other tasks alone. Rejected
items are returned (never dropped) with ids like accepted ones.

**Output samples.** Id ``<source id>/<task>``; split, modality, body part, findings, source, license,
patient and study keys copied from the source (so a test image's synthetic questions stay in the test
split: ``emma data check`` on the output finds no new cross-split leak); ``meta.question_type`` = the
task; ``meta.answer_type`` = ``closed`` / ``open``. The user turn is the context, a blank line, the
question (multiple choice: then ``A. ...`` lines); it shows every image of the output sample. The
assistant turn is the answer (reasoning: the rationale, then ``Answer: <answer>``; multiple choice:
``B. <option>``; grounding: ``<ref>label</ref><box>[[x1,y1,x2,y2]]</box>``). Boxes are canonical
pixels of the original image, written with :func:`emma.data.formats.format_boxes` (``<box image=N>``
for an image other than the first). ``meta.extra["synth"]`` holds the :class:`SynthRecord` (context,
question, answer, kind, options, focus images, panels...) that the later steps read and update, and
``meta.extra["annotation"]["synth"]`` the provenance (``time``: that task's own teacher call). A compound
figure is a new PNG image returned with the item (``Item.images``); its panel layout is in
``meta.extra["synth"]["panels"]``.

Determinism: everything here is a function of the source sample, its images and the teacher's
answers; the only randomness (which image, which box, which direction, option order) comes from
generators seeded with the sample id (:func:`emma.annotate.steps.seeded_rng`).

Why one file (~930 lines): six task types share one record, one set of limits and one prompt; each
task is a short function beside the others so that their rules can be compared on one page.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

from PIL import Image, ImageDraw, ImageFont
from pydantic import BaseModel, Field, ValidationError

from emma.annotate import distractors
from emma.annotate.distractors import VOCABULARIES, make_options
from emma.annotate.steps import Ask, Item, prompt_hash, provenance, record_provenance, reject, seeded_rng
from emma.annotate.teacher import TeacherError
from emma.data.formats import format_boxes
from emma.data.schema import Box, CoordSpace, Gold, ImageRef, Sample, TaskType, Turn
from emma.data.store import encode_png
from emma.eval.extract import OPTION_LETTERS
from emma.infer.grounding import render_overlay
from emma.infer.types import ImagePart, Message, SamplingParams, TextPart
from emma.text.labeler import NO_FINDING, POSITIVE, SUPPORT_DEVICES, label_report
from emma.text.model_json import find_json_object
from emma.text.normalize import is_yes_no, tokens

log = logging.getLogger(__name__)

SynthTask = Literal[
    "text_qa", "bbox_vqa", "single_subimage", "multi_subimage", "mc_subimage", "compound_figure", "dialogue"
]
TASKS: tuple[SynthTask, ...] = get_args(SynthTask)
AnswerKind = Literal["closed", "open", "choice", "grounding"]

REGION = "<region>"  # placeholder for the region's box in a bbox_vqa question
MAX_SOURCE_CHARS = 4000
MAX_ANSWER_JSON_CHARS = 20_000
MAX_QUESTION_CHARS = 600
MAX_CONTEXT_CHARS = 1500
MAX_SHORT_ANSWER_CHARS = 200  # closed / open / choice answers
MAX_RATIONALE_CHARS = 1500
MAX_DIALOGUE_FIELD_CHARS = 1500
MAX_CLOSED_WORDS = 6
TEXT_KEYS: tuple[str, ...] = (
    "report",
    "impression",
    "findings_text",
    "caption",
    "description",
    "fine_caption",
    "triage",
    "complaint",
    "notes",
)
DIALOGUE_QUESTIONS = (
    "What do you see on the imaging?",
    "What is your differential diagnosis?",
    "What is the next step in management?",
)
DIAGNOSIS_QUESTION = "What is the most likely diagnosis? Answer with the diagnosis only."

SYSTEM_PROMPT = (
    "You write training data for a medical vision-language assistant used in emergency medicine. "
    "Use only what the images and the source text support; never invent patient identifiers. "
    "Reply with one JSON object and nothing else."
)
_COMMON_RULES = (
    "Rules: the question and the context must not contain the answer, a synonym of it, or anything "
    "that gives it away. Keep the answer short (a few words; yes/no questions answer yes or no). "
    'Set "answer_type" to "closed" for yes/no or a choice between alternatives named in the question, '
    'otherwise "open".'
)
PROMPTS: dict[str, str] = {
    "text_qa": (
        "Write one question that tests medical knowledge related to this case and can be answered from "
        "text alone, without seeing any image. Give a short clinical vignette as context (age range, "
        "complaint, history, vital signs) that does not state the answer.\n{rules}\n"
        'JSON keys: "context", "question", "answer", "answer_type".'
    ),
    "bbox_region": (
        "The {where} shows a region marked with a rectangle. It shows: {label}. Write one question that "
        "asks what is shown in that region. Write the literal token {region} where the region goes, for "
        'example "What abnormality is seen in {region}?". Do not name or hint at the answer.\n'
        'JSON keys: "context" (may be empty), "question".'
    ),
    "bbox_locate": (
        "Write one question that asks where the {label} is in the {where} (the answer will be a box). "
        "Do not give its position in the question or the context.\n"
        'JSON keys: "context" (may be empty), "question".'
    ),
    "single_subimage": (
        "Write one question about {focus} only that needs reasoning from what is visible in it (what a "
        "finding implies, which finding explains the presentation, how severe it is). Refer to images as "
        '"Image 1", "Image 2", ... when there are several. Give the reasoning in one to three sentences.\n'
        '{rules}\nJSON keys: "context" (may be empty), "question", "answer", "answer_type", "rationale".'
    ),
    "multi_subimage": (
        "There are {n} images (Image 1 to Image {n}). Write one question that can only be answered by "
        "comparing or combining at least two of them (for example a finding seen on one view and "
        "confirmed on another, or a change between them). Give the reasoning in one to three sentences "
        "and list the image numbers needed.\n{rules}\n"
        'JSON keys: "context" (may be empty), "question", "answer", "answer_type", "rationale", '
        '"images" (list of image numbers).'
    ),
    "mc_subimage": (
        "Write one multiple-choice question about {focus} whose answer is a single {categories} term. "
        "Give the category of the answer and {n_distractors} plausible but wrong answers of the same "
        "category (distinct, never a synonym of the answer). Do not write the options into the "
        "question.\n{rules}\n"
        'JSON keys: "context" (may be empty), "question", "answer", "category" (one of {category_list}), '
        '"distractors" (list).'
    ),
    "compound_figure": (
        "The image is a compound figure with panels {panels} (letters in the top-left corner of each "
        "panel). Write one question about the figure that names panels by letter: about one panel, or "
        "comparing panels (which panel shows a finding, how two panels differ).\n{rules}\n"
        'JSON keys: "context" (may be empty), "question", "answer", "answer_type", '
        '"panels" (list of the panel letters the question needs).'
    ),
    "dialogue": (
        "Write an emergency-department diagnostic dialogue for this case: the patient's chief complaint "
        "as the clinician relays it (one or two sentences, never naming the diagnosis), the imaging "
        "findings, a differential diagnosis (two to four items, most likely first, short names) and the "
        "next step in management.\n"
        'JSON keys: "complaint", "findings", "differential" (list), "next_step".'
    ),
    "source": (
        "Source text (report, caption or notes; may be empty):\n<<<\n{text}\n>>>\nKnown facts: {facts}"
    ),
}
SAMPLING = SamplingParams(max_new_tokens=768, temperature=0.0)


class SynthReject(Exception):
    """An item that cannot be made; ``reason`` is the rejection code, ``detail`` one line without PHI."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Panel(BaseModel):
    """One panel of a compound figure: its letter, where it lies (figure pixels), which image it shows."""

    letter: str
    box: tuple[int, int, int, int]
    image_index: int  # index of the source sample's image
    sha256: str | None = None  # that image's content hash, when the source ref has one


class Dialogue(BaseModel):
    complaint: str
    findings: str
    differential: list[str]
    next_step: str


class SynthRecord(BaseModel):
    """What a synthetic item asks and answers; stored in ``meta.extra["synth"]``, read by refine/verify.

    ``question`` holds :data:`REGION` where a bbox_vqa question names its region (``region``);
    ``focus``: 0-based indices of the images (or panels) the question is about; ``boxes``: the gold box
    of a grounding item. For a dialogue, ``context`` / ``question`` / ``answer`` are the probe the
    checks use: the chief complaint / the diagnosis question / the most likely diagnosis (refine checks
    that the complaint does not give the diagnosis away; verify asks for it from images + complaint).
    """

    task: SynthTask
    kind: AnswerKind
    source_id: str
    question: str
    context: str = ""
    answer: str
    label: str | None = None  # grounding: what the box shows
    rationale: str = ""
    options: list[str] | None = None
    answer_index: int | None = None
    category: str | None = None
    region: Box | None = None
    boxes: list[Box] = Field(default_factory=list)
    focus: list[int] = Field(default_factory=list)
    panels: list[Panel] = Field(default_factory=list)
    dialogue: Dialogue | None = None
    rewrites: int = 0


# ------------------------------------------------------------------------------------------ helpers


def text_field(obj: dict[str, Any], key: str, *, limit: int, required: bool = True) -> str:
    """A string field of a teacher JSON answer, whitespace collapsed; ``invalid_value`` when unusable."""
    value = obj.get(key)
    if value is None and not required:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise SynthReject("invalid_value", f"field {key!r} is missing or not text")
    text = " ".join(value.split())
    if required and not text:
        raise SynthReject("invalid_value", f"field {key!r} is empty")
    if len(text) > limit:
        raise SynthReject("invalid_value", f"field {key!r} is longer than {limit} characters")
    return text


def _answer_kind(obj: dict[str, Any], answer: str) -> AnswerKind:
    if is_yes_no(answer):
        return "closed"
    declared = obj.get("answer_type")
    if declared == "closed" and len(tokens(answer)) <= MAX_CLOSED_WORDS:
        return "closed"
    return "open"


def _short_list(obj: dict[str, Any], key: str) -> list[Any]:
    value = obj.get(key)
    if not isinstance(value, list) or len(value) > 64:
        raise SynthReject("invalid_value", f"field {key!r} is missing or not a short list")
    return value


_BOX_TAG_RE = re.compile(r"\s*<box[^<>]{0,40}>.*?</box>", re.DOTALL)
_REF_TAG_RE = re.compile(r"<ref>(.*?)</ref>", re.DOTALL)


def source_text(sample: Sample, *, limit: int = MAX_SOURCE_CHARS) -> str:
    """The text a sample carries, bounded to ``limit`` (each part to half of it, so a long report does
    not crowd out a short question): the text fields of ``meta.extra`` (:data:`TEXT_KEYS`), the text of
    the sample ``emma annotate`` started from (``meta.extra["source_sample"]``: its report or question
    and answer), then the sample's own report/caption, turns and answer. Repeated texts appear once;
    box tags are dropped (their canonical pixels are not the teacher's convention)."""
    parts: list[tuple[str, str]] = []
    extra = sample.meta.extra
    for key in TEXT_KEYS:
        parts.append((key.replace("_", " "), extra.get(key)))  # type: ignore[arg-type]
    origin = extra.get("source_sample")
    if isinstance(origin, dict):
        task = origin.get("task")
        turns = origin.get("turns") if isinstance(origin.get("turns"), list) else []
        for turn in turns:
            if isinstance(turn, dict) and turn.get("role") in ("user", "assistant"):
                parts.append(("question" if turn["role"] == "user" else "answer", turn.get("content")))
        parts.append((task if task in ("report", "caption") else "answer", origin.get("answer")))
    if sample.task in (TaskType.REPORT, TaskType.CAPTION):
        parts.append((sample.task.value, sample.gold.answer))
    for turn in sample.turns:
        if turn.role != "system":
            parts.append(("question" if turn.role == "user" else "answer", turn.content))
    parts.append(("answer", sample.gold.answer))
    seen: set[str] = set()
    lines: list[str] = []
    for label, value in parts:
        text = _BOX_TAG_RE.sub("", _REF_TAG_RE.sub(r"\1", value)).strip() if isinstance(value, str) else ""
        if text and text not in seen:
            seen.add(text)
            lines.append(_cut(f"{label}: {text}", limit // 2))
    return _cut("\n".join(lines), limit)


def _cut(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, at a space when one is near the end."""
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    return text[: cut if cut > limit // 2 else limit]


def known_findings(sample: Sample, text: str) -> list[str]:
    """The sample's findings: ``meta.findings`` plus the labeler's positive findings in its text."""
    found = [f for f in sample.meta.findings if f.strip()]
    for finding, value in label_report(text).items() if text else ():
        if value != POSITIVE or finding in (NO_FINDING, SUPPORT_DEVICES):
            continue
        if not any(distractors.same_concept(finding, f) for f in found):
            found.append(finding.lower())
    return found


def _facts(sample: Sample, text: str) -> str:
    facts = []
    if sample.meta.modality:
        facts.append(f"modality: {sample.meta.modality}")
    if sample.meta.body_part:
        facts.append(f"body part: {sample.meta.body_part}")
    findings = known_findings(sample, text)
    if findings:
        facts.append(f"findings: {', '.join(findings[:20])}")
    return "; ".join(facts) or "none"


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _messages(images: Sequence[Image.Image], text: str) -> list[Message]:
    parts: list[TextPart | ImagePart] = [ImagePart(_rgb(im)) for im in images]
    parts.append(TextPart(text))
    return [Message.text("system", SYSTEM_PROMPT), Message(role="user", content=parts)]


def _image_name(index: int, n: int) -> str:
    return f"Image {index + 1}" if n > 1 else "the image"


def box_text(box: Box, *, ndigits: int = 0) -> str:
    """A canonical box in EMMA's text form (``<box image=N>`` for an image other than the first)."""
    text = format_boxes([box], ndigits=ndigits)
    return text.replace("<box>", f"<box image={box.image_index}>", 1) if box.image_index else text


# ---------------------------------------------------------------------------------- compound figures

PANEL_GAP = 8


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def compound_figure(
    images: Sequence[Image.Image], *, panel_size: int = 384, shas: Sequence[str | None] | None = None
) -> tuple[Image.Image, list[Panel]]:
    """Tile images into one RGB figure (one row for 2-3 panels, 2 x 2 for 4) with letters A, B, ...

    Each image is scaled to fit a ``panel_size`` square (aspect kept) and centred in its cell on black;
    cells are separated by :data:`PANEL_GAP` white pixels. The letter sits in a black box in the
    top-left corner of the panel. Returns the figure and each panel's place.
    """
    n = len(images)
    if not 2 <= n <= 4:
        raise ValueError(f"a compound figure takes 2 to 4 images, got {n}")
    if panel_size < 32:
        raise ValueError(f"panel_size must be at least 32, got {panel_size}")
    cols = 2 if n == 4 else n
    rows = 2 if n == 4 else 1
    width = cols * panel_size + (cols + 1) * PANEL_GAP
    height = rows * panel_size + (rows + 1) * PANEL_GAP
    figure = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(figure)
    font = _font(max(12, panel_size // 12))
    panels: list[Panel] = []
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        cx = PANEL_GAP + c * (panel_size + PANEL_GAP)
        cy = PANEL_GAP + r * (panel_size + PANEL_GAP)
        draw.rectangle((cx, cy, cx + panel_size - 1, cy + panel_size - 1), fill=(0, 0, 0))
        rgb = _rgb(image)
        scale = min(panel_size / rgb.width, panel_size / rgb.height)
        w, h = max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))
        resized = rgb.resize((w, h), Image.Resampling.BICUBIC)
        x, y = cx + (panel_size - w) // 2, cy + (panel_size - h) // 2
        figure.paste(resized, (x, y))
        letter = OPTION_LETTERS[i]
        left, top, right, bottom = draw.textbbox((0, 0), letter, font=font)
        pad = max(2, panel_size // 64)
        draw.rectangle((cx, cy, cx + right - left + 2 * pad, cy + bottom - top + 2 * pad), fill=(0, 0, 0))
        draw.text((cx + pad - left, cy + pad - top), letter, fill=(255, 255, 255), font=font)
        sha = shas[i] if shas is not None and i < len(shas) else None
        panels.append(Panel(letter=letter, box=(x, y, x + w, y + h), image_index=i, sha256=sha))
    return figure, panels


# ----------------------------------------------------------------------------------------- rendering


def user_text(record: SynthRecord, *, region: str | None = None) -> str:
    """The user turn: context, question (region placeholder filled), multiple-choice options."""
    question = record.question
    if record.region is not None:
        question = question.replace(REGION, region if region is not None else box_text(record.region))
    text = f"{record.context}\n\n{question}" if record.context else question
    if record.options:
        lines = [f"{OPTION_LETTERS[i]}. {o}" for i, o in enumerate(record.options)]
        text += "\nOptions:\n" + "\n".join(lines) + "\nAnswer with the option's letter."
    return text


def assistant_text(record: SynthRecord) -> str:
    if record.kind == "choice" and record.options is not None and record.answer_index is not None:
        return f"{OPTION_LETTERS[record.answer_index]}. {record.options[record.answer_index]}"
    if record.kind == "grounding":
        ref = f"<ref>{record.label}</ref>" if record.label else ""
        return ref + "".join(box_text(b) for b in record.boxes)
    if record.rationale:
        return f"{record.rationale}\nAnswer: {record.answer}"
    return record.answer


def task_type(record: SynthRecord) -> TaskType:
    if record.task in ("single_subimage", "multi_subimage", "dialogue"):
        return TaskType.REASONING
    return {
        "closed": TaskType.CLOSED_VQA,
        "open": TaskType.OPEN_VQA,
        "choice": TaskType.MULTIPLE_CHOICE,
        "grounding": TaskType.GROUNDING,
    }[record.kind]


def render(record: SynthRecord, base: Sample) -> Sample:
    """The canonical sample of ``record``; ``base`` gives the id, images and meta (its turns are replaced).

    Keeps ``base.meta.extra["annotation"]`` (provenance of earlier steps) and writes the record into
    ``meta.extra["synth"]``.
    """
    shown = list(range(len(base.images)))
    if record.dialogue is not None:
        d = record.dialogue
        differential = "\n".join(f"{i + 1}. {x}" for i, x in enumerate(d.differential))
        turns = [
            Turn(role="user", content=f"{d.complaint}\n\n{DIALOGUE_QUESTIONS[0]}", images=shown),
            Turn(role="assistant", content=d.findings),
            Turn(role="user", content=DIALOGUE_QUESTIONS[1]),
            Turn(role="assistant", content=differential),
            Turn(role="user", content=DIALOGUE_QUESTIONS[2]),
            Turn(role="assistant", content=d.next_step),
        ]
    else:
        turns = [
            Turn(role="user", content=user_text(record), images=shown),
            Turn(role="assistant", content=assistant_text(record)),
        ]
    gold = Gold(
        answer=record.label if record.kind == "grounding" else record.answer,
        options=record.options,
        answer_index=record.answer_index,
        boxes=list(record.boxes),
    )
    extra = dict(base.meta.extra)
    extra["synth"] = record.model_dump(mode="json")
    meta = base.meta.model_copy(
        update={
            "question_type": record.task,
            "answer_type": record.kind if record.kind in ("closed", "open") else None,
            "extra": extra,
        }
    )
    return Sample(
        id=base.id, task=task_type(record), images=list(base.images), turns=turns, gold=gold, meta=meta
    )


def record_of(sample: Sample) -> SynthRecord:
    """The :class:`SynthRecord` of a synthetic sample (``SynthReject("not_synthetic")`` when absent)."""
    raw = sample.meta.extra.get("synth")
    if not isinstance(raw, dict):
        raise SynthReject("not_synthetic", "the sample carries no synthetic record")
    try:
        return SynthRecord.model_validate(raw)
    except ValidationError:
        raise SynthReject("not_synthetic", "the sample's synthetic record is invalid") from None


_Step = TypeVar("_Step")
_RecordCall = Callable[[_Step, Item, SynthRecord, list[Image.Image], Ask], list[Item]]
_StepCall = Callable[[_Step, Item, list[Image.Image], Ask], list[Item]]


def with_record(call: _RecordCall[_Step]) -> _StepCall[_Step]:
    """A step's ``__call__`` that works on the item's :class:`SynthRecord` (:func:`record_of`): an item
    without a valid record is rejected with the reason before ``call`` runs."""

    @functools.wraps(call)
    def step(self: _Step, item: Item, images: list[Image.Image], ask: Ask) -> list[Item]:
        try:
            record = record_of(item.sample)
        except SynthReject as exc:
            return [reject(item, exc.reason, exc.detail)]
        return call(self, item, record, images, ask)

    return step


# ---------------------------------------------------------------------------------------- generation


@dataclass
class _Context:
    """What every generator gets: the source sample, its images, its text, and the teacher."""

    sample: Sample
    images: list[Image.Image]
    text: str
    source_block: str
    ask: Ask
    n_options: int
    panel_size: int
    max_panels: int

    def ask_json(self, task: str, images: Sequence[Image.Image], instructions: str) -> dict[str, Any]:
        answer = self.ask(
            _messages(images, f"{self.source_block}\n\n{instructions}"), call=task, sampling=SAMPLING
        )
        obj = find_json_object(answer, max_chars=MAX_ANSWER_JSON_CHARS).value
        if obj is None:
            raise SynthReject("invalid_json", "the teacher's answer holds no JSON object")
        return obj


def _rules() -> str:
    return _COMMON_RULES


def _teacher_record(
    ctx: _Context, task: SynthTask, kind: AnswerKind, obj: dict[str, Any], **fields: Any
) -> SynthRecord:
    """A record of ``task`` made from the teacher's JSON ``obj``: its bounded context and question (unless
    ``fields`` give the question), and ``fields``."""
    context = text_field(obj, "context", limit=MAX_CONTEXT_CHARS, required=False)
    if "question" not in fields:
        fields["question"] = text_field(obj, "question", limit=MAX_QUESTION_CHARS)
    return SynthRecord(task=task, kind=kind, source_id=ctx.sample.id, context=context, **fields)


def _qa_record(
    ctx: _Context, task: SynthTask, obj: dict[str, Any], *, rationale: bool, focus: list[int] | None = None
) -> SynthRecord:
    """The record of a question–answer task from the teacher's JSON (question, context, answer and,
    with ``rationale``, the rationale), each field bounded."""
    answer = text_field(obj, "answer", limit=MAX_SHORT_ANSWER_CHARS)
    return _teacher_record(
        ctx,
        task,
        _answer_kind(obj, answer),
        obj,
        answer=answer,
        rationale=text_field(obj, "rationale", limit=MAX_RATIONALE_CHARS) if rationale else "",
        focus=focus or [],
    )


def _gen_text_qa(ctx: _Context) -> tuple[SynthRecord, list[Image.Image] | None]:
    obj = ctx.ask_json("text_qa", [], PROMPTS["text_qa"].format(rules=_rules()))
    return _qa_record(ctx, "text_qa", obj, rationale=False), []  # pure text: the output has no image


def _labelled_boxes(sample: Sample, n_images: int) -> list[Box]:
    return [
        b
        for b in sample.gold.boxes
        if b.label and b.label.strip() and 0 <= b.image_index < n_images and tokens(b.label)
    ]


def _pixel_box(box: Box, image: Image.Image) -> Box:
    return box if box.space is CoordSpace.PIXEL else box.to_space(CoordSpace.PIXEL, image.width, image.height)


def _gen_bbox(ctx: _Context) -> tuple[SynthRecord, list[Image.Image] | None]:
    boxes = _labelled_boxes(ctx.sample, len(ctx.images))
    rng = seeded_rng(ctx.sample.id, "bbox_vqa")
    box = boxes[rng.randrange(len(boxes))]
    image = ctx.images[box.image_index]
    box = _pixel_box(box, image)
    label = " ".join((box.label or "").split())
    if len(label) > MAX_SHORT_ANSWER_CHARS:
        raise SynthReject("invalid_value", "the box label is too long to be an answer")
    where = _image_name(box.image_index, len(ctx.images)).removeprefix("the ")
    where = f"image ({where})" if len(ctx.images) > 1 else "image"
    locate = rng.random() < 0.5
    if locate:
        obj = ctx.ask_json("bbox_vqa", ctx.images, PROMPTS["bbox_locate"].format(label=label, where=where))
        return (
            _teacher_record(
                ctx,
                "bbox_vqa",
                "grounding",
                obj,
                answer=box_text(box),
                label=label,
                boxes=[box],
                focus=[box.image_index],
            ),
            None,
        )
    shown = list(ctx.images)
    shown[box.image_index] = render_overlay(image, [box.model_copy(update={"image_index": 0})], labels=False)
    obj = ctx.ask_json(
        "bbox_vqa", shown, PROMPTS["bbox_region"].format(label=label, where=where, region=REGION)
    )
    question = text_field(obj, "question", limit=MAX_QUESTION_CHARS)
    if question.count(REGION) != 1:
        raise SynthReject("invalid_value", f"the question must hold {REGION} exactly once")
    return (
        _teacher_record(
            ctx,
            "bbox_vqa",
            "open",
            obj,
            question=question,
            answer=label,
            region=box.model_copy(update={"label": None}),
            focus=[box.image_index],
        ),
        None,
    )


def _gen_single(ctx: _Context) -> tuple[SynthRecord, list[Image.Image] | None]:
    n = len(ctx.images)
    focus = seeded_rng(ctx.sample.id, "single_subimage").randrange(n)
    prompt = PROMPTS["single_subimage"].format(focus=_image_name(focus, n), rules=_rules())
    obj = ctx.ask_json("single_subimage", ctx.images, prompt)
    return _qa_record(ctx, "single_subimage", obj, rationale=True, focus=[focus]), None


def _image_numbers(values: list[Any], n: int) -> list[int]:
    out: list[int] = []
    for v in values:
        if isinstance(v, str) and v.strip().lower().removeprefix("image").strip().isdigit():
            v = int(v.strip().lower().removeprefix("image").strip())
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= n:
            raise SynthReject("invalid_value", f"image numbers must be 1..{n}")
        if v - 1 not in out:
            out.append(v - 1)
    return sorted(out)


def _gen_multi(ctx: _Context) -> tuple[SynthRecord, list[Image.Image] | None]:
    n = len(ctx.images)
    obj = ctx.ask_json("multi_subimage", ctx.images, PROMPTS["multi_subimage"].format(n=n, rules=_rules()))
    focus = _image_numbers(_short_list(obj, "images"), n)
    if len(focus) < 2:
        raise SynthReject("invalid_value", "a multi-image question must need at least two images")
    return _qa_record(ctx, "multi_subimage", obj, rationale=True, focus=focus), None


def _gen_mc(ctx: _Context) -> tuple[SynthRecord, list[Image.Image] | None]:
    n = len(ctx.images)
    focus = seeded_rng(ctx.sample.id, "mc_subimage").randrange(n)
    categories = list(VOCABULARIES)
    prompt = PROMPTS["mc_subimage"].format(
        focus=_image_name(focus, n),
        categories=" / ".join(c.replace("_", " ") for c in categories),
        n_distractors=ctx.n_options,
        category_list=", ".join(f'"{c}"' for c in categories),
        rules=_rules(),
    )
    obj = ctx.ask_json("mc_subimage", ctx.images, prompt)
    answer = text_field(obj, "answer", limit=MAX_SHORT_ANSWER_CHARS)
    category = obj.get("category")
    if isinstance(category, str):
        category = category.strip().lower().replace(" ", "_")
    if category not in VOCABULARIES:
        raise SynthReject("invalid_value", "the answer's category is not one of " + ", ".join(categories))
    suggestions = obj.get("distractors")
    if not isinstance(suggestions, list):
        suggestions = []
    options = make_options(answer, category, ctx.sample.id, suggestions[:32], n_options=ctx.n_options)
    if options is None:
        raise SynthReject("few_distractors", f"fewer than {ctx.n_options - 1} usable distractors")
    return (
        _teacher_record(
            ctx,
            "mc_subimage",
            "choice",
            obj,
            answer=options.options[options.answer_index],
            options=options.options,
            answer_index=options.answer_index,
            category=category,
            focus=[focus],
        ),
        None,
    )


_PANEL_RE = re.compile(r"(?:panel\s*)?\(?([A-Za-z])\)?\.?", re.IGNORECASE)
_PANEL_NAMED_RE = re.compile(r"\bpanel\s+\(?([A-Za-z])\)?(?![\w])", re.IGNORECASE)


def panel_letter(text: str, letters: Sequence[str]) -> str | None:
    """The panel an answer names: the whole answer is a letter (``B``, ``(B)``, ``Panel B.``), or it
    names exactly one panel as ``panel B``; ``None`` otherwise or when the letter is not a panel.

    Needed because answer normalisation drops the article *a*, so panel "A" cannot be compared as text.
    """
    t = text.strip().strip("*`\"'")
    m = _PANEL_RE.fullmatch(t)
    found = {m.group(1).upper()} if m else {x.upper() for x in _PANEL_NAMED_RE.findall(t)}
    if len(found) != 1:
        return None
    letter = found.pop()
    return letter if letter in letters else None


def _gen_compound(ctx: _Context) -> tuple[SynthRecord, list[Image.Image] | None]:
    used = ctx.images[: ctx.max_panels]
    shas = [ref.sha256 for ref in ctx.sample.images[: len(used)]]
    figure, panels = compound_figure(used, panel_size=ctx.panel_size, shas=shas)
    letters = [p.letter for p in panels]
    prompt = PROMPTS["compound_figure"].format(panels=", ".join(letters), rules=_rules())
    obj = ctx.ask_json("compound_figure", [figure], prompt)
    named = _short_list(obj, "panels")
    focus: list[int] = []
    for value in named:
        letter = value.strip().upper().removeprefix("PANEL").strip() if isinstance(value, str) else None
        if letter not in letters:
            raise SynthReject("invalid_value", f"panels must be among {', '.join(letters)}")
        if letters.index(letter) not in focus:
            focus.append(letters.index(letter))
    if not focus:
        raise SynthReject("invalid_value", "the question names no panel")
    answer = text_field(obj, "answer", limit=MAX_SHORT_ANSWER_CHARS)
    letter = panel_letter(answer, letters) if _PANEL_RE.fullmatch(answer) else None
    if letter is not None:
        answer = letter  # "Panel B" → "B": a panel answer is checked as a letter
    return (
        _teacher_record(
            ctx,
            "compound_figure",
            "closed" if letter is not None else _answer_kind(obj, answer),
            obj,
            answer=answer,
            focus=sorted(focus),
            panels=panels,
        ),
        [figure],
    )


def _gen_dialogue(ctx: _Context) -> tuple[SynthRecord, list[Image.Image] | None]:
    obj = ctx.ask_json("dialogue", ctx.images, PROMPTS["dialogue"])
    raw = obj.get("differential")
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not 1 <= len(raw) <= 8:
        raise SynthReject("invalid_value", "field 'differential' must be a list of 1 to 8 diagnoses")
    differential = [text_field({"item": x}, "item", limit=MAX_SHORT_ANSWER_CHARS) for x in raw]
    dialogue = Dialogue(
        complaint=text_field(obj, "complaint", limit=MAX_DIALOGUE_FIELD_CHARS),
        findings=text_field(obj, "findings", limit=MAX_DIALOGUE_FIELD_CHARS),
        differential=differential,
        next_step=text_field(obj, "next_step", limit=MAX_DIALOGUE_FIELD_CHARS),
    )
    return (
        SynthRecord(
            task="dialogue",
            kind="open",
            source_id=ctx.sample.id,
            context=dialogue.complaint,
            question=DIAGNOSIS_QUESTION,
            answer=differential[0],
            focus=list(range(len(ctx.images))),
            dialogue=dialogue,
        ),
        None,
    )


Generator = Callable[[_Context], tuple[SynthRecord, "list[Image.Image] | None"]]
GENERATORS: dict[str, Generator] = {
    "text_qa": _gen_text_qa,
    "bbox_vqa": _gen_bbox,
    "single_subimage": _gen_single,
    "multi_subimage": _gen_multi,
    "mc_subimage": _gen_mc,
    "compound_figure": _gen_compound,
    "dialogue": _gen_dialogue,
}


def applicable(task: str, sample: Sample, n_images: int, text: str) -> bool:
    """Whether ``task`` can be made from a sample with ``n_images`` readable images and ``text``."""
    if task == "text_qa":
        return bool(text.strip())
    if task == "bbox_vqa":
        return n_images >= 1 and bool(_labelled_boxes(sample, n_images))
    if task in ("multi_subimage", "compound_figure"):
        return n_images >= 2
    return n_images >= 1


def parse_tasks(value: str | Sequence[str] | None) -> list[SynthTask]:
    """Task names from a comma-separated string or a list (``None``, ``"all"``: every task), in order."""
    if value is None:
        return list(TASKS)
    names = value.split(",") if isinstance(value, str) else list(value)
    out: list[SynthTask] = []
    for raw in names:
        name = raw.strip().lower().replace("-", "_")
        if not name:
            continue
        if name == "all":
            return list(TASKS)
        if name not in TASKS:
            raise ValueError(f"unknown synth task {raw!r} (known: {', '.join(TASKS)}, all)")
        if name not in out:
            out.append(name)  # type: ignore[arg-type]
    if not out:
        raise ValueError("no synth task given")
    return out


@dataclass
class Synthesize:
    """The generator step: one item per requested, applicable task (see the module docstring).

    ``n_options``: multiple-choice options per question; ``panel_size`` / ``max_panels``: compound
    figure layout; ``max_images``: a sample with more images is used (and its items shown) with its
    first ``max_images`` only, which bounds every teacher request.
    """

    tasks: Sequence[str] = TASKS
    n_options: int = 4
    panel_size: int = 384
    max_panels: int = 4
    max_images: int = 8
    name: str = "synth"
    prompt_hash: str = field(init=False)

    def __post_init__(self) -> None:
        self.tasks = parse_tasks(list(self.tasks))
        if not 2 <= self.n_options <= 8:
            raise ValueError(f"n_options must be 2..8, got {self.n_options}")
        if not 2 <= self.max_panels <= 4:
            raise ValueError(f"max_panels must be 2..4, got {self.max_panels}")
        if not 64 <= self.panel_size <= 2048:
            raise ValueError(f"panel_size must be 64..2048, got {self.panel_size}")
        if not 1 <= self.max_images <= 64:
            raise ValueError(f"max_images must be 1..64, got {self.max_images}")
        self.prompt_hash = prompt_hash(
            "synth/1",
            SYSTEM_PROMPT,
            _COMMON_RULES,
            PROMPTS,
            DIALOGUE_QUESTIONS,
            DIAGNOSIS_QUESTION,
            list(self.tasks),
            self.n_options,
            self.panel_size,
            self.max_panels,
            self.max_images,
            VOCABULARIES,
            distractors.SYNONYMS,
            distractors.ABBREVIATIONS,
        )

    def __call__(self, item: Item, images: list[Image.Image], ask: Ask) -> list[Item]:
        source = item.sample
        images = list(images[: self.max_images])
        if len(source.images) > len(images):
            source = source.model_copy(update={"images": source.images[: len(images)]})
        text = source_text(source)
        ctx = _Context(
            sample=source,
            images=images,
            text=text,
            source_block=PROMPTS["source"].format(text=text or "(none)", facts=_facts(source, text)),
            ask=ask,
            n_options=self.n_options,
            panel_size=self.panel_size,
            max_panels=self.max_panels,
        )
        out: list[Item] = []
        for task in self.tasks:
            if not applicable(task, source, len(images), text):
                continue
            out.append(self._one(task, ctx))
        if not out:
            return [
                Item(
                    sample=item.sample,
                    rejected="no_task",
                    detail="no requested task applies (needs text, labelled boxes or several images)",
                )
            ]
        return out

    def _one(self, task: str, ctx: _Context) -> Item:
        source = ctx.sample
        sample_id = f"{source.id}/{task}"
        base = source.model_copy(update={"id": sample_id})
        asked_before = len(getattr(ctx.ask, "times", []))
        try:
            record, new_images = GENERATORS[task](ctx)
        except SynthReject as exc:
            log.info("synth %s: rejected %s", sample_id, exc.reason)
            return Item(sample=base, rejected=exc.reason, detail=exc.detail)
        except TeacherError as exc:
            log.info("synth %s: teacher failed (%s)", sample_id, exc.reason)
            return Item(sample=base, rejected=exc.reason, detail=f"teacher call failed ({exc.reason})")
        if new_images is not None:
            base = base.model_copy(update={"images": [_image_ref(im) for im in new_images]})
        sample = render(record, base)
        entry = provenance(self.name, self.prompt_hash, ctx.ask, confidence=1.0)
        times = getattr(ctx.ask, "times", [])[asked_before:]
        entry["time"] = max(times) if times else None  # this task's own call, not the source's other tasks
        sample = record_provenance(sample, self.name, entry)
        return Item(sample=sample, images=new_images or None)


def _image_ref(image: Image.Image) -> ImageRef:
    """The ref of a new image as the dataset writer will store it (PNG, named by its SHA-256)."""
    sha = hashlib.sha256(encode_png(image)).hexdigest()
    return ImageRef(sha256=sha, width=image.width, height=image.height)
