"""emma-tiny's shipped delta on small synthetic tensors: low-rank factors, applying a delta, checksum checks.

Never builds or loads the real 135M model (the base loader is patched to fail where it could be reached).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from emma.model import emma_tiny
from emma.model.emma_tiny import (
    DELTA_FILE,
    MANIFEST_FILE,
    DeltaError,
    _low_rank,
    _verified_manifest,
    apply_delta,
)
from emma.model.vision_encoders import ENCODERS

ASTRA = ENCODERS["astra"]

EMB = "model.language_model.embed_tokens.weight"
Q = "model.language_model.layers.0.self_attn.q_proj.weight"
NORM = "model.language_model.norm.weight"
PROJ = "model.multi_modal_projector.linear_1.weight"


def _rank(r: int, rows: int = 24, cols: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, r, generator=g) @ torch.randn(r, cols, generator=g) / r


def _fp16_error(a: torch.Tensor, b: torch.Tensor, target: torch.Tensor) -> float:
    return float((a.half().float() @ b.half().float() - target).abs().max())


# ------------------------------------------------------------------------------------------- _low_rank


@pytest.mark.parametrize("rank", [1, 2, 4, 8])
def test_low_rank_factors_a_rank_r_matrix_exactly(rank: int) -> None:
    diff = _rank(rank, seed=rank)
    factors = _low_rank(diff, rel_tol=0.02, max_rank=64)
    assert factors is not None
    a, b = factors
    assert a.shape == (24, rank) and b.shape == (rank, 16)  # the smallest rank that reproduces it
    assert a.dtype == b.dtype == torch.float32 and a.is_contiguous() and b.is_contiguous()
    scale = float(diff.abs().max())
    assert float((a @ b - diff).abs().max()) <= 1e-4 * scale  # exact in fp32
    assert _fp16_error(a, b, diff) <= 0.02 * scale  # within tolerance once shipped as fp16


def test_low_rank_rank3_uses_the_next_ladder_rank() -> None:
    diff = _rank(3)
    factors = _low_rank(diff, rel_tol=0.02, max_rank=64)
    assert factors is not None and factors[0].shape[1] == 4
    assert _fp16_error(*factors, diff) <= 0.02 * float(diff.abs().max())


@pytest.mark.parametrize(("rank", "max_rank"), [(4, 2), (8, 4), (16, 8)])
def test_low_rank_none_when_the_needed_rank_exceeds_max_rank(rank: int, max_rank: int) -> None:
    diff = _rank(rank, rows=32, cols=32, seed=rank)
    assert _low_rank(diff, rel_tol=0.02, max_rank=max_rank) is None
    assert _low_rank(diff, rel_tol=0.02, max_rank=rank) is not None


def test_low_rank_of_a_full_rank_matrix_is_none_below_its_size() -> None:
    diff = torch.randn(32, 32, generator=torch.Generator().manual_seed(5))
    assert _low_rank(diff, rel_tol=0.02, max_rank=16) is None


# ------------------------------------------------------------------------------------------ apply_delta


def _base(vocab: int = 10, hidden: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        EMB: torch.randn(vocab, hidden, generator=g),
        Q: torch.randn(6, hidden, generator=g),
        NORM: torch.ones(hidden),
    }


def test_apply_delta_every_kind() -> None:
    base = _base()
    before = {k: v.clone() for k, v in base.items()}
    lora_a, lora_b = torch.randn(6, 2), torch.randn(2, 4)
    norm_diff = torch.tensor([0.5, -0.25, 0.0, 1.0])
    new_rows = torch.full((2, 4), 3.0)
    emb_diff = torch.arange(32, dtype=torch.float32).reshape(8, 4) / 8
    proj = torch.randn(4, 8)
    delta = {
        Q + ".lora_a": lora_a.half(),
        Q + ".lora_b": lora_b.half(),
        NORM + ".diff": norm_diff.half(),
        EMB + ".new_rows": new_rows.half(),
        EMB + ".diff": emb_diff.half(),
        PROJ: proj.half(),
    }
    state = apply_delta(base, delta, base_vocab=8)

    assert set(state) == {EMB, Q, NORM, PROJ}  # factor names never become weights
    assert all(t.dtype == torch.float32 for t in state.values())
    change = lora_a.half().float() @ lora_b.half().float()
    torch.testing.assert_close(state[Q], before[Q] + change)
    torch.testing.assert_close(state[NORM], before[NORM] + norm_diff)
    torch.testing.assert_close(state[EMB][:8], before[EMB][:8] + emb_diff.half().float())
    torch.testing.assert_close(state[EMB][8:], new_rows)
    torch.testing.assert_close(state[PROJ], proj.half().float())
    for name, tensor in base.items():  # the caller's base weights are not modified
        assert torch.equal(tensor, before[name]), name


def test_apply_delta_low_rank_change_of_the_grown_embedding() -> None:
    """export_delta factors the base rows' change of the (grown) embedding like any 2-D weight."""
    base = _base()
    before = base[EMB].clone()
    lora_a, lora_b = torch.randn(8, 1), torch.randn(1, 4)
    new_rows = torch.full((2, 4), -1.0)
    delta = {EMB + ".lora_a": lora_a, EMB + ".lora_b": lora_b, EMB + ".new_rows": new_rows}
    state = apply_delta(base, delta, base_vocab=8)
    assert state[EMB].shape == (10, 4)
    torch.testing.assert_close(state[EMB][:8], before[:8] + lora_a @ lora_b)
    torch.testing.assert_close(state[EMB][8:], new_rows)
    assert torch.equal(base[EMB], before)


def test_low_rank_export_then_apply_round_trip() -> None:
    """What export_delta does for a LoRA-merged weight, undone by apply_delta, within the tolerance."""
    base = _base()
    trained = base[Q] + _rank(2, rows=6, cols=4, seed=9)
    diff = trained - base[Q]
    factors = _low_rank(diff, rel_tol=0.02, max_rank=64)
    assert factors is not None
    delta = {Q + ".lora_a": factors[0].half(), Q + ".lora_b": factors[1].half()}
    state = apply_delta(base, delta, base_vocab=8)
    assert float((state[Q] - trained).abs().max()) <= 0.02 * float(diff.abs().max())
    torch.testing.assert_close(state[EMB], base[EMB])


# ------------------------------------------------------------------------------------------- checksums


def _asset(folder: Path, *, sha: str | None = None) -> Path:
    folder.mkdir(parents=True)
    delta = folder / DELTA_FILE
    save_file({PROJ: torch.zeros(2, 2, dtype=torch.float16)}, str(delta))
    real = hashlib.sha256(delta.read_bytes()).hexdigest()
    manifest = {"name": "emma-tiny", "version": "1", "delta": {"file": DELTA_FILE, "sha256": sha or real}}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    return folder


@pytest.fixture()
def no_base_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EMMA_CACHE", str(tmp_path / "cache"))

    def refuse() -> Any:
        raise AssertionError("the base model must not be loaded before the checksum passes")

    monkeypatch.setattr(emma_tiny, "load_base_language_model", refuse)


def test_verified_manifest_accepts_the_right_checksum(tmp_path: Path) -> None:
    folder = _asset(tmp_path / "ok")
    manifest = _verified_manifest(folder)
    assert manifest["delta"]["sha256"] == hashlib.sha256((folder / DELTA_FILE).read_bytes()).hexdigest()


def test_verified_manifest_rejects_a_wrong_checksum(tmp_path: Path) -> None:
    folder = _asset(tmp_path / "bad", sha="0" * 64)
    with pytest.raises(DeltaError, match="fails its checksum") as info:
        _verified_manifest(folder)
    assert "expected 000000000000" in str(info.value) and "\n" not in str(info.value)


def test_verified_manifest_rejects_an_altered_delta(tmp_path: Path) -> None:
    folder = _asset(tmp_path / "altered")
    with (folder / DELTA_FILE).open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(DeltaError, match="checksum"):
        _verified_manifest(folder)


def test_verified_manifest_missing_files(tmp_path: Path) -> None:
    folder = _asset(tmp_path / "gone")
    (folder / DELTA_FILE).unlink()
    with pytest.raises(DeltaError, match="not installed"):
        _verified_manifest(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeltaError, match="not installed"):
        _verified_manifest(tmp_path / "empty")


def test_materialize_checks_the_checksum_before_loading_anything(tmp_path: Path, no_base_model: None) -> None:
    folder = _asset(tmp_path / "bad", sha="f" * 64)
    with pytest.raises(DeltaError, match="fails its checksum"):
        emma_tiny.materialize(folder)
    assert not (tmp_path / "cache").exists()  # nothing cached from an unverified delta


def test_materialize_reuses_a_verified_cache_without_loading(tmp_path: Path, no_base_model: None) -> None:
    folder = _asset(tmp_path / "ok")
    sha = _verified_manifest(folder)["delta"]["sha256"]
    final = emma_tiny.cache_root() / f"emma-tiny-v{emma_tiny.EMMA_TINY_VERSION}" / sha[:16]
    final.mkdir(parents=True)
    (final / emma_tiny._DONE).write_text(json.dumps({"sha256": sha}))
    assert emma_tiny.materialize(folder) == final


def test_new_rows_start_at_the_mean() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    emb = base.model.embed_tokens.weight.detach()
    state = emma_tiny._base_text_state(base, 13)
    grown = state[EMB]
    assert grown.shape == (13, 8) and torch.equal(grown[:10], emb)
    for row in (10, 11, 12):
        assert torch.allclose(grown[row], emb.mean(dim=0))


def test_chat_format_is_smollm2s_chatml_with_one_image_placeholder() -> None:
    processor = emma_tiny._processor(ASTRA)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which organ?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "<|im_start|>user\n<image>\nWhich organ?<|im_end|>\n<|im_start|>assistant\n"
    from PIL import Image

    batch = processor(images=[Image.new("RGB", (300, 200), (255, 0, 0))], text=[text], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((batch["input_ids"] == image_id).sum()) == emma_tiny.IMAGE_TOKENS == 49
    pixels = batch["pixel_values"]
    assert pixels.shape == (1, 3, emma_tiny.IMAGE_SIZE, emma_tiny.IMAGE_SIZE)  # squashed, not cropped
    assert float(pixels.min()) == 0.0 and float(pixels.max()) == 1.0  # [0, 1], no mean/std


def test_an_encoder_at_another_input_size_sets_the_processor_and_the_token_count() -> None:
    """``lite0-320``: images squashed to 320 px, whose 10 x 10 feature map gives 100 image tokens, and the
    processor's count matches what the tower produces."""
    from PIL import Image
    from transformers import AutoModel

    from emma.model.vision_encoders import encoder_named

    encoder = encoder_named("lite0-320")
    processor = emma_tiny._processor(encoder)
    config = emma_tiny._config(emma_tiny.load_base_language_model(), processor.tokenizer, encoder)
    assert config.image_seq_length == 100
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which organ?"}]}],
        add_generation_prompt=True,
    )
    batch = processor(images=[Image.new("RGB", (500, 400), (9, 9, 9))], text=[text], return_tensors="pt")
    assert int((batch["input_ids"] == config.image_token_id).sum()) == 100
    assert batch["pixel_values"].shape == (1, 3, 320, 320)
    tower = AutoModel.from_config(encoder.config()).eval()
    with torch.no_grad():
        assert tower(batch["pixel_values"]).last_hidden_state.shape[-2:] == (10, 10)


def test_base_config_from_the_emma_tiny_config_loads_the_same_base_weights() -> None:
    base = emma_tiny.load_base_language_model()
    config = emma_tiny._config(base, emma_tiny._processor(ASTRA).tokenizer, ASTRA)
    again = emma_tiny.load_base_language_model(emma_tiny.base_config_of(config))
    assert again.config.vocab_size == base.config.vocab_size
    theirs = again.state_dict()
    assert theirs.keys() == base.state_dict().keys()
    assert all(torch.equal(tensor, theirs[name]) for name, tensor in base.state_dict().items())
    assert emma_tiny.base_config_of(type(config)()) is None  # a config without emma's keys


def test_an_init_on_another_packaged_encoder_builds_loads_and_names_its_tower(tmp_path: Path) -> None:
    """``emma-tiny:init:lite0``: the same model class with EfficientNet-Lite0 as its tower, the encoder's
    normalisation in the processor, and the encoder named in the config (what materialize reads)."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = emma_tiny.build_init(tmp_path / "init", seed=0, encoder="lite0")
    model = AutoModelForImageTextToText.from_pretrained(str(folder)).eval()
    processor = AutoProcessor.from_pretrained(str(folder))
    assert type(model.model.vision_tower).__name__ == "EfficientNetModel"
    assert emma_tiny.encoder_of(model.config).name == "lite0"
    assert emma_tiny.encoder_of(json.loads((folder / "config.json").read_text())).name == "lite0"
    assert emma_tiny.encoder_of({}).name == "astra"  # a config from before the choice: Astra
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which organ?"}]}],
        add_generation_prompt=True,
    )
    batch = processor(images=[Image.new("RGB", (64, 48), (255, 255, 255))], text=[text], return_tensors="pt")
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 49
    assert float(batch["pixel_values"].max()) == pytest.approx(1.0)  # (1 - 0.5) / 0.5: Lite's input
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all()
