"""`emma chat` end to end: a real tiny model folder, real DICOM/PNG files, and an openai: model on loopback."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from emma.cli import app
from emma.infer.prompts import NOTICE
from emma.model.tiny_families import build_tiny

runner = CliRunner()
CT = get_testdata_file("CT_small.dcm")


@pytest.fixture(scope="module")
def model_dir() -> str:
    return str(build_tiny("qwen2_5_vl"))


@pytest.fixture()
def png(tmp_path: Path) -> Path:
    path = tmp_path / "hand.png"
    Image.new("RGB", (96, 64), (200, 200, 200)).save(path)
    return path


def run(*args: object, input: str | None = None) -> Any:
    return runner.invoke(app, ["chat", *(str(a) for a in args)], input=input)


def test_one_shot_json_and_boxes(model_dir: str, png: Path, tmp_path: Path) -> None:
    out = tmp_path / "boxes.png"
    result = run(
        "--model",
        model_dir,
        "--image",
        CT,
        "--image",
        png,
        "--context",
        "fall, wrist pain",
        "--json",
        "--boxes",
        out,
        "--max-tokens",
        "5",
        "What fracture?",
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["mode"] == "chat" and answer["notice"] == NOTICE
    assert answer["usage"]["completion_tokens"] == 5 and answer["finish_reason"] == "length"
    assert [(i["source_format"], i["width"], i["height"]) for i in answer["images"]] == [
        ("dicom", 128, 128),
        ("png", 96, 64),
    ]
    assert isinstance(answer["boxes"], list) and isinstance(answer["box_errors"], list)
    with Image.open(out) as picture:
        assert picture.size == (128 + 8 + 96, 128)


def test_one_shot_text_modes(model_dir: str, png: Path) -> None:
    result = run("--model", model_dir, "-i", png, "--mode", "report", "--max-tokens", "3", "Draft a report")
    assert result.exit_code == 0, result.output
    assert NOTICE in result.stdout and "missing Findings section" in result.stdout


def test_interactive_multi_turn(model_dir: str, png: Path) -> None:
    script = f"What is this?\n\n/mode structured\n/image {png}\nAssess\nexit\nnever asked\n"
    result = run("--model", model_dir, "-i", png, "--json", "--max-tokens", "3", input=script)
    assert result.exit_code == 0, result.output
    turns = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [t["mode"] for t in turns] == ["chat", "structured"]
    assert len(turns[0]["images"]) == 1 and len(turns[1]["images"]) == 2
    assert turns[1]["usage"]["prompt_tokens"] > turns[0]["usage"]["prompt_tokens"]


def test_interactive_bad_command_is_reported_and_the_session_goes_on(
    model_dir: str, png: Path, tmp_path: Path
) -> None:
    script = f"/image {tmp_path / 'nope.png'}\n/mode poetry\nhello\n"
    result = run("--model", model_dir, "-i", png, "--json", "--max-tokens", "2", input=script)
    assert result.exit_code == 0, result.output
    assert result.stderr.count("error:") == 2
    assert len([line for line in result.stdout.splitlines() if line.startswith("{")]) == 1


@pytest.mark.parametrize(
    "args",
    [
        ("--image", "{bad}", "q"),
        ("--image", "{missing}", "q"),
        ("--image", "{png}", "--mode", "poetry", "q"),
        ("--image", "{png}", "--window", "nonsense", "q"),
        ("--model", "/no/such/model", "--image", "{png}", "q"),
        ("--model", "openai:ftp://x#m", "q"),
    ],
)
def test_bad_input_exits_2_with_one_line(args: tuple[str, ...], png: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"DICM" * 8)
    values = {"bad": bad, "missing": tmp_path / "missing.dcm", "png": png}
    result = run(*(a.format(**values) for a in args))
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "Traceback" not in result.output


# ------------------------------------------------------------------ an openai: model on loopback

BOX_ANSWER = 'Fracture:\n```json\n[{"bbox_2d": [28, 14, 56, 42], "label": "fracture"}]\n```'


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append(body)  # type: ignore[attr-defined]
        data = json.dumps(
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": BOX_ANSWER},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 40, "completion_tokens": 20, "total_tokens": 60},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def peer_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.bodies = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()
    thread.join()


def test_openai_model_boxes_are_drawn(peer_url: str, png: Path, tmp_path: Path) -> None:
    out = tmp_path / "overlay.png"
    result = run(
        "--model", f"openai:{peer_url}#peer", "--family", "qwen2_5_vl", "-i", png, "--boxes", out, "Where?"
    )
    assert result.exit_code == 0, result.output
    assert "box 0 on image 0: (" in result.stdout and "fracture" in result.stdout and NOTICE in result.stdout
    with Image.open(out) as picture:
        pixels = np.asarray(picture.convert("RGB")).astype(int)
    grey = np.array([200, 200, 200])
    changed = np.nonzero(np.abs(pixels - grey).sum(axis=2))
    # qwen2.5-vl sees the 96x64 image resized to 84x56 (multiples of 28): 28/84*96 = 32, 14/56*64 = 16
    assert abs(changed[1].min() - 32) <= 2 and abs(changed[0].max() - 48) <= 2


def two_series_folder(folder: Path) -> Path:
    """The real CT_small slice as two series in one folder: series 1 with 2 slices, series 2 with 4."""
    folder.mkdir(parents=True)
    base = pydicom.dcmread(CT)
    for number, n in ((1, 2), (2, 4)):
        series_uid = generate_uid()
        for k in range(n):
            ds = base.copy()
            ds.SeriesInstanceUID, ds.SeriesNumber = series_uid, number
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [-50.0, -50.0, 5.0 * k]
            ds.save_as(folder / f"s{number}_{k}.dcm", enforce_file_format=True)
    return folder


def test_series_chooses_one_series_of_a_folder(peer_url: str, tmp_path: Path) -> None:
    folder = two_series_folder(tmp_path / "mixed")
    refused = run("--model", f"openai:{peer_url}#m", "--image", folder, "q")
    assert refused.exit_code == 2 and "2 series found" in refused.stderr and "--series N" in refused.stderr
    result = run("--model", f"openai:{peer_url}#m", "--image", folder, "--series", "2", "--json", "q")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["images"]) == 4  # the 4 slices of series 2
    file_only = run("--model", f"openai:{peer_url}#m", "--image", CT, "--series", "1", "q")
    assert file_only.exit_code == 2 and "no folder" in file_only.stderr
