"""A from-scratch projector re-initialised for the frozen tower's feature statistics (tiny FastVLM)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from emma.data.schema import Gold, ImageRef, Sample, TaskType, Turn
from emma.errors import InputError
from emma.model.registry import load_model
from emma.train.projector_init import standardize_projector

COLORS = [(220, 20, 20), (20, 220, 20), (20, 20, 220), (200, 200, 200)]


def _samples() -> tuple[list[Sample], Callable[[ImageRef], Image.Image]]:
    images = {hashlib.sha256(bytes(c)).hexdigest(): Image.new("RGB", (40, 30), c) for c in COLORS}
    samples = [
        Sample(
            id=f"s{i}",
            task=TaskType.OPEN_VQA,
            images=[ImageRef(sha256=key, width=40, height=30)],
            turns=[Turn(role="user", content="What colour?")],
            gold=Gold(answer="red"),
        )
        for i, key in enumerate(images)
    ]
    return samples, lambda ref: images[str(ref.sha256)]


def test_image_tokens_get_the_word_embeddings_scale_and_lose_their_common_part(
    tiny_model_dir: Callable[[str], Path],
) -> None:
    loaded = load_model(str(tiny_model_dir("fast_vlm")), device="cpu", dtype="fp32")
    model, processor = loaded.model, loaded.processor
    samples, loader = _samples()
    with torch.no_grad():  # make the features large and alike, as a real CNN's are
        model.model.multi_modal_projector.linear_1.weight.mul_(30.0)
        model.model.multi_modal_projector.linear_2.weight.mul_(30.0)
    tower_before = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    result = standardize_projector(model, processor, loaded.family, samples, loader)
    assert result.images == 4
    assert result.token_norm_after == pytest.approx(result.text_norm, rel=1e-3)
    assert result.token_norm_before > 5 * result.text_norm
    # the tower is untouched; the first layer now sees centred features
    after = model.model.vision_tower.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in tower_before.items())
    pixels = processor.image_processor(images=[loader(s.images[0]) for s in samples], return_tensors="pt")
    with torch.no_grad():
        feats = model.model.vision_tower(pixels["pixel_values"]).last_hidden_state
        tokens = feats.flatten(2).transpose(1, 2).reshape(-1, feats.shape[1])
        hidden = model.model.multi_modal_projector.linear_1(tokens)
    assert float(hidden.mean(0).abs().max()) < 1e-3  # each channel centred over the sampled images


def test_a_projector_of_another_shape_is_refused(tiny_model_dir: Callable[[str], Path]) -> None:
    loaded = load_model(str(tiny_model_dir("idefics3")), device="cpu", dtype="fp32")
    samples, loader = _samples()
    with pytest.raises(InputError, match="linear_1"):
        standardize_projector(loaded.model, loaded.processor, loaded.family, samples, loader)
