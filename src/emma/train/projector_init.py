"""A data-dependent start for a projector trained from scratch on a pretrained, frozen vision tower.

A CNN's last feature map is far from what a language model reads: emma-tiny's ResNet-152 gives
non-negative features (mean 0.39, max ~18) whose per-image means are nearly identical, so a randomly
initialised projector makes image tokens that are alike for every image. The first candidate trained from
such a start (recipe v5) ended with image tokens of mean norm 79 against 3.2 for SmolLM2's word
embeddings, their per-image means at cosine 0.99 to each other (scripts/image_token_stats.py), and it answered VQA-RAD's closed
questions about as well with blank images (0.526) as with the real ones (0.544).

:func:`standardize_projector` (recipe: ``projector_init: standardize`` on the first stage that trains the
projector) fixes the scale before training, with the model's own weights only (nothing is added to the
architecture, so the checkpoint stays a plain transformers model):

- the first linear layer is re-drawn for standardized input (each feature channel centred and scaled by
  its mean and std over a sample of the stage's images), and the standardization is folded into its weight
  and bias (``W' = W / sigma``, ``b' = b - W' mu``), so the common component of all images is removed;
- the last linear layer is scaled so that image tokens have the mean norm of the language model's
  word embeddings.

Families whose projector is ``linear_1 → act → linear_2`` (FastVLM, LLaVA) are supported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from emma.data.formats import ImageLoader
from emma.data.schema import Sample
from emma.errors import InputError
from emma.train.freeze import _PEFT_PREFIX, projector_modules, vision_modules

__all__ = ["ProjectorInit", "standardize_projector"]


@dataclass(frozen=True)
class ProjectorInit:
    images: int  # distinct images the statistics came from
    token_norm_before: float  # mean image-token norm with the projector as it was
    token_norm_after: float
    text_norm: float  # mean norm of the language model's input embeddings (the target)


def _module(model: Any, name: str) -> Any:
    for full, module in model.named_modules():
        if full.removeprefix(_PEFT_PREFIX) == name:
            return module
    raise InputError(f"module {name!r} not found in the model")


def standardize_projector(
    model: Any,
    processor: Any,
    family: str,
    samples: Sequence[Sample],
    image_loader: ImageLoader,
    *,
    max_images: int = 64,
    seed: int = 0,
) -> ProjectorInit:
    """Re-initialise ``model``'s projector for its tower's feature statistics (see module doc)."""
    import torch

    projector = _module(model, projector_modules(family)[0])
    first, last = getattr(projector, "linear_1", None), getattr(projector, "linear_2", None)
    if not isinstance(first, torch.nn.Linear) or not isinstance(last, torch.nn.Linear):
        raise InputError(
            f"projector_init: standardize needs a linear_1 → act → linear_2 projector ({family})"
        )
    tower = _module(model, vision_modules(family)[0])
    refs = {}
    for sample in samples:
        for ref in sample.images:
            refs.setdefault(str(ref.sha256 or ref.path), ref)
    keys = sorted(refs)
    rng = torch.Generator().manual_seed(seed)
    chosen = [keys[int(i)] for i in torch.randperm(len(keys), generator=rng)[:max_images]]
    if not chosen:
        raise InputError("projector_init: the stage has no images")
    images = [image_loader(refs[k]).convert("RGB") for k in chosen]
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    dtype = next(tower.parameters()).dtype
    was_training = tower.training
    tower.eval()
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        features = torch.cat(
            [tower(pixels[i : i + 8].to(dtype)).last_hidden_state for i in range(0, len(images), 8)]
        )
        tokens = features.flatten(2).transpose(1, 2).reshape(-1, features.shape[1]).float()
        before = float(projector(tokens.to(first.weight.dtype)).norm(dim=-1).mean())
        mu, sigma = tokens.mean(0), tokens.std(0).clamp_min(1e-3)
        # linear_1 on standardized input: fresh weights with unit-variance outputs, then folded
        weight = torch.randn(first.weight.shape, generator=rng) / math.sqrt(first.in_features)
        first.weight.copy_(weight / sigma)
        if first.bias is not None:
            first.bias.copy_(-(weight @ (mu / sigma)))
        text_norm = float(model.get_input_embeddings().weight.float().norm(dim=-1).mean())
        out = projector(tokens.to(first.weight.dtype)).float()
        scale = text_norm / float(out.norm(dim=-1).mean())
        last.weight.mul_(scale)
        if last.bias is not None:
            last.bias.mul_(scale)
        after = float(projector(tokens.to(first.weight.dtype)).norm(dim=-1).mean())
    tower.train(was_training)
    return ProjectorInit(len(images), before, after, text_norm)
