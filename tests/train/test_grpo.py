"""A few real GRPO steps on tiny VLMs: the stage runs, trainable weights change, the result loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from emma.data.schema import Box, Gold, ImageRef, Sample, TaskType, Turn
from emma.model.registry import load_model
from emma.train.grpo import GRPOStageError, grpo_row, run_grpo_stage
from emma.train.recipe import GRPOSettings, LoraConfig, StageConfig


def _image(_ref: ImageRef) -> Image.Image:
    return Image.new("RGB", (56, 42), (150, 40, 40))


def _samples() -> list[tuple[Sample, object]]:
    ref = [ImageRef(path="a.png")]
    closed = Sample(
        id="c",
        task=TaskType.CLOSED_VQA,
        images=ref,
        turns=[Turn(role="user", content="Is there a fracture?", images=[0])],
        gold=Gold(answer="yes"),
    )
    grounding = Sample(
        id="g",
        task=TaskType.GROUNDING,
        images=ref,
        turns=[
            Turn(role="user", content="Where is the lesion?", images=[0]),
            Turn(role="assistant", content="x"),
        ],
        gold=Gold(boxes=[Box(x1=5, y1=5, x2=30, y2=20)]),
    )
    return [(closed, _image), (grounding, _image)]


def _variety(prompts, completions, **kwargs):
    """Distinct characters per completion: random text varies, so advantages are non-zero."""
    return [len(set(c if isinstance(c, str) else c[0]["content"])) / 10.0 for c in completions]


def _stage(**kw) -> StageConfig:
    return StageConfig(
        name="grpo",
        kind="grpo",
        datasets=["d"],
        max_steps=2,
        learning_rate=5e-3,
        batch_size=2,
        logging_steps=1,
        save_steps=1,
        grpo=GRPOSettings(num_generations=2, max_completion_length=6, beta=0.0),
        **kw,
    )


def test_grpo_row_columns() -> None:
    closed, grounding = (s for s, _ in _samples())
    row = grpo_row(grounding, _image, "qwen2_5_vl")
    assert [m["role"] for m in row["prompt"]] == ["user"]
    assert row["answer"] == "x" and row["task"] == "grounding"
    assert row["image_sizes"] == [[56, 42]] and row["boxes"] == [[5.0, 5.0, 30.0, 20.0, 0.0]]
    assert len(row["images"]) == 1 and len(row["model_sizes"]) == 1
    assert grpo_row(closed, _image, "idefics3")["answer"] == "yes"


@pytest.mark.parametrize("family,lora", [("qwen2_5_vl", False), ("idefics3", True)])
def test_grpo_steps_change_trainable_weights(tiny_model_dir, tmp_path: Path, family: str, lora: bool) -> None:
    base_dir = tiny_model_dir(family)
    stage = _stage(lora=LoraConfig(r=4, alpha=8, dropout=0.0) if lora else None)
    result = run_grpo_stage(
        stage, base_dir, tmp_path, _samples(), seed=0, extra_rewards=[_variety], report_to=[]
    )
    assert result.steps == 2
    assert result.trainable_params > 0
    assert result.reward_stats["closed_correct"]["scored"] > 0
    assert result.reward_stats["box_iou"]["scored"] > 0
    assert json.loads((tmp_path / "reward_stats.json").read_text())["box_iou"]["errors"] == 0
    base = load_model(str(base_dir), device="cpu", dtype="fp32").model.state_dict()
    trained = load_model(str(result.final_dir), device="cpu", dtype="fp32").model.state_dict()
    assert set(trained) == set(base)  # LoRA merged: plain weights, same names
    changed = [k for k in base if not torch.equal(base[k], trained[k])]
    lm_changed = [k for k in changed if "language_model" in k or "text_model" in k]
    assert lm_changed, "language-model weights did not change"
    vision = [k for k in changed if ".visual." in k and ".merger." not in k or "vision_model" in k]
    assert not vision, f"frozen vision weights changed: {vision[:3]}"


def test_grpo_rejects_non_grpo_stage(tmp_path: Path) -> None:
    stage = StageConfig(name="s", kind="vqa", datasets=["d"])
    with pytest.raises(GRPOStageError, match="not grpo"):
        run_grpo_stage(stage, tmp_path, tmp_path, [], seed=0)


def test_grpo_keeps_a_frozen_pretrained_tower_in_eval_mode(tiny_model_dir, tmp_path: Path) -> None:
    """FastVLM's ResNet tower is frozen under LoRA: GRPO's model.train() must not put its batch norms in
    training mode (which would use batch statistics and overwrite the pretrained running statistics)."""
    base_dir = tiny_model_dir("fast_vlm")
    stage = _stage(lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    result = run_grpo_stage(
        stage, base_dir, tmp_path, _samples(), seed=0, extra_rewards=[_variety], report_to=[]
    )
    assert result.steps == 2
    base = load_model(str(base_dir), device="cpu", dtype="fp32").model.state_dict()
    trained = load_model(str(result.final_dir), device="cpu", dtype="fp32").model.state_dict()
    tower = [k for k in base if k.startswith("model.vision_tower.")]
    assert any("running_mean" in k for k in tower)
    changed = [k for k in tower if not torch.equal(base[k], trained[k])]
    assert not changed, f"the frozen tower changed: {changed[:3]}"
