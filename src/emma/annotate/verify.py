"""Generator–verifier: a second teacher pass must find the answer from the image(s) and context alone.

:class:`Verify` is the runner step after :class:`~emma.annotate.refine.Refine`. It shows the teacher the
item's images (none for pure-text QA; the compound figure for a compound-figure item) and the user turn
*without the answer* (context, question, options), asks for the answer alone (call name ``verify``),
and compares with the item's answer using the evaluation harness's own extraction and scoring
(:mod:`emma.eval.extract`, :mod:`emma.eval.scorers`), so an item is kept only when a model answering
it would be scored correct:

- multiple choice: :func:`~emma.eval.scorers.score_choice` (a letter or exactly one option's text);
- a compound-figure answer that is a panel letter: the panel the verifier names
  (:func:`emma.annotate.synth.panel_letter`; text normalisation would drop panel "A" as an article);
- closed (yes/no, or a short closed answer): :func:`~emma.eval.scorers.score_closed`;
- open (also reasoning items and a dialogue's diagnosis probe): exact match, token F1 >= ``open_f1``
  (default 0.5), or the located answer and the gold are the same concept in the synonym table
  (:func:`emma.annotate.distractors.same_concept`: "collapsed lung" verifies "pneumothorax");
- grounding: the verifier's boxes are read in *its* family's convention
  (:func:`emma.infer.grounding.parse_model_boxes`, family from ``ask.family``) and one of them on the
  gold box's image must reach IoU >= ``box_iou`` (default 0.5) with it.

A bbox question's region is shown to the verifier in its family's box convention
(:func:`emma.infer.grounding.boxes_prompt_text`), not in canonical pixels.

Anything else is rejected ``unverified`` with a detail saying how it failed (``unparseable``, ``wrong
option``, ``token F1 0.20 < 0.50``, ``IoU 0.31 < 0.50``, ``no box``). Accepted items get
``meta.extra["annotation"]["verify"]`` with the agreement as confidence (1.0 for a matching closed or
choice answer, the token F1 or 1.0 for open, the IoU for grounding) and ``meta.extra["verify"]`` =
``{"score", "status"}``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from PIL import Image

from emma.annotate.distractors import same_concept
from emma.annotate.steps import Ask, Item, prompt_hash, provenance, record_provenance, reject
from emma.annotate.synth import REGION, SynthRecord, panel_letter, user_text, with_record
from emma.data.schema import Gold
from emma.eval.extract import locate_answer
from emma.eval.scorers import iou, score_choice, score_closed, score_open
from emma.infer.grounding import boxes_prompt_text, family_or_generic, parse_model_boxes
from emma.infer.types import ImagePart, Message, SamplingParams, TextPart
from emma.text.normalize import is_yes_no

log = logging.getLogger(__name__)

DEFAULT_OPEN_F1 = 0.5
DEFAULT_BOX_IOU = 0.5

VERIFY_SYSTEM = (
    "You are a careful medical expert. Answer the question from the image(s) and the text given, "
    "and nothing else."
)
ANSWER_FORMS = {
    "yes_no": "Answer with yes or no only.",
    "short": "Give only the final answer, in a few words.",
    "choice": "Answer with the letter of the correct option only.",
    "panel": "Answer with the panel letter only.",
    "grounding": "Answer with the bounding box of the {label} only, in this form:\n{example}",
}
SAMPLING = SamplingParams(max_new_tokens=256, temperature=0.0)


@dataclass(frozen=True)
class Verdict:
    """Whether the verifier's answer matches, how well (0..1), and how it failed (one line)."""

    ok: bool
    score: float
    status: str


def _panels(record: SynthRecord) -> list[str] | None:
    """The panel letters when the record's answer is a panel of its compound figure, else None."""
    letters = [p.letter for p in record.panels]
    return letters if letters and record.answer in letters else None


def _instruction(record: SynthRecord, family: str | None) -> str:
    if _panels(record) is not None:
        return ANSWER_FORMS["panel"]
    if record.kind == "choice":
        return ANSWER_FORMS["choice"]
    if record.kind == "grounding":
        spec = family_or_generic(family, [])
        return ANSWER_FORMS["grounding"].format(
            label=record.label or "finding", example=spec.box_syntax_example
        )
    return ANSWER_FORMS["yes_no"] if is_yes_no(record.answer) else ANSWER_FORMS["short"]


def verify_prompt(record: SynthRecord, sizes: list[tuple[int, int]], family: str | None) -> str:
    """The verifier's text: context, question (region in the verifier's convention), options, format."""
    region = None
    if record.region is not None:
        unlabelled = record.region.model_copy(update={"label": None})  # the label is the answer
        region = boxes_prompt_text([unlabelled], family_or_generic(family, []), sizes, syntax="emma")
    return f"{user_text(record, region=region)}\n\n{_instruction(record, family)}"


def judge(
    record: SynthRecord,
    answer: str,
    sizes: list[tuple[int, int]],
    family: str | None,
    *,
    open_f1: float = DEFAULT_OPEN_F1,
    box_iou: float = DEFAULT_BOX_IOU,
) -> Verdict:
    """Compare the verifier's ``answer`` with the record's (see the module docstring)."""
    letters = _panels(record)
    if letters is not None:
        said = panel_letter(locate_answer(answer), letters)
        if said is None:
            return Verdict(False, 0.0, "unparseable")
        ok = said == record.answer
        return Verdict(ok, float(ok), "ok" if ok else "wrong panel")
    if record.kind == "choice":
        gold = Gold(answer=record.answer, options=record.options, answer_index=record.answer_index)
        s = score_choice(gold, answer)
        if not s.parsed:
            return Verdict(False, 0.0, "unparseable")
        return Verdict(s.correct, float(s.correct), "ok" if s.correct else "wrong option")
    if record.kind == "grounding":
        result = parse_model_boxes(answer, family_or_generic(family, []), sizes)
        gold = record.boxes[0]
        found = [b for b in result.boxes if b.image_index == gold.image_index]
        if not found:
            return Verdict(False, 0.0, "no box")
        best = max(iou(b.as_tuple(), gold.as_tuple()) for b in found)
        ok = best >= box_iou
        return Verdict(ok, best, "ok" if ok else f"IoU {best:.2f} < {box_iou:.2f}")
    if record.kind == "closed":
        s = score_closed(record.answer, answer)
        if not s.parsed:
            return Verdict(False, 0.0, "unparseable")
        return Verdict(s.correct, float(s.correct), "ok" if s.correct else "wrong answer")
    s = score_open(record.answer, answer)
    if not s.parsed:
        return Verdict(False, 0.0, "unparseable")
    f1 = s.token_f1 or 0.0
    if s.exact_match or same_concept(locate_answer(answer), record.answer):
        return Verdict(True, 1.0, "ok")
    ok = f1 >= open_f1
    return Verdict(ok, f1, "ok" if ok else f"token F1 {f1:.2f} < {open_f1:.2f}")


@dataclass
class Verify:
    """The verification step: keep an item only when a second teacher pass finds its answer."""

    open_f1: float = DEFAULT_OPEN_F1
    box_iou: float = DEFAULT_BOX_IOU
    name: str = "verify"
    prompt_hash: str = field(init=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.open_f1 <= 1.0:
            raise ValueError(f"open_f1 must be in (0, 1], got {self.open_f1}")
        if not 0.0 < self.box_iou <= 1.0:
            raise ValueError(f"box_iou must be in (0, 1], got {self.box_iou}")
        self.prompt_hash = prompt_hash(
            "verify/1", VERIFY_SYSTEM, ANSWER_FORMS, REGION, self.open_f1, self.box_iou, SAMPLING
        )

    @with_record
    def __call__(self, item: Item, record: SynthRecord, images: list[Image.Image], ask: Ask) -> list[Item]:
        sample = item.sample
        sizes = [(im.width, im.height) for im in images]
        family = ask.family
        text = verify_prompt(record, sizes, family)
        parts: list[TextPart | ImagePart] = [ImagePart(im) for im in images]
        parts.append(TextPart(text))
        messages = [Message.text("system", VERIFY_SYSTEM), Message(role="user", content=parts)]
        answer = ask(messages, call="verify", sampling=SAMPLING)
        verdict = judge(record, answer, sizes, family, open_f1=self.open_f1, box_iou=self.box_iou)
        if not verdict.ok:
            log.info("verify %s: unverified (%s)", sample.id, verdict.status)
            return [reject(item, "unverified", verdict.status)]
        extra = dict(sample.meta.extra)
        extra["verify"] = {"score": round(verdict.score, 4), "status": verdict.status}
        checked = sample.model_copy(update={"meta": sample.meta.model_copy(update={"extra": extra})})
        entry = provenance(self.name, self.prompt_hash, ask, confidence=verdict.score)
        return [Item(sample=record_provenance(checked, self.name, entry), images=item.images)]
