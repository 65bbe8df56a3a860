"""Fuzzing the server (FastAPI TestClient, the real app over the tiny in-process model): 0 crashes,
0 hangs, bounded memory.

Requests are generated around the OpenAI chat-completions schema and the ``emma`` extension (every
field valid, out of range, of another JSON type, or missing; NaN and infinities included), as raw
bodies that are not JSON at all, and around data URLs (media types, base64 parameters and payloads;
the payload a real image or DICOM/NIfTI file that packages carry, the same file with bytes or header
elements mutated, or garbage) on ``/v1/chat/completions`` and ``/v1/emma/preview``.

A crash is any 5xx, a body that is not the documented JSON error shape, or an error event inside a
stream. Where the contract says what the answer is (strict types: ``max_tokens: true``, ``stream:
"yes"``, a seed outside int64 are 422s), the test checks that too.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from dicom_mutations import SEEDS, byte_edits, edit_bytes, mutations, seed, write
from fastapi.testclient import TestClient
from fuzzing import MemoryWatch, fuzz_settings, hard_deadline, weighted
from hypothesis import event, given, note
from hypothesis import strategies as st
from PIL import Image

from emma.infer.transformers_engine import TransformersEngine
from emma.io.limits import Limits
from emma.model.tiny_families import load_tiny
from emma.serve.app import ServeSettings, create_app

CHAT = "/v1/chat/completions"
PREVIEW = "/v1/emma/preview"
TINY_FAMILY = "llava"  # the fastest tiny family to generate with on CPU
MEMORY_BUDGET_MB = 256
# The server may hold its whole memory budget at once; on top of it: the first generations' buffers,
# allocator slack, the test's own request copies.
MEMORY_GROWTH_MIB = MEMORY_BUDGET_MB + 200
OK_STATUSES = {200, 400, 404, 413, 422}

SETTINGS = ServeSettings(
    api_key=None,
    model_name="tiny",
    max_body_bytes=2 * 1024**2,
    max_images=4,
    max_request_pixels=8 * 1024**2,
    limits=Limits(
        max_file_bytes=1024**2,
        max_pixels=4 * 1024**2,
        max_frames=64,
        max_slices=64,
        max_total_voxels=8 * 1024**2,
    ),
    memory_budget_mb=MEMORY_BUDGET_MB,
    max_text_chars=20_000,
    max_prompt_tokens=2048,
    max_tokens=4,
    default_max_tokens=2,
    batch_wait_ms=0.0,
    static_dir=None,
)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    engine = TransformersEngine(load_tiny(TINY_FAMILY), max_batch_size=4)
    with TestClient(create_app(engine, SETTINGS)) as c:
        yield c


# ------------------------------------------------------------------------------------------ content


def _png(size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    ramp = (np.add.outer(np.arange(size[1]) * 3, np.arange(size[0]) * 7) % 256).astype(np.uint8)
    image = Image.fromarray(ramp).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _raster(fmt: str, **save: Any) -> bytes:
    image = Image.new("RGB", (40, 30), (200, 30, 60))
    buf = io.BytesIO()
    if fmt in ("GIF", "TIFF"):
        frames = [image, Image.new("RGB", (40, 30), (10, 90, 10))]
        frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:])
    else:
        image.save(buf, format=fmt, **save)
    return buf.getvalue()


def _png16() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).save(buf, format="PNG")
    return buf.getvalue()


def _nifti(gz: bool) -> bytes:
    data = np.arange(8 * 8 * 3, dtype=np.int16).reshape(8, 8, 3)
    image = nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0]))
    raw = image.to_bytes()
    return gzip.compress(raw, mtime=0) if gz else raw


# name → (media type, content)
_CONTENT: dict[str, tuple[str, bytes]] = {}


def contents() -> dict[str, tuple[str, bytes]]:
    """Real inputs by name, with their media type (built once): rasters, DICOM seeds, NIfTI."""
    if not _CONTENT:
        _CONTENT.update(
            {
                "png": ("image/png", _png()),
                "png-gray": ("image/png", _png((33, 17), "L")),
                "png-16bit": ("image/png", _png16()),
                "jpeg": ("image/jpeg", _raster("JPEG")),
                "gif-2frames": ("image/gif", _raster("GIF")),
                "tiff-2pages": ("image/tiff", _raster("TIFF")),
                "bmp": ("image/bmp", _raster("BMP")),
                "webp": ("image/webp", _raster("WEBP")),
                "nifti": ("application/x-nifti", _nifti(False)),
                "nifti-gz": ("application/gzip", _nifti(True)),
            }
        )
        for name in (
            "CT_small.dcm",
            "MR_small.dcm",
            "MR_small_RLE.dcm",
            "SC_rgb_small_odd.dcm",
            "image_dfl.dcm",
            "no_meta.dcm",
        ):
            _CONTENT[name] = ("application/dicom", seed(name).data)
    return _CONTENT


_NAMES = st.sampled_from(sorted(contents()))


@st.composite
def real_content(draw: st.DrawFn) -> tuple[str, bytes]:
    return contents()[draw(_NAMES)]


@st.composite
def byte_mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    mime, original = contents()[draw(_NAMES)]
    return mime, edit_bytes(original, draw(byte_edits(len(original))))


@st.composite
def header_mutated_dicom(draw: st.DrawFn) -> tuple[str, bytes]:
    """A real DICOM file with a few header elements mutated (the DICOM battery's mutations)."""
    name = draw(st.sampled_from(SEEDS))
    changes = draw(mutations)
    with tempfile.TemporaryDirectory(prefix="emma-fuzz-serve-") as tmp:
        path = Path(tmp) / "f.dcm"
        data = path.read_bytes() if write(seed(name), changes, path) else seed(name).data
    return "application/dicom", data


payloads = weighted(
    (4, real_content()),
    (1, byte_mutated()),
    (2, header_mutated_dicom()),
    (1, st.binary(max_size=64).map(lambda b: ("application/octet-stream", b))),
)

MEDIA_TYPES = (
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/svg+xml",
    "IMAGE/PNG",
    "application/dicom",
    "application/dicom+binary",
    "image/dicom",
    "application/x-nifti",
    "application/gzip",
    "application/octet-stream",
    "text/plain",
    "text/html",
    "",
)
PARAMS = (";BASE64", ";charset=utf-8;base64", ";name=x.dcm;base64", "", ";base64;base64")
OTHER_URLS = (
    "",
    "data:",
    "data:,",
    "data:image/png;base64,",
    "file:///etc/passwd",
    "/etc/passwd",
    "http://127.0.0.1:9/x.png",
    "https://example.org/x.dcm",
    "javascript:alert(1)",
    "DATA:image/png;base64,AAAA",
    " data:image/png;base64,AAAA ",
)


def _encode(payload: bytes, style: str) -> str:
    text = base64.b64encode(payload).decode("ascii")
    if style == "wrapped":
        return "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    if style == "unpadded":
        return text.rstrip("=")
    if style == "urlsafe":
        return base64.urlsafe_b64encode(payload).decode("ascii")
    return text


@st.composite
def image_urls(draw: st.DrawFn) -> str:
    """Image URLs a client may send: mostly base64 data URLs of real, mutated or garbage content, with
    the content's own media type or another one; now and then text, or another kind of URL."""
    kind = draw(st.sampled_from(("data",) * 10 + ("text", "other")))
    if kind == "other":
        return draw(st.sampled_from(OTHER_URLS))
    mime, payload = draw(payloads)
    mime = draw(weighted((2, st.just(mime)), (1, st.sampled_from(MEDIA_TYPES))))
    params = draw(weighted((2, st.just(";base64")), (1, st.sampled_from(PARAMS))))
    header = f"data:{mime}{params},"
    if kind == "text":
        return header + draw(st.text(max_size=40))
    style = draw(st.sampled_from(("plain",) * 5 + ("wrapped", "unpadded", "urlsafe")))
    return header + _encode(payload, style)


# ------------------------------------------------------------------------------------------ requests
#
# A body is a valid request (whose images are fuzzed), or one with a single field replaced by a value
# of another kind or an out-of-range one, or removed: deep enough to reach decoding and generation
# half the time, while each field's checks still see every kind of value.

json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
# values that are close to valid: the wrong JSON type for a number or flag, edges, NaN and infinities
wrong_values = st.one_of(
    st.sampled_from(
        (True, False, None, 0, -1, 2**63, 2**64, -(2**63) - 1, 10**30, "1", "yes", "", [], {}, 1.5, -0.0)
    ),
    st.floats(allow_nan=True, allow_infinity=True),
    json_values,
)

texts = st.one_of(
    st.text(max_size=40), st.sampled_from(("", " ", "Describe the image.", "<box>[[1,2,3,4]]</box>"))
)
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": texts})
image_part = st.fixed_dictionaries(
    {
        "type": st.just("image_url"),
        "image_url": st.one_of(
            st.fixed_dictionaries(
                {"url": image_urls()}, optional={"detail": st.sampled_from(("low", "high"))}
            ),
            image_urls(),
        ),
    }
)
user_message = st.fixed_dictionaries(
    {
        "role": st.just("user"),
        "content": st.one_of(
            texts, st.lists(weighted((1, text_part), (2, image_part)), min_size=1, max_size=3)
        ),
    }
)
other_message = st.fixed_dictionaries(
    {"role": st.sampled_from(("system", "developer", "assistant")), "content": texts},
    optional={"name": st.text(max_size=8)},
)
valid_messages = st.tuples(st.lists(st.one_of(other_message, user_message), max_size=2), user_message).map(
    lambda pair: [*pair[0], pair[1]]
)
windows = st.one_of(
    st.sampled_from(
        ("lung", "bone", "40,400", "nan,nan", "inf,1", "1,0", "-1e400,1e400", "1e308,1e308", " ,", "")
    ),
    st.text(max_size=12),
)
emma_options = st.fixed_dictionaries(
    {},
    optional={
        "mode": st.sampled_from(("chat", "structured", "report")),
        "window": st.one_of(st.none(), windows),
        "plane": st.sampled_from(("axial", "coronal", "sagittal")),
        "slices": st.integers(1, 3),
        "volume_mode": st.sampled_from(("slice", "slab", "mip")),
        "context": st.one_of(texts, st.just("x" * 5000)),
    },
)
valid_chat_fields: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from(("tiny", "gpt-4o", "")),
    "temperature": st.floats(0.0, 2.0),
    "top_p": st.floats(0.01, 1.0),
    "max_tokens": st.integers(1, 4),
    "max_completion_tokens": st.integers(1, 4),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "stop": st.one_of(st.text(max_size=70), st.lists(st.text(max_size=70), max_size=6)),
    "n": st.sampled_from((1, 1, 1, 2)),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "tools": st.sampled_from((None, [], None, [], [{"type": "function"}])),
    "emma": emma_options,
    "logprobs": json_values,
    "user": json_values,
}
valid_chat_bodies = st.fixed_dictionaries({"messages": valid_messages}, optional=valid_chat_fields)


def _nested_keys(body: dict[str, Any]) -> list[tuple[str, ...]]:
    """Paths of the fields of ``body``, its messages and parts and its ``emma`` object."""
    paths: list[tuple[str, ...]] = [(key,) for key in body]
    for i, message in enumerate(body.get("messages") or []):
        paths += [("messages", str(i), key) for key in message]
        if isinstance(message.get("content"), list):
            for j, part in enumerate(message["content"]):
                paths += [("messages", str(i), "content", str(j), key) for key in part]
    if isinstance(body.get("emma"), dict):
        paths += [("emma", key) for key in body["emma"]]
    return paths


@st.composite
def corrupted(draw: st.DrawFn, valid: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    """A valid body with one field (at any depth) replaced by a wrong value, or removed."""
    body = json.loads(json.dumps(draw(valid)))  # a deep copy
    path = draw(st.sampled_from(_nested_keys(body)))
    holder: Any = body
    for key in path[:-1]:
        holder = holder[int(key)] if isinstance(holder, list) else holder[key]
    if draw(st.integers(0, 4)) == 0:
        del holder[path[-1]]
    else:
        holder[path[-1]] = draw(wrong_values)
    return body


chat_bodies = weighted((4, valid_chat_bodies), (4, corrupted(valid_chat_bodies)), (1, json_values))

preview_fields: dict[str, st.SearchStrategy[Any]] = {
    "window": weighted((2, st.none()), (1, windows)),
    "plane": st.sampled_from(("axial", "coronal", "sagittal")),
    "slices": st.integers(1, 3),
    "volume_mode": st.sampled_from(("slice", "slab", "mip")),
}
valid_preview_bodies = st.fixed_dictionaries(
    {"images": st.lists(image_urls(), min_size=1, max_size=2)}, optional=preview_fields
)
preview_bodies = weighted((3, valid_preview_bodies), (1, corrupted(valid_preview_bodies)))


# ------------------------------------------------------------------------------------------ checks


def _error_shape(response: Any) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error.get("message"), str) and error["message"], body
    assert isinstance(error.get("type"), str) and isinstance(error.get("code"), str), body
    return error


def check_status(response: Any) -> bool:
    """No crash: a documented status, and the JSON error shape unless it is a 200 (returned: whether)."""
    note(f"-> {response.status_code} {response.text[:400]}")
    assert response.status_code in OK_STATUSES, f"{response.status_code}: {response.text[:400]}"
    if response.status_code != 200:
        event(f"{response.status_code} {_error_shape(response)['code']}")
    else:
        event("200")
    return response.status_code == 200


def check_chat_response(response: Any, stream: bool) -> None:
    """:func:`check_status`, then a chat.completion, or a well-formed stream without error events."""
    if not check_status(response):
        return
    if not stream:
        body = response.json()
        assert body["choices"][0]["message"]["content"] is not None
        assert isinstance(body["emma"]["images"], list)
        return
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", response.text[-400:]
    for data in events[:-1]:
        payload = json.loads(data)
        assert "error" not in payload, payload


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def strict_type_violation(body: Any) -> str | None:
    """A field the contract refuses (422) whatever else the request holds, or None."""
    if not isinstance(body, dict):
        return "body"
    for key in ("max_tokens", "max_completion_tokens", "n"):
        if key in body and body[key] is not None and not _is_int(body[key]):
            return key
    if (
        "seed" in body
        and body["seed"] is not None
        and not (_is_int(body["seed"]) and -(2**63) <= body["seed"] < 2**63)
    ):
        return "seed"
    if "stream" in body and body["stream"] is not None and not isinstance(body["stream"], bool):
        return "stream"
    for key in ("temperature", "top_p"):
        value = body.get(key)
        if isinstance(value, bool | str) or (isinstance(value, float) and not math.isfinite(value)):
            return key
    return None


# ------------------------------------------------------------------------------------------ tests


@fuzz_settings(examples=400)
@given(body=chat_bodies)
def test_chat_requests_never_crash(client: TestClient, memory_watch: MemoryWatch, body: Any) -> None:
    stream = isinstance(body, dict) and body.get("stream") is True
    content = json.dumps(body, allow_nan=True)
    note(f"body {content[:600]}")
    with hard_deadline():
        response = client.post(CHAT, content=content, headers={"Content-Type": "application/json"})
    check_chat_response(response, stream)
    violation = strict_type_violation(body)
    if violation is not None:
        assert response.status_code == 422, f"{violation}: {response.status_code} {response.text[:300]}"
    memory_watch.sample()
    assert memory_watch.growth_mib < MEMORY_GROWTH_MIB, f"peak RSS grew by {memory_watch.growth_mib:.0f} MiB"


@fuzz_settings(examples=400)
@given(body=preview_bodies)
def test_image_urls_never_crash(client: TestClient, memory_watch: MemoryWatch, body: dict[str, Any]) -> None:
    content = json.dumps(body, allow_nan=True)
    note(f"body {content[:300]}")
    with hard_deadline():
        response = client.post(PREVIEW, content=content, headers={"Content-Type": "application/json"})
    if check_status(response):
        images = response.json()["images"]
        assert 1 <= len(images) <= SETTINGS.max_images
        for k, image in enumerate(images):
            assert image["index"] == k and image["provenance"]["source"].startswith("upload:")
            png = Image.open(io.BytesIO(base64.b64decode(image["png"].split(",", 1)[1])))
            assert png.size == (image["width"], image["height"])
    memory_watch.sample()
    assert memory_watch.growth_mib < MEMORY_GROWTH_MIB, f"peak RSS grew by {memory_watch.growth_mib:.0f} MiB"


raw_bodies = st.one_of(
    st.binary(max_size=80),
    st.text(max_size=40).map(lambda t: t.encode("utf-8")),
    st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 200_000).map(lambda n: b'{"messages":' * n),
    st.sampled_from(
        (
            b"",
            b"null",
            b"[]",
            b"{}",
            b'"x"',
            b"1e999999",
            b"NaN",
            b'{"messages": [{"role": "user", "content": "hi"}]',  # cut short
            b'\xef\xbb\xbf{"messages": [{"role": "user", "content": "hi"}]}',  # BOM
            b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',  # invalid UTF-8
            b'{"messages": [{"role": "user", "content": "\\ud800"}]}',  # lone surrogate escape
            b'{"messages": [], "messages": [{"role": "user", "content": "hi"}]}',  # duplicate key
        )
    ),
)
content_types = st.sampled_from(
    (
        "application/json",
        "application/json",
        "application/json; charset=latin-1",
        "text/plain",
        "",
        "multipart/form-data",
    )
)


@fuzz_settings(examples=150)
@given(content=raw_bodies, content_type=content_types, path=st.sampled_from((CHAT, PREVIEW)))
def test_bodies_that_are_not_json_never_crash(
    client: TestClient, content: bytes, content_type: str, path: str
) -> None:
    note(f"{path} {content_type!r} {content[:200]!r}")
    headers = {"Content-Type": content_type} if content_type else {}
    with hard_deadline():
        response = client.post(path, content=content, headers=headers)
    if check_status(response):  # only a complete, valid chat request could be answered
        assert path == CHAT and json.loads(content)["messages"]
    if content_type.startswith("application/json") and content and not _parses(content):
        # documented: a body that is not JSON (syntax, invalid UTF-8, nesting past the parser) is 400
        # invalid_json, or 413 when it is over the size bound
        assert response.status_code in (400, 413), response.text[:300]
        if response.status_code == 400:
            assert response.json()["error"]["code"] == "invalid_json", response.text[:300]


def _parses(content: bytes) -> bool:
    """Whether ``content`` is JSON as the server's parser (the standard library's) reads it."""
    try:
        json.loads(content)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return False
    return True
