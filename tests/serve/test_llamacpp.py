"""llama.cpp for real: a GGUF that ``emma export --to gguf`` writes, served by llama-cpp-python's server
that emma.infer.launch starts, with EMMA's server in front.

Needs the ``llamacpp`` extra (llama-cpp-python, built from source) and llama.cpp's converter
(``emma export --install-converter``); skipped without them. The model is the tiny random FastVLM
(emma-tiny's architecture): llama.cpp runs its language model alone, text-only, and EMMA refuses images
for it; a tiny Idefics3 (SmolVLM) with its vision projector takes images (llama.cpp's mtmd path).
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from emma.infer.types import GenerationRequest, Message, SamplingParams

pytest.importorskip("llama_cpp")
pytest.importorskip("llama_cpp.server.app")  # the [server] part: fastapi, sse-starlette, pydantic-settings

from emma.infer.launch import LaunchedEngine, launch_engine  # noqa: E402
from emma.train.export import export_gguf  # noqa: E402
from emma.train.gguf_export import find_converter  # noqa: E402

pytestmark = pytest.mark.skipif(
    find_converter() is None or importlib.util.find_spec("sentencepiece") is None,
    reason="llama.cpp's converter is not installed: pip install 'emma-med[gguf]'; emma export --install-converter",
)


def _request(text: str, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(
        messages=[Message.text("system", "Answer briefly."), Message.text("user", text)],
        sampling=SamplingParams(max_new_tokens=max_tokens, temperature=0.0),
    )


@pytest.fixture(scope="module")
def text_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    files = export_gguf(tiny_model_dir("fast_vlm"), tmp_path_factory.mktemp("gguf"), quant="q8_0")
    assert files.mmproj is None
    return Path(files.model)


@pytest.fixture(scope="module")
def llama(text_gguf: Path) -> Iterator[LaunchedEngine]:
    engine = launch_engine("llamacpp", str(text_gguf), family="fast_vlm", threads=1, startup_timeout_s=120)
    yield engine
    engine.close()


def test_generate_and_stream_agree(llama: LaunchedEngine, text_gguf: Path) -> None:
    assert llama.model_name == text_gguf.stem and llama.family == "fast_vlm"
    request = _request("What is a pneumothorax?", 12)
    (first,) = llama.generate([request])
    assert first.finish_reason in ("stop", "length"), first.error
    assert 0 < first.completion_tokens <= 12 and first.prompt_tokens > 0
    (again,) = llama.generate([_request("What is a pneumothorax?", 12)])
    assert again.text == first.text  # greedy
    chunks = list(llama.stream(_request("What is a pneumothorax?", 12)))
    final = chunks[-1].response
    assert final is not None and final.finish_reason == first.finish_reason
    assert "".join(c.delta for c in chunks) == first.text
    assert final.first_token_s is not None and final.first_token_s <= final.latency_s


def test_cancel_ends_the_stream_and_the_server_goes_on(llama: LaunchedEngine) -> None:
    request = _request("Tell a long story.", 3000)
    seen = 0
    final = None
    for chunk in llama.stream(request):
        if chunk.delta:
            seen += 1
            if seen == 3:
                request.cancel.set()
        if chunk.response is not None:
            final = chunk.response
    assert final is not None and final.finish_reason == "cancelled" and seen == 3
    start = time.perf_counter()
    (after,) = llama.generate([_request("Next question.", 4)])
    assert after.finish_reason in ("stop", "length") and time.perf_counter() - start < 30


def test_emma_in_front_of_llamacpp(llama: LaunchedEngine, serve, make_settings) -> None:
    """EMMA's server proxies whole and streamed completions; the text matches the engine's own."""
    (direct,) = llama.generate([_request("Name one cause of chest pain.", 10)])
    with serve(create_app_for(llama, make_settings())) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        messages = [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Name one cause of chest pain."},
        ]
        whole = client.chat.completions.create(model=llama.model_name, messages=messages, max_tokens=10)
        assert whole.choices[0].message.content == direct.text
        streamed = client.chat.completions.create(
            model=llama.model_name, messages=messages, max_tokens=10, stream=True
        )
        text = "".join(e.choices[0].delta.content or "" for e in streamed if e.choices)
        assert text == direct.text


def test_the_backend_requires_its_launch_key(llama: LaunchedEngine) -> None:
    client = openai.OpenAI(base_url=llama.server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_close_stops_the_server(text_gguf: Path) -> None:
    engine = launch_engine("llamacpp", str(text_gguf), threads=1, startup_timeout_s=120)
    proc = engine.server.proc
    engine.close()
    assert proc.poll() is not None


def test_a_text_only_gguf_refuses_images(llama: LaunchedEngine, serve, make_settings, png_url: str) -> None:
    """llama.cpp would drop the image and answer anyway; EMMA refuses it, in the engine and the server."""
    from PIL import Image

    from emma.infer.types import ImagePart, TextPart

    assert llama.capabilities.max_images == 0
    request = GenerationRequest(
        messages=[Message("user", [ImagePart(Image.new("RGB", (32, 32))), TextPart("What is shown?")])],
        sampling=SamplingParams(max_new_tokens=4, temperature=0.0),
    )
    (refused,) = llama.generate([request])
    assert (refused.finish_reason, refused.error_kind) == ("error", "input")
    assert "takes no images" in (refused.error or "")
    with serve(create_app_for(llama, make_settings())) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        content = [{"type": "image_url", "image_url": {"url": png_url}}, {"type": "text", "text": "What?"}]
        with pytest.raises(openai.BadRequestError, match="takes no images"):
            client.chat.completions.create(
                model=llama.model_name, messages=[{"role": "user", "content": content}], max_tokens=4
            )


def create_app_for(engine: LaunchedEngine, settings: object) -> object:
    from emma.serve.app import create_app

    return create_app(engine, settings)


def test_images_through_emma_io_reach_llamacpp_with_a_projector(
    tiny_model_dir, tmp_path: Path, serve, make_settings, dicom_url: str
) -> None:
    """A DICOM data URL → emma.io (modality LUT, window, 8-bit) → PNG → llama.cpp's vision projector: the
    image's tokens are in the prompt llama.cpp counted."""
    files = export_gguf(tiny_model_dir("idefics3"), tmp_path / "gguf", quant="q8_0")
    assert files.mmproj is not None
    engine = launch_engine(
        "llamacpp", str(files.model), mmproj=files.mmproj, family="idefics3", threads=1, startup_timeout_s=120
    )
    try:
        assert engine.capabilities.max_images is None
        with serve(create_app_for(engine, make_settings())) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            text = {"type": "text", "text": "What is shown?"}
            with_image = client.chat.completions.create(
                model=engine.model_name,
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": dicom_url}}, text],
                    }
                ],
                max_tokens=4,
            )
            without = client.chat.completions.create(
                model=engine.model_name, messages=[{"role": "user", "content": [text]}], max_tokens=4
            )
        assert with_image.choices[0].finish_reason in ("stop", "length")
        assert with_image.usage is not None and without.usage is not None
        assert with_image.usage.prompt_tokens > without.usage.prompt_tokens
    finally:
        engine.close()


def test_a_client_leaving_a_stream_through_emma_stops_llamacpp(
    llama: LaunchedEngine, serve, make_settings
) -> None:
    """The client closes its stream through EMMA after a few tokens: EMMA cancels the request, the
    engine closes the upstream stream and llama.cpp stops generating, so the next request is answered
    long before the abandoned one would have finished (llama.cpp serves one request at a time)."""
    long = 1500
    (full,) = llama.generate([_request("Tell a long story.", long)])
    assert full.completion_tokens > long // 2  # the random model rarely ends early
    with serve(create_app_for(llama, make_settings(max_tokens=long))) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        messages = [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Tell a long story."},
        ]
        stream = client.chat.completions.create(
            model=llama.model_name, messages=messages, max_tokens=long, stream=True
        )
        seen = 0
        for event in stream:
            seen += bool(event.choices and event.choices[0].delta.content)
            if seen == 3:
                break
        stream.close()
        start = time.perf_counter()
        after = client.chat.completions.create(
            model=llama.model_name, messages=[{"role": "user", "content": "Next."}], max_tokens=4
        )
        waited = time.perf_counter() - start
    assert after.choices[0].finish_reason in ("stop", "length")
    assert waited < full.latency_s / 2, (waited, full.latency_s)


def test_cli_serve_backend_llamacpp(text_gguf: Path, tmp_path: Path, png_url: str) -> None:
    """``emma serve --backend llamacpp`` for real: text answered, images refused (text-only GGUF), and
    llama.cpp's server gone once EMMA ends on SIGTERM."""
    import os

    from serve_cli import emma_serve

    from emma.infer.launch import free_port

    port = free_port()
    args = ["--backend", "llamacpp", "--model", str(text_gguf), "--backend-arg", "--n_threads"]
    args += ["--backend-arg", "1"]
    env = {k: v for k, v in os.environ.items() if k != "EMMA_API_KEY"}
    with emma_serve(args, port, tmp_path / "serve.log", env, timeout_s=180) as proc:
        children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert children, "no engine server under emma serve"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(
            model=text_gguf.stem, messages=[{"role": "user", "content": "Hello?"}], max_tokens=4
        )
        assert answer.choices[0].finish_reason in ("stop", "length")
        content = [
            {"type": "image_url", "image_url": {"url": png_url}},
            {"type": "text", "text": "What?"},
        ]
        with pytest.raises(openai.BadRequestError, match="takes no images"):
            client.chat.completions.create(
                model=text_gguf.stem, messages=[{"role": "user", "content": content}], max_tokens=4
            )
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
