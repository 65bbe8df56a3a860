"""Multi-turn chat sessions over medical images, with grounding, structured and report modes.

A :class:`ChatSession` keeps the conversation (user and assistant turns) and the images shown so far.
Images come from files through emma.io's one preprocessing path (DICOM file or series folder, NIfTI,
PNG/JPEG; volumes become sampled slices) or as PIL images; several may be added before a turn, and
they are shown with the next question. Images are numbered in the order they were added, across the
whole conversation, which is the order the model sees them in.

Modes (per turn): ``"chat"`` (free text; boxes in the answer are parsed), ``"structured"`` (one
:class:`~emma.infer.structured.DiagnosticOutput` JSON object, validated, boxes canonicalised) and
``"report"`` (a Findings / Impression :class:`~emma.infer.report.ReportDraft`). Boxes are canonical
pixels of the model-ready images (``ChatImage.width`` x ``height``). Clinical context goes into the
first user turn. Every result carries the not-for-clinical-use notice; the model's history does not.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from emma.data.schema import Box
from emma.errors import EmmaError, ImageTooLargeError, InputError
from emma.infer.engine import Engine
from emma.infer.modes import ChatMode, check_mode, interpret, user_text
from emma.infer.prompts import NOTICE, ContextLike, system_prompt
from emma.infer.report import ReportDraft
from emma.infer.structured import DiagnosticOutput
from emma.infer.types import FinishReason, GenerationRequest, ImagePart, Message, SamplingParams, TextPart
from emma.io.image import ModelImage
from emma.io.limits import DEFAULT_LIMITS
from emma.io.load import VolumeSampling, load_images
from emma.io.windows import Window
from emma.model.families import resolve_family

ImageInput = str | os.PathLike[str] | Image.Image | ModelImage

DEFAULT_SAMPLING = SamplingParams(max_new_tokens=512, temperature=0.0)


class GenerationError(EmmaError):
    """The model could not answer (the engine reported an error); the conversation is unchanged."""


@dataclass
class ChatImage:
    """One model-ready image of the session; boxes refer to its pixels."""

    index: int
    image: Image.Image
    source_format: str  # "dicom", "dicom-series", "nifti", "png", "pil", ...
    slice_index: int | None = None
    frame: int | None = None

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index,
            "width": self.width,
            "height": self.height,
            "source_format": self.source_format,
        }
        if self.slice_index is not None:
            out["slice_index"] = self.slice_index
        if self.frame is not None:
            out["frame"] = self.frame
        return out


@dataclass
class ChatTurnResult:
    """The answer to one question, parsed for its mode, with the notice every answer carries."""

    text: str
    mode: ChatMode = "chat"
    boxes: list[Box] = field(default_factory=list)  # canonical pixels of the session's images
    box_errors: list[str] = field(default_factory=list)
    structured: DiagnosticOutput | None = None
    structured_errors: list[str] = field(default_factory=list)
    structured_repaired: bool = False  # the JSON answer needed repair to parse
    report: ReportDraft | None = None
    usage: dict[str, int] = field(default_factory=dict)  # prompt_tokens, completion_tokens
    finish_reason: FinishReason = "stop"
    images: list[ChatImage] = field(default_factory=list)  # every image of the session so far
    notice: str = NOTICE

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (``emma chat --json``)."""
        report = None
        if self.report is not None:
            report = {
                "findings": self.report.findings,
                "impression": self.report.impression,
                "other": self.report.other,
                "errors": self.report.errors,
            }
        return {
            "mode": self.mode,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "boxes": [b.model_dump(mode="json", exclude={"space"}) for b in self.boxes],
            "box_errors": list(self.box_errors),
            "structured": self.structured.model_dump(mode="json") if self.structured is not None else None,
            "structured_errors": list(self.structured_errors),
            "structured_repaired": self.structured_repaired,
            "report": report,
            "usage": dict(self.usage),
            "images": [im.to_json() for im in self.images],
            "notice": self.notice,
        }


class ChatSession:
    """A multi-turn conversation with one engine about a set of images.

    ``context``: clinical context (free text, or a mapping with ``chief_complaint``, ``vitals``,
    ``triage_note``, ...), added to the first user turn. ``window``: CT window preset or ``"C,W"`` for
    DICOM/NIfTI files. ``volume_sampling``: how volumes become images. ``max_images``: images in the
    whole conversation (default: the family's per-request cap, since every turn resends them).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        context: ContextLike = None,
        window: Window | str | None = None,
        sampling: SamplingParams = DEFAULT_SAMPLING,
        volume_sampling: VolumeSampling | None = None,
        max_images: int | None = None,
    ) -> None:
        self.engine = engine
        self.context = context
        self.window = window
        self.sampling = sampling
        self.volume_sampling = volume_sampling or VolumeSampling()
        self.family = resolve_family(engine.family)
        self.max_images = max_images if max_images is not None else self.family.max_images
        self.images: list[ChatImage] = []  # shown in earlier turns
        self.pending: list[ChatImage] = []  # shown with the next question
        self.history: list[Message] = []  # user and assistant turns, as the model saw them
        self.results: list[ChatTurnResult] = []

    # --------------------------------------------------------------------------------- images

    @property
    def all_images(self) -> list[ChatImage]:
        return [*self.images, *self.pending]

    def _convert(self, item: ImageInput, start: int) -> list[ChatImage]:
        if isinstance(item, ModelImage):
            return [self._from_model_image(item, start)]
        if isinstance(item, Image.Image):
            width, height = item.size
            if width <= 0 or height <= 0:
                raise InputError("empty image")
            if width * height > DEFAULT_LIMITS.max_pixels:
                raise ImageTooLargeError(
                    f"image of {width}x{height} pixels, over the limit of {DEFAULT_LIMITS.max_pixels}"
                )
            return [ChatImage(start, item.convert("RGB"), "pil")]
        if isinstance(item, (str, os.PathLike)):
            loaded = load_images(Path(item), window=self.window, sampling=self.volume_sampling)
            return [self._from_model_image(m, start + k) for k, m in enumerate(loaded)]
        raise InputError(f"cannot use a {type(item).__name__} as an image; give a file path or a PIL image")

    @staticmethod
    def _from_model_image(image: ModelImage, index: int) -> ChatImage:
        p = image.provenance
        return ChatImage(index, image.to_pil(), p.format, slice_index=p.slice_index, frame=p.frame)

    def add_images(self, items: ImageInput | Iterable[ImageInput]) -> list[ChatImage]:
        """Add images (files, folders, PIL images) to show with the next question; returns them.

        A file that cannot be read raises a typed :class:`InputError` and adds nothing.
        """
        if isinstance(items, (str, os.PathLike, Image.Image, ModelImage)):
            items = [items]
        added: list[ChatImage] = []
        for item in items:
            added.extend(self._convert(item, len(self.images) + len(self.pending) + len(added)))
            total = len(self.images) + len(self.pending) + len(added)
            if total > self.max_images:
                raise InputError(
                    f"{total} images in the conversation, over the limit of {self.max_images}; "
                    "sample fewer slices or frames, or start a new session"
                )
        self.pending.extend(added)
        return added

    # ------------------------------------------------------------------------------- turns

    def _user_text(self, question: str, mode: ChatMode) -> str:
        return user_text(question, mode, self.context if not self.history else None, self.family)

    def build_request(
        self, question: str, mode: str = "chat", sampling: SamplingParams | None = None
    ) -> GenerationRequest:
        """The engine request for the next turn (system prompt of the mode + history + this question)."""
        mode = check_mode(mode)
        content: list[TextPart | ImagePart] = [ImagePart(im.image) for im in self.pending]
        content.append(TextPart(self._user_text(question, mode)))
        messages = [
            Message.text("system", system_prompt(mode, self.family)),
            *self.history,
            Message("user", content),
        ]
        return GenerationRequest(messages, sampling or self.sampling)

    def ask(
        self,
        question: str,
        mode: str = "chat",
        *,
        on_delta: Callable[[str], None] | None = None,
        sampling: SamplingParams | None = None,
    ) -> ChatTurnResult:
        """Ask a question about the images added so far; with ``on_delta`` the answer is streamed.

        Raises :class:`GenerationError` when the engine fails (the conversation and pending images are
        kept as they were, so the question can be asked again).
        """
        chat_mode = check_mode(mode)
        request = self.build_request(question, chat_mode, sampling)
        if on_delta is None:
            response = self.engine.generate([request])[0]
        else:
            response = None
            for chunk in self.engine.stream(request):
                if chunk.delta:
                    on_delta(chunk.delta)
                if chunk.response is not None:
                    response = chunk.response
            if response is None:
                raise GenerationError("the model stream ended without a final response")
        if response.finish_reason == "error":
            raise GenerationError(f"the model could not answer: {response.error or 'unknown error'}")
        self.history.append(request.messages[-1])
        self.history.append(Message.text("assistant", response.text))
        self.images.extend(self.pending)
        self.pending = []
        result = self._parse(response.text, chat_mode)
        result.usage = {
            "prompt_tokens": response.prompt_tokens,
            "completion_tokens": response.completion_tokens,
        }
        result.finish_reason = response.finish_reason
        result.images = list(self.images)
        self.results.append(result)
        return result

    def _parse(self, text: str, mode: ChatMode) -> ChatTurnResult:
        sizes = [(im.width, im.height) for im in self.images]
        answer = interpret(text, mode, self.family, sizes, self.engine.capabilities.processor)
        return ChatTurnResult(text=text, **vars(answer))  # every ModeAnswer field is a ChatTurnResult field

    # ------------------------------------------------------------------------------ export

    def export(self) -> dict[str, Any]:
        """The conversation as JSON-ready data: images (sizes only), turns and each answer's results."""
        turns = []
        shown = 0
        answers = iter(self.results)
        for message in self.history:
            entry: dict[str, Any] = {"role": message.role, "text": message.text_content}
            if message.role == "user":
                n = len(message.images)
                entry["images"] = list(range(shown, shown + n))
                shown += n
            else:
                entry["result"] = next(answers).to_json()
                entry["result"].pop("images", None)
            turns.append(entry)
        return {
            "model": self.engine.model_name,
            "family": self.engine.family,
            "images": [im.to_json() for im in self.images],
            "turns": turns,
            "notice": NOTICE,
        }


def render_boxes(images: Sequence[ChatImage], boxes: Iterable[Box], *, gap: int = 8) -> Image.Image:
    """One PNG-ready picture: every image left to right in session order (top-aligned, ``gap`` pixels
    apart, black background), each with its own boxes drawn and labelled."""
    from emma.infer.grounding import render_overlay

    if not images:
        raise InputError("no images to draw boxes on")
    boxes = list(boxes)
    panels = [render_overlay(im.image, boxes, image_index=im.index) for im in images]
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    height = max(p.height for p in panels)
    if width * height > DEFAULT_LIMITS.max_pixels:
        raise ImageTooLargeError(
            f"overlay of {width}x{height} pixels, over the limit of {DEFAULT_LIMITS.max_pixels}"
        )
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    x = 0
    for panel in panels:
        canvas.paste(panel, (x, 0))
        x += panel.width + gap
    return canvas
