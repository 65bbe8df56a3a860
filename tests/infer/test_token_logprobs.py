"""Per-token log-probabilities of the in-process engine (``GenerationRequest.top_logprobs``), checked
against log_softmax of the tiny model's own logits from plain forward passes (no generate, no batch)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image

from emma.infer.transformers_engine import TransformersEngine
from emma.infer.types import GenerationRequest, ImagePart, Message, SamplingParams, TextPart
from emma.model.tiny_families import load_tiny

TOL = 1e-4


@pytest.fixture(scope="module")
def engine() -> TransformersEngine:
    return TransformersEngine(load_tiny("llava"), max_batch_size=4)


def _request(text: str, *, top: int | None, image: bool = True, **sampling: Any) -> GenerationRequest:
    content: list[TextPart | ImagePart] = [TextPart(text)]
    if image:
        content.insert(0, ImagePart(Image.new("RGB", (32, 32), (90, 40, 40))))
    return GenerationRequest(
        [Message("user", content)], SamplingParams(max_new_tokens=4, **sampling), top_logprobs=top
    )


def _forward_logprobs(
    engine: TransformersEngine, request: GenerationRequest, tokens: list[int]
) -> torch.Tensor:
    """(len(tokens), vocab): log_softmax of the logits at each generated position, by one forward pass
    over the prompt followed by the generated tokens."""
    inputs = engine.processor.apply_chat_template(
        [engine.conversation(request.messages)],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    n = int(inputs["input_ids"].shape[1])
    extra = torch.tensor([tokens[:-1]], dtype=inputs["input_ids"].dtype)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with torch.inference_mode():
        logits = engine.model(**inputs).logits[0, n - 1 :].float()
    return torch.log_softmax(logits, dim=-1)


def test_greedy_token_logprobs_are_the_model_log_softmax(engine: TransformersEngine) -> None:
    request = _request("Is there an effusion?", top=5)
    (response,) = engine.generate([request])
    entries = response.token_logprobs
    assert entries is not None and len(entries) == response.completion_tokens == 4
    tokens = [e.token_id for e in entries]
    assert engine.decode(tokens) == response.text
    expected = _forward_logprobs(engine, request, tokens)
    for step, entry in enumerate(entries):
        values, ids = expected[step].topk(5)
        assert [a.token_id for a in entry.top] == ids.tolist()
        assert [a.logprob for a in entry.top] == pytest.approx(values.tolist(), abs=TOL)
        assert entry.logprob == pytest.approx(float(expected[step, entry.token_id]), abs=TOL)
        assert entry.token_id == entry.top[0].token_id  # greedy: the most likely token
        assert entry.token == engine.tokenizer.decode([entry.token_id])
        assert all(a.token == engine.tokenizer.decode([a.token_id]) and not a.top for a in entry.top)
    # asking changes nothing about the answer
    (plain,) = engine.generate([_request("Is there an effusion?", top=None)])
    assert plain.text == response.text and plain.token_logprobs is None


def test_sampled_tokens_get_their_raw_logprob_not_the_tempered_one(engine: TransformersEngine) -> None:
    request = _request("Describe the image.", top=0, temperature=2.0, seed=7, image=False)
    (response,) = engine.generate([request])
    entries = response.token_logprobs
    assert entries is not None and len(entries) == response.completion_tokens
    expected = _forward_logprobs(engine, request, [e.token_id for e in entries])
    for step, entry in enumerate(entries):
        assert entry.top == ()  # top_logprobs=0: the chosen token only
        assert entry.logprob == pytest.approx(float(expected[step, entry.token_id]), abs=TOL)
    # at temperature 2 a random tiny model picks tokens well below the most likely one
    assert any(entry.logprob < float(expected[s].max()) - 0.1 for s, entry in enumerate(entries))


def test_logprobs_come_before_the_model_config_logits_processors(engine: TransformersEngine) -> None:
    """A repetition penalty in the model's generation config changes the scores generate picks from,
    not the reported log-probabilities (raw logits, as vLLM reports them)."""
    config = engine.model.generation_config
    saved = config.repetition_penalty
    config.repetition_penalty = 3.0
    try:
        request = _request("Is there an effusion?", top=2)
        (response,) = engine.generate([request])
    finally:
        config.repetition_penalty = saved
    entries = response.token_logprobs
    assert entries is not None and len(entries) == 4
    expected = _forward_logprobs(engine, request, [e.token_id for e in entries])
    for step, entry in enumerate(entries):
        assert entry.logprob == pytest.approx(float(expected[step, entry.token_id]), abs=TOL)
        assert [a.logprob for a in entry.top] == pytest.approx(
            expected[step].topk(2).values.tolist(), abs=TOL
        )
    # the penalty made generate leave the raw favourite at least once after the first token
    assert any(e.token_id != e.top[0].token_id for e in entries[1:])


def test_batched_requests_each_get_their_own_alternatives(engine: TransformersEngine) -> None:
    asks = [
        _request("Is there an effusion?", top=3),
        _request("Any fracture?", top=None),
        _request("Where is the lesion?", top=0),
    ]
    asks[0].logprob_words = ("yes", "no")
    batched = engine.generate(asks)
    alone = [engine.generate([_request(r.messages[0].text_content, top=r.top_logprobs)])[0] for r in asks]
    assert batched[1].token_logprobs is None and batched[1].word_logprobs is None
    assert batched[0].word_logprobs is not None and set(batched[0].word_logprobs) == {"yes", "no"}
    for got, ref, k in zip((batched[0], batched[2]), (alone[0], alone[2]), (3, 0), strict=True):
        assert got.token_logprobs is not None and ref.token_logprobs is not None
        assert [e.token_id for e in got.token_logprobs] == [e.token_id for e in ref.token_logprobs]
        for a, b in zip(got.token_logprobs, ref.token_logprobs, strict=True):
            assert len(a.top) == k
            assert a.logprob == pytest.approx(b.logprob, abs=TOL)
            assert [x.logprob for x in a.top] == pytest.approx([x.logprob for x in b.top], abs=TOL)


def test_logprobs_cover_the_counted_tokens_when_a_stop_string_cuts(engine: TransformersEngine) -> None:
    (free,) = engine.generate([_request("Is there an effusion?", top=1)])
    assert free.token_logprobs is not None and len(free.text) > 1
    stop = free.text[1:3] if len(free.text) >= 3 else free.text[1:]
    (cut,) = engine.generate([_request("Is there an effusion?", top=1, stop=[stop])])
    assert cut.finish_reason == "stop" and cut.token_logprobs is not None
    assert len(cut.token_logprobs) == cut.completion_tokens <= free.completion_tokens
    assert cut.token_logprobs == free.token_logprobs[: cut.completion_tokens]


def test_negative_top_logprobs_is_an_input_error(engine: TransformersEngine) -> None:
    bad, good = engine.generate([_request("hi", top=-1), _request("hi", top=2)])
    assert bad.finish_reason == "error" and bad.error_kind == "input" and "top_logprobs" in (bad.error or "")
    assert good.token_logprobs is not None and all(len(e.top) == 2 for e in good.token_logprobs)


def test_capabilities_declare_token_logprobs(engine: TransformersEngine) -> None:
    assert engine.capabilities.token_logprobs is True
