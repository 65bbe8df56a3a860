"""A from-scratch projector re-initialised for the frozen tower's feature statistics, or so that image tokens
read as the words of labelled concepts (tiny FastVLM)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from emma.data.schema import Gold, ImageRef, Meta, Sample, TaskType, Turn
from emma.errors import InputError
from emma.model.registry import load_model
from emma.train.projector_init import concept_projector, image_concepts, standardize_projector

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


def _labelled(n: int = 6) -> tuple[list[Sample], Callable[[ImageRef], Image.Image]]:
    """n reddish images labelled chest / CT and n bluish ones labelled head / MRI (one sample each)."""
    images: dict[str, Image.Image] = {}
    samples = []
    for i in range(2 * n):
        red = i < n
        shade = 40 + 25 * (i % n)
        color = (200 + i % n * 9, shade, 30) if red else (30, shade, 200 + i % n * 9)
        key = hashlib.sha256(f"{i}".encode()).hexdigest()
        images[key] = Image.new("RGB", (40, 30), color)
        meta = Meta(body_part="chest" if red else "head", modality="ct" if red else "mri")
        turns = [Turn(role="user", content="Is there a mass?"), Turn(role="assistant", content="no")]
        samples.append(
            Sample(
                id=f"s{i}", task=TaskType.CLOSED_VQA, images=[ImageRef(sha256=key)], turns=turns, meta=meta
            )
        )
    return samples, lambda ref: images[str(ref.sha256)]


def test_image_concepts_from_labels_with_disagreements_dropped() -> None:
    ref = ImageRef(sha256="a" * 64)
    turns = [Turn(role="user", content="q")]
    samples = [
        Sample(id="1", task=TaskType.CLOSED_VQA, images=[ref], turns=turns, meta=Meta(body_part="Lung")),
        Sample(id="2", task=TaskType.CLOSED_VQA, images=[ref], turns=turns, meta=Meta(modality="mr")),
        Sample(id="3", task=TaskType.CLOSED_VQA, images=[ref], turns=turns, meta=Meta(modality="ct")),
    ]
    assert image_concepts(samples) == {"a" * 64: {"body_part": "chest"}}  # MRI and CT disagree: no modality


def test_concept_start_makes_image_tokens_read_as_their_concepts_words(
    tiny_model_dir: Callable[[str], Path],
) -> None:
    loaded = load_model(str(tiny_model_dir("fast_vlm")), device="cpu", dtype="fp32")
    model, processor = loaded.model, loaded.processor
    samples, loader = _labelled()
    result = concept_projector(model, processor, loaded.family, samples, loader)
    assert result.concepts == ("body_part=chest", "body_part=head", "modality=CT", "modality=MRI")
    assert all(acc == 1.0 for acc in result.concept_accuracy.values())
    embeddings = model.get_input_embeddings().weight.detach()
    tokenizer = processor.tokenizer

    def word(text: str) -> torch.Tensor:
        vector = embeddings[tokenizer.encode(text, add_special_tokens=False)].sum(0)
        return vector / vector.norm()

    chest, head, ct, mri = word(" chest"), word(" head"), word(" CT"), word(" MRI")
    for sample in samples:
        pixels = processor.image_processor(images=[loader(sample.images[0])], return_tensors="pt")
        with torch.no_grad():
            feats = model.model.vision_tower(pixels["pixel_values"]).last_hidden_state
            token = model.model.multi_modal_projector(feats.flatten(2).transpose(1, 2))[0].mean(0)
        is_chest = sample.meta.body_part == "chest"
        # each image's tokens lean to its own words, not to the other concepts' words
        assert (token @ chest > token @ head) == is_chest
        assert (token @ ct > token @ mri) == is_chest


def test_concept_start_needs_labels_with_enough_images(tiny_model_dir: Callable[[str], Path]) -> None:
    loaded = load_model(str(tiny_model_dir("fast_vlm")), device="cpu", dtype="fp32")
    samples, loader = _samples()  # no labels
    with pytest.raises(InputError, match="labels"):
        concept_projector(loaded.model, loaded.processor, loaded.family, samples, loader)
    samples, loader = _labelled(n=3)  # 3 images per concept, fewer than min_images
    with pytest.raises(InputError, match="no concept"):
        concept_projector(loaded.model, loaded.processor, loaded.family, samples, loader)
