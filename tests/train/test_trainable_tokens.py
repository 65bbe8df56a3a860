"""lora.trainable_tokens: only the named tokens' embedding rows train (tied output rows with them)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

from emma.errors import InputError
from emma.train.freeze import lora_config, param_groups, token_ids, train_token_rows

FAMILY = "idefics3"


def test_only_the_named_rows_change_under_weight_decay(tiny_loaded: Callable[[str], Any]) -> None:
    from peft import get_peft_model

    loaded = tiny_loaded(FAMILY)
    model = get_peft_model(
        copy.deepcopy(loaded.model),
        lora_config(loaded.model, FAMILY, "vqa", r=2, alpha=4, dropout=0.0, target_modules="all-linear"),
    )
    ids = token_ids(loaded.processor, ["<end_of_utterance>", "<global-img>"])
    train_token_rows(model, ids)
    embedding = model.get_input_embeddings().weight
    before = embedding.detach().clone()
    optimizer = torch.optim.AdamW(param_groups(model, FAMILY, 1e-2, weight_decay=0.1))
    tokens = torch.tensor([[1, 5, ids[0], 7, ids[1], 9]])
    for _ in range(2):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = (embedding.detach() - before).abs().sum(dim=1).nonzero().flatten().tolist()
    assert sorted(changed) == sorted(ids)
    merged = model.merge_and_unload()
    assert torch.equal(merged.get_input_embeddings().weight, embedding.detach())
    if merged.config.get_text_config().tie_word_embeddings:
        assert (
            merged.get_output_embeddings().weight.data_ptr()
            == merged.get_input_embeddings().weight.data_ptr()
        )


def test_unknown_trainable_token_is_a_clear_error(tiny_loaded: Callable[[str], Any]) -> None:
    with pytest.raises(InputError, match="not a token"):
        token_ids(tiny_loaded(FAMILY).processor, ["<no_such_token_here>"])
