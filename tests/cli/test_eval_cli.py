"""``emma eval``, ``emma eval compare`` and ``emma eval tasks`` through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from emma.cli import app
from emma.data.sources import run_importer
from emma.data.store import open_dataset
from emma.eval.tasks import get_task

REAL_VQA_RAD = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "vqa-rad"

runner = CliRunner()


def invoke(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def vqa_rad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not REAL_VQA_RAD.is_dir():
        pytest.skip("shared VQA-RAD data not present")
    out = tmp_path_factory.mktemp("vqa-rad-cli") / "ds"
    run_importer("vqa-rad", REAL_VQA_RAD, out)
    return out


@pytest.fixture(scope="module")
def answers(vqa_rad: Path) -> dict[str, str]:
    items = get_task("vqa-rad").items(open_dataset(vqa_rad).iter_samples("test"))
    return {it.id: it.sample.gold.answer or "" for it in items}


def predictions(path: Path, rows: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps({"id": k, "prediction": v}) + "\n" for k, v in rows.items()))
    return path


def test_scores_a_predictions_file_and_compares_runs(
    vqa_rad: Path, answers: dict[str, str], tmp_path: Path
) -> None:
    no = predictions(tmp_path / "no.jsonl", {k: "no" for k in answers} | {"unknown-id": "yes"})
    result = invoke(
        "eval",
        "--task",
        "vqa-rad",
        "--data",
        vqa_rad,
        "--predictions",
        no,
        "--out",
        tmp_path / "a",
        "--bootstrap",
        200,
        "--json",
    )
    assert result.exit_code == 0, result.output
    results = json.loads(result.stdout)
    assert results["metrics"]["closed_accuracy"] == 133 / 272
    assert results["counts"]["unknown_ids"] == 1
    assert (tmp_path / "a" / "report.html").is_file()

    table = invoke(
        "eval",
        "--task",
        "vqa-rad",
        "--data",
        vqa_rad,
        "--predictions",
        predictions(tmp_path / "ok.jsonl", answers),
        "--out",
        tmp_path / "b",
        "--bootstrap",
        200,
    )
    assert table.exit_code == 0, table.output
    assert "closed_accuracy" in table.output and "1.0000" in table.output

    cmp = invoke(
        "eval",
        "compare",
        tmp_path / "a",
        tmp_path / "b",
        "--bootstrap",
        200,
        "--json",
        "--output",
        tmp_path / "cmp.json",
    )
    assert cmp.exit_code == 0, cmp.output
    data = json.loads(cmp.stdout)
    assert data == json.loads((tmp_path / "cmp.json").read_text())
    assert data["n_shared"] == 451
    assert data["metrics"]["closed_accuracy"]["delta"] == pytest.approx(1 - 133 / 272)
    pretty = invoke("eval", "compare", tmp_path / "a", tmp_path / "b", "--bootstrap", 200)
    assert pretty.exit_code == 0 and "shared samples" in pretty.output


def test_generates_with_a_model_folder(vqa_rad: Path, tmp_path: Path) -> None:
    from emma.model.tiny_families import build_tiny

    model = build_tiny("llava_onevision")
    args = [
        "eval",
        "--task",
        "vqa-rad",
        "--data",
        vqa_rad,
        "--model",
        model,
        "--out",
        tmp_path / "run",
        "--limit",
        3,
        "--batch-size",
        2,
        "--max-new-tokens",
        3,
        "--bootstrap",
        200,
        "--json",
    ]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    results = json.loads(result.stdout)
    assert results["n"] == 3 and results["generation"]["engine_calls"] == 2
    assert results["config"]["decoding"]["max_new_tokens"] == 3
    cached = (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()
    assert len(cached) == 3 and results["model"] == str(model)


def test_lists_tasks() -> None:
    result = invoke("eval", "tasks", "--json")
    assert result.exit_code == 0
    tasks = json.loads(result.stdout)
    assert tasks["slake-zh"]["language"] == "zh" and tasks["gmai-mmbench"]["default_split"] == "validation"
    assert "mmmu-med" in invoke("eval", "tasks").output


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--task", "nope", "--data", "."], "unknown task"),
        (
            ["--task", "vqa-rad", "--data", "/no/such/folder", "--predictions", "p.jsonl"],
            "no such data folder",
        ),
        (["--data", "."], "--task and --data are required"),
    ],
)
def test_errors_are_one_line(args: list[str], fragment: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["eval", *args])
    assert result.exit_code == 2
    assert fragment in result.output
    assert "Traceback" not in result.output


def test_model_and_predictions_together_is_an_error(vqa_rad: Path, tmp_path: Path) -> None:
    p = predictions(tmp_path / "p.jsonl", {"1": "no"})
    result = runner.invoke(
        app,
        [
            "eval",
            "--task",
            "vqa-rad",
            "--data",
            str(vqa_rad),
            "--predictions",
            str(p),
            "--model",
            "emma-tiny",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2 and "not both" in result.output
    compat = runner.invoke(
        app,
        [
            "eval",
            "--task",
            "vqa-rad",
            "--data",
            str(vqa_rad),
            "--predictions",
            str(p),
            "--compat",
            "lmms",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert compat.exit_code == 2 and "unknown compat mode" in compat.output
    missing = runner.invoke(app, ["eval", "compare", str(tmp_path), str(tmp_path)])
    assert missing.exit_code == 2 and "results.json" in missing.output


def test_a_judge_that_cannot_be_reached_is_loud(
    vqa_rad: Path, answers: dict[str, str], tmp_path: Path
) -> None:
    # nothing listens on port 9 (discard): the judge fails on every open answer
    p = predictions(tmp_path / "ok.jsonl", answers)
    args = ["eval", "--task", "vqa-rad", "--data", vqa_rad, "--predictions", p, "--limit", 40,
            "--batch-size", 4, "--out", tmp_path / "run", "--bootstrap", 100,
            "--judge", "openai:http://127.0.0.1:9/v1#x"]  # fmt: skip
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert "could not judge any" in result.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["metrics"]["judge_accuracy"] is None  # null, never 0.0
    assert results["metrics"]["judge_overall_accuracy"] is None
    assert results["metrics"]["closed_accuracy"] == 1.0  # the rule-based numbers are still there
    assert "judge_accuracy" not in results["ci95"]
    counts = results["counts"]
    assert counts["n_open"] > 0 and counts["judge_errors"] == counts["judge_n"] == counts["n_open"]
    assert counts["open_judge_errors"] == counts["n_open"]
    assert (
        not (tmp_path / "run" / "judge_verdicts.jsonl").exists()
        or not (tmp_path / "run" / "judge_verdicts.jsonl").read_text()
    )
