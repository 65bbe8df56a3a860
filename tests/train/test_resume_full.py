"""Resuming a full-weight (no LoRA) Qwen2.5-VL stage mid-run continues from the checkpoint's weights.

Without the override in emma.train.checkpoints, transformers' ``Trainer._load_from_checkpoint`` loads
the checkpoint's ``model.safetensors`` with ``strict=False``; its keys are in the saved (legacy)
layout (``model.layers.*`` / ``visual.*``) while the module has ``model.language_model.*`` /
``model.visual.*``, so no weight loads and the resumed run silently restarts from the start weights
(with the checkpoint's optimizer / scheduler state).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import TrainerCallback

from emma.data.schema import Gold, ImageRef, Sample, TaskType, Turn
from emma.model.registry import load_model
from emma.train.recipe import StageConfig
from emma.train.sft import run_sft_stage

COLORS = [(220, 20, 20), (20, 220, 20), (20, 20, 220), (220, 220, 20)]
ANSWERS = ["yes", "no", "left lower lobe", "fracture"]


def _samples(n: int) -> tuple[list[Sample], Callable[[ImageRef], Image.Image]]:
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


def _params(folder: Path) -> dict[str, torch.Tensor]:
    model = load_model(str(folder), device="cpu", dtype="fp32").model
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class _StopAt(TrainerCallback):
    """Interrupt training after ``step`` (as a kill right after that step's checkpoint would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def test_full_weight_resume_matches_uninterrupted(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    base = tiny_model_dir("qwen2_5_vl")
    # 8 samples / batch 2 = 4 steps per epoch: the step-2 checkpoint is mid-run and mid-epoch
    samples, loader = _samples(8)
    stage = StageConfig(
        name="s",
        kind="instruction",
        datasets=["d"],
        max_steps=4,
        save_steps=2,
        learning_rate=1e-3,
        batch_size=2,
        logging_steps=1,
        max_length=256,
        lora=None,
    )
    whole = run_sft_stage(stage, base, tmp_path / "whole", samples, loader, seed=6)
    cut = run_sft_stage(stage, base, tmp_path / "cut", samples, loader, seed=6, callbacks=[_StopAt(2)])
    assert cut.global_step == 2
    assert (tmp_path / "cut" / "checkpoints" / "checkpoint-2").is_dir()
    resumed = run_sft_stage(stage, base, tmp_path / "cut", samples, loader, seed=6, resume=True)
    assert resumed.global_step == whole.global_step == 4
    info = json.loads((resumed.final_dir / "emma_stage.json").read_text())
    assert info["resumed_from"] == "checkpoint-2" and not info["lora_merged"]

    start, a, b = _params(base), _params(whole.final_dir), _params(resumed.final_dir)
    assert set(a) == set(b)
    assert any(not torch.equal(a[k], start[k]) for k in a)  # the run trained something
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
