"""Context refinement: a synthetic question and its context must not give the answer away.

:func:`find_leaks` checks a :class:`~emma.annotate.synth.SynthRecord`; :class:`Refine` is the runner
step that asks the teacher to rewrite a leaking item (up to ``max_rewrites`` times, each rewrite checked
again) and rejects it (``leak``) when it still leaks.

**What counts as a leak** (texts compared after :func:`emma.text.normalize.normalize_answer`, as whole
words, never substrings):

- ``answer_in_context`` / ``answer_in_question``: the answer, or a searchable synonym of it
  (:func:`emma.annotate.distractors.searchable_forms`), occurs in the context or the question. For a
  closed question an answer the question offers as an alternative ("left or right", an ``or`` within
  two words of it) is no leak. A multiple-choice question is checked without its options.
- ``finding_in_context`` / ``finding_in_question``: the answer is a finding the report labeler knows
  (:mod:`emma.text.labeler`) and the text mentions that finding as present or uncertain, in words
  the synonym table may not have ("hydropneumothorax" for "pneumothorax").
- ``answer_stated`` (yes/no answers): the context states the asked-about thing as present or absent:
  a finding the question names is mentioned in the context with a definite value (labeler: positive or
  negated), or a context sentence holds the question's subject words (its content words without
  question and stop words; all of them, or two thirds when there are three or more) together with a
  yes/no word (:data:`emma.annotate.distractors.YES_NO_SYNONYMS`, ``not``).
- ``box_in_text`` (grounding): the question or context holds a box (``<box>`` tag or a bare
  ``[x1, y1, x2, y2]`` list) with IoU >= ``box_iou`` against the gold box on the same image.

A dialogue is checked on its probe: the chief complaint must not give away the most likely diagnosis
(the findings turn is the assistant's own answer and may name it).

**Rewrites.** The teacher gets the question, the context, the answer and the leak codes (text only, no
image) and returns ``{"context", "question"}`` (a dialogue: ``{"complaint"}``); a bbox question must
keep its ``<region>`` placeholder. An unusable rewrite (no JSON, empty or over-long fields, placeholder
lost) ends the attempts. Call names are ``rewrite1``, ``rewrite2``, ...

Provenance ``meta.extra["annotation"]["refine"]``: confidence 1.0 when the item needed no rewrite
(``source`` ``"rules"``, ``time`` None: no teacher call), ``1 - 0.25 * rewrites`` (at least 0.25)
otherwise (``source`` ``"teacher"``, ``time`` of the last rewrite); ``meta.extra["synth"]["rewrites"]``
counts them. A rejected item keeps its last attempt (the sample in the ``rejected`` split shows it).
A teacher failure during a rewrite is raised to the runner, which rejects the item with its reason.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from emma.annotate.distractors import YES_NO_SYNONYMS, searchable_forms
from emma.annotate.steps import Ask, Item, prompt_hash, provenance, record_provenance, reject
from emma.annotate.synth import (
    MAX_ANSWER_JSON_CHARS,
    MAX_CONTEXT_CHARS,
    MAX_DIALOGUE_FIELD_CHARS,
    MAX_QUESTION_CHARS,
    REGION,
    SAMPLING,
    SYSTEM_PROMPT,
    SynthRecord,
    SynthReject,
    render,
    text_field,
    with_record,
)
from emma.eval.scorers import iou
from emma.infer.types import Message
from emma.text.labeler import NEGATIVE, NO_FINDING, POSITIVE, SUPPORT_DEVICES, UNCERTAIN, explain
from emma.text.model_json import find_json_object
from emma.text.normalize import contains_phrase, is_yes_no, tokens

log = logging.getLogger(__name__)

DEFAULT_BOX_IOU = 0.5
_ALTERNATIVE_WINDOW = 2  # an "or" this many words from the answer makes it an offered alternative
_SENTENCE_RE = re.compile(r"[.!?;\n]+")
_BOX_TAG_RE = re.compile(r"<box(?:\s+image\s*=\s*[\"']?(\d{1,4})[\"']?)?\s*>(.*?)</box>", re.DOTALL)
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)"
_BARE_BOX_RE = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]")
_STOP_TEXT = """
    a an the is are was were be been being there any some of in on at to from by with for this that these
    those it its image images picture scan scans study film view does do did show shows showing shown
    seen see visible evidence present patient patients can could should would will you your identify
    noted note have has had what which where how or and if as than then here appear appears appearing
    demonstrate demonstrates demonstrated depict depicts depicted indicate indicates suggest suggests
    yes no not image1 image2 panel panels also
"""
_STOP_WORDS = frozenset(_STOP_TEXT.split())
_POLARITY = frozenset(w for forms in YES_NO_SYNONYMS.values() for form in forms for w in tokens(form)) | {
    "not",
    "without",
    "absent",
    "negative",
    "positive",
}

REWRITE_PROMPT = (
    "The question and context below give the answer away ({reasons}). Rewrite them so that neither "
    "contains the answer, a synonym of it, or a hint that gives it away, while the question still asks "
    "for exactly the same answer and stays answerable from the image(s).{region_rule}\n"
    "Context: {context}\nQuestion: {question}\nAnswer (must not appear): {answer}\n"
    'JSON keys: "context" (may be empty), "question".'
)
REWRITE_DIALOGUE_PROMPT = (
    "The patient's chief complaint below gives the diagnosis away ({reasons}). Rewrite it as the "
    "clinician would relay it (symptoms, history, vital signs), without the diagnosis, a synonym of it, "
    "or the imaging findings.\nComplaint: {context}\nDiagnosis (must not appear): {answer}\n"
    'JSON keys: "complaint".'
)
REGION_RULE = f" Keep the token {REGION} exactly once in the question; it stands for the marked region."


@dataclass(frozen=True)
class Leak:
    """One way the item gives its answer away: a reason code and where (``context`` / ``question``)."""

    code: str
    where: str

    def __str__(self) -> str:
        return self.code


def _findings(text: str, values: tuple[int, ...]) -> set[str]:
    return {
        m.finding
        for m in explain(text)
        if m.value in values and m.finding not in (NO_FINDING, SUPPORT_DEVICES)
    }


def _answer_findings(answer: str) -> set[str]:
    """The labeler findings the answer *is* (all its mentions positive), else none."""
    mentions = explain(answer)
    if not mentions or any(m.value != POSITIVE for m in mentions):
        return set()
    return {m.finding for m in mentions if m.finding not in (NO_FINDING, SUPPORT_DEVICES)}


def _offered_alternative(question_tokens: list[str], form_tokens: list[str]) -> bool:
    """Whether every occurrence of ``form`` in the question has an ``or`` within a couple of words."""
    k = len(form_tokens)
    hits = [i for i in range(len(question_tokens) - k + 1) if question_tokens[i : i + k] == form_tokens]
    if not hits:
        return False
    for i in hits:
        before = question_tokens[max(0, i - _ALTERNATIVE_WINDOW) : i]
        after = question_tokens[i + k : i + k + _ALTERNATIVE_WINDOW]
        if "or" not in before and "or" not in after:
            return False
    return True


def _text_boxes(text: str) -> list[tuple[int, tuple[float, float, float, float]]]:
    """Every box written in ``text`` (``<box>`` tags, with their image, and bare 4-number lists)."""
    found: list[tuple[int, tuple[float, float, float, float]]] = []
    for m in _BOX_TAG_RE.finditer(text):
        image = int(m.group(1)) if m.group(1) else 0
        for g in _BARE_BOX_RE.finditer(m.group(2)):
            found.append((image, tuple(float(x) for x in g.groups())))  # type: ignore[arg-type]
    outside = _BOX_TAG_RE.sub(" ", text)
    for g in _BARE_BOX_RE.finditer(outside):
        found.append((-1, tuple(float(x) for x in g.groups())))  # type: ignore[arg-type]
    return found


def _box_leaks(record: SynthRecord, texts: dict[str, str], threshold: float) -> list[Leak]:
    leaks: list[Leak] = []
    for where, text in texts.items():
        for image, coords in _text_boxes(text):
            x1, y1, x2, y2 = coords
            if x2 < x1 or y2 < y1:
                continue
            for gold in record.boxes:
                if image not in (-1, gold.image_index):
                    continue
                if iou(coords, gold.as_tuple()) >= threshold:
                    leaks.append(Leak("box_in_text", where))
                    break
    return leaks


def _subject(question: str) -> list[str]:
    return [t for t in tokens(question) if t not in _STOP_WORDS and not t.isdigit()]


def _yes_no_leaks(question: str, context: str) -> list[Leak]:
    if not context.strip():
        return []
    asked = _findings(question, (POSITIVE, NEGATIVE, UNCERTAIN))
    if asked & _findings(context, (POSITIVE, NEGATIVE)):
        return [Leak("answer_stated", "context")]
    subject = set(_subject(question))
    if not subject:
        return []
    need = len(subject) if len(subject) < 3 else -(-2 * len(subject) // 3)
    for sentence in _SENTENCE_RE.split(context):
        words = set(tokens(sentence))
        if len(subject & words) >= need and words & _POLARITY:
            return [Leak("answer_stated", "context")]
    return []


def find_leaks(record: SynthRecord, *, box_iou: float = DEFAULT_BOX_IOU) -> list[Leak]:
    """Every way ``record``'s question or context gives its answer away (empty: none)."""
    question = record.question.replace(REGION, " ")
    texts = {"context": record.context, "question": question}
    if record.dialogue is not None:
        texts = {"context": record.dialogue.complaint}
    if record.kind == "grounding":
        return _box_leaks(record, texts, box_iou)
    answer = record.answer
    if is_yes_no(answer):
        return _yes_no_leaks(question, texts["context"]) if record.dialogue is None else []
    leaks: list[Leak] = []
    forms = [tokens(f) for f in searchable_forms(answer)]
    forms = [f for f in forms if f]
    answer_findings = _answer_findings(answer)
    for where, text in texts.items():
        if not text.strip():
            continue
        words = tokens(text)
        found = [form for form in forms if contains_phrase(words, form)]
        offered = where == "question" and record.kind == "closed" and bool(found)
        if offered and all(_offered_alternative(words, form) for form in found):
            continue  # "left or right?": the question offers the answer as one alternative
        if found:
            leaks.append(Leak(f"answer_in_{where}", where))
        elif answer_findings and answer_findings & _findings(text, (POSITIVE, UNCERTAIN)):
            leaks.append(Leak(f"finding_in_{where}", where))
    return leaks


def _rewrite_messages(record: SynthRecord, leaks: list[Leak]) -> list[Message]:
    reasons = ", ".join(sorted({leak.code for leak in leaks}))
    if record.dialogue is not None:
        text = REWRITE_DIALOGUE_PROMPT.format(
            reasons=reasons, context=record.dialogue.complaint, answer=record.answer
        )
    else:
        text = REWRITE_PROMPT.format(
            reasons=reasons,
            region_rule=REGION_RULE if record.region is not None else "",
            context=record.context or "(none)",
            question=record.question,
            answer=record.answer,  # grounding: the box, which must not be given
        )
    return [Message.text("system", SYSTEM_PROMPT), Message.text("user", text)]


def _apply_rewrite(record: SynthRecord, obj: dict[str, Any]) -> SynthRecord:
    """The record with the rewritten texts (``SynthReject`` when the rewrite is unusable)."""
    if record.dialogue is not None:
        complaint = text_field(obj, "complaint", limit=MAX_DIALOGUE_FIELD_CHARS)
        dialogue = record.dialogue.model_copy(update={"complaint": complaint})
        return record.model_copy(
            update={"dialogue": dialogue, "context": complaint, "rewrites": record.rewrites + 1}
        )
    question = text_field(obj, "question", limit=MAX_QUESTION_CHARS)
    context = text_field(obj, "context", limit=MAX_CONTEXT_CHARS, required=False)
    if record.region is not None and question.count(REGION) != 1:
        raise SynthReject("invalid_value", f"the rewrite lost the {REGION} placeholder")
    return record.model_copy(
        update={"question": question, "context": context, "rewrites": record.rewrites + 1}
    )


@dataclass
class Refine:
    """The context-refinement step: rewrite leaking items, reject those that still leak (``leak``)."""

    max_rewrites: int = 1
    box_iou: float = DEFAULT_BOX_IOU
    name: str = "refine"
    prompt_hash: str = field(init=False)

    def __post_init__(self) -> None:
        if not 0 <= self.max_rewrites <= 5:
            raise ValueError(f"max_rewrites must be 0..5, got {self.max_rewrites}")
        if not 0.0 < self.box_iou <= 1.0:
            raise ValueError(f"box_iou must be in (0, 1], got {self.box_iou}")
        self.prompt_hash = prompt_hash(
            "refine/1",
            SYSTEM_PROMPT,
            REWRITE_PROMPT,
            REWRITE_DIALOGUE_PROMPT,
            REGION_RULE,
            sorted(_STOP_WORDS),
            self.max_rewrites,
            self.box_iou,
        )

    @with_record
    def __call__(self, item: Item, record: SynthRecord, images: list[Image.Image], ask: Ask) -> list[Item]:
        sample = item.sample
        start = record.rewrites
        leaks = find_leaks(record, box_iou=self.box_iou)
        note = ""
        while leaks and record.rewrites - start < self.max_rewrites:
            attempt = record.rewrites - start + 1
            answer = ask(_rewrite_messages(record, leaks), call=f"rewrite{attempt}", sampling=SAMPLING)
            obj = find_json_object(answer, max_chars=MAX_ANSWER_JSON_CHARS).value
            try:
                if obj is None:
                    raise SynthReject("invalid_json", "the rewrite holds no JSON object")
                record = _apply_rewrite(record, obj)
            except SynthReject as exc:
                note = f"; rewrite {attempt} unusable ({exc.reason})"
                break
            leaks = find_leaks(record, box_iou=self.box_iou)
        rewrites = record.rewrites - start
        out = Item(sample=render(record, sample) if rewrites else sample, images=item.images)
        if leaks:
            codes = ", ".join(sorted({leak.code for leak in leaks}))
            log.info("refine %s: rejected leak (%s) after %d rewrite(s)", sample.id, codes, rewrites)
            return [reject(out, "leak", f"{codes} after {rewrites} rewrite(s){note}")]
        confidence = 1.0 if rewrites == 0 else max(0.25, 1.0 - 0.25 * rewrites)
        entry = provenance(
            self.name,
            self.prompt_hash,
            ask,
            confidence=confidence,
            source="rules" if rewrites == 0 else "teacher",
        )
        return [Item(sample=record_provenance(out.sample, self.name, entry), images=item.images)]
