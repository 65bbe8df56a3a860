"""A stage's starting model made ready to train: one home for what SFT and GRPO stages both do first.

:func:`prepare_model` loads the previous stage's folder with the one dtype rule (LoRA / QLoRA on CUDA: the
frozen base in bf16, the adapters fp32; full training or any CPU run: fp32 master weights), refuses QLoRA
without CUDA, and then either builds the stage's LoRA config (:func:`emma.train.freeze.lora_config`) or
freezes everything but the parts the stage kind trains (:func:`emma.train.freeze.apply_trainable`).
SFT wraps the model with the adapters here (``wrap=True``: PEFT, plus trainable token rows); TRL's
``GRPOTrainer`` applies a ``peft_config`` itself (``wrap=False``). :func:`mixed_bf16` is the one rule for
bf16 autocast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emma.errors import InputError
from emma.train.freeze import (
    TrainableSummary,
    apply_trainable,
    lora_config,
    summarize,
    token_ids,
    train_token_rows,
)

if TYPE_CHECKING:
    from emma.train.recipe import StageConfig

__all__ = ["PreparedModel", "mixed_bf16", "prepare_model", "training_dtype"]


@dataclass
class PreparedModel:
    model: Any  # PEFT-wrapped when the stage has LoRA and wrap=True
    processor: Any
    family: str
    dtype: Any  # the loaded weights' torch dtype
    trainable: TrainableSummary | None  # None when the trainer applies peft_config itself
    peft_config: Any | None = None  # set when wrap=False and the stage has LoRA


def training_dtype(stage: StageConfig) -> str:
    """The dtype a stage loads its model in: bf16 under LoRA on CUDA (adapters stay fp32), else fp32."""
    import torch

    return "bf16" if torch.cuda.is_available() and stage.lora is not None else "fp32"


def mixed_bf16(stage: StageConfig, *, cuda: bool | None = None) -> bool:
    """bf16 autocast: the stage's ``bf16`` when set, else on CUDA GPUs that support it (never on a CPU by
    default: without AVX512-BF16 it is many times slower, benchmarks/bench_cpu_bf16.py). ``cuda``
    overrides the detection (tests)."""
    if stage.bf16 is not None:
        return stage.bf16
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cuda


def prepare_model(model_dir: str | Path, stage: StageConfig, *, wrap: bool = True) -> PreparedModel:
    """Load ``model_dir`` for ``stage`` and make its trainable part (see module doc)."""
    import torch

    from emma.model.registry import load_model

    quantize = stage.lora.quantize if stage.lora is not None else None
    if quantize and not torch.cuda.is_available():
        raise InputError(f"stage {stage.name!r}: QLoRA ({quantize}) needs CUDA (bitsandbytes)")
    if stage.lora is not None and stage.lora.trainable_tokens and not wrap:
        raise InputError(f"stage {stage.name!r}: lora.trainable_tokens is for SFT stages only")
    loaded = load_model(str(model_dir), device="auto", dtype=training_dtype(stage), quantization=quantize)
    model, processor, family = loaded.model, loaded.processor, loaded.family
    kind = stage.kind
    if stage.lora is None:
        trainable = apply_trainable(model, family, kind, stage.train_vision, stage.vision_trainable)
        return PreparedModel(model, processor, family, loaded.dtype, trainable)
    config = lora_config(
        model,
        family,
        kind,
        r=stage.lora.r,
        alpha=stage.lora.alpha,
        dropout=stage.lora.dropout,
        target_modules=stage.lora.target_modules,
        train_vision=stage.train_vision,
        vision_trainable=stage.vision_trainable,
    )
    if not wrap:
        return PreparedModel(model, processor, family, loaded.dtype, None, config)
    from peft import get_peft_model

    if quantize is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=stage.gradient_checkpointing
        )
    model = get_peft_model(model, config)
    if stage.lora.trainable_tokens:
        train_token_rows(model, token_ids(processor, stage.lora.trainable_tokens))
    return PreparedModel(model, processor, family, loaded.dtype, summarize(model, family))
