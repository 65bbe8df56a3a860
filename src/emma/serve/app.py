"""The OpenAI-compatible FastAPI app behind ``emma serve`` (contract: docs/serving.md).

``create_app(engine, settings)`` wires: :class:`~emma.serve.security.GuardMiddleware` (API key, body
bound, audit line, JSON 500s), :class:`~emma.serve.images.ImageResolver` (data URLs / allowed remote
URLs → model-ready images through emma.io), :class:`~emma.serve.batcher.Batcher` (bounded queue,
batching, streaming, cancellation) and the routes ``/v1/chat/completions``, ``/v1/models``,
``/v1/emma/preview``, ``/health``, plus the web UI's static files at ``/``.

Why one file (~760 lines): the routes share one request life (bounds → budget → plan images → mode →
batcher → response), and each route is a short function over it; request models are in schemas.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from emma import __version__
from emma.data.schema import Box
from emma.infer import prompts
from emma.infer.engine import Engine
from emma.infer.modes import interpret, user_text
from emma.infer.types import (
    GenerationRequest,
    GenerationResponse,
    ImagePart,
    Message,
    SamplingParams,
    TextPart,
)
from emma.infer.types import TokenLogprob as EngineTokenLogprob
from emma.io.image import ImageFit, ModelImage
from emma.io.limits import Limits
from emma.model.families import image_fit
from emma.serve.batcher import (
    Arrival,
    Batcher,
    ClientGone,
    EngineFailure,
    PromptError,
    QueueFullError,
    ShuttingDown,
)
from emma.serve.budget import BODY_COPIES, Ledger, MemoryBudget
from emma.serve.images import ImageResolver, png_data_url
from emma.serve.schemas import (
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    NOTICE,
    AssistantMessage,
    BoxOut,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    EmmaOptions,
    EmmaResult,
    ErrorResponse,
    Health,
    ImageInfo,
    ImageURLPart,
    ModelCard,
    ModelList,
    PreviewImage,
    PreviewRequest,
    PreviewResponse,
    QueueState,
    ReportOut,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from emma.serve.security import APIError, AuditRecord, GuardMiddleware, error_payload, normalise_domains

API_KEY_ENV = "EMMA_API_KEY"
CHAT_PATH = "/v1/chat/completions"
STATIC_DIR = Path(__file__).parent / "static"

# Bounds for images arriving over the network: tighter than the library defaults (which fit local files).
SERVE_LIMITS = Limits(
    max_file_bytes=64 * 1024**2,
    max_pixels=32 * 1024**2,  # e.g. a 4096 x 5120 full-field mammogram fits, with room
    max_frames=512,
    max_slices=1024,
    max_total_voxels=256 * 1024**2,
)


def _env_api_key() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


class ServeSettings(BaseModel):
    """Everything ``emma serve`` can be told; every input bound the server enforces."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    model_name: str | None = Field(
        default=None, description="Served model id; default: the engine's model_name."
    )
    api_key: str | None = Field(
        default_factory=_env_api_key,
        repr=False,
        description=f"Bearer key for /v1/*; default: ${API_KEY_ENV}.",
    )
    max_body_bytes: int = Field(default=64 * 1024**2, ge=1024)
    max_images: int = Field(
        default=16, ge=1, description="Model-ready images per request (slices/frames count)."
    )
    max_request_pixels: int = Field(
        default=256 * 1024**2,
        ge=1,
        description="Pixels decoded for one request: frames x rows x columns (voxels of volumes) summed "
        "over its images, read from their headers before decoding.",
    )
    limits: Limits = Field(default=SERVE_LIMITS, description="Per-image file size, pixel and frame bounds.")
    memory_budget_mb: int = Field(
        default=2048,
        ge=16,
        description="Memory the requests in flight may hold (bodies, decoding, model-ready images), "
        "reserved before it is allocated: a request that can never fit is refused with 413, one that "
        "does not fit beside the others with 503 + Retry-After.",
    )
    fit_images: bool = Field(
        default=True,
        description="Downscale images when decoded to what the served model's processor can use "
        "(emma.model.families.image_fit), recorded in their provenance.",
    )
    max_text_chars: int = Field(
        default=256 * 1024,
        ge=1,
        description="Characters of text in one request (messages and emma.context), checked before "
        "anything is tokenized.",
    )
    max_prompt_tokens: int | None = Field(default=16384, ge=1, description="Prompt tokens, images included.")
    max_tokens: int = Field(
        default=2048, ge=1, description="Upper bound on max_tokens a request may ask for."
    )
    default_max_tokens: int = Field(default=512, ge=1, description="max_tokens when a request gives none.")
    queue_capacity: int = Field(default=64, ge=1)
    max_batch_size: int = Field(default=8, ge=1)
    batch_wait_ms: float = Field(default=5.0, ge=0.0)
    retry_after_s: int = Field(default=1, ge=1)
    allow_remote_images: bool = False
    allowed_domains: tuple[str, ...] = ()
    remote_timeout_s: float = Field(default=10.0, gt=0.0)
    static_dir: Path | None = Field(default=STATIC_DIR, description="Web UI folder served at /; None: no UI.")
    notice: str = NOTICE

    @field_validator("api_key")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            return None
        return v

    @field_validator("allowed_domains", mode="before")
    @classmethod
    def _domains(cls, v: Any) -> tuple[str, ...]:
        return normalise_domains([v] if isinstance(v, str) else (v or ()))

    @model_validator(mode="after")
    def _consistent(self) -> ServeSettings:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError("default_max_tokens must not exceed max_tokens")
        if self.allow_remote_images and not self.allowed_domains:
            raise ValueError("allow_remote_images needs at least one allowed domain")
        if self.memory_budget_bytes < self.max_body_bytes * BODY_COPIES:
            raise ValueError(
                f"memory_budget_mb must hold at least {BODY_COPIES} x max_body_bytes (a body at the bound "
                "could never be served)"
            )
        return self

    @property
    def memory_budget_bytes(self) -> int:
        return self.memory_budget_mb * 1024**2


# ------------------------------------------------------------------------------------------ helpers


def _error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in codes}


def _image_url(part: ImageURLPart) -> str:
    return part.image_url if isinstance(part.image_url, str) else part.image_url.url


def _image_urls(messages: Sequence[ChatMessage]) -> list[str]:
    urls = []
    for m in messages:
        if isinstance(m.content, list):
            for part in m.content:
                if isinstance(part, ImageURLPart):
                    if m.role != "user":
                        raise APIError(
                            400,
                            f"images are accepted in user messages only, not in a {m.role} message",
                            code="invalid_request",
                            param="messages",
                        )
                    urls.append(_image_url(part))
    return urls


def _to_messages(messages: Sequence[ChatMessage], groups: Sequence[list[ModelImage]]) -> list[Message]:
    """OpenAI messages → engine messages; each image part becomes its model-ready image(s)."""
    out: list[Message] = []
    it = iter(groups)
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        parts: list[TextPart | ImagePart] = []
        if isinstance(m.content, str):
            parts.append(TextPart(m.content))
        elif m.content is not None:
            for part in m.content:
                if isinstance(part, ImageURLPart):
                    parts.extend(ImagePart(image.to_pil()) for image in next(it))
                else:
                    parts.append(TextPart(part.text))
        out.append(Message(role=role, content=parts))  # type: ignore[arg-type]
    if not out or out[-1].role != "user":
        raise APIError(
            400, "the last message must be a user message", code="invalid_request", param="messages"
        )
    return out


def _check_text(body: ChatCompletionRequest, settings: ServeSettings) -> None:
    """The request's text in characters against ``max_text_chars``, before anything is tokenized."""
    n = len((body.emma.context or "") if body.emma is not None else "")
    for m in body.messages:
        if isinstance(m.content, str):
            n += len(m.content)
        elif m.content is not None:
            n += sum(len(part.text) for part in m.content if not isinstance(part, ImageURLPart))
    if n > settings.max_text_chars:
        raise APIError(
            400,
            f"the request has {n} characters of text, over this server's limit of {settings.max_text_chars}",
            code="context_length_exceeded",
            param="messages",
        )


def _sampling(body: ChatCompletionRequest, settings: ServeSettings) -> SamplingParams:
    if body.n is not None and body.n != 1:
        raise APIError(400, "only n=1 is supported", code="unsupported_parameter", param="n")
    if body.tools:
        raise APIError(400, "tools are not supported", code="unsupported_parameter", param="tools")
    max_new = body.max_completion_tokens or body.max_tokens or settings.default_max_tokens
    if max_new > settings.max_tokens:
        raise APIError(
            400,
            f"max_tokens {max_new} is over this server's limit of {settings.max_tokens}",
            code="max_tokens_too_large",
            param="max_tokens",
        )
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP_SEQUENCES or any(not s or len(s) > MAX_STOP_CHARS for s in stop):
        raise APIError(
            400,
            f"stop: up to {MAX_STOP_SEQUENCES} non-empty strings of at most {MAX_STOP_CHARS} characters",
            code="invalid_stop",
            param="stop",
        )
    return SamplingParams(
        max_new_tokens=max_new,
        temperature=0.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=stop,
        seed=body.seed,
        ignore_eos=body.ignore_eos,
    )


def _top_logprobs(body: ChatCompletionRequest, engine: Engine) -> int | None:
    """The alternatives per token the request asks for (None: no log-probabilities), as OpenAI and vLLM
    read ``logprobs`` / ``top_logprobs``; 400 where they cannot be given."""
    if not body.logprobs:
        if body.top_logprobs is not None:
            raise APIError(
                400, "top_logprobs needs logprobs: true", code="invalid_request", param="top_logprobs"
            )
        return None
    if body.stream:
        raise APIError(
            400,
            "logprobs are not available with stream: true; ask without streaming",
            code="unsupported_parameter",
            param="logprobs",
        )
    if not engine.capabilities.token_logprobs:
        raise APIError(
            400,
            "the served model's engine does not report token log-probabilities",
            code="unsupported_parameter",
            param="logprobs",
        )
    return body.top_logprobs or 0


def _token_logprob(entry: EngineTokenLogprob) -> TopLogprob:
    return TopLogprob(token=entry.token, logprob=entry.logprob, bytes=list(entry.token.encode("utf-8")))


def _choice_logprobs(response: GenerationResponse) -> ChoiceLogprobs:
    """The engine's token log-probabilities in OpenAI's ``choices[].logprobs`` shape."""
    return ChoiceLogprobs(
        content=[
            TokenLogprob(
                **_token_logprob(entry).model_dump(),
                top_logprobs=[_token_logprob(alt) for alt in entry.top],
            )
            for entry in response.token_logprobs or []
        ]
    )


def _image_infos(images: Sequence[ModelImage]) -> list[ImageInfo]:
    return [
        ImageInfo(index=i, width=im.width, height=im.height, source_format=im.provenance.format)
        for i, im in enumerate(images)
    ]


def _usage(response: GenerationResponse) -> Usage:
    return Usage(
        prompt_tokens=response.prompt_tokens,
        completion_tokens=response.completion_tokens,
        total_tokens=response.prompt_tokens + response.completion_tokens,
    )


def _batcher_error(exc: Exception) -> APIError:
    if isinstance(exc, QueueFullError):
        return APIError(
            503,
            str(exc),
            type="server_overloaded",
            code="queue_full",
            headers={"Retry-After": str(exc.retry_after_s)},
        )
    if isinstance(exc, PromptError):
        code = "context_length_exceeded" if exc.n_tokens is not None else "invalid_request"
        return APIError(400, str(exc), code=code, param="messages")
    if isinstance(exc, ClientGone):
        return APIError(499, "client closed the request", code="client_disconnected")
    if isinstance(exc, ShuttingDown):
        return APIError(
            503, str(exc), type="server_error", code="shutting_down", headers={"Retry-After": "5"}
        )
    return APIError(500, str(exc) or "generation failed", type="server_error", code="engine_error")


def _generation_error(response: GenerationResponse) -> APIError:
    kind = (response.error or "").split(":", 1)[0].strip() or "error"
    return APIError(500, f"generation failed ({kind[:60]})", type="server_error", code="engine_error")


def _validation_message(exc: RequestValidationError) -> tuple[int, str, str]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "invalid_json", "the request body is not valid JSON"
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        message = str(e.get("msg", "invalid"))
        sent = _scalars(e.get("input")) | _scalars((e.get("ctx") or {}).get("tag"))
        if any(value in message for value in sent):
            message = f"invalid value ({e.get('type', 'error')})"  # never echo what the client sent
        parts.append(f"{loc or 'body'}: {message}")
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return 422, "validation_error", "; ".join(parts) + more


def _scalars(value: Any, depth: int = 0) -> set[str]:
    """Every string form of the scalars inside ``value`` (a few levels deep), to keep them out of messages."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        text = str(value)
        return {text} if len(text) >= 2 else set()
    if depth >= 4:
        return set()
    items: list[Any] = []
    if isinstance(value, dict):
        items = [*value.keys(), *value.values()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    return set().union(*(_scalars(v, depth + 1) for v in items[:100])) if items else set()


_UNPARSABLE_BODY = (UnicodeDecodeError, RecursionError, ValueError)


def _memory(request: Request) -> Ledger | None:
    """The request's memory ledger (set by the GuardMiddleware; None outside it)."""
    ledger = getattr(request.state, "memory", None)
    return ledger if isinstance(ledger, Ledger) else None


def _sse(payload: BaseModel | dict[str, Any]) -> str:
    data = (
        payload.model_dump_json()
        if isinstance(payload, BaseModel)
        else json.dumps(payload, separators=(",", ":"))
    )
    return f"data: {data}\n\n"


# ---------------------------------------------------------------------------------------------- app


def create_app(engine: Engine, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` under ``settings`` (see docs/serving.md)."""
    settings = settings or ServeSettings()
    model_name = settings.model_name or engine.model_name
    created = int(time.time())
    batcher = Batcher(
        engine,
        max_batch_size=settings.max_batch_size,
        batch_wait_ms=settings.batch_wait_ms,
        queue_capacity=settings.queue_capacity,
        max_prompt_tokens=settings.max_prompt_tokens,
        retry_after_s=settings.retry_after_s,
        count_prompts=engine.capabilities.in_process,
    )
    budget = MemoryBudget(settings.memory_budget_bytes)
    fit: ImageFit | None = (
        image_fit(engine.family, engine.capabilities.processor) if settings.fit_images else None
    )
    engine_images = engine.capabilities.max_images  # 0 for a text-only model
    resolver = ImageResolver(
        limits=settings.limits,
        max_images=settings.max_images if engine_images is None else min(settings.max_images, engine_images),
        max_request_pixels=settings.max_request_pixels,
        fit=fit,
        allow_remote_images=settings.allow_remote_images,
        allowed_domains=settings.allowed_domains,
        remote_timeout_s=settings.remote_timeout_s,
        retry_after_s=settings.retry_after_s,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(
        title="EMMA",
        version=__version__,
        summary="OpenAI-compatible chat completions for medical images, with the EMMA extension.",
        description=(
            "`POST /v1/chat/completions` in the OpenAI shape (text and image_url parts with data URLs, "
            "DICOM and NIfTI included; SSE streaming), plus the optional `emma` request object (mode "
            "chat/structured/report, CT window, volume sampling, clinical context) and the `emma` response "
            f"object (image sizes, boxes, structured output, report draft). {settings.notice}"
        ),
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.settings = settings
    app.state.batcher = batcher
    app.state.resolver = resolver
    app.state.budget = budget

    # ---------------------------------------------------------------------------- error shapes

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        _audit(request).error = exc.code
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, code, message = _validation_message(exc)
        _audit(request).error = code
        return JSONResponse(error_payload(message, "invalid_request_error", code), status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and isinstance(exc.__cause__, _UNPARSABLE_BODY):
            # FastAPI's body parsing failed past json.loads' JSONDecodeError: invalid UTF-8, nesting
            # deeper than the parser's recursion bound: not JSON it can read, as documented
            _audit(request).error = "invalid_json"
            return JSONResponse(
                error_payload("the request body is not valid JSON", "invalid_request_error", "invalid_json"),
                status_code=400,
            )
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = {404: "not found", 405: "method not allowed"}.get(exc.status_code, "request failed")
        _audit(request).error = code
        return JSONResponse(
            error_payload(message, "invalid_request_error", code),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    # ---------------------------------------------------------------------------------- routes

    @app.get("/health", response_model=Health, tags=["server"])
    async def health() -> Health:
        """Liveness and queue state (no authentication, no content)."""
        return Health(
            model=model_name,
            queue=QueueState(depth=batcher.depth, capacity=batcher.capacity, active=batcher.active),
        )

    @app.get("/v1/models", response_model=ModelList, tags=["openai"], responses=_error_responses(401))
    async def list_models() -> ModelList:
        """The served model (OpenAI shape)."""
        return ModelList(data=[ModelCard(id=model_name, created=created)])

    @app.post(
        "/v1/emma/preview",
        response_model=PreviewResponse,
        tags=["emma"],
        responses=_error_responses(400, 401, 413, 422),
    )
    async def preview(body: PreviewRequest, request: Request) -> PreviewResponse:
        """Images → the exact model-ready PNGs the model sees (the pixel space of the response boxes)."""
        groups = await resolver.resolve(body.images, body, _memory(request))
        images = [im for group in groups for im in group]
        _audit(request).images = len(images)
        return PreviewResponse(
            images=[
                PreviewImage(
                    index=i,
                    width=im.width,
                    height=im.height,
                    png=png_data_url(im),
                    provenance=im.provenance.model_dump(mode="json"),
                )
                for i, im in enumerate(images)
            ]
        )

    @app.post(
        CHAT_PATH,
        response_model=ChatCompletionResponse,
        tags=["openai"],
        responses={
            200: {
                "description": "A chat.completion, or with stream=true an SSE stream of chat.completion.chunk "
                "events (the last with finish_reason, usage and emma) ending with `data: [DONE]`.",
                "content": {"text/event-stream": {"schema": ChatCompletionChunk.model_json_schema()}},
            },
            **_error_responses(400, 401, 404, 413, 422, 500, 503),
        },
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        """OpenAI chat completions with the optional EMMA extension (see docs/serving.md)."""
        record = _audit(request)
        if body.model and body.model != model_name:
            raise APIError(
                404,
                f"unknown model; this server serves {model_name!r}",
                code="model_not_found",
                param="model",
            )
        # Open since the request came in (_ArrivalMiddleware): lets the batcher wait briefly for it.
        arrival: Arrival = getattr(request.state, "arrival", None) or batcher.arrival()
        if body.stream and not batcher.batches_streams:
            arrival.done()  # streams run one at a time here, never in a batch: nothing to wait for
        try:
            _check_text(body, settings)
            sampling = _sampling(body, settings)
            top_logprobs = _top_logprobs(body, engine)
            options = body.emma or EmmaOptions()
            urls = _image_urls(body.messages)
            groups = await resolver.resolve(urls, options, _memory(request))
            images = [im for group in groups for im in group]
            record.images = len(images)
            messages = _apply_mode(_to_messages(body.messages, groups), options, engine.family)
        except BaseException:
            arrival.done()
            raise
        generation = GenerationRequest(
            messages=messages, sampling=sampling, request_id=record.request_id, top_logprobs=top_logprobs
        )
        completion_id = f"chatcmpl-{record.request_id}"
        if body.stream:
            try:
                chunks = await batcher.open_stream(
                    generation, is_disconnected=request.is_disconnected, arrival=arrival
                )
            except (QueueFullError, PromptError, ClientGone, EngineFailure, ShuttingDown) as exc:
                raise _batcher_error(exc) from None
            return _EventStream(
                _stream_events(chunks, completion_id, model_name, options, images, engine, record, settings),
                on_close=generation.cancel.set,
            )
        try:
            response = await batcher.generate(
                generation, is_disconnected=request.is_disconnected, arrival=arrival
            )
        except (QueueFullError, PromptError, ClientGone, EngineFailure, ShuttingDown) as exc:
            raise _batcher_error(exc) from None
        if response.finish_reason == "error":
            raise _generation_error(response)
        record.prompt_tokens = response.prompt_tokens
        record.completion_tokens = response.completion_tokens
        return ChatCompletionResponse(
            id=completion_id,
            created=int(time.time()),
            model=model_name,
            choices=[
                Choice(
                    message=AssistantMessage(content=response.text),
                    finish_reason=response.finish_reason,
                    logprobs=_choice_logprobs(response) if top_logprobs is not None else None,
                )
            ],
            usage=_usage(response),
            emma=_emma_result(options, response.text, images, engine, settings),
        )

    if settings.static_dir is not None and Path(settings.static_dir).is_dir():
        app.mount("/", StaticFiles(directory=settings.static_dir, html=True), name="ui")

    app.add_middleware(
        GuardMiddleware,
        api_key=settings.api_key,
        max_body_bytes=settings.max_body_bytes,
        budget=budget,
        retry_after_s=settings.retry_after_s,
    )
    app.add_middleware(_ArrivalMiddleware, batcher=batcher)  # outermost: counts a request from its start
    return app


class _ArrivalMiddleware:
    """Opens a batcher :class:`~emma.serve.batcher.Arrival` for each chat request as soon as it comes in
    (before its body is read and its images decoded), so a batch being formed can wait briefly for it;
    the route closes it once the request is queued (or refused), and this closes it whatever happens."""

    def __init__(self, app: Any, *, batcher: Batcher) -> None:
        self.app = app
        self.batcher = batcher

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") != CHAT_PATH:
            await self.app(scope, receive, send)
            return
        arrival = self.batcher.arrival()
        scope.setdefault("state", {})["arrival"] = arrival
        try:
            await self.app(scope, receive, send)
        finally:
            arrival.done()


class _EventStream(StreamingResponse):
    """An SSE response that calls ``on_close`` however it ends: finished, failed, or the client gone
    (Starlette then stops iterating without resuming the generator, so cleanup cannot live there)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], *, on_close: Callable[[], None]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()  # a no-op after a finished generation; stops an abandoned one
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await aclose()


def _audit(request: Request) -> AuditRecord:
    record = getattr(request.state, "audit", None)
    if record is None:  # only outside the middleware (never in the served app)
        record = AuditRecord(request_id=uuid.uuid4().hex, method=request.method, route="(unaudited)")
        request.state.audit = record
    return record


def _emma_result(
    options: EmmaOptions, text: str, images: Sequence[ModelImage], engine: Engine, settings: ServeSettings
) -> EmmaResult:
    sizes = [(im.width, im.height) for im in images]
    answer = interpret(text, options.mode, engine.family, sizes, engine.capabilities.processor)
    result = EmmaResult(
        mode=options.mode,
        images=_image_infos(images),
        notice=settings.notice,
        boxes=[_box_out(b) for b in answer.boxes],
        box_errors=answer.box_errors,
        structured=answer.structured,
        structured_errors=answer.structured_errors,
        structured_repaired=answer.structured_repaired,
    )
    if answer.report is not None:
        result.report = ReportOut(findings=answer.report.findings, impression=answer.report.impression)
        result.report_errors = list(answer.report.errors)
    return result


def _box_out(box: Box) -> BoxOut:
    return BoxOut(x1=box.x1, y1=box.y1, x2=box.x2, y2=box.y2, label=box.label, image_index=box.image_index)


def _apply_mode(messages: list[Message], options: EmmaOptions, family: str | None) -> list[Message]:
    """EMMA's prompts for the request's mode: the mode's system prompt and the last user turn rebuilt
    with the clinical context block and the mode's instructions (see emma.infer.prompts).

    In chat mode without context, the client's messages are kept as sent, with EMMA's system prompt
    added only when the client sent none. In structured and report modes EMMA's system prompt comes
    first (the client's system text follows it) and the last user question is wrapped by the mode's
    prompt builder.
    """
    client_system = [m.text_content for m in messages if m.role == "system"]
    turns = [m for m in messages if m.role != "system"]
    if options.mode == "chat" and client_system:
        system = "\n\n".join(t for t in client_system if t)
    else:
        system = prompts.join_blocks(prompts.system_prompt(options.mode, family), *client_system)
    last = turns[-1]
    if options.mode != "chat" or options.context:
        question = "\n".join(p.text for p in last.content if isinstance(p, TextPart)).strip()
        text = user_text(question, options.mode, options.context, family)
        images: list[TextPart | ImagePart] = [p for p in last.content if isinstance(p, ImagePart)]
        turns[-1] = Message(role="user", content=[*images, TextPart(text)])
    return [Message.text("system", system), *turns] if system else turns


async def _stream_events(
    chunks: AsyncIterator[Any],
    completion_id: str,
    model_name: str,
    options: EmmaOptions,
    images: Sequence[ModelImage],
    engine: Engine,
    record: AuditRecord,
    settings: ServeSettings,
) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(delta: Delta, finish: str | None = None, **extra: Any) -> str:
        payload = ChatCompletionChunk(
            id=completion_id,
            created=created,
            model=model_name,
            choices=[ChunkChoice(delta=delta, finish_reason=finish)],
            **extra,
        ).model_dump(mode="json")
        # As OpenAI sends them: an empty delta is {}, and usage/emma appear only on the last chunk.
        payload["choices"][0]["delta"] = delta.model_dump(exclude_none=True)
        for key in ("usage", "emma"):
            if payload[key] is None:
                del payload[key]
        return _sse(payload)

    yield chunk(Delta(role="assistant", content=""))
    final: GenerationResponse | None = None
    try:
        async for piece in chunks:
            if piece.delta:
                yield chunk(Delta(content=piece.delta))
            if piece.response is not None:
                final = piece.response
    except ClientGone:
        record.error = "client_disconnected"
        return
    except (PromptError, EngineFailure, ShuttingDown) as exc:
        error = _batcher_error(exc)
        record.error = error.code
        yield _sse(error.payload())
        yield "data: [DONE]\n\n"
        return
    if final is None or final.finish_reason == "error":
        error = (
            _generation_error(final)
            if final is not None
            else APIError(500, "generation ended without a result", type="server_error", code="engine_error")
        )
        record.error = error.code
        yield _sse(error.payload())
        yield "data: [DONE]\n\n"
        return
    record.prompt_tokens = final.prompt_tokens
    record.completion_tokens = final.completion_tokens
    yield chunk(
        Delta(),
        final.finish_reason,
        usage=_usage(final),
        emma=_emma_result(options, final.text, images, engine, settings),
    )
    yield "data: [DONE]\n\n"
