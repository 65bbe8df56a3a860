"""Server guards: API key, body bound, URL policy, JSON errors, audit line, temp files, CLI refusals."""

from __future__ import annotations

import base64
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, Router
from typer.testing import CliRunner

from emma.cli import app as cli_app
from emma.io.dicom import quiet_pydicom
from emma.io.limits import Limits
from emma.io.load import VolumeSampling, load_images
from emma.serve.app import ServeSettings
from emma.serve.images import ImageResolver, file_suffix, parse_data_url
from emma.serve.security import (
    AUDIT_LOGGER_NAME,
    APIError,
    GuardMiddleware,
    api_key_matches,
    host_allowed,
    is_loopback_host,
    normalise_domains,
)

KEY = "k-0123456789"


# ------------------------------------------------------------------------------------------ helpers


def test_api_key_matches() -> None:
    assert api_key_matches(f"Bearer {KEY}", KEY)
    assert api_key_matches(f"bearer   {KEY} ", KEY)
    assert not api_key_matches(None, KEY)
    assert not api_key_matches("", KEY)
    assert not api_key_matches(KEY, KEY)  # no scheme
    assert not api_key_matches(f"Basic {KEY}", KEY)
    assert not api_key_matches(f"Bearer {KEY}x", KEY)
    assert not api_key_matches(f"Bearer {KEY[:-1]}", KEY)
    assert not api_key_matches("Bearer ключ", KEY)  # non-ASCII compares without raising


def test_host_allow_list() -> None:
    allowed = ("example.org", "10.0.0.5")
    assert host_allowed("example.org", allowed)
    assert host_allowed("pacs.example.org", allowed)
    assert host_allowed("EXAMPLE.org.", allowed)
    assert host_allowed("10.0.0.5", allowed)
    assert not host_allowed("evilexample.org", allowed)
    assert not host_allowed("example.org.evil.com", allowed)
    assert not host_allowed("1.10.0.0.5", allowed)  # IPs match exactly, never as a suffix
    assert not host_allowed("10.0.0.6", allowed)
    assert not host_allowed(None, allowed)
    assert not host_allowed("example.org", ())


def test_normalise_domains() -> None:
    assert normalise_domains(
        ["https://Example.org:443/path", "*.pacs.net", ".x.io", "[::1]:80", "", "x.io"]
    ) == (
        "example.org",
        "pacs.net",
        "x.io",
        "::1",
    )


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("192.168.1.10", False),
        ("::", False),
        ("example.org", False),
    ],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_settings_api_key_from_env_and_consistency(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMMA_API_KEY", KEY)
    assert ServeSettings().api_key == KEY
    assert ServeSettings(api_key=None).api_key is None
    assert KEY not in repr(ServeSettings())
    monkeypatch.delenv("EMMA_API_KEY")
    assert ServeSettings().api_key is None
    with pytest.raises(ValidationError):
        ServeSettings(allow_remote_images=True)
    with pytest.raises(ValidationError):
        ServeSettings(max_tokens=10, default_max_tokens=20)
    assert ServeSettings(allowed_domains=["HTTPS://Pacs.Example.org/"]).allowed_domains == (
        "pacs.example.org",
    )


# ---------------------------------------------------------------------------------------- middleware


class _Probe:
    """A bare ASGI app behind the middleware: records what reached it."""

    def __init__(self) -> None:
        self.calls = 0

    def app(self, api_key: str | None = KEY, max_body_bytes: int = 1000) -> Any:
        async def echo(request: Request) -> JSONResponse:
            self.calls += 1
            body = await request.body()
            return JSONResponse({"n": len(body), "head": body[:8].decode("latin-1")})

        async def boom(request: Request) -> JSONResponse:
            self.calls += 1
            raise RuntimeError("PATIENT-NAME-IN-EXCEPTION")

        # A bare router: exceptions reach the middleware as they do from FastAPI's routes.
        inner = Router(
            routes=[
                Route("/v1/echo", echo, methods=["POST"]),
                Route("/open", echo, methods=["POST"]),
                Route("/v1/boom", boom, methods=["GET"]),
            ]
        )
        return GuardMiddleware(inner, api_key=api_key, max_body_bytes=max_body_bytes)


def _auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_api_key_checked_before_the_body_is_read() -> None:
    probe = _Probe()
    with TestClient(probe.app()) as c:
        r = c.post("/v1/echo", content=b"x" * 10)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = c.post("/v1/echo", content=b"x" * 10, headers=_auth("wrong"))
        assert r.status_code == 401
        assert probe.calls == 0
        r = c.post("/v1/echo", content=b"x" * 10, headers=_auth())
        assert r.status_code == 200 and r.json()["n"] == 10
        assert c.post("/open", content=b"abc").status_code == 200  # outside /v1: no key needed
    assert probe.calls == 2


def test_body_bound_by_length_and_by_stream() -> None:
    probe = _Probe()
    with TestClient(probe.app()) as c:
        r = c.post("/v1/echo", content=b"y" * 1000, headers=_auth())
        assert r.status_code == 200 and r.json() == {"n": 1000, "head": "yyyyyyyy"}  # replayed intact
        r = c.post("/v1/echo", content=b"y" * 1001, headers=_auth())
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        assert r.headers["connection"] == "close"

        def chunks() -> Any:  # no Content-Length: counted as it arrives
            for _ in range(5):
                yield b"z" * 300

        r = c.post("/v1/echo", content=chunks(), headers=_auth())
        assert r.status_code == 413
        r = c.post("/v1/echo", content=b"1", headers={**_auth(), "Content-Length": "abc"})
        assert r.status_code == 400
    assert probe.calls == 1


def test_unexpected_error_is_json_500_without_detail_and_audited(caplog: pytest.LogCaptureFixture) -> None:
    probe = _Probe()
    with caplog.at_level(logging.INFO), TestClient(probe.app(), raise_server_exceptions=False) as c:
        r = c.get("/v1/boom", headers=_auth())
    assert r.status_code == 500
    assert r.json()["error"] == {
        "message": "internal server error",
        "type": "server_error",
        "code": "internal_error",
        "param": None,
    }
    assert "PATIENT-NAME" not in r.text
    assert "PATIENT-NAME" not in "\n".join(rec.getMessage() for rec in caplog.records)
    [line] = [rec.getMessage() for rec in caplog.records if rec.name == AUDIT_LOGGER_NAME]
    assert f"request_id={r.headers['x-request-id']}" in line
    assert "status=500" in line and "error=internal_error" in line


def test_audit_line_names_routes_not_raw_paths(caplog: pytest.LogCaptureFixture) -> None:
    probe = _Probe()
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER_NAME), TestClient(probe.app()) as c:
        c.post("/v1/Doe-John-1970", content=b"x", headers=_auth())
        c.post("/v1/echo", content=b"x" * 2000, headers=_auth())
    lines = [rec.getMessage() for rec in caplog.records if rec.name == AUDIT_LOGGER_NAME]
    assert len(lines) == 2
    assert "route=/v1/(other)" in lines[0] and "Doe" not in lines[0] and "status=404" in lines[0]
    assert "status=413" in lines[1] and "error=body_too_large" in lines[1] and "bytes_in=2000" in lines[1]


def test_api_error_shape() -> None:
    err = APIError(503, "busy", type="server_overloaded", code="queue_full", headers={"Retry-After": "2"})
    r = err.response()
    assert r.status_code == 503 and r.headers["retry-after"] == "2"
    assert err.payload() == {
        "error": {"message": "busy", "type": "server_overloaded", "code": "queue_full", "param": None}
    }


# ------------------------------------------------------------------------------------------- images


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_parse_data_url() -> None:
    assert parse_data_url(f"data:image/png;base64,{_b64(b'abc')}", max_bytes=10, index=0) == (
        "image/png",
        b"abc",
    )
    assert parse_data_url(f"data:application/dicom;base64,{_b64(b'abc')}", max_bytes=10, index=0)[1] == b"abc"
    cases = [
        ("data:image/png,abc", 400, "invalid_image"),  # not base64
        (f"data:text/plain;base64,{_b64(b'abc')}", 400, "unsupported_media_type"),
        ("data:image/png;base64,@@@", 400, "invalid_image"),
        ("data:image/png;base64,", 400, "invalid_image"),
        (f"data:image/png;base64,{_b64(b'x' * 11)}", 413, "image_too_large"),
        (f"data:image/png;base64,{_b64(b'x' * 100)}", 413, "image_too_large"),
    ]
    for url, status, code in cases:
        with pytest.raises(APIError) as info:
            parse_data_url(url, max_bytes=10, index=2)
        assert (info.value.status, info.value.code) == (status, code), url
        assert "image 2" in info.value.message


def test_file_suffix_follows_content() -> None:
    dicm = b"\0" * 128 + b"DICM" + b"\0" * 300
    nifti = b"\0" * 344 + b"n+1\0" + b"\0" * 10
    assert file_suffix(b"\x1f\x8b" + b"\0" * 10, "application/octet-stream") == ".nii.gz"
    assert file_suffix(dicm, "image/png") == ".dcm"
    assert file_suffix(nifti, "application/x-nifti") == ".nii"
    assert file_suffix(b"\x08\x00" + b"\0" * 10, "application/dicom") == ".dcm"  # no preamble
    assert file_suffix(b"\x89PNG", "image/png") == ".png"
    assert file_suffix(b"????", "application/octet-stream") == ""


def _decode_leaves_no_files(resolver: ImageResolver, data: bytes, mime: str, root: Path) -> None:
    try:
        resolver.decode(data, mime, 0, None, VolumeSampling())
    finally:
        assert list(root.iterdir()) == []


def test_uploads_are_deleted_after_decoding(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, png_bytes: bytes, dicom_path: Path
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    resolver = ImageResolver(limits=Limits(), max_images=4)
    _decode_leaves_no_files(resolver, png_bytes, "image/png", tmp_path)
    _decode_leaves_no_files(resolver, dicom_path.read_bytes(), "application/dicom", tmp_path)
    with pytest.raises(APIError) as info:
        _decode_leaves_no_files(resolver, b"garbage" * 50, "image/png", tmp_path)
    assert info.value.status == 400 and str(tmp_path) not in info.value.message
    with pytest.raises(APIError) as info:
        _decode_leaves_no_files(
            ImageResolver(limits=Limits(max_pixels=100), max_images=4), png_bytes, "image/png", tmp_path
        )
    assert info.value.status == 413 and info.value.code == "image_too_large"
    assert str(tmp_path) not in info.value.message and "image 0" in info.value.message


def test_rasters_decode_from_memory_the_same_way(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, png_bytes: bytes, dicom_path: Path
) -> None:
    made: list[str] = []
    real = tempfile.TemporaryDirectory

    def recording(*args: Any, **kwargs: Any) -> Any:
        made.append("dir")
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryDirectory", recording)
    resolver = ImageResolver(limits=Limits(), max_images=4)
    (image,) = resolver.decode(png_bytes, "image/png", 1, None, VolumeSampling())
    path = tmp_path / "same.png"
    path.write_bytes(png_bytes)
    (reference,) = load_images(path)
    assert image.pixels.tobytes() == reference.pixels.tobytes()
    assert image.provenance.steps == reference.provenance.steps and image.provenance.source == "upload:1"
    assert made == []  # no temporary file for a raster
    with pytest.raises(APIError) as info:
        resolver.decode(b"garbage" * 50, "image/png", 2, None, VolumeSampling())
    assert info.value.status == 400 and info.value.message.startswith("image 2: not a supported image")
    resolver.decode(dicom_path.read_bytes(), "application/dicom", 0, None, VolumeSampling())
    assert made == ["dir"]  # DICOM still goes through a private temporary file


def test_quiet_pydicom_silences_value_warnings(tmp_path: Path, dicom_path: Path) -> None:
    ds = pydicom.dcmread(dicom_path)
    target = tmp_path / "bad.dcm"
    with pydicom.config.disable_value_validation():
        ds.StudyInstanceUID = "1.2.SECRETVALUE"  # invalid UI: pydicom's warning on reading quotes it
        ds.save_as(target)
    with warnings.catch_warnings(record=True) as loud:
        warnings.simplefilter("always")
        _ = pydicom.dcmread(target).StudyInstanceUID
    assert any("SECRETVALUE" in str(w.message) for w in loud)  # the leak being guarded against
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        with quiet_pydicom():
            _ = pydicom.dcmread(target).StudyInstanceUID
    assert not any("SECRETVALUE" in str(w.message) for w in quiet)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_refuses_network_host_without_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMMA_API_KEY", raising=False)
    runner = CliRunner()
    r = runner.invoke(cli_app, ["serve", "--host", "0.0.0.0", "--port", "8123"])
    assert r.exit_code == 2 and "without an API key" in r.output
    r = runner.invoke(cli_app, ["serve", "--allow-remote-images"])
    assert r.exit_code == 2 and "--allowed-domain" in r.output
