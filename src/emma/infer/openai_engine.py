"""An Engine that speaks the OpenAI chat completions API to any compatible server.

Our own ``emma serve``, vLLM, llama.cpp's server and Ollama all work. Requests go through the official
``openai`` client, which retries 408/409/429/5xx answers and connection errors or timeouts with
exponential backoff (0.5 s doubling up to 8 s, 25 % jitter) and honours a ``Retry-After`` header of up
to two minutes; ``max_retries`` sets how many retries it makes. ``generate`` runs requests on a thread
pool and a per-engine semaphore keeps at most ``concurrency`` HTTP requests in flight, however many
threads call the engine. ``stream_many`` runs several streams the same way, so a server in front of
this engine (``emma serve --backend vllm|llama-server``) hands concurrent streams to the model server
together, where its own continuous batching serves them.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import openai

from emma.data.formats import image_data_url
from emma.errors import InputError, require_at_least
from emma.infer.engine import EngineCapabilities
from emma.infer.types import (
    ErrorKind,
    FinishReason,
    GenerationRequest,
    GenerationResponse,
    ImagePart,
    Message,
    StreamChunk,
    TextPart,
)

_MAX_ERROR_CHARS = 200
TOP_LOGPROBS = 20  # alternatives asked per token for ``logprob_words`` (OpenAI's and vLLM's default cap)


def _one_line(text: str) -> str:
    line = " ".join(str(text).split())
    return line[:_MAX_ERROR_CHARS]


def error_message(exc: BaseException) -> str:
    """A one-line, content-free description of a failed call (status code and the server's message)."""
    if isinstance(exc, openai.APIStatusError):
        return _one_line(f"HTTP {exc.status_code} from the model server: {exc.message}")
    if isinstance(exc, openai.APITimeoutError):
        return "the model server timed out"
    if isinstance(exc, openai.APIConnectionError):
        return "cannot connect to the model server"
    return _one_line(f"{type(exc).__name__}: {exc}")


def _finish(reason: str | None) -> FinishReason:
    return "length" if reason == "length" else "stop"


def word_logprobs(choice: Any, words: Sequence[str]) -> dict[str, float] | None:
    """``words`` → log of the summed probability of the alternatives at the first generated token whose
    text, stripped and lower-cased, equals the word; ``None`` when the server sent no log-probabilities.
    Only the server's top alternatives are known: a word none of them spells is absent."""
    logprobs = getattr(choice, "logprobs", None)
    content = getattr(logprobs, "content", None) if logprobs is not None else None
    if not content:
        return None
    first = content[0]
    alternatives = list(getattr(first, "top_logprobs", None) or [])
    if not alternatives:
        alternatives = [first]
    out: dict[str, float] = {}
    for word in words:
        key = word.strip().lower()
        found = {str(a.token): float(a.logprob) for a in alternatives if str(a.token).strip().lower() == key}
        if found:
            out[word] = float(np.logaddexp.reduce(np.array(list(found.values()), dtype=np.float64)))
    return out


def message_to_openai(message: Message) -> dict[str, Any]:
    """One OpenAI chat message; images become PNG data URLs placed where they are in the content."""
    if not any(isinstance(p, ImagePart) for p in message.content):
        return {"role": message.role, "content": message.text_content}
    if message.role != "user":
        raise ValueError(f"images are accepted in user messages only, not in a {message.role} message")
    parts: list[dict[str, Any]] = []
    for part in message.content:
        if isinstance(part, TextPart):
            parts.append({"type": "text", "text": part.text})
        else:
            parts.append({"type": "image_url", "image_url": {"url": image_data_url(part.image)}})
    return {"role": message.role, "content": parts}


class OpenAIEngine:
    """Any OpenAI-compatible chat server behind the :class:`~emma.infer.engine.Engine` interface."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        concurrency: int = 8,
        max_retries: int = 3,
        timeout: float = 120,
        family: str | None = None,
        max_images: int | None = None,
    ) -> None:
        require_at_least("concurrency", concurrency, 1)
        require_at_least("max_retries", max_retries, 0)
        if max_images is not None:
            require_at_least("max_images", max_images, 0)
        self._max_images = max_images
        self._model = model
        self._family = family
        self._concurrency = concurrency
        self._slots = threading.BoundedSemaphore(concurrency)
        # Servers without authentication (vLLM, llama.cpp, Ollama by default) ignore the key, but the
        # client insists on one.
        self._client = openai.OpenAI(
            base_url=base_url, api_key=api_key or "EMPTY", max_retries=max_retries, timeout=timeout
        )

    @property
    def model_name(self) -> str:
        return self._model

    @property
    def family(self) -> str | None:
        return self._family

    @property
    def concurrency(self) -> int:
        return self._concurrency

    @property
    def capabilities(self) -> EngineCapabilities:
        """A remote server: counting a prompt costs a request, concurrent streams go out together
        (``stream_many``, up to ``concurrency`` in flight), and the server bounds prompts itself (its 400
        answers become ``error_kind "input"`` responses). ``max_images``: a request with more images gets
        an ``error_kind "input"`` response without being sent."""
        return EngineCapabilities(in_process=False, batched_streams=True, max_images=self._max_images)

    def close(self) -> None:
        self._client.close()

    def _params(
        self, request: GenerationRequest, *, max_tokens: int | None = None, stream: bool = False
    ) -> dict[str, Any]:
        """Chat-completion parameters; first-token logprobs only when asked for and not streaming (OpenAI's
        and EMMA's servers give logprobs on whole completions; ``emma serve`` refuses them with a stream)."""
        if self._max_images is not None:
            images = sum(isinstance(p, ImagePart) for m in request.messages for p in m.content)
            if images > self._max_images:
                what = (
                    "takes no images (text-only)"
                    if self._max_images == 0
                    else f"takes at most {self._max_images}"
                )
                raise InputError(f"{images} images in the request; the model {what}")
        s = request.sampling
        params: dict[str, Any] = {
            "model": self._model,
            "messages": [message_to_openai(m) for m in request.messages],
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": max_tokens if max_tokens is not None else s.max_new_tokens,
        }
        if s.stop:
            params["stop"] = list(s.stop)
        if s.seed is not None:
            params["seed"] = s.seed
        if s.ignore_eos:  # not an OpenAI parameter: vLLM's and llama.cpp's servers read it from the body
            params["extra_body"] = {"ignore_eos": True}
        if request.logprob_words and max_tokens is None and not stream:
            params["logprobs"] = True
            params["top_logprobs"] = TOP_LOGPROBS
        return params

    def _generate_one(self, request: GenerationRequest) -> GenerationResponse:
        start = time.perf_counter()
        if request.cancel.is_set():
            return GenerationResponse(request.request_id, "", "cancelled")
        try:
            params = self._params(request)
            with self._slots:
                if request.cancel.is_set():
                    return GenerationResponse(request.request_id, "", "cancelled")
                completion = self._client.chat.completions.create(**params)
            choice = completion.choices[0]
            usage = completion.usage
            latency = time.perf_counter() - start
            return GenerationResponse(
                request_id=request.request_id,
                text=choice.message.content or "",
                finish_reason=_finish(choice.finish_reason),
                prompt_tokens=usage.prompt_tokens if usage else 0,
                completion_tokens=usage.completion_tokens if usage else 0,
                latency_s=latency,
                first_token_s=latency,
                word_logprobs=word_logprobs(choice, request.logprob_words) if request.logprob_words else None,
            )
        except Exception as exc:  # noqa: BLE001 — every failure is reported in its own response
            return GenerationResponse(
                request.request_id,
                "",
                "error",
                latency_s=time.perf_counter() - start,
                error=error_message(exc),
                error_kind="input" if isinstance(exc, InputError) else None,
            )

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResponse]:
        """One response per request, in order; up to ``concurrency`` requests are in flight at once."""
        if not requests:
            return []
        if len(requests) == 1:
            return [self._generate_one(requests[0])]
        with ThreadPoolExecutor(max_workers=min(self._concurrency, len(requests))) as pool:
            return list(pool.map(self._generate_one, requests))

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        """Text deltas from an SSE stream; the last chunk carries the final response (usage if sent)."""
        start = time.perf_counter()
        text: list[str] = []
        first: float | None = None
        finish: FinishReason = "stop"
        prompt_tokens = completion_tokens = 0
        error: str | None = None
        kind: ErrorKind | None = None
        if request.cancel.is_set():
            yield StreamChunk("", GenerationResponse(request.request_id, "", "cancelled"))
            return
        try:
            params = self._params(request, stream=True)
            with self._slots:
                events = self._client.chat.completions.create(
                    **params, stream=True, stream_options={"include_usage": True}
                )
                try:
                    for event in events:
                        if request.cancel.is_set():
                            finish = "cancelled"
                            break
                        if event.usage is not None:
                            prompt_tokens = event.usage.prompt_tokens
                            completion_tokens = event.usage.completion_tokens
                        if not event.choices:
                            continue
                        choice = event.choices[0]
                        delta = choice.delta.content if choice.delta is not None else None
                        if delta:
                            if first is None:
                                first = time.perf_counter() - start
                            text.append(delta)
                            yield StreamChunk(delta)
                        if choice.finish_reason is not None:
                            finish = _finish(choice.finish_reason)
                finally:
                    events.close()
        except Exception as exc:  # noqa: BLE001 — reported in the final chunk
            finish, error = "error", error_message(exc)
            kind = "input" if isinstance(exc, InputError) else None
        yield StreamChunk(
            "",
            GenerationResponse(
                request_id=request.request_id,
                text="".join(text),
                finish_reason=finish,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                latency_s=time.perf_counter() - start,
                first_token_s=first,
                error=error,
                error_kind=kind,
            ),
        )

    def stream_many(self, requests: Sequence[GenerationRequest]) -> Iterator[tuple[int, StreamChunk]]:
        """Several :meth:`stream` calls at once (up to ``concurrency`` in flight): ``(index, chunk)``
        pairs in the order they arrive; each request's last chunk carries its response. Closing the
        iterator early stops every stream at its next chunk."""
        if not requests:
            return
        arrived: queue.Queue[tuple[int, StreamChunk] | None] = queue.Queue()
        stop = threading.Event()

        def run(index: int, request: GenerationRequest) -> None:
            chunks = self.stream(request)
            try:
                for chunk in chunks:
                    if stop.is_set():
                        break
                    arrived.put((index, chunk))
            finally:
                chunks.close()
                arrived.put(None)  # this stream is over

        with ThreadPoolExecutor(max_workers=min(self._concurrency, len(requests))) as pool:
            for index, request in enumerate(requests):
                pool.submit(run, index, request)
            try:
                running = len(requests)
                while running:
                    item = arrived.get()
                    if item is None:
                        running -= 1
                    else:
                        yield item
            finally:
                stop.set()

    def count_tokens(self, request: GenerationRequest) -> int:
        """Prompt tokens as the server counts them (images included), from a one-token completion.

        The OpenAI API has no tokenize endpoint, so this costs one short request.
        """
        with self._slots:
            completion = self._client.chat.completions.create(**self._params(request, max_tokens=1))
        if completion.usage is None:
            raise ValueError("the model server reports no token usage")
        return int(completion.usage.prompt_tokens)
