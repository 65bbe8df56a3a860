"""Recipe schema, overrides, one-line errors, stage data mixing and progress summaries (no training)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from emma.data.schema import Gold, Meta, Sample, TaskType, Turn
from emma.data.store import DatasetWriter
from emma.train.data import stage_data
from emma.train.progress import default_report_to, write_summary
from emma.train.recipe import (
    STAGE_KINDS,
    Recipe,
    RecipeError,
    load_recipe,
    parse_recipe,
)

ROOT = Path(__file__).resolve().parents[2]


def _png(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (shade, shade, shade)).save(buf, format="PNG")
    return buf.getvalue()


def _make_dataset(root: Path, n_closed: int = 6, n_open: int = 3, n_test: int = 2) -> Path:
    with DatasetWriter(root, name="synthetic") as writer:
        k = 0
        for task, n, split in (
            (TaskType.CLOSED_VQA, n_closed, "train"),
            (TaskType.OPEN_VQA, n_open, "train"),
            (TaskType.CLOSED_VQA, n_test, "test"),
        ):
            for _ in range(n):
                sample = Sample(
                    id=f"{split}-{task.value}-{k}",
                    task=task,
                    turns=[Turn(role="user", content=f"question {k}?")],
                    gold=Gold(answer="yes" if k % 2 else "no"),
                    meta=Meta(split=split),
                    images=[],
                )
                writer.add(sample, [_png(k * 10 % 250)])
                k += 1
    return root


def _raw(data: Path | str = "/nonexistent", **stage: Any) -> dict[str, Any]:
    return {
        "output_dir": "out",
        "base_model": "tiny:qwen2_5_vl",
        "seed": 3,
        "datasets": {"a": {"path": str(data)}},
        "stages": [
            {"name": "align", "kind": "alignment", "datasets": ["a"], **stage},
            {"name": "vqa", "kind": "vqa", "datasets": {"a": 2.0}, "lora": {"r": 4}},
        ],
    }


def _error(raw: Any, overrides: list[str] | None = None, check_paths: bool = False) -> str:
    with pytest.raises(RecipeError) as info:
        parse_recipe(raw, overrides, check_paths=check_paths)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_valid_recipe_defaults_and_weights() -> None:
    recipe = parse_recipe(_raw(), check_paths=False)
    assert isinstance(recipe, Recipe)
    assert [s.kind for s in recipe.stages] == ["alignment", "vqa"]
    assert recipe.stages[0].datasets == {"a": None}
    assert recipe.stage_weight(recipe.stages[0], "a") == 1.0
    assert recipe.stage_weight(recipe.stages[1], "a") == 2.0
    assert recipe.stages[1].lora is not None and recipe.stages[1].lora.r == 4
    assert recipe.tiny_family() == "qwen2_5_vl"


def test_unknown_key_is_one_line() -> None:
    raw = _raw(learning_rat=1e-3)
    assert _error(raw) == "invalid recipe: stages.0.learning_rat: unknown key"
    top = _raw()
    top["outptu_dir"] = "x"
    assert "outptu_dir: unknown key" in _error(top)


def test_bad_stage_kind() -> None:
    raw = _raw()
    raw["stages"][1]["kind"] = "pretrain"
    message = _error(raw)
    assert message.startswith("invalid recipe: stages.1.kind:")
    assert "'alignment'" in message and "'grpo'" in message


def test_undefined_and_missing_dataset(tmp_path: Path) -> None:
    raw = _raw()
    raw["stages"][0]["datasets"] = ["b"]
    assert "stage 'align' uses undefined dataset 'b' (defined: a)" in _error(raw)
    missing = _error(_raw(tmp_path / "nope"), check_paths=True)
    assert missing == f"dataset 'a' not found: {tmp_path / 'nope'} (import it with `emma data import`)"
    (tmp_path / "empty").mkdir()
    assert "not a canonical dataset" in _error(_raw(tmp_path / "empty"), check_paths=True)


def test_other_validation_errors() -> None:
    raw = _raw()
    raw["datasets"]["a"]["split"] = "test"
    assert "training never reads the test split" in _error(raw)
    raw = _raw()
    raw["stages"][1]["name"] = "align"
    assert "duplicate stage name 'align'" in _error(raw)
    assert "grpo settings given for a alignment stage" in _error(_raw(grpo={"num_generations": 2}))
    assert "vision_learning_rate needs train_vision" in _error(_raw(vision_learning_rate=1e-6))
    grpo = parse_recipe(_raw(kind="grpo"), check_paths=False)
    assert grpo.stages[0].grpo is not None and grpo.stages[0].grpo.num_generations == 4


def test_overrides() -> None:
    recipe = parse_recipe(
        _raw(),
        [
            "output_dir=/tmp/elsewhere",
            "stages.0.learning_rate=1e-3",
            "stages.vqa.lora.r=8",
            "stages.0.lora.alpha=16",  # creates the mapping
            "stages.1.tasks=[closed_vqa, open_vqa]",
            "seed=11",
            "datasets.a.limit=5",
        ],
        check_paths=False,
    )
    assert recipe.output_dir == Path("/tmp/elsewhere")
    assert recipe.stages[0].learning_rate == pytest.approx(1e-3)
    assert recipe.stages[1].lora is not None and recipe.stages[1].lora.r == 8
    assert recipe.stages[0].lora is not None and recipe.stages[0].lora.alpha == 16
    assert recipe.stages[1].tasks == [TaskType.CLOSED_VQA, TaskType.OPEN_VQA]
    assert recipe.seed == 11 and recipe.datasets["a"].limit == 5
    assert _error(_raw(), ["stages.7.epochs=2"]) == "bad override 'stages.7': index out of range (0..1)"
    assert "no list item named 'nope'" in _error(_raw(), ["stages.nope.epochs=2"])
    assert "expected key=value" in _error(_raw(), ["seed"])
    assert "stages.0.epochs:" in _error(_raw(), ["stages.0.epochs=-1"])


def test_load_recipe_file_errors(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [\n  - {", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"is not valid YAML \(line \d+\)"):
        load_recipe(bad)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(_raw()), encoding="utf-8")
    assert load_recipe(good, ["stages.0.max_steps=3"], check_paths=False).stages[0].max_steps == 3


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_shipped_recipes_validate(name: str) -> None:
    recipe = load_recipe(ROOT / "recipes" / name, check_paths=False)
    assert recipe.stages and all(s.kind in STAGE_KINDS for s in recipe.stages)


def test_stage_data_mixing_filters_and_seed(tmp_path: Path) -> None:
    data = _make_dataset(tmp_path / "ds")
    raw = _raw(data)
    recipe = parse_recipe(raw)
    first = stage_data(recipe, recipe.stages[0], stage_index=0)
    assert len(first) == 9  # 6 closed + 3 open train samples, never the 2 test ones
    assert not any(s.id.startswith("test-") for s in first.samples)
    again = stage_data(recipe, recipe.stages[0], stage_index=0)
    assert [s.id for s in again.samples] == [s.id for s in first.samples]  # seeded
    doubled = stage_data(recipe, recipe.stages[1], stage_index=1)
    assert len(doubled) == 18 and doubled.counts() == {"a": 18}
    other_seed = stage_data(parse_recipe(_raw(data), ["seed=4"]), recipe.stages[0], stage_index=0)
    assert sorted(s.id for s in other_seed.samples) == sorted(s.id for s in first.samples)

    half = parse_recipe(_raw(data), ["stages.1.datasets.a=0.5", "stages.1.tasks=[closed_vqa]"])
    mixed = stage_data(half, half.stages[1], stage_index=1)
    assert len(mixed) == 3 and all(s.task == TaskType.CLOSED_VQA for s in mixed.samples)
    limited = parse_recipe(_raw(data), ["datasets.a.limit=2", "stages.0.max_samples=1"])
    assert len(stage_data(limited, limited.stages[0])) == 1

    example = first[0]
    assert set(example) == {"messages", "images"}
    assert example["messages"][-1]["role"] == "assistant"
    assert len(example["images"]) == 1 and example["images"][0].size == (16, 12)

    none_left = parse_recipe(_raw(data), ["stages.0.tasks=[grounding]"])
    with pytest.raises(RecipeError, match="no train samples for stage 'align'"):
        stage_data(none_left, none_left.stages[0])


def test_write_summary_and_report_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    history = [
        {"loss": 2.0, "learning_rate": 1e-3, "step": 1},
        {"loss": 1.5, "learning_rate": 5e-4, "step": 2},
        {"train_loss": 1.75, "train_runtime": 0.5, "train_samples_per_second": 8.0, "step": 2},
    ]
    summary = write_summary(tmp_path, history, stage="vqa", extra={"samples": 4})
    on_disk = json.loads((tmp_path / "training_summary.json").read_text())
    assert on_disk["first_loss"] == 2.0 and on_disk["last_loss"] == 1.5 and on_disk["steps"] == 2
    assert on_disk["train_samples_per_second"] == 8.0 and on_disk["samples"] == 4
    assert summary["loss_curve"] == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    with Image.open(tmp_path / "loss.png") as png:
        assert png.format == "PNG" and png.size[0] > 100
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    assert default_report_to() == ["tensorboard"]
    assert default_report_to(["none"]) == ["none"]


def test_two_datasets_mix_and_one_loader_serves_both(tmp_path: Path) -> None:
    first = _make_dataset(tmp_path / "one", n_closed=2, n_open=0, n_test=0)
    second = _make_dataset(tmp_path / "two", n_closed=0, n_open=3, n_test=0)
    raw = _raw(first)
    raw["datasets"]["b"] = {"path": str(second), "weight": 2.0}
    raw["stages"][0]["datasets"] = {"a": 1.0, "b": None}
    recipe = parse_recipe(raw)
    data = stage_data(recipe, recipe.stages[0])
    assert data.counts() == {"a": 2, "b": 6}
    load = data.ref_loader()
    for sample in data.samples:
        assert load(sample.images[0]).size == (16, 12)
    assert [s.id for s, _ in data.pairs()] == [s.id for s in data.samples]


@pytest.mark.parametrize("name", ["single_gpu", "ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"])
def test_accelerate_configs_parse(name: str) -> None:
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    expected = {"single_gpu": "NO", "ddp": "MULTI_GPU", "fsdp": "FSDP"}.get(name, "DEEPSPEED")
    assert str(config.distributed_type).endswith(expected)
    if name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
