"""Shared fixtures of the server tests: a real tiny model engine, servers on loopback, image data URLs.

Servers run the real app under uvicorn in a background thread, on a socket bound to a free loopback
port. The engine is a real TransformersEngine over a tiny random-weight LLaVA built in-process
(emma.model.tiny_families); :class:`InstrumentedEngine` wraps it transparently to record calls and, for
the queue tests, to hold ``generate`` at a gate until the test releases it.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import uvicorn
from PIL import Image
from pydicom.data import get_testdata_file

from emma.infer.engine import EngineCapabilities
from emma.infer.transformers_engine import TransformersEngine
from emma.infer.types import GenerationRequest, GenerationResponse, StreamChunk
from emma.io.image import ImageFit
from emma.model.families import image_fit
from emma.model.tiny_families import load_tiny
from emma.serve.app import ServeSettings, create_app

TINY_FAMILY = "llava"  # the fastest tiny family to generate with on CPU


class InstrumentedEngine:
    """A transparent wrapper around a real engine: records requests, final responses and token
    counts, and can hold ``generate`` until :attr:`release` is set (to fill the queue
    deterministically). ``checks_prompts=False`` hides the engine's own prompt check (the batcher
    then counts tokens first, as for any engine that does not check prompts itself)."""

    def __init__(
        self, inner: TransformersEngine, *, gated: bool = False, checks_prompts: bool = True
    ) -> None:
        self.inner = inner
        self.processor = inner.processor
        self.checks_prompt_tokens = checks_prompts and inner.checks_prompt_tokens
        self.counted = 0
        self.prepared = 0
        self.threads: dict[str, set[str]] = {}  # engine call → names of the threads it ran on
        self.entered = threading.Event()
        self.release = threading.Event()
        if not gated:
            self.release.set()
        self.batches: list[int] = []
        self.stream_batches: list[int] = []  # streams per engine call (stream: 1, stream_many: several)
        self.requests: list[GenerationRequest] = []
        self.finals: list[GenerationResponse] = []

    @property
    def model_name(self) -> str:
        return self.inner.model_name

    @property
    def max_batch_size(self) -> int:
        return self.inner.max_batch_size

    @property
    def capabilities(self) -> EngineCapabilities:
        return dataclasses.replace(self.inner.capabilities, checks_prompt_tokens=self.checks_prompt_tokens)

    def close(self) -> None:
        self.inner.close()

    @property
    def family(self) -> str | None:
        return self.inner.family

    def _on(self, call: str) -> None:
        self.threads.setdefault(call, set()).add(threading.current_thread().name)

    def count_tokens(self, request: GenerationRequest) -> int:
        self._on("count_tokens")
        self.counted += 1
        return self.inner.count_tokens(request)

    def prepare(self, request: GenerationRequest) -> None:
        self._on("prepare")
        self.prepared += 1
        self.inner.prepare(request)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResponse]:
        self._on("generate")
        self.batches.append(len(requests))
        self.requests.extend(requests)
        self.entered.set()
        if not self.release.wait(60):
            raise TimeoutError("test gate never released")
        out = self.inner.generate(requests)
        self.finals.extend(out)
        return out

    def stream_many(self, requests: Sequence[GenerationRequest]) -> Iterator[tuple[int, StreamChunk]]:
        self._on("stream_many")
        self.stream_batches.append(len(requests))
        self.requests.extend(requests)
        self.entered.set()
        for i, chunk in self.inner.stream_many(requests):
            if chunk.response is not None:
                self.finals.append(chunk.response)
            yield i, chunk

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        self._on("stream")
        self.stream_batches.append(1)
        self.requests.append(request)
        self.entered.set()
        for chunk in self.inner.stream(request):
            if chunk.response is not None:
                self.finals.append(chunk.response)
            yield chunk


@contextlib.contextmanager
def serve_app(app: object) -> Iterator[str]:
    """Run ``app`` under uvicorn on a free loopback port in a background thread; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def _settings(**overrides: object) -> ServeSettings:
    """Small bounds so the limit tests stay cheap; no API key unless given."""
    values: dict[str, object] = {
        "api_key": None,
        "max_body_bytes": 2 * 1024**2,
        "max_images": 3,
        "max_tokens": 64,
        "default_max_tokens": 16,
        "batch_wait_ms": 2.0,
    }
    values.update(overrides)
    return ServeSettings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def make_settings() -> object:
    """``make_settings(**overrides) -> ServeSettings`` with the tests' small bounds."""
    return _settings


@pytest.fixture(scope="session")
def serve() -> object:
    """``serve(app)``: a context manager running the app on loopback, yielding its base URL."""
    return serve_app


@pytest.fixture(scope="session")
def instrument() -> type[InstrumentedEngine]:
    """The :class:`InstrumentedEngine` wrapper class."""
    return InstrumentedEngine


@pytest.fixture(scope="session")
def tiny_engine() -> TransformersEngine:
    return TransformersEngine(load_tiny(TINY_FAMILY), max_batch_size=8)


@pytest.fixture(scope="session")
def served_fit(tiny_engine: TransformersEngine) -> ImageFit:
    """What the test servers downscale images to when decoding them (the tiny model's processor view)."""
    fit = image_fit(tiny_engine.family, tiny_engine.processor)
    assert fit is not None
    return fit


@pytest.fixture(scope="session")
def base_url(tiny_engine: TransformersEngine) -> Iterator[str]:
    """A server without an API key (the default settings of the tests)."""
    with serve_app(create_app(tiny_engine, _settings())) as url:
        yield url


def _png_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    image = Image.new("RGB", size, (20, 40, 60))
    for x in range(10, 30):
        for y in range(10, 20):
            image.putpixel((x, y), (230, 230, 230))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def png_bytes() -> bytes:
    return _png_bytes()


@pytest.fixture(scope="session")
def png_url(png_bytes: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes).decode("ascii")


@pytest.fixture(scope="session")
def dicom_path() -> Path:
    return Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def dicom_url(dicom_path: Path) -> str:
    return "data:application/dicom;base64," + base64.b64encode(dicom_path.read_bytes()).decode("ascii")
