"""Run a recipe: its stages in order, each starting from the previous stage's ``final`` model folder.

Layout of ``recipe.output_dir``::

    recipe.json                 the validated recipe (overrides applied), written at start
    <stage name>/               one folder per stage (the stage function's ``out_dir``)
        final/                  the model folder the next stage loads (written by the stage function)
        checkpoint-*/           trainer checkpoints (``--resume`` continues from the last one)
        training_summary.json   loss curve, samples/s, ... (emma.train.progress)
        loss.png
        stage_done.json         written last: the stage is finished and is never redone

Everything that can be checked is checked before any model loads: the recipe (pydantic), the dataset
folders, each pending stage's data (splits, task filters, non-empty) and the base model spec. Without
``resume`` a stage folder holding an unfinished run is an error (pass ``--resume`` or remove it).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emma.train.data import StageData, stage_data
from emma.train.progress import RichProgressCallback, default_report_to, write_summary
from emma.train.recipe import Recipe, RecipeError, StageConfig, check_datasets

STAGE_DONE = "stage_done.json"
FINAL = "final"
RECIPE_SNAPSHOT = "recipe.json"


@dataclass
class StageOutcome:
    name: str
    kind: str
    final_dir: Path
    skipped: bool  # already finished before this run
    samples: int = 0
    seconds: float = 0.0


@dataclass
class RecipeResult:
    output_dir: Path
    final_dir: Path  # the last stage's final model folder
    stages: list[StageOutcome] = field(default_factory=list)


def resolve_base_model(spec: str) -> Path:
    """The local folder of the recipe's base model: any model spec but ``openai:`` (``tiny:<family>``,
    ``emma-tiny:init``, ``emma-tiny``, a folder, or a hub id downloaded through the hub cache)."""
    from emma.model.registry import ModelSpecError, parse_spec, resolve_folder

    try:
        return resolve_folder(parse_spec(spec))
    except ModelSpecError as exc:
        raise RecipeError(
            f"base_model must name local weights (a folder, hub id, emma-tiny or tiny:<family>): {exc}"
        ) from None


def is_done(stage_dir: Path) -> bool:
    return (stage_dir / STAGE_DONE).is_file()


def _drop_tqdm(trainer: Any) -> None:
    from transformers.trainer_callback import ProgressCallback

    trainer.remove_callback(ProgressCallback)


def _run_stage(
    recipe: Recipe,
    stage: StageConfig,
    model_dir: Path,
    stage_dir: Path,
    data: StageData,
    resume: bool,
    feature_cache: Any,
) -> Any:
    """Run one stage: the one place that knows each stage kind's entry point and what it is given.

    Every kind gets ``(stage, model_dir, stage_dir, <its data>, resume=, seed=)``; SFT and vision stages
    take the samples with one image loader, GRPO the :class:`StageData` (it pairs each sample with its
    dataset's loader). SFT stages also get the rich progress bar and the run's tower-feature cache.
    """
    report_to = default_report_to(recipe.report_to)
    if stage.kind == "grpo":
        from emma.train.grpo import run_grpo_stage

        return run_grpo_stage(
            stage, model_dir, stage_dir, data, resume=resume, seed=recipe.seed, report_to=report_to
        )
    if stage.kind == "vision":
        from emma.train.vision_pretrain import run_vision_stage

        return run_vision_stage(
            stage, model_dir, stage_dir, data.samples, data.ref_loader(), resume=resume, seed=recipe.seed
        )
    from emma.train.sft import run_sft_stage

    return run_sft_stage(
        stage,
        model_dir,
        stage_dir,
        data.samples,
        data.ref_loader(),
        resume=resume,
        seed=recipe.seed,
        callbacks=[RichProgressCallback(stage=stage.name)],  # the rich bar replaces transformers' tqdm
        on_trainer=_drop_tqdm,
        report_to=report_to,
        feature_cache=feature_cache,  # a frozen tower's features, computed once per run
    )


def _jsonable(value: Any) -> Any:
    if value is None:
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        data = dataclasses.asdict(value)
        data.pop("log_history", None)  # kept in training_summary.json
        return json.loads(json.dumps(data, default=str))
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return json.loads(json.dumps(dump(mode="json"), default=str))
    return json.loads(json.dumps(value, default=str))


def _trainer_log_history(stage_dir: Path) -> list[dict[str, Any]]:
    """``log_history`` from the newest ``trainer_state.json`` under ``stage_dir`` (empty if none)."""
    states = sorted(stage_dir.rglob("trainer_state.json"), key=lambda p: p.stat().st_mtime)
    for path in reversed(states):
        try:
            history = json.loads(path.read_text(encoding="utf-8")).get("log_history", [])
        except (OSError, ValueError):
            continue
        if isinstance(history, list):
            return history
    return []


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    tmp.replace(path)


def _has_unfinished_run(stage_dir: Path) -> bool:
    return stage_dir.is_dir() and any(stage_dir.iterdir()) and not is_done(stage_dir)


def run_recipe(
    recipe: Recipe, resume: bool = False, *, log: Callable[[str], None] | None = None
) -> RecipeResult:
    """Run the recipe's stages in order (see module doc); finished stages are skipped, never redone."""
    say = log or (lambda _msg: None)
    check_datasets(recipe)
    out = Path(recipe.output_dir)
    stage_dirs = [out / stage.name for stage in recipe.stages]
    pending = [i for i, d in enumerate(stage_dirs) if not is_done(d)]
    if not resume:
        for i in pending:
            if _has_unfinished_run(stage_dirs[i]):
                raise RecipeError(
                    f"stage {recipe.stages[i].name!r} has an unfinished run in {stage_dirs[i]}; "
                    "pass --resume to continue it or remove the folder"
                )
    # Validate each pending stage's data and the base model before any training starts.
    data: dict[int, StageData] = {i: stage_data(recipe, recipe.stages[i], stage_index=i) for i in pending}
    base = resolve_base_model(recipe.base_model)

    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / RECIPE_SNAPSHOT, recipe.model_dump(mode="json"))
    result = RecipeResult(output_dir=out, final_dir=base)
    model_dir = base
    from emma.train.feature_cache import TowerFeatureCache

    feature_cache = TowerFeatureCache()
    for i, stage in enumerate(recipe.stages):
        stage_dir = stage_dirs[i]
        final = stage_dir / FINAL
        if i not in data:
            say(f"stage {stage.name} ({stage.kind}): done already, skipped")
            result.stages.append(StageOutcome(stage.name, stage.kind, final, skipped=True))
            model_dir = final
            continue
        count = len(data[i])
        head = f"stage {i + 1}/{len(recipe.stages)} {stage.name} ({stage.kind})"
        say(f"{head}: {count} samples, from {model_dir}")
        stage_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        outcome = _run_stage(recipe, stage, model_dir, stage_dir, data[i], resume, feature_cache)
        seconds = time.perf_counter() - start
        if not (final / "config.json").is_file():
            raise RecipeError(f"stage {stage.name!r} finished without a model in {final}")
        history = getattr(outcome, "log_history", None)
        if not isinstance(history, list) or not history:
            history = _trainer_log_history(stage_dir)
        write_summary(
            stage_dir, history, stage=stage.name, extra={"kind": stage.kind, "samples": len(data[i])}
        )
        _write_json(
            stage_dir / STAGE_DONE,
            {
                "stage": stage.name,
                "kind": stage.kind,
                "index": i,
                "input_model": str(model_dir),
                "final": str(final),
                "samples": len(data[i]),
                "samples_per_dataset": data[i].counts(),
                "seed": recipe.seed,
                "seconds": round(seconds, 3),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "result": _jsonable(outcome),
            },
        )
        result.stages.append(StageOutcome(stage.name, stage.kind, final, False, len(data[i]), seconds))
        model_dir = final
    result.final_dir = model_dir
    return result
