"""Loading a local transformers checkpoint folder: device, dtype, quantization, family, processor.

:func:`load_local` is what :func:`emma.model.registry.load_model` calls once a spec has become a folder.
Only safetensors weights are read (never pickled ``.bin`` files), and ``trust_remote_code`` is off
unless asked for.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emma.errors import InputError

DEVICES_HELP = "auto, cpu, cuda or cuda:N"
DTYPES = {
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
}
QUANTIZATIONS = ("4bit", "8bit")
# Vision towers and projectors stay in the compute dtype under 4/8-bit (quantizing them costs accuracy
# for little memory), as does the output head. Patterns follow transformers' module-name matching.
_QUANT_SKIP = [
    "lm_head",
    r".*visual",
    r".*vision_tower",
    r".*vision_model",
    r".*multi_modal_projector",
    r".*connector",
]


class ModelLoadError(InputError):
    """A model that exists but cannot be loaded as asked (subclasses say why)."""


class UnsupportedModelError(ModelLoadError):
    """A checkpoint whose model_type is not one of EMMA's supported families."""


class DeviceError(ModelLoadError):
    """A device, dtype or quantization request that this machine or install cannot honour."""


class CheckpointError(ModelLoadError):
    """A model folder whose files transformers cannot load."""


@dataclass
class LoadedModel:
    """A model in memory, ready for ``generate``: eval mode, processor padding on the left."""

    model: Any  # a transformers PreTrainedModel (AutoModelForImageTextToText)
    processor: Any  # its transformers processor (chat template, image processor, tokenizer)
    family: str  # emma.model.families key: "qwen2_5_vl", "idefics3", ...
    name: str
    device: Any  # torch.device
    dtype: Any  # torch.dtype of the floating-point weights (compute dtype when quantized)
    quantization: str | None = None
    path: Path | None = None  # the local folder the weights were read from


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resolve_device(device: str = "auto") -> Any:
    """``torch.device`` for "auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N"."""
    import torch

    name = (device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name} requested but CUDA is not available here")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {name} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return torch.device("cuda", index)
    raise DeviceError(f"unknown device {device[:20]!r}; use {DEVICES_HELP}")


def resolve_dtype(dtype: str, device: Any) -> Any:
    """``torch.dtype`` for "auto" (bf16 on CUDA, fp32 on CPU), "fp32", "bf16" or "fp16" (CUDA only)."""
    import torch

    name = (dtype or "auto").strip().lower()
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise DeviceError(f"unknown dtype {dtype[:20]!r}; use auto, fp32, bf16 or fp16")
    resolved = getattr(torch, DTYPES[name])
    if resolved == torch.float16 and device.type != "cuda":
        raise DeviceError("fp16 is for CUDA only; use fp32 or bf16 on CPU")
    return resolved


def quantization_config(quantization: str | None, device: Any, compute_dtype: Any) -> Any:
    """A transformers ``BitsAndBytesConfig`` for "4bit"/"8bit" (CUDA + bitsandbytes), None for None."""
    if quantization is None:
        return None
    name = quantization.strip().lower()
    if name not in QUANTIZATIONS:
        raise DeviceError(f"unknown quantization {quantization[:20]!r}; use 4bit or 8bit")
    if device.type != "cuda":
        raise DeviceError(
            f"{name} quantization (bitsandbytes) needs a CUDA device; this model is on {device.type}"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise DeviceError(f"{name} quantization needs bitsandbytes: pip install 'emma-med[cuda]'")
    from transformers import BitsAndBytesConfig

    if name == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=list(_QUANT_SKIP),
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(_QUANT_SKIP))


def detect_family(folder: Path) -> str:
    """The EMMA family of a checkpoint folder, from ``config.json``'s ``model_type``."""
    from emma.model.families import FAMILIES, family_for_model_type

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read config.json in {folder}: {_one_line(exc, 120)}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str) or not model_type:
        raise CheckpointError(f"config.json in {folder} has no model_type")
    spec = family_for_model_type(model_type)
    if spec is None:
        supported = ", ".join(sorted({mt for f in FAMILIES.values() for mt in f.model_types}))
        raise UnsupportedModelError(
            f"model_type {model_type[:40]!r} is not supported; supported: {supported}"
        )
    return spec.name


def _prepare_processor(processor: Any) -> Any:
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.padding_side = "left"  # batched generation continues every row from its last token
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
    return processor


def load_local(
    folder: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    quantization: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a checkpoint folder (model in eval mode + processor); typed InputErrors on failure.

    ``name`` is the folder's name; :func:`emma.model.registry.load_model` names it by its spec."""
    from transformers import AutoModelForImageTextToText

    from emma.model.processors import load_processor

    path = Path(folder)
    family = detect_family(path)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    quant = quantization_config(quantization, torch_device, torch_dtype)
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype,
        "trust_remote_code": trust_remote_code,
        "local_files_only": True,
        "use_safetensors": True,
    }
    if quant is not None:
        kwargs["quantization_config"] = quant
    if torch_device.type == "cuda":
        kwargs["device_map"] = {"": torch_device.index or 0}
    try:
        processor = _prepare_processor(load_processor(path, trust_remote_code=trust_remote_code))
        model = AutoModelForImageTextToText.from_pretrained(str(path), **kwargs)
    except ImportError as exc:
        raise DeviceError(f"a package this model needs is missing: {_one_line(exc)}") from exc
    except Exception as exc:  # corrupt or mismatched files surface as many exception types
        if isinstance(exc, InputError):
            raise
        raise CheckpointError(f"cannot load model from {path.name}: {_one_line(exc)}") from exc
    if torch_device.type != "cuda":
        model = model.to(torch_device)
    model.eval()
    return LoadedModel(
        model=model,
        processor=processor,
        family=family,
        name=path.name,
        device=torch_device,
        dtype=torch_dtype,
        quantization=quantization,
        path=path,
    )
