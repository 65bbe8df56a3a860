"""Tiny random-weight models of every family: build, save, load (load_model), chat template, generate."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from PIL import Image

from emma.errors import InputError
from emma.model.registry import load_model
from emma.model.tiny_families import TINY_FAMILIES, build_tiny

# What each family's chat format renders for: user(image + question), assistant(answer), user(question).
_QWEN2_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
_QWEN_TURNS = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is shown?<|im_end|>\n"
    "<|im_start|>assistant\nA box.<|im_end|>\n<|im_start|>user\nWhere?<|im_end|>\n<|im_start|>assistant\n"
)
GOLDEN_PROMPTS = {
    "qwen2_vl": _QWEN2_SYSTEM + _QWEN_TURNS,
    "qwen2_5_vl": _QWEN2_SYSTEM + _QWEN_TURNS,
    "qwen3_vl": _QWEN_TURNS,
    "idefics3": "<|im_start|>User:<image>What is shown?<end_of_utterance>\n"
    "Assistant: A box.<end_of_utterance>\nUser: Where?<end_of_utterance>\nAssistant:",
    "llava": "USER: <image>\nWhat is shown? ASSISTANT: A box. USER: Where? ASSISTANT:",
    "llava_onevision": "<|im_start|>user <image>\nWhat is shown?<|im_end|>"
    "<|im_start|>assistant \nA box.<|im_end|><|im_start|>user \nWhere?<|im_end|><|im_start|>assistant\n",
    "gemma3": "<bos><start_of_turn>user\n<start_of_image>What is shown?<end_of_turn>\n<start_of_turn>model\n"
    "A box.<end_of_turn>\n<start_of_turn>user\nWhere?<end_of_turn>\n<start_of_turn>model\n",
    "internvl": "<|im_start|>user\n<IMG_CONTEXT>\nWhat is shown?<|im_end|>\n"
    "<|im_start|>assistant\nA box.<|im_end|>\n<|im_start|>user\nWhere?<|im_end|>\n<|im_start|>assistant\n",
    "fast_vlm": "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n"
    "<|im_start|>assistant\nA box.<|im_end|>\n<|im_start|>user\nWhere?<|im_end|>\n<|im_start|>assistant\n",
}

UPSTREAM_PROCESSORS = {
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
    "idefics3": "Idefics3Processor",
    "llava": "LlavaProcessor",
    "llava_onevision": "LlavaOnevisionProcessor",
    "gemma3": "Gemma3Processor",
    "internvl": "InternVLProcessor",
    "fast_vlm": "LlavaProcessor",
}


def _image(width: int = 100, height: int = 80) -> Image.Image:
    image = Image.new("RGB", (width, height), (20, 20, 20))
    image.paste((230, 230, 230), (30, 20, 70, 60))
    return image


def _image_token_id(config: object) -> int:
    value = getattr(config, "image_token_id", None)
    if value is None:
        value = config.image_token_index
    return int(value)


def test_every_family_has_a_golden_prompt() -> None:
    assert set(GOLDEN_PROMPTS) == set(TINY_FAMILIES) == set(UPSTREAM_PROCESSORS)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_family_loads_and_generates(family: str, tiny_loaded) -> None:
    loaded = tiny_loaded(family)
    model, processor = loaded.model, loaded.processor
    assert loaded.family == family
    assert loaded.name == f"tiny-{family}"
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    # The family's own processor class (image-only subclass where upstream needs a video processor).
    upstream = getattr(transformers, UPSTREAM_PROCESSORS[family])
    assert isinstance(processor, upstream)
    assert type(processor).__name__ == UPSTREAM_PROCESSORS[family]
    assert processor.tokenizer.padding_side == "left"
    # Tiny: 2 text layers at hidden size 64; the vocabulary covers every tokenizer token.
    text_config = model.config.get_text_config()
    assert text_config.hidden_size == 64 and text_config.num_hidden_layers == 2
    assert text_config.vocab_size >= len(processor.tokenizer)
    assert sum(p.numel() for p in model.parameters()) < 8_000_000

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    inputs = processor(
        text=[processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)],
        images=[[_image()]],
        return_tensors="pt",
    )
    image_tokens = int((inputs["input_ids"] == _image_token_id(model.config)).sum())
    assert image_tokens > 0
    assert "pixel_values" in inputs
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    assert 1 <= output.shape[1] - prompt_len <= 4
    assert torch.equal(output[0, :prompt_len], inputs["input_ids"][0])
    assert isinstance(processor.decode(output[0, prompt_len:], skip_special_tokens=True), str)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_chat_template_renders_family_format(family: str, tiny_loaded) -> None:
    processor = tiny_loaded(family).processor
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A box."}]},
        {"role": "user", "content": [{"type": "text", "text": "Where?"}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == GOLDEN_PROMPTS[family]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "idefics3"])
def test_chat_template_tokenizes_with_pil_image(family: str, tiny_loaded) -> None:
    """apply_chat_template(tokenize=True) with the image inside the message, as the engine may call it."""
    loaded = tiny_loaded(family)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": _image(64, 48)}, {"type": "text", "text": "Describe."}],
        }
    ]
    inputs = loaded.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert int((inputs["input_ids"] == _image_token_id(loaded.model.config)).sum()) > 0
    with torch.no_grad():
        output = loaded.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]


def test_batched_generation_with_left_padding(tiny_loaded) -> None:
    loaded = tiny_loaded("qwen2_5_vl")
    processor = loaded.processor
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for question in ("Is there a fracture?", "Any free air under the diaphragm on this erect film?")
    ]
    inputs = processor(text=prompts, images=[[_image()], [_image()]], padding=True, return_tensors="pt")
    mask = inputs["attention_mask"]
    assert mask.shape[0] == 2
    assert bool((mask[:, -1] == 1).all())  # left padding: every row ends with a real token
    assert int(mask[0].sum()) != int(mask[1].sum())
    with torch.no_grad():
        output = loaded.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    assert output.shape[0] == 2 and prompt_len < output.shape[1] <= prompt_len + 3
    assert torch.equal(output[:, :prompt_len], inputs["input_ids"])


def test_build_is_cached_and_saved_standard(tiny_model_dir) -> None:
    folder = tiny_model_dir("qwen2_5_vl")
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert build_tiny("qwen2_5_vl") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl"
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["processor_class"] == "Qwen2_5_VLProcessor"  # loadable by name elsewhere
    assert "video_processor" not in processor_config
    assert (folder / "chat_template.jinja").is_file() and (folder / "tokenizer.json").is_file()


def test_build_into_folder_is_seeded(tmp_path) -> None:
    from safetensors.torch import load_file

    a = build_tiny("gemma3", out_dir=tmp_path / "a", seed=3)
    b = build_tiny("gemma3", out_dir=tmp_path / "b", seed=3)
    c = build_tiny("gemma3", out_dir=tmp_path / "c", seed=4)
    wa, wb, wc = (load_file(str(f / "model.safetensors")) for f in (a, b, c))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    loaded = load_model(str(a), device="cpu", dtype="bf16")
    assert loaded.family == "gemma3" and loaded.name == "a"
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(InputError, match="not empty"):
        build_tiny("gemma3", out_dir=a)


def test_unknown_family_is_refused() -> None:
    with pytest.raises(InputError, match="no tiny builder"):
        build_tiny("paligemma")


def test_image_only_processor_ignores_a_saved_video_processor(tiny_model_dir, tmp_path) -> None:
    """Checkpoints saved with torchvision carry a video processor config; it is skipped, images still work."""
    import shutil

    from emma.model.processors import load_processor

    folder = tmp_path / "with-video"
    shutil.copytree(tiny_model_dir("qwen2_5_vl"), folder)
    config_path = folder / "processor_config.json"
    config = json.loads(config_path.read_text())
    config["video_processor"] = {"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": 14}
    config_path.write_text(json.dumps(config))
    processor = load_processor(folder)
    assert isinstance(processor, transformers.Qwen2_5_VLProcessor)
    assert not hasattr(processor, "video_processor")
    inputs = processor(
        text=["<|vision_start|><|image_pad|><|vision_end|>Hi"], images=[_image(56, 56)], return_tensors="pt"
    )
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]  # 56x56 → 4x4 patches of 14 → 4 merged tokens
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 4
