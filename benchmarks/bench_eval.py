"""Evaluation harness throughput: batched vs one-by-one generation, and scoring 100k predictions.

Claims measured:

1. **The harness batches.** Questions per second on VQA-RAD test (``--limit`` questions; all 451 by
   default) through the harness's generation path (:func:`emma.eval.runner.generate`: image loading,
   request building, ``engine.generate``, durable caching) with a tiny random model of ``--family``
   behind the in-process :class:`~emma.infer.transformers_engine.TransformersEngine`, at
   ``--batch-size`` requests per engine call against one request per call. Each timed run starts from
   an empty prediction cache; the two modes alternate after a warm-up; medians over ``--runs``.
2. **Scoring is seconds, not minutes.** ``emma eval --predictions`` (:func:`emma.eval.runner.run_eval`)
   on ``--n-scoring`` synthetic predictions (40% yes/no, 10% other closed, 50% open; a mix of plain,
   tagged, hedged, empty and garbage answers) over a synthetic canonical dataset: reading the file,
   extraction and scoring, 2000-resample bootstrap CIs of every metric, breakdowns, per_sample.jsonl,
   results.json and the reports with plots. The in-memory scoring step alone is timed too.

Usage: ``python benchmarks/bench_eval.py [--data ../shared/data/vqa-rad] [--limit N] [--runs 5]
[--batch-size 8] [--family qwen2_vl] [--n-scoring 100000] [--out benchmarks/results/bench_eval.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "vqa-rad"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "bench_eval.json"


# ------------------------------------------------------------------------------------------ generation


def generation_runs(
    data: Path, limit: int | None, family: str, batch_size: int, runs: int, max_new_tokens: int, tmp: Path
) -> dict[str, Any]:
    from emma.data.sources import run_importer
    from emma.data.store import open_dataset
    from emma.eval.predictions import PredictionCache
    from emma.eval.runner import generate
    from emma.eval.tasks import get_task
    from emma.eval.tasks.base import Decoding
    from emma.infer.transformers_engine import TransformersEngine
    from emma.model.tiny_families import load_tiny

    run_importer("vqa-rad", data, tmp / "vqa-rad")
    dataset = open_dataset(tmp / "vqa-rad")
    items = list(get_task("vqa-rad").items(dataset.iter_samples("test")))
    if limit:
        items = items[:limit]
    engine = TransformersEngine(load_tiny(family), max_batch_size=batch_size)
    decoding = Decoding(max_new_tokens=max_new_tokens)

    def once(bs: int, k: int, subset: list[Any] = items) -> tuple[float, int]:
        cache = PredictionCache(tmp / f"cache-{bs}-{k}.jsonl")  # empty: every question is generated
        start = time.perf_counter()
        preds, stats = generate(
            subset, engine, cache, dataset, model_id=family, decoding=decoding, batch_size=bs
        )
        elapsed = time.perf_counter() - start
        assert len(preds) == len(subset) and not stats.errors
        return elapsed, stats.engine_calls

    once(batch_size, -1, items[: 2 * batch_size])  # warm-up (model, kernels, image decoding paths)
    once(1, -1, items[:4])
    batched: list[float] = []
    single: list[float] = []
    calls = {}
    for k in range(runs):
        t, calls[batch_size] = once(batch_size, k)
        batched.append(t)
        t, calls[1] = once(1, k)
        single.append(t)
    n = len(items)
    b, s = statistics.median(batched), statistics.median(single)
    return {
        "questions": n,
        "family": family,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "batched_runs_s": batched,
        "one_by_one_runs_s": single,
        "batched_median_s": b,
        "one_by_one_median_s": s,
        "batched_questions_per_s": n / b,
        "one_by_one_questions_per_s": n / s,
        "speedup": s / b,  # ratio of the medians
        # each batched run is timed right before a one-by-one run, so the pair shares the machine's load:
        # the median of the per-pair ratios is robust to load from other processes
        "paired_speedups": [x / y for x, y in zip(single, batched)],
        "paired_speedup_median": statistics.median(x / y for x, y in zip(single, batched)),
        "batched_min_s": min(batched),
        "one_by_one_min_s": min(single),
        "engine_calls": {"batched": calls[batch_size], "one_by_one": calls[1]},
    }


# --------------------------------------------------------------------------------------------- scoring

_CLOSED_PREDS = [
    "Yes",
    "no.",
    "Yes, there is no fracture",
    "The image is abnormal",
    "",
    "<answer>No</answer>",
    "It is not possible to say",
    "\\boxed{yes}",
]
_OPEN_GOLDS = ["left lung", "ct", "axial", "liver", "pleural effusion", "right kidney", "4", "brain"]
_OPEN_PREDS = [
    "left lung",
    "The answer is: CT",
    "axial plane",
    "",
    "I cannot determine",
    "pleural effusion on the right",
    "Final answer: 4",
    "%%%",
]


def write_synthetic(root: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """A canonical dataset of ``n`` VQA samples (one shared image) and a predictions file for it."""
    from emma.data.schema import Gold, ImageRef, Meta, Sample, TaskType, Turn
    from emma.data.store import DatasetWriter

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    kinds = rng.choice(3, size=n, p=[0.4, 0.1, 0.5])
    picks = rng.integers(0, 8, size=n)
    body = ["head", "chest", "abdomen"]
    preds_path = root / "predictions.jsonl"
    with DatasetWriter(root / "ds", name="synthetic") as writer, preds_path.open("w") as pf:
        ref = None
        for i in range(n):
            k, p = int(kinds[i]), int(picks[i])
            if k == 0:
                task, gold, pred = TaskType.CLOSED_VQA, ("yes" if p % 2 else "no"), _CLOSED_PREDS[p]
            elif k == 1:
                task, gold, pred = (
                    TaskType.CLOSED_VQA,
                    "left",
                    ["left", "right", "on the left side", ""][p % 4],
                )
            else:
                task, gold, pred = TaskType.OPEN_VQA, _OPEN_GOLDS[p], _OPEN_PREDS[(p + i) % 8]
            sample = Sample(
                id=f"s{i}",
                task=task,
                images=[ref or ImageRef(path="synthetic.png")],
                turns=[Turn(role="user", content=f"Question {i}?", images=[0])],
                gold=Gold(answer=gold),
                meta=Meta(split="test", body_part=body[i % 3], question_type=["PRES", "POS", "ABN"][p % 3]),
            )
            if ref is None:
                ref = writer.add(sample, [image]).images[0]
            else:
                writer.add(sample.model_copy(update={"images": [ref]}))
            pf.write(json.dumps({"id": sample.id, "prediction": pred}) + "\n")
    return root / "ds", preds_path


def scoring_runs(n: int, runs: int, tmp: Path) -> dict[str, Any]:
    from emma.data.store import open_dataset
    from emma.eval.runner import EvalOptions, run_eval
    from emma.eval.score_adapters import make_adapter
    from emma.eval.tasks import get_task

    t0 = time.perf_counter()
    ds, preds = write_synthetic(tmp / "synthetic", n)
    build_s = time.perf_counter() - t0
    end_to_end: list[float] = []
    scoring_only: list[float] = []
    task = get_task("vqa-rad")
    items = list(task.items(open_dataset(ds).iter_samples("test")))
    texts = {
        json.loads(line)["id"]: json.loads(line)["prediction"] for line in preds.read_text().splitlines()
    }
    metrics: dict[str, float] = {}
    for k in range(runs):
        start = time.perf_counter()
        run = run_eval(EvalOptions(task="vqa-rad", data=ds, predictions=preds, out=tmp / f"run-{k}"))
        end_to_end.append(time.perf_counter() - start)
        metrics = run.metrics
        adapter = make_adapter(task, compat=None, family=None)
        start = time.perf_counter()
        scored = adapter.score_batch(items, texts)
        adapter.metrics(scored)
        scoring_only.append(time.perf_counter() - start)
    return {
        "predictions": n,
        "synthetic_build_s": build_s,
        "end_to_end_runs_s": end_to_end,
        "end_to_end_median_s": statistics.median(end_to_end),
        "scoring_only_runs_s": scoring_only,
        "scoring_only_median_s": statistics.median(scoring_only),
        "predictions_per_s_end_to_end": n / statistics.median(end_to_end),
        "metrics": metrics,
    }


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="VQA-RAD release folder")
    parser.add_argument("--limit", type=int, default=None, help="first N test questions (default: all 451)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per mode (median reported)")
    parser.add_argument("--batch-size", type=int, default=8, help="requests per engine call when batched")
    parser.add_argument("--family", default="qwen2_vl", help="tiny model family")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per question")
    parser.add_argument("--n-scoring", type=int, default=100_000, help="synthetic predictions to score")
    parser.add_argument("--skip-generation", action="store_true", help="only the scoring benchmark")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    args = parser.parse_args(argv)
    console = Console(width=max(Console().width, 110))
    payload: dict[str, Any] = {
        "benchmark": "bench_eval",
        "claims": [
            "batched generation (one engine call per batch) is faster than one request per call",
            "scoring 100k predictions (with bootstrap CIs and reports) takes seconds, not minutes",
        ],
        "environment": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "numpy": np.__version__,
            "load_average_at_start": list(os.getloadavg()),
        },
        "settings": vars(args) | {"data": str(args.data), "out": str(args.out)},
    }
    with tempfile.TemporaryDirectory(prefix="emma-bench-eval-") as tmp_name:
        tmp = Path(tmp_name)
        if not args.skip_generation:
            if not args.data.is_dir():
                console.print(f"[yellow]{args.data} not found; skipping the generation benchmark[/]")
            else:
                import torch
                import transformers

                payload["environment"] |= {
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                }
                gen = generation_runs(
                    args.data, args.limit, args.family, args.batch_size, args.runs, args.max_new_tokens, tmp
                )
                payload["generation"] = gen
                table = Table(title=f"VQA-RAD test generation, tiny {gen['family']} (medians of {args.runs})")
                for col in ("mode", "questions", "engine calls", "median s", "questions/s"):
                    table.add_column(col, justify="left" if col == "mode" else "right")
                table.add_row(
                    f"batched ({gen['batch_size']})",
                    str(gen["questions"]),
                    str(gen["engine_calls"]["batched"]),
                    f"{gen['batched_median_s']:.2f}",
                    f"{gen['batched_questions_per_s']:.1f}",
                )
                table.add_row(
                    "one by one",
                    str(gen["questions"]),
                    str(gen["engine_calls"]["one_by_one"]),
                    f"{gen['one_by_one_median_s']:.2f}",
                    f"{gen['one_by_one_questions_per_s']:.1f}",
                )
                table.caption = (
                    f"speed-up, ratio of medians: {gen['speedup']:.2f}x; median of paired runs: "
                    f"{gen['paired_speedup_median']:.2f}x; of fastest runs: "
                    f"{gen['one_by_one_min_s'] / gen['batched_min_s']:.2f}x"
                )
                console.print(table)
        sc = scoring_runs(args.n_scoring, args.runs, tmp)
        payload["scoring"] = sc
        table = Table(title=f"scoring {sc['predictions']} synthetic predictions (medians of {args.runs})")
        for col in ("step", "median s", "predictions/s"):
            table.add_column(col, justify="left" if col == "step" else "right")
        table.add_row(
            "extraction + scoring + aggregates",
            f"{sc['scoring_only_median_s']:.2f}",
            f"{sc['predictions'] / sc['scoring_only_median_s']:.0f}",
        )
        table.add_row(
            "emma eval --predictions (end to end)",
            f"{sc['end_to_end_median_s']:.2f}",
            f"{sc['predictions_per_s_end_to_end']:.0f}",
        )
        console.print(table)
    payload["environment"]["load_average_at_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
