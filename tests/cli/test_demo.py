"""`emma demo` end to end with a tiny random Idefics3 model on the real RG1 chest
radiograph: the answers, the notice, the structured output and the overlays; then the real server. Last, the
demo as `make demo` runs it: on the shipped emma-tiny, offline."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

import emma.cli.demo  # noqa: F401  (the command module; `emma.cli` registers it too)
from emma.cli import app
from emma.cli.demo import find_demo_image
from emma.infer.prompts import NOTICE
from emma.io.load import load_images

runner = CliRunner()
RG1 = get_testdata_file("RG1_UNCI.dcm", download=False)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Callable[[str], Path]) -> str:
    return str(tiny_model_dir("idefics3"))  # its random answers are printable text (fast_vlm's are newlines)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_demo_answers_in_chat_and_structured_mode_and_writes_overlays(model_dir: str, tmp_path: Path) -> None:
    assert RG1 is not None, "pydicom-data (a test extra) carries RG1_UNCI.dcm"
    out = tmp_path / "demo"
    result = runner.invoke(
        app, ["demo", "--model", model_dir, "--no-serve", "--out", str(out), "--max-tokens", "4"]
    )
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "chest radiograph" in text and "RG1_UNCI.dcm" in text
    assert text.count(NOTICE) == 3  # the banner and each answer
    lines = text.splitlines()
    for mode, question in (
        ("chat", "Is there a pneumothorax?"),
        ("structured", "Assess this chest radiograph"),
    ):
        start = next(i for i, line in enumerate(lines) if line.startswith(f"Q: {question}"))
        answer = lines[start + 1]
        assert answer.strip() and answer != NOTICE  # the model's answer comes right after the question
        target = out / f"{mode}_boxes.png"
        assert f"written to {target}" in text
        with Image.open(target) as picture:
            expected = load_images(Path(str(RG1)))[0]
            assert picture.format == "PNG" and picture.size == (expected.width, expected.height)
    # the random model writes no JSON: the structured part says why instead of inventing findings
    assert "structured output could not be read" in text or "Findings" in text
    assert "the server was not started" in text


def test_demo_falls_back_to_pydicoms_ct_slice_with_a_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import pydicom.data

    real = pydicom.data.get_testdata_file

    def without_rg1(name: str, *args: object, **kwargs: object) -> object:
        return None if name == "RG1_UNCI.dcm" else real(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pydicom.data, "get_testdata_file", without_rg1)
    image, message = find_demo_image()
    assert image.path.name == "CT_small.dcm" and image.path.is_file()
    assert message is not None and "not installed" in message and "CT_small.dcm" in message


def test_demo_refuses_a_busy_port_before_loading_anything(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = runner.invoke(app, ["demo", "--model", "/no/such/model", "--port", str(port)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"port {port}" in lines[0]


def test_demo_then_serves_the_model_with_the_web_ui(model_dir: str, tmp_path: Path) -> None:
    port = _free_port()
    log = tmp_path / "demo.log"
    env = {k: v for k, v in os.environ.items() if k != "EMMA_API_KEY"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-c", "from emma.cli import app; app()", "demo", "--model", model_dir]
    command += ["--port", str(port), "--out", str(tmp_path / "demo"), "--max-tokens", "2"]
    with open(log, "wb") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        health = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = httpx.get(f"{url}/health", timeout=2.0)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert health is not None, log.read_text(errors="replace")[-2000:]
        assert health.status_code == 200 and health.json()["model"] == "idefics3-seed0"
        page = httpx.get(f"{url}/", timeout=5.0)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        output = log.read_text(errors="replace")
        assert f"at http://127.0.0.1:{port}/" in output and output.count(NOTICE) >= 4
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    assert proc.returncode is not None


@pytest.mark.slow
def test_demo_runs_on_the_shipped_emma_tiny(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from emma.model.emma_tiny import MANIFEST_FILE, asset_dir

    assert (asset_dir() / MANIFEST_FILE).is_file(), "emma-tiny's delta ships with the package"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--no-serve", "--out", str(out), "--max-tokens", "48"])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "model: emma-tiny" in text and "loaded emma-tiny" in text
    assert text.count(NOTICE) == 3
    assert (out / "chat_boxes.png").is_file() and (out / "structured_boxes.png").is_file()
    assert "the server was not started" in text
