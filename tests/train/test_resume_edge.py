"""Resume from a checkpoint taken at max_steps (killed before final/ was written): nothing more trains.

Without emma.train.checkpoints, transformers' Trainer re-enters the (unfinished) epoch and trains one
extra step (global_step == max_steps + 1) before its max_steps check stops it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import TrainerCallback

from emma.data.schema import Gold, ImageRef, Sample, TaskType, Turn
from emma.model.registry import load_model
from emma.train.checkpoints import is_finished, last_checkpoint
from emma.train.grpo import run_grpo_stage
from emma.train.recipe import GRPOSettings, LoraConfig, StageConfig
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


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k, value in a.items():
        assert torch.equal(value, b[k]), k


@pytest.mark.parametrize(
    "family,lora", [("qwen2_5_vl", None), ("idefics3", LoraConfig(r=4, alpha=8, dropout=0.0))]
)
def test_sft_resume_from_final_checkpoint_trains_nothing(
    family: str, lora: LoraConfig | None, tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    base = tiny_model_dir(family)
    # 8 samples / batch 2 = 4 steps per epoch: the step-2 checkpoint is mid-epoch (where Trainer overran)
    samples, loader = _samples(8)
    stage = StageConfig(
        name="s",
        kind="instruction",
        datasets=["d"],
        max_steps=2,
        save_steps=2,
        learning_rate=1e-3,
        batch_size=2,
        logging_steps=1,
        max_length=256,
        lora=lora,
    )
    out = tmp_path / "run"
    whole = run_sft_stage(stage, base, out, samples, loader, seed=4)
    assert whole.global_step == 2
    expected = _params(whole.final_dir)
    assert any(not torch.equal(expected[k], v) for k, v in _params(base).items())

    ckpt = last_checkpoint(out / "checkpoints")
    assert ckpt is not None and ckpt.name == "checkpoint-2" and is_finished(ckpt, 2)
    shutil.rmtree(whole.final_dir)  # the kill: after the last checkpoint, before final/
    (out / "stage_done.json").unlink(missing_ok=True)

    resumed = run_sft_stage(stage, base, out, samples, loader, seed=4, resume=True)
    assert resumed.global_step == 2
    assert last_checkpoint(out / "checkpoints") == ckpt  # no step 3 checkpoint / training happened
    info = json.loads((resumed.final_dir / "emma_stage.json").read_text())
    assert info["resumed_from"] == "checkpoint-2" and info["global_step"] == 2
    assert [h["loss"] for h in resumed.log_history if "loss" in h] == [
        h["loss"] for h in whole.log_history if "loss" in h
    ]
    _assert_same(expected, _params(resumed.final_dir))


def _grpo_samples() -> list[tuple[Sample, Any]]:
    def image(_ref: ImageRef) -> Image.Image:
        return Image.new("RGB", (56, 42), (150, 40, 40))

    return [
        (
            Sample(
                id=f"c{i}",
                task=TaskType.CLOSED_VQA,
                images=[ImageRef(path="a.png")],
                turns=[Turn(role="user", content=f"Is there a fracture ({i})?", images=[0])],
                gold=Gold(answer="yes" if i % 2 else "no"),
            ),
            image,
        )
        for i in range(4)
    ]


def _variety(prompts: Any, completions: Any, **kwargs: Any) -> list[float]:
    """Distinct characters per completion: random text varies, so advantages are non-zero."""
    return [len(set(c if isinstance(c, str) else c[0]["content"])) / 10.0 for c in completions]


def test_grpo_resume_from_final_checkpoint_trains_nothing(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    base = tiny_model_dir("qwen2_5_vl")
    stage = StageConfig(
        name="grpo",
        kind="grpo",
        datasets=["d"],
        max_steps=2,
        save_steps=2,
        learning_rate=5e-3,
        batch_size=1,
        logging_steps=1,
        grpo=GRPOSettings(num_generations=2, max_completion_length=6, beta=0.0),
    )
    kw: dict[str, Any] = {"seed": 0, "extra_rewards": [_variety], "report_to": []}
    whole = run_grpo_stage(stage, base, tmp_path, _grpo_samples(), **kw)
    assert whole.steps == 2
    expected = _params(whole.final_dir)
    ckpt = last_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name == "checkpoint-2"
    shutil.rmtree(whole.final_dir)

    resumed = run_grpo_stage(stage, base, tmp_path, _grpo_samples(), resume=True, **kw)
    assert resumed.steps == 2
    assert last_checkpoint(tmp_path) == ckpt
    _assert_same(expected, _params(resumed.final_dir))


# --- mid-run resume of full weights (no LoRA) ----------------------------------------------------
# Without the override in emma.train.checkpoints, transformers' Trainer._load_from_checkpoint loads the
# checkpoint's model.safetensors with strict=False; its keys are in the saved (legacy) layout
# (model.layers.* / visual.*) while the module has model.language_model.* / model.visual.*, so no
# weight loads and the resumed run silently restarts from the start weights.


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
