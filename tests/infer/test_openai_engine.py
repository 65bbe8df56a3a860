"""OpenAIEngine against a deterministic OpenAI-shaped peer on loopback (a test peer, not the product)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
from PIL import Image

from emma.data.formats import decode_data_url
from emma.infer.engine import Engine
from emma.infer.factory import load_engine
from emma.infer.openai_engine import OpenAIEngine
from emma.infer.types import GenerationRequest, ImagePart, Message, SamplingParams, TextPart
from emma.serve.batcher import Batcher


@dataclass
class PeerState:
    """What the peer saw, and how it should misbehave."""

    fail_503: dict[str, int] = field(default_factory=dict)  # text → how many 503s before success
    delay_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    in_flight: int = 0
    max_in_flight: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)
    auth: list[str] = field(default_factory=list)


def _last_user_text(body: dict[str, Any]) -> str:
    content = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
    if isinstance(content, str):
        return content
    return " ".join(p["text"] for p in content if p["type"] == "text")


def _image_sizes(body: dict[str, Any]) -> list[str]:
    sizes = []
    for m in body["messages"]:
        if isinstance(m["content"], list):
            for p in m["content"]:
                if p["type"] == "image_url":
                    import io

                    data = decode_data_url(p["image_url"]["url"])
                    with Image.open(io.BytesIO(data)) as im:
                        sizes.append(f"{im.format}:{im.width}x{im.height}")
    return sizes


def _answer(body: dict[str, Any]) -> tuple[str, str]:
    """Deterministic answer: 'echo <text> images=<sizes>' cut at max_tokens words and at stop strings."""
    text = f"echo {_last_user_text(body)} images={','.join(_image_sizes(body)) or 'none'}"
    if body.get("seed") is not None:
        text += f" seed={body['seed']}"
    words = text.split(" ")
    finish = "stop"
    if len(words) > body.get("max_tokens", 10_000):
        words, finish = words[: body["max_tokens"]], "length"
    text = " ".join(words)
    for s in body.get("stop") or []:
        if s in text:
            text, finish = text[: text.index(s)], "stop"
    return text, finish


class _Handler(BaseHTTPRequestHandler):
    server: Any

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        state = self.server.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with state.lock:
            state.bodies.append(body)
            state.auth.append(self.headers.get("Authorization", ""))
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
            key = _last_user_text(body)
            state.attempts[key] = state.attempts.get(key, 0) + 1
            attempt = state.attempts[key]
        time.sleep(state.delay_s)
        # leave "in flight" before answering: the client frees its slot as soon as it has the answer
        with state.lock:
            state.in_flight -= 1
        if attempt <= state.fail_503.get(key, 0):
            self._json(
                503,
                {"error": {"message": "overloaded", "type": "server_error", "code": 503}},
                {"Retry-After": "0.01"},
            )
            return
        if key.startswith("BAD"):
            self._json(
                400, {"error": {"message": "bad request", "type": "invalid_request_error", "code": 400}}
            )
            return
        text, finish = _answer(body)
        prompt = len(json.dumps(body["messages"])) // 4
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": len(text.split()),
            "total_tokens": prompt + len(text.split()),
        }
        if body.get("stream"):
            self._stream(text, finish, usage)
            return
        self._json(
            200,
            {
                "id": "c1",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": finish,
                    }
                ],
                "usage": usage,
            },
        )

    def _stream(self, text: str, finish: str, usage: dict[str, int]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()

        def send(obj: dict[str, Any]) -> None:
            self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
            self.wfile.flush()

        base = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m"}
        words = text.split(" ")
        for i, w in enumerate(words):
            delta = w if i == 0 else " " + w
            send({**base, "choices": [{"index": 0, "delta": {"content": delta}, "finish_reason": None}]})
            time.sleep(0.005)
        send({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        send({**base, "choices": [], "usage": usage})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


@pytest.fixture()
def peer(loopback_http: Callable[[type[BaseHTTPRequestHandler], Any], str]) -> tuple[str, PeerState]:
    state = PeerState()
    return loopback_http(_Handler, state), state


def _req(text: str, **sampling: Any) -> GenerationRequest:
    return GenerationRequest([Message.text("user", text)], SamplingParams(**sampling))


def test_generate_maps_messages_sampling_and_usage(peer: tuple[str, PeerState]) -> None:
    url, state = peer
    engine = OpenAIEngine(url, "peer-model", api_key="k1", family="qwen2_5_vl")
    assert isinstance(engine, Engine)
    assert engine.family == "qwen2_5_vl" and engine.model_name == "peer-model"
    img = Image.new("RGB", (40, 30), (200, 10, 10))
    request = GenerationRequest(
        [
            Message.text("system", "be brief"),
            Message("user", [ImagePart(img), TextPart("what is this")]),
        ],
        SamplingParams(max_new_tokens=50, temperature=0.7, top_p=0.9, stop=["zzz"], seed=5),
    )
    [response] = engine.generate([request])
    assert response.finish_reason == "stop", response.error
    assert response.text == "echo what is this images=PNG:40x30 seed=5"
    assert response.request_id == request.request_id
    assert response.completion_tokens == len(response.text.split())
    assert response.prompt_tokens > 0
    body = state.bodies[0]
    assert body["model"] == "peer-model"
    assert body["temperature"] == 0.7 and body["top_p"] == 0.9 and body["max_tokens"] == 50
    assert body["stop"] == ["zzz"] and body["seed"] == 5
    assert body["messages"][0] == {"role": "system", "content": "be brief"}
    assert body["messages"][1]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert state.auth[0] == "Bearer k1"


def test_ignore_eos_is_sent_in_the_body_only_when_asked(peer: tuple[str, PeerState]) -> None:
    url, state = peer
    engine = OpenAIEngine(url, "m")
    engine.generate([_req("forced", ignore_eos=True), _req("plain")])
    bodies = {b["messages"][0]["content"]: b for b in state.bodies}
    assert bodies["forced"]["ignore_eos"] is True
    assert "ignore_eos" not in bodies["plain"]


def test_length_and_stop(peer: tuple[str, PeerState]) -> None:
    url, _ = peer
    engine = OpenAIEngine(url, "m")
    short, stopped = engine.generate(
        [_req("a b c d e f", max_new_tokens=3), _req("one two three", stop=["two"])]
    )
    assert (short.text, short.finish_reason) == ("echo a b", "length")
    assert (stopped.text, stopped.finish_reason) == ("echo one ", "stop")


def test_retries_503_then_succeeds(peer: tuple[str, PeerState]) -> None:
    url, state = peer
    state.fail_503["flaky"] = 2
    engine = OpenAIEngine(url, "m", max_retries=3)
    [response] = engine.generate([_req("flaky")])
    assert response.finish_reason == "stop", response.error
    assert response.text.startswith("echo flaky")
    assert state.attempts["flaky"] == 3


def test_retries_exhausted_is_an_error_response(peer: tuple[str, PeerState]) -> None:
    url, state = peer
    state.fail_503["down"] = 10
    engine = OpenAIEngine(url, "m", max_retries=1)
    [response] = engine.generate([_req("down")])
    assert response.finish_reason == "error"
    assert response.error is not None and "503" in response.error and "\n" not in response.error
    assert state.attempts["down"] == 2


def test_concurrency_limit_and_errors_per_request(peer: tuple[str, PeerState]) -> None:
    url, state = peer
    state.delay_s = 0.05
    engine = OpenAIEngine(url, "m", concurrency=3, max_retries=0)
    texts = [f"q{i}" for i in range(10)] + ["BAD one"]
    responses = engine.generate([_req(t) for t in texts])
    assert [r.text.split(" ")[1] for r in responses[:10]] == [f"q{i}" for i in range(10)]  # order kept
    assert all(r.finish_reason == "stop" for r in responses[:10])
    assert responses[10].finish_reason == "error" and "400" in (responses[10].error or "")
    assert state.max_in_flight == 3  # limit reached and never exceeded


def test_concurrency_limit_holds_across_calling_threads(peer: tuple[str, PeerState]) -> None:
    url, state = peer
    state.delay_s = 0.05
    engine = OpenAIEngine(url, "m", concurrency=2)
    threads = [
        threading.Thread(target=engine.generate, args=([_req(f"t{i}"), _req(f"u{i}")],)) for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(state.bodies) == 8
    assert state.max_in_flight == 2


def test_stream_concatenates_to_generate(peer: tuple[str, PeerState]) -> None:
    url, _ = peer
    engine = OpenAIEngine(url, "m")
    chunks = list(engine.stream(_req("stream me please")))
    final = chunks[-1].response
    assert final is not None and final.finish_reason == "stop"
    streamed = "".join(c.delta for c in chunks)
    assert streamed == final.text == engine.generate([_req("stream me please")])[0].text
    assert len([c for c in chunks if c.delta]) > 3
    assert final.completion_tokens == len(final.text.split()) and final.first_token_s is not None


def test_stream_cancel_stops_early(peer: tuple[str, PeerState]) -> None:
    url, _ = peer
    engine = OpenAIEngine(url, "m")
    request = _req(" ".join(f"w{i}" for i in range(200)))
    got = []
    for chunk in engine.stream(request):
        if chunk.response is not None:
            final = chunk.response
            break
        got.append(chunk.delta)
        if len(got) == 3:
            request.cancel.set()
    assert final.finish_reason == "cancelled"
    assert len(final.text.split()) < 10


def test_stream_many_runs_the_streams_together(peer: tuple[str, PeerState]) -> None:
    url, state = peer
    state.delay_s = 0.2
    engine = OpenAIEngine(url, "m", concurrency=4, max_retries=0)
    assert engine.capabilities.batched_streams
    texts = ["first stream", "second one here", "BAD third"]
    deltas: dict[int, list[str]] = {0: [], 1: [], 2: []}
    finals = {}
    for index, chunk in engine.stream_many([_req(t) for t in texts]):
        assert index not in finals  # nothing after a stream's last chunk
        deltas[index].append(chunk.delta)
        if chunk.response is not None:
            finals[index] = chunk.response
    assert state.max_in_flight == 3  # one at a time would be 1
    for i in (0, 1):
        assert finals[i].finish_reason == "stop" and "".join(deltas[i]) == finals[i].text
        assert finals[i].text.startswith(f"echo {texts[i]}")
    assert finals[2].finish_reason == "error" and "400" in (finals[2].error or "")


def test_stream_many_closed_early_returns(peer: tuple[str, PeerState]) -> None:
    url, _ = peer
    engine = OpenAIEngine(url, "m", concurrency=2)
    long = " ".join(f"w{i}" for i in range(300))
    pairs = engine.stream_many([_req(long), _req(long)])
    index, chunk = next(pairs)
    assert chunk.delta and index in (0, 1)
    started = time.perf_counter()
    pairs.close()  # stops both streams at their next chunk
    assert time.perf_counter() - started < 5


def test_batcher_sends_concurrent_streams_to_the_server_together(peer: tuple[str, PeerState]) -> None:
    url, state = peer
    state.delay_s = 0.2
    engine = OpenAIEngine(url, "m", concurrency=4)

    async def scenario() -> list[str]:
        batcher = Batcher(engine, count_prompts=False, batch_wait_ms=2000)
        await batcher.start()
        try:
            arrivals = [batcher.arrival() for _ in range(3)]  # three requests on their way

            async def one(text: str, arrival: Any) -> str:
                chunks = await batcher.open_stream(_req(text), arrival=arrival)
                return "".join([c.delta async for c in chunks])

            return await asyncio.gather(*(one(f"s{i}", a) for i, a in enumerate(arrivals)))
        finally:
            await batcher.stop()

    texts = asyncio.run(scenario())
    assert [t.split(" ")[1] for t in texts] == ["s0", "s1", "s2"]
    assert state.max_in_flight == 3  # the batcher ran them as one group, not one after another


def test_stream_error_in_final_chunk(peer: tuple[str, PeerState]) -> None:
    url, _ = peer
    engine = OpenAIEngine(url, "m", max_retries=0)
    chunks = list(engine.stream(_req("BAD stream")))
    assert len(chunks) == 1 and chunks[0].response is not None
    assert chunks[0].response.finish_reason == "error" and "400" in (chunks[0].response.error or "")


def test_unreachable_server_reports_error() -> None:
    engine = OpenAIEngine("http://127.0.0.1:9/v1", "m", max_retries=0, timeout=5)
    [response] = engine.generate([_req("hello")])
    assert response.finish_reason == "error"
    assert response.error == "cannot connect to the model server"


def test_count_tokens_and_cancelled_before_start(peer: tuple[str, PeerState]) -> None:
    url, state = peer
    engine = OpenAIEngine(url, "m")
    request = _req("count me")
    assert engine.count_tokens(request) == len(json.dumps(state.bodies[0]["messages"])) // 4
    assert state.bodies[0]["max_tokens"] == 1
    request.cancel.set()
    [response] = engine.generate([request])
    assert response.finish_reason == "cancelled" and len(state.bodies) == 1


def test_factory_openai_spec_and_env_key(
    peer: tuple[str, PeerState], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, state = peer
    monkeypatch.setenv("EMMA_OPENAI_API_KEY", "from-env")
    engine = load_engine(f"openai:{url}#served-model")
    assert isinstance(engine, OpenAIEngine) and engine.model_name == "served-model"
    [response] = engine.generate([_req("hi")])
    assert response.finish_reason == "stop"
    assert state.bodies[0]["model"] == "served-model" and state.auth[0] == "Bearer from-env"
