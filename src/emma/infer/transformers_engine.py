"""The in-process Engine: a transformers image-text-to-text model, batched generation and token streaming.

Prompts are built by the processor's own chat template (``{"type": "image"}`` / ``{"type": "text"}``
content parts), one request at a time (:meth:`TransformersEngine.prepare` can do that on another
thread than the one generating), then batched: token tensors left-padded and image tensors
concatenated (zero-padded to a common shape, as the processors pad a batch), so that a batch generates
exactly as each prompt would alone. Control tokens written in message text (``<image>``,
``<|im_start|>``, ...) are defanged with a zero-width space after their first character, so a message
cannot forge image placeholders or turns. (transformers' ``sanitize_control_tokens`` does this only
for some processors: Idefics3's fails with it in transformers 5.x.)

Sampling: ``temperature == 0`` (or under ``MIN_SAMPLING_TEMPERATURE``, 1e-5) is greedy; otherwise sampling with ``temperature`` and ``top_p``, with
no top-k cut unless the model's generation config sets one (a ``top_k`` or repetition penalty there is
kept, as vLLM does; transformers' implicit ``top_k=50`` is not applied). A ``seed`` seeds torch's RNG for that batch inside :func:`torch.random.fork_rng`, so the
caller's global RNG state is left untouched; the same seed and the same batch give the same text
(requests with different seeds are never batched together).

Why one file (~900 lines): preparing prompts, batching, generation, streaming and cancellation share
the model, its processor and one lock; each family's differences are data in model/families.py.
"""

from __future__ import annotations

import copy
import queue
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from emma.errors import InputError, require_at_least
from emma.infer.engine import EngineCapabilities
from emma.infer.types import (
    MIN_LOGPROB,
    ErrorKind,
    FinishReason,
    GenerationRequest,
    GenerationResponse,
    ImagePart,
    Message,
    SamplingParams,
    StreamChunk,
    TextPart,
    TokenLogprob,
)
from emma.model.registry import LoadedModel

_MAX_ERROR_CHARS = 200
_ZWSP = "\u200b"

# Families whose answers carry boxes in special tokens: those survive decoding, other specials do not.
_KEEP_SPECIAL: dict[str, tuple[str, ...]] = {
    "qwen2_vl": ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"),
}


class PromptTooLongError(InputError):
    """A prompt over the token bound (the engine's own or the request's ``max_prompt_tokens``)."""

    def __init__(self, n_tokens: int, limit: int) -> None:
        super().__init__(f"the prompt has {n_tokens} tokens (images included), over the limit of {limit}")
        self.n_tokens = n_tokens
        self.limit = limit


def _error_kind(exc: BaseException) -> ErrorKind:
    if isinstance(exc, PromptTooLongError):
        return "prompt_too_long"
    return "input" if isinstance(exc, InputError) else "engine"


def _prompt_limit(own: int | None, requested: int | None) -> int | None:
    bounds = [b for b in (own, requested) if b is not None]
    return min(bounds) if bounds else None


def error_line(exc: BaseException) -> str:
    """One line naming the failure; library messages carry no PHI, and request content is never echoed."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text[:_MAX_ERROR_CHARS]


def _is_unicode(text: str) -> bool:
    """Whether ``text`` is encodable (a Python str can hold lone surrogates, which no encoder takes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _RowStopper(StoppingCriteria):
    """Stops each row whose request is cancelled (or whose stream was abandoned); records where."""

    def __init__(
        self, requests: Sequence[GenerationRequest], prompt_len: int, abandon: threading.Event | None = None
    ):
        self.requests = list(requests)
        self.prompt_len = prompt_len
        self.abandon = abandon
        self.cancelled_at: dict[int, int] = {}

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None = None, **kwargs: Any
    ) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        abandoned = self.abandon is not None and self.abandon.is_set()
        for row, request in enumerate(self.requests):
            if abandoned or request.cancel.is_set():
                self.cancelled_at.setdefault(row, input_ids.shape[1] - self.prompt_len)
                done[row] = True
        return done  # type: ignore[return-value]


class _StepQueue(BaseStreamer):
    """Hands each generation step's tokens (one per row) to the consuming thread; skips the prompt.
    ``None`` marks the end (generate calls :meth:`end`; the worker calls it again after a failure)."""

    def __init__(self) -> None:
        self.steps: queue.SimpleQueue[list[int] | None] = queue.SimpleQueue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.steps.put([int(t) for t in value.reshape(-1).tolist()])

    def end(self) -> None:
        self.steps.put(None)


@dataclass
class _Row:
    """One streaming request's progress: tokens so far, text already sent, whether it has ended."""

    request: GenerationRequest
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    sent: str = ""
    first_token_s: float | None = None
    done: bool = False


class _FirstTokenClock(BaseStreamer):
    """Records when the first generated token (after the prompt) arrives."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.prompt_seen = False
        self.first_token_s: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
        elif self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.start

    def end(self) -> None:
        pass


class _LogprobRecorder(LogitsProcessor):
    """Each generation step's log-probabilities from the model's raw logits (what ``generate`` keeps with
    ``output_logits``: before any logits processor or sampling setting), held small. A forward hook on
    the model (:meth:`hook`) keeps the latest forward's last-position logits; as a logits processor,
    called once per step, the recorder takes them as that step's distribution (a chunked prefill's
    earlier forwards are thus skipped) and leaves the scores as they are. Per step it keeps the ``k``
    most likely tokens and, once the token chosen there is known (the last input id of the next step;
    the last step's from the sequences, in :meth:`finish`), that token's log-probability; the whole
    first-step distribution only with ``keep_first`` (``logprob_words``). So at most one step's full
    distribution is held, however long the answer (``output_logits`` would hold every step's)."""

    def __init__(self, k: int, *, keep_first: bool) -> None:
        self.k = k
        self.keep_first = keep_first
        self.first: torch.Tensor | None = None  # (batch, vocab) log-probabilities of the first step
        self.top: list[tuple[torch.Tensor, torch.Tensor]] = []  # per step: (values, ids), (batch, k)
        self.chosen: list[torch.Tensor] = []  # per step: (batch,) log-probability of the chosen token
        self._latest: torch.Tensor | None = None  # the last forward's log-probabilities
        self._pending: torch.Tensor | None = None  # the last step's, until its chosen token is known

    def hook(self, module: Any, args: tuple[Any, ...], output: Any) -> None:
        """``register_forward_hook`` on the model that ``generate`` calls."""
        logits = output.logits if hasattr(output, "logits") else output[0]
        self._latest = torch.log_softmax(logits[:, -1].float(), dim=-1)  # a new tensor, not a view

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._latest is None:
            raise RuntimeError("no logits were seen for this generation step")
        if self._pending is not None:
            self._resolve(input_ids[:, -1])
        logp, self._latest = self._latest, None
        if self.keep_first and self.first is None:
            self.first = logp
        if self.k:
            values, ids = logp.topk(min(self.k, int(logp.shape[-1])), dim=-1)
            self.top.append((values.cpu(), ids.cpu()))
        self._pending = logp
        return scores

    def _resolve(self, tokens: torch.Tensor) -> None:
        assert self._pending is not None
        logp, self._pending = self._pending, None
        self.chosen.append(logp.gather(-1, tokens.to(logp.device).view(-1, 1)).squeeze(-1).cpu())

    def finish(self, sequences: torch.Tensor, prompt_len: int) -> None:
        """The last step's chosen tokens, from the generated ``sequences``."""
        if self._pending is not None and prompt_len + len(self.chosen) < sequences.shape[1]:
            self._resolve(sequences[:, prompt_len + len(self.chosen)])
        self._pending = self._latest = None


@dataclass
class _Encoded:
    inputs: dict[str, Any]
    prompt_tokens: list[int]

    @property
    def prompt_len(self) -> int:
        return int(self.inputs["input_ids"].shape[1])


# Processor outputs laid out (1, prompt length), left-padded in a batch; every other tensor is per image
# (or per image patch) and is concatenated along its first dimension.
_SEQUENCE_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"})


@dataclass(eq=False)
class _Prepared:
    """One request's prompt as its processor made it alone (a batch of one, on the CPU)."""

    engine_id: int
    inputs: dict[str, Any]
    prompt_tokens: int

    @property
    def layout(self) -> tuple[str, ...]:
        """The processor outputs it has: requests with the same layout can be batched."""
        return tuple(sorted(self.inputs))


def _left_pad(tensors: Sequence[torch.Tensor], value: int) -> torch.Tensor:
    length = max(int(t.shape[1]) for t in tensors)
    rows = [
        torch.nn.functional.pad(t, (length - int(t.shape[1]), 0), value=value) if t.shape[1] < length else t
        for t in tensors
    ]
    return torch.cat(rows, dim=0)


def _stack_images(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-image tensors of several requests along their first dimension, every other dimension
    zero-padded at its end to the largest (as processors pad images, tiles or patch lists in a batch)."""
    if len({t.dim() for t in tensors}) != 1:
        raise ValueError("image tensors of different ranks cannot be batched")
    dims = tensors[0].dim()
    if dims == 0:
        return torch.stack(list(tensors))
    top = [max(int(t.shape[d]) for t in tensors) for d in range(1, dims)]
    padded = []
    for t in tensors:
        pad: list[int] = []
        for d in range(dims - 1, 0, -1):  # F.pad lists the last dimension first
            pad += [0, top[d - 1] - int(t.shape[d])]
        padded.append(torch.nn.functional.pad(t, pad) if any(pad) else t)
    return torch.cat(padded, dim=0)


def _collate(prepared: Sequence[_Prepared], pad_id: int | None) -> dict[str, Any]:
    """The batch the processor would have made of these requests (they share one layout)."""
    if len(prepared) == 1:
        return dict(prepared[0].inputs)
    if len({p.layout for p in prepared}) != 1:
        raise ValueError("requests with different processor outputs cannot be batched")
    out: dict[str, Any] = {}
    for key in prepared[0].inputs:
        values = [p.inputs[key] for p in prepared]
        if not all(isinstance(v, torch.Tensor) for v in values):
            raise ValueError(f"processor output {key!r} is not a tensor")
        if key in _SEQUENCE_KEYS:
            out[key] = _left_pad(values, (pad_id or 0) if key == "input_ids" else 0)
        else:
            out[key] = _stack_images(values)
    return out


class TransformersEngine:
    """A loaded transformers VLM behind the :class:`~emma.infer.engine.Engine` interface.

    ``max_batch_size`` bounds one ``model.generate`` call; ``max_prompt_tokens`` bounds a prompt (images
    included), by default the model's context length when its config states one, and a request's own
    ``max_prompt_tokens`` can lower it. Prompts are checked while they are built, before any token is
    generated (``checks_prompt_tokens``): an over-long prompt raises :class:`PromptTooLongError` from
    :meth:`stream` and :meth:`count_tokens`, and is an error response with
    ``error_kind="prompt_too_long"`` (``prompt_tokens`` = its length) from :meth:`generate`, so callers
    need not count first. One lock serialises generation on the model, so concurrent callers are safe.
    """

    checks_prompt_tokens = True

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_batch_size: int = 8,
        max_prompt_tokens: int | None = None,
    ) -> None:
        require_at_least("max_batch_size", max_batch_size, 1)
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
        self.max_batch_size = max_batch_size
        self.max_prompt_tokens = max_prompt_tokens or self._context_length()
        self._lock = threading.Lock()
        spec = self._family_spec()
        self._system_role = bool(getattr(spec, "supports_system_role", True)) if spec is not None else True
        self._max_images: int | None = getattr(spec, "max_images", None) if spec is not None else None
        self._eos_ids = self._eos_token_ids()
        self._drop_ids = self._special_ids_to_drop()
        self._control_re = self._control_tokens_re(spec)
        self._vocab_texts: list[str] | None = None  # token id → its text decoded alone
        self._word_index: dict[str, list[int]] | None = None  # token text (stripped, lower) → ids

    # ------------------------------------------------------------------------------ properties

    @property
    def model_name(self) -> str:
        return self.loaded.name

    @property
    def family(self) -> str | None:
        return self.loaded.family or None

    # --------------------------------------------------------------------------------- set-up

    def _family_spec(self) -> Any:
        from emma.model import families

        if not self.loaded.family:
            return None
        try:
            return families.get_family(self.loaded.family)
        except (KeyError, ValueError):
            return None

    def _context_length(self) -> int | None:
        config = self.model.config
        text_config = getattr(config, "get_text_config", lambda: config)()
        for name in ("max_position_embeddings", "max_sequence_length", "seq_length"):
            value = getattr(text_config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def _eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        for value in eos if isinstance(eos, list) else [eos]:
            if value is not None:
                ids.add(int(value))
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    def _control_tokens_re(self, spec: Any) -> re.Pattern[str] | None:
        tokens: set[str] = set(getattr(self.tokenizer, "all_special_tokens", []) or [])
        decoder = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        tokens |= {str(tok) for tok in decoder.values() if getattr(tok, "special", False)}
        tokens |= set(getattr(spec, "image_tokens", ()) or ())
        for name in ("image_token", "boi_token", "eoi_token", "fake_image_token", "global_image_token"):
            value = getattr(self.processor, name, None)
            if isinstance(value, str):
                tokens.add(value)
        tokens = {t for t in tokens if len(t) >= 2}
        if not tokens:
            return None
        return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))

    def _defang(self, text: str, *, keep_box_tokens: bool = False) -> str:
        """Break every control token in ``text``; with ``keep_box_tokens`` (the model's own answers),
        the family's box tokens stay intact so the model reads its earlier boxes as it wrote them."""
        if self._control_re is None:
            return text
        keep = _KEEP_SPECIAL.get(self.loaded.family or "", ()) if keep_box_tokens else ()

        def breaks(match: re.Match[str]) -> str:
            token = match.group(0)
            return token if token in keep else token[0] + _ZWSP + token[1:]

        return self._control_re.sub(breaks, text)

    def _special_ids_to_drop(self) -> frozenset[int] | None:
        """For families in ``_KEEP_SPECIAL``: every special token id except the kept ones; else None."""
        keep = _KEEP_SPECIAL.get(self.loaded.family or "")
        if not keep:
            return None
        keep_ids = {self.tokenizer.convert_tokens_to_ids(t) for t in keep}
        keep_ids = {
            i for i in keep_ids if isinstance(i, int) and self.tokenizer.convert_ids_to_tokens(i) in keep
        }
        special = set(getattr(self.tokenizer, "all_special_ids", []))
        decoder = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        special |= {i for i, tok in decoder.items() if getattr(tok, "special", False)}
        return frozenset(special - keep_ids)

    @property
    def _pad_id(self) -> int | None:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.model.generation_config, "pad_token_id", None)
        if pad is None and self._eos_ids:
            pad = min(self._eos_ids)
        return pad

    # ------------------------------------------------------------------------------ prompts

    def conversation(self, messages: Sequence[Message]) -> list[dict[str, Any]]:
        """Messages in the processor's chat-template shape; system text folded into the first user turn
        for families whose template has no system role."""
        if not messages:
            raise InputError("a request needs at least one message")
        if not all(_is_unicode(p.text) for m in messages for p in m.content if isinstance(p, TextPart)):
            # e.g. a JSON "\ud800" escape, or undecodable bytes in argv: the tokenizer would fail on it
            raise InputError("the message text is not valid Unicode (a lone surrogate)")
        system = [m.text_content for m in messages if m.role == "system"]
        out: list[dict[str, Any]] = []
        for m in messages:
            if m.role == "system" and not self._system_role:
                continue
            parts: list[dict[str, Any]] = []
            for p in m.content:
                if isinstance(p, ImagePart):
                    if m.role != "user":
                        raise InputError(
                            f"images are accepted in user messages only, not in a {m.role} message"
                        )
                    image = p.image if p.image.mode == "RGB" else p.image.convert("RGB")
                    parts.append({"type": "image", "image": image})
                elif isinstance(p, TextPart):
                    text = self._defang(p.text, keep_box_tokens=m.role == "assistant")
                    parts.append({"type": "text", "text": text})
            out.append({"role": m.role, "content": parts})
        if system and not self._system_role:
            folded = self._defang("\n\n".join(t for t in system if t))
            first_user = next((m for m in out if m["role"] == "user"), None)
            if first_user is None:
                raise InputError("a request needs a user message")
            if folded:
                first_user["content"] = [{"type": "text", "text": folded + "\n\n"}, *first_user["content"]]
        if not out or out[-1]["role"] != "user":
            raise InputError("the last message must be a user message")
        return out

    def _check_images(self, request: GenerationRequest) -> None:
        n = len(request.images)
        if self._max_images is not None and n > self._max_images:
            raise InputError(f"{n} images in one request, over the model's limit of {self._max_images}")

    def _prepare(self, request: GenerationRequest) -> _Prepared:
        """Build one request's prompt: chat template, tokenization and image processing, bounded."""
        self._check_images(request)
        conversation = self.conversation(request.messages)
        try:
            inputs = self.processor.apply_chat_template(
                [conversation],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                processor_kwargs={"return_tensors": "pt"},
            )
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise InputError(f"cannot build the prompt: {error_line(exc)}") from None
        n = int(inputs["attention_mask"].sum())
        limit = _prompt_limit(self.max_prompt_tokens, request.max_prompt_tokens)
        if limit is not None and n > limit:
            raise PromptTooLongError(n, limit)
        return _Prepared(id(self), dict(inputs), n)

    def prepare(self, request: GenerationRequest) -> None:
        """Build ``request``'s prompt now, on the calling thread, and keep it on the request for a later
        ``generate`` / ``stream`` / ``stream_many`` (which then only batch and generate). Raises
        InputError for unusable input and :class:`PromptTooLongError` over the bound (the engine's, or
        the request's ``max_prompt_tokens``)."""
        request.prepared = self._prepare(request)

    def _prepared(self, request: GenerationRequest) -> _Prepared:
        """The request's prompt made by :meth:`prepare` for this engine, else built now (not kept)."""
        ready = request.prepared
        if isinstance(ready, _Prepared) and ready.engine_id == id(self):
            return ready
        return self._prepare(request)

    def _encode(
        self, requests: Sequence[GenerationRequest], prepared: Sequence[_Prepared] | None = None
    ) -> _Encoded:
        """The batch of ``requests`` (their prompts prepared, or built now), on the model's device."""
        parts = list(prepared) if prepared is not None else [self._prepared(r) for r in requests]
        inputs = _collate(parts, self._pad_id)
        device = getattr(self.model, "device", None)
        dtype = getattr(self.model, "dtype", None)
        moved: dict[str, Any] = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor):
                value = value.to(device) if device is not None else value
                if value.is_floating_point() and dtype is not None:
                    value = value.to(dtype)
            moved[key] = value
        return _Encoded(moved, [p.prompt_tokens for p in parts])

    @property
    def capabilities(self) -> EngineCapabilities:
        return EngineCapabilities(
            in_process=True,
            batched_streams=True,
            max_batch_size=self.max_batch_size,
            max_prompt_tokens=self.max_prompt_tokens,
            checks_prompt_tokens=self.checks_prompt_tokens,
            processor=self.processor,
            prepares_prompts=True,
            token_logprobs=True,
        )

    def close(self) -> None:
        """Nothing to release: the model is freed with the engine."""

    def count_tokens(self, request: GenerationRequest) -> int:
        """Prompt tokens of ``request``, image tokens included (raises InputError over the bound)."""
        return self._prepared(request).prompt_tokens

    # --------------------------------------------------------------------------- generation

    def _generation_config(self, sampling: SamplingParams) -> GenerationConfig:
        config = copy.deepcopy(self.model.generation_config)
        if sampling.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {sampling.max_new_tokens}")
        config.max_new_tokens = sampling.max_new_tokens
        config.max_length = None
        config.num_beams = 1
        config.num_return_sequences = 1
        config.pad_token_id = self._pad_id
        if sampling.greedy:
            config.do_sample = False
            config.temperature = None
            config.top_p = None
            config.top_k = None
        else:
            config.do_sample = True
            config.temperature = float(sampling.temperature)
            config.top_p = float(sampling.top_p)
            if config.top_k is None:
                config.top_k = 0  # OpenAI semantics: no top-k unless the model's config sets one (not 50)
        config.stop_strings = list(sampling.stop) or None
        if sampling.ignore_eos:  # every end-of-sequence id the engine knows is masked until the last token
            config.eos_token_id = sorted(self._eos_ids) or None
            config.min_new_tokens = sampling.max_new_tokens
        return config

    def _run(
        self,
        encoded: _Encoded,
        sampling: SamplingParams,
        stopper: _RowStopper,
        streamer: BaseStreamer,
        recorder: _LogprobRecorder | None = None,
    ) -> torch.Tensor:
        """The generated sequences; a ``recorder`` gets every step's log-probabilities."""
        config = self._generation_config(sampling)
        kwargs: dict[str, Any] = {
            **encoded.inputs,
            "generation_config": config,
            "stopping_criteria": StoppingCriteriaList([stopper]),
            "streamer": streamer,
        }
        if config.stop_strings:
            kwargs["tokenizer"] = self.tokenizer
        if recorder is not None:
            kwargs["logits_processor"] = LogitsProcessorList([recorder])
        sequences = self._generate(kwargs, sampling, recorder)
        if recorder is not None:
            recorder.finish(sequences, encoded.prompt_len)
        return sequences

    def _generate(
        self, kwargs: dict[str, Any], sampling: SamplingParams, recorder: _LogprobRecorder | None
    ) -> torch.Tensor:
        with self._lock, torch.inference_mode():
            # The hook lives only while this call holds the lock, so no other call sees it.
            hook = self.model.register_forward_hook(recorder.hook) if recorder else None
            try:
                if not sampling.greedy and sampling.seed is not None:
                    devices = (
                        [self.model.device] if getattr(self.model.device, "type", "cpu") == "cuda" else []
                    )
                    with torch.random.fork_rng(devices=devices):
                        torch.manual_seed(sampling.seed)
                        return self.model.generate(**kwargs)
                return self.model.generate(**kwargs)
            finally:
                if hook is not None:
                    hook.remove()

    def _token_texts(self) -> list[str]:
        """Every vocabulary id's text decoded alone (special tokens included), built once."""
        if self._vocab_texts is None:
            self._vocab_texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
        return self._vocab_texts

    def word_token_ids(self, word: str) -> list[int]:
        """Vocabulary ids whose decoded text, stripped and lower-cased, is ``word`` (stripped, lower-cased)
        (``"yes"`` → the ids of ``yes``, ``Yes``, `` Yes``, ``YES``, ...). The index is built once."""
        if self._word_index is None:
            index: dict[str, list[int]] = {}
            for i, text in enumerate(self._token_texts()):
                key = text.strip().lower()
                if key:
                    index.setdefault(key, []).append(i)
            self._word_index = index
        return self._word_index.get(word.strip().lower(), [])

    def _word_logprobs(self, request: GenerationRequest, logp: torch.Tensor) -> dict[str, float] | None:
        """``request.logprob_words`` → log of the summed probability of each word's tokens, from the
        log-probabilities (of the raw logits) at the first generated position (a word with no token in
        the vocabulary is absent)."""
        if not request.logprob_words:
            return None
        out: dict[str, float] = {}
        for word in request.logprob_words:
            ids = [i for i in self.word_token_ids(word) if i < logp.shape[-1]]
            if ids:
                out[word] = float(torch.logsumexp(logp[ids], dim=0))
        return out

    def _token_logprobs(
        self, recorder: _LogprobRecorder, row: int, tokens: Sequence[int], k: int
    ) -> list[TokenLogprob]:
        """The recorded log-probabilities of ``tokens`` (the first generated tokens of batch ``row``),
        each with its ``k`` most likely alternatives."""
        texts = self._token_texts()

        def entry(token_id: int, logprob: float, top: tuple[TokenLogprob, ...] = ()) -> TokenLogprob:
            text = texts[token_id] if 0 <= token_id < len(texts) else ""
            value = logprob if logprob >= MIN_LOGPROB else MIN_LOGPROB  # -inf (and NaN) → the floor
            return TokenLogprob(token_id, text, value, top)

        out = []
        for step, token in enumerate(tokens):
            top: tuple[TokenLogprob, ...] = ()
            if k:  # then the recorder kept at least k alternatives per step
                values, ids = recorder.top[step]
                top = tuple(entry(i, v) for v, i in zip(values[row, :k].tolist(), ids[row, :k].tolist()))
            out.append(entry(token, float(recorder.chosen[step][row]), top))
        return out

    def decode(self, tokens: Sequence[int]) -> str:
        """Generated token ids → text: special tokens removed, except the box tokens of families that
        write boxes with them (Qwen2-VL)."""
        if self._drop_ids is None:
            return self.tokenizer.decode(list(tokens), skip_special_tokens=True)
        return self.tokenizer.decode(
            [t for t in tokens if t not in self._drop_ids], skip_special_tokens=False
        )

    def _finalize(
        self,
        request: GenerationRequest,
        generated: list[int],
        prompt_tokens: int,
        cancelled_at: int | None,
        start: float,
        first_token_s: float | None,
    ) -> GenerationResponse:
        eos_at = next((i for i, t in enumerate(generated) if t in self._eos_ids), None)
        if eos_at is not None and (cancelled_at is None or eos_at < cancelled_at):
            body, finish, counted = generated[:eos_at], "stop", eos_at + 1
        elif cancelled_at is not None:
            body, finish, counted = generated[:cancelled_at], "cancelled", cancelled_at
        else:
            body = generated
            finish = "length" if len(generated) >= request.sampling.max_new_tokens else "stop"
            counted = len(generated)
        text = self.decode(body)
        cut = _first_stop(text, request.sampling.stop)
        if cut is not None:
            text, finish = text[:cut], "stop"
            counted = self._tokens_until_stop(body, request.sampling.stop)
        reason: FinishReason = finish  # type: ignore[assignment]
        return GenerationResponse(
            request_id=request.request_id,
            text=text,
            finish_reason=reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=counted,
            latency_s=time.perf_counter() - start,
            first_token_s=first_token_s,
        )

    def _tokens_until_stop(self, body: list[int], stops: Sequence[str]) -> int:
        """Fewest generated tokens whose text contains a stop string (binary search over prefixes)."""
        lo, hi = 1, len(body)
        while lo < hi:
            mid = (lo + hi) // 2
            if _first_stop(self.decode(body[:mid]), stops) is not None:
                hi = mid
            else:
                lo = mid + 1
        return hi

    def _generate_batch(self, batch: Sequence[GenerationRequest]) -> list[GenerationResponse]:
        start = time.perf_counter()
        encoded = self._encode(batch)
        stopper = _RowStopper(batch, encoded.prompt_len)
        clock = _FirstTokenClock(start)
        asked = [r.top_logprobs for r in batch if r.top_logprobs is not None]
        if any(k < 0 for k in asked):
            raise InputError("top_logprobs must be 0 or more")
        recorder = (
            _LogprobRecorder(max(asked, default=0), keep_first=any(r.logprob_words for r in batch))
            if asked or any(r.logprob_words for r in batch)
            else None
        )
        sequences = self._run(encoded, batch[0].sampling, stopper, clock, recorder)
        out = []
        for row, request in enumerate(batch):
            generated = sequences[row, encoded.prompt_len :].tolist()
            response = self._finalize(
                request,
                generated,
                encoded.prompt_tokens[row],
                stopper.cancelled_at.get(row),
                start,
                clock.first_token_s,
            )
            if recorder is not None and recorder.first is not None:
                response.word_logprobs = self._word_logprobs(request, recorder.first[row])
            if recorder is not None and request.top_logprobs is not None:
                counted = generated[: response.completion_tokens]
                response.token_logprobs = self._token_logprobs(recorder, row, counted, request.top_logprobs)
            out.append(response)
        return out

    def _error(self, request: GenerationRequest, exc: BaseException, start: float) -> GenerationResponse:
        return GenerationResponse(
            request.request_id,
            "",
            "error",
            prompt_tokens=exc.n_tokens if isinstance(exc, PromptTooLongError) else 0,
            latency_s=time.perf_counter() - start,
            error=error_line(exc),
            error_kind=_error_kind(exc),
        )

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResponse]:
        """One response per request, in order.

        Requests with the same sampling settings are batched (up to ``max_batch_size``), one
        ``model.generate`` per batch. If a batch fails, its requests are retried one by one so that only
        the failing request reports ``finish_reason="error"``.
        """
        results: dict[int, GenerationResponse] = {}
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, request in enumerate(requests):
            if request.cancel.is_set():
                results[i] = GenerationResponse(request.request_id, "", "cancelled")
                continue
            groups.setdefault(request.sampling.batch_key(), []).append(i)
        for indices in groups.values():
            for at in range(0, len(indices), self.max_batch_size):
                chunk = indices[at : at + self.max_batch_size]
                batch = [requests[i] for i in chunk]
                try:
                    for i, response in zip(chunk, self._generate_batch(batch), strict=True):
                        results[i] = response
                except Exception as exc:  # noqa: BLE001 — isolate the failing request
                    if len(batch) == 1:
                        results[chunk[0]] = self._error(batch[0], exc, time.perf_counter())
                        continue
                    for i in chunk:
                        start = time.perf_counter()
                        try:
                            results[i] = self._generate_batch([requests[i]])[0]
                        except Exception as single_exc:  # noqa: BLE001
                            results[i] = self._error(requests[i], single_exc, start)
        return [results[i] for i in range(len(requests))]

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        """Text deltas as tokens are generated; the last chunk carries the final response.

        Generation runs in a background thread; setting ``request.cancel`` (or closing this iterator)
        stops it at the next token, and the thread is always joined before this generator finishes.
        Text is held back just enough never to emit part of a stop string (or of a character).
        Unusable input raises :class:`InputError` before anything is yielded.
        """
        start = time.perf_counter()
        encoded = self._encode([request])
        for _, chunk in self._stream_rows([request], encoded, start):
            yield chunk

    def stream_many(self, requests: Sequence[GenerationRequest]) -> Iterator[tuple[int, StreamChunk]]:
        """Stream several requests as one batch: ``(index, chunk)`` pairs, interleaved as tokens come.

        Each request's chunks are what :meth:`stream` would give it alone (greedy text identical), and
        its last chunk (with the final response) comes as soon as that request ends, not when the batch
        does. Requests must share their sampling settings (``SamplingParams.batch_key``) and number at
        most ``max_batch_size``. Unusable input fails only its own request, with an error response
        (``error_kind`` "input" or "prompt_too_long") as its only chunk; a cancelled request ends with
        ``finish_reason="cancelled"`` while the others go on.
        """
        if not requests:
            return
        if len({r.sampling.batch_key() for r in requests}) != 1:
            raise ValueError("stream_many needs requests with the same sampling settings")
        if len(requests) > self.max_batch_size:
            raise ValueError(f"{len(requests)} requests, over max_batch_size {self.max_batch_size}")
        start = time.perf_counter()
        ready: dict[int, _Prepared] = {}
        for i, request in enumerate(requests):
            if request.cancel.is_set():
                yield i, StreamChunk("", GenerationResponse(request.request_id, "", "cancelled"))
                continue
            try:
                ready[i] = self._prepared(request)
            except InputError as exc:  # fails its own request only
                yield i, StreamChunk("", self._error(request, exc, start))
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, part in ready.items():
            groups.setdefault(part.layout, []).append(i)
        # One batch per processor layout (e.g. requests with and without images): run one after another.
        for live in groups.values():
            encoded = self._encode([requests[i] for i in live], [ready[i] for i in live])
            for row, chunk in self._stream_rows([requests[i] for i in live], encoded, start):
                yield live[row], chunk

    def _stream_rows(
        self, requests: Sequence[GenerationRequest], encoded: _Encoded, start: float
    ) -> Iterator[tuple[int, StreamChunk]]:
        """Generate ``requests`` as one batch in a background thread, yielding ``(row, chunk)``."""
        abandon = threading.Event()
        stopper = _RowStopper(requests, encoded.prompt_len, abandon)
        steps = _StepQueue()
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["sequences"] = self._run(encoded, requests[0].sampling, stopper, steps)
            except Exception as exc:  # noqa: BLE001 — reported in the final chunks
                outcome["error"] = exc
            finally:
                steps.end()

        rows = [_Row(r, n) for r, n in zip(requests, encoded.prompt_tokens, strict=True)]
        thread = threading.Thread(target=work, name="emma-generate", daemon=True)
        thread.start()
        try:
            while (step := steps.steps.get()) is not None:
                for i, (row, token) in enumerate(zip(rows, step, strict=True)):
                    if not row.done:
                        row.tokens.append(token)
                        for chunk in self._advance(row, stopper.cancelled_at.get(i), start):
                            yield i, chunk
        finally:
            abandon.set()  # no-op when generation already ended; stops it when the caller went away
            thread.join()
        for i, row in enumerate(rows):
            if row.done:
                continue
            if "error" in outcome:
                yield i, StreamChunk("", self._error(row.request, outcome["error"], start))
                continue
            generated = outcome["sequences"][i, encoded.prompt_len :].tolist()
            for chunk in self._close_row(row, generated, stopper.cancelled_at.get(i), start):
                yield i, chunk

    def _advance(self, row: _Row, cancelled_at: int | None, start: float) -> Iterator[StreamChunk]:
        """A row got a token: send its new text (held back before a possible stop string or a partial
        character), or end the row at its end-of-sequence token, stop string or cancellation."""
        if row.tokens[-1] in self._eos_ids or (cancelled_at is not None and len(row.tokens) >= cancelled_at):
            yield from self._close_row(row, row.tokens, cancelled_at, start)
            return
        stops = row.request.sampling.stop
        text = self.decode(row.tokens)
        if _first_stop(text, stops) is not None:
            yield from self._close_row(row, row.tokens, None, start)
            return
        hold = max((len(s) for s in stops), default=1) - 1
        limit = min(len(text) - hold, len(text.rstrip("\ufffd")))
        if limit > len(row.sent) and text.startswith(row.sent):
            if row.first_token_s is None:
                row.first_token_s = time.perf_counter() - start
            delta = text[len(row.sent) : limit]
            row.sent += delta
            yield StreamChunk(delta)

    def _close_row(
        self, row: _Row, generated: list[int], cancelled_at: int | None, start: float
    ) -> Iterator[StreamChunk]:
        """The row's remaining text (if the final text extends what was sent) and its final chunk."""
        row.done = True
        final = self._finalize(
            row.request, generated, row.prompt_tokens, cancelled_at, start, row.first_token_s
        )
        if final.text.startswith(row.sent) and len(final.text) > len(row.sent):
            yield StreamChunk(final.text[len(row.sent) :])
        if final.first_token_s is None and final.text:
            final.first_token_s = time.perf_counter() - start
        yield StreamChunk("", final)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest stop string in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None
