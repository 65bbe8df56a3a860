"""A frozen vision tower's features, computed once per image: real training steps on the tiny FastVLM."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from emma.data.schema import Gold, ImageRef, Sample, TaskType, Turn
from emma.model.registry import load_model
from emma.train.feature_cache import TowerFeatureCache, frozen_tower
from emma.train.freeze import apply_trainable
from emma.train.recipe import LoraConfig, StageConfig
from emma.train.sft import STAGE_INFO, run_sft_stage

COLORS = [(220, 20, 20), (20, 220, 20), (20, 20, 220)]


def _samples(n: int) -> tuple[list[Sample], Callable[[ImageRef], Image.Image]]:
    images = {hashlib.sha256(bytes(c)).hexdigest(): Image.new("RGB", (40, 30), c) for c in COLORS}
    keys = list(images)
    samples = [
        Sample(
            id=f"s{i}",
            task=TaskType.OPEN_VQA,
            images=[ImageRef(sha256=keys[i % len(keys)], width=40, height=30)],
            turns=[Turn(role="user", content=f"Question {i}: what colour?")],
            gold=Gold(answer=["red", "green", "blue"][i % 3]),
        )
        for i in range(n)
    ]
    return samples, lambda ref: images[str(ref.sha256)]


def _stage(**kw: Any) -> StageConfig:
    base: dict[str, Any] = {
        "name": "s",
        "kind": "instruction",
        "datasets": ["d"],
        "max_steps": 4,
        "learning_rate": 1e-3,
        "batch_size": 3,
        "logging_steps": 1,
        "save_steps": 100,
        "max_length": 256,
    }
    base.update(kw)
    return StageConfig(**base)


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone()
        for k, v in load_model(str(folder), device="cpu", dtype="fp32").model.state_dict().items()
    }


def test_cached_stage_trains_exactly_like_an_uncached_one(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    base = tiny_model_dir("fast_vlm")
    samples, loader = _samples(12)
    stage = _stage(lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    cache = TowerFeatureCache()
    cached = run_sft_stage(stage, base, tmp_path / "cached", samples, loader, seed=1, feature_cache=cache)
    # 4 steps x 3 images over 3 distinct images: each image's features computed once, then reused
    assert (cache.misses, cache.hits, len(cache)) == (3, 9, 3)
    info = (cached.final_dir / STAGE_INFO).read_text()
    assert '"cached": true' in info and '"computed": 3' in info

    # the same stage with the tower run at every step gives the same weights
    plain_cache = TowerFeatureCache(enabled=False)
    plain = run_sft_stage(stage, base, tmp_path / "plain", samples, loader, seed=1, feature_cache=plain_cache)
    assert plain_cache.misses == plain_cache.hits == 0
    before, a, b = _state(base), _state(cached.final_dir), _state(plain.final_dir)
    assert a.keys() == b.keys() == before.keys()  # the cache leaves module names and the state dict alone
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)
        if name.startswith("model.vision_tower."):  # frozen: bit-identical, batch-norm statistics included
            assert torch.equal(a[name], before[name]), name
    assert any(not torch.equal(a[n], before[n]) for n in a if n.startswith("model.multi_modal_projector."))


def test_a_shared_cache_serves_the_next_stage_but_not_a_changed_tower(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    base = tiny_model_dir("fast_vlm")
    samples, loader = _samples(6)
    cache = TowerFeatureCache()
    first = run_sft_stage(
        _stage(kind="alignment", max_steps=2), base, tmp_path / "a", samples, loader, feature_cache=cache
    )
    assert cache.misses == 3
    run_sft_stage(_stage(max_steps=2), first.final_dir, tmp_path / "b", samples, loader, feature_cache=cache)
    assert cache.misses == 3 and cache.hits == 9  # the next stage computed nothing again

    loaded = load_model(str(base), device="cpu", dtype="fp32")
    with torch.no_grad():
        next(loaded.model.model.vision_tower.parameters()).add_(0.5)
    apply_trainable(loaded.model, loaded.family, "alignment")
    detach = cache.attach(loaded.model, loaded.family)
    assert detach is not None
    pixels = loaded.processor.image_processor(images=[loader(samples[0].images[0])], return_tensors="pt")
    loaded.model.model.vision_tower(pixels["pixel_values"])
    assert cache.misses == 4  # another tower: its own entry
    detach()
    assert "forward" not in vars(loaded.model.model.vision_tower) and "train" not in vars(
        loaded.model.model.vision_tower
    )
    loaded.model.train()
    assert loaded.model.model.vision_tower.training  # detached: the model's own train() reaches it again


def test_only_a_frozen_tower_without_a_projector_inside_is_cached(
    tiny_model_dir: Callable[[str], Path],
) -> None:
    loaded = load_model(str(tiny_model_dir("fast_vlm")), device="cpu", dtype="fp32")
    apply_trainable(loaded.model, loaded.family, "instruction", train_vision=True)
    assert frozen_tower(loaded.model, loaded.family) is None  # the tower trains: nothing to cache
    apply_trainable(loaded.model, loaded.family, "instruction", train_vision=False)
    assert frozen_tower(loaded.model, loaded.family) is loaded.model.model.vision_tower
    qwen = load_model(str(tiny_model_dir("qwen2_5_vl")), device="cpu", dtype="fp32")
    apply_trainable(qwen.model, qwen.family, "alignment")
    assert frozen_tower(qwen.model, qwen.family) is None  # Qwen's merger (projector) is inside model.visual


def test_a_stage_trains_only_the_towers_top_block_in_eval_mode(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    """``vision_trainable``: with LoRA, only the named stage of the pretrained tower changes (at its own
    learning rate); the rest of the tower and every batch-norm statistic stay exactly as they were."""
    base = tiny_model_dir("fast_vlm")
    samples, loader = _samples(9)
    top = "encoder.stages.1"
    stage = _stage(
        kind="vqa",
        lora=LoraConfig(r=4, alpha=8, dropout=0.0),
        train_vision=True,
        vision_trainable=[top],
        vision_learning_rate=1e-2,
    )
    cache = TowerFeatureCache()
    result = run_sft_stage(stage, base, tmp_path / "top", samples, loader, seed=1, feature_cache=cache)
    assert cache.misses == cache.hits == 0  # a tower that trains is not cached
    before, after = _state(base), _state(result.final_dir)
    tower = "model.vision_tower."
    changed = {n for n in before if n.startswith(tower) and not torch.equal(before[n], after[n])}
    assert changed, "the top block did not train"
    assert all(n.startswith(tower + top + ".") for n in changed), sorted(changed)[:3]
    stats = [n for n in before if n.startswith(tower) and ("running_" in n or "num_batches" in n)]
    assert stats and not any(n in changed for n in stats)  # eval mode: batch-norm statistics untouched


def test_vision_trainable_names_modules_of_the_tower_and_needs_train_vision(
    tiny_model_dir: Callable[[str], Path],
) -> None:
    import pytest

    from emma.errors import InputError

    loaded = load_model(str(tiny_model_dir("fast_vlm")), device="cpu", dtype="fp32")
    summary = apply_trainable(loaded.model, loaded.family, "vqa", True, ["encoder.stages.1"])
    top = sum(p.numel() for p in loaded.model.model.vision_tower.encoder.stages[1].parameters())
    assert summary.by_part["vision"] == top > 0
    with pytest.raises(InputError, match="no module"):
        apply_trainable(loaded.model, loaded.family, "vqa", True, ["encoder.stages.9"])
    with pytest.raises(ValueError, match="needs train_vision"):
        _stage(vision_trainable=["encoder.stages.1"])
