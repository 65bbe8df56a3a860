"""Vision pretraining stage (``kind: vision``): teach a from-scratch vision tower what its images show.

A small vision tower trained from scratch learns very little through a frozen language model: each
caption step costs a full LM forward/backward and carries one image's worth of signal, so after an
alignment stage the tower barely tells images apart (emma-tiny's first candidate: caption loss 2.70 with
the right image, 2.77 with another train image; ``scripts/image_reliance.py``). This stage trains the tower and the connector directly and cheaply, with
no language model in the loop: the mean of the image's connector outputs (the very vectors the LM will
read) → a linear head → the words of the texts paired with that image (multi-label, binary cross-entropy;
the bag-of-words objective of CatLIP, Mehta et al. 2024), plus which image it is (softmax over the
stage's images, instance discrimination): the words alone barely beat their base rates at first, and the
identity term gives every image distinct features quickly. Every image is seen once per epoch, with mild
random crops, rotations and contrast changes (never flips: left/right matters in radiology).

- Labels: the stage's samples are grouped by image (SHA-256, else path); an image's text is all of its
  samples' assistant turns. The vocabulary is the words (3+ letters, no stop words) used by at least
  ``MIN_IMAGES`` images, most frequent first, at most ``MAX_VOCAB``.
- Trained: the vision tower + connector (:mod:`emma.train.freeze` parts); the LM never changes and the
  head is discarded. ``final/`` is a full model folder (the next stage's input).
- Needs a family whose ``get_image_features`` returns per-image token features ``(images, tokens,
  hidden)`` (Idefics3/SmolVLM, LLaVA, Gemma 3, ...); others get a one-line error.
- Resumable: a checkpoint after every epoch (trainable weights, head, optimizer, scheduler, epoch);
  epoch ``e`` visits images in an order and with augmentations drawn from ``(seed, e)`` alone, so a
  resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageEnhance

from emma.data.formats import ImageLoader
from emma.data.schema import ImageRef, Sample
from emma.errors import InputError
from emma.train.freeze import part_of, summarize
from emma.train.prepare import mixed_bf16

if TYPE_CHECKING:
    from emma.train.recipe import StageConfig

CHECKPOINTS = "checkpoints"
FINAL = "final"
STAGE_INFO = "emma_stage.json"
MIN_IMAGES = 2
MAX_VOCAB = 2048
_WORD = re.compile(r"[a-z][a-z0-9-]{2,}")
_STOP = frozenset(
    [
        "the",
        "and",
        "are",
        "there",
        "this",
        "that",
        "with",
        "was",
        "were",
        "for",
        "from",
        "into",
        "onto",
        "over",
        "under",
        "what",
        "which",
        "where",
        "who",
        "how",
        "why",
        "when",
        "image",
        "images",
        "medical",
        "shown",
        "shows",
        "seen",
        "see",
        "any",
        "not",
        "does",
        "did",
        "has",
        "have",
        "had",
        "been",
        "being",
        "its",
        "their",
        "can",
        "could",
        "would",
        "should",
        "may",
        "might",
        "will",
        "use",
        "used",
        "using",
        "other",
        "than",
        "then",
        "also",
        "only",
        "more",
        "most",
        "less",
        "some",
        "such",
        "very",
        "about",
        "above",
        "below",
        "between",
        "both",
        "each",
        "few",
        "all",
    ]
)


@dataclass
class VisionPretrainResult:
    """What a finished vision stage left behind."""

    final_dir: Path
    epochs: int
    images: int
    vocabulary: int
    train_loss: float | None
    label_recall_at_10: float | None
    log_history: list[dict[str, Any]] = field(default_factory=list)
    trainable: dict[str, Any] = field(default_factory=dict)


def words(text: str) -> set[str]:
    """The content words of ``text`` (lower case, 3+ characters, no stop words)."""
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP}


def _key(ref: ImageRef) -> str:
    return ref.sha256 or str(ref.path)


def image_texts(samples: Sequence[Sample]) -> tuple[list[ImageRef], list[set[str]]]:
    """Distinct images of ``samples`` (first-seen order) and the content words of their assistant turns."""
    refs: dict[str, ImageRef] = {}
    bags: dict[str, set[str]] = {}
    for sample in samples:
        said = set().union(*(words(t.content) for t in sample.turns if t.role == "assistant"))
        for ref in sample.images:
            key = _key(ref)
            refs.setdefault(key, ref)
            bags.setdefault(key, set()).update(said)
    keys = list(refs)
    return [refs[k] for k in keys], [bags[k] for k in keys]


def vocabulary(
    bags: Sequence[set[str]], min_images: int = MIN_IMAGES, max_size: int = MAX_VOCAB
) -> list[str]:
    """Words in at least ``min_images`` bags, most frequent first (ties alphabetical), at most ``max_size``."""
    df = Counter(w for bag in bags for w in bag)
    ranked = sorted((w for w, n in df.items() if n >= min_images), key=lambda w: (-df[w], w))
    return ranked[:max_size]


def augment(image: Image.Image, rng: random.Random) -> Image.Image:
    """Mild, label-preserving changes: crop to 90–100 % of the side, ±4° rotation, ±15 % contrast and
    brightness. No flips (laterality is part of the labels)."""
    w, h = image.size
    scale = rng.uniform(0.9, 1.0)
    cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    out = image.crop((x, y, x + cw, y + ch)).rotate(rng.uniform(-4.0, 4.0), resample=Image.BILINEAR)
    out = ImageEnhance.Contrast(out).enhance(rng.uniform(0.85, 1.15))
    return ImageEnhance.Brightness(out).enhance(rng.uniform(0.85, 1.15))


def _features(model: Any, pixel_inputs: dict[str, Any], family: str) -> Any:
    """Per-image mean of the connector outputs: ``(images, hidden)`` (one image per row of the batch)."""
    import torch

    out = model.model.get_image_features(**pixel_inputs)
    feats = getattr(out, "pooler_output", None)
    if feats is None and not isinstance(out, tuple | list):
        feats = getattr(out, "last_hidden_state", out)
    if isinstance(feats, tuple | list) and feats and all(getattr(f, "dim", lambda: 0)() == 2 for f in feats):
        return torch.stack([f.float().mean(dim=0) for f in feats])  # per image: (tokens, hidden)
    if getattr(feats, "dim", lambda: 0)() == 3:
        return feats.float().mean(dim=1)
    raise InputError(
        f"vision pretraining needs per-image token features from get_image_features; family {family!r} "
        "returns another layout"
    )


def _pixels(processor: Any, images: list[Image.Image]) -> dict[str, Any]:
    batch = processor.image_processor([[im] for im in images], return_tensors="pt")
    return {k: v for k, v in batch.items() if k in ("pixel_values", "pixel_attention_mask")}


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    torch.save(state, tmp)
    tmp.replace(path)


def _last_checkpoint(folder: Path) -> Path | None:
    found = sorted(folder.glob("epoch-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    return found[-1] if found else None


def run_vision_stage(
    stage: StageConfig,
    model_dir: str | Path,
    out_dir: str | Path,
    train_samples: Sequence[Sample],
    image_loader: ImageLoader,
    *,
    resume: bool = False,
    seed: int = 0,
) -> VisionPretrainResult:
    """Train the vision tower + connector of ``model_dir`` on the images of ``train_samples`` (see module doc)."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from transformers import get_cosine_schedule_with_warmup, set_seed

    from emma.model.registry import load_model

    refs, bags = image_texts(train_samples)
    vocab = vocabulary(bags)
    if not refs or not vocab:
        raise InputError(f"stage {stage.name!r}: no images with shared words to pretrain the vision tower on")
    index = {w: i for i, w in enumerate(vocab)}
    targets = torch.zeros(len(refs), len(vocab), dtype=torch.bool)  # 1 byte a label: bounded memory
    for row, bag in enumerate(bags):
        for w in bag:
            if w in index:
                targets[row, index[w]] = True

    set_seed(seed)
    loaded = load_model(
        str(model_dir), device="cpu" if not torch.cuda.is_available() else "auto", dtype="fp32"
    )
    model, processor, family = loaded.model, loaded.processor, loaded.family
    params = []
    for name, param in model.named_parameters():
        trains = part_of(name, family) in ("vision", "projector")
        param.requires_grad_(trains)
        if trains:
            params.append(param)
    trainable = summarize(model, family)
    device = next(iter(params)).device
    probe = {k: v.to(device) for k, v in _pixels(processor, [image_loader(refs[0]).convert("RGB")]).items()}
    with torch.no_grad():
        try:
            width = int(_features(model, probe, family).shape[-1])
        except (TypeError, AttributeError, ValueError, RuntimeError) as exc:  # e.g. needs image_grid_thw
            raise InputError(
                f"vision pretraining does not support family {family!r} (get_image_features: "
                f"{type(exc).__name__})"
            ) from None
    head = torch.nn.Linear(width, len(vocab) + len(refs)).to(device)  # words, then image identity
    optimizer = torch.optim.AdamW(
        [{"params": params}, {"params": head.parameters()}],
        lr=stage.learning_rate,
        weight_decay=stage.weight_decay,
    )
    epochs = max(1, math.ceil(stage.epochs))
    per_epoch = math.ceil(len(refs) / stage.batch_size)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, round(stage.warmup_ratio * epochs * per_epoch), epochs * per_epoch
    )

    out = Path(out_dir)
    ckpt_dir = out / CHECKPOINTS
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if resume and (ckpt := _last_checkpoint(ckpt_dir)) is not None:
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["trainable"], strict=False)
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = int(state["epoch"]), list(state["history"])

    def image(i: int) -> Image.Image:  # read when needed: memory stays bounded by the batch
        return image_loader(refs[i]).convert("RGB")

    use_bf16 = mixed_bf16(stage)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    bar = Progress(
        TextColumn(f"[bold]{stage.name}[/] epoch {{task.fields[epoch]}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
        transient=False,
    )
    started = time.perf_counter()
    step = start_epoch * per_epoch
    with bar:
        task = bar.add_task(
            "vision", total=epochs * per_epoch, completed=step, epoch=start_epoch + 1, loss="-"
        )
        for epoch in range(start_epoch, epochs):
            rng = random.Random(f"{seed}:{stage.name}:{epoch}")
            order = list(range(len(refs)))
            rng.shuffle(order)
            total = 0.0
            for b in range(0, len(order), stage.batch_size):
                rows = order[b : b + stage.batch_size]
                inputs = {
                    k: v.to(device)
                    for k, v in _pixels(processor, [augment(image(i), rng) for i in rows]).items()
                }
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    logits = head(_features(model, inputs, family))
                logits = logits.float()
                words_loss = loss_fn(logits[:, : len(vocab)], targets[rows].to(device).float())
                which = torch.tensor(rows, device=device)
                loss = words_loss + torch.nn.functional.cross_entropy(logits[:, len(vocab) :], which)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params + list(head.parameters()), 1.0)
                optimizer.step()
                scheduler.step()
                step += 1
                total += float(loss.detach()) * len(rows)
                bar.update(task, advance=1, epoch=epoch + 1, loss=f"{float(loss.detach()):.4f}")
            history.append(
                {
                    "epoch": epoch + 1,
                    "step": step,
                    "loss": total / len(order),
                    "learning_rate": scheduler.get_last_lr()[0],
                }
            )
            trainable_state = {
                k: v for k, v in model.state_dict().items() if part_of(k, family) != "language"
            }
            _save_checkpoint(
                ckpt_dir / f"epoch-{epoch + 1}.pt",
                {
                    "trainable": trainable_state,
                    "head": head.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch + 1,
                    "history": history,
                },
            )
            for old in ckpt_dir.glob("epoch-*.pt"):
                if old.stem != f"epoch-{epoch + 1}":
                    old.unlink()

    recall = _recall_at_10(model, head, processor, family, image, targets, device)
    runtime = time.perf_counter() - started
    history.append(
        {
            "step": step,
            "train_runtime": runtime,
            "train_loss": history[-1]["loss"] if history else None,
            "label_recall_at_10": recall,
        }
    )
    model.eval()
    final_dir = out / FINAL
    final_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(final_dir))
    processor.save_pretrained(str(final_dir))
    info = {
        "stage": stage.name,
        "kind": stage.kind,
        "family": family,
        "base": str(model_dir),
        "images": len(refs),
        "vocabulary": vocab,
        "trainable": asdict(trainable),
    }
    (final_dir / STAGE_INFO).write_text(json.dumps(info, indent=1))
    return VisionPretrainResult(
        final_dir=final_dir,
        epochs=epochs,
        images=len(refs),
        vocabulary=len(vocab),
        train_loss=history[-2]["loss"] if len(history) > 1 else None,
        label_recall_at_10=recall,
        log_history=history,
        trainable=asdict(trainable),
    )


def _recall_at_10(
    model: Any, head: Any, processor: Any, family: str, image: Any, targets: Any, device: Any
) -> float:
    """Mean over images of (true labels among the 10 highest scores) / min(10, true labels), no augmentation."""
    import torch

    model.eval()
    hits: list[float] = []
    with torch.no_grad():
        for b in range(0, int(targets.shape[0]), 16):
            inputs = {
                k: v.to(device)
                for k, v in _pixels(
                    processor, [image(i) for i in range(b, min(b + 16, int(targets.shape[0])))]
                ).items()
            }
            scores = head(_features(model, inputs, family))[:, : targets.shape[1]]
            top = scores.topk(min(10, targets.shape[1]), dim=-1).indices.cpu()
            for row, idx in zip(range(b, b + len(top)), top, strict=True):
                true = int(targets[row].sum())
                if true:
                    hits.append(float(targets[row, idx].sum()) / min(10, true))
    model.train()
    return sum(hits) / len(hits) if hits else 0.0


__all__ = ["VisionPretrainResult", "augment", "image_texts", "run_vision_stage", "vocabulary", "words"]
