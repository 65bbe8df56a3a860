"""recipes/smoke.yaml end to end on a few VQA-RAD train samples: alignment → instruction → vqa → GRPO on a
tiny random Qwen2.5-VL, through the real `emma train` command; then --resume does nothing new, and an
unfinished stage is continued from its last checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from emma.cli import app

ROOT = Path(__file__).resolve().parents[2]
VQA_RAD = Path("/work/shared/data/vqa-rad")
STAGES = ("alignment", "instruction", "vqa", "grpo")

pytestmark = pytest.mark.skipif(not VQA_RAD.is_dir(), reason="VQA-RAD release not available")
runner = CliRunner()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], str]:
    from emma.data.sources import run_importer

    base = tmp_path_factory.mktemp("smoke")
    data = base / "vqa-rad"
    run_importer("vqa-rad", VQA_RAD, data, limit=12)
    args = [
        "train",
        "--recipe",
        str(ROOT / "recipes" / "smoke.yaml"),
        "--set",
        f"datasets.vqarad.path={data}",
        "--set",
        f"output_dir={base / 'out'}",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return base / "out", args, result.output


def test_smoke_recipe_produces_every_stage(smoke_run: tuple[Path, list[str], str]) -> None:
    out, _, output = smoke_run
    assert "final model:" in output
    recipe = json.loads((out / "recipe.json").read_text())
    assert [s["name"] for s in recipe["stages"]] == list(STAGES)
    previous = None
    for name in STAGES:
        stage = out / name
        assert (stage / "final" / "config.json").is_file(), name
        done = json.loads((stage / "stage_done.json").read_text())
        assert done["stage"] == name and done["samples"] == 8
        if previous is not None:
            assert done["input_model"] == str(previous / "final")  # each stage reads the previous one
        previous = stage
        summary = json.loads((stage / "training_summary.json").read_text())
        assert summary["stage"] == name and summary["steps"] == 2
        assert summary["loss_curve"], name
        with Image.open(stage / "loss.png") as png:
            assert png.format == "PNG"
    for name in STAGES[:3]:
        summary = json.loads((out / name / "training_summary.json").read_text())
        assert summary["first_loss"] > 1.0 and summary["train_samples_per_second"] > 0


def test_final_model_loads(smoke_run: tuple[Path, list[str], str]) -> None:
    from emma.model.registry import load_model

    out, _, _ = smoke_run
    loaded = load_model(str(out / "grpo" / "final"), device="cpu")
    assert loaded.family == "qwen2_5_vl"
    assert sum(p.numel() for p in loaded.model.parameters()) > 0


def test_resume_does_nothing_new_then_continues_unfinished(smoke_run: tuple[Path, list[str], str]) -> None:
    out, args, _ = smoke_run
    stamps = {n: (out / n / "stage_done.json").stat().st_mtime_ns for n in STAGES}
    weights = {n: (out / n / "final" / "model.safetensors").stat().st_mtime_ns for n in STAGES}
    again = runner.invoke(app, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    assert again.output.count("skipped (done)") == 4
    assert {n: (out / n / "stage_done.json").stat().st_mtime_ns for n in STAGES} == stamps
    assert {n: (out / n / "final" / "model.safetensors").stat().st_mtime_ns for n in STAGES} == weights

    # A GRPO stage killed after its step-1 checkpoint: no checkpoint-2, no final, no stage_done.json.
    grpo = out / "grpo"
    (grpo / "stage_done.json").unlink()
    shutil.rmtree(grpo / "final")
    shutil.rmtree(grpo / "checkpoint-2")
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2
    assert "stage 'grpo' has an unfinished run" in refused.output and "--resume" in refused.output
    resumed = runner.invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert resumed.output.count("skipped (done)") == 3
    assert (grpo / "final" / "config.json").is_file() and (grpo / "stage_done.json").is_file()
    assert json.loads((grpo / "stage_done.json").read_text())["result"]["steps"] == 2  # 1 restored + 1 new
    assert (grpo / "checkpoint-2").is_dir() and not (grpo / "checkpoint-3").exists()
