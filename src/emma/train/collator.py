"""The vision-language SFT collator: TRL-style ``{"messages", "images"}`` examples → a padded batch.

- Inputs are built the way inference builds them (``processor.apply_chat_template(..., tokenize=True)``
  with the PIL images placed into the ``{"type": "image"}`` parts), so training sees exactly the tokens
  serving sees.
- Loss only on assistant tokens: for each assistant turn ``k`` the conversation up to it is rendered with
  ``add_generation_prompt=True``; its token count is where the answer starts, and the next turn's prefix
  (or the end of the sequence) is where it ends. Trailing whitespace-only tokens after the answer's end
  token (the template's ``\\n`` between turns) are masked, so the labels decode to "answer + end token".
  The prefix must tokenize to a prefix of the full sequence, else :class:`CollatorError`.
- ``max_length``: sequences are right-padded; a longer one is truncated at its end, unless that would cut
  an image token (or the image's end marker): then :class:`ImageTokensTruncatedError` names the sample.
- No packing: one example per row.

Cost: one extra (prefix) processor call per assistant turn; images are processed with each call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from emma.errors import InputError

IGNORE_INDEX = -100

# Tokens that close an image's span in some family's prompt (kept together with the image tokens).
_IMAGE_MARKERS = (
    "<|image_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<image>",
    "<fake_token_around_image>",
    "<global-img>",
    "<image_soft_token>",
    "<start_of_image>",
    "<end_of_image>",
    "<IMG_CONTEXT>",
    "<img>",
    "</img>",
)


class CollatorError(InputError):
    """An example the collator cannot turn into training inputs."""


class ImageTokensTruncatedError(CollatorError):
    """Truncating to ``max_length`` would cut image tokens of a sample (raise rather than train on garbage)."""

    def __init__(self, sample_id: str, length: int, needed: int, max_length: int) -> None:
        super().__init__(
            f"sample {sample_id!r}: {length} tokens, image tokens reach position {needed}, over "
            f"max_length {max_length}; raise max_length or use smaller images"
        )
        self.sample_id = sample_id


def _with_images(messages: Sequence[Mapping[str, Any]], images: Sequence[Any]) -> list[dict[str, Any]]:
    """Messages with each ``{"type": "image"}`` part carrying its PIL image (in order); text parts cleaned."""
    out: list[dict[str, Any]] = []
    it = iter(images)
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            out.append({"role": message["role"], "content": [{"type": "text", "text": content}]})
            continue
        parts: list[dict[str, Any]] = []
        for part in content:
            if part.get("type") == "image":
                try:
                    parts.append({"type": "image", "image": next(it)})
                except StopIteration:
                    raise CollatorError("more image parts than images in an example") from None
            else:
                parts.append({"type": "text", "text": part.get("text") or ""})
        out.append({"role": message["role"], "content": parts})
    if next(it, None) is not None:
        raise CollatorError("more images than image parts in an example")
    return out


class VLCollator:
    """Collate TRL conversational vision examples into model inputs + assistant-only labels.

    ``examples``: mappings with ``messages`` (TRL format), ``images`` (PIL, in the order of the image
    parts; may be empty) and optionally ``id`` (named in errors).
    """

    def __init__(self, processor: Any, family: str, max_length: int | None = None) -> None:
        self.processor = processor
        self.family = family
        self.max_length = max_length
        tokenizer = processor.tokenizer
        vocab = tokenizer.get_vocab()
        ids = {vocab[t] for t in _IMAGE_MARKERS if t in vocab}
        image_token_id = getattr(processor, "image_token_id", None)
        if isinstance(image_token_id, int):
            ids.add(image_token_id)
        self.image_token_ids = torch.tensor(sorted(ids), dtype=torch.long)
        self.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )

    # ------------------------------------------------------------------------------------------ encode

    def _encode(self, conversations: list[list[dict[str, Any]]], *, generation_prompt: bool) -> Any:
        try:
            return self.processor.apply_chat_template(
                conversations,
                add_generation_prompt=generation_prompt,
                tokenize=True,
                return_dict=True,
                processor_kwargs={"padding": True, "padding_side": "right", "return_tensors": "pt"},
            )
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise CollatorError(f"cannot build training inputs: {str(exc).splitlines()[0][:200]}") from None

    def _prefix(
        self, sample_id: str, conversation: list[dict[str, Any]], ids: torch.Tensor, *, prompt: bool
    ) -> int:
        """Token count of ``conversation`` rendered alone; checked to be a prefix of ``ids``."""
        prefix = self._encode([conversation], generation_prompt=prompt)["input_ids"][0]
        n = int(prefix.shape[0])
        if n > ids.shape[0] or not torch.equal(ids[:n], prefix):
            raise CollatorError(
                f"sample {sample_id!r}: the chat template's rendering of turn {len(conversation)} does not "
                "tokenize to a prefix of the conversation; cannot locate the assistant tokens"
            )
        return n

    def _labels(self, sample_id: str, conversation: list[dict[str, Any]], ids: torch.Tensor) -> torch.Tensor:
        """Labels for one row (``ids`` without padding): -100 except on assistant turns."""
        labels = torch.full_like(ids, IGNORE_INDEX)
        tokenizer = self.processor.tokenizer
        last = len(conversation) - 1
        for k, message in enumerate(conversation):
            if message["role"] != "assistant":
                continue
            start = self._prefix(sample_id, conversation[:k], ids, prompt=True)
            end = (
                int(ids.shape[0])
                if k == last
                else self._prefix(sample_id, conversation[: k + 1], ids, prompt=False)
            )
            while end > start and not tokenizer.decode(ids[end - 1 : end]).strip():
                end -= 1  # the template's newline after the end-of-turn token
            labels[start:end] = ids[start:end]
        return labels

    # ------------------------------------------------------------------------------------------ collate

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        conversations = [_with_images(e["messages"], e.get("images") or []) for e in examples]
        sample_ids = [str(e.get("id", f"#{i}")) for i, e in enumerate(examples)]
        batch = dict(self._encode(conversations, generation_prompt=False))
        input_ids: torch.Tensor = batch["input_ids"]
        attention = batch["attention_mask"]
        rows, width = input_ids.shape
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for i in range(rows):
            length = int(attention[i].sum())
            labels[i, :length] = self._labels(sample_ids[i], conversations[i], input_ids[i, :length])
        labels[attention == 0] = IGNORE_INDEX
        batch["labels"] = labels
        if self.max_length is not None and width > self.max_length:
            self._check_images_kept(input_ids, attention, sample_ids)
            for key, value in list(batch.items()):
                if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == (rows, width):
                    batch[key] = value[:, : self.max_length]
        return batch

    def _check_images_kept(self, input_ids: torch.Tensor, attention: torch.Tensor, ids: list[str]) -> None:
        assert self.max_length is not None
        is_image = torch.isin(input_ids, self.image_token_ids) & (attention == 1)
        for i in range(input_ids.shape[0]):
            positions = torch.nonzero(is_image[i]).flatten()
            if positions.numel() and int(positions[-1]) >= self.max_length:
                raise ImageTokensTruncatedError(
                    ids[i], int(attention[i].sum()), int(positions[-1]) + 1, self.max_length
                )
