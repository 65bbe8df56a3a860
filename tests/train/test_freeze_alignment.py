"""Alignment stages: projector only, or projector + vision tower with train_vision (emma-tiny's recipe);
the language model stays frozen either way (tiny Idefics3 model)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from emma.errors import InputError
from emma.train.freeze import apply_trainable, param_groups, part_of, trains

FAMILY = "idefics3"


@pytest.fixture()
def model(tiny_loaded: Callable[[str], Any]) -> Any:
    return copy.deepcopy(tiny_loaded(FAMILY).model)  # the shared model is never modified


def _numel_by_part(model: Any) -> dict[str, int]:
    out = {"vision": 0, "projector": 0, "language": 0}
    for name, param in model.named_parameters():
        out[part_of(name, FAMILY)] += param.numel()
    return out


def _trainable_parts(model: Any) -> dict[str, set[bool]]:
    out: dict[str, set[bool]] = {"vision": set(), "projector": set(), "language": set()}
    for name, param in model.named_parameters():
        out[part_of(name, FAMILY)].add(param.requires_grad)
    return out


def test_part_names_of_idefics3() -> None:
    assert part_of("model.connector.modality_projection.proj.weight", FAMILY) == "projector"
    assert part_of("model.vision_model.encoder.layers.0.mlp.fc1.weight", FAMILY) == "vision"
    assert part_of("model.text_model.layers.0.self_attn.q_proj.weight", FAMILY) == "language"
    assert part_of("lm_head.weight", FAMILY) == "language"
    assert part_of("base_model.model.model.connector.x", FAMILY) == "projector"  # PEFT prefix


def test_trains_table() -> None:
    assert [trains(p, "alignment", False) for p in ("vision", "projector", "language")] == [
        False,
        True,
        False,
    ]
    assert [trains(p, "alignment", True) for p in ("vision", "projector", "language")] == [True, True, False]
    for kind in ("instruction", "vqa", "grpo"):
        assert [trains(p, kind, False) for p in ("vision", "projector", "language")] == [False, True, True]
        assert [trains(p, kind, True) for p in ("vision", "projector", "language")] == [True, True, True]
    with pytest.raises(InputError, match="unknown stage kind"):
        trains("projector", "pretrain", False)


def test_alignment_trains_the_projector_only(model: Any) -> None:
    sizes = _numel_by_part(model)
    assert all(n > 0 for n in sizes.values())
    summary = apply_trainable(model, FAMILY, "alignment")
    assert _trainable_parts(model) == {"vision": {False}, "projector": {True}, "language": {False}}
    assert summary.by_part == {"vision": 0, "projector": sizes["projector"], "language": 0}
    assert summary.trainable == sizes["projector"]
    assert summary.total == sum(sizes.values())


def test_alignment_with_train_vision_trains_projector_and_vision_tower(model: Any) -> None:
    sizes = _numel_by_part(model)
    apply_trainable(model, FAMILY, "instruction")  # everything but vision trains first: must be undone
    summary = apply_trainable(model, FAMILY, "alignment", train_vision=True)
    assert _trainable_parts(model) == {"vision": {True}, "projector": {True}, "language": {False}}
    assert summary.by_part == {"vision": sizes["vision"], "projector": sizes["projector"], "language": 0}
    assert summary.trainable == sizes["vision"] + sizes["projector"]
    # the (tied) input embeddings / output head belong to the frozen language model
    assert not model.get_input_embeddings().weight.requires_grad
    assert not model.get_output_embeddings().weight.requires_grad


def test_alignment_with_train_vision_gets_gradients_only_outside_the_language_model(
    model: Any, tiny_loaded: Callable[[str], Any]
) -> None:
    import torch
    from PIL import Image

    processor = tiny_loaded(FAMILY).processor
    apply_trainable(model, FAMILY, "alignment", train_vision=True)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A grey square."}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    batch = processor(text=[text], images=[[Image.new("RGB", (32, 32), (90, 90, 90))]], return_tensors="pt")
    model.train()
    out = model(**batch, labels=batch["input_ids"].clone())
    out.loss.backward()
    got = {part: False for part in ("vision", "projector", "language")}
    for name, param in model.named_parameters():
        part = part_of(name, FAMILY)
        if param.grad is not None and bool(torch.any(param.grad != 0)):
            got[part] = True
        if part == "language":
            assert param.grad is None, name
    assert got == {"vision": True, "projector": True, "language": False}


def test_alignment_param_groups_give_the_vision_tower_its_own_lr(model: Any) -> None:
    apply_trainable(model, FAMILY, "alignment", train_vision=True)
    groups = param_groups(model, FAMILY, 1e-3, vision_learning_rate=1e-4, weight_decay=0.1)
    by_id = {id(p): g for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert set(by_id) == {id(p) for p in names.values() if p.requires_grad}
    for name, param in names.items():
        if not param.requires_grad:
            continue
        group = by_id[id(param)]
        assert group["lr"] == (1e-4 if part_of(name, FAMILY) == "vision" else 1e-3), name
        assert group["weight_decay"] == (0.1 if param.ndim >= 2 else 0.0), name
    projector_only = copy.deepcopy(model)
    apply_trainable(projector_only, FAMILY, "alignment")
    lrs = {g["lr"] for g in param_groups(projector_only, FAMILY, 1e-3, vision_learning_rate=1e-4)}
    assert lrs == {1e-3}
