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
from dataclasses import dataclass, field
from typing import Any

from emma.data.formats import ImageLoader
from emma.data.schema import ImageRef, Sample
from emma.errors import InputError
from emma.train.freeze import _PEFT_PREFIX, projector_modules, vision_modules

__all__ = ["ProjectorInit", "concept_projector", "image_concepts", "standardize_projector", "tower_tokens"]


@dataclass(frozen=True)
class ProjectorInit:
    images: int  # distinct images the statistics came from
    token_norm_before: float  # mean image-token norm with the projector as it was
    token_norm_after: float
    text_norm: float  # mean norm of the language model's input embeddings (the target)
    concepts: tuple[str, ...] = ()  # concept_projector: the concepts behind the first hidden units
    concept_accuracy: dict[str, float] = field(default_factory=dict)  # per image, on the fitting images


def _module(model: Any, name: str) -> Any:
    for full, module in model.named_modules():
        if full.removeprefix(_PEFT_PREFIX) == name:
            return module
    raise InputError(f"module {name!r} not found in the model")


def tower_tokens(model: Any, processor: Any, family: str, images: list[Any]) -> Any:
    """The frozen tower's feature tokens for ``images``: (images, tokens per image, channels), fp32."""
    import torch

    tower = _module(model, vision_modules(family)[0])
    dtype = next(tower.parameters()).dtype
    was_training = tower.training
    tower.eval()
    out = []
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        for i in range(0, len(images), 8):
            pixels = processor.image_processor(images=images[i : i + 8], return_tensors="pt")["pixel_values"]
            features = tower(pixels.to(dtype)).last_hidden_state
            out.append(features.flatten(2).transpose(1, 2).float())
    tower.train(was_training)
    return torch.cat(out)


def _linear_pair(model: Any, family: str) -> tuple[Any, Any, Any]:
    import torch

    projector = _module(model, projector_modules(family)[0])
    first, last = getattr(projector, "linear_1", None), getattr(projector, "linear_2", None)
    if not isinstance(first, torch.nn.Linear) or not isinstance(last, torch.nn.Linear):
        raise InputError(f"projector_init needs a linear_1 → act → linear_2 projector ({family})")
    return projector, first, last


def _image_refs(samples: Sequence[Sample]) -> dict[str, ImageRef]:
    refs: dict[str, ImageRef] = {}
    for sample in samples:
        for ref in sample.images:
            refs.setdefault(str(ref.sha256 or ref.path), ref)
    return refs


def _standardized_random(first: Any, mu: Any, sigma: Any, rng: Any) -> None:
    """linear_1 := fresh weights with unit-variance outputs on standardized input, folded (module doc)."""
    import torch

    weight = torch.randn(first.weight.shape, generator=rng) / math.sqrt(first.in_features)
    first.weight.copy_(weight / sigma)
    if first.bias is not None:
        first.bias.copy_(-(weight @ (mu / sigma)))


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

    projector, first, last = _linear_pair(model, family)
    refs = _image_refs(samples)
    keys = sorted(refs)
    rng = torch.Generator().manual_seed(seed)
    chosen = [keys[int(i)] for i in torch.randperm(len(keys), generator=rng)[:max_images]]
    if not chosen:
        raise InputError("projector_init: the stage has no images")
    images = [image_loader(refs[k]).convert("RGB") for k in chosen]
    tokens = tower_tokens(model, processor, family, images).reshape(-1, first.in_features)
    with torch.no_grad():
        before = float(projector(tokens.to(first.weight.dtype)).norm(dim=-1).mean())
        mu, sigma = tokens.mean(0), tokens.std(0).clamp_min(1e-3)
        _standardized_random(first, mu, sigma, rng)
        text_norm = float(model.get_input_embeddings().weight.float().norm(dim=-1).mean())
        out = projector(tokens.to(first.weight.dtype)).float()
        scale = text_norm / float(out.norm(dim=-1).mean())
        last.weight.mul_(scale)
        if last.bias is not None:
            last.bias.mul_(scale)
        after = float(projector(tokens.to(first.weight.dtype)).norm(dim=-1).mean())
    return ProjectorInit(len(images), before, after, text_norm)


def image_concepts(samples: Sequence[Sample]) -> dict[str, dict[str, str]]:
    """Per image key: the concepts its samples' labels give, ``{kind: value}`` with kinds ``body_part``
    (the disjoint body regions of :data:`emma.data.sources.fact_questions.BODY_REGIONS`) and ``modality``
    (:data:`~emma.data.sources.rule_captions.MODALITY_WORDS`'s display words). An image whose samples
    disagree on a kind gets none of that kind."""
    from emma.data.sources.fact_questions import BODY_REGIONS
    from emma.data.sources.rule_captions import MODALITY_WORDS

    seen: dict[str, dict[str, set[str]]] = {}
    for sample in samples:
        region = BODY_REGIONS.get((sample.meta.body_part or "").strip().lower())
        modality = (sample.meta.modality or "").strip()
        modality = MODALITY_WORDS.get(modality.lower(), modality)
        for ref in sample.images:
            kinds = seen.setdefault(str(ref.sha256 or ref.path), {})
            if region:
                kinds.setdefault("body_part", set()).add(region)
            if modality:
                kinds.setdefault("modality", set()).add(modality)
    return {
        key: {kind: next(iter(values)) for kind, values in kinds.items() if len(values) == 1}
        for key, kinds in seen.items()
    }


def _fit_logistic(x: Any, y: Any, l2: float, steps: int) -> tuple[Any, Any]:
    """Token-level logistic regression (classes balanced by weight, L2), by L-BFGS: weight, bias."""
    import torch

    weight = torch.zeros(x.shape[-1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")
    pos_weight = (1 - y).sum() / y.sum().clamp_min(1)

    def closure() -> Any:
        optimizer.zero_grad()
        logits = x @ weight + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight)
        loss = loss + l2 * (weight * weight).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def concept_projector(
    model: Any,
    processor: Any,
    family: str,
    samples: Sequence[Sample],
    image_loader: ImageLoader,
    *,
    max_images: int = 1024,
    min_images: int = 5,
    l2: float = 1e-2,
    steps: int = 200,
    residual_scale: float = 0.25,
    seed: int = 0,
) -> ProjectorInit:
    """Start ``model``'s projector so that image tokens read as the words of what the image shows.

    For every concept the stage's labels give (:func:`image_concepts`: ``body_part=chest``,
    ``modality=CT``, ... with at least ``min_images`` images with it and without it among the images
    labelled for its kind), a logistic regression on the tower's standardized feature tokens (each token
    labelled with its image's label) says whether a token shows it. Hidden unit k of ``linear_1`` becomes
    concept k's logit (scaled so a typical positive token gives 1, folded as in
    :func:`standardize_projector`), and column k of ``linear_2`` becomes the language model's embedding of
    the concept's word (" chest", " CT"). After the GELU, a token then carries the sum of the word
    embeddings of the concepts it shows, which the pretrained language model can already read. The other
    hidden units keep a standardized random start whose output norm is ``residual_scale`` of the word
    embeddings', so training can still route anything else the image carries.
    """
    import torch

    projector, first, last = _linear_pair(model, family)
    refs = _image_refs(samples)
    labels = image_concepts(samples)
    keys = sorted(k for k in refs if labels.get(k))[:max_images]
    if not keys:
        raise InputError("projector_init: concepts needs samples with body_part or modality labels")
    images = [image_loader(refs[k]).convert("RGB") for k in keys]
    tokens = tower_tokens(model, processor, family, images)  # images, tokens, channels
    per_image = tokens.shape[1]
    flat = tokens.reshape(-1, tokens.shape[-1])
    mu, sigma = flat.mean(0), flat.std(0).clamp_min(1e-3)
    z = (tokens - mu) / sigma
    embeddings = model.get_input_embeddings().weight.detach().float()
    text_norm = float(embeddings.norm(dim=-1).mean())
    tokenizer = getattr(processor, "tokenizer", processor)
    concepts: list[tuple[str, Any, Any, Any]] = []  # name, unit weight, unit bias, output column
    accuracy: dict[str, float] = {}
    values = sorted({(kind, value) for found in labels.values() for kind, value in found.items()})
    for kind, value in values:
        rows = [i for i, k in enumerate(keys) if kind in labels[k]]
        y_image = torch.tensor([float(labels[keys[i]][kind] == value) for i in rows])
        positives = int(y_image.sum())
        if positives < min_images or len(rows) - positives < min_images:
            continue
        x = z[rows].reshape(-1, z.shape[-1])
        y = y_image.repeat_interleave(per_image)
        weight, bias = _fit_logistic(x, y, l2, steps)
        logits = (x @ weight + bias).reshape(len(rows), per_image)
        accuracy[f"{kind}={value}"] = float(((logits.mean(1) > 0).float() == y_image).float().mean())
        alpha = 1.0 / float(logits[y_image > 0].flatten().median().clamp_min(0.5))
        ids = tokenizer.encode(" " + value, add_special_tokens=False)
        word = embeddings[ids].sum(0)
        concepts.append((f"{kind}={value}", alpha * weight, alpha * bias, word / word.norm() * text_norm))
    if not concepts:
        raise InputError(f"projector_init: no concept has {min_images} images with it and without it")
    if len(concepts) > first.out_features:
        raise InputError(f"projector_init: {len(concepts)} concepts for {first.out_features} hidden units")
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        before = float(projector(flat.to(first.weight.dtype)).norm(dim=-1).mean())
        _standardized_random(first, mu, sigma, rng)
        k = len(concepts)
        unit_w = torch.stack([c[1] for c in concepts])
        first.weight[:k] = (unit_w / sigma).to(first.weight.dtype)
        if first.bias is not None:
            first.bias[:k] = (torch.cat([c[2] for c in concepts]) - unit_w @ (mu / sigma)).to(
                first.bias.dtype
            )
        # residual units: their share of the output at residual_scale of the word embeddings' norm
        last.weight.zero_()
        if last.bias is not None:
            last.bias.zero_()
        hidden = projector.act(first(flat.to(first.weight.dtype))).float()
        residual = torch.randn(last.weight.shape, generator=rng)[:, k:]
        norm = float((hidden[:, k:] @ residual.T).norm(dim=-1).mean())
        last.weight[:, k:] = (residual * (residual_scale * text_norm / max(norm, 1e-6))).to(last.weight.dtype)
        last.weight[:, :k] = torch.stack([c[3] for c in concepts], 1).to(last.weight.dtype)
        after = float(projector(flat.to(first.weight.dtype)).norm(dim=-1).mean())
    return ProjectorInit(len(images), before, after, text_norm, tuple(c[0] for c in concepts), accuracy)
