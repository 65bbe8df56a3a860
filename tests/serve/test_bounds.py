"""The server's memory and fairness bounds, and its strict request parsing (issue 14): decompression
bombs and oversized images refused from their headers before decoding, a memory budget (413 when a
request can never fit, 503 while others hold it), text bounded in characters before any tokenizing,
strict types. No timed assertions: ``benchmarks/bench_serve_bombs.py`` measures latency and RSS."""

from __future__ import annotations

import base64
import contextlib
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from bombs import deflate_bomb, multiframe_ct, png_header_only
from fastapi.testclient import TestClient
from PIL import Image

from emma.io.image import ImageFit
from emma.serve.app import create_app

CHAT = "/v1/chat/completions"
PREVIEW = "/v1/emma/preview"
MIB = 1024**2


def _url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _png(width: int, height: int) -> bytes:
    rng = np.random.default_rng(width * 7 + height)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _chat(*urls: str, text: str = "What is shown?", **extra: Any) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}], **extra}


def _error(r: Any, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code, error
    return error


@pytest.fixture()
def served(tiny_engine: Any, instrument: Any, make_settings: Any) -> Iterator[Any]:
    """``served(**settings) -> (client, app, engine)``: an app on an instrumented tiny engine."""
    with contextlib.ExitStack() as stack:

        def make(**overrides: Any) -> tuple[TestClient, Any, Any]:
            engine = instrument(tiny_engine)
            app = create_app(engine, make_settings(**overrides))
            client = stack.enter_context(TestClient(app))
            return client, app, engine

        yield make


# ------------------------------------------------------------------------------------- bombs (413)


def test_bombs_are_refused_from_their_headers(served: Any) -> None:
    c, app, engine = served(max_images=16, max_body_bytes=4 * MIB)
    # 16 PNGs announcing 5700 x 5700 each, with image data no decoder can read: a 413 (not a 400 for
    # the undecodable data) shows the request was refused from the headers alone
    header_only = _url(png_header_only(5700, 5700), "image/png")
    err = _error(c.post(CHAT, json=_chat(*[header_only] * 16)), 413, "too_many_pixels")
    assert "pixels" in err["message"]
    # a 512-frame DICOM whose pixel data stop after one frame: refused by its frame count, undecoded
    frames = _url(multiframe_ct(512, 16, 16, truncate_pixels=True), "application/dicom")
    _error(c.post(CHAT, json=_chat(frames)), 413, "too_many_images")
    _error(c.post(PREVIEW, json={"images": [frames]}), 413, "too_many_images")
    # a Deflate DICOM whose header is consistent: refused by its frame count before inflating anything
    bomb = _url(deflate_bomb(inflated_bytes=32 * MIB), "application/dicom")
    _error(c.post(CHAT, json=_chat(bomb)), 413, "too_many_images")
    # a Deflate DICOM announcing one small frame over pixel data that inflate past the 64 MiB file bound
    liar = deflate_bomb(inflated_bytes=96 * MIB, frames=1)
    assert len(liar) < 200_000
    err = _error(c.post(CHAT, json=_chat(_url(liar, "application/dicom"))), 413, "image_too_large")
    assert "inflate" in err["message"] and "upload" not in err["message"] and "/" not in err["message"]
    assert engine.prepared == 0 and engine.batches == []  # nothing reached the model
    assert app.state.budget.used == 0  # every reservation released


# ---------------------------------------------------------------------------------- memory budget


def test_memory_budget_refuses_what_can_never_fit_and_what_does_not_fit_now(served: Any) -> None:
    c, app, engine = served(memory_budget_mb=16, max_body_bytes=2 * MIB, max_images=4)
    budget = app.state.budget
    # decoding 1200 x 1200 pixels needs more than the whole 16 MiB budget: 413, before decoding
    err = _error(
        c.post(CHAT, json=_chat(_url(png_header_only(1200, 1200), "image/png"))), 413, "image_too_large"
    )
    assert "memory budget of 16 MiB" in err["message"]
    small = _url(_png(700, 600), "image/png")  # decoding it takes 6.4 MiB, its body 1.6 MiB
    others = budget.ledger()  # requests in flight holding most of the budget
    others.reserve(12 * MIB, "other requests")
    r = c.post(CHAT, json=_chat(small, max_tokens=2))
    _error(r, 503, "server_busy")
    assert r.headers["retry-after"] == "1"
    # a body that cannot be reserved is refused before it is read
    others.reserve(budget.total - budget.used - 1024, "more requests")
    r = c.post(CHAT, json=_chat(small, max_tokens=2))
    _error(r, 503, "server_busy")
    assert engine.prepared == 0  # neither reached the model
    others.release()
    assert budget.used == 0
    r = c.post(CHAT, json=_chat(small, max_tokens=2))
    assert r.status_code == 200, r.text
    assert budget.used == 0 and 0 < budget.peak <= budget.total
    r = c.post(CHAT, json=_chat(small, max_tokens=2, stream=True))
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    assert budget.used == 0  # released once the stream ended


def test_images_are_fitted_to_the_model_and_the_resize_recorded(served: Any, served_fit: ImageFit) -> None:
    c, app, _ = served()
    r = c.post(PREVIEW, json={"images": [_url(_png(400, 300), "image/png")]})
    assert r.status_code == 200, r.text
    [image] = r.json()["images"]
    assert (image["width"], image["height"]) == served_fit.size_for(400, 300) != (400, 300)
    resize = image["provenance"]["steps"][-1]
    assert resize["op"] == "resize" and resize["params"]["from"] == [400, 300]
    assert resize["params"]["reason"] == f"model:{app.state.engine.family}"
    assert app.state.budget.used == 0


# ------------------------------------------------------------------------------------------- text


def test_text_is_bounded_in_characters_before_tokenizing(served: Any) -> None:
    c, _, engine = served(max_text_chars=1000)
    body = {"messages": [{"role": "user", "content": "x" * 1001}]}
    err = _error(c.post(CHAT, json=body), 400, "context_length_exceeded")
    assert "1001 characters" in err["message"] and "limit of 1000" in err["message"]
    parts = {
        "role": "user",
        "content": [{"type": "text", "text": "y" * 600}, {"type": "text", "text": "z" * 300}],
    }
    _error(
        c.post(CHAT, json={"messages": [parts], "emma": {"context": "c" * 200}}),
        400,
        "context_length_exceeded",
    )
    _error(c.post(CHAT, json={**body, "stream": True}), 400, "context_length_exceeded")
    assert engine.prepared == 0  # never tokenized
    r = c.post(CHAT, json={"messages": [{"role": "user", "content": "x" * 900}], "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert engine.prepared == 1


# ----------------------------------------------------------------------------------- strict parsing


@pytest.mark.parametrize(
    "extra",
    [
        {"max_tokens": True},
        {"max_completion_tokens": False},
        {"stream": "yes"},
        {"stream": 1},
        {"n": True},
        {"temperature": "1"},
        {"temperature": True},
        {"seed": 2**64},
        {"seed": 2**63},
        {"seed": -(2**63) - 1},
        {"seed": "7"},
        {"emma": {"slices": True}},
        {"stream_options": {"include_usage": "yes"}},
    ],
)
def test_strict_types(served: Any, extra: dict[str, Any]) -> None:
    c, _, engine = served()
    body = {"messages": [{"role": "user", "content": "hi"}], **extra}
    _error(c.post(CHAT, json=body), 422, "validation_error")
    assert engine.prepared == 0


def test_seed_range_is_a_signed_64_bit_integer(served: Any) -> None:
    c, _, _ = served()
    for seed in (2**63 - 1, -(2**63), 0):
        body = {
            "messages": [{"role": "user", "content": "hi"}],
            "seed": seed,
            "temperature": 1.0,
            "max_tokens": 2,
        }
        r = c.post(CHAT, json=body)
        assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "raw",
    [
        b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',  # not UTF-8
        b"[" * 100_000,  # deeper than any parser's recursion bound
        b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"messages": [',
    ],
)
def test_unparsable_bodies_are_invalid_json(served: Any, raw: bytes) -> None:
    c, _, _ = served(max_body_bytes=4 * MIB)
    r = c.post(CHAT, content=raw, headers={"Content-Type": "application/json"})
    err = _error(r, 400, "invalid_json")
    assert err["message"] == "the request body is not valid JSON"


def test_budget_counts_and_trims_only_when_idle() -> None:
    from emma.serve.budget import TRIM_AFTER_BYTES, MemoryBudget, OverBudget, release_free_memory

    budget = MemoryBudget(256 * MIB)
    first, second = budget.ledger(), budget.ledger()
    r = first.reserve(TRIM_AFTER_BYTES, "a")
    second.reserve(10 * MIB, "b")
    with pytest.raises(OverBudget) as busy:
        second.reserve(budget.total - budget.used + 1, "c")
    assert not busy.value.never
    with pytest.raises(OverBudget) as never:
        first.reserve(budget.total + 1, "d")
    assert never.value.never and "memory budget of 256 MiB" in str(never.value)
    first.shrink(r, MIB)
    assert budget.used == 11 * MIB
    first.release()
    assert budget.trim_if_idle() is False  # the other request still holds memory
    second.release()
    second.release()  # idempotent
    assert budget.used == 0 and budget.peak == TRIM_AFTER_BYTES + 10 * MIB
    assert budget.trim_if_idle() is release_free_memory()  # glibc: trimmed; elsewhere: nothing to do
    assert budget.trim_if_idle() is False  # nothing reserved since
