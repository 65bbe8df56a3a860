"""Stage-3 (VQA adaptation) training throughput: EMMA's ``run_sft_stage`` against TRL's plain ``SFTTrainer``.

Claim measured (CPU mode, the default): training a stage of kind ``vqa`` through
:func:`emma.train.sft.run_sft_stage` (EMMA's freezing, LoRA config, :class:`~emma.train.collator.VLCollator`
with assistant-only labels and the image-truncation guard) is no slower in samples/s than TRL's plain
``SFTTrainer`` on the same data, the same model folder, the same LoRA adapters, the same steps and batch
size, in the same process.

- Model: a tiny random model of ``--family`` (:func:`emma.model.tiny_families.build_tiny`); both sides
  load the same saved folder in fp32.
- Stage: the ``vqa`` stage of ``recipes/smoke.yaml`` (LoRA r=4, all-linear, projector as
  ``modules_to_save``) with ``max_steps``/``batch_size`` from the command line and no intermediate saves.
- Data: ``--n`` VQA-RAD samples imported with ``run_importer("vqa-rad", --data, ..., limit=--n)``, only
  ``split == "train"``; if ``--data`` is absent, generated images + questions (said in the output).
- Baselines (TRL's own vision-language path: a ``datasets.Dataset`` of ``{"messages", "images"}`` records
  from :func:`emma.data.formats.to_trl`, ``processing_class=processor``, ``peft_config`` = the same LoRA
  config; SFTConfig defaults except output_dir / max_steps / batch size / report_to / seed):
  ``trl-default``: as described, plus ``bf16=False`` because TRL's default ``bf16=True`` refuses to start on
  a CPU. TRL's defaults include ``gradient_checkpointing=True``, which EMMA's stage does not use, so
  ``trl-no-ckpt`` (the same with ``gradient_checkpointing=False``) is the like-for-like comparison.
- Timing: from ``on_train_begin`` to the ``on_step_end`` of the last step (the training loop: data
  loading, collation, forward/backward, optimizer), via a ``TrainerCallback`` on both sides; model
  loading, LoRA wrapping, the end-of-training checkpoint and EMMA's merge + save are outside it (EMMA's whole
  call is reported separately as ``wall_s``). Peak memory: the process's resident set sampled every 5 ms
  during the loop (``/proc/self/status`` VmRSS; peak minus the RSS before the run), and
  ``torch.cuda.max_memory_allocated`` on CUDA. One warm-up run of each, then ``--runs`` rounds interleaved;
  medians. ``--threads 1`` (default): torch's two CPU threads made timings swing 10x on a shared, loaded
  machine; one thread gives a stable comparison.

GPU mode (``--gpu``): a full-size Qwen2.5-VL-3B config (the published sizes, random bf16 weights, the tiny
model's processor and special-token ids) through ``run_sft_stage`` with LoRA (bf16 base) and QLoRA (4-bit
NF4, bitsandbytes): samples/s, peak CUDA memory and an MFU estimate ``6 * N * tokens/s / peak_bf16``
(N = all parameters; the usual dense-transformer estimate, an upper bound on the useful work under LoRA,
which skips the frozen weights' gradients). Refuses when CUDA is absent.

Usage::

    python benchmarks/bench_train.py [--family qwen2_5_vl] [--data ../shared/data/vqa-rad] [--n 48]
        [--steps 8] [--batch-size 4] [--runs 5] [--threads 1] [--out benchmarks/results/bench_train.json]
    python benchmarks/bench_train.py --gpu [--steps 10] [--batch-size 4] [--image-size 448]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "vqa-rad"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "bench_train.json"
SMOKE = ROOT / "recipes" / "smoke.yaml"
TARGET_RATIO = 1.0

# Published Qwen2.5-VL-3B-Instruct sizes (config.json of the release).
QWEN25_VL_3B_TEXT = {
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 128000,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
}
QWEN25_VL_3B_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 2048,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "window_size": 112,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}
# Dense bf16 peak (TFLOP/s) by device-name fragment.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


# ------------------------------------------------------------------------------------------ measuring


class RssSampler:
    """Peak resident set of this process while running (sampled from /proc every ``interval`` s)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start_kb = _rss_kb()
        self.peak_kb = self.start_kb
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, _rss_kb())
            time.sleep(self.interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, _rss_kb())


def _rss_kb() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


class _Stop(Exception):
    """Raised by the timer at the last step when the rest of the run (save/merge) is not wanted."""


def _timer(max_steps: int, stop_at_end: bool = False) -> tuple[Any, dict[str, Any]]:
    """A TrainerCallback recording loop time (train begin → last step end) and tokens seen."""
    from transformers import TrainerCallback

    box: dict[str, Any] = {"tokens": 0, "step_s": []}

    class Timer(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            _cuda_sync()
            box["t0"] = box["last"] = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if "t1" not in box:  # step time including its data loading and collation
                _cuda_sync()
                now = time.perf_counter()
                box["step_s"].append(now - box["last"])
                box["last"] = now
            if state.global_step >= max_steps and "t1" not in box:
                _cuda_sync()
                box["t1"] = time.perf_counter()
                box["steps"] = state.global_step
                box["tokens"] = int(getattr(state, "num_input_tokens_seen", 0) or 0)
                if stop_at_end:
                    raise _Stop

    return Timer(), box


def _cuda_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _measure(
    fn: Callable[[list[Any]], Any], max_steps: int, samples: int, stop_at_end: bool = False
) -> dict[str, Any]:
    import gc

    import torch

    gc.collect()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    callback, box = _timer(max_steps, stop_at_end)
    t = time.perf_counter()
    with RssSampler() as rss, contextlib.suppress(_Stop):
        fn([callback])
    wall = time.perf_counter() - t
    loop = box["t1"] - box["t0"]
    out = {
        "loop_s": loop,
        "wall_s": wall,
        "samples_per_s": samples / loop,
        "tokens": box["tokens"],
        "step_s": box["step_s"],
        "rss_peak_mb": rss.peak_kb / 1024,
        "rss_delta_mb": (rss.peak_kb - rss.start_kb) / 1024,
    }
    if cuda:
        out["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    gc.collect()
    return out


# ------------------------------------------------------------------------------------------------ data


def load_samples(data: Path, n: int, tmp: Path) -> tuple[list[Any], Callable[[Any], Any], str]:
    """(train samples, image loader, description) — VQA-RAD if present, else generated."""
    if data.is_dir():
        from emma.data.sources import run_importer
        from emma.data.store import open_dataset

        run_importer("vqa-rad", data, tmp / "vqa-rad", limit=n)
        ds = open_dataset(tmp / "vqa-rad")
        samples = [s for s in ds.iter_samples() if (s.meta.split or "") == "train"]
        if samples:

            def load(ref: Any) -> Any:
                return ds.open_image(ref).convert("RGB")

            return samples, load, f"VQA-RAD train ({len(samples)} samples from {data})"
    return (*_generated(n), f"GENERATED images + questions ({n}; {data} not found)")


def _generated(n: int) -> tuple[list[Any], Callable[[Any], Any]]:
    import numpy as np
    from PIL import Image

    from emma.data.schema import Gold, ImageRef, Meta, Sample, TaskType, Turn

    rng = np.random.default_rng(0)
    images = {
        f"gen/{i}.png": Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)) for i in range(n)
    }
    answers = ["yes", "no", "left lung", "pneumothorax"]
    samples = [
        Sample(
            id=f"gen-{i}",
            task=TaskType("closed_vqa") if i % 2 == 0 else TaskType("open_vqa"),
            images=[ImageRef(path=f"gen/{i}.png", width=224, height=224)],
            turns=[
                Turn(role="user", content=f"Is there an abnormality in region {i}?", images=[0]),
                Turn(role="assistant", content=answers[i % len(answers)]),
            ],
            gold=Gold(answer=answers[i % len(answers)]),
            meta=Meta(split="train", source="generated"),
        )
        for i in range(n)
    ]
    return samples, lambda ref: images[ref.path]


# ----------------------------------------------------------------------------------------------- sides


def vqa_stage(steps: int, batch_size: int, **extra: Any) -> Any:
    """The ``vqa`` stage of recipes/smoke.yaml, with the benchmark's steps/batch and no mid-run saves."""
    from emma.train.recipe import load_recipe

    recipe = load_recipe(SMOKE, check_paths=False)
    stage = next(s for s in recipe.stages if s.kind == "vqa")
    update = {"max_steps": steps, "batch_size": batch_size, "save_steps": 10**6, "logging_steps": steps}
    update.update(extra)
    return stage.model_copy(update=update)


def emma_run(
    stage: Any, model_dir: Path, samples: list[Any], loader: Any, tmp: Path, seed: int
) -> Callable[[list[Any]], Any]:
    from emma.train.sft import run_sft_stage

    def run(callbacks: list[Any]) -> Any:
        out = Path(tempfile.mkdtemp(dir=tmp, prefix="emma-"))
        return run_sft_stage(stage, model_dir, out, samples, loader, seed=seed, callbacks=callbacks)

    return run


def trl_run(
    stage: Any, model_dir: Path, records: list[dict[str, Any]], tmp: Path, seed: int, **config: Any
) -> Callable[[list[Any]], Any]:
    import datasets
    import torch
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from emma.model.registry import load_model
    from emma.train.freeze import lora_config

    dataset = datasets.Dataset.from_list(records)

    def run(callbacks: list[Any]) -> Any:
        set_seed(seed)
        loaded = load_model(str(model_dir), device="auto", dtype="fp32")
        assert stage.lora is not None
        peft = lora_config(
            loaded.model,
            loaded.family,
            "vqa",
            r=stage.lora.r,
            alpha=stage.lora.alpha,
            dropout=stage.lora.dropout,
            target_modules=stage.lora.target_modules,
        )
        args = SFTConfig(
            output_dir=str(Path(tempfile.mkdtemp(dir=tmp, prefix="trl-"))),
            max_steps=stage.max_steps,
            per_device_train_batch_size=stage.batch_size,
            report_to="none",
            seed=seed,
            bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),  # default True fails on CPU
            **config,
        )
        trainer = SFTTrainer(
            model=loaded.model,
            args=args,
            train_dataset=dataset,
            processing_class=loaded.processor,
            peft_config=peft,
            callbacks=callbacks,
        )
        return trainer.train()

    return run


# ---------------------------------------------------------------------------------------------- report


def env_info() -> dict[str, Any]:
    import peft
    import torch
    import transformers
    import trl

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
        "cuda": torch.cuda.is_available(),
        "loadavg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def collate_profile(
    model_dir: Path, family: str, samples: list[Any], loader: Any, batch_size: int
) -> dict[str, float]:
    """Milliseconds per batch of the data path alone: EMMA (to_trl + VLCollator) vs TRL (dataset rows + collator)."""
    import datasets
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from emma.data.formats import to_trl
    from emma.model.registry import load_model
    from emma.train.collator import VLCollator

    processor = load_model(str(model_dir), device="cpu", dtype="fp32").processor
    batch = samples[:batch_size]
    records = [to_trl(s, loader) for s in batch]
    ds = datasets.Dataset.from_list(records)
    emma_collate = VLCollator(processor, family, 512)
    trl_collate = DataCollatorForVisionLanguageModeling(processor, max_length=1024)

    def ms(fn: Callable[[], Any], n: int = 7) -> float:
        fn()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 1000 * statistics.median(times)

    return {
        "emma_to_trl_ms": ms(lambda: [to_trl(s, loader) for s in batch]),
        "emma_collator_ms": ms(lambda: emma_collate(records)),
        "trl_dataset_rows_ms": ms(lambda: [ds[i] for i in range(len(batch))]),
        "trl_collator_ms": ms(lambda: trl_collate([dict(r) for r in records])),
    }


def cpu_main(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from emma.data.formats import to_trl
    from emma.model.tiny_families import build_tiny

    tmp = Path(tempfile.mkdtemp(prefix="bench_train-"))
    samples, loader, data_desc = load_samples(Path(args.data), args.n, tmp)
    console.print(f"data: {data_desc}")
    model_dir = build_tiny(args.family)
    stage = vqa_stage(args.steps, args.batch_size)
    records = [to_trl(s, loader) for s in samples]
    n_samples = args.steps * args.batch_size
    sides: dict[str, Callable[[list[Any]], Any]] = {
        "emma": emma_run(stage, model_dir, samples, loader, tmp, args.seed),
        "trl-default": trl_run(stage, model_dir, records, tmp, args.seed),
        "trl-no-ckpt": trl_run(stage, model_dir, records, tmp, args.seed, gradient_checkpointing=False),
    }
    warmup: dict[str, Any] = {}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in sides}
    for name, fn in sides.items():
        warmup[name] = _measure(fn, args.steps, n_samples)
    for r in range(args.runs):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for name in order:
            runs[name].append(_measure(sides[name], args.steps, n_samples))
            console.print(f"  round {r + 1}: {name:12s} {runs[name][-1]['samples_per_s']:.2f} samples/s")

    summary = {
        name: {
            "samples_per_s": _median(rs, "samples_per_s"),
            "samples_per_s_step_median": args.batch_size
            / statistics.median(t for r in rs for t in r["step_s"]),
            "loop_s": _median(rs, "loop_s"),
            "wall_s": _median(rs, "wall_s"),
            "rss_peak_mb": max(r["rss_peak_mb"] for r in rs),
            "rss_delta_mb": _median(rs, "rss_delta_mb"),
        }
        for name, rs in runs.items()
    }
    ratios = {
        f"emma/{b}": summary["emma"]["samples_per_s"] / summary[b]["samples_per_s"]
        for b in ("trl-default", "trl-no-ckpt")
    }
    step_ratios = {
        f"emma/{b}": summary["emma"]["samples_per_s_step_median"] / summary[b]["samples_per_s_step_median"]
        for b in ("trl-default", "trl-no-ckpt")
    }
    table = Table(
        title=f"stage 3 (vqa, LoRA r={stage.lora.r}) on tiny {args.family}, CPU, medians of {args.runs}"
    )
    for col in (
        "side",
        "samples/s",
        "from median step",
        "loop s",
        "whole call s",
        "peak RSS MB",
        "RSS growth MB",
        "emma ratio",
    ):
        table.add_column(col, justify="right" if col != "side" else "left")
    for name, s in summary.items():
        ratio = (
            "" if name == "emma" else f"{ratios[f'emma/{name}']:.2f}x ({step_ratios[f'emma/{name}']:.2f}x)"
        )
        table.add_row(
            name,
            f"{s['samples_per_s']:.2f}",
            f"{s['samples_per_s_step_median']:.2f}",
            f"{s['loop_s']:.2f}",
            f"{s['wall_s']:.2f}",
            f"{s['rss_peak_mb']:.0f}",
            f"{s['rss_delta_mb']:.0f}",
            ratio,
        )
    console.print(table)
    profile = collate_profile(model_dir, args.family, samples, loader, args.batch_size)
    console.print(
        "data path per batch (ms): emma to_trl {emma_to_trl_ms:.1f} + VLCollator {emma_collator_ms:.1f}; "
        "TRL dataset rows {trl_dataset_rows_ms:.1f} + collator {trl_collator_ms:.1f}".format(**profile)
    )
    like = ratios["emma/trl-no-ckpt"]
    verdict = "meets" if like >= TARGET_RATIO * 0.97 else "MISSES"
    console.print(
        f"emma / TRL (same settings, no checkpointing): {like:.2f}x — {verdict} the target (>= ~{TARGET_RATIO});"
        f" emma / TRL defaults: {ratios['emma/trl-default']:.2f}x. From the median step time: "
        f"{step_ratios['emma/trl-no-ckpt']:.2f}x and {step_ratios['emma/trl-default']:.2f}x"
    )
    return {
        "benchmark": "bench_train",
        "mode": "cpu",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "env": env_info(),
        "data": data_desc,
        "family": args.family,
        "model_dir": str(model_dir),
        "stage": stage.model_dump(mode="json"),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "samples_per_run": n_samples,
        "runs": args.runs,
        "notes": [
            (
                "trl-default: SFTConfig defaults except output_dir/max_steps/batch size/report_to/seed, and "
                "bf16=False (TRL's default bf16=True refuses to start on CPU); TRL defaults include "
                "gradient_checkpointing=True, which EMMA's stage does not use."
            ),
            "trl-no-ckpt: trl-default with gradient_checkpointing=False (like-for-like with EMMA).",
            "samples_per_s = steps*batch_size / loop time (train begin to last step end).",
            (
                f"torch threads: {args.threads or 'torch default'} (with the default 2 threads on a shared, loaded "
                "2-core machine run-to-run spread was 1-17 samples/s, i.e. meaningless; 1 thread is stable)."
            ),
        ],
        "summary": summary,
        "ratios": ratios,
        "ratios_from_median_step": step_ratios,
        "data_path_ms_per_batch": profile,
        "target_ratio": TARGET_RATIO,
        "meets_target": like >= TARGET_RATIO * 0.97,
        "warmup": warmup,
        "raw": runs,
    }


# ------------------------------------------------------------------------------------------------- gpu


def build_3b(tmp: Path, family: str) -> Path:
    """A Qwen2.5-VL-3B-sized model with random bf16 weights + the tiny model's processor, saved to ``tmp``."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from emma.model.tiny_families import build_tiny

    if family != "qwen2_5_vl":
        raise SystemExit("--gpu benchmarks the Qwen2.5-VL-3B config; use --family qwen2_5_vl")
    tiny = build_tiny(family)
    config = AutoConfig.from_pretrained(tiny)  # keeps the processor's image/video/vision token ids
    for key, value in QWEN25_VL_3B_TEXT.items():
        setattr(config.text_config, key, value)
    for key, value in QWEN25_VL_3B_VISION.items():
        setattr(config.vision_config, key, value)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    out = tmp / "qwen2_5_vl-3b-random"
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(tiny).save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    (out / "n_params.txt").write_text(str(n))
    return out


def gpu_main(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(
            "--gpu needs CUDA: torch.cuda.is_available() is False on this machine (nothing measured)"
        )
    from PIL import Image

    tmp = Path(tempfile.mkdtemp(prefix="bench_train-gpu-"))
    samples, loader, data_desc = load_samples(Path(args.data), args.n, tmp)
    size = args.image_size

    def sized(ref: Any) -> Any:
        return loader(ref).resize((size, size), Image.BICUBIC)

    console.print(f"data: {data_desc}; images resized to {size}x{size}")
    model_dir = build_3b(tmp, args.family)
    n_params = int((model_dir / "n_params.txt").read_text())
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    results: dict[str, Any] = {}
    n_samples = args.steps * args.batch_size
    for mode, quant in (("lora", None), ("qlora", "4bit")):
        lora = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear", "quantize": quant}
        from emma.train.recipe import LoraConfig

        stage = vqa_stage(
            args.steps, args.batch_size, lora=LoraConfig(**lora), max_length=4096, gradient_checkpointing=True
        )
        fn = emma_run(stage, model_dir, samples, sized, tmp, args.seed)
        runs = []
        for i in range(args.runs + 1):
            m = _measure(fn, args.steps, n_samples, stop_at_end=True)
            if i:
                runs.append(m)
        s = {
            "samples_per_s": _median(runs, "samples_per_s"),
            "tokens_per_s": statistics.median(r["tokens"] / r["loop_s"] for r in runs),
            "cuda_max_allocated_gb": max(r["cuda_max_allocated_gb"] for r in runs),
            "rss_peak_mb": max(r["rss_peak_mb"] for r in runs),
        }
        s["mfu"] = 6 * n_params * s["tokens_per_s"] / (peak * 1e12) if peak and s["tokens_per_s"] else None
        results[mode] = {"summary": s, "raw": runs, "lora": lora}
    table = Table(title=f"Qwen2.5-VL-3B config (random, {n_params / 1e9:.2f}B params) on {name}")
    for col in ("mode", "samples/s", "tokens/s", "peak CUDA GB", "MFU"):
        table.add_column(col, justify="right" if col != "mode" else "left")
    for mode, r in results.items():
        s = r["summary"]
        mfu = f"{100 * s['mfu']:.1f}%" if s["mfu"] is not None else "n/a"
        table.add_row(
            mode,
            f"{s['samples_per_s']:.2f}",
            f"{s['tokens_per_s']:.0f}",
            f"{s['cuda_max_allocated_gb']:.1f}",
            mfu,
        )
    console.print(table)
    return {
        "benchmark": "bench_train",
        "mode": "gpu",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "env": env_info(),
        "data": data_desc,
        "image_size": size,
        "n_params": n_params,
        "bf16_peak_tflops": peak,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "notes": [
            "MFU = 6 * N_all_params * tokens/s / bf16 dense peak (upper-bound estimate under LoRA).",
            "gradient checkpointing on (as the 24 GB recipes use); loop time excludes the final merge/save.",
        ],
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="qwen2_5_vl")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--n", type=int, default=48, help="VQA-RAD samples to import (train split kept)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: robust to a shared/loaded machine; 0: torch default)",
    )
    p.add_argument("--gpu", action="store_true", help="full-size 3B config, LoRA and QLoRA (CUDA only)")
    p.add_argument("--image-size", type=int, default=448, help="--gpu: images resized to this square")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads > 0 and not args.gpu:
        import torch

        torch.set_num_threads(args.threads)
    console = Console()
    result = gpu_main(args, console) if args.gpu else cpu_main(args, console)
    out = (
        Path(args.out)
        if args.out
        else (DEFAULT_OUT.with_name("bench_train_gpu.json") if args.gpu else DEFAULT_OUT)
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    console.print(f"wrote {out}")
    if not args.gpu:
        png = plot(result, out.with_suffix(".png"))
        console.print(f"wrote {png}")
    return 0


def plot(result: dict[str, Any], path: Path) -> Path:
    """Median samples/s per side with every timed run as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["summary"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    medians = [result["summary"][n]["samples_per_s"] for n in names]
    ax.bar(names, medians, color=["tab:green", "tab:gray", "tab:blue"][: len(names)])
    for i, n in enumerate(names):
        ax.scatter(
            [i] * len(result["raw"][n]),
            [r["samples_per_s"] for r in result["raw"][n]],
            color="k",
            s=12,
            zorder=3,
        )
    ax.set_ylabel("samples/s (training loop)")
    ax.set_title(f"stage 3 (vqa, LoRA) tiny {result['family']}, CPU: emma vs TRL SFTTrainer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
