"""ChatSession: multi-turn with a real tiny model on DICOM / PNG / NIfTI, and answer parsing through
OpenAIEngine against a scripted OpenAI-shaped peer on loopback (the peer answers what a test tells it)."""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from emma.errors import InputError
from emma.infer.chat import ChatSession, GenerationError, render_boxes
from emma.infer.openai_engine import OpenAIEngine
from emma.infer.prompts import NOTICE, system_prompt
from emma.infer.transformers_engine import TransformersEngine
from emma.infer.types import SamplingParams
from emma.io.load import VolumeSampling
from emma.model.families import model_image_size, to_canonical
from emma.model.registry import LoadedModel

CT = get_testdata_file("CT_small.dcm")


# ----------------------------------------------------------------------------- real tiny model


@pytest.fixture(scope="module")
def tiny_engine(tiny_loaded: Callable[[str], LoadedModel]) -> TransformersEngine:
    return TransformersEngine(tiny_loaded("qwen2_5_vl"))  # shared model: not modified here


@pytest.fixture()
def png(tmp_path: Path) -> Path:
    path = tmp_path / "view.png"
    Image.new("RGB", (96, 64), (10, 200, 30)).save(path)
    return path


def test_multiturn_with_dicom_and_png(tiny_engine: TransformersEngine, png: Path) -> None:
    session = ChatSession(
        tiny_engine,
        context={"chief_complaint": "fall from ladder", "vitals": "HR 112, BP 95/60"},
        window="abdomen",
        sampling=SamplingParams(max_new_tokens=6),
    )
    added = session.add_images([CT, png])
    assert [(a.index, a.source_format, a.width, a.height) for a in added] == [
        (0, "dicom", 128, 128),
        (1, "png", 96, 64),
    ]

    first = session.ask("What do you see?")
    assert first.mode == "chat" and first.notice == NOTICE
    assert first.usage["completion_tokens"] == 6 and first.usage["prompt_tokens"] > 20
    assert [im.index for im in first.images] == [0, 1] and session.pending == []
    user = session.history[0]
    assert user.role == "user" and len(user.images) == 2
    assert (
        "Chief complaint: fall from ladder" in user.text_content and "What do you see?" in user.text_content
    )

    # a prior study for the second turn, streamed
    session.add_images(Image.new("RGB", (50, 40), (90, 90, 90)))
    deltas: list[str] = []
    second = session.ask("Compare with the prior.", mode="report", on_delta=deltas.append)
    assert "".join(deltas) == second.text
    assert second.report is not None and second.report.errors  # random weights write no sections
    assert second.usage["prompt_tokens"] > first.usage["prompt_tokens"]  # history + a third image
    assert len(session.history) == 4 and len(session.history[2].images) == 1
    assert "Chief complaint" not in session.history[2].text_content  # context only in the first turn
    assert session.history[1].text_content == first.text  # the model's own words, no notice
    assert all(NOTICE not in m.text_content for m in session.history)

    exported = json.loads(json.dumps(session.export()))
    assert [t["role"] for t in exported["turns"]] == ["user", "assistant", "user", "assistant"]
    assert exported["turns"][0]["images"] == [0, 1] and exported["turns"][2]["images"] == [2]
    assert exported["turns"][3]["result"]["mode"] == "report" and exported["notice"] == NOTICE
    out = second.to_json()
    assert json.loads(json.dumps(out))["images"][2] == {
        "index": 2,
        "width": 50,
        "height": 40,
        "source_format": "pil",
    }


def test_volume_becomes_sampled_slices(tiny_engine: TransformersEngine, tmp_path: Path) -> None:
    data = np.linspace(-1000, 1000, 24 * 20 * 12, dtype=np.float32).reshape(24, 20, 12)
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), path)
    session = ChatSession(
        tiny_engine, volume_sampling=VolumeSampling(n=3), sampling=SamplingParams(max_new_tokens=2)
    )
    added = session.add_images(path)
    assert [a.source_format for a in added] == ["nifti"] * 3
    assert len({a.slice_index for a in added}) == 3
    assert session.ask("Any bleed?", mode="structured").structured_errors  # noise is not JSON: reported


def test_bad_images_add_nothing(tiny_engine: TransformersEngine, tmp_path: Path, png: Path) -> None:
    session = ChatSession(tiny_engine, max_images=2)
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(InputError):
        session.add_images([png, bad])
    with pytest.raises(InputError):
        session.add_images(tmp_path / "missing.png")
    assert session.pending == []
    with pytest.raises(InputError, match="over the limit of 2"):
        session.add_images([png, png, png])
    assert session.pending == []
    with pytest.raises(InputError, match="unknown mode"):
        session.ask("q", mode="poetry")


# -------------------------------------------------------------------------- scripted peer


class _Peer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.answers: list[str] = []
        self.bodies: list[dict[str, Any]] = []


class _Handler(BaseHTTPRequestHandler):
    server: _Peer

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append(body)
        answer = self.server.answers.pop(0)
        status, payload = (
            200,
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
            },
        )
        if answer == "HTTP400":
            status, payload = 400, {"error": {"message": "bad", "type": "invalid_request_error", "code": 400}}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def peer() -> Iterator[_Peer]:
    server = _Peer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def _engine(server: _Peer, family: str) -> OpenAIEngine:
    return OpenAIEngine(f"http://127.0.0.1:{server.server_address[1]}/v1", "m", family=family, max_retries=0)


def _sizes_sent(body: dict[str, Any]) -> list[tuple[int, int]]:
    sizes = []
    for message in body["messages"]:
        if isinstance(message["content"], list):
            for part in message["content"]:
                if part["type"] == "image_url":
                    data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                    sizes.append(Image.open(io.BytesIO(data)).size)
    return sizes


def test_qwen25_boxes_become_canonical_pixels(peer: _Peer) -> None:
    session = ChatSession(_engine(peer, "qwen2_5_vl"), context="triage: chest pain")
    session.add_images([Image.new("RGB", (640, 480)), Image.new("RGB", (300, 200))])
    answer = (
        'Opacity here:\n```json\n[{"bbox_2d": [56, 84, 280, 336], "label": "opacity"},\n'
        ' {"bbox_2d": [10, 10, 90, 50], "label": "line", "image_index": 1},\n'
        ' {"bbox_2d": [5000, 5000, 6000, 6000], "label": "nonsense"}]\n```'
    )
    peer.answers.append(answer)
    result = session.ask("Where is the opacity?")
    model_size = model_image_size("qwen2_5_vl", 640, 480)
    expected = to_canonical((56, 84, 280, 336), "qwen2_5_vl", 640, 480, model_size)
    assert len(result.boxes) == 2 and len(result.box_errors) == 1 and "rejected" in result.box_errors[0]
    assert result.boxes[0].as_tuple() == pytest.approx(expected)
    assert result.boxes[0].label == "opacity" and result.boxes[1].image_index == 1
    assert result.usage == {"prompt_tokens": 11, "completion_tokens": 7}

    body = peer.bodies[0]
    assert body["messages"][0] == {"role": "system", "content": system_prompt("chat", "qwen2_5_vl")}
    assert _sizes_sent(body) == [(640, 480), (300, 200)]
    assert "triage: chest pain" in body["messages"][1]["content"][-1]["text"]

    picture = render_boxes(result.images, result.boxes)
    assert picture.size == (640 + 8 + 300, 480)
    pixels = np.asarray(picture)
    mid_y, left = int((expected[1] + expected[3]) / 2), int(expected[0])
    assert pixels[mid_y, left - 2 : left + 3].any()  # the left edge of the box is drawn there
    assert not pixels[400, 100:200].any()
    assert pixels[:, 648:].any() and not pixels[:, 640:648].any()  # second image's box; the gap stays black

    # second turn: history resent as the model wrote it, images only once, no context again
    peer.answers.append("No further findings.")
    session.ask("Anything else?")
    second = peer.bodies[1]["messages"]
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
    assert second[2]["content"] == answer
    assert second[3]["content"].endswith("Anything else?") and "triage" not in second[3]["content"]
    assert _sizes_sent(peer.bodies[1]) == [(640, 480), (300, 200)]


def test_structured_mode_validates_and_canonicalises(peer: _Peer) -> None:
    session = ChatSession(_engine(peer, "internvl"))
    session.add_images(Image.new("RGB", (200, 100)))
    peer.answers.append(
        "```json\n"
        + json.dumps(
            {
                "findings": [
                    {
                        "description": "pneumothorax",
                        "location": "left apex",
                        "box": [100, 100, 500, 500],
                        "severity": "critical",
                    }
                ],
                "differential": [{"diagnosis": "tension pneumothorax", "likelihood": 0.4}],
                "triage_urgency": "immediate",
                "recommended_next_steps": ["needle decompression"],
                "confidence": 0.8,
            }
        )
        + "\n```"
    )
    result = session.ask("Assess.", mode="structured")
    assert result.structured is not None and not result.structured_errors
    assert result.structured.findings[0].box == pytest.approx((20.0, 10.0, 100.0, 50.0))
    assert [b.as_tuple() for b in result.boxes] == [pytest.approx((20.0, 10.0, 100.0, 50.0))]
    assert result.boxes[0].label == "left apex"
    assert "JSON" in peer.bodies[0]["messages"][0]["content"]  # the structured system prompt
    as_json = json.loads(json.dumps(result.to_json()))
    assert as_json["structured"]["triage_urgency"] == "immediate" and as_json["notice"] == NOTICE

    peer.answers.append("{'findings': [oops")
    broken = session.ask("Again.", mode="structured")
    assert broken.structured is None and broken.structured_errors


def test_report_mode(peer: _Peer) -> None:
    session = ChatSession(_engine(peer, "idefics3"))
    session.add_images(Image.new("RGB", (64, 64)))
    peer.answers.append("FINDINGS: Clear lungs.\nIMPRESSION: No acute disease.")
    result = session.ask("Report this.", mode="report")
    assert result.report is not None
    assert (result.report.findings, result.report.impression, result.report.errors) == (
        "Clear lungs.",
        "No acute disease.",
        [],
    )


def test_engine_error_keeps_the_conversation(peer: _Peer) -> None:
    session = ChatSession(_engine(peer, "qwen2_5_vl"))
    session.add_images(Image.new("RGB", (32, 32)))
    peer.answers.append("HTTP400")
    with pytest.raises(GenerationError, match="400"):
        session.ask("hello")
    assert session.history == [] and len(session.pending) == 1
    peer.answers.append("fine")
    assert session.ask("hello").text == "fine" and len(session.images) == 1


def test_a_turn_result_carries_every_field_of_the_mode_answer() -> None:
    """ChatSession builds its result from interpret()'s ModeAnswer field for field."""
    from dataclasses import fields

    from emma.infer.chat import ChatTurnResult
    from emma.infer.modes import ModeAnswer

    assert {f.name for f in fields(ModeAnswer)} <= {f.name for f in fields(ChatTurnResult)}
