"""The real ``openai`` Python client against `emma serve`'s app on loopback, with a real tiny model."""

from __future__ import annotations

import base64
import http.server
import io
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from emma.io.image import ImageFit
from emma.io.load import load_images
from emma.serve.app import create_app
from emma.serve.security import AUDIT_LOGGER_NAME


def _client(base_url: str, api_key: str = "unused", **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=60, **kw)


def _image_message(*urls: str, text: str = "What do you see?") -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def _extra(obj: Any, key: str) -> Any:
    return (obj.model_extra or {}).get(key)


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return _client(base_url)


@pytest.fixture(scope="module")
def model_id(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


# ------------------------------------------------------------------------------------------ chat


def test_chat_with_png_data_url(
    client: openai.OpenAI, model_id: str, png_url: str, served_fit: ImageFit
) -> None:
    resp = client.chat.completions.create(model=model_id, messages=_image_message(png_url), max_tokens=8)
    choice = resp.choices[0]
    assert resp.object == "chat.completion" and resp.model == model_id
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage is not None
    assert resp.usage.prompt_tokens > 0
    assert 1 <= resp.usage.completion_tokens <= 8
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    emma = _extra(resp, "emma")
    assert emma["mode"] == "chat"
    width, height = served_fit.size_for(64, 48)  # downscaled when decoded to what the model uses
    assert (width, height) < (64, 48)
    assert emma["images"] == [{"index": 0, "width": width, "height": height, "source_format": "png"}]
    assert emma["notice"] == "Research tool, not for clinical use."


def test_chat_with_dicom_data_url_and_window(
    client: openai.OpenAI, model_id: str, dicom_url: str, dicom_path: Any, served_fit: ImageFit
) -> None:
    resp = client.chat.completions.create(
        model=model_id,
        messages=_image_message(dicom_url),
        max_tokens=4,
        extra_body={"emma": {"window": "abdomen"}},
    )
    expected = load_images(dicom_path, window="abdomen", fit=served_fit)[0]
    emma = _extra(resp, "emma")
    assert emma["images"] == [
        {"index": 0, "width": expected.width, "height": expected.height, "source_format": "dicom"}
    ]
    assert resp.usage is not None and resp.usage.completion_tokens >= 1


def test_image_tokens_count_in_usage(client: openai.OpenAI, model_id: str, png_url: str) -> None:
    text_only = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "What do you see?"}], max_tokens=1
    )
    with_image = client.chat.completions.create(
        model=model_id, messages=_image_message(png_url), max_tokens=1
    )
    assert text_only.usage is not None and with_image.usage is not None
    assert with_image.usage.prompt_tokens > text_only.usage.prompt_tokens


def test_streaming_matches_non_streaming(
    client: openai.OpenAI, model_id: str, png_url: str, served_fit: ImageFit
) -> None:
    messages = _image_message(png_url)
    whole = client.chat.completions.create(model=model_id, messages=messages, max_tokens=12)
    chunks = list(
        client.chat.completions.create(model=model_id, messages=messages, max_tokens=12, stream=True)
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content  # greedy: the same answer either way
    assert len(chunks) >= 3  # role, at least one delta, final
    assert last.usage is not None and whole.usage is not None
    assert last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    emma = _extra(last, "emma")
    assert emma["mode"] == "chat" and emma["images"][0]["width"] == served_fit.size_for(64, 48)[0]


def test_stream_ends_with_done_line(base_url: str, png_url: str) -> None:
    body = {"messages": _image_message(png_url), "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_seed_makes_sampling_repeatable_and_stop_cuts(client: openai.OpenAI, model_id: str) -> None:
    messages = [{"role": "user", "content": "Tell me a story."}]
    kw: dict[str, Any] = {"model": model_id, "messages": messages, "max_tokens": 24, "temperature": 1.0}
    a = client.chat.completions.create(seed=11, **kw).choices[0].message.content or ""
    b = client.chat.completions.create(seed=11, **kw).choices[0].message.content or ""
    assert a == b and a
    # A stop string taken from the middle of the seeded answer cuts the same answer right before it.
    middle = len(a) // 2
    stop = a[middle : middle + 3]
    assert stop.strip(), "the sampled text should have visible characters"
    cut = client.chat.completions.create(seed=11, stop=[stop], **kw)
    assert cut.choices[0].message.content == a[: a.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------------------------------- emma modes


def test_structured_mode_has_emma_object(client: openai.OpenAI, model_id: str, png_url: str) -> None:
    resp = client.chat.completions.create(
        model=model_id,
        messages=_image_message(png_url, text="Any fracture?"),
        max_tokens=16,
        extra_body={"emma": {"mode": "structured", "context": "fall from standing, wrist pain"}},
    )
    emma = _extra(resp, "emma")
    assert emma["mode"] == "structured"
    # A random-weight model does not write valid JSON: the result is reported, never a crash.
    assert emma["structured"] is None
    assert emma["structured_errors"], "an unreadable structured answer must be reported"
    assert emma["images"][0]["source_format"] == "png"
    assert isinstance(emma["boxes"], list) and isinstance(emma["box_errors"], list)


def test_report_mode_has_report_object(client: openai.OpenAI, model_id: str, dicom_url: str) -> None:
    resp = client.chat.completions.create(
        model=model_id,
        messages=_image_message(dicom_url, text=""),
        max_tokens=8,
        extra_body={"emma": {"mode": "report"}},
    )
    emma = _extra(resp, "emma")
    assert emma["mode"] == "report"
    assert set(emma["report"]) == {"findings", "impression"}
    assert emma["report_errors"], "a draft without sections is reported"


# ------------------------------------------------------------------------------------------- errors


def _status_error(call: Any) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value


def _error_code(exc: openai.APIStatusError) -> str:
    body = exc.body
    assert isinstance(body, dict) and set(body) >= {"message", "type", "code"}, body
    return str(body["code"])


def test_bad_image_is_400_json(client: openai.OpenAI, model_id: str) -> None:
    garbage = "data:image/png;base64," + base64.b64encode(b"not an image at all" * 20).decode()
    exc = _status_error(
        lambda: client.chat.completions.create(model=model_id, messages=_image_message(garbage))
    )
    assert exc.status_code == 400 and _error_code(exc) == "invalid_image"
    assert "image 0" in exc.message and "/tmp" not in exc.message


def test_too_many_images_is_413(client: openai.OpenAI, model_id: str, png_url: str) -> None:
    exc = _status_error(
        lambda: client.chat.completions.create(model=model_id, messages=_image_message(*[png_url] * 4))
    )
    assert exc.status_code == 413 and _error_code(exc) == "too_many_images"


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("https://example.org/chest.png", "remote_image_refused"),
        ("http://127.0.0.1:9/x.png", "remote_image_refused"),
        ("file:///etc/passwd", "unsupported_image_url"),
        ("/etc/passwd", "unsupported_image_url"),
    ],
)
def test_remote_and_local_urls_refused(client: openai.OpenAI, model_id: str, url: str, code: str) -> None:
    exc = _status_error(lambda: client.chat.completions.create(model=model_id, messages=_image_message(url)))
    assert exc.status_code == 400 and _error_code(exc) == code


def test_oversized_body_is_413(client: openai.OpenAI, model_id: str) -> None:
    big = "data:image/png;base64," + "A" * (3 * 1024**2)  # over the tests' 2 MiB body bound
    exc = _status_error(lambda: client.chat.completions.create(model=model_id, messages=_image_message(big)))
    assert exc.status_code == 413 and _error_code(exc) == "body_too_large"


def test_max_tokens_over_cap_and_unknown_model(client: openai.OpenAI, model_id: str) -> None:
    messages = [{"role": "user", "content": "hi"}]
    exc = _status_error(
        lambda: client.chat.completions.create(model=model_id, messages=messages, max_tokens=65)
    )
    assert exc.status_code == 400 and _error_code(exc) == "max_tokens_too_large"
    exc = _status_error(lambda: client.chat.completions.create(model="gpt-4o", messages=messages))
    assert exc.status_code == 404 and _error_code(exc) == "model_not_found"


# --------------------------------------------------------------------------------------------- auth


def test_api_key_required_when_set(tiny_engine: Any, serve: Any, make_settings: Any) -> None:
    with serve(create_app(tiny_engine, make_settings(api_key="s3cret-key"))) as url:
        r = httpx.get(f"{url}/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
        with pytest.raises(openai.AuthenticationError) as info:
            _client(url, api_key="wrong-key").models.list()
        assert info.value.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            _client(url, api_key="wrong-key").chat.completions.create(
                model="x", messages=[{"role": "user", "content": "hi"}]
            )
        good = _client(url, api_key="s3cret-key")
        assert good.models.list().data[0].id == tiny_engine.model_name
        resp = good.chat.completions.create(
            model=tiny_engine.model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert resp.choices[0].message.content is not None
        assert httpx.get(f"{url}/health").status_code == 200  # health needs no key


# ---------------------------------------------------------------------------------- queue, batching


def _in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except Exception as exc:  # noqa: BLE001 — inspected by the test
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def _wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def test_full_queue_answers_503_with_retry_after(
    tiny_engine: Any, serve: Any, make_settings: Any, instrument: Any
) -> None:
    engine = instrument(tiny_engine, gated=True)
    settings = make_settings(queue_capacity=1, max_batch_size=1)
    with serve(create_app(engine, settings)) as url:
        c = _client(url)
        ask = lambda: c.chat.completions.create(  # noqa: E731
            model=engine.model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        first, first_box = _in_thread(ask)
        assert engine.entered.wait(20), "the first request should reach the engine"
        second, second_box = _in_thread(ask)
        _wait_for(lambda: httpx.get(f"{url}/health").json()["queue"]["depth"] == 1)
        exc = _status_error(ask)
        assert exc.status_code == 503 and _error_code(exc) == "queue_full"
        assert exc.response.headers["retry-after"] == "1"
        engine.release.set()
        first.join(30)
        second.join(30)
        assert "error" not in first_box and "error" not in second_box
        assert first_box["result"].choices[0].finish_reason in ("stop", "length")
        assert second_box["result"].choices[0].finish_reason in ("stop", "length")


def test_waiting_requests_are_batched(
    tiny_engine: Any, serve: Any, make_settings: Any, instrument: Any
) -> None:
    engine = instrument(tiny_engine, gated=True)
    app = create_app(engine, make_settings(queue_capacity=8, max_batch_size=8))
    with serve(app) as url:
        c = _client(url)

        def ask(i: int) -> Any:
            return lambda: c.chat.completions.create(
                model=engine.model_name, messages=[{"role": "user", "content": f"question {i}"}], max_tokens=3
            )

        first, first_box = _in_thread(ask(0))
        assert engine.entered.wait(20)
        others = [_in_thread(ask(i)) for i in range(1, 6)]
        _wait_for(lambda: httpx.get(f"{url}/health").json()["queue"]["depth"] == 5)
        engine.release.set()
        for t, _ in [(first, first_box), *others]:
            t.join(60)
        assert all("error" not in box for _, box in [(first, first_box), *others])
        assert engine.batches == [1, 5]  # the five waiting requests went to the engine as one batch
        assert app.state.batcher.largest_batch == 5
        # Each got its own answer (the same as it gets alone: greedy, left-padded batch).
        alone = c.chat.completions.create(
            model=engine.model_name, messages=[{"role": "user", "content": "question 3"}], max_tokens=3
        )
        assert others[2][1]["result"].choices[0].message.content == alone.choices[0].message.content


def test_client_disconnect_cancels_stream(
    tiny_engine: Any, serve: Any, make_settings: Any, instrument: Any
) -> None:
    engine = instrument(tiny_engine)
    limit = 4000
    with serve(create_app(engine, make_settings(max_tokens=limit))) as url:
        c = _client(url)
        stream = c.chat.completions.create(
            model=engine.model_name,
            messages=[{"role": "user", "content": "Tell me a long story."}],
            max_tokens=limit,
            temperature=1.0,
            seed=1,  # sampled words with spaces between them stream word by word
            stream=True,
        )
        it = iter(stream)
        assert next(it).choices[0].delta.role == "assistant"
        assert next(it).choices[0].delta.content  # the first words: generation is running
        stream.close()  # the client goes away
        _wait_for(lambda: len(engine.finals) == 1, timeout=30)
        assert engine.requests[0].cancel.is_set()
        assert engine.finals[0].finish_reason == "cancelled"
        assert engine.finals[0].completion_tokens < limit
        _wait_for(lambda: httpx.get(f"{url}/health").json()["queue"]["active"] == 0, timeout=10)


# -------------------------------------------------------------------------------- other endpoints


def test_models_and_health(client: openai.OpenAI, base_url: str, tiny_engine: Any) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [tiny_engine.model_name]
    assert models.data[0].owned_by == "emma"
    health = httpx.get(f"{base_url}/health").json()
    assert health["status"] == "ok" and health["model"] == tiny_engine.model_name
    assert health["queue"]["capacity"] == 64 and health["queue"]["depth"] == 0


def test_preview_returns_model_ready_pixels(
    base_url: str, dicom_url: str, dicom_path: Any, served_fit: ImageFit
) -> None:
    r = httpx.post(f"{base_url}/v1/emma/preview", json={"images": [dicom_url], "window": "bone"}, timeout=30)
    assert r.status_code == 200
    [item] = r.json()["images"]
    expected = load_images(dicom_path, window="bone", fit=served_fit)[0]
    assert expected.provenance.steps[-1].op == "resize"  # the 128 x 128 CT is more than the model uses
    assert (item["width"], item["height"]) == (expected.width, expected.height)
    assert item["provenance"]["source"] == "upload:0" and item["provenance"]["format"] == "dicom"
    png = base64.b64decode(item["png"].split(",", 1)[1])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), expected.pixels)


# ------------------------------------------------------------------------------------- remote images


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    png = b""

    def do_GET(self) -> None:  # noqa: N802 — http.server's API
        if self.path == "/chest.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(self.png)))
            self.end_headers()
            self.wfile.write(self.png)
        elif self.path == "/same-host":
            self.send_response(302)
            self.send_header("Location", "/chest.png")
            self.end_headers()
        elif self.path == "/other-host":
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.server.server_address[1]}/chest.png")
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def image_host(png_bytes: bytes) -> Iterator[int]:
    handler = type("Handler", (_ImageHandler,), {"png": png_bytes})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_remote_images_only_from_allowed_hosts(
    tiny_engine: Any, serve: Any, make_settings: Any, image_host: int, served_fit: ImageFit
) -> None:
    settings = make_settings(allow_remote_images=True, allowed_domains=("127.0.0.1",))
    with serve(create_app(tiny_engine, settings)) as url:
        c = _client(url)

        def ask(image_url: str) -> Any:
            return c.chat.completions.create(
                model=tiny_engine.model_name, messages=_image_message(image_url), max_tokens=2
            )

        ok = ask(f"http://127.0.0.1:{image_host}/chest.png")
        assert _extra(ok, "emma")["images"][0]["source_format"] == "png"
        ok = ask(f"http://127.0.0.1:{image_host}/same-host")
        assert _extra(ok, "emma")["images"][0]["width"] == served_fit.size_for(64, 48)[0]
        for bad in (f"http://localhost:{image_host}/chest.png", f"http://127.0.0.1:{image_host}/other-host"):
            exc = _status_error(lambda: ask(bad))  # noqa: B023
            assert exc.status_code == 400 and _error_code(exc) == "remote_image_refused"
        exc = _status_error(lambda: ask(f"http://127.0.0.1:{image_host}/missing.png"))
        assert exc.status_code == 400 and _error_code(exc) == "remote_image_failed"


# ---------------------------------------------------------------------------------------- audit log


def test_audit_log_has_one_line_per_request_and_no_content(
    client: openai.OpenAI, model_id: str, png_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    marker = "Patient Jane Q. Marker, MRN 99887766"
    with caplog.at_level(logging.DEBUG):
        raw = client.chat.completions.with_raw_response.create(
            model=model_id,
            messages=_image_message(png_url, text=marker),
            max_tokens=4,
            extra_body={"emma": {"context": marker}},
        )
        request_id = raw.headers["x-request-id"]
        resp = raw.parse()

        def audit_lines() -> list[str]:
            return [
                r.getMessage()
                for r in caplog.records
                if r.name == AUDIT_LOGGER_NAME and request_id in r.getMessage()
            ]

        _wait_for(lambda: bool(audit_lines()), timeout=5)  # written as the response ends
        time.sleep(0.2)
    audit = audit_lines()
    assert len(audit) == 1
    line = audit[0]
    assert resp.usage is not None
    assert "status=200" in line and "images=1" in line and "route=/v1/chat/completions" in line
    assert f"prompt_tokens={resp.usage.prompt_tokens}" in line
    assert f"completion_tokens={resp.usage.completion_tokens}" in line
    client_side = ("openai", "httpx", "httpcore", "httpx2", "httpcore2")
    everything = "\n".join(r.getMessage() for r in caplog.records if r.name.split(".")[0] not in client_side)
    assert "Marker" not in everything and "99887766" not in everything
    assert png_url[30:80] not in everything
    answer = (resp.choices[0].message.content or "").strip()
    if len(answer) >= 3:
        assert answer not in everything


# --------------------------------------------------------------------------------- chained servers


def test_server_fronting_another_server_through_openai_engine(
    base_url: str, tiny_engine: Any, serve: Any, make_settings: Any, png_url: str
) -> None:
    """`emma serve --model openai:URL#MODEL`: our server in front of another OpenAI-compatible one."""
    from emma.infer.openai_engine import OpenAIEngine

    upstream = OpenAIEngine(f"{base_url}/v1", tiny_engine.model_name, api_key="unused", max_retries=0)
    with serve(create_app(upstream, make_settings())) as url:
        c = _client(url)
        front = c.chat.completions.create(
            model=tiny_engine.model_name, messages=_image_message(png_url), max_tokens=6
        )
        direct = _client(base_url).chat.completions.create(
            model=tiny_engine.model_name, messages=_image_message(png_url), max_tokens=6
        )
    assert _extra(front, "emma")["images"][0]["width"] == 64
    assert front.usage is not None and front.usage.completion_tokens >= 1
    assert front.choices[0].message.content == direct.choices[0].message.content  # greedy, same model
