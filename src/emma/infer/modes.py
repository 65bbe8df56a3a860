"""EMMA's answer modes in one place: the prompt of each mode and how an answer is read back.

Modes: ``"chat"`` (free text; boxes in the answer are parsed), ``"structured"`` (one
:class:`~emma.infer.structured.DiagnosticOutput` JSON object, validated, its boxes canonicalised) and
``"report"`` (a Findings / Impression :class:`~emma.infer.report.ReportDraft`, boxes parsed too).

Both front ends use these two functions: :class:`emma.infer.chat.ChatSession` (``emma chat``, the demo)
and the server (``emma serve``), so a mode means the same prompt and the same result everywhere. Boxes
come back in canonical pixels of the model-ready images (``sizes``); ``model_sizes`` are the sizes the
model saw after its processor's resize (:func:`model_sizes`), which some families' box conventions need.
A box needs an image to refer to: with no images, no boxes are parsed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from emma.data.schema import Box
from emma.errors import InputError
from emma.infer.grounding import parse_model_boxes
from emma.infer.prompts import ContextLike, chat_prompt, system_prompt
from emma.infer.report import ReportDraft, parse_report, report_prompt
from emma.infer.structured import (
    DiagnosticOutput,
    canonicalize_boxes,
    finding_boxes,
    parse_structured,
    structured_prompt,
)
from emma.model.families import model_image_size

__all__ = [
    "MODES",
    "ChatMode",
    "ModeAnswer",
    "check_mode",
    "interpret",
    "model_sizes",
    "system_prompt",
    "user_text",
]

ChatMode = Literal["chat", "structured", "report"]
MODES: tuple[str, ...] = get_args(ChatMode)


def check_mode(mode: str) -> ChatMode:
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}; expected chat, structured or report")
    return mode  # type: ignore[return-value]


def user_text(question: str, mode: ChatMode, context: ContextLike | None, family: str | None) -> str:
    """The user turn of ``mode`` for ``question`` (with the clinical ``context`` block when given)."""
    if mode == "structured":
        return structured_prompt(question, context, family)
    if mode == "report":
        return report_prompt(context, family, question=question)
    return chat_prompt(question, context, family)


def model_sizes(
    family: str | None, processor: Any, sizes: Sequence[tuple[int, int]]
) -> list[tuple[int, int]] | None:
    """(width, height) of each image as the model saw it after its processor's resize; None if unknown."""
    if family is None:
        return None
    try:
        return [model_image_size(family, width, height, processor) for width, height in sizes]
    except (ValueError, KeyError):
        return None


@dataclass
class ModeAnswer:
    """An answer read for its mode."""

    mode: ChatMode
    boxes: list[Box] = field(default_factory=list)  # canonical pixels of the model-ready images
    box_errors: list[str] = field(default_factory=list)
    structured: DiagnosticOutput | None = None
    structured_errors: list[str] = field(default_factory=list)
    structured_repaired: bool = False  # the JSON needed repair (fences, trailing commas, ...) to parse
    report: ReportDraft | None = None


def interpret(
    text: str,
    mode: ChatMode,
    family: str | None,
    sizes: Sequence[tuple[int, int]],
    processor: Any = None,
) -> ModeAnswer:
    """Read ``text`` (the model's answer) for ``mode``, about images of ``sizes`` (model-ready pixels)."""
    answer = ModeAnswer(mode=mode)
    seen = model_sizes(family, processor, sizes)
    if mode == "structured":
        parsed = parse_structured(text)
        answer.structured_errors = list(parsed.errors)
        answer.structured_repaired = bool(parsed.repaired)
        if parsed.output is not None:
            output, box_errors = canonicalize_boxes(parsed.output, family, list(sizes), seen)
            answer.structured = output
            answer.boxes = finding_boxes(output)
            answer.box_errors = list(box_errors)
        return answer
    if sizes:
        grounding = parse_model_boxes(text, family, list(sizes), seen)
        answer.boxes, answer.box_errors = list(grounding.boxes), list(grounding.errors)
    if mode == "report":
        answer.report = parse_report(text)
    return answer
