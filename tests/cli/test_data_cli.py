"""``emma data import|stats|check`` through typer's CliRunner."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from emma.cli import app

REAL_VQA_RAD = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "vqa-rad"
FIXTURE = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "vqa-rad"
needs_real = pytest.mark.skipif(not REAL_VQA_RAD.is_dir(), reason="shared VQA-RAD data not present")

runner = CliRunner()


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args), catch_exceptions=False)


def fixture_release(tmp_path: Path) -> Path:
    """The committed VQA-RAD-layout fixture with generated images (synpic1 is in train and test)."""
    src = tmp_path / "vqa-rad-src"
    shutil.copytree(FIXTURE, src)
    (src / "images").mkdir()
    for i in (1, 2, 3, 9):
        rng = np.random.default_rng(i)
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((64, 48), Image.Resampling.BILINEAR).save(src / f"images/synpic{i}.jpg")
    return src


def assert_one_line_error(result, *fragments: str) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0]


def test_import_help_names_every_importer() -> None:
    from emma.data.sources import IMPORTERS

    result = runner.invoke(app, ["data", "import", "--help"], env={"COLUMNS": "300"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    missing = [name for name in IMPORTERS if name not in result.output]
    assert not missing, result.output


@needs_real
def test_full_vqa_rad_import_stats_and_check(tmp_path: Path) -> None:
    out = tmp_path / "vqa-rad"
    result = invoke("data", "import", "vqa-rad", "--src", str(REAL_VQA_RAD), "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["written"] == 2248 and report["by_split"] == {"test": 451, "train": 1797}

    stats = json.loads(invoke("data", "stats", str(out), "--json").output)
    assert stats["by_split"] == {"train": 1797, "test": 451}
    assert stats["splits"]["test"]["counts"]["answer_type"] == {"closed": 272, "open": 179}
    assert stats["splits"]["train"]["counts"]["answer_type"] == {"closed": 1027, "open": 770}

    result = invoke("data", "check", str(out), "--json")
    assert result.exit_code == 0  # a report, not a failure
    pair = json.loads(result.output)["pairs"][0]
    assert (pair["earlier"], pair["later"]) == ("train", "test")
    assert (pair["exact_image_overlap"], pair["later_images"]) == (202, 203)

    text = invoke("data", "check", str(out)).output
    assert "202 of 203 test images also occur in train (exact)" in text
    assert invoke("data", "check", str(out), "--fail-on-leak").exit_code == 1


@needs_real
def test_import_with_default_src_and_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the project root: ../shared/data/vqa-rad
    out = tmp_path / "small"
    result = invoke("data", "import", "vqa-rad", "--out", str(out), "--limit", "20")
    assert result.exit_code == 0, result.output
    assert "written" in result.output and "stopped at --limit 20" in result.output
    stats = json.loads(invoke("data", "stats", str(out), "--json").output)
    assert stats["samples"] == 20


def test_fixture_import_summary_stats_and_check(tmp_path: Path) -> None:
    src = fixture_release(tmp_path)
    out = tmp_path / "out"
    result = invoke("data", "import", "vqa-rad", "--src", str(src), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "CC0-1.0" in result.output
    assert "test: 2, train: 4" in result.output
    assert "invalid_record: 1, missing_image: 1" in result.output
    assert "referenced by no question" in result.output

    result = invoke("data", "stats", str(out))
    assert result.exit_code == 0
    for text in ("6 samples", "train", "test", "closed_vqa", "head", "abdomen", "answer"):
        assert text in result.output

    result = invoke("data", "check", str(out), "--phash-threshold", "0")
    assert result.exit_code == 0
    assert "1 / 2" in result.output  # synpic1: one of the two test images is in train
    assert "1 of 2 test images also occur in train (exact)" in result.output
    assert invoke("data", "check", str(out), "--fail-on-leak").exit_code == 1


def test_resume_and_non_empty_out(tmp_path: Path) -> None:
    src = fixture_release(tmp_path)
    out = tmp_path / "out"
    assert (
        invoke("data", "import", "vqa-rad", "--src", str(src), "--out", str(out), "--limit", "2").exit_code
        == 0
    )
    assert_one_line_error(
        invoke("data", "import", "vqa-rad", "--src", str(src), "--out", str(out)), "--resume"
    )
    result = invoke("data", "import", "vqa-rad", "--src", str(src), "--out", str(out), "--resume", "--json")
    report = json.loads(result.output)
    assert report["resumed"] == 2 and report["written"] == 4


def test_bad_src_is_a_one_line_error(tmp_path: Path) -> None:
    result = invoke(
        "data", "import", "vqa-rad", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")
    )
    assert_one_line_error(result, "does not exist")
    (tmp_path / "empty").mkdir()
    result = invoke("data", "import", "slake", "--src", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "none of train.json")
    assert not (tmp_path / "o").exists()


def test_usage_errors(tmp_path: Path) -> None:
    src = fixture_release(tmp_path)
    assert_one_line_error(
        invoke("data", "import", "nope", "--src", str(src), "--out", str(tmp_path / "o")), "nope"
    )
    assert_one_line_error(
        invoke(
            "data", "import", "vqa-rad", "--src", str(src), "--out", str(tmp_path / "o"), "--allow-pickle"
        ),
        "--allow-pickle does not apply to 'vqa-rad'",
    )
    assert_one_line_error(
        invoke("data", "import", "slake", "--out", str(tmp_path / "o")), "--src is required"
    )
    assert_one_line_error(invoke("data", "stats", str(tmp_path)), "dataset.json")
    assert_one_line_error(invoke("data", "check", str(tmp_path / "missing")))
