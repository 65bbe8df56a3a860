"""Narrow tests of the app (FastAPI TestClient, no socket) and of the batcher, with the real tiny engine."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
from collections.abc import Iterator
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from emma.infer import prompts
from emma.infer.structured import structured_prompt
from emma.infer.transformers_engine import TransformersEngine
from emma.infer.types import GenerationRequest, ImagePart, Message, SamplingParams, TextPart
from emma.model.tiny_families import load_tiny
from emma.serve.app import _apply_mode, create_app
from emma.serve.batcher import Batcher, ClientGone, PromptError, QueueFullError
from emma.serve.schemas import EmmaOptions

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def client(tiny_engine: Any, make_settings: Any) -> Iterator[TestClient]:
    with TestClient(create_app(tiny_engine, make_settings())) as c:
        yield c


def _user(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(parts)}]


def _text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


def _image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def _error(r: Any, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) >= {"message", "type", "code"}
    assert body["error"]["code"] == code, body
    return body["error"]


# ------------------------------------------------------------------------------ request validation


def test_validation_errors_are_openai_shaped_and_quote_no_content(client: TestClient) -> None:
    err = _error(client.post(CHAT, json={"model": "x"}), 422, "validation_error")
    assert "messages" in err["message"]
    r = client.post(CHAT, json={"messages": [{"role": "surgeon", "content": "SECRET-CONTENT-42"}]})
    err = _error(r, 422, "validation_error")
    assert "SECRET-CONTENT-42" not in r.text and "surgeon" not in r.text
    _error(client.post(CHAT, json={"messages": [{"role": "user"}]}), 422, "validation_error")
    r = client.post(CHAT, json={"messages": _user({"type": "SECRET-TAG-7", "text": "x"})})
    _error(r, 422, "validation_error")
    assert "SECRET-TAG-7" not in r.text
    _error(
        client.post(CHAT, json={"messages": _user(_text("hi")), "temperature": 3}), 422, "validation_error"
    )


def test_invalid_json_is_400(client: TestClient) -> None:
    r = client.post(CHAT, content=b'{"messages": [', headers={"Content-Type": "application/json"})
    _error(r, 400, "invalid_json")


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        ({"n": 2}, "unsupported_parameter"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "unsupported_parameter"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "invalid_stop"),
        ({"stop": ["x" * 65]}, "invalid_stop"),
        ({"max_completion_tokens": 1000}, "max_tokens_too_large"),
        ({"emma": {"window": "not-a-window"}}, "invalid_window"),
    ],
)
def test_unsupported_or_out_of_bound_parameters(
    client: TestClient, png_url: str, extra: dict[str, Any], code: str
) -> None:
    body = {"messages": _user(_image(png_url), _text("hi")), **extra}
    _error(client.post(CHAT, json=body), 400, code)


def test_message_roles_checked(client: TestClient, png_url: str) -> None:
    body = {
        "messages": [{"role": "assistant", "content": [_image(png_url)]}, {"role": "user", "content": "hi"}]
    }
    _error(client.post(CHAT, json=body), 400, "invalid_request")
    body = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    _error(client.post(CHAT, json=body), 400, "invalid_request")


def test_unknown_path_and_method_are_json(client: TestClient) -> None:
    _error(client.get("/v1/nothing-here"), 404, "not_found")
    r = client.get(CHAT)  # the web UI's catch-all mount at / answers a wrong method on an API path
    assert r.status_code in (404, 405) and set(r.json()["error"]) >= {"message", "type", "code"}


def test_prompt_over_token_bound_is_400_stream_or_not(tiny_engine: Any, make_settings: Any) -> None:
    with TestClient(create_app(tiny_engine, make_settings(max_prompt_tokens=8))) as c:
        body = {"messages": _user(_text("a question that is certainly longer than eight tokens, surely"))}
        err = _error(c.post(CHAT, json=body), 400, "context_length_exceeded")
        assert "limit of 8" in err["message"]
        r = c.post(CHAT, json={**body, "stream": True})
        _error(r, 400, "context_length_exceeded")  # refused before the event stream starts


def test_prompt_bound_is_checked_once_by_the_engine(
    tiny_engine: Any, instrument: Any, make_settings: Any, png_url: str
) -> None:
    engine = instrument(tiny_engine)
    system = {"role": "system", "content": "Be brief."}
    short = {"messages": [system, *_user(_image(png_url), _text("hi"))], "max_tokens": 3}
    with TestClient(create_app(engine, make_settings(max_prompt_tokens=200))) as c:
        r = c.post(CHAT, json=short)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        expected = tiny_engine.count_tokens(engine.requests[-1])  # counted here, not by the server
        assert usage["prompt_tokens"] == expected and 1 <= usage["completion_tokens"] <= 3
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        long = {"messages": [system, *_user(_text("word " * 300))]}
        err = _error(c.post(CHAT, json=long), 400, "context_length_exceeded")
        assert "limit of 200" in err["message"] and "word" not in err["message"]
        _error(c.post(CHAT, json={**long, "stream": True}), 400, "context_length_exceeded")
        assert len(engine.finals) == 1  # the refused requests were never queued, let alone generated
    assert engine.counted == 0  # no separate count: the processor ran once per request
    assert engine.prepared == 3
    # prompts are built on the preparation thread, never on the engine thread that generates
    assert engine.threads["prepare"] and all(t.startswith("emma-prepare") for t in engine.threads["prepare"])
    assert all(t.startswith("emma-engine") for t in engine.threads["generate"])


def test_developer_role_and_string_image_url_accepted(client: TestClient, png_url: str) -> None:
    body = {
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image_url", "image_url": png_url}, _text("hi")]},
        ],
        "max_tokens": 2,
    }
    r = client.post(CHAT, json=body)
    assert r.status_code == 200, r.text
    assert r.json()["emma"]["images"][0]["source_format"] == "png"


# ---------------------------------------------------------------------------------- prompt building


def test_apply_mode_structured_wraps_last_question() -> None:
    image = Image.new("RGB", (8, 8))
    messages = [
        Message.text("system", "Client rules."),
        Message("user", [TextPart("Any fracture?"), ImagePart(image)]),
    ]
    options = EmmaOptions(mode="structured", context="fall, wrist pain")
    out = _apply_mode(messages, options, "llava")
    assert [m.role for m in out] == ["system", "user"]
    assert out[0].text_content == prompts.join_blocks(
        prompts.system_prompt("structured", "llava"), "Client rules."
    )
    assert isinstance(out[1].content[0], ImagePart) and out[1].content[0].image is image
    assert out[1].text_content == structured_prompt(
        "Any fracture?", context="fall, wrist pain", family="llava"
    )


def test_apply_mode_chat_keeps_client_messages() -> None:
    messages = [Message.text("system", "Client rules."), Message.text("user", "hi")]
    out = _apply_mode(messages, EmmaOptions(), "llava")
    assert [(m.role, m.text_content) for m in out] == [("system", "Client rules."), ("user", "hi")]
    out = _apply_mode([Message.text("user", "hi")], EmmaOptions(), "llava")
    assert out[0].text_content == prompts.system_prompt("chat", "llava")
    out = _apply_mode([Message.text("user", "hi")], EmmaOptions(context="BP 80/40"), "llava")
    assert out[-1].text_content == prompts.chat_prompt("hi", context="BP 80/40", family="llava")
    assert "BP 80/40" in out[-1].text_content


# ------------------------------------------------------------------------------------------ preview


def _nifti_url(shape: tuple[int, int, int] = (20, 16, 12)) -> str:
    data = np.arange(np.prod(shape), dtype=np.int16).reshape(shape)
    image = nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0]))
    raw = image.to_bytes()
    return "data:application/gzip;base64," + base64.b64encode(gzip.compress(raw)).decode()


def test_preview_samples_nifti_volume(client: TestClient) -> None:
    r = client.post("/v1/emma/preview", json={"images": [_nifti_url()], "slices": 3, "plane": "axial"})
    assert r.status_code == 200, r.text
    images = r.json()["images"]
    assert [im["index"] for im in images] == [0, 1, 2]
    assert all(
        im["provenance"]["format"] == "nifti" and im["provenance"]["plane"] == "axial" for im in images
    )
    assert all(im["provenance"]["source"] == "upload:0" for im in images)
    first = Image.open(io.BytesIO(base64.b64decode(images[0]["png"].split(",", 1)[1])))
    assert first.size == (images[0]["width"], images[0]["height"])
    # Four slices of one volume are four model images: over the tests' bound of three.
    r = client.post("/v1/emma/preview", json={"images": [_nifti_url()], "slices": 4})
    _error(r, 413, "too_many_images")


def test_openapi_documents_the_extension(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/models", "/v1/emma/preview", "/health"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    assert {"EmmaOptions", "EmmaResult", "DiagnosticOutput", "ChatCompletionRequest"} <= set(schemas)
    assert "emma" in schemas["ChatCompletionRequest"]["properties"]
    assert "text/event-stream" in spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]


def test_web_ui_served_with_security_headers(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.headers["x-content-type-options"] == "nosniff"
    r = client.get("/v1/models")
    assert r.headers["cache-control"] == "no-store" and len(r.headers["x-request-id"]) == 32


# ------------------------------------------------------------------------------------------ batcher


def _request(text: str = "hi", max_new_tokens: int = 2) -> GenerationRequest:
    return GenerationRequest([Message.text("user", text)], SamplingParams(max_new_tokens=max_new_tokens))


def test_batcher_refuses_when_full_and_skips_cancelled(tiny_engine: Any, instrument: Any) -> None:
    engine = instrument(tiny_engine, gated=True)

    async def scenario() -> None:
        batcher = Batcher(engine, queue_capacity=2, max_batch_size=4, batch_wait_ms=0)
        await batcher.start()
        try:
            running = asyncio.create_task(batcher.generate(_request("first")))
            while not engine.entered.is_set():
                await asyncio.sleep(0.01)
            gone = _request("gone")
            waiting = asyncio.create_task(batcher.generate(_request("kept")))
            disconnected = asyncio.create_task(batcher.generate(gone, is_disconnected=_always_true))
            await asyncio.sleep(0)
            with pytest.raises(QueueFullError):
                await batcher.generate(_request("refused"))
            with pytest.raises(ClientGone):
                await disconnected
            assert gone.cancel.is_set()
            engine.release.set()
            first, kept = await running, await waiting
            assert first.finish_reason in ("stop", "length") and kept.finish_reason in ("stop", "length")
            assert engine.batches == [1, 1]  # the disconnected request never reached the engine
            assert all(r.request_id != gone.request_id for r in engine.requests)
        finally:
            await batcher.stop()

    asyncio.run(scenario())


async def _always_true() -> bool:
    return True


@pytest.mark.parametrize("checks_prompts", [True, False])
def test_batcher_prompt_bound_with_or_without_the_engine_check(
    tiny_engine: Any, instrument: Any, checks_prompts: bool
) -> None:
    engine = instrument(tiny_engine, checks_prompts=checks_prompts)
    good = _request("hi")
    bound = tiny_engine.count_tokens(good) + 2
    long = _request("word " * 40)

    async def scenario() -> None:
        # A long wait for batching, cut short because the second request is known to be on its way.
        batcher = Batcher(engine, max_prompt_tokens=bound, batch_wait_ms=5000)
        await batcher.start()
        try:
            arrival = batcher.arrival()
            started = asyncio.get_running_loop().time()
            first = asyncio.create_task(batcher.generate(good))
            await asyncio.sleep(0.05)
            second = asyncio.create_task(batcher.generate(long, arrival=arrival))
            response = await first
            with pytest.raises(PromptError) as info:
                await second
            assert asyncio.get_running_loop().time() - started < 2.5
        finally:
            await batcher.stop()
        assert response.finish_reason in ("stop", "length") and response.prompt_tokens == bound - 2
        assert info.value.limit == bound and info.value.n_tokens is not None and info.value.n_tokens > bound
        assert "limit of" in str(info.value) and "word" not in str(info.value)
        # refused while its prompt was built, before it was queued: only the good one generated
        assert engine.prepared == 2 and engine.batches == [1]
        assert engine.counted == (0 if checks_prompts else 2)  # an engine that does not check is counted
        assert all(t.startswith("emma-prepare") for t in engine.threads["prepare"])

    asyncio.run(scenario())


def test_batcher_never_delays_a_lone_request(tiny_engine: Any, instrument: Any) -> None:
    engine = instrument(tiny_engine)

    async def scenario() -> None:
        batcher = Batcher(engine, batch_wait_ms=5000)
        await batcher.start()
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            await batcher.generate(_request("alone"))
            assert loop.time() - started < 2.5
            # an arrival that ends without its request being queued (refused) stops the wait too
            arrival = batcher.arrival()
            started = loop.time()
            task = asyncio.create_task(batcher.generate(_request("waits briefly")))
            await asyncio.sleep(0.05)
            arrival.done()
            await task
            assert loop.time() - started < 2.5
            assert engine.batches == [1, 1] and batcher.depth == 0
        finally:
            await batcher.stop()

    asyncio.run(scenario())


def test_batcher_stream_prompt_check_and_early_close(tiny_engine: Any, instrument: Any) -> None:
    engine = instrument(tiny_engine)

    async def scenario() -> None:
        batcher = Batcher(engine, max_prompt_tokens=4)
        await batcher.start()
        try:
            with pytest.raises(PromptError) as info:
                await batcher.open_stream(_request("far more than four tokens in this prompt"))
            assert info.value.limit == 4 and info.value.n_tokens is not None and info.value.n_tokens > 4
        finally:
            await batcher.stop()
        batcher = Batcher(engine)
        await batcher.start()
        try:
            request = GenerationRequest(
                [Message.text("user", "Tell me a long story.")],
                SamplingParams(max_new_tokens=3000, temperature=1.0, seed=1),
            )
            chunks = await batcher.open_stream(request)
            first = await chunks.__anext__()
            assert first.delta
            await chunks.aclose()  # the consumer leaves early
            assert request.cancel.is_set()
            while batcher.active:
                await asyncio.sleep(0.02)
            assert engine.finals[-1].finish_reason == "cancelled"
            assert engine.finals[-1].completion_tokens < 3000
        finally:
            await batcher.stop()

    asyncio.run(scenario())


def test_batcher_batches_concurrent_streams(tiny_engine: Any, instrument: Any) -> None:
    engine = instrument(tiny_engine, gated=True)

    async def collect(batcher: Batcher, request: GenerationRequest) -> tuple[str, Any]:
        chunks = await batcher.open_stream(request)
        text, final = "", None
        async for chunk in chunks:
            text += chunk.delta
            final = chunk.response or final
        return text, final

    async def scenario() -> None:
        batcher = Batcher(engine, max_batch_size=4, batch_wait_ms=0, max_prompt_tokens=40)
        await batcher.start()
        try:
            busy = asyncio.create_task(batcher.generate(_request("hold the worker")))
            while not engine.entered.is_set():
                await asyncio.sleep(0.01)
            texts = ["first stream", "a second, longer stream prompt", "third"]
            streams = [asyncio.create_task(collect(batcher, _request(t, 6))) for t in texts]
            refused = asyncio.create_task(collect(batcher, _request("many words " * 30, 6)))
            other = asyncio.create_task(collect(batcher, _request("other sampling", 3)))
            while batcher.depth < 4:  # the over-long one is refused while its prompt is built, unqueued
                await asyncio.sleep(0.01)
            engine.release.set()
            await busy
            results = await asyncio.gather(*streams)
            with pytest.raises(PromptError) as info:
                await refused
            assert info.value.limit == 40
            other_text, other_final = await other
        finally:
            await batcher.stop()
        # one batch of the three streams (the fourth was refused by its prompt bound before it was
        # queued), then the other sampling alone
        assert engine.stream_batches == [3, 1] and batcher.largest_batch == 3
        for text, (streamed, final) in zip(texts, results, strict=True):
            assert final is not None and final.finish_reason == "length" and final.completion_tokens == 6
            assert streamed == final.text == tiny_engine.generate([_request(text, 6)])[0].text
        assert (
            other_final is not None and other_final.completion_tokens == 3 and other_text == other_final.text
        )

    asyncio.run(scenario())


def test_stream_batches_stay_within_the_engines_batch_size(instrument: Any) -> None:
    engine = instrument(TransformersEngine(load_tiny("llava"), max_batch_size=2), gated=True)

    async def consume(batcher: Batcher, request: GenerationRequest) -> str:
        text = ""
        async for chunk in await batcher.open_stream(request):
            text += chunk.delta
        return text

    async def scenario() -> None:
        batcher = Batcher(engine, max_batch_size=8, batch_wait_ms=0)
        await batcher.start()
        try:
            busy = asyncio.create_task(batcher.generate(_request("hold the worker")))
            while not engine.entered.is_set():
                await asyncio.sleep(0.01)
            streams = [asyncio.create_task(consume(batcher, _request(t, 3))) for t in ("a", "b", "c")]
            while batcher.depth < 3:
                await asyncio.sleep(0.01)
            engine.release.set()
            await busy
            await asyncio.gather(*streams)
        finally:
            await batcher.stop()

    asyncio.run(scenario())
    assert engine.stream_batches == [2, 1]


# ------------------------------------------------------------------------------------ engine failures


class _FailingEngine:
    """Fault injection around the real engine: ``generate`` raises, ``stream`` breaks after one chunk."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    @property
    def capabilities(self) -> Any:
        return self.inner.capabilities

    def close(self) -> None:
        self.inner.close()

    @property
    def model_name(self) -> str:
        return self.inner.model_name

    @property
    def family(self) -> str | None:
        return self.inner.family

    def count_tokens(self, request: GenerationRequest) -> int:
        return self.inner.count_tokens(request)

    def prepare(self, request: GenerationRequest) -> None:
        self.inner.prepare(request)

    def generate(self, requests: Any) -> Any:
        raise RuntimeError("backend lost SECRET-DETAIL")

    def stream(self, request: GenerationRequest) -> Any:
        chunks = self.inner.stream(request)
        try:
            yield next(chunks)
            raise RuntimeError("backend lost SECRET-DETAIL")
        finally:
            chunks.close()

    def stream_many(self, requests: Any) -> Any:
        pairs = self.inner.stream_many(requests)
        try:
            yield next(pairs)
            raise RuntimeError("backend lost SECRET-DETAIL")
        finally:
            pairs.close()


def test_engine_failures_are_reported_without_detail(tiny_engine: Any, make_settings: Any) -> None:
    with TestClient(create_app(_FailingEngine(tiny_engine), make_settings())) as c:
        body = {
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "temperature": 1.0,
            "seed": 1,
            "max_tokens": 32,
        }
        r = c.post(CHAT, json=body)
        err = _error(r, 500, "engine_error")
        assert err["type"] == "server_error" and "SECRET" not in r.text
        r = c.post(CHAT, json={**body, "stream": True})
        assert r.status_code == 200  # the failure came after the stream started
        events = [line.removeprefix("data: ") for line in r.text.splitlines() if line]
        assert events[-1] == "[DONE]" and "SECRET" not in r.text
        assert json.loads(events[-2])["error"]["code"] == "engine_error"
        assert json.loads(events[0])["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_engine_failure_in_a_stream_batch_reaches_every_stream(tiny_engine: Any) -> None:
    async def consume(batcher: Batcher, request: GenerationRequest) -> str:
        chunks = await batcher.open_stream(request)
        text = ""
        async for chunk in chunks:
            text += chunk.delta
        return text

    async def scenario() -> tuple[list[Any], int]:
        batcher = Batcher(_FailingEngine(tiny_engine), max_batch_size=4)
        await batcher.start()
        try:
            with batcher.preparing():  # both on their way: the worker waits to batch them
                tasks = [asyncio.create_task(consume(batcher, _request(t, 8))) for t in ("one", "two")]
                await asyncio.sleep(0.05)
            return await asyncio.gather(*tasks, return_exceptions=True), batcher.largest_batch
        finally:
            await batcher.stop()

    outcomes, largest = asyncio.run(scenario())
    assert largest == 2
    assert [type(o).__name__ for o in outcomes] == ["EngineFailure", "EngineFailure"]
    assert all("SECRET" not in str(o) for o in outcomes)


def test_ignore_eos_reaches_the_engine_strictly_typed(
    tiny_engine: Any, make_settings: Any, instrument: Any
) -> None:
    engine = instrument(tiny_engine)
    with TestClient(create_app(engine, make_settings())) as c:
        body = {"messages": _user(_text("Count.")), "max_tokens": 5}
        r = c.post(CHAT, json={**body, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 5
        assert c.post(CHAT, json=body).status_code == 200
        assert [q.sampling.ignore_eos for q in engine.requests] == [True, False]
        _error(c.post(CHAT, json={**body, "ignore_eos": "yes"}), 422, "validation_error")
