"""Export: a LoRA adapter (language + vision-side) merged into full weights gives the same greedy output.

GGUF export: tests/train/test_gguf_export.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from emma.cli import app
from emma.train.export import export_model

FAMILY = "qwen2_5_vl"


def _inputs(processor):
    image = Image.new("RGB", (56, 56), (30, 160, 90))
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe."}],
        }
    ]
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def _greedy(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1]
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    return logits, out[:, inputs["input_ids"].shape[1] :]


def test_lora_adapter_merged_round_trip(tiny_model_dir, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from emma.model.processors import load_processor

    base_dir = tiny_model_dir(FAMILY)
    processor = load_processor(str(base_dir))
    inputs = _inputs(processor)
    base = AutoModelForImageTextToText.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=r".*(language_model\.layers\.\d+\.self_attn\.(q|v)_proj|visual\.blocks\.\d+\.attn\.qkv)",
    )
    peft_model = get_peft_model(base, config)
    torch.manual_seed(0)
    names = [n for n, _ in peft_model.named_parameters() if "lora_B" in n]
    assert any(".visual." in n for n in names)  # a vision-side LoRA, which vLLM would ignore
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    peft_model.eval()
    want_logits, want_tokens = _greedy(peft_model, inputs)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))

    out = export_model(adapter, "merged", tmp_path / "merged", dtype="fp32")
    assert list(out.glob("*.safetensors")) and (out / "config.json").is_file()
    merged = AutoModelForImageTextToText.from_pretrained(str(out), dtype=torch.float32).eval()
    got_logits, got_tokens = _greedy(merged, _inputs(load_processor(str(out))))
    assert torch.equal(got_tokens, want_tokens)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    state = merged.state_dict()
    assert not any("lora" in k for k in state)
    vision_qkv = next(k for k in state if ".visual." in k and k.endswith("attn.qkv.weight"))
    assert not torch.equal(state[vision_qkv], base_state[vision_qkv])  # the vision LoRA was merged
    with pytest.raises(Exception, match="not empty"):
        export_model(adapter, "merged", out)


def test_export_cli(tiny_model_dir, tmp_path: Path) -> None:
    runner = CliRunner()
    bad = runner.invoke(app, ["export", "--model", str(tiny_model_dir(FAMILY)), "--to", "onnx"])
    assert bad.exit_code == 2 and "--to must be merged or gguf" in bad.output
    ok = runner.invoke(
        app,
        ["export", "--model", str(tiny_model_dir(FAMILY)), "--to", "merged", "--out", str(tmp_path / "m")],
    )
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "m" / "config.json").is_file()
