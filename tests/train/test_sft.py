"""run_sft_stage on tiny models: freeze policy, LoRA merge, loss goes down, resume == uninterrupted."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import TrainerCallback

from emma.data.schema import Gold, ImageRef, Sample, TaskType, Turn
from emma.model.registry import load_model
from emma.train.freeze import part_of
from emma.train.recipe import LoraConfig, StageConfig
from emma.train.sft import run_sft_stage

COLORS = [(220, 20, 20), (20, 220, 20), (20, 20, 220), (220, 220, 20)]
ANSWERS = ["yes", "no", "left lower lobe", "fracture"]


def _samples(n: int = 4) -> tuple[list[Sample], Callable[[ImageRef], Image.Image]]:
    images = {hashlib.sha256(bytes(c)).hexdigest(): Image.new("RGB", (40, 30), c) for c in COLORS}
    keys = list(images)
    samples = [
        Sample(
            id=f"s{i}",
            task=TaskType.OPEN_VQA,
            images=[ImageRef(sha256=keys[i % 4], width=40, height=30)],
            turns=[Turn(role="user", content=f"Question {i}: what is shown?")],
            gold=Gold(answer=ANSWERS[i % 4]),
        )
        for i in range(n)
    ]
    return samples, lambda ref: images[str(ref.sha256)]


def _stage(**kw: Any) -> StageConfig:
    base: dict[str, Any] = {
        "name": "s",
        "kind": "instruction",
        "datasets": ["d"],
        "max_steps": 2,
        "learning_rate": 1e-3,
        "batch_size": 2,
        "logging_steps": 1,
        "save_steps": 100,
        "max_length": 256,
    }
    base.update(kw)
    return StageConfig(**base)


def _params(folder: Path) -> tuple[str, dict[str, torch.Tensor]]:
    loaded = load_model(str(folder), device="cpu", dtype="fp32")
    return loaded.family, {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}


def test_alignment_trains_projector_only(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    base = tiny_model_dir("qwen2_5_vl")
    samples, loader = _samples()
    result = run_sft_stage(_stage(kind="alignment"), base, tmp_path / "align", samples, loader, seed=1)
    family, before = _params(base)
    _, after = _params(result.final_dir)
    assert result.global_step == 2 and (result.final_dir / "processor_config.json").exists()
    changed = {part_of(k, family) for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"projector"}
    for k in before:
        if part_of(k, family) != "projector":
            assert torch.equal(before[k], after[k]), k  # bit-identical
    assert result.trainable["by_part"]["vision"] == result.trainable["by_part"]["language"] == 0


class _Capture(TrainerCallback):
    """At the end of training (before the merge): base weights, adapters and greedy output of the PEFT model."""

    def __init__(self, inputs: dict[str, torch.Tensor]) -> None:
        self.inputs = inputs
        self.base: dict[str, torch.Tensor] = {}
        self.lora: dict[str, torch.Tensor] = {}
        self.logits: torch.Tensor | None = None
        self.tokens: torch.Tensor | None = None

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        for name, p in model.named_parameters():
            if "lora_" in name:
                self.lora[name] = p.detach().clone()
            elif ".base_layer." in name:
                self.base[name] = p.detach().clone()
        model.eval()
        with torch.no_grad():
            self.logits = model(**self.inputs).logits
            self.tokens = model.generate(**self.inputs, max_new_tokens=6, do_sample=False)


def _prompt(folder: Path) -> dict[str, torch.Tensor]:
    loaded = load_model(str(folder), device="cpu", dtype="fp32")
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.new("RGB", (40, 30), COLORS[0])},
                {"type": "text", "text": "What is shown?"},
            ],
        }
    ]
    return dict(
        loaded.processor.apply_chat_template(
            [messages], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
    )


def test_lora_instruction_merges_to_same_outputs(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    base = tiny_model_dir("idefics3")
    samples, loader = _samples()
    inputs = _prompt(base)
    capture = _Capture(inputs)
    stage = _stage(lora=LoraConfig(r=4, alpha=8, dropout=0.0), max_steps=3)
    result = run_sft_stage(stage, base, tmp_path / "lora", samples, loader, seed=2, callbacks=[capture])
    family, before = _params(base)
    # base weights of every LoRA-wrapped layer are unchanged; the adapters trained (B starts at zero)
    assert capture.base and capture.lora
    for name, weight in capture.base.items():
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert part_of(key, family) == "language"
        assert torch.equal(weight, before[key]), key
    assert any(float(w.abs().max()) > 0 for n, w in capture.lora.items() if "lora_B" in n)
    # merged full model (what the next stage loads) == PEFT model
    merged = load_model(str(result.final_dir), device="cpu", dtype="fp32").model
    with torch.no_grad():
        logits = merged(**inputs).logits
        tokens = merged.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.allclose(logits, capture.logits, atol=1e-4)
    assert torch.equal(tokens, capture.tokens)
    _, after = _params(result.final_dir)
    changed = {part_of(k, family) for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"language", "projector"}  # merged adapters + projector (modules_to_save)


def test_loss_decreases_on_memorised_batch(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    samples, loader = _samples()
    stage = _stage(max_steps=20, batch_size=4, learning_rate=1e-2)
    result = run_sft_stage(stage, tiny_model_dir("qwen2_5_vl"), tmp_path / "mem", samples, loader, seed=3)
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert len(losses) >= 19
    assert losses[-1] < 0.5 * losses[0]
    assert any("learning_rate" in h for h in result.log_history)
    assert any("samples_per_second" in h for h in result.log_history)


class _StopAt(TrainerCallback):
    """Interrupt training after ``step`` (as a kill right after a checkpoint would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


@pytest.mark.parametrize("family", ["idefics3"])
def test_resume_matches_uninterrupted(
    family: str, tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    base = tiny_model_dir(family)
    samples, loader = _samples(4)
    stage = _stage(
        max_steps=6,
        save_steps=3,
        batch_size=2,
        learning_rate=1e-3,
        lora=LoraConfig(r=4, alpha=8, dropout=0.1),
    )
    whole = run_sft_stage(stage, base, tmp_path / "whole", samples, loader, seed=5)
    run_sft_stage(stage, base, tmp_path / "cut", samples, loader, seed=5, callbacks=[_StopAt(3)])
    assert (tmp_path / "cut" / "checkpoints" / "checkpoint-3").is_dir()
    resumed = run_sft_stage(stage, base, tmp_path / "cut", samples, loader, seed=5, resume=True)
    assert resumed.global_step == whole.global_step == 6
    info = json.loads((resumed.final_dir / "emma_stage.json").read_text())
    assert info["resumed_from"] == "checkpoint-3" and info["lora_merged"]
    _, a = _params(whole.final_dir)
    _, b = _params(resumed.final_dir)
    _, start = _params(base)
    assert any(not torch.equal(a[k], start[k]) for k in a)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
