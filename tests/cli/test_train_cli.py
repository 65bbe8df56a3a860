"""`emma train`: recipe validation and override errors are one line with exit code 2 (nothing trains)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from emma.cli import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "dataset.json").write_text("{}", encoding="utf-8")  # enough for the path check
    return folder


def _recipe(tmp_path: Path, data: Path, **top: object) -> Path:
    raw = yaml.safe_load((ROOT / "recipes" / "smoke.yaml").read_text())
    raw["datasets"]["vqarad"]["path"] = str(data)
    raw.update(top)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _one_line_error(result: object) -> str:
    assert result.exit_code == 2, result.output  # type: ignore[attr-defined]
    lines = [line for line in result.output.splitlines() if line.strip()]  # type: ignore[attr-defined]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output  # type: ignore[attr-defined]
    return lines[0]


def test_check_validates_and_applies_overrides(tmp_path: Path, dataset: Path) -> None:
    recipe = _recipe(tmp_path, dataset)
    result = runner.invoke(
        app, ["train", "--recipe", str(recipe), "--check", "--set", f"output_dir={tmp_path / 'elsewhere'}"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"recipe ok: 4 stages → {tmp_path / 'elsewhere'}"


def test_unknown_key(tmp_path: Path, dataset: Path) -> None:
    line = _one_line_error(runner.invoke(app, ["train", "--recipe", str(_recipe(tmp_path, dataset, lr=1))]))
    assert line == "error: invalid recipe: lr: unknown key"


def test_bad_stage_kind_via_override(tmp_path: Path, dataset: Path) -> None:
    recipe = _recipe(tmp_path, dataset)
    line = _one_line_error(
        runner.invoke(app, ["train", "--recipe", str(recipe), "--set", "stages.1.kind=pretrain"])
    )
    assert line.startswith("error: invalid recipe: stages.1.kind: Input should be")


def test_missing_dataset_and_recipe(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, tmp_path / "absent")
    line = _one_line_error(runner.invoke(app, ["train", "--recipe", str(recipe)]))
    assert line.startswith(f"error: dataset 'vqarad' not found: {tmp_path / 'absent'}")
    assert not (tmp_path / "runs").exists()
    line = _one_line_error(runner.invoke(app, ["train", "--recipe", str(tmp_path / "nope.yaml")]))
    assert line == f"error: recipe not found: {tmp_path / 'nope.yaml'}"


def test_bad_override(tmp_path: Path, dataset: Path) -> None:
    recipe = _recipe(tmp_path, dataset)
    line = _one_line_error(
        runner.invoke(app, ["train", "--recipe", str(recipe), "--set", "stages.9.epochs=1"])
    )
    assert line == "error: bad override 'stages.9': index out of range (0..3)"
    line = _one_line_error(runner.invoke(app, ["train", "--recipe", str(recipe), "--set", "seed"]))
    assert "expected key=value" in line
