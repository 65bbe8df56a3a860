"""Structured diagnostic output: a pydantic schema, the prompt that asks for it, and a tolerant parser.

The model answers one JSON object (:class:`DiagnosticOutput`). :func:`parse_structured` finds it in
the answer and repairs common defects with the text floor's one extractor
(:func:`emma.text.model_json.find_json_object`: a ```json fence, or the first ``{`` with prose around
it; trailing commas, single quotes, Python ``True``/``False``/``None``, unquoted keys, comments, raw
newlines in strings, output cut off before its closing brackets). Then it validates; when validation
fails on a cut-off answer, it tries once more without the last, incomplete item. It never raises: it
returns the output or the reasons there is none.

Boxes inside findings are written by the model in its family's convention
(``emma.model.families``); :func:`canonicalize_boxes` converts them to canonical pixels of the
original images (call it once, on parsed output).

"cannot determine" is an explicit valid answer: ``{"abstain": true, "abstain_reason": "..."}`` with
empty findings and differential, or an answer that is exactly the phrase "cannot determine".
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from emma.data.schema import Box
from emma.infer.grounding import FamilyLike, Size, canonical_box, family_or_generic
from emma.infer.prompts import (
    CANNOT_DETERMINE,
    ContextLike,
    coordinate_phrase,
    format_context,
    join_blocks,
    question_text,
)
from emma.text.model_json import NO_JSON_OBJECT, decode_json, find_json_object, repair_json_dropping_last

MAX_STRUCTURED_CHARS = 100_000
MAX_FINDINGS = 32
MAX_DIFFERENTIAL = 16
MAX_STEPS = 16
MAX_ERRORS = 20

ShortText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=300)]
LongText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1000)]


class Severity(StrEnum):
    CRITICAL = "critical"  # threatens life or limb now
    SIGNIFICANT = "significant"  # needs action during this visit
    MINOR = "minor"  # of limited consequence
    NORMAL = "normal"  # a normal or reassuring observation


class TriageUrgency(StrEnum):
    """ESI-like urgency (Emergency Severity Index levels 1-5)."""

    IMMEDIATE = "immediate"  # ESI 1: needs a life-saving intervention now
    EMERGENT = "emergent"  # ESI 2: high risk, should not wait
    URGENT = "urgent"  # ESI 3: stable, needs prompt work-up
    LESS_URGENT = "less_urgent"  # ESI 4
    NON_URGENT = "non_urgent"  # ESI 5

    @property
    def esi_level(self) -> int:
        return list(TriageUrgency).index(self) + 1


_TRIAGE_ALIASES = {
    "resuscitation": TriageUrgency.IMMEDIATE,
    "emergency": TriageUrgency.EMERGENT,
    "semi_urgent": TriageUrgency.LESS_URGENT,
    "nonurgent": TriageUrgency.NON_URGENT,
    **{f"esi_{u.esi_level}": u for u in TriageUrgency},
    **{f"esi{u.esi_level}": u for u in TriageUrgency},
    **{str(u.esi_level): u for u in TriageUrgency},
}


def _probability(value: Any) -> Any:
    """``"70%"`` → 0.7; other values are left to the float validator (which rejects words)."""
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("%"):
            try:
                return float(text[:-1]) / 100.0
            except ValueError:
                return value
    return value


class Finding(BaseModel):
    model_config = ConfigDict(extra="ignore")

    description: LongText
    location: ShortText | None = None
    box: tuple[float, float, float, float] | None = None  # see canonicalize_boxes
    image_index: int = Field(default=0, ge=0, le=1000)
    severity: Severity | None = None

    @field_validator("severity", mode="before")
    @classmethod
    def _severity_case(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("box")
    @classmethod
    def _box_valid(cls, value: tuple[float, float, float, float] | None) -> Any:
        if value is None:
            return None
        if not all(math.isfinite(v) for v in value):
            raise ValueError("box coordinates must be finite numbers")
        if value[2] < value[0] or value[3] < value[1]:
            raise ValueError("box corners out of order (need x2 >= x1 and y2 >= y1)")
        return value


class DifferentialItem(BaseModel):
    model_config = ConfigDict(extra="ignore")

    diagnosis: ShortText
    likelihood: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)  # probability-like, 0 to 1

    @field_validator("likelihood", mode="before")
    @classmethod
    def _likelihood_pct(cls, value: Any) -> Any:
        return _probability(value)


class DiagnosticOutput(BaseModel):
    """One structured assessment of a study. With ``abstain`` the other fields may be empty."""

    model_config = ConfigDict(extra="ignore")

    findings: list[Finding] = Field(default_factory=list, max_length=MAX_FINDINGS)
    differential: list[DifferentialItem] = Field(default_factory=list, max_length=MAX_DIFFERENTIAL)
    triage_urgency: TriageUrgency | None = None
    recommended_next_steps: list[LongText] = Field(default_factory=list, max_length=MAX_STEPS)
    confidence: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    abstain: bool = False
    abstain_reason: LongText | None = None

    @field_validator("triage_urgency", mode="before")
    @classmethod
    def _triage_alias(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str):
            key = re.sub(r"[\s\-]+", "_", value.strip().lower())
            return _TRIAGE_ALIASES.get(key, key)
        return value

    @field_validator("confidence", mode="before")
    @classmethod
    def _confidence_pct(cls, value: Any) -> Any:
        return _probability(value)

    @model_validator(mode="after")
    def _complete(self) -> DiagnosticOutput:
        if self.abstain:
            if self.abstain_reason is None:
                self.abstain_reason = CANNOT_DETERMINE
            return self
        missing = [
            name
            for name, absent in (
                ("findings", not self.findings),
                ("triage_urgency", self.triage_urgency is None),
                ("confidence", self.confidence is None),
            )
            if absent
        ]
        if missing:
            raise ValueError(f"{', '.join(missing)} required unless abstain is true")
        return self

    def to_markdown(self) -> str:
        """A readable summary (for the CLI and exports)."""
        if self.abstain:
            return f"**Cannot determine.** {self.abstain_reason or ''}".strip()
        lines = ["**Findings**"]
        for f in self.findings:
            extra = ", ".join(x for x in (f.location, f.severity.value if f.severity else None) if x)
            lines.append(f"- {f.description}" + (f" ({extra})" if extra else ""))
        if self.differential:
            lines += ["", "**Differential**"]
            lines += [f"- {d.diagnosis}: {d.likelihood:.0%}" for d in self.differential]
        if self.triage_urgency is not None:
            u = self.triage_urgency
            lines += ["", f"**Triage urgency:** {u.value.replace('_', ' ')} (ESI-like level {u.esi_level})"]
        if self.recommended_next_steps:
            lines += ["", "**Next steps**"] + [f"- {s}" for s in self.recommended_next_steps]
        if self.confidence is not None:
            lines += ["", f"**Confidence:** {self.confidence:.0%}"]
        return "\n".join(lines)


def response_json_schema() -> dict[str, Any]:
    """The JSON schema of :class:`DiagnosticOutput` (e.g. for an OpenAI ``response_format``)."""
    return DiagnosticOutput.model_json_schema()


# ----------------------------------------------------------------------------------------- prompt

_EXAMPLE = (
    '{"findings": [{"description": "...", "location": "...", "box": [x1, y1, x2, y2], "image_index": 0, '
    '"severity": "significant"}],\n'
    ' "differential": [{"diagnosis": "...", "likelihood": 0.6}],\n'
    ' "triage_urgency": "urgent",\n'
    ' "recommended_next_steps": ["..."],\n'
    ' "confidence": 0.7,\n'
    ' "abstain": false, "abstain_reason": null}'
)


def structured_prompt(
    question: str | None = None, context: ContextLike = None, family: FamilyLike = None
) -> str:
    """The user text asking for one :class:`DiagnosticOutput` JSON object."""
    rules = (
        "Answer with one JSON object and nothing else, in this form:\n"
        f"{_EXAMPLE}\n"
        "Rules:\n"
        "- findings: what is visible; location, box, image_index and severity are optional. "
        f"box is [x1, y1, x2, y2] in {coordinate_phrase(family)}; image_index counts the images from 0. "
        "severity is one of critical, significant, minor, normal.\n"
        "- differential: possible diagnoses, most likely first; likelihood is a number from 0 to 1.\n"
        "- triage_urgency (ESI-like): immediate (ESI 1, life-saving intervention now), emergent (ESI 2), "
        "urgent (ESI 3), less_urgent (ESI 4) or non_urgent (ESI 5).\n"
        "- recommended_next_steps: short actions. confidence: a number from 0 to 1.\n"
        "- If the images and context do not allow an assessment, answer "
        f'{{"abstain": true, "abstain_reason": "..."}} ({CANNOT_DETERMINE}) instead of guessing.'
    )
    question_block = "Question: " + question_text(question, "Assess the images for acute findings.")
    return join_blocks(format_context(context), question_block, rules)


# ------------------------------------------------------------------------------------------ parse


@dataclass
class StructuredResult:
    output: DiagnosticOutput | None
    errors: list[str] = field(default_factory=list)
    repaired: bool = False  # the JSON needed repair, or parts (bad boxes) were dropped

    @property
    def ok(self) -> bool:
        return self.output is not None


_CANNOT_RE = re.compile(r"[\W_]+")


def _is_cannot_determine(text: str) -> bool:
    return _CANNOT_RE.sub(" ", text.lower()).strip() == CANNOT_DETERMINE


def _box_problem(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        return "not a [x1, y1, x2, y2] list"
    if len(value) != 4:
        return f"expected 4 numbers, got {len(value)}"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return "not a number"
    if not all(math.isfinite(v) for v in value):
        return "not a finite number"
    if value[2] < value[0] or value[3] < value[1]:
        return "corners out of order"
    return None


def _prepare(value: dict[str, Any], errors: list[str]) -> bool:
    """Light semantic repairs before validation; returns whether anything changed."""
    changed = False
    findings = value.get("findings")
    if isinstance(findings, list):
        for i, finding in enumerate(findings):
            if isinstance(finding, str):
                findings[i] = finding = {"description": finding}
                changed = True
            if not isinstance(finding, dict):
                continue
            if "box" not in finding and "bbox_2d" in finding:
                finding["box"] = finding.pop("bbox_2d")
            problem = _box_problem(finding.get("box"))
            if problem is not None:
                del finding["box"]
                errors.append(f"findings.{i}.box: {problem}; box dropped")
                changed = True
    steps = value.get("recommended_next_steps")
    if isinstance(steps, str):
        value["recommended_next_steps"] = [steps]
        changed = True
    return changed


def _validation_messages(exc: ValidationError) -> list[str]:
    messages = []
    for err in exc.errors(include_input=False, include_url=False)[:MAX_ERRORS]:
        loc = ".".join(str(part) for part in err.get("loc", ())) or "output"
        messages.append(f"{loc}: {err.get('msg', 'invalid')}")
    return messages


def parse_structured(text: str) -> StructuredResult:
    """The :class:`DiagnosticOutput` in a model's answer, or the errors that prevent one; never raises."""
    if not isinstance(text, str):
        return StructuredResult(None, [f"expected text, got {type(text).__name__}"])
    errors: list[str] = []
    if len(text) > MAX_STRUCTURED_CHARS:
        errors.append(f"answer longer than {MAX_STRUCTURED_CHARS} characters; only the start was read")
        text = text[:MAX_STRUCTURED_CHARS]
    if _is_cannot_determine(text):
        return StructuredResult(DiagnosticOutput(abstain=True, abstain_reason=CANNOT_DETERMINE), errors)
    found = find_json_object(text, max_chars=MAX_STRUCTURED_CHARS)
    if found.source is None:
        return StructuredResult(None, [*errors, NO_JSON_OBJECT])
    if found.value is not None:
        result = _validate(found.value, errors, repaired=found.repaired)
    else:
        result = StructuredResult(None, [*errors, found.error or NO_JSON_OBJECT], found.repaired)
    if result.ok or not found.repaired:
        return result
    dropped = repair_json_dropping_last(found.source)
    if dropped is not None:
        retry = _decode_and_validate(dropped, errors)
        if retry.ok:
            retry.errors.append("the answer was cut off; its last, incomplete item was dropped")
            return retry
    return result


def _decode_and_validate(text: str, errors: list[str]) -> StructuredResult:
    value, error = decode_json(text)
    if error is not None:
        return StructuredResult(None, [*errors, error], True)
    return _validate(value, errors, repaired=True)


def _validate(value: Any, errors: list[str], *, repaired: bool) -> StructuredResult:
    errors = list(errors)
    if not isinstance(value, dict):
        return StructuredResult(
            None, [*errors, f"expected a JSON object, got {type(value).__name__}"], repaired
        )
    repaired = _prepare(value, errors) or repaired
    try:
        output = DiagnosticOutput.model_validate(value)
    except ValidationError as exc:
        return StructuredResult(None, [*errors, *_validation_messages(exc)], repaired)
    return StructuredResult(output, errors, repaired)


# ------------------------------------------------------------------------------------------ boxes


def canonicalize_boxes(
    output: DiagnosticOutput,
    family: FamilyLike,
    image_sizes: Sequence[Size],
    model_sizes: Sequence[Size] | None = None,
) -> tuple[DiagnosticOutput, list[str]]:
    """A copy whose finding boxes are canonical pixels of the original images, and one message per box
    that was rejected (its finding keeps no box) or clipped. Input boxes are in the family's convention.
    """
    errors: list[str] = []
    spec = family_or_generic(family, errors)
    findings: list[Finding] = []
    for i, finding in enumerate(output.findings):
        if finding.box is None:
            findings.append(finding)
            continue
        box, message, _ = canonical_box(
            finding.box, spec, finding.image_index, image_sizes, model_sizes, where=f"findings.{i}.box"
        )
        if message is not None:
            errors.append(message)
        findings.append(finding.model_copy(update={"box": box.as_tuple() if box is not None else None}))
    return output.model_copy(update={"findings": findings}), errors


def finding_boxes(output: DiagnosticOutput, *, label_chars: int = 60) -> list[Box]:
    """The (canonical) boxes of the findings as :class:`Box` objects, labelled by location or description."""
    boxes = []
    for finding in output.findings:
        if finding.box is None:
            continue
        label = (finding.location or finding.description)[:label_chars]
        x1, y1, x2, y2 = finding.box
        boxes.append(Box(x1=x1, y1=y1, x2=x2, y2=y2, label=label, image_index=finding.image_index))
    return boxes
