"""Training recipes: a YAML file → a validated :class:`Recipe` (pydantic), before anything loads.

A recipe names an ``output_dir``, a ``base_model`` spec (a local folder, a hub id, ``emma-tiny``, or
``tiny:<family>`` for a random tiny model built by :mod:`emma.model.tiny_families`), a ``seed``, the
canonical datasets it draws on (``{name: {path, split, weight, tasks, limit}}``) and an ordered list
of stages. Unknown keys, bad stage kinds, stages naming undefined datasets and missing dataset folders
are :class:`RecipeError` s with one-line messages.

Overrides (``--set key=value``) are applied to the raw YAML before validation: dotted keys walk mappings
and lists (``stages.0.learning_rate=1e-3``; a list item may also be named by its ``name``:
``stages.vqa.epochs=2``); the value is parsed as YAML (``1e-3`` → float, ``null`` → None, ``[a, b]`` →
list).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from emma.data.schema import TaskType
from emma.errors import InputError

StageKind = Literal["vision", "alignment", "instruction", "vqa", "grpo"]
STAGE_KINDS: tuple[str, ...] = ("vision", "alignment", "instruction", "vqa", "grpo")
SFT_KINDS: tuple[str, ...] = ("alignment", "instruction", "vqa")
TINY_PREFIX = "tiny:"


class RecipeError(InputError):
    """An invalid recipe file, override or dataset reference (one-line message)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraConfig(_Strict):
    """PEFT LoRA settings; ``quantize`` = "4bit"/"8bit" makes it QLoRA (bitsandbytes, CUDA only)."""

    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | str = "all-linear"
    quantize: Literal["4bit", "8bit"] | None = None
    # Tokens whose embedding rows train with the adapters (and their tied output rows): special tokens
    # the base language model never saw, e.g. an end-of-turn token it must learn to emit.
    trainable_tokens: list[str] = Field(default_factory=list)


class GRPOSettings(_Strict):
    """GRPO stage settings; ``reward_weights`` maps reward names (see emma.train.rewards) to weights."""

    num_generations: int = Field(4, ge=2)
    max_completion_length: int = Field(64, gt=0)
    reward_weights: dict[str, float] = Field(default_factory=dict)
    beta: float = Field(0.04, ge=0.0)
    temperature: float = Field(1.0, gt=0.0)


class DatasetConfig(_Strict):
    """A canonical dataset folder (emma.data.store) and how a recipe samples it."""

    path: Path
    split: str = "train"
    weight: float = Field(1.0, gt=0.0)
    tasks: list[TaskType] | None = None  # keep only these task types (None: all)
    limit: int | None = Field(None, gt=0)  # use at most this many samples (first ones, in store order)
    # The first user turn's text becomes prompt.format(question=text), e.g. the evaluation's short-answer
    # instruction "{question}\nAnswer the question using a single word or phrase." (None: as stored).
    prompt: str | None = None

    @field_validator("prompt")
    @classmethod
    def _has_question(cls, v: str | None) -> str | None:
        if v is not None and "{question}" not in v:
            raise ValueError("a dataset prompt must contain {question}")
        return v

    @field_validator("split")
    @classmethod
    def _never_test(cls, v: str) -> str:
        if v.strip().lower() == "test":
            raise ValueError("training never reads the test split")
        return v


class StageConfig(_Strict):
    """One training stage. ``datasets`` maps recipe dataset names to mixing weights (None: the
    dataset's own weight); a list of names is accepted too. Set ``max_steps`` to bound a stage by optimizer
    steps instead of ``epochs``."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    kind: StageKind
    datasets: dict[str, float | None]
    tasks: list[TaskType] | None = None  # stage-level task filter, on top of each dataset's own
    epochs: float = Field(1.0, gt=0.0)
    max_steps: int | None = Field(None, gt=0)
    learning_rate: float = Field(2e-5, gt=0.0)
    vision_learning_rate: float | None = Field(None, gt=0.0)
    batch_size: int = Field(1, gt=0)
    grad_accum: int = Field(1, gt=0)
    lora: LoraConfig | None = None
    train_vision: bool = False
    # with train_vision: only these submodules of the vision tower train (names relative to the tower,
    # e.g. [encoder.stages.3], a ResNet's last stage); the rest of a pretrained tower stays frozen, and
    # the whole tower stays in eval mode (its batch-norm statistics are the pretrained ones)
    vision_trainable: list[str] | None = None
    max_length: int = Field(2048, gt=0)
    save_steps: int = Field(500, gt=0)
    logging_steps: int = Field(10, gt=0)
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    gradient_checkpointing: bool = False
    # bf16 mixed precision: None = on CUDA when supported; true also on CPU (autocast; fast on CPUs
    # with AVX512-BF16/AMX), false = fp32 everywhere.
    bf16: bool | None = None
    max_samples: int | None = Field(None, gt=0)  # cap on the mixed sample list of this stage
    # "standardize": re-initialise a from-scratch projector for the frozen tower's feature statistics
    # before training; "concepts": image tokens start as the words of the labelled concepts (body part,
    # modality) the tower's features show (emma.train.projector_init); SFT stages only
    projector_init: Literal["standardize", "concepts"] | None = None
    grpo: GRPOSettings | None = None

    @field_validator("datasets", mode="before")
    @classmethod
    def _names_to_mapping(cls, v: Any) -> Any:
        if isinstance(v, list | tuple):
            return {str(name): None for name in v}
        return v

    @field_validator("datasets")
    @classmethod
    def _weights(cls, v: dict[str, float | None]) -> dict[str, float | None]:
        if not v:
            raise ValueError("a stage needs at least one dataset")
        for name, weight in v.items():
            if weight is not None and weight <= 0:
                raise ValueError(f"weight of dataset {name!r} must be > 0")
        return v

    @model_validator(mode="after")
    def _kind_settings(self) -> StageConfig:
        if self.kind == "grpo" and self.grpo is None:
            self.grpo = GRPOSettings()
        if self.kind != "grpo" and self.grpo is not None:
            raise ValueError(f"stage {self.name!r}: grpo settings given for a {self.kind} stage")
        if self.kind == "vision" and self.lora is not None:
            raise ValueError(f"stage {self.name!r}: a vision stage trains the tower itself; no lora")
        if self.vision_learning_rate is not None and not self.train_vision:
            raise ValueError(f"stage {self.name!r}: vision_learning_rate needs train_vision: true")
        if self.vision_trainable and not self.train_vision:
            raise ValueError(f"stage {self.name!r}: vision_trainable needs train_vision: true")
        return self


class Recipe(_Strict):
    """A whole training recipe (see module doc)."""

    output_dir: Path
    base_model: str = Field(min_length=1)
    seed: int = 0
    report_to: list[str] | None = None  # None: tensorboard (+ wandb when WANDB_PROJECT is set)
    datasets: dict[str, DatasetConfig]
    stages: list[StageConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _references(self) -> Recipe:
        seen: set[str] = set()
        for stage in self.stages:
            if stage.name in seen:
                raise ValueError(f"duplicate stage name {stage.name!r}")
            seen.add(stage.name)
            for name in stage.datasets:
                if name not in self.datasets:
                    known = ", ".join(sorted(self.datasets)) or "none"
                    raise ValueError(
                        f"stage {stage.name!r} uses undefined dataset {name!r} (defined: {known})"
                    )
        return self

    def stage_weight(self, stage: StageConfig, name: str) -> float:
        """The mixing weight of dataset ``name`` in ``stage``."""
        weight = stage.datasets[name]
        return self.datasets[name].weight if weight is None else weight

    def tiny_family(self) -> str | None:
        """The family of a ``tiny:<family>`` base model, else None."""
        if self.base_model.startswith(TINY_PREFIX):
            return self.base_model[len(TINY_PREFIX) :]
        return None


# ----------------------------------------------------------------------------------------- loading


def _describe(exc: ValidationError) -> str:
    errors = exc.errors()
    first = next((e for e in errors if e.get("type") == "extra_forbidden"), errors[0])  # typos first
    loc = ".".join(str(part) for part in first.get("loc", ()))
    msg = str(first.get("msg", "invalid"))
    if first.get("type") == "extra_forbidden":
        msg = "unknown key"
    msg = msg.removeprefix("Value error, ")
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    text = f"{loc}: {msg}" if loc else msg
    return " ".join(f"invalid recipe: {text}{more}".split())


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.key=value`` assignment to the raw recipe mapping in place."""
    key, sep, value = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"bad override {assignment!r}: expected key=value")
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            index = _list_index(node, part, where)
            if last:
                node[index] = _parse_value(value)
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = _parse_value(value)
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise RecipeError(f"bad override {key!r}: {'.'.join(parts[:i])} is not a mapping or list")


def _list_index(items: list[Any], part: str, where: str) -> int:
    if part.lstrip("-").isdigit():
        index = int(part)
        if not -len(items) <= index < len(items):
            raise RecipeError(f"bad override {where!r}: index out of range (0..{len(items) - 1})")
        return index
    for index, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return index
    raise RecipeError(f"bad override {where!r}: no list item named {part!r}")


def parse_recipe(raw: Any, overrides: list[str] | None = None, *, check_paths: bool = True) -> Recipe:
    """Validate a raw mapping (+ overrides) into a :class:`Recipe`; :class:`RecipeError` if invalid."""
    if not isinstance(raw, dict):
        raise RecipeError("invalid recipe: the top level must be a mapping")
    for assignment in overrides or []:
        apply_override(raw, assignment)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(_describe(exc)) from None
    if check_paths:
        check_datasets(recipe)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None, *, check_paths: bool = True) -> Recipe:
    """Read a YAML recipe, apply ``key=value`` overrides, validate; one-line :class:`RecipeError` s."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe not found: {path}") from None
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise RecipeError(f"recipe {path} is not valid YAML{where}") from None
    return parse_recipe(raw, overrides, check_paths=check_paths)


def check_datasets(recipe: Recipe) -> None:
    """Every dataset used by a stage is a folder with a manifest; else a one-line :class:`RecipeError`."""
    used = {name for stage in recipe.stages for name in stage.datasets}
    for name in sorted(used):
        cfg = recipe.datasets[name]
        if not cfg.path.is_dir():
            raise RecipeError(f"dataset {name!r} not found: {cfg.path} (import it with `emma data import`)")
        if not (cfg.path / "dataset.json").is_file():
            raise RecipeError(f"dataset {name!r} at {cfg.path} is not a canonical dataset (no dataset.json)")
