"""One supervised stage (alignment / instruction / vqa) on TRL's ``SFTTrainer``.

Why SFTTrainer (TRL 1.16) and how: it takes an instantiated (PEFT-wrapped) model, a custom
``data_collator`` and a processor as ``processing_class``; with ``skip_prepare_dataset`` and
``remove_unused_columns=False`` it hands our rows to :class:`~emma.train.collator.VLCollator` untouched
(its own VL collator would train on every token unless the template has ``{% generation %}`` markers,
which EMMA's templates do not). The dataset holds only sample indices: images are loaded in the collator,
so nothing is encoded twice. Freezing (:mod:`emma.train.freeze`) and LoRA wrapping are done here, before
the trainer, so the same policy applies to every family; ``create_optimizer`` is overridden only to give
the vision tower its own learning rate.

Layout of ``out_dir``: ``checkpoints/checkpoint-<step>`` (Trainer checkpoints every ``save_steps``;
with LoRA they hold the adapters + ``modules_to_save``), ``final/`` (a full model folder: LoRA merged
into the weights, processor saved beside it, loadable by :func:`emma.model.registry.load_model` and the
next stage), ``final/emma_stage.json`` (what trained). ``resume=True`` continues from the last
checkpoint with the same data order (Trainer restores optimizer, scheduler, RNG and skips seen batches);
a checkpoint already at ``max_steps`` is not trained on again: its weights become ``final/``
(:mod:`emma.train.checkpoints`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emma.data.formats import ImageLoader, to_trl
from emma.data.schema import Sample
from emma.errors import InputError
from emma.train.checkpoints import StrictResumeMixin, last_checkpoint, train_or_restore
from emma.train.collator import VLCollator
from emma.train.feature_cache import TowerFeatureCache
from emma.train.freeze import TrainableSummary, param_groups
from emma.train.prepare import mixed_bf16, prepare_model

if TYPE_CHECKING:
    from emma.train.recipe import StageConfig

CHECKPOINTS = "checkpoints"
FINAL = "final"
STAGE_INFO = "emma_stage.json"


@dataclass
class StageResult:
    """What a finished stage left behind."""

    final_dir: Path
    global_step: int
    train_loss: float | None
    samples_per_second: float | None
    log_history: list[dict[str, Any]] = field(default_factory=list)
    trainable: dict[str, Any] = field(default_factory=dict)


class SampleCollator:
    """Rows ``{"index": i}`` → ``to_trl(samples[i])`` → :class:`VLCollator` (images load lazily)."""

    def __init__(self, samples: Sequence[Sample], image_loader: ImageLoader, collator: VLCollator) -> None:
        self.samples = samples
        self.image_loader = image_loader
        self.collator = collator

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        examples = []
        for row in rows:
            sample = self.samples[int(row["index"])]
            examples.append({"id": sample.id, **to_trl(sample, self.image_loader)})
        return self.collator(examples)


def _trainer_class() -> type:
    import torch
    from trl import SFTTrainer

    class EmmaSFTTrainer(StrictResumeMixin, SFTTrainer):  # type: ignore[misc]
        """SFTTrainer with per-part learning rates, samples/s in every training log, and full-weight
        resume that loads the checkpoint's weights (:class:`~emma.train.checkpoints.StrictResumeMixin`)."""

        def __init__(self, *args: Any, family: str, vision_learning_rate: float | None, **kwargs: Any):
            self._family = family
            self._vision_lr = vision_learning_rate
            self._last_log: tuple[float, int] | None = None
            super().__init__(*args, **kwargs)

        def create_optimizer(self, model: Any = None) -> Any:
            if self.optimizer is None:
                a = self.args
                groups = param_groups(
                    self.model, self._family, a.learning_rate, self._vision_lr, a.weight_decay
                )
                self.optimizer = torch.optim.AdamW(
                    groups, lr=a.learning_rate, betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon
                )
            return self.optimizer

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs:
                now, step = time.monotonic(), self.state.global_step
                if self._last_log is not None and now > self._last_log[0] and step > self._last_log[1]:
                    a = self.args
                    per_step = a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size
                    logs["samples_per_second"] = round(
                        (step - self._last_log[1]) * per_step / (now - self._last_log[0]), 3
                    )
                self._last_log = (now, step)
            super().log(logs, start_time)

    return EmmaSFTTrainer


def _train_loss(output: Any) -> float | None:
    """Mean training loss of this ``train()`` call (None when nothing was trained: restored checkpoint)."""
    loss = getattr(output, "training_loss", None)
    return float(loss) if loss is not None else None


def run_sft_stage(
    stage: StageConfig,
    model_dir: Path,
    out_dir: Path,
    train_samples: Sequence[Sample],
    image_loader: ImageLoader,
    *,
    resume: bool = False,
    seed: int = 0,
    callbacks: list[Any] | None = None,
    report_to: list[str] | str | None = None,
    on_trainer: Callable[[Any], None] | None = None,
    feature_cache: TowerFeatureCache | None = None,
) -> StageResult:
    """Train one alignment / instruction / vqa stage; returns where its final model folder is.

    ``train_samples``: canonical samples (a list; an iterable is materialised) shown through
    ``image_loader`` (e.g. ``Dataset.open_image``). ``callbacks``: transformers ``TrainerCallback`` s.
    ``report_to``: Trainer integrations ("tensorboard", "wandb"; None: none). ``on_trainer``: called
    with the trainer before ``train()`` (benchmarks, tests). ``feature_cache``: where a frozen vision
    tower's per-image outputs are kept (:mod:`emma.train.feature_cache`; shared across stages by
    ``emma train``); a fresh one per stage when not given.
    """
    import datasets
    import torch
    from transformers import set_seed
    from trl import SFTConfig

    if stage.kind not in ("alignment", "instruction", "vqa"):
        raise InputError(
            f"stage {stage.name!r}: run_sft_stage trains alignment/instruction/vqa, not {stage.kind}"
        )
    samples = list(train_samples)
    if not samples:
        raise InputError(f"stage {stage.name!r}: no training samples")
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / CHECKPOINTS
    final_dir = out_dir / FINAL

    set_seed(seed)  # before LoRA init: adapter weights are random
    prepared = prepare_model(Path(model_dir), stage)
    model, processor, family = prepared.model, prepared.processor, prepared.family
    trainable = prepared.trainable
    projector_start = None
    if stage.projector_init is not None and not (resume and last_checkpoint(ckpt_dir) is not None):
        from emma.train.projector_init import concept_projector, standardize_projector

        start = concept_projector if stage.projector_init == "concepts" else standardize_projector
        projector_start = start(model, processor, family, samples, image_loader, seed=seed)
    model.train()
    cache = feature_cache if feature_cache is not None else TowerFeatureCache()
    # a frozen tower: eval mode, each image's features once; a partly trained one: eval mode
    uncache = cache.attach(model, family, partly_frozen=bool(stage.vision_trainable))

    cuda = torch.cuda.is_available()
    args = SFTConfig(
        output_dir=str(ckpt_dir),
        seed=seed,
        data_seed=seed,
        num_train_epochs=stage.epochs,
        max_steps=stage.max_steps or -1,
        learning_rate=stage.learning_rate,
        weight_decay=stage.weight_decay,
        warmup_steps=stage.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        per_device_train_batch_size=stage.batch_size,
        gradient_accumulation_steps=stage.grad_accum,
        activation_checkpointing=stage.gradient_checkpointing,
        logging_steps=stage.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=stage.save_steps,
        save_only_model=False,
        report_to=report_to if report_to is not None else "none",
        bf16=mixed_bf16(stage),
        use_cpu=not cuda,
        max_length=None,  # the collator truncates (and refuses to cut image tokens)
        packing=False,
        padding_free=False,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        disable_tqdm=False,
    )
    dataset = datasets.Dataset.from_dict({"index": list(range(len(samples)))})
    collator = SampleCollator(samples, image_loader, VLCollator(processor, family, stage.max_length))
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        callbacks=list(callbacks or []),
        family=family,
        vision_learning_rate=stage.vision_learning_rate,
    )
    if on_trainer is not None:
        on_trainer(trainer)
    checkpoint = last_checkpoint(ckpt_dir) if resume else None
    # A checkpoint already at max_steps (killed before final/ was written) is restored, not trained on.
    output = train_or_restore(trainer, checkpoint)
    if uncache is not None:
        uncache()

    trained = trainer.model
    if stage.lora is not None:
        trained = trained.merge_and_unload()
    trained.eval()
    final_dir.mkdir(parents=True, exist_ok=True)
    trained.save_pretrained(str(final_dir))
    processor.save_pretrained(str(final_dir))
    history = list(trainer.state.log_history)
    speed = next((h.get("train_samples_per_second") for h in reversed(history) if "train_runtime" in h), None)
    info = {
        "stage": stage.name,
        "kind": stage.kind,
        "family": family,
        "base": str(model_dir),
        "lora_merged": stage.lora is not None,
        "global_step": trainer.state.global_step,
        "resumed_from": checkpoint.name if checkpoint else None,
        "trainable": asdict(trainable),
        "tower_features": {
            "cached": uncache is not None and cache.enabled,
            "computed": cache.misses,
            "reused": cache.hits,
        },
        "projector_init": asdict(projector_start) if projector_start is not None else None,
    }
    (final_dir / STAGE_INFO).write_text(json.dumps(info, indent=1))
    return StageResult(
        final_dir=final_dir,
        global_step=trainer.state.global_step,
        train_loss=_train_loss(output),
        samples_per_second=speed,
        log_history=history,
        trainable=asdict(trainable),
    )


__all__ = ["SampleCollator", "StageResult", "TrainableSummary", "run_sft_stage"]
