"""What caching the frozen tower's features saves when emma-tiny trains: the same VQA stage with and without.

    python benchmarks/bench_feature_cache.py [--data runs/data/vqa-rad] [--images 24] [--runs 3]
        [--out benchmarks/results/bench_feature_cache.json]

The stage is step 1 of ``recipes/emma-tiny.yaml`` (kind ``vqa``, LoRA r 16 on all linear layers + the
projector, batch 8, fp32) without its projector start, from ``emma-tiny:init:astra`` (SmolLM2-135M +
Astra's ResNet-152, the tower shipped when this was measured; not measured on the lighter EfficientNet-Lite0
shipped since), for one epoch over every VQA-RAD train question on the first ``--images`` train images.
VQA-RAD train asks 5.7 questions of each image, so, as in the real stage, most samples show an image
already seen. ``cached``: :class:`~emma.train.feature_cache.TowerFeatureCache` (each image's tower output
computed once); ``uncached``: the same with ``enabled=False`` (the tower, still frozen and in eval mode,
runs at every step). Both train to the same weights (``tests/train/test_feature_cache.py``). Timing: the
Trainer's own ``train_runtime`` (the training loop: data, tower, language model, optimizer; loading and the
final merge + save are outside it). ``--runs`` rounds, the two interleaved, after one warm-up run;
medians and the uncached/cached ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from emma.data.store import open_dataset
from emma.model.emma_tiny import init_dir
from emma.train.feature_cache import TowerFeatureCache
from emma.train.recipe import LoraConfig, StageConfig
from emma.train.sft import run_sft_stage

PROMPT = "{question}\nAnswer the question using a single word or phrase."


def _samples(data: Path, images: int) -> tuple[list[Any], Any]:
    dataset = open_dataset(data)
    samples = list(dataset.iter_samples("train"))
    keep: list[str] = []
    for sample in samples:
        key = str(sample.images[0].sha256)
        if key not in keep and len(keep) < images:
            keep.append(key)
    chosen = [s for s in samples if str(s.images[0].sha256) in keep]
    return chosen, dataset.open_image


def _stage(steps: int) -> StageConfig:
    return StageConfig(
        name="vqa",
        kind="vqa",
        datasets=["vqarad"],
        max_steps=steps,
        learning_rate=3e-4,
        warmup_ratio=0.03,
        batch_size=8,
        max_length=256,
        bf16=False,
        save_steps=10_000,
        logging_steps=10,
        lora=LoraConfig(r=16, alpha=32, dropout=0.05, target_modules="all-linear"),
    )


def _one(samples: list[Any], loader: Any, steps: int, cached: bool) -> dict[str, float]:
    cache = TowerFeatureCache(enabled=cached)
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        result = run_sft_stage(
            _stage(steps), init_dir(encoder="astra"), Path(tmp), samples, loader, feature_cache=cache
        )
    runtime = next(h["train_runtime"] for h in reversed(result.log_history) if "train_runtime" in h)
    return {"train_runtime_s": float(runtime), "computed": cache.misses, "reused": cache.hits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("runs/data/vqa-rad"))
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_feature_cache.json"))
    args = parser.parse_args()
    samples, loader = _samples(args.data, args.images)
    steps = max(1, len(samples) // 8)  # one epoch
    print(f"{len(samples)} questions on {args.images} images, {steps} steps of 8")
    _one(samples, loader, steps, True)  # warm-up: file caches, kernels
    rounds: dict[str, list[dict[str, float]]] = {"cached": [], "uncached": []}
    for i in range(args.runs):
        for name in ("cached", "uncached"):
            rounds[name].append(_one(samples, loader, steps, name == "cached"))
            print(f"round {i + 1} {name}: {rounds[name][-1]}")
    median = {k: statistics.median(r["train_runtime_s"] for r in v) for k, v in rounds.items()}
    result = {
        "questions": len(samples),
        "images": args.images,
        "steps": steps,
        "batch_size": 8,
        "runs": args.runs,
        "rounds": rounds,
        "median_train_runtime_s": median,
        "median_step_s": {k: v / steps for k, v in median.items()},
        "uncached_over_cached": median["uncached"] / median["cached"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("median_step_s", "uncached_over_cached")}, indent=1))


if __name__ == "__main__":
    main()
