"""``benchmarks/bench_quant_accuracy.py`` end to end on a tiny model and a synthetic dataset: the real
converter, the GGUF read back into the VLM, `emma eval` on both and `emma eval compare`."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from holdout_data import write_synthetic

from emma.train.gguf_export import find_converter

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"

needs_converter = pytest.mark.skipif(
    find_converter() is None or importlib.util.find_spec("sentencepiece") is None,
    reason="llama.cpp's converter is not installed: pip install 'emma-med[gguf]'; emma export --install-converter",
)


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("bench_quant_accuracy")


def _per_sample(run: Path, predictions: dict[str, str | None]) -> None:
    run.mkdir(parents=True)
    rows = [json.dumps({"id": k, "prediction": v}) for k, v in predictions.items()]
    (run / "per_sample.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")


def test_same_answer_rate_compares_normalised_answers(bench: ModuleType, tmp_path: Path) -> None:
    _per_sample(tmp_path / "a", {"1": "No", "2": "Right lung", "3": None, "4": "yes"})
    _per_sample(tmp_path / "b", {"1": "no.", "2": "left lung", "3": "", "5": "yes"})
    # 1 and 3 agree, 2 does not, 4 and 5 are not shared.
    assert bench._agreement(tmp_path / "a", tmp_path / "b") == pytest.approx(2 / 3)


@needs_converter
def test_bench_runs_full_and_quantised_variants(tmp_path: Path) -> None:
    data = write_synthetic(tmp_path / "data")
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCHMARKS / "bench_quant_accuracy.py"), "--model", "tiny:fast_vlm"]
    cmd += ["--data", str(data), "--limit", "3", "--quants", "q8_0", "--runs", str(tmp_path / "runs")]
    env = dict(os.environ, EMMA_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    result = json.loads(out.read_text())
    assert set(result["variants"]) == {"full", "q8_0"} and result["n"] == 3
    q8 = result["variants"]["q8_0"]
    assert q8["gguf_bytes"] > 0 and q8["n"] == 3 and 0.0 <= q8["same_answer"] <= 1.0
    headline = result["headline"]
    assert q8["compare"]["metrics"][headline]["n"] == 3  # paired on the same three samples
    table = out.with_suffix(".md").read_text()
    assert "| q8_0 |" in table and "delta vs full" in table
