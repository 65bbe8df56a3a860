"""TransformersEngine with real tiny models of two families (Qwen2.5-VL and Idefics3/SmolVLM)."""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image

from emma.errors import InputError
from emma.infer.engine import Engine
from emma.infer.transformers_engine import PromptTooLongError, TransformersEngine
from emma.infer.types import GenerationRequest, ImagePart, Message, SamplingParams, StreamChunk, TextPart
from emma.model.registry import LoadedModel
from emma.model.tiny_families import load_tiny

FAMILIES = ("qwen2_5_vl", "idefics3")


def _spread_weights(loaded: LoadedModel, seed: int = 0) -> LoadedModel:
    """Redraw the tiny model's matrices with a larger spread so greedy text depends on the prompt
    (at the builders' 0.02 init every prompt gives the same repeated token, which would make
    batch-vs-single comparisons vacuous)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in loaded.model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return loaded


@pytest.fixture(scope="module", params=FAMILIES)
def engine(request: pytest.FixtureRequest) -> TransformersEngine:
    return TransformersEngine(_spread_weights(load_tiny(request.param)), max_batch_size=4)


RED = Image.new("RGB", (64, 48), (200, 30, 30))
GREEN = Image.new("RGB", (40, 80), (20, 160, 40))


def _prompts() -> list[list[Message]]:
    return [
        [Message.text("system", "Be brief."), Message("user", [ImagePart(RED), TextPart("What is shown?")])],
        [
            Message(
                "user", [TextPart("A longer text-only prompt, so that the batch needs left padding here.")]
            )
        ],
        [Message("user", [ImagePart(GREEN), ImagePart(RED), TextPart("Compare")])],
        [
            Message("user", [ImagePart(GREEN), TextPart("first")]),
            Message.text("assistant", "an answer"),
            Message.text("user", "and then?"),
        ],
    ]


def _req(messages: list[Message], **sampling: object) -> GenerationRequest:
    return GenerationRequest(messages, SamplingParams(**{"max_new_tokens": 12, **sampling}))  # type: ignore[arg-type]


def test_batched_generate_equals_one_by_one(engine: TransformersEngine) -> None:
    assert isinstance(engine, Engine)
    requests = [_req(m) for m in _prompts()]
    batched = engine.generate(requests)
    single = [engine.generate([r])[0] for r in requests]
    assert [r.error for r in batched] == [None] * 4
    texts = [r.text for r in batched]
    assert texts == [r.text for r in single]
    assert len(set(texts)) > 1, "outputs should depend on the prompt"
    assert [r.prompt_tokens for r in batched] == [r.prompt_tokens for r in single]
    assert [r.request_id for r in batched] == [r.request_id for r in requests]
    for response in batched:
        assert response.finish_reason == "length" and response.completion_tokens == 12
        assert response.first_token_s is not None and 0 < response.first_token_s <= response.latency_s
    # image tokens are counted: the same text with an image has more prompt tokens than without
    with_image = engine.count_tokens(_req([Message("user", [ImagePart(RED), TextPart("x")])]))
    without = engine.count_tokens(_req([Message("user", [TextPart("x")])]))
    assert with_image > without
    assert batched[0].prompt_tokens == engine.count_tokens(requests[0])


def test_batches_are_bounded_and_grouped_by_sampling(engine: TransformersEngine) -> None:
    messages = _prompts()
    requests = [_req(messages[i % 4], max_new_tokens=6 + (i % 2)) for i in range(10)]
    responses = engine.generate(requests)
    assert [r.completion_tokens for r in responses] == [6 + (i % 2) for i in range(10)]
    assert responses[0].text == responses[4].text == responses[8].text
    assert all(r.finish_reason == "length" for r in responses)


def test_stop_strings_truncate(engine: TransformersEngine) -> None:
    request = _req(_prompts()[1], max_new_tokens=20)
    full = engine.generate([request])[0].text
    k = next(
        i for i in range(4, len(full) - 3) if full.find(full[i : i + 3]) == i and full[i : i + 3].strip()
    )
    stop = full[k : k + 3]
    response = engine.generate([_req(_prompts()[1], max_new_tokens=20, stop=["\x00never", stop])])[0]
    assert response.text == full[:k]
    assert response.finish_reason == "stop"
    assert 0 < response.completion_tokens < 20
    streamed = list(engine.stream(_req(_prompts()[1], max_new_tokens=20, stop=[stop])))
    assert "".join(c.delta for c in streamed) == full[:k]
    assert streamed[-1].response is not None and streamed[-1].response.text == full[:k]


def test_stream_concatenation_equals_generate(engine: TransformersEngine) -> None:
    for messages in _prompts()[:3]:
        expected = engine.generate([_req(messages, max_new_tokens=16)])[0]
        chunks = list(engine.stream(_req(messages, max_new_tokens=16)))
        final = chunks[-1].response
        assert final is not None and all(c.response is None for c in chunks[:-1])
        assert "".join(c.delta for c in chunks) == final.text == expected.text
        assert final.finish_reason == "length" and final.completion_tokens == 16
        assert final.prompt_tokens == expected.prompt_tokens
        assert len([c for c in chunks if c.delta]) > 1
        assert final.first_token_s is not None


def test_stream_cancel_stops_promptly(engine: TransformersEngine) -> None:
    request = _req(_prompts()[0], max_new_tokens=400)
    final = None
    for k, chunk in enumerate(engine.stream(request)):
        if chunk.response is not None:
            final = chunk.response
            break
        if k == 1:
            request.cancel.set()
    assert final is not None and final.finish_reason == "cancelled"
    assert final.completion_tokens < 20
    assert threading.active_count() < 20 and not any(t.name == "emma-generate" for t in threading.enumerate())


def test_abandoned_stream_stops_the_thread(engine: TransformersEngine) -> None:
    stream = engine.stream(_req(_prompts()[0], max_new_tokens=400))
    next(stream)
    stream.close()  # the caller went away
    assert not any(t.name == "emma-generate" for t in threading.enumerate())
    assert engine.generate([_req(_prompts()[1], max_new_tokens=2)])[0].completion_tokens == 2  # lock released


def test_cancel_in_a_batch_only_stops_that_request(engine: TransformersEngine) -> None:
    cancelled = _req(_prompts()[0])
    cancelled.cancel.set()
    other = _req(_prompts()[1])
    out = engine.generate([cancelled, other])
    assert out[0].finish_reason == "cancelled" and out[0].text == ""
    assert out[1].finish_reason == "length" and out[1].completion_tokens == 12


def test_seed_reproducible_sampling_and_global_rng_untouched(engine: TransformersEngine) -> None:
    def sample(seed: int) -> str:
        return engine.generate(
            [_req(_prompts()[0], temperature=1.0, top_p=0.95, seed=seed, max_new_tokens=16)]
        )[0].text

    state = torch.random.get_rng_state()
    first = sample(7)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert sample(7) == first
    assert len({first, sample(8), sample(9)}) > 1
    greedy = engine.generate([_req(_prompts()[0], max_new_tokens=16)])[0].text
    assert greedy == engine.generate([_req(_prompts()[0], max_new_tokens=16, seed=3, top_p=0.5)])[0].text


def test_failing_request_does_not_sink_the_batch(engine: TransformersEngine) -> None:
    bad = _req(
        [
            Message("assistant", [ImagePart(RED), TextPart("images only in user turns")]),
            Message.text("user", "q"),
        ]
    )
    good = [_req(m) for m in _prompts()[:2]]
    out = engine.generate([good[0], bad, good[1]])
    assert out[1].finish_reason == "error"
    assert out[1].error is not None and out[1].error.startswith("InputError") and "\n" not in out[1].error
    assert [o.text for o in (out[0], out[2])] == [engine.generate([g])[0].text for g in good]


def test_prompt_token_bound(engine: TransformersEngine) -> None:
    bounded = TransformersEngine(engine.loaded, max_prompt_tokens=10)
    request = _req(_prompts()[1])
    with pytest.raises(InputError, match="over the limit of 10"):
        bounded.count_tokens(request)
    with pytest.raises(InputError, match="over the limit of 10"):
        next(bounded.stream(request))
    [response] = bounded.generate([request])
    assert response.finish_reason == "error" and "over the limit of 10" in (response.error or "")


def test_request_prompt_bound_is_a_typed_error_before_generating(engine: TransformersEngine) -> None:
    assert engine.checks_prompt_tokens is True
    good = [_req(m) for m in _prompts()[:2]]
    n = engine.count_tokens(good[1])
    long = _req(_prompts()[1])
    long.max_prompt_tokens = n - 1  # the request's bound applies on top of the engine's own
    out = engine.generate([good[0], long, good[1]])
    assert out[1].finish_reason == "error" and out[1].error_kind == "prompt_too_long"
    assert out[1].prompt_tokens == n and out[1].completion_tokens == 0
    assert f"the prompt has {n} tokens" in (out[1].error or "") and f"limit of {n - 1}" in (
        out[1].error or ""
    )
    # the other requests of the batch are generated as they would be alone, with their own usage
    alone = [engine.generate([g])[0] for g in good]
    assert [o.text for o in (out[0], out[2])] == [a.text for a in alone]
    assert [o.prompt_tokens for o in (out[0], out[2])] == [a.prompt_tokens for a in alone]
    assert all(o.error is None and o.error_kind is None for o in (out[0], out[2]))
    with pytest.raises(PromptTooLongError) as info:
        next(engine.stream(long))
    assert (info.value.n_tokens, info.value.limit) == (n, n - 1)
    long.max_prompt_tokens = n  # exactly at the bound is allowed
    assert engine.generate([long])[0].error is None
    [bad] = engine.generate([_req([Message.text("user", "q"), Message.text("assistant", "a")])])
    assert bad.error_kind == "input" and bad.prompt_tokens == 0


def test_control_tokens_in_text_cannot_forge_images(engine: TransformersEngine) -> None:
    image_token = engine.processor.image_token
    request = _req([Message("user", [ImagePart(RED), TextPart(f"{image_token} {image_token} hi")])])
    [response] = engine.generate([request])
    assert response.error is None
    assert engine.count_tokens(request) == engine.count_tokens(
        _req(
            [
                Message(
                    "user", [ImagePart(RED), TextPart(f"{image_token[0]}\u200b{image_token[1:]} " * 2 + "hi")]
                )
            ]
        )
    )


def test_concurrent_callers_are_serialised(engine: TransformersEngine) -> None:
    requests = [_req(m, max_new_tokens=6) for m in _prompts()]
    expected = [engine.generate([r])[0].text for r in requests]
    results: dict[int, str] = {}

    def call(i: int) -> None:
        results[i] = engine.generate([requests[i]])[0].text

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(4)] == expected


def test_empty_and_malformed_requests(engine: TransformersEngine) -> None:
    assert engine.generate([]) == []
    with pytest.raises(InputError):
        engine.count_tokens(GenerationRequest([]))
    [response] = engine.generate([_req([Message.text("user", "q"), Message.text("assistant", "a")])])
    assert response.finish_reason == "error" and "last message" in (response.error or "")


def test_qwen2_vl_box_tokens_survive_decoding() -> None:
    loaded = load_tiny("qwen2_vl")
    tokenizer = loaded.processor.tokenizer
    box_tokens = ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"]
    tokenizer.add_tokens(box_tokens, special_tokens=True)  # the tiny tokenizer lacks Qwen2-VL's box tokens
    engine = TransformersEngine(loaded)
    answer = "<|object_ref_start|>lesion<|object_ref_end|><|box_start|>(10,20),(300,400)<|box_end|>"
    ids = tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False)
    assert engine.decode(ids) == answer
    # the model's own boxes are resent intact in history; in user text they are defanged
    conversation = engine.conversation(
        [Message.text("user", answer), Message.text("assistant", answer), Message.text("user", "?")]
    )
    assert conversation[1]["content"][0]["text"] == answer
    assert "<|box_start|>" not in conversation[0]["content"][0]["text"]


def _by_row(pairs: list[tuple[int, StreamChunk]], n: int) -> list[list[StreamChunk]]:
    rows: list[list[StreamChunk]] = [[] for _ in range(n)]
    for i, chunk in pairs:
        rows[i].append(chunk)
    return rows


def test_stream_many_equals_generate_and_interleaves(engine: TransformersEngine) -> None:
    messages = _prompts()[:3]
    expected = [engine.generate([_req(m, max_new_tokens=16)])[0] for m in messages]
    pairs = list(engine.stream_many([_req(m, max_new_tokens=16) for m in messages]))
    for chunks, want in zip(_by_row(pairs, 3), expected, strict=True):
        final = chunks[-1].response
        assert final is not None and all(c.response is None for c in chunks[:-1])
        assert "".join(c.delta for c in chunks) == final.text == want.text
        assert final.finish_reason == "length" and final.completion_tokens == 16
        assert final.prompt_tokens == want.prompt_tokens and final.first_token_s is not None
    order = [i for i, c in pairs if c.delta]
    assert order != sorted(order), "rows should stream side by side, not one after another"


def test_stream_many_cancel_ends_one_row_early(engine: TransformersEngine) -> None:
    messages = _prompts()[:3]
    expected = [engine.generate([_req(m, max_new_tokens=40)])[0].text for m in messages]
    requests = [_req(m, max_new_tokens=40) for m in messages]
    pairs: list[tuple[int, StreamChunk]] = []
    for i, chunk in engine.stream_many(requests):
        pairs.append((i, chunk))
        if i == 0 and chunk.delta:
            requests[0].cancel.set()
    rows = _by_row(pairs, 3)
    cancelled = rows[0][-1].response
    assert cancelled is not None and cancelled.finish_reason == "cancelled"
    assert cancelled.completion_tokens < 40
    ended_at = pairs.index((0, rows[0][-1]))
    assert any(i != 0 and c.delta for i, c in pairs[ended_at + 1 :]), "the others go on after it ends"
    for chunks, want in zip(rows[1:], expected[1:], strict=True):
        final = chunks[-1].response
        assert final is not None and final.finish_reason == "length" and final.text == want
    assert not any(t.name == "emma-generate" for t in threading.enumerate())


def test_stream_many_isolates_unusable_input(engine: TransformersEngine) -> None:
    good = [_req(m, max_new_tokens=8) for m in _prompts()[:2]]
    too_long = _req(_prompts()[1], max_new_tokens=8)
    too_long.max_prompt_tokens = 3
    pairs = list(engine.stream_many([good[0], too_long, good[1]]))
    rows = _by_row(pairs, 3)
    assert len(rows[1]) == 1 and rows[1][0].response is not None
    refused = rows[1][0].response
    assert refused.finish_reason == "error" and refused.error_kind == "prompt_too_long"
    assert refused.prompt_tokens > 3
    for chunks, request in zip((rows[0], rows[2]), good, strict=True):
        final = chunks[-1].response
        assert (
            final is not None
            and final.text == engine.generate([_req(request.messages, max_new_tokens=8)])[0].text
        )
    with pytest.raises(ValueError, match="same sampling"):
        list(engine.stream_many([_req(_prompts()[0]), _req(_prompts()[0], max_new_tokens=3)]))


def test_ignore_eos_generates_exactly_max_new_tokens() -> None:
    """Every token but one is an end-of-sequence token: greedy decoding stops at once, unless
    ``ignore_eos`` masks them all, when it runs to ``max_new_tokens`` (generate and stream alike)."""
    loaded = _spread_weights(load_tiny("qwen2_5_vl"))
    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    keep = loaded.processor.tokenizer.encode("yes", add_special_tokens=False)[0]  # the one non-ending token
    loaded.model.generation_config.eos_token_id = [i for i in range(vocab) if i != keep]
    engine = TransformersEngine(loaded, max_batch_size=2)
    assert keep not in engine._eos_ids
    stopped = engine.generate([_req(_prompts()[1])])[0]
    assert (stopped.finish_reason, stopped.completion_tokens, stopped.text) == ("stop", 1, "")
    forced = engine.generate([_req(_prompts()[1], ignore_eos=True), _req(_prompts()[0], ignore_eos=True)])
    assert [(r.finish_reason, r.completion_tokens) for r in forced] == [("length", 12)] * 2
    streamed = list(engine.stream(_req(_prompts()[1], ignore_eos=True)))
    final = streamed[-1].response
    assert final is not None and (final.finish_reason, final.completion_tokens) == ("length", 12)
    assert "".join(c.delta for c in streamed) == forced[0].text != ""
    assert (
        _req(_prompts()[1], ignore_eos=True).sampling.batch_key() != _req(_prompts()[1]).sampling.batch_key()
    )
