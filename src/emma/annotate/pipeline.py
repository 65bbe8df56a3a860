"""The annotation stages: coarse caption → ROI localisation → fine caption (``emma annotate``).

Each stage is a :class:`~emma.annotate.steps.Step`: a pure function of the sample, its decoded images
and the teacher's answers (asked through the runner's ``ask``, which stores every answer durably and
replays it on resume). A stage gets an accepted item and returns it annotated, or rejected with a
reason code and a one-line detail (no PHI: finding names from the labeler's vocabulary, counts, ids).

**Text a sample carries** (:func:`sample_text`). Reports (``report`` task: the findings in
``gold.answer`` / the assistant turn, plus ``meta.extra["impression"]``), captions, question + answer
of VQA and multiple-choice samples, and clinical notes in ``meta.extra`` (``chief_complaint``,
``triage_note``, ``history``, ``indication``, ``clinical_context``) condition the teacher, bounded to
:data:`~emma.annotate.prompts.MAX_SAMPLE_TEXT_CHARS`. Report and caption text is also the *reference*
the labeler (:mod:`emma.text.labeler`) reads for the agreement gate and the fine-caption merge.

**Stage 1, coarse caption** (:class:`CoarseCaption`, step ``coarse``). The teacher answers one JSON
object: modality, body part, view, a short description, the abnormal findings it sees and a confidence.
The JSON is found in a code fence or in prose and repaired (:func:`emma.text.model_json.find_json_object`);
no object → ``invalid_json``; a modality or body part outside the vocabularies of
:mod:`emma.annotate.prompts` (synonyms such as "radiograph", "CT scan", "lung" are mapped) →
``invalid_value``. The findings and description, read by the labeler, must agree with the report
(:func:`emma.annotate.quality.agreement`, Dice of positive findings >= ``agreement_threshold``) or the
item is rejected ``disagreement``. Modality and body part that the dataset already records are kept
(the dataset is the better source); a teacher that disagrees with them halves the confidence and the
conflict is recorded.

**Stage 2, ROI** (:class:`RoiLocalisation`, step ``roi``). Dataset boxes (``gold.boxes``) are used
when present (the teacher is not asked). Otherwise the teacher localises the findings of stage 1
(``meta.findings``) in its own family's box syntax and convention; :func:`emma.infer.grounding.
parse_model_boxes` converts them to canonical pixels with :mod:`emma.model.families`. Every box then
passes :func:`emma.annotate.quality.sanitize_box` (clip a small overshoot; reject out of range,
degenerate, too small, whole image). Bad boxes are dropped and counted; when none is left the item is
rejected with the most frequent reason; an answer with no box syntax at all (and not ``NONE``) is
``invalid_boxes``. No findings → no call and no boxes.

**Stage 3, fine caption** (:class:`FineCaption`, step ``fine``). The teacher writes a detailed
description given the study, the regions (tagged ``[R1]``, ``[R2]``... with their coordinates in its
convention) and the findings the labeler reads in the report. Each ``[Rn]`` citation is replaced by the
canonical box text ``<box>[[x1,y1,x2,y2]]</box>`` (``<box image=N>`` for another image; integer
pixels of the original image, :func:`emma.data.formats.format_boxes`); a tag naming no region →
``invalid_region``. The caption is read back with the labeler: stating a finding the report negates, or
negating one it states → ``disagreement``; report findings the caption leaves out are appended
("Also stated in the report: ...") — that is the merge with the report-derived findings.

**Output sample** after the fine stage (the shape ``emma annotate`` writes):

- ``id``, ``images``: unchanged; ``task``: ``caption``;
- ``turns``: user "Describe the image in detail, localising each finding with a box." (all images),
  assistant: the fine caption;
- ``gold.answer``: the fine caption; ``gold.boxes``: the ROI boxes (canonical pixels, labelled);
  ``gold.labels``: the dataset's labels when it had some, else the labeler's reading of the report,
  else of the caption;
- ``meta.modality``, ``meta.body_part``: from stage 1 (or the dataset); ``meta.findings``: dataset and
  teacher findings plus the report's positive findings (labeler names); ``meta.extra["view"]``,
  ``meta.extra["description"]``: stage 1; ``meta.extra["source_sample"]``: the input's task, turns and
  gold answer/options (the report text stays with the sample it came from);
- ``meta.extra["annotation"][stage]``: provenance of each stage (teacher, prompt hash, stage, time of
  the teacher's answer, confidence, the fields it wrote, and the stage's evidence: agreement, box counts,
  regions cited).

With fewer stages the sample keeps its task and turns and only gets the fields of the stages run.
Confidences are in [0, 1] and say how much evidence backs the stage's output: coarse — the mean of the
teacher's self-reported confidence and the agreement score (whichever exist; 0.5 with neither), halved
per conflict with dataset metadata; roi — 1.0 for dataset boxes (times the fraction kept), else the
fraction of the named findings that got a valid box (1.0 when there was nothing to localise); fine — the
mean of the fraction of regions cited and the caption/report agreement (whichever apply; else 0.5).

Why one file (~910 lines): the three stages hand each other one record (caption → boxes → fine
caption) whose fields and checks must stay in step; prompts are in prompts.py.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from emma.annotate import prompts as P
from emma.annotate.quality import (
    DEFAULT_AGREEMENT_THRESHOLD,
    DEFAULT_BOX_LIMITS,
    DEFAULT_PHASH_THRESHOLD,
    DISAGREEMENT,
    BoxLimits,
    DuplicateGate,
    DuplicateScan,
    agreement,
    find_duplicates,
    findings_labels,
    grounding_reason,
    sanitize_box,
    with_hierarchy,
)
from emma.annotate.runner import RunStats, TeacherConfig, check_out_folder, iter_inputs, run_pipeline
from emma.annotate.steps import Ask, Item, Step, prompt_hash, provenance, record_provenance, reject
from emma.annotate.teacher import Teacher
from emma.data.formats import format_boxes
from emma.data.schema import Box, CoordSpace, Sample, TaskType, Turn
from emma.data.sources._common import normalize_modality
from emma.data.store import Dataset, open_dataset
from emma.errors import InputError
from emma.infer.grounding import parse_model_boxes
from emma.infer.types import ImagePart, Message, SamplingParams, TextPart
from emma.model.families import BoxConvention, FamilySpec, from_canonical, model_image_size, resolve_family
from emma.text.labeler import NEGATIVE, NO_FINDING, POSITIVE, SUPPORT_DEVICES, UNCERTAIN, label_report
from emma.text.model_json import find_json_object

STAGES: tuple[str, ...] = ("coarse", "roi", "fine")

# Reason codes produced by the stages (quality.py has the box, agreement and duplicate ones).
INVALID_JSON = "invalid_json"
INVALID_VALUE = "invalid_value"
INVALID_BOXES = "invalid_boxes"
INVALID_REGION = "invalid_region"

MAX_ANSWER_CHARS = 100_000  # teacher answers are read up to here
MAX_FINDINGS = 16
MAX_FINDING_CHARS = 120
MAX_DESCRIPTION_CHARS = 1000
MAX_ROI_BOXES = 32
MIN_CAPTION_CHARS = 20
MAX_CAPTION_CHARS = 4000
MAX_IMAGES = 8  # images shown to the teacher per sample (the first ones)
FINE_MAX_SENTENCES = 8

_NOTE_KEYS = ("chief_complaint", "triage_note", "history", "indication", "clinical_context")

# ------------------------------------------------------------------------------------- sample text


@dataclass(frozen=True)
class SampleText:
    """What a sample says in words: ``text`` for the prompt, ``reference`` for the labeler."""

    text: str
    reference: str | None  # report or caption text (None: nothing to compare the teacher with)
    kind: str  # "report", "caption", "qa", "note" or "none"


def _answer_text(sample: Sample) -> str:
    if sample.gold.answer:
        return sample.gold.answer
    return next((t.content for t in sample.turns if t.role == "assistant" and t.content.strip()), "")


def _extra_text(sample: Sample, key: str) -> str:
    value = sample.meta.extra.get(key)
    return value.strip() if isinstance(value, str) else ""


def sample_text(sample: Sample) -> SampleText:
    """The text a sample carries (see the module docstring), bounded."""
    notes = [
        f"{key.replace('_', ' ').capitalize()}: {text}"
        for key in _NOTE_KEYS
        if (text := _extra_text(sample, key))
    ]
    answer = _answer_text(sample).strip()
    reference: str | None = None
    kind = "note" if notes else "none"
    parts: list[str] = []
    if sample.task is TaskType.REPORT and answer:
        impression = _extra_text(sample, "impression")
        reference = f"FINDINGS: {answer}" + (f"\nIMPRESSION: {impression}" if impression else "")
        parts.append(f"Report:\n{reference}")
        kind = "report"
    elif sample.task is TaskType.CAPTION and answer:
        reference = answer
        parts.append(f"Caption: {answer}")
        kind = "caption"
    elif sample.question:
        options = sample.gold.options or []
        question = sample.question
        parts.append(f"Question: {question}")
        if options and not any(o in question for o in options):
            parts.append("Options: " + "; ".join(options))
        if answer:
            parts.append(f"Answer: {answer}")
        kind = "qa"
    parts.extend(notes)
    text = P.clean_text("\n".join(parts))
    if reference is not None:
        reference = P.clean_text(reference)
    return SampleText(text=text, reference=reference, kind=kind)


def report_labels(text: SampleText) -> dict[str, int] | None:
    """The labeler's reading of the reference text, or None without one."""
    if text.reference is None:
        return None
    return label_report(text.reference) or None


_BODY_PART_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\bwhole[\s_-]?body\b|\bfull[\s_-]?body\b", "whole_body"),
    (r"spine|spinal|vertebra|lumbar|sacr|\bc[\s-]?spine|\bl[\s-]?spine", "spine"),
    (r"breast|mammar", "breast"),
    (r"\beyes?\b|retina|fundus|ocular|ophthalm|orbit", "eye"),
    (r"\bskin\b|derm|cutaneous", "skin"),
    (r"head|brain|skull|cran|cerebr|face|facial|sinus|mandib|maxill|dental|teeth", "head"),
    (r"neck|thyroid|laryn|pharyn|cervical", "neck"),
    (r"chest|thora|lung|pulmon|heart|cardi|mediastin|\bribs?\b|pleura", "chest"),
    (
        r"abdom|liver|hepat|kidney|renal|bowel|colon|stomach|gastr|pancrea|spleen|gallbladder|biliar",
        "abdomen",
    ),
    (r"pelvi|bladder|prostat|uter|ovar|\bhips?\b", "pelvis"),
    (
        r"\barms?\b|hand|wrist|elbow|shoulder|finger|forearm|humer|radius|ulna|clavic|upper[\s_-]?(?:limb|extrem)",
        "upper_limb",
    ),
    (
        r"\blegs?\b|knee|ankle|\bfoot\b|\bfeet\b|femur|femor|tibia|fibula|\btoes?\b|thigh|lower[\s_-]?(?:limb|extrem)",
        "lower_limb",
    ),
    (r"^other$", "other"),
)
_VIEW_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\bpa\b|postero-?\s?anterior", "pa"),
    (r"\bap\b|antero-?\s?posterior", "ap"),
    (r"lateral|\blat\b", "lateral"),
    (r"oblique", "oblique"),
    (r"axial|transverse|transaxial", "axial"),
    (r"coronal", "coronal"),
    (r"sagittal", "sagittal"),
)
_NULL_WORDS = frozenset({"", "null", "none", "n/a", "na", "unknown", "not applicable", "unspecified"})


def _normalize(value: Any, patterns: Sequence[tuple[str, str]]) -> tuple[str | None, bool]:
    """``(canonical value or None, valid)`` for a vocabulary field; null words give ``(None, True)``."""
    if value is None:
        return None, True
    if not isinstance(value, str):
        return None, False
    text = " ".join(value.lower().split())
    if text in _NULL_WORDS:
        return None, True
    for pattern, name in patterns:
        if re.search(pattern, text):
            return name, True
    return None, False


def normalize_body_part(value: Any) -> tuple[str | None, bool]:
    return _normalize(value, _BODY_PART_PATTERNS)


def normalize_view(value: Any) -> str | None:
    name, valid = _normalize(value, _VIEW_PATTERNS)
    return name if valid else "other"


def normalize_modality_value(value: Any) -> tuple[str | None, bool]:
    """EMMA's modality name (``xray``, ``ct``, ...) or ``(None, False)`` outside the vocabulary."""
    if not isinstance(value, str) or value.strip().lower() in _NULL_WORDS:
        return None, False
    if value.strip().lower() == "other":
        return "other", True
    name = normalize_modality(value)
    return (name, True) if name in P.MODALITY_CHOICES else (None, False)


def _confidence(value: Any) -> float | None:
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            value = float(value.strip()[:-1]) / 100
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    v = float(value)
    return v if 0.0 <= v <= 1.0 else None


def _clean_phrase(text: str, limit: int) -> str:
    return " ".join(text.split())[:limit].strip(" .;,")


@dataclass(frozen=True)
class CoarseCaptionAnswer:
    modality: str
    body_part: str | None
    view: str | None
    description: str
    findings: tuple[str, ...]
    confidence: float | None
    repaired: bool


def parse_coarse(text: str) -> CoarseCaptionAnswer | tuple[str, str]:
    """The stage-1 answer, or ``(reason, detail)`` when it is unusable."""
    found = find_json_object(text, max_chars=MAX_ANSWER_CHARS)
    value, repaired = found.value, found.repaired
    if value is None:
        return INVALID_JSON, "no JSON object in the answer"
    findings_raw = value.get("findings", [])
    if findings_raw is None:
        findings_raw = []
    if not isinstance(findings_raw, list) or not all(isinstance(f, str) for f in findings_raw):
        return INVALID_JSON, "findings is not a list of strings"
    description = value.get("description")
    if not isinstance(description, str) or not description.strip():
        return INVALID_JSON, "description missing or not text"
    description = " ".join(description.split())
    if len(description) > MAX_DESCRIPTION_CHARS:
        return INVALID_VALUE, f"description over {MAX_DESCRIPTION_CHARS} characters"
    modality, ok = normalize_modality_value(value.get("modality"))
    if not ok or modality is None:
        return INVALID_VALUE, "modality missing or outside the vocabulary"
    body_part, ok = normalize_body_part(value.get("body_part"))
    if not ok:
        return INVALID_VALUE, "body_part outside the vocabulary"
    findings: list[str] = []
    seen: set[str] = set()
    for raw in findings_raw:
        phrase = _clean_phrase(raw, MAX_FINDING_CHARS)
        if phrase and phrase.lower() not in seen:
            seen.add(phrase.lower())
            findings.append(phrase)
    if len(findings) > MAX_FINDINGS:
        return INVALID_VALUE, f"more than {MAX_FINDINGS} findings"
    return CoarseCaptionAnswer(
        modality=modality,
        body_part=body_part,
        view=normalize_view(value.get("view")),
        description=description,
        findings=tuple(findings),
        confidence=_confidence(value.get("confidence")),
        repaired=repaired,
    )


# ---------------------------------------------------------------------------------------- helpers


def _messages(images: Sequence[Image.Image], text: str) -> list[Message]:
    parts: list[TextPart | ImagePart] = [
        ImagePart(im if im.mode == "RGB" else im.convert("RGB")) for im in images[:MAX_IMAGES]
    ]
    parts.append(TextPart(text))
    return [Message.text("system", P.SYSTEM), Message(role="user", content=parts)]


def _sizes(images: Sequence[Image.Image]) -> list[tuple[int, int]]:
    return [(im.width, im.height) for im in images]


def _accept(item: Item, sample: Sample) -> list[Item]:
    return [Item(sample, images=item.images)]


def _annotate(
    item: Item,
    sample: Sample,
    stage: str,
    prompt: str,
    ask: Ask,
    confidence: float,
    source: str,
    **evidence: Any,
) -> list[Item]:
    """``item`` accepted with ``sample`` and the stage's provenance record (runner's + evidence)."""
    record = provenance(
        stage, prompt, ask, confidence=round(max(0.0, min(1.0, confidence)), 4), source=source
    )
    record.update(evidence)
    return _accept(item, record_provenance(sample, stage, record))


def _family(configured: FamilySpec | None, ask: Ask) -> FamilySpec:
    """The configured family, else the teacher's (``ask.family``), else EMMA's generic convention."""
    if configured is not None:
        return configured
    try:
        return resolve_family(ask.family)
    except ValueError:
        return resolve_family(None)


def _mean(values: Iterable[float | None], default: float) -> float:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else default


# ------------------------------------------------------------------------------------ stage 1: coarse


class CoarseCaption:
    """Stage 1: modality, body part, view, short description and findings from the teacher (JSON)."""

    name = "coarse"

    def __init__(
        self,
        *,
        agreement_threshold: float = DEFAULT_AGREEMENT_THRESHOLD,
        max_new_tokens: int = 512,
    ) -> None:
        if not 0.0 <= agreement_threshold <= 1.0:
            raise ValueError("agreement_threshold must be within [0, 1]")
        self.agreement_threshold = agreement_threshold
        self.sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        self.prompt_hash = prompt_hash(
            self.name, P.SYSTEM, P.COARSE, P.CONTEXT, P.MODALITY_CHOICES, P.BODY_PART_CHOICES,
            P.VIEW_CHOICES, P.MAX_SAMPLE_TEXT_CHARS, MAX_IMAGES, max_new_tokens,
        )  # fmt: skip

    def __call__(self, item: Item, images: list[Image.Image], ask: Ask) -> list[Item]:
        sample = item.sample
        text = sample_text(sample)
        prompt = P.coarse_prompt(min(len(images), MAX_IMAGES), text.text)
        parsed = parse_coarse(ask(_messages(images, prompt), sampling=self.sampling))
        if isinstance(parsed, tuple):
            return [reject(item, *parsed)]
        teacher = findings_labels(parsed.findings, parsed.description)
        score = agreement(teacher, report_labels(text))
        if score.score is not None and score.score < self.agreement_threshold:
            return [reject(item, DISAGREEMENT, score.detail(self.agreement_threshold))]
        conflicts: dict[str, str] = {}
        modality, body_part = parsed.modality, parsed.body_part
        if sample.meta.modality:
            dataset_modality, _ = normalize_modality_value(sample.meta.modality)
            if dataset_modality is not None and dataset_modality != parsed.modality:
                conflicts["modality"] = parsed.modality
            modality = sample.meta.modality
        if sample.meta.body_part:
            dataset_part, _ = normalize_body_part(sample.meta.body_part)
            if parsed.body_part is not None and dataset_part is not None and dataset_part != parsed.body_part:
                conflicts["body_part"] = parsed.body_part
            body_part = sample.meta.body_part
        confidence = _mean((parsed.confidence, score.score), 0.5) * 0.5 ** len(conflicts)
        findings = list(sample.meta.findings)
        known = {f.lower() for f in findings}
        findings += [f for f in parsed.findings if f.lower() not in known]
        extra = {**sample.meta.extra, "view": parsed.view, "description": parsed.description}
        meta = sample.meta.model_copy(
            update={"modality": modality, "body_part": body_part, "findings": findings, "extra": extra}
        )
        return _annotate(
            item,
            sample.model_copy(update={"meta": meta}),
            self.name,
            self.prompt_hash,
            ask,
            confidence,
            "teacher",
            fields=[
                "meta.modality",
                "meta.body_part",
                "meta.findings",
                "meta.extra.view",
                "meta.extra.description",
            ],
            agreement=score.as_dict(),
            teacher_findings=list(parsed.findings),
            teacher_confidence=parsed.confidence,
            conflicts=conflicts,
            repaired_json=parsed.repaired,
        )


# --------------------------------------------------------------------------------------- stage 2: roi

_NONE_RE = re.compile(r"^\W*none\W*$", re.IGNORECASE)


def _most_common(reasons: Counter[str]) -> str:
    best = max(reasons.values())
    return next(r for r in reasons if reasons[r] == best)  # the first seen among the most frequent


def _counts(reasons: Counter[str]) -> str:
    return ", ".join(f"{r}={n}" for r, n in sorted(reasons.items()))


class RoiLocalisation:
    """Stage 2: boxes for the findings of stage 1, from the dataset or the teacher, sanity-checked.

    ``family``: the teacher's model family (box syntax and convention); None → the teacher's own
    (``ask.family``), else EMMA's generic 0-1000 ``<box>`` form.
    """

    name = "roi"

    def __init__(
        self,
        *,
        family: FamilySpec | str | None = None,
        box_limits: BoxLimits = DEFAULT_BOX_LIMITS,
        max_new_tokens: int = 512,
    ) -> None:
        self.family = resolve_family(family) if family is not None else None
        self.box_limits = box_limits
        self.sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        self.prompt_hash = prompt_hash(
            self.name, P.SYSTEM, P.ROI, self.family.name if self.family else "teacher-family",
            MAX_IMAGES, MAX_FINDINGS, MAX_ROI_BOXES, max_new_tokens, box_limits,
        )  # fmt: skip

    def __call__(self, item: Item, images: list[Image.Image], ask: Ask) -> list[Item]:
        sample = item.sample
        sizes = _sizes(images)
        if sample.gold.boxes:
            return self._dataset_boxes(item, sizes, ask)
        findings = list(sample.meta.findings)[:MAX_FINDINGS]
        if not findings:
            return _annotate(item, sample, self.name, self.prompt_hash, ask, 1.0, "none", boxes=0, fields=[])
        family = _family(self.family, ask)
        shown = min(len(images), MAX_IMAGES)
        answer = ask(_messages(images, P.roi_prompt(shown, findings, family)), sampling=self.sampling)
        if _NONE_RE.match(answer.strip()):
            return _annotate(
                item, sample, self.name, self.prompt_hash, ask, 0.0, "teacher", boxes=0, fields=["gold.boxes"]
            )
        result = parse_model_boxes(answer, family, sizes[:shown])
        dropped: Counter[str] = Counter()
        for message in result.errors:
            if "clipped" in message or "unknown model family" in message:
                continue
            dropped[grounding_reason(message)] += 1
        kept: list[Box] = []
        for box in result.boxes:
            check = sanitize_box(box, sizes, self.box_limits)
            if check.box is None:
                dropped[check.reason or INVALID_BOXES] += 1
                continue
            label = check.box.label or (findings[0] if len(findings) == 1 else None)
            kept.append(check.box.model_copy(update={"label": label}))
        if len(kept) > MAX_ROI_BOXES:
            dropped["too_many_boxes"] += len(kept) - MAX_ROI_BOXES
            kept = kept[:MAX_ROI_BOXES]
        if not kept:
            if not dropped:
                return [reject(item, INVALID_BOXES, "no boxes in the answer")]
            return [reject(item, _most_common(dropped), f"no valid box ({_counts(dropped)})")]
        return self._with_boxes(
            item,
            ask,
            kept,
            min(1.0, len(kept) / len(findings)),
            "teacher",
            dropped,
            len(result.clipped),
            family=family.name,
        )

    def _dataset_boxes(self, item: Item, sizes: list[tuple[int, int]], ask: Ask) -> list[Item]:
        sample = item.sample
        kept: list[Box] = []
        dropped: Counter[str] = Counter()
        clipped = 0
        for box in sample.gold.boxes:
            check = sanitize_box(box, sizes, self.box_limits)
            if check.box is None:
                dropped[check.reason or INVALID_BOXES] += 1
            else:
                kept.append(check.box)
                clipped += check.clipped
        if not kept:
            return [reject(item, _most_common(dropped), f"no valid dataset box ({_counts(dropped)})")]
        return self._with_boxes(
            item, ask, kept, len(kept) / len(sample.gold.boxes), "dataset", dropped, clipped
        )

    def _with_boxes(
        self,
        item: Item,
        ask: Ask,
        kept: list[Box],
        confidence: float,
        source: str,
        dropped: Counter[str],
        clipped: int,
        **evidence: Any,
    ) -> list[Item]:
        """``item`` accepted with ``kept`` as its gold boxes, and what was dropped and clipped on the way."""
        gold = item.sample.gold.model_copy(update={"boxes": kept})
        return _annotate(
            item,
            item.sample.model_copy(update={"gold": gold}),
            self.name,
            self.prompt_hash,
            ask,
            confidence,
            source,
            **evidence,
            boxes=len(kept),
            dropped=dict(sorted(dropped.items())),
            clipped=clipped,
            fields=["gold.boxes"],
        )


# -------------------------------------------------------------------------------------- stage 3: fine

_REGION_RE = re.compile(r"\[\s*R\s*(\d{1,3})\s*\]", re.IGNORECASE)
_TEACHER_BOX_RE = re.compile(r"<box|</box>|bbox_2d|<\|box_start\|>", re.IGNORECASE)
_CODE_FENCE_RE = re.compile(r"^```[A-Za-z]*\s*|\s*```$")


def _family_coords(box: Box, family: FamilySpec, size: tuple[int, int]) -> str:
    """A canonical box in the family's convention, as ``[x1, y1, x2, y2]`` text for a prompt."""
    width, height = size
    resized = family.box_convention is BoxConvention.RESIZED_PIXELS
    model_size = model_image_size(family, width, height) if resized else None
    values = from_canonical(box.as_tuple(), family, width, height, model_size)
    if family.box_convention is BoxConvention.NORM1:
        return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"
    return "[" + ", ".join(str(round(v)) for v in values) + "]"


def _pixel_box(box: Box, sizes: Sequence[tuple[int, int]]) -> Box:
    if box.space is CoordSpace.PIXEL:
        return box
    width, height = sizes[box.image_index]
    return box.to_space(CoordSpace.PIXEL, width, height)


def box_text(box: Box) -> str:
    """The canonical text form of one box: ``<box>[[x1,y1,x2,y2]]</box>`` in integer pixels of the
    original image, ``<box image=N>`` for an image other than the first."""
    text = format_boxes([box], ndigits=0)
    return text.replace("<box>", f"<box image={box.image_index}>", 1) if box.image_index else text


def _finding_name(finding: str) -> str:
    return finding.lower()


def report_summary(labels: Mapping[str, int] | None) -> str:
    """``present: a, b; uncertain: c; absent: d`` (labeler names, lower case), ``""`` without labels."""
    if not labels:
        return ""
    groups: dict[int, list[str]] = {POSITIVE: [], UNCERTAIN: [], NEGATIVE: []}
    for finding, value in labels.items():
        if finding not in (NO_FINDING, SUPPORT_DEVICES) and value in groups:
            groups[value].append(_finding_name(finding))
    names = ((POSITIVE, "present"), (UNCERTAIN, "uncertain"), (NEGATIVE, "absent"))
    parts = [f"{name}: {', '.join(groups[v])}" for v, name in names if groups[v]]
    if not groups[POSITIVE] and not groups[UNCERTAIN] and labels.get(NO_FINDING) == POSITIVE:
        parts.insert(0, "no abnormal finding")
    return "; ".join(parts)


def _study_line(sample: Sample) -> str:
    view = sample.meta.extra.get("view")
    bits = [
        f"modality {sample.meta.modality}" if sample.meta.modality else "",
        f"body part {sample.meta.body_part}" if sample.meta.body_part else "",
        f"view {view}" if isinstance(view, str) and view else "",
    ]
    return ", ".join(b for b in bits if b) or "unknown"


def _contradictions(caption: Mapping[str, int], report: Mapping[str, int] | None) -> list[str]:
    if not report:
        return []
    out = []
    for finding, value in report.items():
        if finding in (NO_FINDING, SUPPORT_DEVICES):
            continue
        said = caption.get(finding)
        if value == POSITIVE and said == NEGATIVE:
            out.append(f"negates {_finding_name(finding)}")
        elif value == NEGATIVE and said == POSITIVE:
            out.append(f"asserts {_finding_name(finding)}")
    return out


def _missing_report_findings(caption: Mapping[str, int], report: Mapping[str, int] | None) -> list[str]:
    if not report:
        return []
    said = with_hierarchy(caption)
    out = []
    for finding, value in report.items():
        if finding in (NO_FINDING, SUPPORT_DEVICES) or said.get(finding) in (POSITIVE, UNCERTAIN):
            continue
        if value == POSITIVE:
            out.append(_finding_name(finding))
        elif value == UNCERTAIN:
            out.append(f"possible {_finding_name(finding)}")
    return out


class FineCaption:
    """Stage 3: a detailed region-aware caption citing the boxes, merged with the report's findings.

    ``family`` as for :class:`RoiLocalisation` (the region coordinates in the prompt are in it).
    """

    name = "fine"

    def __init__(self, *, family: FamilySpec | str | None = None, max_new_tokens: int = 768) -> None:
        self.family = resolve_family(family) if family is not None else None
        self.sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        self.prompt_hash = prompt_hash(
            self.name, P.SYSTEM, P.FINE, P.FINE_REGIONS, P.FINE_CITE, P.FINE_NO_REGIONS, P.FINE_REPORT,
            P.CONTEXT, P.CAPTION_INSTRUCTION, P.CAPTION_INSTRUCTION_MULTI,
            self.family.name if self.family else "teacher-family", P.MAX_SAMPLE_TEXT_CHARS, MAX_IMAGES,
            FINE_MAX_SENTENCES, MIN_CAPTION_CHARS, MAX_CAPTION_CHARS, max_new_tokens,
        )  # fmt: skip

    def __call__(self, item: Item, images: list[Image.Image], ask: Ask) -> list[Item]:
        sample = item.sample
        sizes = _sizes(images)
        family = _family(self.family, ask)
        text = sample_text(sample)
        labels = report_labels(text)
        boxes = [_pixel_box(box, sizes) for box in sample.gold.boxes]  # dataset boxes when roi did not run
        regions = [
            f"[R{i}] {box.label or 'region'}"
            + (f" (image {box.image_index})" if len(images) > 1 else "")
            + f": {_family_coords(box, family, sizes[box.image_index])}"
            for i, box in enumerate(boxes, 1)
        ]
        prompt = P.fine_prompt(
            min(len(images), MAX_IMAGES),
            text.text,
            _study_line(sample),
            regions,
            report_summary(labels),
            family,
            FINE_MAX_SENTENCES,
        )
        answer = ask(_messages(images, prompt), sampling=self.sampling)
        caption = " ".join(_CODE_FENCE_RE.sub("", answer[:MAX_ANSWER_CHARS].strip()).split())
        if len(caption) < MIN_CAPTION_CHARS:
            return [reject(item, INVALID_VALUE, f"caption shorter than {MIN_CAPTION_CHARS} characters")]
        if len(caption) > MAX_CAPTION_CHARS:
            return [reject(item, INVALID_VALUE, f"caption over {MAX_CAPTION_CHARS} characters")]
        if _TEACHER_BOX_RE.search(caption):
            return [reject(item, INVALID_VALUE, "caption writes its own boxes instead of citing regions")]
        cited = [int(m.group(1)) for m in _REGION_RE.finditer(caption)]
        unknown = sorted({n for n in cited if not 1 <= n <= len(boxes)})
        if unknown:
            named = ", ".join(f"R{n}" for n in unknown)
            return [reject(item, INVALID_REGION, f"cites {named} but there are {len(boxes)} regions")]
        caption_labels = label_report(_REGION_RE.sub("", caption))
        contradicted = _contradictions(caption_labels, labels)
        if contradicted:
            return [reject(item, DISAGREEMENT, "caption contradicts the report: " + "; ".join(contradicted))]
        appended = _missing_report_findings(caption_labels, labels)
        final = _REGION_RE.sub(lambda m: box_text(boxes[int(m.group(1)) - 1]), caption)
        if appended:
            final = f"{final} Also stated in the report: {'; '.join(appended)}."
        score = agreement(caption_labels, labels).score
        cited_fraction = len(set(cited)) / len(boxes) if boxes else None
        confidence = _mean((cited_fraction, score), 0.5)
        gold_labels = dict(sample.gold.labels) or dict(labels or caption_labels)
        labels_source = "dataset" if sample.gold.labels else "report" if labels else "caption"
        findings = list(sample.meta.findings)
        covered = {f for f, v in findings_labels(findings).items() if v in (POSITIVE, UNCERTAIN)}
        findings += [
            _finding_name(f)
            for f, v in (labels or {}).items()
            if v == POSITIVE and f not in covered and f not in (NO_FINDING, SUPPORT_DEVICES)
        ]
        source = {
            "task": sample.task.value,
            "turns": [t.model_dump(mode="json") for t in sample.turns],
            "answer": sample.gold.answer,
            "options": sample.gold.options,
            "answer_index": sample.gold.answer_index,
        }
        shown = list(range(len(sample.images)))
        instruction = P.CAPTION_INSTRUCTION_MULTI if len(sample.images) > 1 else P.CAPTION_INSTRUCTION
        gold = sample.gold.model_copy(
            update={
                "answer": final,
                "options": None,
                "answer_index": None,
                "labels": gold_labels,
                "boxes": boxes,
            }
        )
        meta = sample.meta.model_copy(
            update={"findings": findings, "extra": {**sample.meta.extra, "source_sample": source}}
        )
        converted = sample.model_copy(
            update={
                "task": TaskType.CAPTION,
                "turns": [
                    Turn(role="user", content=instruction, images=shown),
                    Turn(role="assistant", content=final),
                ],
                "gold": gold,
                "meta": meta,
            }
        )
        return _annotate(
            item,
            converted,
            self.name,
            self.prompt_hash,
            ask,
            confidence,
            "teacher",
            fields=["task", "turns", "gold.answer", "gold.labels", "meta.findings"],
            family=family.name,
            regions=len(boxes),
            regions_cited=len(set(cited)),
            agreement=None if score is None else round(score, 4),
            appended_findings=appended,
            labels_source=labels_source,
        )


# ------------------------------------------------------------------------------------------- building


def build_steps(
    stages: Sequence[str] = STAGES,
    *,
    family: FamilySpec | str | None = None,
    duplicates: DuplicateScan | None = None,
    phash_threshold: int = DEFAULT_PHASH_THRESHOLD,
    agreement_threshold: float = DEFAULT_AGREEMENT_THRESHOLD,
    box_limits: BoxLimits = DEFAULT_BOX_LIMITS,
) -> list[Step]:
    """The steps of an annotation run, in pipeline order (the duplicate gate first when given).

    ``stages``: any of ``coarse``, ``roi``, ``fine`` (run in that order whatever the order given).
    """
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise InputError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    if not stages:
        raise InputError(f"no stage given; choose from {', '.join(STAGES)}")
    steps: list[Step] = []
    if duplicates is not None:
        steps.append(DuplicateGate(duplicates.duplicates, threshold=phash_threshold))
    if "coarse" in stages:
        steps.append(CoarseCaption(agreement_threshold=agreement_threshold))
    if "roi" in stages:
        steps.append(RoiLocalisation(family=family, box_limits=box_limits))
    if "fine" in stages:
        steps.append(FineCaption(family=family))
    return steps


def scan_duplicates(
    source: Dataset,
    splits: Sequence[str] | None = None,
    *,
    limit: int | None = None,
    threshold: int = DEFAULT_PHASH_THRESHOLD,
) -> DuplicateScan:
    """:func:`~emma.annotate.quality.find_duplicates` over the inputs of a run, in the runner's order."""
    wanted = list(splits) if splits is not None else source.splits
    return find_duplicates(iter_inputs(source, wanted, limit), source.open_image, threshold=threshold)


def _check_out(out: Path) -> None:
    """The output folder is new, empty, or holds an annotation run (resumed if it is the same job)."""
    check_out_folder(out)


def annotate(
    source: Dataset | str | os.PathLike[str],
    out: str | os.PathLike[str],
    teacher: Teacher | TeacherConfig | str,
    *,
    stages: Sequence[str] = STAGES,
    splits: list[str] | None = None,
    limit: int | None = None,
    dedup: bool = True,
    phash_threshold: int = DEFAULT_PHASH_THRESHOLD,
    agreement_threshold: float = DEFAULT_AGREEMENT_THRESHOLD,
    family: str | None = None,
    box_limits: BoxLimits = DEFAULT_BOX_LIMITS,
    **run_options: Any,
) -> RunStats:
    """Weak-supervision annotation of ``source`` into ``out``: duplicate gate, then the chosen stages.

    ``teacher``: a :class:`~emma.annotate.teacher.Teacher`, a spec or a
    :class:`~emma.annotate.runner.TeacherConfig`. ``family``: the teacher's model family when it cannot
    be told from the teacher (a remote server); None → the teacher's own. ``run_options`` go to
    :func:`~emma.annotate.runner.run_pipeline` (``concurrency``, ``backend``, ``store``, ``progress``,
    ...). Resumes a previous run into ``out`` with the same settings.
    """
    src = source if isinstance(source, Dataset) else open_dataset(source)
    wanted = list(splits) if splits is not None else src.splits
    for split in wanted:
        src.count(split)  # DataFormatError for an unknown split
    _check_out(Path(out))  # before the duplicate scan, which reads every image
    scan: DuplicateScan | None = None
    if dedup:
        if run_options.get("progress", True):
            from rich.console import Console

            with Console(stderr=True).status("scanning the inputs for duplicate images"):
                scan = scan_duplicates(src, wanted, limit=limit, threshold=phash_threshold)
        else:
            scan = scan_duplicates(src, wanted, limit=limit, threshold=phash_threshold)
    steps = build_steps(
        stages,
        family=family,
        duplicates=scan,
        phash_threshold=phash_threshold,
        agreement_threshold=agreement_threshold,
        box_limits=box_limits,
    )
    return run_pipeline(steps, src, out, teacher, splits=wanted, limit=limit, **run_options)
