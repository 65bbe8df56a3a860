"""GPU check: one command on a GPU machine, a few minutes, every number recorded with the card's name.

Usage::

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json [--model emma-tiny]
        [--requests 5] [--max-tokens 64] [--bench-timeout-s 300] [--skip-benches]

1. Without CUDA it refuses with one line and exit code 2 (nothing is written).
2. The card: ``torch.cuda.get_device_name(0)`` and its memory, with the versions of a result file.
3. The model (``--model``: any spec :mod:`emma.model.registry` accepts: ``emma-tiny``, a folder, a hub
   id) loaded on the GPU in bf16 and in 4-bit (bitsandbytes NF4; when bitsandbytes is not installed, or
   the load fails, the 4-bit entry says why). For each: the load time, then ``--requests`` greedy
   streamed generations of at most ``--max-tokens`` tokens about pydicom-data's RG1 chest radiograph
   (chat mode, through :class:`emma.infer.chat.ChatSession`): time to first token (first text delta),
   tokens/s end to end (completion tokens over latency) and decode tokens/s ((tokens - 1) over latency
   minus time to first token), medians; peak GPU memory (``torch.cuda.max_memory_allocated``) after the
   load and over the generations.
4. ``bench_serve.py --gpu`` and ``bench_train.py --gpu``, shortened to one run each, each in its own
   process group, stopped after ``--bench-timeout-s``. Their JSON and logs go beside ``--out``; the
   record keeps their exit code, wall time and headline numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from serve_client import Sample, environment, stream_request

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
IMAGE_NAME = "RG1_UNCI.dcm"
QUESTION = "Describe the findings in this chest radiograph."
NO_CUDA = "gpu_check needs a CUDA GPU and torch.cuda.is_available() is False here; nothing was measured"
GIB = 2**30
# Each benchmark's GPU mode, shortened to one run (options as on a command line).
BENCH_ARGS: dict[str, str] = {
    "bench_serve": "--gpu --runs 1 --concurrency 1,4 --requests 8 --stream-requests 4 --budget-s 60 "
    "--phase-timeout-s 30 --plot none",
    "bench_train": "--gpu --runs 1 --steps 4",
}


# ------------------------------------------------------------------------------------------ records


def _median(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return round(statistics.median(kept), 4) if kept else None


def variant_record(
    variant: str, load_s: float, samples: Sequence[Sample], load_peak_bytes: int, peak_bytes: int
) -> dict[str, Any]:
    """One load variant's numbers: the load, the medians over its generations, the peak GPU memory."""
    ok = [s for s in samples if s.error is None]
    decode = [
        (s.completion_tokens - 1) / (s.latency_s - s.ttft_s)
        for s in ok
        if s.ttft_s is not None and s.completion_tokens >= 2 and s.latency_s > s.ttft_s
    ]
    return {
        "variant": variant,
        "load_s": round(load_s, 2),
        "requests": len(samples),
        "errors": [s.error for s in samples if s.error is not None],
        "ttft_s": _median([s.ttft_s for s in ok]),
        "latency_s": _median([s.latency_s for s in ok]),
        "completion_tokens": _median([float(s.completion_tokens) for s in ok]),
        "tokens_per_s": _median([s.completion_tokens / s.latency_s for s in ok if s.latency_s > 0]),
        "decode_tokens_per_s": _median(decode),
        "gpu_peak_after_load_gib": round(load_peak_bytes / GIB, 3),
        "gpu_peak_gib": round(peak_bytes / GIB, 3),
    }


def bench_headline(name: str, result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The few numbers of a bench_serve / bench_train GPU result file worth seeing next to the card."""
    if name == "bench_serve":
        keep = ("target", "mode", "concurrency", "p50_s", "ttft_p50_s", "tokens_per_s")
        return [
            {
                "label": setup["facts"]["label"],
                "load_s": setup["facts"].get("load_s"),
                "gpu_peak_after_load_gib": _gib(setup["facts"].get("cuda_peak_after_load_bytes")),
                "rows": [{k: row.get(k) for k in keep} for row in setup["rows"]],
            }
            for setup in result.get("results", [])
        ]
    if name == "bench_train":
        return [{"mode": mode, **r["summary"]} for mode, r in result.get("results", {}).items()]
    raise ValueError(f"no headline for {name!r}")


def _gib(value: int | None) -> float | None:
    return None if value is None else round(value / GIB, 3)


def _num(value: float | None, unit: str = "", digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def summary_lines(record: Mapping[str, Any]) -> list[str]:
    """The check in a few lines: the card, each load variant, each benchmark's outcome."""
    lines = [f"{record['gpu']['name']} ({record['gpu']['memory_gib']:.0f} GiB), model {record['model']}"]
    for v in record["variants"]:
        if "skipped" in v or "error" in v:
            lines.append(f"  {v['variant']}: {v.get('skipped') or v.get('error')}")
            continue
        lines.append(
            f"  {v['variant']}: load {_num(v['load_s'], ' s', 1)}, first token {_num(v['ttft_s'], ' s')}, "
            f"{_num(v['tokens_per_s'], ' tok/s', 1)} end to end ({_num(v['decode_tokens_per_s'], ' tok/s', 1)}"
            f" decode), peak {_num(v['gpu_peak_gib'], ' GiB')}"
            + (f", {len(v['errors'])} failed request(s)" if v["errors"] else "")
        )
    for name, b in record["benchmarks"].items():
        state = (
            "timed out" if b["timed_out"] else ("ok" if b["returncode"] == 0 else f"exit {b['returncode']}")
        )
        lines.append(f"  {name}: {state} in {b['wall_s']:.0f} s ({b['log']})")
    return lines


# ------------------------------------------------------------------------------------------ the GPU


def demo_image() -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(IMAGE_NAME, download=False)
    if path is None:
        raise SystemExit(f"{IMAGE_NAME} is not installed: pip install pydicom-data (a test extra)")
    return Path(str(path))


def check_variant(model: str, variant: str, image: Path, requests: int, max_tokens: int) -> dict[str, Any]:
    """Load ``model`` on the GPU as ``variant`` ("bf16" or "4bit") and time ``requests`` generations."""
    import torch

    from emma.infer.chat import ChatSession
    from emma.infer.factory import load_engine
    from emma.infer.types import SamplingParams

    if variant == "4bit" and importlib.util.find_spec("bitsandbytes") is None:
        return {"variant": variant, "skipped": "bitsandbytes is not installed (pip install 'emma-med[cuda]')"}
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        engine = load_engine(
            model, device="cuda", dtype="bf16", quantization="4bit" if variant == "4bit" else None
        )
    except Exception as exc:  # a check records why a variant cannot load, then goes on with the rest
        return {"variant": variant, "error": f"load failed: {type(exc).__name__}: {exc}"[:500]}
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    load_peak = int(torch.cuda.max_memory_allocated())
    try:
        sampling = SamplingParams(max_new_tokens=max_tokens, temperature=0.0)
        samples = []
        for _ in range(requests + 1):  # the first one warms up and is not recorded
            session = ChatSession(engine, sampling=sampling)
            session.add_images([image])
            samples.append(stream_request(engine, session.build_request(QUESTION, "chat")))
        torch.cuda.synchronize()
        record = variant_record(
            variant, load_s, samples[1:], load_peak, int(torch.cuda.max_memory_allocated())
        )
        record["model"] = engine.model_name
        record["dtype"] = str(engine.loaded.dtype)
        return record
    except Exception as exc:  # e.g. out of memory: recorded, and the check goes on
        return {"variant": variant, "error": f"generation failed: {type(exc).__name__}: {exc}"[:500]}
    finally:
        engine.close()
        del engine
        gc.collect()
        torch.cuda.empty_cache()


def run_bench(
    name: str, command: Sequence[str], out: Path, timeout_s: float, *, grace_s: float = 30.0
) -> dict[str, Any]:
    """``command --out <out stem>.<name>.json`` in its own process group, its output in ``<name>.log``
    beside ``out``. After ``timeout_s`` it gets SIGINT (bench_serve stops its servers on
    KeyboardInterrupt) and ``grace_s`` to exit; then whatever is left of its group is killed."""
    result = out.with_name(f"{out.stem}.{name}.json")
    log = out.with_name(f"{out.stem}.{name}.log")
    command = [*command, "--out", str(result)]
    print(f"running {' '.join(command[1:])} (log {log}, at most {timeout_s:.0f} s)", flush=True)
    start = time.perf_counter()
    timed_out = False
    with open(log, "wb") as handle:
        proc = subprocess.Popen(
            command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of its group is left (servers of a killed run)
        proc.wait()
    record: dict[str, Any] = {
        "command": " ".join(command[1:]),
        "returncode": proc.returncode,
        "timed_out": timed_out,
        "wall_s": round(time.perf_counter() - start, 1),
        "log": str(log),
    }
    if proc.returncode == 0 and result.exists():
        record["result"] = str(result)
        record["headline"] = bench_headline(name, json.loads(result.read_text()))
    else:
        record["log_tail"] = log.read_text(errors="replace").strip().splitlines()[-5:]
    return record


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON record (benchmark files beside it)")
    parser.add_argument("--model", default="emma-tiny", help="a model spec (emma-tiny, a folder, a hub id)")
    parser.add_argument("--requests", type=int, default=5, help="timed generations per variant (1..50)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max new tokens per generation (1..1024)")
    parser.add_argument("--bench-timeout-s", type=float, default=300.0, help="bound of each benchmark run")
    parser.add_argument("--skip-benches", action="store_true", help="only the model check")
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= 50 or not 1 <= args.max_tokens <= 1024 or args.bench_timeout_s <= 0:
        parser.error("--requests 1..50, --max-tokens 1..1024, --bench-timeout-s > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    started = time.perf_counter()
    props = torch.cuda.get_device_properties(0)
    gpu = {"name": torch.cuda.get_device_name(0), "memory_gib": round(props.total_memory / GIB, 1)}
    print(f"GPU: {gpu['name']} ({gpu['memory_gib']} GiB)", flush=True)
    image = demo_image()
    variants = []
    for variant in ("bf16", "4bit"):
        print(f"{args.model} in {variant}: load and {args.requests} generations ...", flush=True)
        variants.append(check_variant(args.model, variant, image, args.requests, args.max_tokens))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    benchmarks = {}
    if not args.skip_benches:
        for name, bench_args in BENCH_ARGS.items():
            command = [sys.executable, str(HERE / f"{name}.py"), *shlex.split(bench_args)]
            benchmarks[name] = run_bench(name, command, args.out, args.bench_timeout_s)
    record = {
        "benchmark": "gpu_check",
        "command": " ".join(
            [Path(sys.executable).name, *(sys.argv if argv is None else ["gpu_check.py", *argv])]
        ),
        "gpu": gpu,
        "model": args.model,
        "image": f"pydicom-data {IMAGE_NAME}",
        "question": QUESTION,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "variants": variants,
        "benchmarks": benchmarks,
        "environment": environment(),
        "total_s": round(time.perf_counter() - started, 1),
    }
    args.out.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print("\n".join(summary_lines(record)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
