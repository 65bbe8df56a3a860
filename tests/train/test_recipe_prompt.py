"""DatasetConfig.prompt (validated, applied by stage_data to the first user turn only) and StageConfig.bf16."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from emma.data.schema import Gold, Meta, Sample, TaskType, Turn
from emma.data.store import DatasetWriter, open_dataset
from emma.train.data import stage_data
from emma.train.prepare import mixed_bf16
from emma.train.recipe import RecipeError, StageConfig, load_recipe, parse_recipe

SHORT = "{question}\nAnswer the question using a single word or phrase."


def _png(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, shade, shade)).save(buf, format="PNG")
    return buf.getvalue()


def _dataset(root: Path) -> Path:
    """Two train samples: one single-turn, one two-round conversation (with a system turn first)."""
    with DatasetWriter(root, name="prompted") as writer:
        writer.add(
            Sample(
                id="one",
                task=TaskType.CLOSED_VQA,
                turns=[
                    Turn(role="user", content="Is there a {brace} fracture?"),
                    Turn(role="assistant", content="no"),
                ],
                gold=Gold(answer="no"),
                meta=Meta(split="train"),
            ),
            [_png(10)],
        )
        writer.add(
            Sample(
                id="two",
                task=TaskType.OPEN_VQA,
                turns=[
                    Turn(role="system", content="You are a radiologist."),
                    Turn(role="user", content="What organ?"),
                    Turn(role="assistant", content="liver"),
                    Turn(role="user", content="Which lobe?"),
                    Turn(role="assistant", content="right"),
                ],
                gold=Gold(answer="liver"),
                meta=Meta(split="train"),
            ),
            [_png(200)],
        )
    return root


def _raw(
    data: Path | str = "/nonexistent", dataset: dict[str, Any] | None = None, **stage: Any
) -> dict[str, Any]:
    return {
        "output_dir": "out",
        "base_model": "tiny:idefics3",
        "datasets": {"a": {"path": str(data), **(dataset or {})}},
        "stages": [{"name": "vqa", "kind": "vqa", "datasets": ["a"], **stage}],
    }


def _error(raw: dict[str, Any]) -> str:
    with pytest.raises(RecipeError) as info:
        parse_recipe(raw, check_paths=False)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------------- prompt


def test_prompt_defaults_to_none_and_keeps_a_valid_template() -> None:
    assert parse_recipe(_raw(), check_paths=False).datasets["a"].prompt is None
    recipe = parse_recipe(_raw(dataset={"prompt": SHORT}), check_paths=False)
    assert recipe.datasets["a"].prompt == SHORT


@pytest.mark.parametrize("prompt", ["Answer briefly.", "{Question} briefly", "{ question }", ""])
def test_prompt_without_question_placeholder_is_a_one_line_error(prompt: str) -> None:
    message = _error(_raw(dataset={"prompt": prompt}))
    assert message == "invalid recipe: datasets.a.prompt: a dataset prompt must contain {question}"


def test_prompt_from_yaml_and_override(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        "output_dir: out\nbase_model: tiny:idefics3\n"
        'datasets:\n  a:\n    path: /nowhere\n    prompt: "Q: {question}\\nShort answer."\n'
        "stages:\n  - {name: vqa, kind: vqa, datasets: [a]}\n"
    )
    assert load_recipe(path, check_paths=False).datasets["a"].prompt == "Q: {question}\nShort answer."
    over = load_recipe(path, ["datasets.a.prompt=null"], check_paths=False)
    assert over.datasets["a"].prompt is None
    with pytest.raises(RecipeError, match="must contain \\{question\\}"):
        load_recipe(path, ["datasets.a.prompt=no placeholder"], check_paths=False)


def test_stage_data_applies_prompt_to_the_first_user_turn_only(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "ds")
    recipe = parse_recipe(_raw(data, dataset={"prompt": SHORT}))
    staged = stage_data(recipe, recipe.stages[0])
    by_id = {s.id: s for s in staged.samples}
    assert set(by_id) == {"one", "two"}

    # str.format would fail on (or eat) the question's own braces; the question is kept verbatim
    one = by_id["one"].turns
    assert (
        one[0].content == "Is there a {brace} fracture?\nAnswer the question using a single word or phrase."
    )
    assert one[1].content == "no"

    two = [(t.role, t.content) for t in by_id["two"].turns]
    assert two == [
        ("system", "You are a radiologist."),
        ("user", "What organ?\nAnswer the question using a single word or phrase."),
        ("assistant", "liver"),
        ("user", "Which lobe?"),
        ("assistant", "right"),
    ]
    # the TRL record carries the prompted text too
    record = staged[[s.id for s in staged.samples].index("two")]
    user_texts = [
        part["text"]
        for m in record["messages"]
        if m["role"] == "user"
        for part in (
            m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
        )
        if part.get("type") == "text"
    ]
    assert any(text.startswith("What organ?\nAnswer the question") for text in user_texts)
    assert "Which lobe?" in user_texts

    # the stored dataset is untouched
    stored = {s.id: s for s in open_dataset(data).iter_samples("train")}
    assert stored["two"].turns[1].content == "What organ?"


def test_stage_data_without_prompt_keeps_samples_as_stored(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "ds")
    recipe = parse_recipe(_raw(data))
    staged = stage_data(recipe, recipe.stages[0])
    stored = {s.id: s for s in open_dataset(data).iter_samples("train")}
    for sample in staged.samples:
        assert sample.turns == stored[sample.id].turns


def test_prompt_is_per_dataset(tmp_path: Path) -> None:
    first, second = _dataset(tmp_path / "d1"), _dataset(tmp_path / "d2")
    raw = {
        "output_dir": "out",
        "base_model": "tiny:idefics3",
        "datasets": {"p": {"path": str(first), "prompt": "<{question}>"}, "q": {"path": str(second)}},
        "stages": [{"name": "vqa", "kind": "vqa", "datasets": ["p", "q"]}],
    }
    recipe = parse_recipe(raw)
    staged = stage_data(recipe, recipe.stages[0])
    names = [staged.names[src] for src in staged.sources]
    firsts = {
        (name, s.id): next(t.content for t in s.turns if t.role == "user")
        for name, s in zip(names, staged.samples, strict=True)
    }
    assert firsts == {
        ("p", "one"): "<Is there a {brace} fracture?>",
        ("p", "two"): "<What organ?>",
        ("q", "one"): "Is there a {brace} fracture?",
        ("q", "two"): "What organ?",
    }


# ----------------------------------------------------------------------------------------------- bf16


@pytest.mark.parametrize(("value", "parsed"), [(None, None), (True, True), (False, False), ("true", True)])
def test_bf16_accepts_none_true_false(value: Any, parsed: bool | None) -> None:
    recipe = parse_recipe(_raw(bf16=value), check_paths=False)
    assert recipe.stages[0].bf16 is parsed


def test_bf16_default_and_override() -> None:
    assert parse_recipe(_raw(), check_paths=False).stages[0].bf16 is None
    recipe = parse_recipe(_raw(), ["stages.vqa.bf16=false"], check_paths=False)
    assert recipe.stages[0].bf16 is False
    assert parse_recipe(_raw(), ["stages.0.bf16=null"], check_paths=False).stages[0].bf16 is None
    assert _error(_raw(bf16="sometimes")).startswith("invalid recipe: stages.0.bf16:")


def test_bf16_resolution_in_training() -> None:
    def stage(value: bool | None) -> StageConfig:
        return parse_recipe(_raw(bf16=value), check_paths=False).stages[0]

    assert mixed_bf16(stage(None), cuda=False) is False  # auto: off without CUDA
    assert mixed_bf16(stage(True), cuda=False) is True  # explicit: also on CPU
    assert mixed_bf16(stage(False), cuda=False) is False
