"""``benchmarks/gpu_check.py`` where no GPU is: the refusal without CUDA, its records and summary from given
numbers, and its bounded benchmark runs (with stand-in scripts)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def gpu_check(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports its sibling serve_client
    return importlib.import_module("gpu_check")


def test_refuses_without_cuda_in_one_line(gpu_check: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU visible, even on a GPU machine
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [gpu_check.NO_CUDA]
    assert proc.stdout == ""
    assert not out.exists()


def test_variant_record_medians_and_peaks(gpu_check: ModuleType) -> None:
    from serve_client import Sample

    samples = [
        Sample(latency_s=2.0, completion_tokens=21, ttft_s=0.5),  # 10.5 tok/s; decode 20 / 1.5
        Sample(latency_s=1.0, completion_tokens=11, ttft_s=0.2),  # 11 tok/s; decode 10 / 0.8
        Sample(latency_s=4.0, completion_tokens=16, ttft_s=1.0),  # 4 tok/s; decode 15 / 3
        Sample(latency_s=0.1, error="CUDA out of memory"),  # counted, listed, not in the medians
    ]
    record = gpu_check.variant_record("bf16", 3.456, samples, 3 * 2**30, 5 * 2**29)
    assert record["variant"] == "bf16"
    assert record["load_s"] == 3.46
    assert record["requests"] == 4
    assert record["errors"] == ["CUDA out of memory"]
    assert record["ttft_s"] == 0.5
    assert record["latency_s"] == 2.0
    assert record["completion_tokens"] == 16.0
    assert record["tokens_per_s"] == 10.5
    assert record["decode_tokens_per_s"] == 12.5  # the median of 20 / 1.5, 10 / 0.8 and 15 / 3
    assert record["gpu_peak_after_load_gib"] == 3.0
    assert record["gpu_peak_gib"] == 2.5


def test_variant_record_without_a_successful_request(gpu_check: ModuleType) -> None:
    from serve_client import Sample

    record = gpu_check.variant_record("4bit", 1.0, [Sample(latency_s=0.2, error="boom")], 0, 0)
    assert (
        record["ttft_s"] is None and record["tokens_per_s"] is None and record["decode_tokens_per_s"] is None
    )
    assert record["errors"] == ["boom"]


def test_bench_headlines(gpu_check: ModuleType) -> None:
    serve = {
        "results": [
            {
                "facts": {
                    "label": "qwen2_5_vl-3b-random-bf16",
                    "load_s": 4.2,
                    "cuda_peak_after_load_bytes": 2**31,
                },
                "rows": [
                    {"target": "server", "mode": "stream", "concurrency": 4, "p50_s": 0.9, "ttft_p50_s": 0.1}
                    | {"tokens_per_s": 120.0, "p95_s": 1.5}
                ],
            }
        ]
    }
    (setup,) = gpu_check.bench_headline("bench_serve", serve)
    assert setup["label"] == "qwen2_5_vl-3b-random-bf16" and setup["gpu_peak_after_load_gib"] == 2.0
    assert setup["rows"] == [
        {
            "target": "server",
            "mode": "stream",
            "concurrency": 4,
            "p50_s": 0.9,
            "ttft_p50_s": 0.1,
            "tokens_per_s": 120.0,
        }
    ]
    train = {"results": {"lora": {"summary": {"samples_per_s": 3.5}, "raw": []}, "qlora": {"summary": {}}}}
    assert gpu_check.bench_headline("bench_train", train) == [
        {"mode": "lora", "samples_per_s": 3.5},
        {"mode": "qlora"},
    ]
    with pytest.raises(ValueError, match="bench_io"):
        gpu_check.bench_headline("bench_io", {})


def test_summary_lines(gpu_check: ModuleType) -> None:
    record = {
        "gpu": {"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.2},
        "model": "emma-tiny",
        "variants": [
            {
                "variant": "bf16",
                "load_s": 2.04,
                "ttft_s": 0.05,
                "tokens_per_s": 80.0,
                "decode_tokens_per_s": 95.5,
                "gpu_peak_gib": 0.9,
                "errors": ["x"],
            },
            {"variant": "4bit", "skipped": "bitsandbytes is not installed (pip install 'emma-med[cuda]')"},
        ],
        "benchmarks": {
            "bench_serve": {"timed_out": True, "returncode": -9, "wall_s": 300.4, "log": "a.log"},
            "bench_train": {"timed_out": False, "returncode": 1, "wall_s": 12.0, "log": "b.log"},
        },
    }
    assert gpu_check.summary_lines(record) == [
        "NVIDIA H100 80GB HBM3 (79 GiB), model emma-tiny",
        "  bf16: load 2.0 s, first token 0.05 s, 80.0 tok/s end to end (95.5 tok/s decode), peak 0.90 GiB, "
        "1 failed request(s)",
        "  4bit: bitsandbytes is not installed (pip install 'emma-med[cuda]')",
        "  bench_serve: timed out in 300 s (a.log)",
        "  bench_train: exit 1 in 12 s (b.log)",
    ]


def _script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "stand_in.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def test_run_bench_keeps_the_headline_of_a_finished_run(gpu_check: ModuleType, tmp_path: Path) -> None:
    command = _script(
        tmp_path,
        """
        import json, sys
        out = sys.argv[sys.argv.index("--out") + 1]
        print("training ...")
        open(out, "w").write(json.dumps({"results": {"lora": {"summary": {"samples_per_s": 2.0}}}}))
        """,
    )
    record = gpu_check.run_bench("bench_train", command, tmp_path / "check.json", timeout_s=60)
    assert record["returncode"] == 0 and not record["timed_out"]
    assert record["result"] == str(tmp_path / "check.bench_train.json")
    assert record["headline"] == [{"mode": "lora", "samples_per_s": 2.0}]
    assert (tmp_path / "check.bench_train.log").read_text() == "training ...\n"


def test_run_bench_stops_a_run_and_its_children_at_the_timeout(gpu_check: ModuleType, tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    command = _script(
        tmp_path,
        f"""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a run that does not stop when asked
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print("started", flush=True)
        time.sleep(600)
        """,
    )
    start = time.monotonic()
    record = gpu_check.run_bench("bench_serve", command, tmp_path / "check.json", timeout_s=3, grace_s=1)
    assert time.monotonic() - start < 30
    assert record["timed_out"] and record["returncode"] != 0
    assert "headline" not in record and record["log_tail"] == ["started"]
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5  # a killed process may stay a zombie until it is reaped
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(child), "the run's child process outlived the timeout"
    json.dumps(record)  # the record goes into the JSON file as it is


def _running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status
