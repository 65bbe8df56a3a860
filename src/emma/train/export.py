"""Export a trained model: LoRA merged into full weights (``merged``), or llama.cpp files (``gguf``).

``merged``: ``model_dir`` is a PEFT adapter folder (``adapter_config.json`` naming its base model) or a
full model folder. Adapters are merged with ``merge_and_unload`` - every LoRA layer, the vision tower's
included (vLLM ignores vision-side LoRA, so a merged folder is what it should serve) - and the result is
saved as safetensors + processor, loadable by ``AutoModelForImageTextToText.from_pretrained`` and vLLM.
Merging runs in fp32; the weights are saved in the source's dtype unless ``dtype`` says otherwise.

``gguf``: llama.cpp needs two files for a VLM (the language model and an ``mmproj`` vision projector),
written by llama.cpp's ``convert_hf_to_gguf.py`` (``--mmproj`` for the projector). The ``gguf`` Python
package installed here is only the file reader/writer and tensor-name tables: the per-architecture
conversion (hyper-parameters, tokenizer, weight layouts, projector) lives in that script, which is not
available offline. EMMA does not fake it: with ``LLAMA_CPP_DIR`` (or ``llama_cpp_dir``) pointing to a
llama.cpp checkout the script is run on the merged folder; otherwise a one-line error says what to do.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

from emma.errors import EmmaError, InputError
from emma.model.families import FAMILIES

ExportTarget = Literal["merged", "gguf"]
ADAPTER_CONFIG = "adapter_config.json"
CONVERT_SCRIPT = "convert_hf_to_gguf.py"
LLAMA_CPP_ENV = "LLAMA_CPP_DIR"

# EMMA families whose text model + mmproj llama.cpp's convert_hf_to_gguf.py writes (its mtmd support).
GGUF_FAMILIES: dict[str, str] = {name: spec.gguf_name for name, spec in FAMILIES.items() if spec.gguf_name}
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class ExportError(EmmaError):
    """An export could not be made (one-line message)."""


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


def gguf_unavailable_message(family: str) -> str:
    supported = ", ".join(f"{k} ({v})" for k, v in GGUF_FAMILIES.items())
    if family not in GGUF_FAMILIES:
        return (
            f"GGUF export is not available for {family} models: llama.cpp supports the vision families "
            f"{supported}; export with --to merged and serve with transformers or vLLM instead"
        )
    return (
        f"GGUF export of a {family} model needs llama.cpp's {CONVERT_SCRIPT} (text model, then --mmproj for "
        f"the vision projector), which is not available offline here (the gguf Python package alone cannot "
        f"convert a model); set {LLAMA_CPP_ENV} to a llama.cpp checkout, or run "
        f"`emma export --to merged` and convert that folder with llama.cpp"
    )


def export_gguf(model_dir: str | Path, out: str | Path, *, llama_cpp_dir: str | Path | None = None) -> Path:
    """llama.cpp ``model.gguf`` + ``mmproj.gguf`` in ``out`` (needs llama.cpp's conversion script)."""
    source = Path(model_dir)
    folder = _base_of(source) if _is_adapter(source) else source
    if not (folder / "config.json").is_file():
        raise InputError(f"{source}: not a model folder (no config.json) nor a LoRA adapter folder")
    family = _family(folder)
    root = llama_cpp_dir or os.environ.get(LLAMA_CPP_ENV)
    script = Path(root) / CONVERT_SCRIPT if root else None
    if family not in GGUF_FAMILIES or script is None or not script.is_file():
        raise ExportError(gguf_unavailable_message(family))
    out = Path(out)
    merged = out / "merged"
    export_merged(source, merged)
    for extra, name in (([], "model.gguf"), (["--mmproj"], "mmproj.gguf")):
        cmd = [sys.executable, str(script), str(merged), "--outfile", str(out / name), *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ExportError(f"{CONVERT_SCRIPT} failed for {name}: {tail[0][:200]}")
    shutil.rmtree(merged)
    return out


def export_model(
    model_dir: str | Path,
    to: ExportTarget = "merged",
    out: str | Path | None = None,
    *,
    dtype: str = "auto",
    llama_cpp_dir: str | Path | None = None,
) -> Path:
    """Export ``model_dir`` as ``merged`` (default out: ``<model_dir>-merged``) or ``gguf`` (``-gguf``)."""
    source = Path(model_dir)
    if to not in ("merged", "gguf"):
        raise InputError(f"export target must be merged or gguf, got {to!r}")
    target = Path(out) if out is not None else source.with_name(f"{source.name}-{to}")
    if to == "merged":
        return export_merged(source, target, dtype=dtype)
    return export_gguf(source, target, llama_cpp_dir=llama_cpp_dir)
