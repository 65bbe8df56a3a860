"""Exactly once under ``kill -9`` (issue 14): the real ``emma annotate``, ``emma synth`` and ``emma eval``
in a subprocess, SIGKILLed several times at seeded random moments, then run once more to the end.

After the final run: every input is in the outputs exactly once (no id twice), the same as an
uninterrupted run's; no line is torn; no run ever refused the store; the teacher was asked again only for
what was in flight at each kill (at most ``concurrency`` requests per kill, counted at the teacher).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emma.annotate.scripted_teacher import ScriptedTeacher
from emma.data.schema import Gold, ImageRef, Meta, Sample, TaskType, Turn
from emma.data.store import DatasetWriter, open_dataset

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "annotate"))
from test_annotate_cli import CT_REPORT  # noqa: E402
from test_annotate_cli import teacher_answer as annotate_answer  # noqa: E402
from test_annotate_synth_cli import teacher_answer as synth_answer  # noqa: E402

REAL_VQA_RAD = TESTS.parents[1] / "shared" / "data" / "vqa-rad"
EMMA = Path(sys.executable).with_name("emma")
KILLS = 3
CONCURRENCY = 8
RUN_TIMEOUT_S = 60.0

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------------------------- harness


@dataclass
class KillRun:
    """What the killed runs and the final run did."""

    kills: int = 0  # SIGKILLs delivered to a live run
    exit_codes: list[int] = field(default_factory=list)  # every run that ended by itself
    final_stderr: str = ""


def _command() -> list[str]:
    if EMMA.exists():
        return [str(EMMA)]
    return [sys.executable, "-c", "from emma.cli import app; app()"]


def run_with_kills(
    args: list[str], server: ScriptedTeacher, tmp: Path, *, seed: int, max_delay_s: float
) -> KillRun:
    """Start ``emma ARGS`` ``KILLS`` times, each SIGKILLed a seeded random delay after it first asked the
    teacher; then run it once more to the end."""
    rng = random.Random(seed)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    report = KillRun()
    for k in range(KILLS):
        before = server.stats.requests
        with (tmp / f"stderr-{k}.txt").open("wb") as err:
            proc = subprocess.Popen([*_command(), *args], stdout=subprocess.DEVNULL, stderr=err, env=env)
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while server.stats.requests == before and proc.poll() is None:
                if time.monotonic() > deadline:
                    proc.kill()
                    raise AssertionError("the run asked the teacher nothing")
                time.sleep(0.005)
            time.sleep(rng.uniform(0.02, max_delay_s))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                report.kills += 1
            else:
                report.exit_codes.append(proc.returncode)
        assert report.exit_codes.count(0) == len(report.exit_codes), (tmp / f"stderr-{k}.txt").read_text()
    final = subprocess.run(
        [*_command(), *args], capture_output=True, env=env, timeout=RUN_TIMEOUT_S, check=False
    )
    report.exit_codes.append(final.returncode)
    report.final_stderr = final.stderr.decode(errors="replace")
    return report


def clean_requests(args: list[str], server: ScriptedTeacher) -> int:
    """Teacher requests of one uninterrupted run (into its own folder)."""
    before = server.stats.requests
    done = subprocess.run([*_command(), *args], capture_output=True, timeout=RUN_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return server.stats.requests - before


def strict_jsonl(path: Path) -> list[dict[str, object]]:
    """Every line of ``path``: whole (newline-terminated) JSON objects, or the test fails."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"{path}: torn last line"
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def output_ids(out: Path) -> dict[str, list[str]]:
    """Sample ids by split of a finished dataset folder (checked line by line first)."""
    samples = out / "samples"
    leftovers = [p.name for p in samples.iterdir() if not p.name.endswith(".jsonl")]
    assert not leftovers, f"temporary files left: {leftovers}"
    by_split = {p.stem: [str(r["id"]) for r in strict_jsonl(p)] for p in sorted(samples.glob("*.jsonl"))}
    ds = open_dataset(out)  # the manifest is written and agrees with the files
    assert {s: ds.count(s) for s in ds.splits} == {s: len(v) for s, v in by_split.items()}
    return by_split


def assert_exactly_once(killed: dict[str, list[str]], clean: dict[str, list[str]]) -> None:
    every = [i for ids in killed.values() for i in ids]
    assert len(every) == len(set(every)), "an id is stored twice"
    assert {s: sorted(v) for s, v in killed.items()} == {s: sorted(v) for s, v in clean.items()}


# ------------------------------------------------------------------------------------------------ data


def noise_source(root: Path, n: int) -> Path:
    """``n`` CT-report samples, each with its own (perceptually distinct) noise image."""
    rng = np.random.default_rng(0)
    with DatasetWriter(root, name="kill-src") as writer:
        for i in range(n):
            image = Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
            writer.add(
                Sample(
                    id=f"s{i:03d}",
                    task=TaskType.REPORT,
                    images=[ImageRef(path="x.png")],
                    turns=[
                        Turn(role="user", content="Describe.", images=[0]),
                        Turn(role="assistant", content=CT_REPORT),
                    ],
                    gold=Gold(answer=CT_REPORT),
                    meta=Meta(modality="xray", body_part="chest", split="train"),
                ),
                [image],
            )
    return root


def synth_source(root: Path, n: int) -> Path:
    """``n`` single-image chest radiograph reports (pneumothorax): several synth tasks each."""
    rng = np.random.default_rng(1)
    with DatasetWriter(root, name="kill-synth-src") as writer:
        for i in range(n):
            image = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
            writer.add(
                Sample(
                    id=f"cxr-{i:03d}",
                    task=TaskType.REPORT,
                    turns=[Turn(role="user", content="Describe the radiograph.")],
                    gold=Gold(answer="Large left pneumothorax."),
                    meta=Meta(modality="xray", body_part="chest", split="train"),
                ),
                [image],
            )
    return root


# ----------------------------------------------------------------------------------------------- tests


def test_annotate_is_exactly_once_under_repeated_kill_9(tmp_path: Path) -> None:
    n = 40
    src = noise_source(tmp_path / "src", n)
    with ScriptedTeacher(annotate_answer, latency_s=0.2) as server:

        def args(out: Path) -> list[str]:
            return [
                "annotate",
                "--teacher",
                server.spec,
                "--family",
                "qwen3_vl",
                "--in",
                str(src),
                "--out",
                str(out),
                "--concurrency",
                str(CONCURRENCY),
                "--quiet",
            ]

        clean = clean_requests(args(tmp_path / "clean"), server)
        before = server.stats.requests
        run = run_with_kills(args(tmp_path / "out"), server, tmp_path, seed=14, max_delay_s=0.8)
        asked = server.stats.requests - before
    assert run.exit_codes[-1] == 0, run.final_stderr[-2000:]
    assert set(run.exit_codes) == {0}  # never a refusal (exit 2) nor a crash
    assert run.kills == KILLS
    killed_ids, clean_ids = output_ids(tmp_path / "out"), output_ids(tmp_path / "clean")
    assert_exactly_once(killed_ids, clean_ids)
    assert sorted(i for ids in killed_ids.values() for i in ids) == [f"s{i:03d}" for i in range(n)]
    assert clean == 3 * n  # coarse, roi, fine
    assert asked <= clean + CONCURRENCY * run.kills, (asked, clean)
    print(f"annotate: {run.kills} kills, {asked} requests vs {clean} uninterrupted")


def test_synth_is_exactly_once_under_repeated_kill_9(tmp_path: Path) -> None:
    src = synth_source(tmp_path / "src", 16)
    with ScriptedTeacher(synth_answer, latency_s=0.2) as server:

        def args(out: Path) -> list[str]:
            return [
                "synth",
                "--teacher",
                server.spec,
                "--in",
                str(src),
                "--out",
                str(out),
                "--concurrency",
                str(CONCURRENCY),
                "--quiet",
            ]

        clean = clean_requests(args(tmp_path / "clean"), server)
        before = server.stats.requests
        run = run_with_kills(args(tmp_path / "out"), server, tmp_path, seed=15, max_delay_s=0.6)
        asked = server.stats.requests - before
    assert set(run.exit_codes) == {0}, run.final_stderr[-2000:]
    assert run.kills == KILLS
    killed_ids, clean_ids = output_ids(tmp_path / "out"), output_ids(tmp_path / "clean")
    assert_exactly_once(killed_ids, clean_ids)
    sources = {i.split("/")[0] for ids in killed_ids.values() for i in ids}
    assert sources == {f"cxr-{i:03d}" for i in range(16)}  # every input produced its outputs
    assert asked <= clean + CONCURRENCY * run.kills, (asked, clean)
    print(f"synth: {run.kills} kills, {asked} requests vs {clean} uninterrupted")


@pytest.mark.skipif(not REAL_VQA_RAD.is_dir(), reason="shared VQA-RAD data not present")
def test_eval_is_exactly_once_under_repeated_kill_9(tmp_path: Path) -> None:
    from emma.data.sources import run_importer

    data = tmp_path / "vqa-rad"
    run_importer("vqa-rad", REAL_VQA_RAD, data)
    n, batch = 48, 4
    with ScriptedTeacher(latency_s=0.3) as server:

        def args(out: Path) -> list[str]:
            return [
                "eval",
                "--task",
                "vqa-rad",
                "--data",
                str(data),
                "--model",
                server.spec,
                "--limit",
                str(n),
                "--batch-size",
                str(batch),
                "--bootstrap",
                "100",
                "--out",
                str(out),
                "--json",
            ]

        clean = clean_requests(args(tmp_path / "clean"), server)
        before = server.stats.requests
        run = run_with_kills(args(tmp_path / "out"), server, tmp_path, seed=16, max_delay_s=0.5)
        asked = server.stats.requests - before
    assert set(run.exit_codes) == {0}, run.final_stderr[-2000:]
    assert run.kills == KILLS
    out = tmp_path / "out"
    cached = [str(r["id"]) for r in strict_jsonl(out / "predictions.jsonl")]
    assert len(cached) == len(set(cached)) == n  # each prediction generated and stored once
    rows = [str(r["id"]) for r in strict_jsonl(out / "per_sample.jsonl")]
    clean_rows = [str(r["id"]) for r in strict_jsonl(tmp_path / "clean" / "per_sample.jsonl")]
    assert rows == clean_rows and len(set(rows)) == n
    results = json.loads((out / "results.json").read_text())
    assert results["n"] == n and results["generation"]["generated"] + results["generation"]["from_cache"] == n
    assert clean == n
    assert asked <= clean + batch * run.kills, (asked, clean)  # a kill loses at most the batch in flight
    print(f"eval: {run.kills} kills, {asked} requests vs {clean} uninterrupted")


def test_a_second_run_into_a_folder_being_written_is_refused(tmp_path: Path) -> None:
    """Two writers are how a store got an id twice: the second is refused, and the first keeps going."""
    from emma.data.durable import exclusive_folder

    src = noise_source(tmp_path / "src", 2)
    out = tmp_path / "out"
    with ScriptedTeacher(annotate_answer) as server, exclusive_folder(out):
        args = ["annotate", "--teacher", server.spec, "--in", str(src), "--out", str(out), "--quiet"]
        done = subprocess.run([*_command(), *args], capture_output=True, timeout=RUN_TIMEOUT_S, check=False)
        assert server.stats.requests == 0
    assert done.returncode == 2
    message = done.stderr.decode().strip()
    assert message.count("\n") == 0 and f"is being written by pid {os.getpid()}" in message
