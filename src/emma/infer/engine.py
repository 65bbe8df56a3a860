"""The Engine interface: ``generate(requests) -> responses`` and token streaming.

Implementations: :class:`emma.infer.transformers_engine.TransformersEngine` (in-process) and
:class:`emma.infer.openai_engine.OpenAIEngine` (any OpenAI-compatible server). Evaluation, annotation
teachers, the CLI and the server all call models only through this interface.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from emma.infer.types import GenerationRequest, GenerationResponse, StreamChunk


@dataclass(frozen=True)
class EngineCapabilities:
    """What an engine can do beyond the core calls. Callers (the server's batcher, annotation teachers,
    chat) read this record instead of probing attributes, so a new engine (llama.cpp, vLLM) is one class.

    ``in_process``: the model runs in this process, so counting a prompt's tokens is local and cheap
    (for a remote server it would cost a request). ``batched_streams``: the engine has
    ``stream_many(requests) -> Iterator[(index, StreamChunk)]``, several streams as one batch.
    ``max_batch_size``: the most requests one ``generate`` / ``stream_many`` call takes (None: no bound).
    ``max_prompt_tokens``: the engine's own prompt bound. ``checks_prompt_tokens``: the engine enforces
    that bound itself while building a prompt (an over-long request fails with ``error_kind
    "prompt_too_long"``), so callers need no separate count. ``processor``: the transformers processor,
    whose resize tells which image size the model saw (box conventions); None when unknown.
    ``prepares_prompts``: the engine has ``prepare(request) -> None``, which builds the request's prompt
    (chat template, tokenization, image processing) on the calling thread and keeps it on the request
    (``GenerationRequest.prepared``), raising its input errors (an over-long prompt included) there; a
    later ``generate`` / ``stream`` / ``stream_many`` then only batches and generates, so a server can
    tokenize on another thread than the one the model runs on. ``token_logprobs``: ``generate`` reports
    each generated token's log-probability and its most likely alternatives when a request sets
    ``top_logprobs`` (``GenerationResponse.token_logprobs``); a server refuses ``logprobs`` otherwise.
    ``max_images``: the most images one request may carry (0: a text-only model, e.g. a language-model
    GGUF in llama.cpp, which would otherwise drop images silently); None: no bound known to EMMA.
    """

    in_process: bool = False
    batched_streams: bool = False
    max_batch_size: int | None = None
    max_prompt_tokens: int | None = None
    checks_prompt_tokens: bool = False
    processor: Any = None
    prepares_prompts: bool = False
    token_logprobs: bool = False
    max_images: int | None = None


@runtime_checkable
class Engine(Protocol):
    """A model behind one interface, in-process or remote."""

    @property
    def capabilities(self) -> EngineCapabilities:
        """What this engine can do (see :class:`EngineCapabilities`)."""
        ...

    @property
    def model_name(self) -> str: ...

    @property
    def family(self) -> str | None:
        """Model family (``qwen2_5_vl``, ``idefics3``, ...) for prompt and box conventions; None if unknown."""
        ...

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResponse]:
        """Generate for every request (batched where the backend can); one response per request, in order.

        A failure of one request is reported in its response (``finish_reason="error"``), not raised.
        """
        ...

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        """Yield text deltas as they are generated, the last chunk with the final response.

        Stops early (``finish_reason="cancelled"``) when ``request.cancel`` is set.
        """
        ...

    def count_tokens(self, request: GenerationRequest) -> int:
        """Prompt tokens the request would use (images included where the backend knows)."""
        ...

    def close(self) -> None:
        """Release what the engine holds (connections, threads); the engine is not used afterwards."""
        ...
