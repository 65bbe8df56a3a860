"""Request and response models of the serving API (OpenAI chat completions + the ``emma`` extension).

They are the OpenAPI schema FastAPI serves at ``/openapi.json``; docs/serving.md describes the same
contract in prose. Unknown OpenAI fields (``user``, ...) are accepted and ignored, as vLLM does; fields
EMMA cannot honour (``n`` > 1, ``tools``, ``logprobs`` with ``stream``) are refused with 400 by the handler.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, model_validator

from emma.infer.prompts import MAX_CONTEXT_CHARS
from emma.infer.structured import DiagnosticOutput

NOTICE = "Research tool, not for clinical use."

MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64
MAX_SLICES = 64
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a signed 64-bit integer, as OpenAI and vLLM take it
MAX_TOP_LOGPROBS = 20  # alternatives per token, OpenAI's bound (and what OpenAIEngine asks for)

Mode = Literal["chat", "structured", "report"]
Plane = Literal["axial", "coronal", "sagittal"]
VolumeMode = Literal["slice", "slab", "mip"]


# ------------------------------------------------------------------------------------------ request


class ImageURL(BaseModel):
    url: str = Field(description="A base64 data URL (`data:<mime>;base64,...`) or an allowed http(s) URL.")
    detail: str | None = Field(default=None, description="Accepted for compatibility; ignored.")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURLPart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL | str


ContentPart = Annotated[TextPart | ImageURLPart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _user_has_content(self) -> ChatMessage:
        if self.role == "user" and self.content is None:
            raise ValueError("a user message needs content")
        return self


class ImageOptions(BaseModel):
    """How images are made model-ready (the same as ``emma chat``'s options)."""

    window: str | None = Field(
        default=None,
        max_length=64,
        description='CT window: a preset name ("lung", "bone", ...) or "CENTER,WIDTH"; null = the file\'s own.',
    )
    plane: Plane = Field(default="axial", description="Plane sampled from a volume (NIfTI, series, mosaic).")
    slices: StrictInt = Field(default=8, ge=1, le=MAX_SLICES, description="Images sampled from a volume.")
    volume_mode: VolumeMode = Field(default="slice", description="Single slices, thick slabs or MIPs.")


class EmmaOptions(ImageOptions):
    """The EMMA extension of a chat-completions request (optional top-level ``emma`` object)."""

    mode: Mode = Field(
        default="chat",
        description="chat: free answer; structured: a DiagnosticOutput JSON; report: Findings/Impression draft.",
    )
    context: str | None = Field(
        default=None,
        max_length=MAX_CONTEXT_CHARS,
        description="Clinical context (chief complaint, vitals, triage note) given to the model as text.",
    )


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool | None = None


class ChatCompletionRequest(BaseModel):
    """OpenAI ``POST /v1/chat/completions`` body (the fields EMMA reads) plus ``emma``.

    Numbers and flags are strict: ``max_tokens: true`` or ``stream: "yes"`` are refused (422), not read
    as 1 or true; ``seed`` is a signed 64-bit integer.
    """

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(default=None, description="The id from /v1/models; omitted = the served model.")
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    temperature: StrictFloat | None = Field(default=None, ge=0.0, le=2.0)
    top_p: StrictFloat | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    ignore_eos: StrictBool = Field(
        default=False,
        description="Not OpenAI's (vLLM's and llama.cpp's): generate max_tokens tokens, never ending at the "
        "end-of-sequence token (benchmarks).",
    )
    n: StrictInt | None = Field(default=None, ge=1)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    tools: list[Any] | None = None
    logprobs: StrictBool | None = Field(
        default=None, description="Return each generated token's log-probability (not with stream)."
    )
    top_logprobs: StrictInt | None = Field(
        default=None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="With logprobs: the most likely tokens to list at each position (default 0).",
    )
    emma: EmmaOptions | None = None


class PreviewRequest(ImageOptions):
    """``POST /v1/emma/preview``: images → the exact model-ready images the model would see."""

    images: list[str] = Field(min_length=1, description="Data URLs (or allowed http(s) URLs).")


# ----------------------------------------------------------------------------------------- response


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ImageInfo(BaseModel):
    index: int = Field(description="Position among the request's model-ready images (boxes refer to it).")
    width: int
    height: int
    source_format: str = Field(description="dicom, dicom-series, nifti, png, jpeg, ...")


class BoxOut(BaseModel):
    x1: float
    y1: float
    x2: float
    y2: float
    label: str | None = None
    image_index: int = 0


class ReportOut(BaseModel):
    findings: str
    impression: str


class EmmaResult(BaseModel):
    """The EMMA extension of a chat-completions response."""

    mode: Mode
    images: list[ImageInfo] = Field(default_factory=list)
    boxes: list[BoxOut] = Field(
        default_factory=list,
        description="Canonical pixels (x1, y1, x2, y2) of model-ready image image_index (as /v1/emma/preview).",
    )
    box_errors: list[str] = Field(default_factory=list)
    structured: DiagnosticOutput | None = Field(
        default=None,
        description="mode=structured: the validated DiagnosticOutput (finding boxes in canonical pixels), "
        "or null when the answer could not be read (see structured_errors).",
    )
    structured_errors: list[str] = Field(default_factory=list)
    structured_repaired: bool = False
    report: ReportOut | None = Field(default=None, description="mode=report: the Findings/Impression draft.")
    report_errors: list[str] = Field(default_factory=list)
    notice: str = NOTICE


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str = Field(description="The token's text as the tokenizer decodes it alone (leading space kept).")
    logprob: float = Field(
        description="Natural log of its probability from the model's raw logits (>= -9999)."
    )
    bytes: list[int] | None = Field(description="UTF-8 bytes of ``token``.")


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(
        description="The top_logprobs most likely tokens at this position, most likely first."
    )


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = Field(
        description="One entry per generated token counted in usage.completion_tokens."
    )
    refusal: None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    emma: EmmaResult


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One SSE ``data:`` event of a streamed completion; the last carries usage and ``emma``."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    emma: EmmaResult | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "emma"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class QueueState(BaseModel):
    depth: int
    capacity: int
    active: int


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    queue: QueueState


class PreviewImage(BaseModel):
    index: int
    width: int
    height: int
    png: str = Field(description="data:image/png;base64,... of the model-ready image.")
    provenance: dict[str, Any]


class PreviewResponse(BaseModel):
    images: list[PreviewImage]


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
