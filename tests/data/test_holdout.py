"""Held-out (zero-shot) splits: membership, training clean-up, the recorded recipe and the leakage check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from holdout_data import noise, vqa, write_synthetic
from typer.testing import CliRunner

from emma.cli import app
from emma.data.holdout import (
    RECIPE_KEY,
    HoldoutRecipe,
    build_holdout,
    check_holdout,
    parse_holdout,
    read_recipe,
)
from emma.data.schema import Gold, ImageRef, Meta, Sample, TaskType, Turn
from emma.data.store import DatasetWriter, open_dataset
from emma.errors import InputError

runner = CliRunner()


@pytest.fixture()
def synthetic(tmp_path: Path) -> Path:
    return write_synthetic(tmp_path / "src")


def ids(root: Path, split: str) -> set[str]:
    return {s.id for s in open_dataset(root).iter_samples(split)}


def test_body_part_holdout_keeps_the_group_out_of_training(synthetic: Path, tmp_path: Path) -> None:
    report = build_holdout(synthetic, tmp_path / "out", by="body_part", value="Abdomen")
    out = tmp_path / "out"
    assert ids(out, "test") == {"a1", "a2", "a3", "a4"}  # every abdomen sample, train and test alike
    assert ids(out, "train") == {"c1", "c2"}  # c3 names "abdominal", c4 shows a held-out image
    assert ids(out, "test_seen") == {"c5", "c6"}
    assert report.recipe.counts["dropped_names_group_train"] == 1
    assert report.recipe.counts["dropped_held_out_image_train"] == 1
    assert "abdominal" in report.recipe.terms
    assert not report.check.leaked and report.check.train_samples == 2
    dataset = open_dataset(out)
    recipe = read_recipe(dataset)
    assert recipe is not None and recipe.label == "body_part=abdomen"
    assert dataset.manifest.extra[RECIPE_KEY]["check"]["exact_image_overlap"] == 0
    assert recipe.role("test") == "zero_shot" and recipe.role("test_seen") == "in_distribution"
    assert recipe.role("train") == "training"


def test_finding_holdout_moves_questions_and_strips_labels(synthetic: Path, tmp_path: Path) -> None:
    report = build_holdout(synthetic, tmp_path / "out", by="finding", value="effusion")
    out = tmp_path / "out"
    assert ids(out, "test") == {"c6"}
    assert not report.check.leaked

    report = build_holdout(synthetic, tmp_path / "px", by="finding", value="pneumothorax")
    assert ids(tmp_path / "px", "test") == {"c1"}  # asked about it (label 0: not a positive label)
    assert report.check.label_in_training == 0


def test_finding_label_keys_are_removed_from_training(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path / "src", name="cls") as writer:
        for i, (split, value) in enumerate([("train", 0), ("train", 1), ("test", 0)]):
            sample = Sample(
                id=f"x{i}",
                task=TaskType.CLASSIFICATION,
                images=[ImageRef(path="pending.png")],
                turns=[Turn(role="user", content="Which findings?", images=[0])],
                gold=Gold(labels={"Edema": value, "Cardiomegaly": 1}),
                meta=Meta(split=split),
            )
            writer.add(sample, [noise(100 + i)])
    report = build_holdout(tmp_path / "src", tmp_path / "out", by="finding", value="edema")
    out = open_dataset(tmp_path / "out")
    assert ids(tmp_path / "out", "test") == {"x1"}  # the positive one
    train = list(out.iter_samples("train"))
    assert [s.id for s in train] == ["x0"] and train[0].gold.labels == {"Cardiomegaly": 1}
    assert report.recipe.counts["label_removed_train"] == 1 and not report.check.leaked


def test_check_catches_a_tampered_training_split(synthetic: Path, tmp_path: Path) -> None:
    recipe = HoldoutRecipe(
        by="body_part",
        value="abdomen",
        terms=["abdomen", "abdominal"],
        source="synthetic",
        source_path=str(synthetic),
        train_splits=["train"],
    )
    src = open_dataset(synthetic)
    # The source as it is, relabelled as a holdout: abdomen samples and words and images in train.
    with DatasetWriter(
        tmp_path / "bad", name="bad", extra={RECIPE_KEY: {"recipe": recipe.model_dump()}}
    ) as w:
        for sample in src.iter_samples():
            w.add(sample, [src.image_bytes(ref) for ref in sample.images])
    check = check_holdout(open_dataset(tmp_path / "bad"))
    assert check.leaked
    assert check.group_in_training == 2 and check.term_in_training == 1
    assert check.exact_image_overlap == 0  # test (a3, a4) images are not in train...
    assert check.outside_group_in_test == 2  # ...but c5 and c6 are not abdomen samples
    assert any("name the held-out group" in p for p in check.problems())

    result = runner.invoke(app, ["data", "check", str(tmp_path / "bad"), "--fail-on-leak"])
    assert result.exit_code == 1
    assert "LEAK: 2 training samples belong to body_part=abdomen" in result.output


def test_shared_held_out_image_is_a_leak(synthetic: Path, tmp_path: Path) -> None:
    recipe = HoldoutRecipe(
        by="body_part",
        value="abdomen",
        terms=["abdomen"],
        source="s",
        source_path="s",
        train_splits=["train"],
    )
    with DatasetWriter(
        tmp_path / "bad", name="bad", extra={RECIPE_KEY: {"recipe": recipe.model_dump()}}
    ) as w:
        w.add(vqa("t", "Is the lung clear?", "yes", split="train", body_part="chest"), [noise(5)])
        w.add(vqa("z", "Is the liver normal?", "yes", split="test", body_part="abdomen"), [noise(5)])
    check = check_holdout(open_dataset(tmp_path / "bad"))
    assert check.exact_image_overlap == 1 and check.leaked


def test_refuses_an_empty_group_and_bad_specs(synthetic: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nothing to hold out"):
        build_holdout(synthetic, tmp_path / "none", by="body_part", value="knee")
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())
    assert parse_holdout("body-part=abdomen") == ("body_part", "abdomen")
    for bad in ("abdomen", "organ=abdomen", "modality="):
        with pytest.raises(InputError):
            parse_holdout(bad)


def test_question_type_membership_reads_each_part() -> None:
    recipe = HoldoutRecipe(by="question_type", value="pos", terms=[], source="s", source_path="s")
    sample = vqa("q", "Where is the mass?", "left", split="test", body_part="chest", qtype="POS, PRES")
    assert recipe.in_group(sample)
    assert not recipe.in_group(sample.model_copy(update={"meta": Meta(question_type="PRES")}))


def test_cli_writes_the_dataset_and_reports(synthetic: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = runner.invoke(
        app, ["data", "holdout", str(synthetic), "--by", "body_part=abdomen", "--out", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["splits"] == {"train": 2, "test": 4, "test_seen": 2}
    assert report["check"]["term_in_training"] == 0
    check = runner.invoke(app, ["data", "check", str(out), "--json"])
    assert json.loads(check.stdout)["holdout"]["leaked"] is False
    again = runner.invoke(
        app, ["data", "holdout", str(synthetic), "--by", "body_part=abdomen", "--out", str(out)]
    )
    assert again.exit_code != 0 and "not empty" in again.output
