"""Engine servers that EMMA starts and stops (emma.infer.launch), vLLM's side.

vLLM cannot run on this CPU machine (docs/deployment.md says why), so the "vllm" executable here is
``scripted_openai_server.py``: a real HTTP server that takes ``vllm serve``'s command line and records
what it was given. What is tested is EMMA's side: the command line built from the family, the per-launch
API key in the environment, waiting for readiness, failures, the proxy (streaming, cancellation) and
stopping. llama.cpp runs for real in ``test_llamacpp.py``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from serve_cli import emma_serve
from typer.testing import CliRunner

from emma.cli import app
from emma.infer.launch import LaunchedEngine, LaunchError, launch_engine, vllm_command
from emma.infer.types import GenerationRequest, Message, SamplingParams
from emma.model.families import get_family

SCRIPT = Path(__file__).with_name("scripted_openai_server.py")
SCRIPTED = [sys.executable, str(SCRIPT)]


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _request(text: str, *, max_tokens: int = 16) -> GenerationRequest:
    return GenerationRequest(
        messages=[Message.text("user", text)],
        sampling=SamplingParams(max_new_tokens=max_tokens, temperature=0.0),
    )


@pytest.fixture()
def record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "record.jsonl"
    monkeypatch.setenv("SCRIPTED_RECORD", str(path))
    return path


def test_vllm_command_carries_the_family_limits_and_the_processors_template(tiny_model_dir) -> None:
    folder = tiny_model_dir("qwen2_5_vl")
    argv = vllm_command(str(folder), port=8123, family="qwen2_5_vl")
    spec = get_family("qwen2_5_vl")
    assert argv[:3] == ["vllm", "serve", str(folder)]
    assert argv[argv.index("--limit-mm-per-prompt") + 1] == json.dumps({"image": spec.max_images})
    assert argv[argv.index("--max-model-len") + 1] == str(spec.vllm_max_model_len)
    assert argv[argv.index("--chat-template") + 1] == str(folder / "chat_template.jinja")
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    # explicit values win; a family with a shorter context gets its own
    argv = vllm_command("org/model", port=1, family="fast_vlm", max_images=2, command=["/opt/v/bin/vllm"])
    assert argv[0] == "/opt/v/bin/vllm" and "--chat-template" not in argv
    assert argv[argv.index("--limit-mm-per-prompt") + 1] == '{"image": 2}'
    assert argv[argv.index("--max-model-len") + 1] == "8192"
    assert argv[argv.index("--served-model-name") + 1] == "org/model"


def test_launch_generate_stream_and_stop(tiny_model_dir, record: Path) -> None:
    folder = tiny_model_dir("fast_vlm")
    # no family given: read from the folder's config.json
    engine = launch_engine("vllm", str(folder), command=SCRIPTED, startup_timeout_s=60)
    try:
        assert isinstance(engine, LaunchedEngine) and engine.family == "fast_vlm"
        assert engine.model_name == folder.name
        assert not engine.capabilities.in_process
        (response,) = engine.generate([_request("one two three")])
        assert (response.finish_reason, response.text, response.completion_tokens) == (
            "stop",
            "three two one",
            3,
        )
        chunks = list(engine.stream(_request("a b c d")))
        assert "".join(c.delta for c in chunks) == "d c b a"
        assert chunks[-1].response is not None and chunks[-1].response.completion_tokens == 4
        # the server is on loopback behind a per-launch key given in its environment, not its argv
        start = _records(record)[0]
        assert start["has_key"] and not any("key" in a.lower() for a in start["argv"])
        assert start["argv"][start["argv"].index("--max-model-len") + 1] == "8192"
        port = int(engine.server.base_url.rsplit(":", 1)[1].split("/")[0])
        assert httpx.get(f"{engine.server.base_url}/models", timeout=5).status_code == 401
        pid = engine.server.pid
    finally:
        engine.close()
    assert engine.server.proc.poll() is not None
    assert not _port_open(port)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    engine.close()  # idempotent


def test_a_server_that_exits_fails_at_once_with_its_log(record: Path) -> None:
    start = time.monotonic()
    with pytest.raises(LaunchError, match="exited with code 3 .*exiting with 3"):
        launch_engine(
            "vllm", "org/model", command=SCRIPTED, extra_args=["--exit-code", "3"], startup_timeout_s=60
        )
    assert time.monotonic() - start < 30


def test_a_server_never_ready_is_stopped_after_the_timeout(record: Path) -> None:
    with pytest.raises(LaunchError, match="not ready after 2 s"):
        launch_engine(
            "vllm", "org/model", command=SCRIPTED, extra_args=["--start-delay-s", "60"], startup_timeout_s=2
        )
    pid = _records(record)[0]["pid"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the scripted server was left running")


def test_missing_executable_and_bad_options_are_one_line_errors() -> None:
    with pytest.raises(LaunchError, match="cannot start the vllm server"):
        launch_engine("vllm", "org/model", command=["/nonexistent/vllm"], startup_timeout_s=5)
    with pytest.raises(Exception, match="unknown engine backend"):
        launch_engine("ollama", "x")
    with pytest.raises(Exception, match="GGUF model not found"):
        launch_engine("llamacpp", "/nonexistent/model.gguf", command=SCRIPTED)


def test_emma_in_front_streams_cancels_and_bounds_images(
    tiny_model_dir, record: Path, serve, make_settings, png_url: str
) -> None:
    """EMMA's server in front of the launched engine: a client that leaves a stream ends the upstream
    stream too; images go through emma.io and then to the engine; EMMA's own limits come first."""
    from emma.serve.app import create_app

    engine = launch_engine(
        "vllm",
        str(tiny_model_dir("fast_vlm")),
        family="fast_vlm",
        max_images=2,
        command=SCRIPTED,
        extra_args=["--chunk-delay-s", "0.05"],
        startup_timeout_s=60,
    )
    try:
        assert engine.capabilities.max_images == 2  # what vLLM was started with
        with serve(create_app(engine, make_settings(max_images=4))) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            words = " ".join(f"w{i}" for i in range(60))
            stream = client.chat.completions.create(
                model=engine.model_name,
                messages=[{"role": "user", "content": words}],
                max_tokens=60,
                stream=True,
            )
            got = []
            for event in stream:
                if event.choices and event.choices[0].delta.content:
                    got.append(event.choices[0].delta.content)
                if len(got) == 3:
                    break
            stream.close()
            deadline = time.monotonic() + 20
            while (
                not any(r.get("event") == "stream" for r in _records(record)) and time.monotonic() < deadline
            ):
                time.sleep(0.05)
            (ended,) = [r for r in _records(record) if r.get("event") == "stream"]
            assert ended["end"] == "disconnected" and ended["chunks"] < 60
            # an image request: decoded by EMMA, sent on as one image part
            image = [{"type": "image_url", "image_url": {"url": png_url}}, {"type": "text", "text": "x y"}]
            answer = client.chat.completions.create(
                model=engine.model_name, messages=[{"role": "user", "content": image}], max_tokens=8
            )
            assert answer.choices[0].message.content == "y x"
            assert [r["images"] for r in _records(record) if r.get("event") == "request"][-1] == 1
            with pytest.raises(openai.APIStatusError, match="over the limit of 2") as refused:
                client.chat.completions.create(
                    model=engine.model_name, messages=[{"role": "user", "content": image * 3}], max_tokens=8
                )
            assert refused.value.status_code == 413  # EMMA's bound: the engine never saw it
            assert [r["images"] for r in _records(record) if r.get("event") == "request"][-1] == 1
    finally:
        engine.close()


def test_cli_serve_backend_vllm_starts_and_stops_the_backend(
    tiny_model_dir, record: Path, tmp_path: Path
) -> None:
    """``emma serve --backend vllm`` for real (a subprocess): EMMA's API key in front, the backend
    stopped when EMMA gets SIGTERM."""
    from emma.infer.launch import free_port

    port = free_port()
    env = {**os.environ, "EMMA_API_KEY": "front-key"}
    args = ["--backend", "vllm", "--model", str(tiny_model_dir("fast_vlm"))]
    args += ["--backend-command", f"{sys.executable} {SCRIPT}"]
    with emma_serve(args, port, tmp_path / "serve.log", env):
        base = f"http://127.0.0.1:{port}/v1"
        body = {"messages": [{"role": "user", "content": "left right"}], "max_tokens": 8}
        assert httpx.post(f"{base}/chat/completions", json=body, timeout=30).status_code == 401
        answer = httpx.post(
            f"{base}/chat/completions", json=body, headers={"Authorization": "Bearer front-key"}, timeout=30
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == "right left"
        backend_pid = _records(record)[0]["pid"]
        os.kill(backend_pid, 0)
    with pytest.raises(ProcessLookupError):
        os.kill(backend_pid, 0)


def test_cli_refuses_backend_options_without_a_backend() -> None:
    result = CliRunner().invoke(app, ["serve", "--mmproj", "x.gguf"])
    assert result.exit_code == 2
    assert "need --backend llamacpp, llama-server or vllm" in result.output
    result = CliRunner().invoke(app, ["serve", "--backend", "ollama"])
    assert result.exit_code == 2 and "--backend must be one of" in result.output


def test_llama_server_command(tmp_path: Path) -> None:
    from emma.infer.launch import llama_server_command

    gguf = tmp_path / "model-q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    argv = llama_server_command(gguf, port=8123, parallel=4, threads=1)
    assert argv[0] == "llama-server"
    flags = {
        flag: argv[argv.index(flag) + 1] for flag in ("--model", "--alias", "--host", "--port", "--parallel")
    }
    assert flags["--model"] == str(gguf.resolve()) and flags["--alias"] == "model-q8_0"
    assert flags["--host"] == "127.0.0.1" and flags["--port"] == "8123" and flags["--parallel"] == "4"
    assert "--cont-batching" in argv and "--no-webui" in argv and "--mmproj" not in argv
    other = tmp_path / "model.bin"
    other.write_bytes(b"")
    with pytest.raises(Exception, match="not a .gguf file"):
        llama_server_command(other, port=1)
    with pytest.raises(Exception, match="GGUF model not found"):
        llama_server_command(tmp_path / "missing.gguf", port=1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux only")
def test_a_killed_launcher_takes_its_server_with_it(record: Path) -> None:
    """SIGKILL gives the launching process no chance to stop its server: the kernel's parent-death
    signal does."""
    code = (
        "import sys, time\n"
        "from emma.infer.launch import launch_engine\n"
        f"engine = launch_engine('vllm', 'org/model', command={SCRIPTED!r}, startup_timeout_s=60)\n"
        "print(engine.server.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    launcher = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert launcher.stdout is not None
        server_pid = int(launcher.stdout.readline())
        os.kill(server_pid, 0)
    finally:
        launcher.kill()
        launcher.wait(30)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(server_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(server_pid, signal.SIGKILL)
    pytest.fail("the server outlived its killed launcher")
