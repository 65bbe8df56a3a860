"""TransformersEngine.prepare: prompts built one request at a time (off the engine thread in a server),
batched afterwards exactly as the processor batches them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from emma.errors import InputError
from emma.infer.transformers_engine import PromptTooLongError, TransformersEngine, _collate
from emma.infer.types import GenerationRequest, ImagePart, Message, SamplingParams, TextPart
from emma.model.tiny_families import TINY_FAMILIES, load_tiny


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _request(images: list[Image.Image], text: str, max_new_tokens: int = 4) -> GenerationRequest:
    parts: list[TextPart | ImagePart] = [ImagePart(im) for im in images]
    return GenerationRequest(
        [Message("user", [*parts, TextPart(text)])], SamplingParams(max_new_tokens=max_new_tokens)
    )


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_collated_prompts_equal_the_processors_own_batch(family: str) -> None:
    engine = TransformersEngine(load_tiny(family))
    # different prompt lengths, image counts and aspect ratios: padding of tokens and of image tensors
    requests = [
        _request([_image(64, 48, 1)], "What is this?"),
        _request([_image(30, 90, 2), _image(50, 50, 3)], "Compare the two images in a few careful words."),
    ]
    conversations = [engine.conversation(r.messages) for r in requests]
    expected = engine.processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        processor_kwargs={"padding": True, "padding_side": "left", "return_tensors": "pt"},
    )
    got = _collate([engine._prepare(r) for r in requests], engine._pad_id)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_prepared_requests_generate_what_unprepared_ones_do() -> None:
    engine = TransformersEngine(load_tiny("llava"), max_batch_size=4)
    texts = ["Describe it.", "Is there a fracture here, yes or no?", "Where?"]

    def batch() -> list[GenerationRequest]:
        return [_request([_image(40 + 8 * i, 40, i)], t, 6) for i, t in enumerate(texts)]

    plain = engine.generate(batch())
    prepared = batch()
    for request in prepared:
        engine.prepare(request)
        assert request.prepared is not None
    again = engine.generate(prepared)
    assert [r.text for r in again] == [r.text for r in plain]
    assert [r.prompt_tokens for r in again] == [r.prompt_tokens for r in plain]
    assert [r.text for r in plain] == [engine.generate([r])[0].text for r in batch()]  # batch == alone


def test_stream_many_runs_requests_of_different_layouts() -> None:
    engine = TransformersEngine(load_tiny("qwen2_vl"), max_batch_size=4)
    with_image = _request([_image(56, 56, 5)], "What is shown?", 5)
    text_only = GenerationRequest([Message.text("user", "Say hello.")], SamplingParams(max_new_tokens=5))
    finals = {i: chunk.response for i, chunk in engine.stream_many([with_image, text_only]) if chunk.response}
    assert set(finals) == {0, 1}
    alone = [engine.generate([r])[0] for r in (with_image, text_only)]
    assert [finals[0].text, finals[1].text] == [a.text for a in alone]  # type: ignore[union-attr]


def test_prepare_raises_input_errors_on_the_calling_thread() -> None:
    engine = TransformersEngine(load_tiny("llava"), max_prompt_tokens=64)
    long = GenerationRequest([Message.text("user", "word " * 200)])
    with pytest.raises(PromptTooLongError) as info:
        engine.prepare(long)
    assert info.value.limit == 64 and info.value.n_tokens > 64 and long.prepared is None
    bounded = GenerationRequest([Message.text("user", "a few words")], max_prompt_tokens=3)
    with pytest.raises(PromptTooLongError):
        engine.prepare(bounded)
    too_many = _request([_image(8, 8, i) for i in range(5)], "all of them")  # LLaVA: 4 images at most
    with pytest.raises(InputError):
        engine.prepare(too_many)
    other = TransformersEngine(load_tiny("llava"))
    ok = _request([_image(20, 20, 9)], "hi")
    other.prepare(ok)
    assert engine.count_tokens(ok) == other.count_tokens(ok)  # another engine's prompt is rebuilt, not reused
