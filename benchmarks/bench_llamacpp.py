"""llama.cpp on CPUs against the in-process transformers engine: first token, tokens/s, memory.

Claim measured (issue 16, part 2): for emma-tiny on this CPU, llama.cpp serves >= 50 tokens/s with the
first token in < 1 s at concurrency 4, against the in-process transformers engine in the same run.

What llama.cpp can load of emma-tiny: its language model only (SmolLM2-135M with EMMA's delta, a Llama
GGUF from ``emma export --to gguf``). Its vision tower is a ResNet-152, which llama.cpp's clip encoder
cannot run, so there is no mmproj and no image input. Both engines therefore get the same text-only
requests: the transformers engine runs the whole emma-tiny VLM on text prompts (the tower is not called
without images), llama.cpp its GGUF language model, each with its own copy of the same chat template.

Set-up. emma-tiny is materialised, its language model exported (``--quant``, default q8_0) with the
packaged converter, and started with ``emma.infer.launch.launch_engine("llamacpp", ...)`` (llama-cpp-
python's server in a subprocess on loopback; EMMA's OpenAIEngine streams from it). The transformers
engine runs in this process on float32. Both use ``--threads`` CPU threads (torch intra-op threads;
llama.cpp ``n_threads``; default 1: on a shared 2-core CPU two threads of either engine spin-wait for
each other, with 10x swings). ``--llama-server BINARY`` adds llama.cpp's own C++ server on the same GGUF
(``launch_engine("llama-server", ...)``: ``--concurrency`` slots decoded together, continuous batching).
Requests: ``--concurrency`` fixed short clinical questions, greedy, ``--max-tokens``
new tokens each (both engines stop at their end-of-turn token, so completion lengths may differ: tokens/s
counts the tokens each actually generated).

Loops. Each run measures, for each engine, concurrency 1 (the prompts one after another, streamed) and
concurrency 4 (four streams at once: the transformers engine as one ``stream_many`` batch, which is how
``emma serve`` serves concurrent streams; llama.cpp as four client threads, which llama-cpp-python's
server takes one at a time and llama-server decodes together). Per phase: first-token times (from each request's start; at concurrency 4 all start together),
completion tokens / wall seconds. The engines alternate within each run; a warm-up pass first; medians
over ``--runs`` runs.

``--through-emma`` (with ``--llama-server``) adds the same llama-server behind ``emma serve --backend
llama-server`` (the real CLI in a subprocess; serve_client's ``ServerProcess``), measured the same way
through EMMA's OpenAI-compatible API: once as served (``--max-batch-size`` = the concurrency: EMMA hands
concurrent streams to llama-server together, ``OpenAIEngine.stream_many``) and once with
``--max-batch-size 1`` (EMMA's queue runs one stream at a time), in the same runs: what EMMA's layer in
front costs, and what sending streams together gains.

Memory: resident set after a first generation and peak (``VmHWM``) of each llama.cpp server process; for the
in-process engine the growth of this process's resident set from before the model was loaded to after
a first generation (the interpreter, torch and the client libraries are not counted) and this process's
peak. Completion tokens of llama.cpp streams are their chunks (its server sends one per token and no
usage in streams).

Usage::

    nice -n 19 python benchmarks/bench_llamacpp.py [--runs 5] [--max-tokens 48] [--threads 1] [--quant q8_0]
        [--llama-server /path/to/llama-server [--through-emma]] [--out benchmarks/results/bench_llamacpp.json]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_OUT = RESULTS / "bench_llamacpp.json"
SYSTEM_TEXT = "You are a careful emergency medicine assistant. Answer briefly."
PROMPTS = (
    "A 54-year-old man has crushing chest pain for 30 minutes. What are the first three steps?",
    "What findings on a chest radiograph suggest a tension pneumothorax?",
    "List the main causes of acute abdominal pain in a young woman.",
    "How is the severity of a head injury graded in the emergency department?",
)
TARGET_TOKENS_PER_S = 50.0
TARGET_FIRST_TOKEN_S = 1.0
TRANSFORMERS = "transformers"
LLAMACPP = "llamacpp"
LLAMA_SERVER = "llama-server"
THROUGH_EMMA = "emma serve > llama-server"
THROUGH_EMMA_SERIAL = "emma serve --max-batch-size 1 > llama-server"


@dataclass
class Phase:
    engine: str
    concurrency: int
    run: int
    wall_s: float = 0.0
    first_token_s: list[float] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        tokens = sum(self.completion_tokens)
        return {
            "ttft_p50_s": statistics.median(self.first_token_s) if self.first_token_s else None,
            "ttft_max_s": max(self.first_token_s) if self.first_token_s else None,
            "tokens_per_s": tokens / self.wall_s if self.wall_s > 0 else None,
            "completion_tokens": tokens,
            "errors": len(self.errors),
        }


def _status_kib(pid: int | str, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def _requests(prompts: Sequence[str], max_tokens: int) -> list[Any]:
    from emma.infer.types import GenerationRequest, Message, SamplingParams

    return [
        GenerationRequest(
            messages=[Message.text("system", SYSTEM_TEXT), Message.text("user", prompt)],
            sampling=SamplingParams(max_new_tokens=max_tokens, temperature=0.0),
        )
        for prompt in prompts
    ]


def _stream_one(engine: Any, request: Any, start: float, phase: Phase, lock: threading.Lock) -> None:
    first: float | None = None
    final = None
    deltas = 0
    for chunk in engine.stream(request):
        if chunk.delta:
            deltas += 1
            if first is None:
                first = time.perf_counter() - start
        if chunk.response is not None:
            final = chunk.response
    with lock:
        if final is None or final.finish_reason == "error":
            phase.errors.append(final.error if final is not None and final.error else "no final chunk")
            return
        phase.first_token_s.append(first if first is not None else time.perf_counter() - start)
        # llama-cpp-python's server sends no usage in streams; it sends one chunk per token
        phase.completion_tokens.append(final.completion_tokens or deltas)


def measure_sequential(engine: Any, name: str, requests: Sequence[Any], run: int) -> Phase:
    """Concurrency 1: the requests one after another, each streamed."""
    phase = Phase(name, 1, run)
    lock = threading.Lock()
    begin = time.perf_counter()
    for request in requests:
        _stream_one(engine, request, time.perf_counter(), phase, lock)
    phase.wall_s = time.perf_counter() - begin
    return phase


def measure_threads(engine: Any, name: str, requests: Sequence[Any], run: int) -> Phase:
    """Concurrency len(requests): one client thread per request, all started together."""
    phase = Phase(name, len(requests), run)
    lock = threading.Lock()
    begin = time.perf_counter()
    threads = [
        threading.Thread(target=_stream_one, args=(engine, request, begin, phase, lock))
        for request in requests
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    phase.wall_s = time.perf_counter() - begin
    return phase


def measure_batch(engine: Any, name: str, requests: Sequence[Any], run: int) -> Phase:
    """Concurrency len(requests) in-process: one ``stream_many`` batch (as ``emma serve`` batches streams)."""
    phase = Phase(name, len(requests), run)
    first: dict[int, float] = {}
    begin = time.perf_counter()
    for row, chunk in engine.stream_many(list(requests)):
        if chunk.delta and row not in first:
            first[row] = time.perf_counter() - begin
        if chunk.response is not None:
            if chunk.response.finish_reason == "error":
                phase.errors.append(chunk.response.error or "error")
                continue
            phase.first_token_s.append(first.get(row, time.perf_counter() - begin))
            phase.completion_tokens.append(chunk.response.completion_tokens)
    phase.wall_s = time.perf_counter() - begin
    return phase


def _fresh(requests: Sequence[Any]) -> list[Any]:
    """New request objects (ids, cancel events) with the same content, for a new loop."""
    from emma.infer.types import GenerationRequest

    return [GenerationRequest(messages=r.messages, sampling=r.sampling) for r in requests]


def export_language_model(folder: Path, out: Path, quant: str) -> tuple[Path, float]:
    from emma.train.export import export_gguf

    start = time.perf_counter()
    files = export_gguf(folder, out, quant=quant)
    return Path(files.model), time.perf_counter() - start


def _summary(phases: Sequence[Phase]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for engine in dict.fromkeys(p.engine for p in phases):
        for concurrency in sorted({p.concurrency for p in phases}):
            runs = [p.stats() for p in phases if p.engine == engine and p.concurrency == concurrency]
            if not runs:
                continue

            def med(key: str, rows: list[dict[str, Any]] = runs) -> float | None:
                values = [r[key] for r in rows if r[key] is not None]
                return round(statistics.median(values), 4) if values else None

            out[f"{engine}@{concurrency}"] = {
                "runs": len(runs),
                "ttft_p50_s": med("ttft_p50_s"),
                "ttft_max_s": med("ttft_max_s"),
                "tokens_per_s": med("tokens_per_s"),
                "completion_tokens": med("completion_tokens"),
                "errors": sum(r["errors"] for r in runs),
            }
    return out


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("llama-cpp-python", "torch", "transformers"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _print_table(summary: dict[str, Any], memory: dict[str, Any]) -> None:
    print(f"{'engine@concurrency':24} {'ttft p50 s':>10} {'ttft max s':>10} {'tokens/s':>9} {'tokens':>7}")
    for key, row in summary.items():
        print(
            f"{key:24} {row['ttft_p50_s'] or float('nan'):10.3f} {row['ttft_max_s'] or float('nan'):10.3f} "
            f"{row['tokens_per_s'] or float('nan'):9.1f} {row['completion_tokens'] or 0:7.0f}"
        )
    print("memory (MiB):", json.dumps(memory))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads of each engine (2 spin-wait on a shared 2-core CPU).",
    )
    parser.add_argument("--quant", default="q8_0", help="GGUF quantisation of the language model.")
    parser.add_argument("--concurrency", type=int, default=4, help="The concurrent level besides 1.")
    parser.add_argument(
        "--llama-server",
        type=Path,
        help="Also measure llama.cpp's C++ llama-server (this binary), same GGUF.",
    )
    parser.add_argument(
        "--through-emma",
        action="store_true",
        help="Also measure that llama-server behind emma serve (as served, and one stream at a time).",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.runs < 1 or args.max_tokens < 1 or args.threads < 1 or args.concurrency < 2:
        parser.error("--runs, --max-tokens, --threads must be >= 1 and --concurrency >= 2")
    if args.through_emma and not args.llama_server:
        parser.error("--through-emma needs --llama-server")

    import torch

    from emma.model.emma_tiny import materialize

    torch.set_num_threads(args.threads)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.concurrency)]
    requests = _requests(prompts, args.max_tokens)
    folder = materialize()
    with tempfile.TemporaryDirectory(prefix="bench-llamacpp-") as work:
        return _run(args, folder, Path(work), requests, prompts)


class _EmmaFront:
    """An OpenAIEngine on ``emma serve`` (a ServerProcess) that stops the server when closed."""

    def __init__(self, process: Any, concurrency: int) -> None:
        from emma.infer.openai_engine import OpenAIEngine

        self.process = process
        self._engine = OpenAIEngine(process.url + "/v1", process.model_name, concurrency=concurrency)
        self.stream = self._engine.stream

    def close(self) -> None:
        self._engine.close()
        self.process.stop()


def emma_in_front(args: argparse.Namespace, gguf: Path, work: Path, label: str, batch: int) -> _EmmaFront:
    """``emma serve --backend llama-server`` on the GGUF, ``--max-batch-size batch``, ready."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from serve_client import ServerProcess

    extra = ["--backend", "llama-server", "--backend-command", str(args.llama_server)]
    # the thread flags launch_engine gives the llama-server measured directly (a batch of streams is a
    # multi-token decode: llama.cpp runs it on --threads-batch)
    for flag in ("--threads", "--threads-batch"):
        extra += [f"--backend-arg={flag}", f"--backend-arg={args.threads}"]
    process = ServerProcess(
        "".join(c if c.isalnum() else "_" for c in label),
        str(gguf),
        max_batch_size=batch,
        device="cpu",
        dtype="auto",
        log_dir=work,
        threads=args.threads,
        extra_args=extra,
    )
    try:
        process.wait_ready(timeout_s=180)
    except BaseException:
        process.stop()
        raise
    return _EmmaFront(process, args.concurrency)


def _run(args: argparse.Namespace, folder: Path, work: Path, requests: list[Any], prompts: list[str]) -> int:
    from emma.infer.launch import launch_engine
    from emma.infer.transformers_engine import TransformersEngine
    from emma.model.registry import load_model

    gguf, export_s = export_language_model(folder, work, args.quant)
    print(
        f"exported {gguf.name} ({gguf.stat().st_size / 2**20:.1f} MiB) in {export_s:.1f} s", file=sys.stderr
    )

    rss_before = _status_kib("self", "VmRSS")
    engines: dict[str, Any] = {
        TRANSFORMERS: TransformersEngine(
            load_model("emma-tiny", device="cpu", dtype="float32"), max_batch_size=args.concurrency
        )
    }
    loops: dict[str, tuple[Callable[..., Phase], Callable[..., Phase]]] = {
        TRANSFORMERS: (measure_sequential, measure_batch)
    }
    servers = [(LLAMACPP, None)] if importlib.util.find_spec("llama_cpp") is not None else []
    if not servers:
        print(
            "llama-cpp-python is not installed (pip install 'emma-med[llamacpp]'): its server skipped",
            file=sys.stderr,
        )
    servers += [(LLAMA_SERVER, [str(args.llama_server)])] if args.llama_server else []
    if not servers:
        raise SystemExit("nothing to compare: install llama-cpp-python or give --llama-server")
    start_s: dict[str, float] = {}
    phases: list[Phase] = []
    loads: list[float] = []
    server_memory: dict[str, dict[str, float | None]] = {}
    try:
        for name, command in servers:
            start = time.perf_counter()
            engines[name] = launch_engine(
                name,
                str(gguf),
                threads=args.threads,
                concurrency=args.concurrency,
                command=command,
                startup_timeout_s=120,
            )
            start_s[name] = round(time.perf_counter() - start, 2)
            loops[name] = (measure_sequential, measure_threads)
        if args.through_emma:
            for name, batch in ((THROUGH_EMMA, args.concurrency), (THROUGH_EMMA_SERIAL, 1)):
                start = time.perf_counter()
                engines[name] = emma_in_front(args, gguf, work, name, batch)
                start_s[name] = round(time.perf_counter() - start, 2)
                loops[name] = (measure_sequential, measure_threads)
        for name, engine in engines.items():  # warm-up
            loops[name][0](engine, name, _fresh(requests[:1]), -1)
        rss_loaded = _status_kib("self", "VmRSS")  # model pages touched by a generation
        for name, _ in servers:  # the llama.cpp servers EMMA started itself (not those behind emma serve)
            pid = engines[name].server.pid
            server_memory[name] = {"rss_loaded_mib": _mib(_status_kib(pid, "VmRSS"))}
        for run in range(args.runs):
            order = list(engines) if run % 2 == 0 else list(reversed(engines))
            for name in order:
                sequential, concurrent = loops[name]
                phases.append(sequential(engines[name], name, _fresh(requests), run))
                phases.append(concurrent(engines[name], name, _fresh(requests), run))
            loads.append(os.getloadavg()[0])
            print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
        for name, _ in servers:
            server_memory[name]["peak_mib"] = _mib(_status_kib(engines[name].server.pid, "VmHWM"))
    finally:
        for engine in engines.values():
            engine.close()

    summary = _summary(phases)
    memory = {
        "servers": server_memory,
        "transformers_model_rss_growth_mib": _mib((rss_loaded or 0) - (rss_before or 0)),
        "bench_process_peak_mib": _mib(_status_kib("self", "VmHWM")),
        "gguf_file_mib": round(gguf.stat().st_size / 2**20, 1),
    }
    goal: dict[str, Any] = {
        "tokens_per_s_target": TARGET_TOKENS_PER_S,
        "first_token_target_s": TARGET_FIRST_TOKEN_S,
    }
    for name, _ in servers:
        at_c = summary.get(f"{name}@{args.concurrency}", {})
        goal[name] = {
            "tokens_per_s": at_c.get("tokens_per_s"),
            "ttft_max_s": at_c.get("ttft_max_s"),
            "met": bool(
                at_c.get("tokens_per_s") is not None
                and at_c["tokens_per_s"] >= TARGET_TOKENS_PER_S
                and at_c.get("ttft_max_s") is not None
                and at_c["ttft_max_s"] < TARGET_FIRST_TOKEN_S
            ),
        }
    result = {
        "benchmark": "bench_llamacpp",
        "command": "nice -n 19 python benchmarks/bench_llamacpp.py " + " ".join(args.argv),
        "model": "emma-tiny (language model only in llama.cpp; text-only requests to both engines)",
        "gguf": {"quant": args.quant, "file": gguf.name, "export_s": round(export_s, 1)},
        "server_start_s": start_s,
        "settings": {
            "runs": args.runs,
            "max_tokens": args.max_tokens,
            "threads": args.threads,
            "concurrency": [1, args.concurrency],
            "prompts": prompts,
        },
        "summary_medians": summary,
        "goal_at_concurrency": goal,
        "memory_mib": memory,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_1min_per_run": [round(x, 2) for x in loads],
        },
        "versions": _versions(),
        "phases": [
            {"engine": p.engine, "concurrency": p.concurrency, "run": p.run, **p.stats()} for p in phases
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    _print_table(summary, memory)
    print(f"goal at concurrency {args.concurrency}: {json.dumps(goal)}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
