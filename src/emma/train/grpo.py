"""Stage 4: GRPO with verifiable rewards (TRL ``GRPOTrainer``), on a vision-language model.

TRL 1.16's ``GRPOTrainer`` takes a VLM directly: ``processing_class`` = the model's processor, a
conversational ``prompt`` column whose user content holds ``{"type": "image"}`` parts, and an
``images`` column (PIL images, in the order of those parts). It generates with ``model.generate``
(no vLLM needed) and does not truncate prompts, so image tokens are never cut. Checked on CPU with
the tiny Qwen2.5-VL and Idefics3 models (tests/train/test_grpo.py).

Dataset columns beyond ``prompt`` / ``images`` are the reward columns of :mod:`emma.train.rewards`
(``task``, ``answer``, ``options``, ``answer_index``, ``boxes``, ``image_sizes``, ``model_sizes``,
``family``, ``response_format``). ``model_sizes`` are computed with the model's own processor, so
box rewards for Qwen2.5-VL (resized-pixel coordinates) match what the model saw.

Batching: ``stage.batch_size`` counts *prompts* per device step; each prompt gets
``grpo.num_generations`` completions, so the trainer's per-device batch is their product.

Trainable parts: LoRA adapters on the language model's decoder linears (+ the projector as
``modules_to_save``) when ``stage.lora`` is set (emma.train.freeze.lora_config), else the projector +
language model (+ vision tower with ``train_vision``). The saved ``out_dir/final`` is a full model
folder (LoRA merged) + processor, loadable by :func:`emma.model.registry.load_model`.
``resume=True`` continues from the last ``out_dir/checkpoint-*``; one already at ``max_steps`` is not
trained on again, its weights become ``final/`` (:mod:`emma.train.checkpoints`).
Not supported here: a separate ``vision_learning_rate`` for GRPO (rejected with a one-line error).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emma.data.formats import to_trl
from emma.data.schema import CoordSpace, Sample
from emma.errors import EmmaError, InputError
from emma.model.families import model_image_size
from emma.train.checkpoints import StrictResumeMixin, last_checkpoint, train_or_restore
from emma.train.recipe import StageConfig
from emma.train.rewards import build_rewards

log = logging.getLogger(__name__)

FINAL = "final"
REWARD_STATS_FILE = "reward_stats.json"
ImageLoader = Callable[[Any], Any]


class GRPOStageError(EmmaError):
    """A GRPO stage could not run (one-line message)."""


@dataclass
class GRPOResult:
    final_dir: Path
    steps: int
    reward_stats: dict[str, dict[str, int]] = field(default_factory=dict)
    last_reward: float | None = None
    trainable_params: int = 0


def _pairs(train_samples: Any) -> list[tuple[Sample, ImageLoader]]:
    pairs = getattr(train_samples, "pairs", None)
    if callable(pairs):
        return list(pairs())
    out = []
    for item in train_samples:
        if isinstance(item, tuple) and len(item) == 2:
            out.append(item)
        else:
            raise InputError("train_samples must be StageData or (Sample, image_loader) pairs")
    return out


def grpo_row(sample: Sample, loader: ImageLoader, family: str, processor: Any = None) -> dict[str, Any]:
    """One GRPO dataset row: the prompt (without the answer), its images, and the reward columns."""
    record = to_trl(sample, loader, add_answer=False)
    messages = list(record["messages"])
    answer = sample.gold.answer
    while messages and messages[-1]["role"] == "assistant":
        last = messages.pop()
        if answer is None:
            answer = "".join(p.get("text", "") for p in last["content"] if p.get("type") == "text")
    images = record["images"]
    # Images an assistant turn showed were dropped with it; keep only those of the prompt's parts.
    n_shown = sum(1 for m in messages for p in m["content"] if p.get("type") == "image")
    images = images[:n_shown]
    sizes = [[int(im.width), int(im.height)] for im in images]
    model_sizes = [list(model_image_size(family, w, h, processor)) for w, h in sizes]
    boxes = []
    for box in sample.gold.boxes:
        if box.image_index < len(sizes):
            w, h = sizes[box.image_index]
            px = box.to_space(CoordSpace.PIXEL, w, h)
            boxes.append([px.x1, px.y1, px.x2, px.y2, float(box.image_index)])
    return {
        "prompt": messages,
        "images": images,
        "task": sample.task.value,
        "answer": answer,
        "options": sample.gold.options,
        "answer_index": sample.gold.answer_index,
        "boxes": boxes,
        "image_sizes": sizes,
        "model_sizes": model_sizes,
        "family": family,
        "response_format": str(sample.meta.extra.get("response_format", "text")),
    }


def _trainer_class() -> type:
    from trl import GRPOTrainer

    class EmmaGRPOTrainer(StrictResumeMixin, GRPOTrainer):  # type: ignore[misc]
        """GRPOTrainer whose full-weight resume loads the checkpoint's weights (see StrictResumeMixin)."""

    return EmmaGRPOTrainer


def run_grpo_stage(
    stage: StageConfig,
    model_dir: Path,
    out_dir: Path,
    train_samples: Any,
    resume: bool = False,
    seed: int = 0,
    *,
    extra_rewards: Sequence[Callable[..., list[float | None]]] = (),
    report_to: Sequence[str] | None = None,
) -> GRPOResult:
    """Run one GRPO stage from ``model_dir``; write ``out_dir/final`` (merged model + processor).

    ``extra_rewards``: more TRL reward functions (weight 1 each), added to the recipe's rewards.
    """
    import torch
    from datasets import Dataset
    from trl import GRPOConfig

    from emma.train.feature_cache import pin_tower_eval
    from emma.train.freeze import summarize
    from emma.train.prepare import mixed_bf16, prepare_model
    from emma.train.progress import default_report_to

    settings = stage.grpo
    if stage.kind != "grpo" or settings is None:
        raise GRPOStageError(f"stage {stage.name!r} is a {stage.kind} stage, not grpo")
    if stage.vision_learning_rate is not None:
        raise GRPOStageError(f"stage {stage.name!r}: vision_learning_rate is not supported for GRPO stages")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    prepared = prepare_model(model_dir, stage, wrap=False)  # TRL applies the LoRA config itself
    model, processor, family = prepared.model, prepared.processor, prepared.family
    rows = [grpo_row(s, loader, family, processor) for s, loader in _pairs(train_samples)]
    if not rows:
        raise GRPOStageError(f"stage {stage.name!r}: no training samples")
    dataset = Dataset.from_list(rows)

    funcs, weights, stats = build_rewards(settings.reward_weights or None)
    all_funcs: list[Any] = [*funcs, *extra_rewards]
    all_weights = [*weights, *([1.0] * len(extra_rewards))]

    peft_config = prepared.peft_config
    model.train()

    args = GRPOConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=stage.batch_size * settings.num_generations,
        gradient_accumulation_steps=stage.grad_accum,
        num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length,
        temperature=settings.temperature,
        beta=settings.beta,
        reward_weights=all_weights,
        learning_rate=stage.learning_rate,
        num_train_epochs=stage.epochs,
        max_steps=stage.max_steps or -1,
        warmup_steps=stage.warmup_ratio,  # transformers 5: a value < 1 is a ratio of the total steps
        weight_decay=stage.weight_decay,
        logging_steps=stage.logging_steps,
        save_strategy="steps",
        save_steps=stage.save_steps,
        seed=seed,
        data_seed=seed,
        bf16=mixed_bf16(stage),
        use_cpu=not cuda,
        report_to=default_report_to(report_to),
        **({"gradient_checkpointing": True} if stage.gradient_checkpointing else {}),
    )
    try:
        trainer = _trainer_class()(
            model=model,
            reward_funcs=all_funcs,
            args=args,
            train_dataset=dataset,
            processing_class=processor,
            peft_config=peft_config,
        )
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise GRPOStageError(
            f"GRPOTrainer cannot run this {family} model: {str(exc).splitlines()[0]}"
        ) from exc
    trainable = summarize(trainer.model, family).trainable
    # a frozen (or partly trained) pretrained tower keeps its batch-norm statistics: eval mode throughout
    unpin = pin_tower_eval(trainer.model, family, partly_frozen=bool(stage.vision_trainable))
    checkpoint = last_checkpoint(out_dir) if resume else None
    # A checkpoint already at max_steps (killed before final/ was written) is restored, not trained on.
    train_or_restore(trainer, checkpoint)
    if unpin is not None:
        unpin()

    final = out_dir / FINAL
    trained = trainer.model
    if hasattr(trained, "merge_and_unload"):
        trained = trained.merge_and_unload()
    trained.save_pretrained(str(final))
    processor.save_pretrained(str(final))
    (out_dir / REWARD_STATS_FILE).write_text(json.dumps(stats.as_dict(), indent=1), encoding="utf-8")
    history = trainer.state.log_history
    rewards = [e["reward"] for e in history if isinstance(e.get("reward"), (int, float))]
    return GRPOResult(
        final_dir=final,
        steps=int(trainer.state.global_step),
        reward_stats=stats.as_dict(),
        last_reward=float(rewards[-1]) if rewards else None,
        trainable_params=trainable,
    )
