"""Resuming a stage from its last Trainer checkpoint, including one taken at the very last step.

Why this exists: transformers' ``Trainer.train(resume_from_checkpoint=...)`` restores ``global_step``
and then re-enters the epoch loop whenever the checkpoint is not at an epoch boundary
(``epochs_trained = global_step // steps_per_epoch`` < ``num_train_epochs``). The "stop at
``max_steps``" test lives in ``DefaultFlowCallback.on_step_end``, i.e. *after* an optimizer step, so
resuming from a checkpoint already at ``max_steps`` (a run killed after its last save but before
``final/`` was written) trains one more step: ``global_step == max_steps + 1`` and the weights differ
from the uninterrupted run. :func:`train_or_restore` does not call ``train()`` for such a checkpoint:
it loads the checkpoint's weights and trainer state into the trainer, so the caller writes ``final/``
from exactly what the uninterrupted run would have ended with.

Mid-run resume of a full-weight (non-LoRA) model: Trainer's own weight loader silently loads nothing
for models whose saved keys are renamed on load (Qwen2.5-VL); :class:`StrictResumeMixin` (mixed into
EMMA's SFT and GRPO trainers) loads such checkpoints through :func:`load_full_weights` instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TRAINER_STATE = "trainer_state.json"


def last_checkpoint(folder: Path) -> Path | None:
    """The ``checkpoint-<step>`` folder with the highest step in ``folder`` (None if none / no folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[-1])) if found else None


def _saved_state(checkpoint: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(checkpoint) / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_finished(checkpoint: Path, max_steps: int) -> bool:
    """Whether ``checkpoint`` was saved at (or past) the end of training.

    ``max_steps``: the run's ``TrainingArguments.max_steps``; when it is not positive (epoch-based
    training) the total the checkpointed run computed (``trainer_state.json`` ``max_steps``) is used.
    """
    state = _saved_state(checkpoint)
    if state is None:
        return False
    step = int(state.get("global_step") or 0)
    total = max_steps if max_steps > 0 else int(state.get("max_steps") or 0)
    return total > 0 and step >= total


def load_full_weights(model: Any, checkpoint: Path) -> None:
    """Copy a full-weight checkpoint's weights into ``model`` (in place, strictly).

    Not Trainer's ``_load_from_checkpoint``: it calls ``load_state_dict(strict=False)`` on the raw
    file, whose keys are in the saved (legacy) layout for models with a key conversion mapping
    (Qwen2.5-VL saves ``model.layers.*`` / ``visual.*``, the module has ``model.language_model.*`` /
    ``model.visual.*``), so nothing would load, silently. ``from_pretrained`` applies the mapping;
    then every tensor is copied with ``strict=True`` (a mismatch raises instead of being skipped).
    """
    import torch

    dtype = next(model.parameters()).dtype
    saved = type(model).from_pretrained(str(checkpoint), dtype=dtype, device_map="cpu")
    with torch.no_grad():
        model.load_state_dict(saved.state_dict(), strict=True)
    del saved


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config")


class StrictResumeMixin:
    """Mix into a transformers ``Trainer`` subclass (before it): full-weight resume loads correctly.

    ``Trainer.train(resume_from_checkpoint=...)`` restores weights through ``_load_from_checkpoint``;
    for a full (non-PEFT) model this routes to :func:`load_full_weights` (key renaming + strict), so a
    resumed run continues from the checkpoint's weights instead of silently keeping the start weights
    while restoring the checkpoint's optimizer and scheduler. PEFT models (adapters: ``load_adapter``
    maps the keys), FSDP and SageMaker MP keep Trainer's own loader.
    """

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        target = self.model if model is None else model  # type: ignore[attr-defined]
        distributed = getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False)
        if _is_peft(target) or distributed:
            super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
            return
        load_full_weights(target, Path(resume_from_checkpoint))


def _load_weights(trainer: Any, checkpoint: Path) -> None:
    """Load a checkpoint's trained weights into ``trainer.model`` (PEFT: Trainer's own loader)."""
    model = trainer.model
    if _is_peft(model):
        trainer._load_from_checkpoint(str(checkpoint))
    else:
        load_full_weights(model, checkpoint)


def train_or_restore(trainer: Any, checkpoint: Path | None) -> Any | None:
    """``trainer.train(resume_from_checkpoint=checkpoint)``, unless that checkpoint is already finished.

    Finished (:func:`is_finished`): no step is trained; the checkpoint's model weights (full weights or
    LoRA adapters + ``modules_to_save``) are loaded into ``trainer.model`` and its ``trainer_state.json``
    becomes ``trainer.state`` (``global_step``, ``log_history``). Returns ``None`` then (there is no
    ``TrainOutput``), else what ``train()`` returned.
    """
    if checkpoint is None or not is_finished(checkpoint, int(trainer.args.max_steps)):
        return trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    from transformers.trainer_callback import TrainerState

    _load_weights(trainer, Path(checkpoint))
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE))
    return None


__all__ = ["StrictResumeMixin", "is_finished", "last_checkpoint", "load_full_weights", "train_or_restore"]
