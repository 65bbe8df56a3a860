"""The clinician web UI (src/emma/serve/static) driven in headless Debian chromium through Playwright.

The real server (``create_app``) runs on loopback in a uvicorn thread. The first test uses a real tiny
random-weight model through ``TransformersEngine`` (upload a PNG and a DICOM, ask twice, see streamed
answers, check what the page sends). A random model never writes a ``<box>``, so the box and
structured-output tests use :class:`FixedAnswerTestEngine`, a test-only Engine defined here that
streams a fixed answer: everything after the engine (the server's box parsing, the SSE stream, the
page's drawing) is the product's own code.

Needs /usr/bin/chromium (``scripts/install_browser.sh`` installs it); skipped without it.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(
        "Debian chromium not installed at /usr/bin/chromium (run scripts/install_browser.sh as root)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
uvicorn = pytest.importorskip("uvicorn")

from emma.infer.engine import EngineCapabilities  # noqa: E402
from emma.infer.types import GenerationRequest, GenerationResponse, StreamChunk  # noqa: E402
from emma.serve.app import ServeSettings, create_app  # noqa: E402

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000
API_KEY = "ui-test-key"


class FixedAnswerTestEngine:
    """TEST-ONLY Engine: streams a fixed answer in small pieces, whatever the request.

    Stands in for a model that localises findings (random tiny weights never emit a box). Family
    ``qwen2_vl`` means its boxes are read in that family's 0-1000 convention.
    """

    def __init__(self, answer: str, family: str = "qwen2_vl") -> None:
        self._answer = answer
        self._family = family

    @property
    def model_name(self) -> str:
        return "fixed-answer-test-engine"

    @property
    def capabilities(self) -> EngineCapabilities:
        return EngineCapabilities(in_process=True)  # counts its own prompts; streams one at a time

    def close(self) -> None:
        pass

    @property
    def family(self) -> str | None:
        return self._family

    def count_tokens(self, request: GenerationRequest) -> int:
        return sum(len(m.text_content.split()) for m in request.messages) + 16 * len(request.images)

    def _response(self, request: GenerationRequest, text: str, finish: str) -> GenerationResponse:
        return GenerationResponse(
            request_id=request.request_id,
            text=text,
            finish_reason=finish,  # type: ignore[arg-type]
            prompt_tokens=self.count_tokens(request),
            completion_tokens=len(text.split()),
        )

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResponse]:
        return [self._response(r, self._answer, "stop") for r in requests]

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        sent = ""
        for start in range(0, len(self._answer), 12):
            if request.cancel.is_set():
                yield StreamChunk("", self._response(request, sent, "cancelled"))
                return
            piece = self._answer[start : start + 12]
            sent += piece
            yield StreamChunk(piece)
        yield StreamChunk("", self._response(request, sent, "stop"))


# ------------------------------------------------------------------------------------------ helpers


@contextmanager
def running_server(engine: Any, settings: ServeSettings) -> Iterator[str]:
    """The real app under uvicorn on a free loopback port; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, settings), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        instance = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield instance
        instance.close()


@pytest.fixture()
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A PNG (200x100, a bright square on a gradient) and a CT DICOM saved without extension."""
    from pydicom.data import get_testdata_file

    folder = tmp_path_factory.mktemp("ui-images")
    png = folder / "chest.png"
    im = Image.linear_gradient("L").resize((200, 100)).convert("RGB")
    im.paste((255, 255, 255), (120, 30, 160, 70))
    im.save(png)
    dicom = folder / "IM0001"  # no extension: the page must recognise DICOM by its DICM magic
    shutil.copyfile(get_testdata_file("CT_small.dcm"), dicom)
    return {"png": png, "dicom": dicom}


def chat_bodies(pg: Any) -> list[dict[str, Any]]:
    """JSON bodies of the page's POST /v1/chat/completions requests, recorded as they are sent."""
    bodies: list[dict[str, Any]] = []
    pg.on(
        "request",
        lambda req: (
            bodies.append(json.loads(req.post_data))
            if req.url.endswith("/v1/chat/completions") and req.method == "POST"
            else None
        ),
    )
    return bodies


def ask(pg: Any, question: str) -> Any:
    """Type a question, send it with Enter (keyboard path), wait for the finished answer."""
    before = pg.locator(".turn.assistant[data-done]").count()
    pg.fill("#question", question)
    pg.press("#question", "Enter")
    pg.wait_for_function(
        "n => document.querySelectorAll('.turn.assistant[data-done]').length > n", arg=before
    )
    return pg.locator(".turn.assistant").nth(before)


def relative_rect(pg: Any, frame_index: int, box_nth: int) -> tuple[float, float, float, float]:
    """A drawn box's rectangle as fractions of its displayed image."""
    frame = pg.locator(f'.frame[data-image-index="{frame_index}"]')
    img = frame.locator("img").bounding_box()
    box = frame.locator(".box").nth(box_nth).bounding_box()
    assert img and box and img["width"] > 0
    return (
        (box["x"] - img["x"]) / img["width"],
        (box["y"] - img["y"]) / img["height"],
        (box["x"] + box["width"] - img["x"]) / img["width"],
        (box["y"] + box["height"] - img["y"]) / img["height"],
    )


# -------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def tiny_server() -> Iterator[str]:
    from emma.infer.transformers_engine import TransformersEngine
    from emma.model.tiny_families import load_tiny

    engine = TransformersEngine(load_tiny("qwen2_vl"))
    with running_server(engine, ServeSettings(api_key=None)) as url:
        yield url


def test_upload_png_and_dicom_and_chat_with_tiny_model(
    page: Any, tiny_server: str, images: dict[str, Path], tmp_path: Path
) -> None:
    bodies = chat_bodies(page)
    page.goto(tiny_server + "/")
    assert "not for clinical use" in page.locator("#notice").inner_text()
    model = httpx.get(tiny_server + "/health", timeout=10).json()["model"]
    page.wait_for_function(
        "m => document.querySelector('#server-status').textContent === `Model: ${m}`", arg=model
    )

    page.select_option("#window", "lung")
    page.set_input_files("#file-input", [str(images["png"]), str(images["dicom"])])
    page.wait_for_function("document.querySelectorAll('#gallery .frame img').length === 2")
    sizes = page.locator("#gallery .frame img").evaluate_all(
        "els => els.map(e => [e.naturalWidth, e.naturalHeight])"
    )
    # the CT preview is the model-ready slice: the 128x128 CT downscaled to what the tiny Qwen2-VL uses
    from emma.model.families import image_fit
    from emma.model.tiny_families import load_tiny

    fit = image_fit("qwen2_vl", load_tiny("qwen2_vl").processor)
    assert fit is not None and sizes[0][0] > 0 and sizes[1] == list(fit.size_for(128, 128)) != [128, 128]

    page.fill("#chief-complaint", "shortness of breath")
    page.fill("#vitals", "SpO2 88%")
    page.fill("#max-tokens", "8")
    answer = ask(page, "Is there a pneumothorax?")
    assert "failed" not in (answer.get_attribute("class") or "")
    assert page.locator("#error").is_hidden()
    assert "+ 8 completion tokens" in answer.locator(".details").inner_text()

    first = bodies[0]
    # the page shows exactly the streamed answer: the same request without streaming (greedy) gives it
    plain = httpx.post(tiny_server + "/v1/chat/completions", json={**first, "stream": False}, timeout=60)
    assert plain.status_code == 200
    text = plain.json()["choices"][0]["message"]["content"]
    assert text and answer.locator(".text").evaluate("e => e.textContent") == text
    assert first["stream"] is True and first["max_tokens"] == 8 and first["model"] == model
    assert first["emma"]["mode"] == "chat" and first["emma"]["window"] == "lung"
    assert "Chief complaint: shortness of breath" in first["emma"]["context"]
    urls = [p["image_url"]["url"] for p in first["messages"][0]["content"] if p["type"] == "image_url"]
    assert urls[0].startswith("data:image/png;base64,")
    assert urls[1].startswith("data:application/dicom;base64,")
    assert base64.b64decode(urls[1].split(",", 1)[1]) == images["dicom"].read_bytes()
    # once sent, the previews carry the server's image numbering
    indices = page.locator("#gallery .frame").evaluate_all("els => els.map(e => e.dataset.imageIndex)")
    assert indices == ["0", "1"]

    # second turn: the whole conversation is sent again, images only in the first user message
    ask(page, "And the heart size?")
    second = bodies[1]
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]
    assert second["messages"][1]["content"] == text
    assert second["messages"][2]["content"] == [{"type": "text", "text": "And the heart size?"}]
    assert page.locator(".turn.assistant[data-done]").count() == 2
    page.screenshot(path=str(tmp_path / "webui-tiny.png"), full_page=True)


BOX_ANSWER = (
    "Right upper zone opacity <ref>opacity</ref><box>[[100,200,500,700]]</box> "
    "and a nodule on the CT <ref>nodule</ref><box image=1>[[250,250,750,750]]</box>."
)


def test_api_key_boxes_and_exports(page: Any, images: dict[str, Path], tmp_path: Path) -> None:
    settings = ServeSettings(api_key=API_KEY)
    with running_server(FixedAnswerTestEngine(BOX_ANSWER), settings) as url:
        page.goto(url + "/")
        # without the key the server answers 401, shown as a readable message
        page.set_input_files("#file-input", [str(images["png"])])
        placeholder = page.locator("#gallery .placeholder.error")
        placeholder.wait_for()
        assert "401" in placeholder.inner_text()

        page.fill("#api-key", API_KEY)
        page.press("#api-key", "Tab")  # change event: key stored, failed previews retried
        page.wait_for_function("document.querySelectorAll('#gallery .frame img').length === 1")
        assert page.evaluate("sessionStorage.getItem('emma.apiKey')") == API_KEY
        assert page.evaluate("localStorage.length") == 0
        page.set_input_files("#file-input", [str(images["dicom"])])
        page.wait_for_function("document.querySelectorAll('#gallery .frame img').length === 2")

        answer = ask(page, "Localise the abnormalities.")
        assert "failed" not in (answer.get_attribute("class") or "")
        # box markup is shown as labelled chips (the raw markup in their title)
        shown = answer.locator(".text").evaluate("e => e.textContent")
        assert shown == "Right upper zone opacity ▭ opacity and a nodule on the CT ▭ nodule."
        chip = answer.locator(".box-chip").nth(1)
        assert chip.get_attribute("title") == "<ref>nodule</ref><box image=1>[[250,250,750,750]]</box>"
        assert "2 box(es)" in answer.locator(".details").inner_text()

        # qwen2_vl boxes are 0-1000: drawn at those fractions of each displayed preview, labelled
        boxes = page.locator("#gallery .box")
        assert boxes.count() == 2
        frame0 = page.locator('.frame[data-image-index="0"] .box')
        assert frame0.count() == 1 and frame0.inner_text() == "opacity"
        for got, want in zip(relative_rect(page, 0, 0), (0.1, 0.2, 0.5, 0.7), strict=True):
            assert abs(got - want) < 0.02
        assert page.locator('.frame[data-image-index="1"] .box').inner_text() == "nodule"
        for got, want in zip(relative_rect(page, 1, 0), (0.25, 0.25, 0.75, 0.75), strict=True):
            assert abs(got - want) < 0.02
        page.screenshot(path=str(tmp_path / "webui-boxes.png"), full_page=True)

        with page.expect_download() as info:
            page.click("#export-json")
        exported = json.loads(Path(info.value.path()).read_text())
        assert exported["notice"].startswith("Research tool")
        assert [t["role"] for t in exported["turns"]] == ["user", "assistant"]
        assert exported["turns"][1]["text"] == BOX_ANSWER
        assert [b["label"] for b in exported["turns"][1]["boxes"]] == ["opacity", "nodule"]
        assert "IM0001" not in json.dumps(exported) and "base64" not in json.dumps(exported)

        with page.expect_download() as info:
            page.click("#export-md")
        markdown = Path(info.value.path()).read_text()
        assert info.value.suggested_filename.endswith(".md")
        assert "Research tool — not for clinical use." in markdown
        assert "- opacity: image 1" in markdown and "- nodule: image 2" in markdown

        # a wrong key: the chat request fails with a readable error and the turn is marked failed
        page.fill("#api-key", "wrong-key")
        page.press("#api-key", "Tab")
        failed = ask(page, "Anything else?")
        assert "failed" in (failed.get_attribute("class") or "")
        assert "401" in page.locator("#error").inner_text()


STRUCTURED_ANSWER = json.dumps(
    {
        "findings": [
            {
                "description": "Lobar consolidation",
                "location": "right lower lobe",
                "severity": "significant",
                "box": [100, 300, 600, 900],
            }
        ],
        "differential": [
            {"diagnosis": "Community-acquired pneumonia", "likelihood": 0.7},
            {"diagnosis": "Pulmonary infarct", "likelihood": 0.1},
        ],
        "triage_urgency": "emergent",
        "recommended_next_steps": ["Blood cultures", "Start antibiotics"],
        "confidence": 0.6,
        "abstain": False,
    }
)


def test_structured_findings_rendered(page: Any, images: dict[str, Path], tmp_path: Path) -> None:
    with running_server(FixedAnswerTestEngine(STRUCTURED_ANSWER), ServeSettings(api_key=None)) as url:
        page.goto(url + "/")
        page.select_option("#mode", "structured")
        page.set_input_files("#file-input", [str(images["png"])])
        page.wait_for_function("document.querySelectorAll('#gallery .frame img').length === 1")
        answer = ask(page, "Assess this radiograph.")
        card = answer.locator(".structured")
        card.wait_for()
        text = card.inner_text()
        assert "[significant] Lobar consolidation (right lower lobe)" in text
        assert "Community-acquired pneumonia — 70%" in text and "Pulmonary infarct — 10%" in text
        assert "Triage urgency: emergent" in text and "Confidence: 60%" in text
        assert "Start antibiotics" in text
        assert "Cannot determine" not in text
        # the finding's box (0-1000 for qwen2_vl) is drawn on the image, labelled by its location
        box = page.locator('.frame[data-image-index="0"] .box')
        assert box.count() == 1 and box.inner_text() == "right lower lobe"
        for got, want in zip(relative_rect(page, 0, 0), (0.1, 0.3, 0.6, 0.9), strict=True):
            assert abs(got - want) < 0.02
        page.screenshot(path=str(tmp_path / "webui-structured.png"), full_page=True)


REPORT_ANSWER = "FINDINGS: Right lower lobe consolidation. No pneumothorax.\nIMPRESSION: Pneumonia."


def test_report_draft_rendered_and_exported(page: Any, images: dict[str, Path]) -> None:
    with running_server(FixedAnswerTestEngine(REPORT_ANSWER), ServeSettings(api_key=None)) as url:
        page.goto(url + "/")
        page.select_option("#mode", "report")
        page.fill("#chief-complaint", "fever and cough")
        page.set_input_files("#file-input", [str(images["png"])])
        page.wait_for_function("document.querySelectorAll('#gallery .frame img').length === 1")
        answer = ask(page, "Draft the report.")
        card = answer.locator(".report")
        card.wait_for()
        assert "Right lower lobe consolidation. No pneumothorax." in card.inner_text()
        assert "Pneumonia." in card.inner_text()
        assert answer.locator("details.raw .text").evaluate("e => e.textContent") == REPORT_ANSWER

        with page.expect_download() as info:
            page.click("#export-md")
        markdown = Path(info.value.path()).read_text()
        assert "## Findings\n\nRight lower lobe consolidation. No pneumothorax." in markdown
        assert "## Impression\n\nPneumonia." in markdown
        assert "## Clinical context\n\nChief complaint: fever and cough" in markdown
        assert "- Images: #1 200×100" in markdown
