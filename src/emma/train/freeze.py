"""Which parameters train in each stage, per model family (module names differ between families).

Parts of a vision-language model (each family's ``FamilySpec.vision_modules`` / ``projector_modules`` in
:mod:`emma.model.families`; names in transformers 5.x, checked on the tiny models):

=================  ============================  ===============================================
family             vision tower                  projector / connector
=================  ============================  ===============================================
qwen2(.5)/3-VL     ``model.visual``              ``model.visual.merger`` (+ qwen3's
                                                 ``model.visual.deepstack_merger_list``)
idefics3           ``model.vision_model``        ``model.connector``
llava, gemma3,     ``model.vision_tower``        ``model.multi_modal_projector`` (+ LLaVA-OneVision's
llava_onevision,                                 ``model.image_newline``)
internvl, fast_vlm
=================  ============================  ===============================================

Everything else (``model.language_model`` / ``model.text_model``, ``lm_head``) is the language model.

Stages: ``alignment`` trains the projector only; ``instruction`` and ``vqa`` train projector + language
model (fully, or through LoRA adapters: :func:`lora_config`), and the vision tower when
``train_vision`` (at its own learning rate: :func:`param_groups`) — the whole tower, or only the submodules
``vision_trainable`` names under it (a pretrained tower's top block, e.g. ``encoder.stages.3`` of a ResNet).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from emma.errors import InputError
from emma.model.families import FAMILIES

Part = Literal["vision", "projector", "language"]
_PEFT_PREFIX = "base_model.model."
_LM_PREFIXES = ("model.language_model", "model.text_model")


@dataclass(frozen=True)
class TrainableSummary:
    """Parameter counts after :func:`apply_trainable` (or PEFT wrapping)."""

    trainable: int
    total: int
    by_part: dict[str, int]  # trainable parameters per part


def _parts(family: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(vision tower, projector) module prefixes of ``family`` (its :class:`FamilySpec`)."""
    spec = FAMILIES.get(family)
    if spec is None:
        raise InputError(f"no freeze policy for family {family!r}; known: {', '.join(FAMILIES)}")
    return spec.vision_modules, spec.projector_modules


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def part_of(name: str, family: str) -> Part:
    """The part a parameter (or module) name belongs to; PEFT's ``base_model.model.`` prefix is ignored."""
    vision, projector = _parts(family)
    name = name.removeprefix(_PEFT_PREFIX)
    if any(_under(name, p) for p in projector):
        return "projector"
    if any(_under(name, p) for p in vision):
        return "vision"
    return "language"


def projector_modules(family: str) -> list[str]:
    """Module names of the projector/connector (PEFT ``modules_to_save`` when it trains beside LoRA)."""
    return list(_parts(family)[1])


def vision_modules(family: str) -> list[str]:
    return list(_parts(family)[0])


def trains(part: Part, kind: str, train_vision: bool) -> bool:
    """Whether ``part`` trains (fully) in a stage of ``kind`` (without LoRA)."""
    if kind == "alignment":  # the vision tower too when it is trained from scratch (train_vision)
        return part == "projector" or (part == "vision" and train_vision)
    if kind in ("instruction", "vqa", "grpo"):
        return part != "vision" or train_vision
    raise InputError(f"unknown stage kind {kind!r}")


def vision_targets(family: str, vision_trainable: list[str] | None = None) -> list[str]:
    """The vision modules that train when a stage sets ``train_vision``: the tower, or the named
    submodules of it (``vision_trainable``, names relative to the tower)."""
    towers = vision_modules(family)
    if not vision_trainable:
        return towers
    if len(towers) != 1:
        raise InputError(f"vision_trainable needs a family with one vision tower; {family} has {towers}")
    return [f"{towers[0]}.{name.strip('.')}" for name in vision_trainable]


def summarize(model: Any, family: str) -> TrainableSummary:
    by_part: dict[str, int] = {"vision": 0, "projector": 0, "language": 0}
    trainable = total = 0
    for name, param in model.named_parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
            by_part[part_of(name, family)] += param.numel()
    return TrainableSummary(trainable=trainable, total=total, by_part=by_part)


def apply_trainable(
    model: Any, family: str, kind: str, train_vision: bool = False, vision_trainable: list[str] | None = None
) -> TrainableSummary:
    """Set ``requires_grad`` for full (non-LoRA) training of a stage; returns the counts.

    ``alignment``: projector only (+ vision tower when ``train_vision``: a tower trained from scratch,
    as emma-tiny's is, learns in alignment with the language model frozen); ``instruction`` / ``vqa``:
    projector + language model (+ vision tower when ``train_vision``, or only its ``vision_trainable``
    submodules). With LoRA use :func:`lora_config` instead (PEFT freezes the base weights).
    """
    targets = vision_targets(family, vision_trainable)
    if vision_trainable:
        _check_targets(model, targets)
    for name, param in model.named_parameters():
        part = part_of(name, family)
        on = trains(part, kind, train_vision)
        if on and part == "vision":
            on = any(_under(name.removeprefix(_PEFT_PREFIX), t) for t in targets)
        param.requires_grad_(on)
    return summarize(model, family)


def _check_targets(model: Any, targets: list[str]) -> None:
    names = {name.removeprefix(_PEFT_PREFIX) for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise InputError(f"vision_trainable: no module {missing[0]!r} in this model")


def lora_target_regex(model: Any, family: str, target_modules: list[str] | str = "all-linear") -> str:
    """A PEFT ``target_modules`` regex for the language model's decoder-layer linear layers only.

    ``"all-linear"``: every ``nn.Linear`` in the decoder layers; a list: those leaf names (``q_proj``...).
    """
    import torch

    _parts(family)
    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [target_modules]
    leaves: set[str] = set()
    for name, module in model.named_modules():
        name = name.removeprefix(_PEFT_PREFIX)
        if not any(_under(name, p + ".layers") for p in _LM_PREFIXES):
            continue
        if isinstance(module, torch.nn.Linear):
            leaves.add(name.rsplit(".", 1)[-1])
    if target_modules != "all-linear":
        wanted = set(target_modules)
        missing = wanted - leaves
        if missing:
            raise InputError(
                f"LoRA target modules {sorted(missing)} are not linear layers of the language model; "
                f"available: {sorted(leaves)}"
            )
        leaves = wanted
    if not leaves:
        raise InputError(f"no linear layers found in the language model of this {family} model")
    prefixes = "|".join(re.escape(p) for p in _LM_PREFIXES)
    names = "|".join(re.escape(leaf) for leaf in sorted(leaves))
    return rf"^(?:{prefixes})\.layers\.\d+\.(?:.*\.)?(?:{names})$"


def lora_config(
    model: Any,
    family: str,
    kind: str,
    *,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: list[str] | str = "all-linear",
    train_vision: bool = False,
    vision_trainable: list[str] | None = None,
) -> Any:
    """A ``peft.LoraConfig``: adapters on the language model, projector (± vision) as ``modules_to_save``."""
    from peft import LoraConfig

    if kind == "alignment":
        raise InputError("LoRA is for instruction/vqa stages; an alignment stage trains the projector fully")
    to_save = projector_modules(family)
    if train_vision:
        targets = vision_targets(family, vision_trainable)
        if vision_trainable:
            _check_targets(model, targets)
        to_save += targets
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_target_regex(model, family, target_modules),
        modules_to_save=to_save,
        bias="none",
        task_type="CAUSAL_LM",
    )


def token_ids(processor: Any, tokens: list[str]) -> list[int]:
    """Vocabulary ids of ``tokens`` (each must be one known token of the processor's tokenizer)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    ids: list[int] = []
    for token in tokens:
        found = tokenizer.convert_tokens_to_ids(token)
        if found is None or found == tokenizer.unk_token_id:
            raise InputError(f"trainable token {token!r} is not a token of this model's tokenizer")
        ids.append(int(found))
    return ids


_EMBEDDING_NAMES = ("embed_tokens", "word_embeddings", "wte.")


def train_token_rows(model: Any, ids: list[int]) -> Any:
    """Train only the embedding rows ``ids`` (and, when the output layer is tied to the embedding, the same
    output rows): the input embedding becomes trainable with a gradient hook that zeroes every other row.

    The rows are updated in place, so a LoRA merge keeps them, and an optimizer step leaves the other rows
    exactly as they were (zero gradient, no weight decay: see :func:`param_groups`). Returns the hook
    handle. (PEFT's trainable-token wrappers are not used: TRL's fused LM head reads the output weight
    directly and would bypass them.)
    """
    import torch

    weight = model.get_input_embeddings().weight
    mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    mask[ids] = 1.0
    weight.requires_grad_(True)
    return weight.register_hook(lambda grad: grad * mask.to(grad.dtype))


def param_groups(
    model: Any,
    family: str,
    learning_rate: float,
    vision_learning_rate: float | None = None,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups of the trainable parameters: the vision tower at its own LR if given.

    Biases, norm weights (1-D tensors) and input embeddings get no weight decay (an embedding trained row
    by row through :func:`train_token_rows` must leave its other rows untouched).
    """
    groups: dict[tuple[bool, bool], list[Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_vision = part_of(name, family) == "vision"
        is_embedding = any(key in name for key in _EMBEDDING_NAMES)
        groups.setdefault((is_vision, param.ndim >= 2 and not is_embedding), []).append(param)
    out: list[dict[str, Any]] = []
    for (is_vision, decays), params in sorted(groups.items()):
        lr = vision_learning_rate if is_vision and vision_learning_rate is not None else learning_rate
        out.append({"params": params, "lr": lr, "weight_decay": weight_decay if decays else 0.0})
    return out
