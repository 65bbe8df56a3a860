"""``logprobs`` / ``top_logprobs`` of ``POST /v1/chat/completions``, end to end: the real app over the
tiny model, its answers checked against log_softmax of the model's own logits, read back by the
``openai`` client's types and by :class:`~emma.infer.openai_engine.OpenAIEngine` (the classification
AUROC path), and the requests it refuses."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from openai.types.chat import ChatCompletion

from emma.infer.engine import EngineCapabilities
from emma.infer.openai_engine import TOP_LOGPROBS, OpenAIEngine, word_logprobs
from emma.infer.transformers_engine import TransformersEngine
from emma.infer.types import GenerationRequest, Message, SamplingParams
from emma.serve.app import create_app
from emma.serve.schemas import MAX_TOP_LOGPROBS

CHAT = "/v1/chat/completions"
TOL = 1e-4
SYSTEM = "You answer yes or no."  # sent by the client, so the server adds no system prompt of its own


@pytest.fixture(scope="module")
def client(tiny_engine: TransformersEngine, make_settings: Any) -> Iterator[TestClient]:
    with TestClient(create_app(tiny_engine, make_settings())) as c:
        yield c


def _messages(question: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def _first_logprobs(engine: TransformersEngine, question: str) -> torch.Tensor:
    """log_softmax of the model's logits at the first answer position, from one plain forward pass."""
    messages = [Message.text("system", SYSTEM), Message.text("user", question)]
    inputs = engine.processor.apply_chat_template(
        [engine.conversation(messages)],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.inference_mode():
        logits = engine.model(**inputs).logits[0, -1].float()
    return torch.log_softmax(logits, dim=-1)


def _error(r: Any, status: int, code: str, param: str | None = None) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and (param is None or error["param"] == param), error


def test_logprobs_are_the_model_log_softmax_in_openai_shape(
    client: TestClient, tiny_engine: TransformersEngine
) -> None:
    question = "Is there a pleural effusion?"
    body = {"messages": _messages(question), "max_tokens": 3, "logprobs": True, "top_logprobs": 5}
    r = client.post(CHAT, json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    content = data["choices"][0]["logprobs"]["content"]
    assert len(content) == data["usage"]["completion_tokens"] == 3
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode("utf-8"))
        assert len(entry["top_logprobs"]) == 5
        alternatives = [a["logprob"] for a in entry["top_logprobs"]]
        assert alternatives == sorted(alternatives, reverse=True) and all(v <= 0 for v in alternatives)
        for alt in entry["top_logprobs"]:
            assert set(alt) == {"token", "logprob", "bytes"}
            assert alt["bytes"] == list(alt["token"].encode("utf-8"))
    assert "".join(e["token"] for e in content) == data["choices"][0]["message"]["content"]
    # the first position against a direct forward pass on the same prompt
    expected = _first_logprobs(tiny_engine, question)
    values, ids = expected.topk(5)
    first = content[0]
    assert [a["token"] for a in first["top_logprobs"]] == [tiny_engine.tokenizer.decode([i]) for i in ids]
    assert [a["logprob"] for a in first["top_logprobs"]] == pytest.approx(values.tolist(), abs=TOL)
    assert first["token"] == first["top_logprobs"][0]["token"]  # greedy: the most likely token
    assert first["logprob"] == pytest.approx(float(values[0]), abs=TOL)

    # the openai client's own types read it, and OpenAIEngine's parser gets P(word) from it
    completion = ChatCompletion.model_validate(data)
    choice = completion.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert choice.logprobs.content[0].top_logprobs[0].logprob == pytest.approx(float(values[0]), abs=TOL)
    texts = [tiny_engine.tokenizer.decode([i]).strip().lower() for i in ids.tolist()]
    word = next(t for t in texts if t)
    spelled = [k for k, t in enumerate(texts) if t == word]
    lp = word_logprobs(choice, [word])
    assert lp is not None and lp[word] == pytest.approx(float(torch.logsumexp(values[spelled], 0)), abs=TOL)


def test_openai_engine_word_logprobs_through_the_real_server(
    tiny_engine: TransformersEngine, make_settings: Any, serve: Any
) -> None:
    """OpenAIEngine → emma serve (on loopback) → the in-process engine: P(word) at the first answer
    token as the client computes it from the server's 20 alternatives equals the model's own."""
    question = "Is the heart enlarged?"
    expected = _first_logprobs(tiny_engine, question)
    values, ids = expected.topk(TOP_LOGPROBS)
    texts = [tiny_engine.tokenizer.decode([i]).strip().lower() for i in ids.tolist()]
    words = tuple(dict.fromkeys(t for t in texts[:3] if t)) + ("yes", "no")
    with serve(create_app(tiny_engine, make_settings())) as url:
        remote = OpenAIEngine(f"{url}/v1", tiny_engine.model_name, max_retries=0)
        try:
            messages = [Message.text("system", SYSTEM), Message.text("user", question)]
            request = GenerationRequest(messages, SamplingParams(max_new_tokens=2), logprob_words=words)
            (response,) = remote.generate([request])
            # a stream never asks for logprobs (emma serve refuses them with a stream): it still answers
            chunks = list(remote.stream(request))
        finally:
            remote.close()
    final = chunks[-1].response
    assert final is not None and final.finish_reason != "error", final.error
    assert response.finish_reason != "error", response.error
    assert response.word_logprobs is not None
    for word in words:
        spelled = [k for k, t in enumerate(texts) if t == word]
        if not spelled:  # not among the server's 20 alternatives: absent, never guessed
            assert word not in response.word_logprobs
            continue
        want = float(np.logaddexp.reduce(values[spelled].double().numpy()))
        assert response.word_logprobs[word] == pytest.approx(want, abs=TOL)
    assert words[0] in response.word_logprobs


def test_logprobs_false_or_absent_gives_null(client: TestClient) -> None:
    for extra in ({}, {"logprobs": False}):
        r = client.post(CHAT, json={"messages": _messages("hi"), "max_tokens": 1, **extra})
        assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None


def test_logprobs_without_top_logprobs_lists_no_alternatives(client: TestClient) -> None:
    r = client.post(CHAT, json={"messages": _messages("hi"), "max_tokens": 2, "logprobs": True})
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == r.json()["usage"]["completion_tokens"]
    assert all(e["top_logprobs"] == [] and e["logprob"] <= 0 for e in content)


@pytest.mark.parametrize(
    "extra",
    [
        {"logprobs": True, "top_logprobs": MAX_TOP_LOGPROBS + 1},
        {"logprobs": True, "top_logprobs": -1},
        {"logprobs": True, "top_logprobs": 2.0},
        {"logprobs": "yes"},
        {"logprobs": 1},
    ],
)
def test_bad_logprobs_values_are_422(client: TestClient, extra: dict[str, Any]) -> None:
    _error(client.post(CHAT, json={"messages": _messages("hi"), **extra}), 422, "validation_error")


def test_top_logprobs_needs_logprobs(client: TestClient) -> None:
    for extra in ({"top_logprobs": 3}, {"top_logprobs": 0, "logprobs": False}):
        r = client.post(CHAT, json={"messages": _messages("hi"), **extra})
        _error(r, 400, "invalid_request", "top_logprobs")


def test_logprobs_with_stream_is_400_before_the_stream(client: TestClient) -> None:
    body = {"messages": _messages("hi"), "logprobs": True, "top_logprobs": 2, "stream": True}
    r = client.post(CHAT, json=body)
    _error(r, 400, "unsupported_parameter", "logprobs")
    assert r.headers["content-type"].startswith("application/json")
    # streaming without logprobs is unaffected
    r = client.post(
        CHAT, json={"messages": _messages("hi"), "max_tokens": 1, "stream": True, "logprobs": False}
    )
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")


class _NoLogprobsEngine:
    """The tiny engine behind capabilities that say it cannot report token log-probabilities."""

    def __init__(self, inner: TransformersEngine) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def capabilities(self) -> EngineCapabilities:
        return dataclasses.replace(self.inner.capabilities, token_logprobs=False)


def test_engine_without_token_logprobs_is_400(tiny_engine: TransformersEngine, make_settings: Any) -> None:
    with TestClient(create_app(_NoLogprobsEngine(tiny_engine), make_settings())) as c:  # type: ignore[arg-type]
        body = {"messages": _messages("hi"), "max_tokens": 1}
        _error(c.post(CHAT, json={**body, "logprobs": True}), 400, "unsupported_parameter", "logprobs")
        assert c.post(CHAT, json=body).status_code == 200  # the same request without logprobs is served
