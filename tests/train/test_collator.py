"""VLCollator on tiny models: assistant-only labels, image tokens never truncated."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image

from emma.train.collator import IGNORE_INDEX, ImageTokensTruncatedError, VLCollator

FAMILIES = ["qwen2_5_vl", "idefics3"]
END = {"qwen2_5_vl": "<|im_end|>", "idefics3": "<end_of_utterance>"}


def _image() -> Image.Image:
    return Image.new("RGB", (40, 30), (200, 30, 30))


def _single(sample_id: str = "s1", answer: str = "yes, left radius") -> dict[str, Any]:
    return {
        "id": sample_id,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "Is there a fracture?"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "images": [_image()],
    }


def _multi() -> dict[str, Any]:
    return {
        "id": "s2",
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello there"}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "a chest film"}]},
        ],
        "images": [_image()],
    }


def _unmasked(tokenizer: Any, batch: dict[str, Any], row: int) -> str:
    labels = batch["labels"][row]
    return str(tokenizer.decode(labels[labels != IGNORE_INDEX]))


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_cover_only_assistant_tokens(family: str, tiny_loaded: Callable[[str], Any]) -> None:
    processor = tiny_loaded(family).processor
    batch = VLCollator(processor, family)([_single(), _multi()])
    tok = processor.tokenizer
    end = END[family]
    assert _unmasked(tok, batch, 0).strip() == f"yes, left radius{end}"
    assert _unmasked(tok, batch, 1).strip().replace(f"{end} ", end) == f"Hello there{end}a chest film{end}"
    # the labels are the input ids where not masked, and padding is masked
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    keep = labels != IGNORE_INDEX
    assert (labels[keep] == ids[keep]).all()
    assert (labels[mask == 0] == IGNORE_INDEX).all()
    assert mask[0].sum() < mask[1].sum()  # right padding on the shorter row
    assert mask[0, 0] == 1
    assert "pixel_values" in batch


@pytest.mark.parametrize("family", FAMILIES)
def test_truncation_that_cuts_image_tokens_raises(family: str, tiny_loaded: Callable[[str], Any]) -> None:
    processor = tiny_loaded(family).processor
    full = VLCollator(processor, family)([_single("case-7")])
    image_id = processor.image_token_id
    last_image = int((full["input_ids"][0] == image_id).nonzero().max())
    with pytest.raises(ImageTokensTruncatedError, match="case-7"):
        VLCollator(processor, family, max_length=last_image)([_single("case-7")])
    # cutting text only (after the image) is allowed and trims every sequence-shaped tensor
    length = int(full["attention_mask"][0].sum())
    cut = VLCollator(processor, family, max_length=length - 2)([_single("case-7")])
    assert cut["input_ids"].shape[1] == length - 2
    assert cut["labels"].shape == cut["input_ids"].shape == cut["attention_mask"].shape
    assert (cut["input_ids"] == full["input_ids"][:, : length - 2]).all()
