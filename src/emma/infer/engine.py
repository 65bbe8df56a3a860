"""The Engine interface: ``generate(requests) -> responses`` and token streaming.

Implementations: :class:`emma.infer.transformers_engine.TransformersEngine` (in-process) and
:class:`emma.infer.openai_engine.OpenAIEngine` (any OpenAI-compatible server). Evaluation, annotation
teachers, the CLI and the server all call models only through this interface.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

from emma.infer.types import GenerationRequest, GenerationResponse, StreamChunk


@runtime_checkable
class Engine(Protocol):
    """A model behind one interface, in-process or remote."""

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
