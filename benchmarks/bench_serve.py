"""Serving latency and throughput: the OpenAI-compatible server against in-process ``engine.generate``.

Claims measured (issue 3, "Measured"):

- server overhead at concurrency 1: median request latency through ``emma serve`` (HTTP on loopback, the
  real ``openai`` client, base64 PNG decoded through emma.io, queue, batcher, JSON) over the median
  latency of in-process ``engine.generate`` on the same request, minus one; target <= 10%;
- batching raises throughput: completion tokens/s of the server at concurrency 16 over concurrency 1,
  and over the same server started with ``--max-batch-size 1`` (no batching) at concurrency 16;
- time to first token (``engine.stream`` in-process; ``stream: true`` SSE through the server), p50/p95
  latency, requests/s, completion tokens/s at concurrency 1, 4 and 16, and peak RSS of each process.

Set-up. One model: a tiny random-weight model of ``--family`` from :mod:`emma.model.tiny_families`
(the tiniest real-architecture model available until emma-tiny lands), saved to its cache folder. The
in-process engine and both servers load that same folder the same way (``emma serve --model FOLDER``,
the real CLI, each server in its own subprocess on a free 127.0.0.1 port). One fixed request, repeated: a system
message, one small PNG (pydicom's ``CT_small.dcm`` through emma.io, saved as PNG) and a short question;
greedy, ``max_tokens`` fixed. There is no ``ignore_eos``: the completion tokens actually generated are
reported (a random model rarely stops early). The in-process request carries the same PIL image emma.io
makes of the PNG, so both paths build the same prompt; the first answers of the two paths are compared.

Loops. Concurrency 1 (the overhead claim): in-process and server requests alternate one by one (the
order flips every pair), so both see the same load on this shared machine; the same for streaming
(``engine.stream`` against ``stream: true``). Server at concurrency ``c`` > 1: closed loop, ``c`` client
threads sharing one ``openai.OpenAI`` client, each sending its next request when the previous one
returns, ``--requests`` per level (at least ``2 * c``; ``--stream-requests``, at least ``c``, streamed).
In-process at ``c`` > 1: ``engine.generate`` on waves of ``c`` identical requests (the engine batches up
to ``--max-batch-size``), each request's latency being its wave's wall time. Every loop is bounded by a
request count and a deadline (``--phase-timeout-s``); no run starts after ``--budget-s``. After a
warm-up, ``--runs`` runs, each of every phase; per-run statistics, medians over runs. torch uses
``--threads`` intra-op threads in every process (1 on CPU by default: the tiny model gains nothing from
more, and with 2 threads on 2 shared cores OpenMP stalls behind other processes, 10x swings).

Peak RSS: ``VmHWM`` from ``/proc/PID/status`` of each server process, ``getrusage`` of this process
(the in-process engine plus the client threads). Both servers and the clients share this machine's CPU
cores with each other (the idle ones sleep).

``--gpu``: the same measurements with a full-size Qwen2.5-VL-3B configuration (explicit sizes of the
released checkpoint, random weights; memory and speed do not depend on weight values) in bf16 and in
bitsandbytes 4-bit, with ``torch.cuda.max_memory_allocated`` per phase; refuses when CUDA is absent.
The 4-bit variant runs in-process only (``emma serve`` has no quantization option).

Usage::

    python benchmarks/bench_serve.py [--family qwen2_5_vl] [--runs 5] [--max-tokens 32]
        [--concurrency 1,4,16] [--out benchmarks/results/bench_serve.json]
    python benchmarks/bench_serve.py --gpu [--out benchmarks/results/bench_serve_gpu.json]
    python benchmarks/bench_serve.py --gpu-check-config   # parameter counts of the 3B config, no GPU

The request, the server launcher and the loops are in ``serve_client.py`` (shared with bench_tiny.py
and bench_serve_bombs.py), the medians, claims, tables and plot in ``serve_summary.py``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from rich.console import Console
from serve_client import (
    IN_PROCESS,
    QUESTION,
    SERVER,
    SERVER_NOBATCH,
    SYSTEM_TEXT,
    Phase,
    ServerProcess,
    Workload,
    closed_loop,
    environment,
    inprocess_generate_one,
    inprocess_generate_phase,
    inprocess_stream_one,
    make_workload,
    mib,
    openai_call,
    openai_client,
    paired_phases,
    proc_status_kib,
    self_peak_rss_mib,
    sequential_phase,
    server_phase,
    servers,
)
from serve_summary import plot, print_tables, summarize

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_OUT = RESULTS / "bench_serve.json"
DEFAULT_GPU_OUT = RESULTS / "bench_serve_gpu.json"


# -------------------------------------------------------------------------------------------- suite


@dataclass
class Setup:
    """One model configuration to measure."""

    label: str
    folder: Path
    device: str  # "cpu" or "cuda"
    dtype: str  # auto, fp32, bf16
    quantization: str | None = None
    serve: bool = True  # run the server phases (emma serve has no quantization option)


def _cuda_reset() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _cuda_peak() -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


def n_requests(args: argparse.Namespace, concurrency: int) -> int:
    return max(args.requests, 2 * concurrency)


def n_streams(args: argparse.Namespace, concurrency: int) -> int:
    return max(args.stream_requests, concurrency)


def _on_device(on_cuda: bool, measure: Callable[[], Phase]) -> Phase:
    """Run an in-process phase, recording the CUDA allocation peak during it (CUDA only)."""
    if on_cuda:
        _cuda_reset()
    phase = measure()
    phase.cuda_peak_bytes = _cuda_peak() if on_cuda else None
    return phase


def load_setup(setup: Setup, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The in-process engine of ``setup`` (loaded as ``emma serve`` loads it) and facts about it."""
    import torch

    from emma.infer.factory import load_engine

    on_cuda = setup.device.startswith("cuda")
    if on_cuda:
        torch.cuda.empty_cache()
        _cuda_reset()
    t0 = time.perf_counter()
    engine = load_engine(
        str(setup.folder),
        device=setup.device,
        dtype=setup.dtype,
        quantization=setup.quantization,
        max_batch_size=args.max_batch_size,
        allow_download=False,
    )
    facts: dict[str, Any] = {
        "label": setup.label,
        "device": setup.device,
        "dtype": str(engine.loaded.dtype),
        "quantization": setup.quantization,
        "parameters": sum(p.numel() for p in engine.model.parameters()),
        "load_s": round(time.perf_counter() - t0, 2),
        "bench_process_rss_after_load_mib": mib(proc_status_kib("self", "VmRSS")),
    }
    if on_cuda:
        facts["cuda_memory_after_load_bytes"] = int(torch.cuda.memory_allocated())
        facts["cuda_peak_after_load_bytes"] = _cuda_peak()
    return engine, facts


def warm_up(
    engine: Any,
    running: dict[str, ServerProcess],
    clients: dict[str, Any],
    workload: Workload,
    args: argparse.Namespace,
    facts: dict[str, Any],
) -> None:
    """Unrecorded requests on every path, and the check that server and engine answer alike."""
    first = engine.generate([workload.engine_request()])[0]
    engine.generate([workload.engine_request() for _ in range(args.max_batch_size)])
    inprocess_stream_one(engine, workload)
    facts["prompt_tokens"] = first.prompt_tokens
    facts["in_process_answer_tokens"] = first.completion_tokens
    for label, server in running.items():
        client = clients[label]
        check = client.chat.completions.create(
            model=server.model_name,
            messages=workload.openai_messages(),
            max_tokens=workload.max_tokens,
            temperature=0.0,
        )
        facts[f"{label}_answer_matches_in_process"] = check.choices[0].message.content == first.text
        facts[f"{label}_prompt_tokens"] = check.usage.prompt_tokens if check.usage else None
        openai_call(client, server.model_name, workload, stream=True)
        burst = args.max_batch_size
        closed_loop(
            burst,
            burst,
            args.phase_timeout_s,
            partial(openai_call, client, server.model_name, workload, stream=False),
        )


def one_run(
    run: int,
    engine: Any,
    running: dict[str, ServerProcess],
    clients: dict[str, Any],
    workload: Workload,
    args: argparse.Namespace,
    on_cuda: bool,
) -> list[Phase]:
    """Every phase once: concurrency 1 paired (in-process / server), then in-process waves, the server's
    closed loops (non-streaming, streaming), and the no-batching server at the highest concurrency."""
    deadline = args.phase_timeout_s
    phases: list[Phase] = []
    server = running.get(SERVER)
    paired = server is not None and 1 in args.concurrency
    if server is not None and paired:
        client = clients[SERVER]
        for mode, n, local_call in (
            ("generate", n_requests(args, 1), lambda: inprocess_generate_one(engine, workload)),
            ("stream", n_streams(args, 1), lambda: inprocess_stream_one(engine, workload)),
        ):
            remote_call = partial(openai_call, client, server.model_name, workload, stream=mode == "stream")
            if on_cuda:
                _cuda_reset()
            local, remote = paired_phases(server, mode, n, run, deadline, local_call, remote_call)
            local.cuda_peak_bytes = _cuda_peak() if on_cuda else None
            phases += [local, remote]
    else:
        stream_call = partial(inprocess_stream_one, engine, workload)
        phases.append(
            _on_device(
                on_cuda,
                lambda: sequential_phase(
                    IN_PROCESS, "stream", n_streams(args, 1), run, deadline, stream_call
                ),
            )
        )
    for c in args.concurrency:
        if c == 1 and paired:
            continue
        measure = partial(
            inprocess_generate_phase,
            engine,
            workload,
            concurrency=c,
            n=n_requests(args, c),
            run=run,
            deadline_s=deadline,
        )
        phases.append(_on_device(on_cuda, measure))
    if server is not None:
        for mode in ("generate", "stream"):
            for c in args.concurrency:
                if c == 1 and paired:
                    continue
                n = n_requests(args, c) if mode == "generate" else n_streams(args, c)
                phases.append(
                    server_phase(
                        server,
                        clients[SERVER],
                        workload,
                        target=SERVER,
                        mode=mode,
                        concurrency=c,
                        n=n,
                        run=run,
                        deadline_s=deadline,
                    )
                )
    if SERVER_NOBATCH in running:
        c = max(args.concurrency)
        phases.append(
            server_phase(
                running[SERVER_NOBATCH],
                clients[SERVER_NOBATCH],
                workload,
                target=SERVER_NOBATCH,
                mode="generate",
                concurrency=c,
                n=n_requests(args, c),
                run=run,
                deadline_s=deadline,
            )
        )
    return phases


def run_suite(setup: Setup, workload: Workload, args: argparse.Namespace, console: Console) -> dict[str, Any]:
    """Load, start the servers, warm up, then ``args.runs`` runs of every phase; raw phases and facts."""
    engine, facts = load_setup(setup, args)
    console.print(
        f"[bold]{setup.label}[/]: loaded in {facts['load_s']:.1f} s ({facts['parameters']:,} parameters)"
    )
    specs = [(SERVER, args.max_batch_size), (SERVER_NOBATCH, 1)] if setup.serve else []
    phases: list[Phase] = []
    with servers(specs, str(setup.folder), setup.device, setup.dtype, args.threads) as running:
        clients = {label: openai_client(s.url, max(args.concurrency)) for label, s in running.items()}
        try:
            warm_up(engine, running, clients, workload, args, facts)
            suite_start = time.perf_counter()
            for run in range(args.runs):
                if run > 0 and time.perf_counter() - suite_start > args.budget_s:
                    console.print(
                        f"[yellow]budget of {args.budget_s:.0f} s spent: stopping after {run} run(s)[/]"
                    )
                    break
                phases += one_run(
                    run, engine, running, clients, workload, args, setup.device.startswith("cuda")
                )
                console.print(f"  run {run + 1}/{args.runs} done ({time.perf_counter() - suite_start:.0f} s)")
        finally:
            for client in clients.values():
                client.close()
    facts["servers"] = {
        label: {
            "model": s.model_name,
            "rss_after_start_mib": s.rss_after_start_mib,
            "peak_rss_mib": s.peak_rss_mib,
        }
        for label, s in running.items()
    }
    facts["bench_process_peak_rss_mib"] = self_peak_rss_mib()
    return {"facts": facts, "phases": phases}


# ---------------------------------------------------------------------------------- GPU (3B config)

# Qwen2.5-VL-3B-Instruct's released config.json, written out so that no hub access is needed.
QWEN25_VL_3B_TEXT: dict[str, Any] = {
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
}
QWEN25_VL_3B_VISION: dict[str, Any] = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 2048,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "hidden_act": "silu",
}
QWEN25_VL_MIN_PIXELS = 56 * 56  # the released preprocessor's bounds
QWEN25_VL_MAX_PIXELS = 28 * 28 * 16384


def qwen25_vl_config(tokenizer: Any, text: dict[str, Any], vision: dict[str, Any]) -> Any:
    """A Qwen2_5_VLConfig of the given sizes whose special token ids are the tokenizer's (the tiny
    Qwen-style tokenizer: SmolLM2's vocabulary plus Qwen's vision tokens, all below ``vocab_size``)."""
    from transformers import Qwen2_5_VLConfig

    ids = {
        name: tokenizer.convert_tokens_to_ids(tok)
        for name, tok in (
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        )
    }
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if max(ids.values()) >= text["vocab_size"] or eos >= text["vocab_size"]:
        raise ValueError("tokenizer ids do not fit the vocabulary size")
    text_config = dict(
        text,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
    )
    config = Qwen2_5_VLConfig(text_config=text_config, vision_config=dict(vision), **ids)
    config.tie_word_embeddings = True  # as the 3B checkpoint
    config.get_text_config().tie_word_embeddings = True
    return config


def build_random_qwen25_vl(
    folder: Path,
    *,
    text: dict[str, Any],
    vision: dict[str, Any],
    device: str,
    min_pixels: int,
    max_pixels: int,
) -> Path:
    """Save a random-weight Qwen2.5-VL of the given sizes (bf16) plus a processor into ``folder``.

    The processor is the tiny qwen2_5_vl one (same chat template and vision tokens) with the image
    processor's pixel bounds set to ``min_pixels``/``max_pixels``.
    """
    import torch
    from transformers import AutoModelForImageTextToText
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from emma.model.tiny_families import load_tiny

    processor = load_tiny("qwen2_5_vl").processor
    processor.image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=vision["patch_size"],
        merge_size=vision["spatial_merge_size"],
        temporal_patch_size=vision["temporal_patch_size"],
    )
    tokenizer = processor.tokenizer
    config = qwen25_vl_config(tokenizer, text, vision)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    )
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return folder


def check_3b_config(console: Console) -> int:
    """Build the 3B config on the meta device and print its parameter counts (no GPU, no weights)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from emma.model.tiny_families import load_tiny

    config = qwen25_vl_config(
        load_tiny("qwen2_5_vl").processor.tokenizer, QWEN25_VL_3B_TEXT, QWEN25_VL_3B_VISION
    )
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for n, p in model.named_parameters() if ".visual." in f".{n}")
    console.print(
        f"Qwen2.5-VL-3B config: {total:,} parameters ({vision:,} vision, {total - vision:,} language), "
        f"bf16 weights {total * 2 / 2**30:.2f} GiB"
    )
    return 0


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from emma.model.tiny_families import TINY_FAMILIES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--family", default="qwen2_5_vl", choices=TINY_FAMILIES, help="tiny model family (CPU run)"
    )
    parser.add_argument(
        "--runs", type=int, default=5, help="measured runs after the warm-up (medians reported)"
    )
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request (greedy)")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client concurrencies")
    parser.add_argument(
        "--requests", type=int, default=16, help="non-streaming requests per level (>= 2 x concurrency)"
    )
    parser.add_argument(
        "--stream-requests", type=int, default=8, help="streamed requests per level (>= concurrency)"
    )
    parser.add_argument("--max-batch-size", type=int, default=8, help="server and engine batch bound")
    parser.add_argument("--dtype", default="auto", help="dtype of the CPU run (auto = fp32)")
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="resize the test image to N x N (default: CPU 128, GPU 512)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads in this process and the servers (default: CPU run 1, GPU run "
        "torch's default)",
    )
    parser.add_argument(
        "--phase-timeout-s", type=float, default=60.0, help="no request starts later in a loop"
    )
    parser.add_argument(
        "--budget-s", type=float, default=240.0, help="no new run starts after this (at least one runs)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"JSON results (default {DEFAULT_OUT.name}, GPU {DEFAULT_GPU_OUT.name})",
    )
    parser.add_argument(
        "--plot", type=Path, default=None, help="PNG plot (default: next to --out); 'none' to skip"
    )
    parser.add_argument(
        "--gpu", action="store_true", help="Qwen2.5-VL-3B config, random weights, bf16 and 4-bit, on CUDA"
    )
    parser.add_argument(
        "--gpu-model-dir", type=Path, default=None, help="where to save (or reuse) the 3B random model"
    )
    parser.add_argument("--gpu-variants", default="bf16,4bit", help="comma-separated: bf16, 4bit")
    parser.add_argument(
        "--gpu-check-config", action="store_true", help="print the 3B config's parameter counts and exit"
    )
    args = parser.parse_args(argv)
    args.concurrency = sorted({int(c) for c in str(args.concurrency).split(",") if c.strip()})
    if not args.concurrency or min(args.concurrency) < 1 or max(args.concurrency) > 64:
        parser.error("--concurrency: integers between 1 and 64")
    if not 1 <= args.runs <= 20 or not 1 <= args.max_tokens <= 1024 or not 1 <= args.requests <= 256:
        parser.error("--runs 1..20, --max-tokens 1..1024, --requests 1..256")
    if not 1 <= args.stream_requests <= 64 or not 1 <= args.max_batch_size <= 64:
        parser.error("--stream-requests 1..64, --max-batch-size 1..64")
    if args.threads is not None and not 1 <= args.threads <= 256:
        parser.error("--threads 1..256")
    if args.threads is None and not args.gpu:
        args.threads = 1
    if args.image_size is not None and not 28 <= args.image_size <= 2048:
        parser.error("--image-size 28..2048")
    args.gpu_variants = [v.strip() for v in str(args.gpu_variants).split(",") if v.strip()]
    if any(v not in ("bf16", "4bit") for v in args.gpu_variants):
        parser.error("--gpu-variants: bf16 and/or 4bit")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)
    if args.gpu_check_config:
        return check_3b_config(console)

    import torch

    from emma.model.tiny_families import build_tiny

    if args.gpu and not torch.cuda.is_available():
        console.print(
            "[red]--gpu needs a CUDA device and none is available here (torch.cuda.is_available() is "
            "False); run without --gpu for the CPU benchmark.[/]"
        )
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = args.out or (DEFAULT_GPU_OUT if args.gpu else DEFAULT_OUT)
    skip_plot = args.plot is not None and str(args.plot).lower() == "none"
    plot_path = None if skip_plot else (args.plot or out.with_suffix(".png"))
    started = time.perf_counter()
    env = environment()
    notes: list[str] = []
    if env["loadavg_start"][0] > env["cpus_usable"]:
        warning = (
            f"load average {env['loadavg_start'][0]:.1f} over {env['cpus_usable']} CPUs at the start: "
            "other processes compete for the cores; expect noisy timings"
        )
        notes.append(warning)
        console.print(f"[yellow]{warning}[/]")
    with tempfile.TemporaryDirectory(prefix="emma-bench-") as tmp:
        workdir = Path(tmp)
        if args.gpu:
            workload = make_workload(workdir, args.max_tokens, args.image_size or 512)
            folder = args.gpu_model_dir or workdir / "qwen2_5_vl-3b-random"
            if not (folder / "config.json").exists():
                console.print(f"building the random Qwen2.5-VL-3B model in {folder} ...")
                build_random_qwen25_vl(
                    folder,
                    text=QWEN25_VL_3B_TEXT,
                    vision=QWEN25_VL_3B_VISION,
                    device="cuda",
                    min_pixels=QWEN25_VL_MIN_PIXELS,
                    max_pixels=QWEN25_VL_MAX_PIXELS,
                )
            setups = []
            for variant in args.gpu_variants:
                if variant == "4bit" and importlib.util.find_spec("bitsandbytes") is None:
                    notes.append("4-bit skipped: bitsandbytes is not installed")
                    continue
                setups.append(
                    Setup(
                        f"qwen2_5_vl-3b-random-{variant}",
                        folder,
                        "cuda",
                        "bf16",
                        quantization="4bit" if variant == "4bit" else None,
                        serve=variant == "bf16",
                    )
                )
            notes.append("4-bit runs in-process only: emma serve has no quantization option")
        else:
            workload = make_workload(workdir, args.max_tokens, args.image_size)
            folder = build_tiny(args.family)
            setups = [Setup(f"tiny-{args.family}", folder, "cpu", args.dtype)]
        console.print(
            f"workload: {workload.source}, max_tokens {workload.max_tokens}, greedy; "
            f"concurrency {args.concurrency}; {args.runs} run(s)"
        )
        results = []
        for setup in setups:
            outcome = run_suite(setup, workload, args, console)
            gc.collect()  # the setup's engine is gone: free its memory before the next setup loads
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            rows, claims = summarize(outcome["phases"])
            print_tables(
                console, f"bench_serve: {setup.label} ({setup.device})", rows, claims, outcome["facts"]
            )
            results.append(
                {
                    "facts": outcome["facts"],
                    "rows": rows,
                    "claims": claims,
                    "phases": [p.to_json() for p in outcome["phases"]],
                }
            )
    env["loadavg_end"] = list(os.getloadavg())
    total_s = time.perf_counter() - started
    report = {
        "benchmark": "bench_serve",
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(argv),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "workload": {
            "image": workload.source,
            "width": workload.width,
            "height": workload.height,
            "system": SYSTEM_TEXT,
            "question": QUESTION,
            "max_tokens": workload.max_tokens,
            "temperature": 0.0,
        },
        "environment": env,
        "total_s": round(total_s, 1),
        "notes": notes
        + [
            "random weights: answers are noise; completion tokens are those actually generated (no ignore_eos)",
            "in-process non-streaming latency at concurrency c is the wall time of its engine.generate wave of c",
            "server and clients share the machine's cores; server_side_p50_s is the server's audit-log latency",
        ],
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    console.print(f"wrote {out} ({total_s:.0f} s in all)")
    if plot_path is not None:
        plot(plot_path, results)
        console.print(f"wrote {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
