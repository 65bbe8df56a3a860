"""Zero-shot protocol end to end: `emma data holdout`, then a real `emma eval` with a tiny model on the
zero-shot and in-distribution splits, and `emma eval compare` (unpaired gap, paired models)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from holdout_data import write_synthetic
from typer.testing import CliRunner

from emma.cli import app
from emma.data.sources import run_importer
from emma.data.store import open_dataset
from emma.eval.stats import two_sample_bootstrap

REAL_VQA_RAD = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "vqa-rad"
runner = CliRunner()


def invoke(*args: Any) -> Any:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def evaluate(data: Path, split: str, out: Path, *extra: Any) -> dict[str, Any]:
    model = ["--model", "tiny:llava_onevision"] if "--predictions" not in extra else []
    args = ["eval", "--task", "vqa-rad", "--data", data, "--split", split, "--out", out, *model]
    invoke(*args, "--max-new-tokens", 2, "--bootstrap", 200, *extra)
    return json.loads((out / "results.json").read_text())


def test_two_sample_bootstrap_separates_and_overlaps() -> None:
    low, high = np.zeros(40), np.ones(30)
    c = two_sample_bootstrap(low, high, n_resamples=500, seed=1)
    assert c.delta == 1.0 and c.ci_low == 1.0 and c.p_value < 0.01
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2, 200), rng.integers(0, 2, 150)
    c = two_sample_bootstrap(a, b, n_resamples=500, seed=1)
    assert c.ci_low < 0 < c.ci_high and (c.n_a, c.n_b) == (200, 150)


def test_eval_reports_zero_shot_and_in_distribution_separately(tmp_path: Path) -> None:
    src = write_synthetic(tmp_path / "src")
    data = tmp_path / "holdout"
    invoke("data", "holdout", src, "--by", "body_part=abdomen", "--out", data)

    zs = evaluate(data, "test", tmp_path / "zs")
    block = zs["zero_shot"]
    assert block["held_out"] == "body_part=abdomen" and block["role"] == "zero_shot"
    assert block["zero_shot"]["n"] == 4 and block["in_distribution"] is None
    assert block["leakage_check"]["term_in_training"] == 0
    assert block["recipe"]["train_splits"] == ["train"]
    assert set(block["zero_shot"]["metrics"]) == set(zs["metrics"])
    # The zero-shot split gathers the group from every source split: broken down by where each came from.
    sources = Counter(s.meta.extra["source_split"] for s in open_dataset(data).iter_samples("test"))
    assert len(sources) > 1
    assert {k: v["n"] for k, v in zs["breakdowns"]["source_split"].items()} == dict(sources)
    report = (tmp_path / "zs" / "report.md").read_text()
    assert "## Zero-shot protocol: body_part=abdomen held out" in report
    assert "clean: the held-out group is absent from training" in report

    seen = evaluate(data, "test_seen", tmp_path / "seen")
    assert seen["zero_shot"]["role"] == "in_distribution"
    assert seen["zero_shot"]["zero_shot"] is None and seen["zero_shot"]["in_distribution"]["n"] == 2

    # The same model on both splits: no shared sample, so the gap is an unpaired bootstrap.
    compared = json.loads(invoke("eval", "compare", tmp_path / "zs", tmp_path / "seen", "--json").stdout)
    gap = compared["zero_shot"]
    assert gap["role_a"] == "zero_shot" and gap["role_b"] == "in_distribution" and not gap["paired"]
    acc = gap["gap"]["overall_accuracy"]
    assert (acc["n_a"], acc["n_b"]) == (4, 2)
    assert acc["delta"] == pytest.approx(
        seen["metrics"]["overall_accuracy"] - zs["metrics"]["overall_accuracy"]
    )
    assert compared["metrics"] == {}

    # Another "model" (the gold answers) on the zero-shot split: paired on the same samples.
    golds = {s.id: s.gold.answer for s in open_dataset(data).iter_samples("test")}
    preds = tmp_path / "gold.jsonl"
    preds.write_text("".join(json.dumps({"id": k, "prediction": v}) + "\n" for k, v in golds.items()))
    oracle = evaluate(data, "test", tmp_path / "oracle", "--predictions", preds)
    assert oracle["zero_shot"]["zero_shot"]["metrics"]["overall_accuracy"] == 1.0
    paired = json.loads(invoke("eval", "compare", tmp_path / "zs", tmp_path / "oracle", "--json").stdout)
    assert paired["zero_shot"]["paired"] and paired["zero_shot"]["gap"] is None
    assert paired["metrics"]["overall_accuracy"]["n"] == 4


def test_ordinary_dataset_has_no_zero_shot_block(tmp_path: Path) -> None:
    src = write_synthetic(tmp_path / "src")
    golds = {s.id: s.gold.answer for s in open_dataset(src).iter_samples("test")}
    preds = tmp_path / "gold.jsonl"
    preds.write_text("".join(json.dumps({"id": k, "prediction": v}) + "\n" for k, v in golds.items()))
    results = evaluate(src, "test", tmp_path / "run", "--predictions", preds)
    assert results["zero_shot"] is None
    assert "source_split" not in results["breakdowns"]  # all "test": nothing to break down


@pytest.mark.skipif(not REAL_VQA_RAD.is_dir(), reason="shared VQA-RAD data not present")
def test_vqa_rad_organ_holdout_with_a_tiny_model(tmp_path: Path) -> None:
    run_importer("vqa-rad", REAL_VQA_RAD, tmp_path / "vqa-rad", limit=300)
    data = tmp_path / "abdomen"
    report = json.loads(
        invoke(
            "data", "holdout", tmp_path / "vqa-rad", "--by", "body_part=abdomen", "--out", data, "--json"
        ).stdout
    )
    assert report["check"]["group_in_training"] == 0 and report["check"]["exact_image_overlap"] == 0
    train_text = " ".join(
        " ".join(t.content.lower() for t in s.turns) for s in open_dataset(data).iter_samples("train")
    )
    assert "abdom" not in train_text
    assert all(s.meta.body_part == "abdomen" for s in open_dataset(data).iter_samples("test"))
    zs = evaluate(data, "test", tmp_path / "zs", "--limit", 4)
    assert zs["zero_shot"]["role"] == "zero_shot" and zs["zero_shot"]["zero_shot"]["n"] == 4
    assert not any("202 of the 203 test images" in n for n in zs["notes"])
