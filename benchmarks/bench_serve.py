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

Why one file (~1500 lines): a benchmark script a user runs alone (`python benchmarks/bench_serve.py`),
with its server launcher, load generator and report together; nothing imports it.
"""

from __future__ import annotations

import argparse
import base64
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_OUT = RESULTS / "bench_serve.json"
DEFAULT_GPU_OUT = RESULTS / "bench_serve_gpu.json"
TARGET_OVERHEAD = 0.10
SYSTEM_TEXT = "You are a careful emergency radiology assistant."
QUESTION = "What does this CT slice show? Answer briefly."
SERVER_START_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 120.0

IN_PROCESS = "in_process"
SERVER = "server"
SERVER_NOBATCH = "server_nobatch"


# ------------------------------------------------------------------------------------------ records


@dataclass
class Sample:
    """One request: wall latency as the caller saw it, time to first token when streamed."""

    latency_s: float
    completion_tokens: int = 0
    prompt_tokens: int = 0
    ttft_s: float | None = None
    error: str | None = None


@dataclass
class Phase:
    """One measured loop: a target, a mode, a concurrency, in one run."""

    target: str
    mode: str  # "generate" (non-streaming) or "stream"
    concurrency: int
    run: int
    requested: int
    wall_s: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    server_side_ms: list[float] = field(default_factory=list)  # audit-log latency of each request
    cuda_peak_bytes: int | None = None
    paired: bool = False  # measured alternately with the other target's requests (same time window)
    loadavg_1min: float = field(default_factory=lambda: os.getloadavg()[0])

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.error is None]

    def to_json(self) -> dict[str, Any]:
        """Raw timings, one list per field (seconds, rounded to microseconds)."""

        def us(value: float | None) -> float | None:
            return None if value is None else round(value, 6)

        return {
            "target": self.target,
            "mode": self.mode,
            "concurrency": self.concurrency,
            "run": self.run,
            "requested": self.requested,
            "paired": self.paired,
            "wall_s": us(self.wall_s),
            "loadavg_1min": round(self.loadavg_1min, 2),
            "cuda_peak_bytes": self.cuda_peak_bytes,
            "latency_s": [us(x.latency_s) for x in self.samples],
            "ttft_s": [us(x.ttft_s) for x in self.samples],
            "completion_tokens": [x.completion_tokens for x in self.samples],
            "prompt_tokens": [x.prompt_tokens for x in self.samples],
            "errors": [x.error for x in self.samples if x.error is not None],
            "server_side_ms": self.server_side_ms,
        }

    def stats(self) -> dict[str, Any]:
        ok = self.ok
        lat = [s.latency_s for s in ok]
        ttft = [s.ttft_s for s in ok if s.ttft_s is not None]
        tokens = sum(s.completion_tokens for s in ok)
        return {
            "n_ok": len(ok),
            "n_errors": len(self.samples) - len(ok),
            "skipped": self.requested - len(self.samples),
            "p50_s": _pct(lat, 50),
            "p95_s": _pct(lat, 95),
            "ttft_p50_s": _pct(ttft, 50),
            "ttft_p95_s": _pct(ttft, 95),
            "requests_per_s": len(ok) / self.wall_s if self.wall_s > 0 else None,
            "tokens_per_s": tokens / self.wall_s if self.wall_s > 0 else None,
            "completion_tokens_mean": tokens / len(ok) if ok else None,
            "server_side_p50_s": _pct([ms / 1000.0 for ms in self.server_side_ms], 50),
        }


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else None


def _median(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


# ---------------------------------------------------------------------------------------- the input


@dataclass(frozen=True)
class Workload:
    """The fixed request: its PNG (as sent to the server) and the PIL image emma.io makes of it."""

    data_url: str  # the PNG as a base64 data URL (encoded once, as a client would)
    pil: Any  # PIL.Image.Image, model-ready
    width: int
    height: int
    source: str
    max_tokens: int

    def engine_request(self) -> Any:
        from emma.infer.types import GenerationRequest, ImagePart, Message, SamplingParams, TextPart

        return GenerationRequest(
            messages=[
                Message.text("system", SYSTEM_TEXT),
                Message("user", [ImagePart(self.pil), TextPart(QUESTION)]),
            ],
            sampling=SamplingParams(max_new_tokens=self.max_tokens, temperature=0.0),
        )

    def openai_messages(self) -> list[dict[str, Any]]:
        return [
            {"role": "system", "content": SYSTEM_TEXT},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": self.data_url}},
                    {"type": "text", "text": QUESTION},
                ],
            },
        ]


def make_workload(folder: Path, max_tokens: int, size: int | None) -> Workload:
    """pydicom's CT_small.dcm (a real 128 x 128 CT slice) through emma.io → PNG → emma.io again."""
    from pydicom.data import get_testdata_file

    from emma.io.load import load_images

    source = Path(str(get_testdata_file("CT_small.dcm")))
    image = load_images(source)[0].to_pil()
    if size is not None and size != image.width:
        image = image.resize((size, size))
    png = folder / "ct_small.png"
    image.save(png, format="PNG")
    model_ready = load_images(png)[0]
    return Workload(
        data_url="data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii"),
        pil=model_ready.to_pil(),
        width=model_ready.width,
        height=model_ready.height,
        source=f"pydicom CT_small.dcm via emma.io, PNG {model_ready.width}x{model_ready.height}",
        max_tokens=max_tokens,
    )


# ---------------------------------------------------------------------------------- process memory


def _proc_status_kib(pid: int | str, key: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def _mib(kib: int | None) -> float | None:
    return round(kib / 1024.0, 1) if kib is not None else None


def self_peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)  # KiB on Linux


# ------------------------------------------------------------------------------------------- server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``emma serve`` (the real CLI) in a subprocess on a free loopback port; its log goes to a file.

    The server gets this process's environment without ``EMMA_API_KEY`` (no key unless asked), then
    ``env`` (e.g. ``{"EMMA_API_KEY": key}``: requests then carry it in :attr:`headers`); ``extra_args``
    are more ``emma serve`` options (e.g. ``["--memory-budget-mb", "1024"]``)."""

    def __init__(
        self,
        label: str,
        model: str,
        *,
        max_batch_size: int,
        device: str,
        dtype: str,
        log_dir: Path,
        threads: int | None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.label = label
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{label}.log"
        server_env = {k: v for k, v in os.environ.items() if k != "EMMA_API_KEY"}
        server_env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        if threads is not None:
            server_env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op thread count in the server
        server_env.update(env or {})
        key = server_env.get("EMMA_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        command = [
            sys.executable,
            "-c",
            "from emma.cli import app; app()",
            "serve",
            "--model",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--max-batch-size",
            str(max_batch_size),
            "--device",
            device,
            "--dtype",
            dtype,
            *extra_args,
        ]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 — closed in stop()
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=server_env)
        self.model_name = ""
        self.rss_after_start_mib: float | None = None
        self.peak_rss_mib: float | None = None

    def wait_ready(self, timeout_s: float = SERVER_START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.label} exited ({self.proc.returncode}): {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    models = httpx.get(f"{self.url}/v1/models", headers=self.headers, timeout=5.0).json()
                    self.model_name = str(models["data"][0]["id"])
                    self.rss_after_start_mib = _mib(_proc_status_kib(self.proc.pid, "VmRSS"))
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server {self.label} not ready after {timeout_s:.0f} s: {self.log_tail()}")

    def log_tail(self, n: int = 5) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(line[:200] for line in lines[-n:])

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def audit_latencies_ms(self, since: int) -> list[float]:
        """Server-side latency of each successful chat completion logged after byte ``since``."""
        with open(self.log_path, "rb") as handle:
            handle.seek(since)
            text = handle.read().decode(errors="replace")
        pattern = re.compile(r"route=/v1/chat/completions status=200 .*?latency_ms=([\d.]+)")
        return [float(m.group(1)) for m in pattern.finditer(text)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.peak_rss_mib = _mib(_proc_status_kib(self.proc.pid, "VmHWM"))
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        self._log.close()


@contextmanager
def servers(
    specs: Sequence[tuple[str, int]], model: str, device: str, dtype: str, threads: int | None
) -> Iterator[dict[str, ServerProcess]]:
    """Start one server per ``(label, max_batch_size)``, all at once; stop them all on exit."""
    with tempfile.TemporaryDirectory(prefix="emma-bench-serve-") as log_dir:
        started: dict[str, ServerProcess] = {}
        try:
            for label, batch in specs:
                started[label] = ServerProcess(
                    label,
                    model,
                    max_batch_size=batch,
                    device=device,
                    dtype=dtype,
                    log_dir=Path(log_dir),
                    threads=threads,
                )
            for server in started.values():
                server.wait_ready()
            yield started
        finally:
            for server in started.values():
                server.stop()


# -------------------------------------------------------------------------------------------- loops


def _closed_loop(
    n: int, concurrency: int, deadline_s: float, call: Callable[[], Sample]
) -> tuple[float, list[Sample]]:
    """``n`` calls from ``concurrency`` threads, each starting its next call when the last returns; no
    call starts after ``deadline_s`` seconds. Returns the wall time and the samples."""
    lock = threading.Lock()
    remaining = [n]
    samples: list[Sample] = []
    start = time.perf_counter()
    stop_at = start + deadline_s

    def worker() -> None:
        while True:
            with lock:
                if remaining[0] <= 0 or time.perf_counter() > stop_at:
                    return
                remaining[0] -= 1
            sample = call()
            with lock:
                samples.append(sample)

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="bench-client") as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    return time.perf_counter() - start, samples


def _error_name(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    return f"{type(exc).__name__}" + (f" {status}" if status else "")


def openai_call(client: Any, model: str, workload: Workload, *, stream: bool) -> Sample:
    """One chat completion through the real openai client; TTFT = first non-empty content delta."""
    import openai

    start = time.perf_counter()
    try:
        if not stream:
            response = client.chat.completions.create(
                model=model,
                messages=workload.openai_messages(),
                max_tokens=workload.max_tokens,
                temperature=0.0,
            )
            usage = response.usage
            return Sample(
                latency_s=time.perf_counter() - start,
                completion_tokens=usage.completion_tokens if usage else 0,
                prompt_tokens=usage.prompt_tokens if usage else 0,
            )
        first: float | None = None
        usage = None
        chunks = client.chat.completions.create(
            model=model,
            messages=workload.openai_messages(),
            max_tokens=workload.max_tokens,
            temperature=0.0,
            stream=True,
        )
        for chunk in chunks:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                usage = chunk.usage
        return Sample(
            latency_s=time.perf_counter() - start,
            ttft_s=first,
            completion_tokens=usage.completion_tokens if usage else 0,
            prompt_tokens=usage.prompt_tokens if usage else 0,
        )
    except openai.OpenAIError as exc:
        return Sample(latency_s=time.perf_counter() - start, error=_error_name(exc))


def server_phase(
    server: ServerProcess,
    client: Any,
    workload: Workload,
    *,
    target: str,
    mode: str,
    concurrency: int,
    n: int,
    run: int,
    deadline_s: float,
) -> Phase:
    phase = Phase(target, mode, concurrency, run, n)
    since = server.log_size()
    call = partial(openai_call, client, server.model_name, workload, stream=mode == "stream")
    phase.wall_s, phase.samples = _closed_loop(n, concurrency, deadline_s, call)
    time.sleep(0.05)  # the audit line of the last request is written as its response ends
    phase.server_side_ms = server.audit_latencies_ms(since)
    return phase


def inprocess_generate_phase(
    engine: Any, workload: Workload, *, concurrency: int, n: int, run: int, deadline_s: float
) -> Phase:
    """``engine.generate`` on waves of ``concurrency`` requests; each request's latency is its wave's."""
    phase = Phase(IN_PROCESS, "generate", concurrency, run, n)
    start = time.perf_counter()
    done = 0
    while done < n and time.perf_counter() - start < deadline_s:
        wave = [workload.engine_request() for _ in range(min(concurrency, n - done))]
        t0 = time.perf_counter()
        responses = engine.generate(wave)
        latency = time.perf_counter() - t0
        for r in responses:
            phase.samples.append(
                Sample(
                    latency_s=latency,
                    completion_tokens=r.completion_tokens,
                    prompt_tokens=r.prompt_tokens,
                    error=r.error if r.finish_reason == "error" else None,
                )
            )
        done += len(wave)
    phase.wall_s = time.perf_counter() - start
    return phase


def inprocess_stream_one(engine: Any, workload: Workload) -> Sample:
    """One ``engine.stream`` request of ``workload``."""
    return stream_request(engine, workload.engine_request())


def stream_request(engine: Any, request: Any) -> Sample:
    """One ``engine.stream`` call; TTFT = first non-empty text delta (also used by bench_tiny.py)."""
    t0 = time.perf_counter()
    first: float | None = None
    final = None
    for chunk in engine.stream(request):
        if first is None and chunk.delta:
            first = time.perf_counter() - t0
        if chunk.response is not None:
            final = chunk.response
    latency = time.perf_counter() - t0
    if final is None or final.finish_reason == "error":
        return Sample(latency_s=latency, error=(final and final.error) or "stream ended without a result")
    return Sample(
        latency_s=latency,
        ttft_s=first,
        completion_tokens=final.completion_tokens,
        prompt_tokens=final.prompt_tokens,
    )


def inprocess_generate_one(engine: Any, workload: Workload) -> Sample:
    t0 = time.perf_counter()
    r = engine.generate([workload.engine_request()])[0]
    return Sample(
        latency_s=time.perf_counter() - t0,
        completion_tokens=r.completion_tokens,
        prompt_tokens=r.prompt_tokens,
        error=r.error if r.finish_reason == "error" else None,
    )


def sequential_phase(
    target: str, mode: str, n: int, run: int, deadline_s: float, call: Callable[[], Sample]
) -> Phase:
    phase = Phase(target, mode, 1, run, n)
    start = time.perf_counter()
    while len(phase.samples) < n and time.perf_counter() - start < deadline_s:
        phase.samples.append(call())
    phase.wall_s = time.perf_counter() - start
    return phase


def paired_phases(
    server: ServerProcess,
    mode: str,
    n: int,
    run: int,
    deadline_s: float,
    local_call: Callable[[], Sample],
    server_call: Callable[[], Sample],
) -> tuple[Phase, Phase]:
    """Concurrency 1, in-process and server requests alternating (the order flips every pair), so both
    see the same machine load; each phase's wall time is the sum of its own requests' latencies."""
    local = Phase(IN_PROCESS, mode, 1, run, n, paired=True)
    remote = Phase(SERVER, mode, 1, run, n, paired=True)
    since = server.log_size()
    start = time.perf_counter()
    for i in range(n):
        if time.perf_counter() - start > deadline_s:
            break
        order = (local_call, server_call) if i % 2 == 0 else (server_call, local_call)
        first, second = order[0](), order[1]()
        a, b = (first, second) if i % 2 == 0 else (second, first)
        local.samples.append(a)
        remote.samples.append(b)
    time.sleep(0.05)
    remote.server_side_ms = server.audit_latencies_ms(since)
    local.wall_s = sum(x.latency_s for x in local.samples)
    remote.wall_s = sum(x.latency_s for x in remote.samples)
    return local, remote


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
        "bench_process_rss_after_load_mib": _mib(_proc_status_kib("self", "VmRSS")),
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
        _closed_loop(
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
        clients = {label: _openai_client(s.url, args) for label, s in running.items()}
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


def _openai_client(url: str, args: argparse.Namespace) -> Any:
    import openai

    pool = httpx.Limits(
        max_connections=max(args.concurrency) + 4, max_keepalive_connections=max(args.concurrency) + 4
    )
    return openai.OpenAI(
        base_url=f"{url}/v1",
        api_key="unused",  # the benchmark servers run without --api-key, on loopback only
        max_retries=0,
        timeout=REQUEST_TIMEOUT_S,
        http_client=httpx.Client(limits=pool, timeout=REQUEST_TIMEOUT_S),
    )


# ------------------------------------------------------------------------------------------ summary


def summarize(phases: Sequence[Phase]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (medians over runs of the per-run statistics) and the claims."""
    keys = sorted({(p.target, p.mode, p.concurrency) for p in phases}, key=lambda k: (k[0], k[1], k[2]))
    rows = []
    for target, mode, c in keys:
        runs = [p for p in phases if (p.target, p.mode, p.concurrency) == (target, mode, c)]
        stats = [p.stats() for p in runs]
        row: dict[str, Any] = {
            "target": target,
            "mode": mode,
            "concurrency": c,
            "runs": len(runs),
            "requests_ok": sum(s["n_ok"] for s in stats),
            "errors": sum(s["n_errors"] for s in stats),
            "skipped": sum(s["skipped"] for s in stats),
        }
        for name in (
            "p50_s",
            "p95_s",
            "ttft_p50_s",
            "ttft_p95_s",
            "requests_per_s",
            "tokens_per_s",
            "completion_tokens_mean",
            "server_side_p50_s",
        ):
            row[name] = _median([s[name] for s in stats])
        peaks = [p.cuda_peak_bytes for p in runs if p.cuda_peak_bytes is not None]
        if peaks:
            row["cuda_peak_bytes"] = max(peaks)
        rows.append(row)

    def per_run(target: str, mode: str, c: int, key: str) -> dict[int, float]:
        out = {}
        for p in phases:
            if (p.target, p.mode, p.concurrency) == (target, mode, c):
                value = p.stats()[key]
                if value is not None:
                    out[p.run] = value
        return out

    c_lo = min((p.concurrency for p in phases), default=1)
    c_hi = max((p.concurrency for p in phases), default=1)
    claims: dict[str, Any] = {"concurrency_low": c_lo, "concurrency_high": c_hi}
    server_c1 = per_run(SERVER, "generate", c_lo, "p50_s")
    local_c1 = per_run(IN_PROCESS, "generate", c_lo, "p50_s")
    overheads = [server_c1[r] / local_c1[r] - 1.0 for r in sorted(server_c1) if r in local_c1]
    if overheads:
        claims["overhead_ms_c1"] = {
            "value": statistics.median(
                [(server_c1[r] - local_c1[r]) * 1000.0 for r in sorted(server_c1) if r in local_c1]
            ),
            "definition": f"server p50 latency - in-process generate p50 latency at concurrency {c_lo}, ms",
        }
        claims["overhead_c1"] = {
            "value": statistics.median(overheads),
            "per_run": overheads,
            "target": TARGET_OVERHEAD,
            "met": statistics.median(overheads) <= TARGET_OVERHEAD,
            "definition": f"server p50 latency / in-process generate p50 latency - 1 at concurrency {c_lo}",
        }
    pairs = [
        right.latency_s / left.latency_s - 1.0
        for lp in phases
        if lp.paired and lp.target == IN_PROCESS and lp.mode == "generate"
        for rp in phases
        if rp.paired and rp.target == SERVER and rp.mode == "generate" and rp.run == lp.run
        for left, right in zip(lp.samples, rp.samples, strict=False)
        if left.error is None and right.error is None
    ]
    if pairs:
        claims["overhead_c1_paired"] = {
            "value": statistics.median(pairs),
            "pairs": len(pairs),
            "definition": "median over adjacent (in-process, server) request pairs of the latency ratio - 1",
        }
    ttft_server = per_run(SERVER, "stream", c_lo, "ttft_p50_s")
    ttft_local = per_run(IN_PROCESS, "stream", 1, "ttft_p50_s")
    ttft_ratio = [ttft_server[r] / ttft_local[r] - 1.0 for r in sorted(ttft_server) if r in ttft_local]
    if ttft_ratio:
        claims["ttft_overhead_c1"] = {"value": statistics.median(ttft_ratio), "per_run": ttft_ratio}
    hi = per_run(SERVER, "generate", c_hi, "tokens_per_s")
    lo = per_run(SERVER, "generate", c_lo, "tokens_per_s")
    nob = per_run(SERVER_NOBATCH, "generate", c_hi, "tokens_per_s")
    if c_hi == c_lo:  # one concurrency level: nothing to say about batching
        hi = {}
    gain = [hi[r] / lo[r] for r in sorted(hi) if r in lo and lo[r] > 0]
    if gain:
        claims["batching_gain"] = {
            "value": statistics.median(gain),
            "per_run": gain,
            "met": statistics.median(gain) > 1.0,
            "definition": f"server completion tokens/s at concurrency {c_hi} / at concurrency {c_lo}",
        }
    gain_nob = [hi[r] / nob[r] for r in sorted(hi) if r in nob and nob[r] > 0]
    if gain_nob:
        claims["batching_vs_no_batching"] = {
            "value": statistics.median(gain_nob),
            "per_run": gain_nob,
            "met": statistics.median(gain_nob) > 1.0,
            "definition": f"server tokens/s at concurrency {c_hi}: max_batch_size default / max_batch_size 1",
        }
    return rows, claims


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_tables(
    console: Console,
    title: str,
    rows: Sequence[dict[str, Any]],
    claims: dict[str, Any],
    facts: dict[str, Any],
) -> None:
    table = Table(title=title)
    for name in (
        "target",
        "mode",
        "conc",
        "ok",
        "p50 ms",
        "p95 ms",
        "TTFT p50",
        "TTFT p95",
        "req/s",
        "tok/s",
        "tok/req",
        "srv p50",
    ):
        table.add_column(name, justify="left" if name in ("target", "mode") else "right")
    for r in rows:
        table.add_row(
            r["target"],
            r["mode"],
            str(r["concurrency"]),
            f"{r['requests_ok']}/{r['errors']}e",
            _ms(r["p50_s"]),
            _ms(r["p95_s"]),
            _ms(r["ttft_p50_s"]),
            _ms(r["ttft_p95_s"]),
            _num(r["requests_per_s"], 2),
            _num(r["tokens_per_s"]),
            _num(r["completion_tokens_mean"]),
            _ms(r["server_side_p50_s"]),
        )
    console.print(table)
    summary = Table(title="claims and memory")
    summary.add_column("what")
    summary.add_column("value", justify="right")
    summary.add_column("per run / note")
    lo, hi = claims.get("concurrency_low", 1), claims.get("concurrency_high", 1)
    if "overhead_c1" in claims:
        o = claims["overhead_c1"]
        mark = "[green]met[/]" if o["met"] else "[red]not met[/]"
        summary.add_row(
            f"server overhead, c={lo} (target <= 10%)",
            f"{o['value'] * 100:+.1f}% {mark}",
            ", ".join(f"{v * 100:+.1f}%" for v in o["per_run"]),
        )
        if "overhead_c1_paired" in claims:
            p = claims["overhead_c1_paired"]
            summary.add_row(
                f"server overhead, c={lo}, per adjacent pair",
                f"{p['value'] * 100:+.1f}%",
                f"median of {p['pairs']} pairs",
            )
        summary.add_row(
            f"server overhead, c={lo}, absolute",
            f"{claims['overhead_ms_c1']['value']:+.1f} ms",
            "server p50 - in-process p50",
        )
    if "ttft_overhead_c1" in claims:
        t = claims["ttft_overhead_c1"]
        summary.add_row(
            f"server TTFT overhead, c={lo} (stream)",
            f"{t['value'] * 100:+.1f}%",
            ", ".join(f"{v * 100:+.1f}%" for v in t["per_run"]),
        )
    for key, label in (
        ("batching_gain", f"server tokens/s, c={hi} / c={lo}"),
        ("batching_vs_no_batching", f"server tokens/s at c={hi}: batched / max_batch_size=1"),
    ):
        if key in claims:
            g = claims[key]
            mark = "[green]met[/]" if g["met"] else "[red]not met[/]"
            summary.add_row(label, f"x{g['value']:.2f} {mark}", ", ".join(f"x{v:.2f}" for v in g["per_run"]))
    summary.add_row(
        "peak RSS, bench process (in-process engine + clients)",
        f"{facts['bench_process_peak_rss_mib']} MiB",
        "",
    )
    for label, s in facts.get("servers", {}).items():
        summary.add_row(
            f"peak RSS, {label} process",
            f"{s['peak_rss_mib']} MiB",
            f"{s['rss_after_start_mib']} MiB after start",
        )
    if "cuda_peak_after_load_bytes" in facts:
        summary.add_row(
            "CUDA max allocated after load", f"{facts['cuda_peak_after_load_bytes'] / 2**30:.2f} GiB", ""
        )
        peaks = [(r["cuda_peak_bytes"], r) for r in rows if r.get("cuda_peak_bytes") is not None]
        if peaks:
            peak, row = max(peaks, key=lambda item: item[0])
            summary.add_row(
                "CUDA max allocated, any in-process phase",
                f"{peak / 2**30:.2f} GiB",
                f"{row['mode']} at concurrency {row['concurrency']}",
            )
    console.print(summary)


def plot(path: Path, results: Sequence[dict[str, Any]]) -> None:
    """Throughput and p95 latency against concurrency, per target (one line style per setup)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tp, ax_lat) = plt.subplots(1, 2, figsize=(10, 4))
    styles = {IN_PROCESS: ("tab:blue", "o"), SERVER: ("tab:orange", "s"), SERVER_NOBATCH: ("tab:red", "x")}
    for result in results:
        setup = result["facts"]["label"]
        for target, (color, marker) in styles.items():
            rows = sorted(
                (r for r in result["rows"] if r["target"] == target and r["mode"] == "generate"),
                key=lambda r: r["concurrency"],
            )
            if not rows:
                continue
            xs = [r["concurrency"] for r in rows]
            label = f"{target} ({setup})" if len(results) > 1 else target
            ax_tp.plot(xs, [r["tokens_per_s"] for r in rows], marker=marker, color=color, label=label)
            ax_lat.plot(xs, [(r["p95_s"] or 0) * 1000 for r in rows], marker=marker, color=color, label=label)
    ticks = sorted({r["concurrency"] for result in results for r in result["rows"]})
    for ax, ylabel in ((ax_tp, "completion tokens / s"), (ax_lat, "p95 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax_tp.set_title("throughput (non-streaming)")
    ax_lat.set_title("p95 latency (non-streaming)")
    setups = ", ".join(result["facts"]["label"] for result in results)
    fig.suptitle(
        f"emma serve vs in-process generate ({setups}; in-process at c > 1: waves of c)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------- environment


def environment() -> dict[str, Any]:
    import torch

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                check=False,
                capture_output=True,
                text=True,
                cwd=Path(__file__).resolve().parent,
                timeout=10,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "git_commit": commit,
        "packages": {
            n: version(n)
            for n in (
                "emma-med",
                "torch",
                "transformers",
                "fastapi",
                "uvicorn",
                "openai",
                "httpx",
                "bitsandbytes",
            )
        },
        "loadavg_start": list(os.getloadavg()),
    }
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name(0)
        env["cuda_total_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return env


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
