"""Vision stage (``kind: vision``): labels from assistant words, augmentation, tower + connector training on
the tiny Idefics3 model (LM bit-identical), resume == uninterrupted, recipe validation."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from emma.data.schema import ImageRef, Sample, TaskType, Turn
from emma.errors import InputError
from emma.model.registry import load_model
from emma.train import vision_pretrain
from emma.train.freeze import part_of
from emma.train.recipe import RecipeError, StageConfig, parse_recipe
from emma.train.vision_pretrain import augment, image_texts, run_vision_stage, vocabulary, words

Loader = Callable[[ImageRef], Image.Image]


def _sample(i: int, key: str, answer: str) -> Sample:
    return Sample(
        id=f"s{i}",
        task=TaskType.OPEN_VQA,
        images=[ImageRef(sha256=key, width=32, height=32)],
        turns=[Turn(role="user", content="Describe it."), Turn(role="assistant", content=answer)],
    )


def _pattern(kind: int) -> Image.Image:
    im = Image.new("RGB", (32, 32), (0, 0, 0))
    draw = ImageDraw.Draw(im)
    if kind == 0:
        draw.rectangle((0, 0, 15, 31), fill=(255, 255, 255))  # left half white
    elif kind == 1:
        draw.rectangle((0, 0, 31, 15), fill=(255, 40, 40))  # top half red
    elif kind == 2:
        draw.ellipse((6, 6, 25, 25), fill=(40, 255, 40))  # green disc
    else:
        for x in range(0, 32, 8):
            draw.rectangle((x, 0, x + 3, 31), fill=(60, 60, 255))  # blue stripes
    return im


def _data() -> tuple[list[Sample], Loader]:
    images = {hashlib.sha256(f"img{k}".encode()).hexdigest(): _pattern(k) for k in range(4)}
    keys = list(images)
    answers = [
        (0, "Left lung opacity."),
        (1, "Right lung fracture."),
        (2, "Left kidney stone."),
        (3, "Right kidney fracture."),
        (0, "Chest opacity on the left."),
        (1, "Chest fracture."),
    ]
    samples = [_sample(i, keys[k], text) for i, (k, text) in enumerate(answers)]
    return samples, lambda ref: images[str(ref.sha256)]


def _stage(**kw: Any) -> StageConfig:
    base: dict[str, Any] = {
        "name": "vision",
        "kind": "vision",
        "datasets": ["d"],
        "epochs": 2,
        "batch_size": 2,
        "learning_rate": 1e-3,
    }
    base.update(kw)
    return StageConfig(**base)


def _params(folder: Path) -> tuple[str, dict[str, torch.Tensor]]:
    loaded = load_model(str(folder), device="cpu", dtype="fp32")
    return loaded.family, {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}


# ------------------------------------------------------------------------------------------ labels


def test_words_drop_stop_words_and_short_tokens() -> None:
    assert words("The image shows a LEFT lung opacity, no effusion; CT x2.") == {
        "left",
        "lung",
        "opacity",
        "effusion",
    }
    assert words("is it the one?") == {"one"}


def test_vocabulary_threshold_and_order() -> None:
    bags = [{"lung", "left", "rare"}, {"lung", "right"}, {"lung", "left", "right"}, {"kidney", "right"}]
    assert vocabulary(bags) == ["lung", "right", "left"]  # 3, 3 (alphabetical), 2; single-image words out
    assert vocabulary(bags, min_images=1) == ["lung", "right", "left", "kidney", "rare"]
    assert vocabulary(bags, min_images=3) == ["lung", "right"]
    assert vocabulary(bags, max_size=1) == ["lung"]


def test_image_texts_dedupe_by_sha_and_merge_bags() -> None:
    samples, _ = _data()
    refs, bags = image_texts(samples)
    assert len(refs) == 4 and refs[0].sha256 == samples[0].images[0].sha256
    assert bags[0] == {"left", "lung", "opacity", "chest"}  # two samples of one image merged
    assert bags[1] == {"right", "lung", "fracture", "chest"}
    assert "describe" not in set().union(*bags)  # user turns are not labels
    assert vocabulary(bags) == ["chest", "fracture", "kidney", "left", "lung", "right"]


# ------------------------------------------------------------------------------------ augmentation


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_augment_keeps_mode_is_seeded_and_never_flips(mode: str) -> None:
    image = _pattern(0).convert(mode)  # left half white, right half black
    a = augment(image, random.Random(7))
    b = augment(image, random.Random(7))
    assert isinstance(a, Image.Image) and a.mode == mode
    assert a.tobytes() == b.tobytes()
    for seed in range(20):
        out = augment(image, random.Random(seed)).convert("L")
        grid = torch.from_numpy(np.asarray(out, dtype=np.float32))  # (height, width)
        half = out.width // 2
        assert grid[:, :half].mean() > grid[:, half:].mean() + 50, seed


# --------------------------------------------------------------------------------------- training


def test_trains_tower_and_connector_only(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    base = tiny_model_dir("idefics3")
    samples, loader = _data()
    result = run_vision_stage(_stage(epochs=6), base, tmp_path / "v", samples, loader, seed=1)
    family, before = _params(base)
    _, after = _params(result.final_dir)
    assert family == "idefics3" and result.images == 4 and result.vocabulary == 6
    changed = {part_of(k, family) for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"vision", "projector"}
    for k in before:
        if part_of(k, family) == "language":
            assert torch.equal(before[k], after[k]), k  # bit-identical
    assert (result.final_dir / "processor_config.json").exists()
    assert (result.final_dir / vision_pretrain.STAGE_INFO).exists()
    assert result.trainable["by_part"]["language"] == 0 and result.trainable["by_part"]["vision"] > 0
    epochs = [h for h in result.log_history if "epoch" in h]
    assert [h["epoch"] for h in epochs] == list(range(1, 7))
    assert all("loss" in h and "learning_rate" in h for h in epochs)
    assert epochs[-1]["loss"] < epochs[0]["loss"]
    assert result.train_loss == epochs[-1]["loss"]
    assert result.label_recall_at_10 is not None and 0.0 <= result.label_recall_at_10 <= 1.0
    assert [p.name for p in (tmp_path / "v" / "checkpoints").iterdir()] == ["epoch-6.pt"]  # older ones pruned


def test_resume_matches_uninterrupted(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tiny_model_dir("idefics3")
    samples, loader = _data()
    stage = _stage(epochs=2)
    whole = run_vision_stage(stage, base, tmp_path / "whole", samples, loader, seed=4)

    real = vision_pretrain._save_checkpoint

    def save_then_die(path: Path, state: dict[str, Any]) -> None:
        real(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(vision_pretrain, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_vision_stage(stage, base, tmp_path / "cut", samples, loader, seed=4)
    monkeypatch.setattr(vision_pretrain, "_save_checkpoint", real)
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["epoch-1.pt"]
    assert not (tmp_path / "cut" / "final").exists()

    resumed = run_vision_stage(stage, base, tmp_path / "cut", samples, loader, seed=4, resume=True)
    assert [h["epoch"] for h in resumed.log_history if "epoch" in h] == [1, 2]
    family, a = _params(whole.final_dir)
    _, b = _params(resumed.final_dir)
    _, start = _params(base)
    trained = [k for k in a if part_of(k, family) != "language"]
    assert any(not torch.equal(a[k], start[k]) for k in trained)
    for k in trained:
        assert torch.equal(a[k], b[k]), k


def test_unsupported_family_is_one_line_error(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    samples, loader = _data()
    with pytest.raises(InputError, match="vision pretraining does not support family 'qwen2_5_vl'") as info:
        run_vision_stage(_stage(), tiny_model_dir("qwen2_5_vl"), tmp_path / "q", samples, loader)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "q" / "final").exists()


# ----------------------------------------------------------------------------------------- recipes


def _recipe(*stages: dict[str, Any]) -> dict[str, Any]:
    return {
        "output_dir": "out",
        "base_model": "tiny:idefics3",
        "datasets": {"a": {"path": "/nonexistent"}},
        "stages": list(stages),
    }


def test_recipe_vision_stage_rules() -> None:
    vision = {"name": "vision", "kind": "vision", "datasets": ["a"], "epochs": 3}
    recipe = parse_recipe(
        _recipe(vision, {"name": "align", "kind": "alignment", "datasets": ["a"]}), check_paths=False
    )
    assert [s.kind for s in recipe.stages] == ["vision", "alignment"]
    with pytest.raises(RecipeError, match="a vision stage trains the tower itself; no lora") as info:
        parse_recipe(_recipe({**vision, "lora": {"r": 4}}), check_paths=False)
    assert "\n" not in str(info.value)
