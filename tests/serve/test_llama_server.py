"""llama.cpp's own C++ ``llama-server`` for real, when a binary is there: ``EMMA_LLAMA_SERVER`` (a path)
or ``llama-server`` on PATH; skipped otherwise (PyPI carries no build of it: a llama.cpp build or a
distribution package does). The GGUF is a tiny FastVLM's language model from ``emma export --to gguf``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from emma.infer.launch import LaunchedEngine, launch_engine
from emma.infer.types import GenerationRequest, Message, SamplingParams
from emma.train.export import export_gguf
from emma.train.gguf_export import find_converter

BINARY = os.environ.get("EMMA_LLAMA_SERVER") or shutil.which("llama-server")

pytestmark = [
    pytest.mark.skipif(
        not BINARY, reason="no llama-server: set EMMA_LLAMA_SERVER to a llama.cpp build's binary"
    ),
    pytest.mark.skipif(
        find_converter() is None or importlib.util.find_spec("sentencepiece") is None,
        reason="llama.cpp's converter is not installed: emma export --install-converter",
    ),
]


def _request(text: str, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(
        messages=[Message.text("user", text)],
        sampling=SamplingParams(max_new_tokens=max_tokens, temperature=0.0),
    )


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory) -> Iterator[LaunchedEngine]:
    files = export_gguf(tiny_model_dir("fast_vlm"), tmp_path_factory.mktemp("gguf"), quant="q8_0")
    engine = launch_engine(
        "llama-server",
        str(files.model),
        command=[str(BINARY)],
        threads=1,
        concurrency=4,
        startup_timeout_s=120,
    )
    yield engine
    engine.close()


def test_generate_and_stream_agree_and_images_are_refused(server: LaunchedEngine) -> None:
    (whole,) = server.generate([_request("What is a pneumothorax?", 12)])
    assert whole.finish_reason in ("stop", "length") and whole.completion_tokens > 0, whole.error
    chunks = list(server.stream(_request("What is a pneumothorax?", 12)))
    assert "".join(c.delta for c in chunks) == whole.text
    assert server.capabilities.max_images == 0


def test_concurrent_requests_are_decoded_together(server: LaunchedEngine) -> None:
    """Four long streams at once: every one's first token comes before any of them ends (one at a
    time, as llama-cpp-python's server runs them, the fourth would start after three had ended). The
    prompts are ones the random model answers at full length (greedy: the same each time)."""
    candidates = [f"Story number {i}." for i in range(16)]
    answers = server.generate([_request(text, 200) for text in candidates])
    long = [text for text, answer in zip(candidates, answers, strict=True) if answer.completion_tokens == 200]
    assert len(long) >= 4, [a.completion_tokens for a in answers]
    firsts: list[float] = []
    ends: list[float] = []
    lock = threading.Lock()

    def one(text: str) -> None:
        first = None
        for chunk in server.stream(_request(text, 200)):
            if chunk.delta and first is None:
                first = time.perf_counter() - start
        with lock:
            firsts.append(first if first is not None else float("inf"))
            ends.append(time.perf_counter() - start)

    threads = [threading.Thread(target=one, args=(text,)) for text in long[:4]]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(ends) == 4
    assert max(firsts) < min(ends), (firsts, ends)


def test_close_stops_it(tiny_model_dir, tmp_path: Path) -> None:
    files = export_gguf(tiny_model_dir("fast_vlm"), tmp_path / "g", quant="q8_0")
    engine = launch_engine("llama-server", str(files.model), command=[str(BINARY)], startup_timeout_s=120)
    proc = engine.server.proc
    engine.close()
    assert proc.poll() is not None
