"""Request and response types of the Engine interface: every model call in EMMA speaks these."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "cancelled", "error"]
# What kind of failure an error response reports: unusable input (the caller's fault, e.g. a server's
# 400), a prompt over the token bound (input too, with ``prompt_tokens`` set to its length), or a
# failure of the engine itself.
ErrorKind = Literal["input", "prompt_too_long", "engine"]


@dataclass
class TextPart:
    text: str


@dataclass
class ImagePart:
    """A model-ready RGB image (already through emma.io's preprocessing path)."""

    image: Image.Image


@dataclass
class Message:
    role: Role
    content: list[TextPart | ImagePart]

    @classmethod
    def text(cls, role: Role, text: str) -> Message:
        return cls(role=role, content=[TextPart(text)])

    @property
    def images(self) -> list[Image.Image]:
        return [p.image for p in self.content if isinstance(p, ImagePart)]

    @property
    def text_content(self) -> str:
        return "".join(p.text for p in self.content if isinstance(p, TextPart))


# Below this temperature sampling is greedy decoding in all but name (a logit gap of 0.001 already
# weighs e^100), and logits divided by it can overflow float32 to inf, which torch refuses to sample.
MIN_SAMPLING_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # under MIN_SAMPLING_TEMPERATURE (0 included) → greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # Generate exactly max_new_tokens: end-of-sequence tokens are never picked (vLLM's and llama.cpp's
    # ``ignore_eos``; stop strings still end the text). For benchmarks that need a fixed decode length.
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        """Whether this decodes greedily: a temperature under :data:`MIN_SAMPLING_TEMPERATURE` (or NaN)."""
        return not self.temperature >= MIN_SAMPLING_TEMPERATURE

    def batch_key(self) -> tuple[object, ...]:
        """Requests with equal keys can share one batched generation (greedy ignores top_p and seed)."""
        if self.greedy:
            return (self.max_new_tokens, 0.0, 1.0, tuple(self.stop), None, self.ignore_eos)
        return (
            self.max_new_tokens,
            self.temperature,
            self.top_p,
            tuple(self.stop),
            self.seed,
            self.ignore_eos,
        )


@dataclass
class GenerationRequest:
    messages: list[Message]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    cancel: threading.Event = field(default_factory=threading.Event)  # set → stop generating
    # The engine's encoded prompt, made by ``prepare`` off the engine thread (EngineCapabilities
    # ``prepares_prompts``: a server tokenizes and processes images before queueing); None: the engine
    # encodes the request when it generates.
    prepared: Any = field(default=None, repr=False, compare=False)
    # An extra bound on this request's prompt tokens (images included), applied on top of the engine's
    # own by engines that check prompts themselves (``checks_prompt_tokens``); None: the engine's only.
    max_prompt_tokens: int | None = None
    # Words whose log-probability as the FIRST generated token the engine reports in the response's
    # ``word_logprobs`` (e.g. ("yes", "no") for the probability of "yes" behind a classification AUROC).
    # A word stands for every vocabulary token whose text, stripped and lower-cased, equals it.
    logprob_words: tuple[str, ...] = ()
    # Per generated token, its log-probability and the ``top_logprobs`` most likely alternatives at its
    # position (0: the token's own only), reported in ``generate``'s response ``token_logprobs`` by
    # engines whose capabilities say ``token_logprobs`` (streams carry none); None: not asked. It never
    # changes what is generated.
    top_logprobs: int | None = None

    @property
    def images(self) -> list[Image.Image]:
        return [im for m in self.messages for im in m.images]


# vLLM's floor for a log-probability that is -inf (a token the model rules out): JSON has no infinity.
MIN_LOGPROB = -9999.0


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token (or one alternative at its position): id, text as the tokenizer decodes it
    alone (special tokens included, a leading space kept), and log-probability from the model's raw
    logits (before sampling settings), at least :data:`MIN_LOGPROB`. ``top``: the most likely tokens at
    that position, most likely first (empty for an alternative, or when none were asked)."""

    token_id: int
    token: str
    logprob: float
    top: tuple[TokenLogprob, ...] = ()


@dataclass
class GenerationResponse:
    request_id: str
    text: str
    finish_reason: FinishReason
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    first_token_s: float | None = None
    error: str | None = None  # set when finish_reason == "error" (one line, no PHI)
    error_kind: ErrorKind | None = None  # set with ``error`` by engines that classify failures
    # For a request with ``logprob_words``: word → log of the summed probability of its tokens at the
    # first generated position. In-process engines know every word (the full distribution); a remote
    # server reports its top alternatives only, and a word none of whose tokens is among them is absent.
    # None: not asked, or the engine exposes no log-probabilities.
    word_logprobs: dict[str, float] | None = None
    # For a request with ``top_logprobs`` set: one entry per generated token counted in
    # ``completion_tokens``, in order. None: not asked, or the engine cannot report them.
    token_logprobs: list[TokenLogprob] | None = None


@dataclass
class StreamChunk:
    """One streamed delta; the last chunk of a stream carries the final ``response`` (usage, finish)."""

    delta: str
    response: GenerationResponse | None = None
