"""Model specs (parse_spec golden and error cases) and load_model options, on tiny local models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from emma.errors import InputError
from emma.model.loading import resolve_device, resolve_dtype
from emma.model.registry import (
    CheckpointError,
    DeviceError,
    ModelNotAvailableError,
    ModelSpec,
    ModelSpecError,
    UnsupportedModelError,
    emma_tiny_dir,
    load_model,
    parse_spec,
)

HAS_CUDA = torch.cuda.is_available()


def _model_folder(root: Path, model_type: str = "qwen2_5_vl") -> Path:
    folder = root / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return folder


# ----------------------------------------------------------------------------------- parse_spec


@pytest.mark.parametrize("text", ["emma-tiny", "EMMA-TINY", "  emma-tiny\n"])
def test_parse_emma_tiny(text: str) -> None:
    assert parse_spec(text) == ModelSpec(kind="emma-tiny")
    assert parse_spec(text).name == "emma-tiny"


def test_parse_tiny_and_init_specs() -> None:
    assert parse_spec("tiny:llava") == ModelSpec(kind="tiny", family="llava")
    assert parse_spec("tiny:llava").name == "tiny-llava"
    assert parse_spec("emma-tiny:init") == ModelSpec(kind="emma-tiny-init")
    assert parse_spec("emma-tiny:init:lite0") == ModelSpec(kind="emma-tiny-init", encoder="lite0")
    assert parse_spec("emma-tiny:init:lite0").name == "emma-tiny:init:lite0"
    with pytest.raises(ModelSpecError, match="unknown tiny family 'nope'"):
        parse_spec("tiny:nope")
    with pytest.raises(ModelSpecError, match="unknown emma-tiny encoder 'vgg'"):
        parse_spec("emma-tiny:init:vgg")


def test_load_model_accepts_tiny_spec() -> None:
    """Every command takes the same specs: tiny:<family> loads through load_model as through a recipe."""
    from emma.train.run import resolve_base_model

    loaded = load_model("tiny:llava", device="cpu")
    assert loaded.name == "tiny-llava" and loaded.family == "llava"
    assert loaded.path == resolve_base_model("tiny:llava")
    assert not loaded.model.training


def test_parse_local_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _model_folder(tmp_path)
    spec = parse_spec(str(folder))
    assert spec.kind == "local" and spec.path == folder.resolve() and spec.name == "my-model"
    monkeypatch.chdir(tmp_path)
    assert parse_spec("my-model").path == folder.resolve()  # relative folder
    assert parse_spec("./my-model/").kind == "local"


def test_parse_local_folder_beats_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "org").mkdir()
    nested = tmp_path / "org" / "name"
    nested.mkdir()
    (nested / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert parse_spec("org/name").kind == "local"


@pytest.mark.parametrize(
    ("text", "repo", "revision"),
    [
        ("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct", None),
        ("HuggingFaceTB/SmolVLM-256M-Instruct@main", "HuggingFaceTB/SmolVLM-256M-Instruct", "main"),
        ("google/medgemma-4b-it@refs/pr/1", "google/medgemma-4b-it", "refs/pr/1"),
        ("OpenGVLab/InternVL3-1B-hf", "OpenGVLab/InternVL3-1B-hf", None),
    ],
)
def test_parse_hub_id(text: str, repo: str, revision: str | None) -> None:
    spec = parse_spec(text)
    assert spec == ModelSpec(kind="hub", repo_id=repo, revision=revision)
    assert spec.name == repo


@pytest.mark.parametrize(
    ("text", "base_url", "model"),
    [
        ("openai:http://127.0.0.1:8000/v1#emma-tiny", "http://127.0.0.1:8000/v1", "emma-tiny"),
        (
            "openai:https://vllm.example.org/v1/#Qwen/Qwen2.5-VL-7B-Instruct",
            "https://vllm.example.org/v1",
            "Qwen/Qwen2.5-VL-7B-Instruct",
        ),
        ("OPENAI:http://localhost:11434/v1#llava:7b", "http://localhost:11434/v1", "llava:7b"),
    ],
)
def test_parse_openai(text: str, base_url: str, model: str) -> None:
    spec = parse_spec(text)
    assert spec == ModelSpec(kind="openai", base_url=base_url, model=model)
    assert spec.name == model


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty model spec"),
        ("   ", "empty model spec"),
        ("x" * 2000, "too long"),
        ("openai:http://127.0.0.1:8000/v1", "needs a model name"),
        ("openai:http://127.0.0.1:8000/v1#", "needs a model name"),
        ("openai:http://127.0.0.1:8000/v1#two words", "without spaces"),
        ("openai:ftp://example.org/v1#m", "http:// or https://"),
        ("openai:127.0.0.1:8000#m", "http:// or https://"),
        ("openai:#m", "http:// or https://"),
        ("openai:http:///v1#m", "no host"),
        ("openai:http://user:secret@example.org/v1#m", "credentials"),
        ("openai:http://example.org:99999/v1#m", "malformed"),
        ("openai:http://example.org/v1?key=1#m", "query string"),
        ("/definitely/not/here/model", "not found"),
        ("./missing-model-folder", "not found"),
        ("a/b/c", "not found"),
        ("not a spec", "unrecognised"),
        ("gpt2", "unrecognised"),
        ("org/na me", "unrecognised"),
        ("org/..", "unrecognised"),
        ("-org/name", "unrecognised"),
        ("org/name@", "unrecognised"),
        ("y" * 300, "unusable model path|unrecognised"),
        ("bad\x00name\x1b[31m", "unusable model path|unrecognised"),
    ],
)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(ModelSpecError, match=message) as info:
        parse_spec(text)
    assert isinstance(info.value, InputError)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300
    assert "secret" not in str(info.value)
    assert str(info.value).isprintable()


def test_parse_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match="no config.json"):
        parse_spec(str(tmp_path))
    file = tmp_path / "weights.safetensors"
    file.write_bytes(b"x")
    with pytest.raises(ModelSpecError, match="is a file"):
        parse_spec(str(file))


# ------------------------------------------------------------------------------- resolution errors


def test_emma_tiny_not_installed_yet() -> None:
    try:
        folder = emma_tiny_dir()
    except ModelNotAvailableError as exc:
        assert "not installed" in str(exc) and "local model folder" in str(exc)
        with pytest.raises(ModelNotAvailableError, match="not installed"):
            load_model("emma-tiny")
    else:  # the embedded-model issue has landed: its folder is a real checkpoint
        assert (folder / "config.json").is_file()


def test_hub_without_download_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache
    with pytest.raises(ModelNotAvailableError, match="downloads are disabled"):
        load_model("emma-test-org/not-a-real-model", allow_download=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match="HF_HUB_OFFLINE"):
        load_model("emma-test-org/not-a-real-model", allow_download=True)


def test_openai_spec_is_not_loaded_in_process() -> None:
    with pytest.raises(ModelSpecError, match="load_engine"):
        load_model("openai:http://127.0.0.1:9/v1#m")


def test_unsupported_model_type(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path, model_type="bert")
    with pytest.raises(UnsupportedModelError, match="'bert' is not supported.*qwen2_5_vl"):
        load_model(str(folder), device="cpu")


def test_config_without_model_type(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="no model_type"):
        load_model(str(folder), device="cpu")


def test_corrupt_weights_give_a_typed_error(tiny_model_dir, tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    shutil.copytree(tiny_model_dir("idefics3"), folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="cannot load model from broken") as info:
        load_model(str(folder), device="cpu")
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------- device/dtype/quant


def test_load_local_tiny_fields(tiny_model_dir) -> None:
    folder = tiny_model_dir("llava")
    loaded = load_model(str(folder))  # device and dtype "auto"
    assert loaded.family == "llava"
    assert loaded.name == folder.name and loaded.path == folder.resolve()
    assert loaded.quantization is None
    if not HAS_CUDA:
        assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    assert next(loaded.model.parameters()).device.type == loaded.device.type
    assert not loaded.model.training
    assert loaded.processor.tokenizer.padding_side == "left"
    assert loaded.processor.tokenizer.pad_token is not None


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantization_refused_on_cpu(tiny_model_dir, quantization: str) -> None:
    with pytest.raises(DeviceError, match="needs a CUDA device"):
        load_model(str(tiny_model_dir("qwen2_5_vl")), device="cpu", quantization=quantization)


def test_unknown_quantization_refused(tiny_model_dir) -> None:
    with pytest.raises(DeviceError, match="unknown quantization"):
        load_model(str(tiny_model_dir("qwen2_5_vl")), device="cpu", quantization="3bit")


def test_device_and_dtype_resolution() -> None:
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    assert resolve_device("auto") == torch.device("cuda" if HAS_CUDA else "cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("fp32", cpu) == torch.float32
    with pytest.raises(DeviceError, match="CUDA only"):
        resolve_dtype("fp16", cpu)
    with pytest.raises(DeviceError, match="unknown dtype"):
        resolve_dtype("int3", cpu)
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu")


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is available here")
def test_cuda_requested_without_cuda(tiny_model_dir) -> None:
    with pytest.raises(DeviceError, match="CUDA is not available"):
        load_model(str(tiny_model_dir("gemma3")), device="cuda")


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_bf16_load(tiny_model_dir) -> None:
    loaded = load_model(str(tiny_model_dir("qwen2_5_vl")), device="cuda")
    assert loaded.dtype == torch.bfloat16
    assert next(loaded.model.parameters()).device.type == "cuda"


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_cuda_quantized_load(tiny_model_dir, quantization: str) -> None:
    pytest.importorskip("bitsandbytes")
    loaded = load_model(str(tiny_model_dir("qwen2_5_vl")), device="cuda", quantization=quantization)
    assert loaded.quantization == quantization
    assert getattr(loaded.model, "is_quantized", False) or loaded.model.config.quantization_config
