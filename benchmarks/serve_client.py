"""Measuring a model server: the records, the fixed request, an ``emma serve`` subprocess and the loops.

Shared by the serving benchmarks (``bench_serve.py``, ``bench_tiny.py``, ``bench_serve_bombs.py``) and
``gpu_check.py``; each is run as a script from this folder, which puts this module on ``sys.path``.

- :class:`Sample` (one request) and :class:`Phase` (one measured loop, its raw timings and statistics);
- :class:`Workload`: pydicom's ``CT_small.dcm`` through emma.io, as a PNG data URL and as the PIL image
  the in-process engine gets, so both paths build the same prompt;
- :class:`ServerProcess` / :func:`servers`: the real ``emma serve`` CLI in a subprocess on a free
  127.0.0.1 port, its log in a file (server-side latencies from its audit lines), peak RSS from ``/proc``;
- the loops: :func:`closed_loop` (``c`` client threads), :func:`openai_call` through the real ``openai``
  client, :func:`stream_request` (``engine.stream``), in-process waves, and concurrency-1 pairs that
  alternate in-process and server requests;
- :func:`environment`: versions, CPU, GPU and git commit of a result file.
"""

from __future__ import annotations

import base64
import importlib.metadata
import os
import platform
import re
import resource
import signal
import socket
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


def proc_status_kib(pid: int | str, key: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def mib(kib: int | None) -> float | None:
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
                    self.rss_after_start_mib = mib(proc_status_kib(self.proc.pid, "VmRSS"))
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
            self.peak_rss_mib = mib(proc_status_kib(self.proc.pid, "VmHWM"))
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


def closed_loop(
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
    phase.wall_s, phase.samples = closed_loop(n, concurrency, deadline_s, call)
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


def openai_client(url: str, max_concurrency: int) -> Any:
    """The real ``openai`` client of a benchmark server, with a connection pool for ``max_concurrency``
    client threads; no retries (a failure is a measured error)."""
    import openai

    pool = httpx.Limits(max_connections=max_concurrency + 4, max_keepalive_connections=max_concurrency + 4)
    return openai.OpenAI(
        base_url=f"{url}/v1",
        api_key="unused",  # the benchmark servers run without --api-key, on loopback only
        max_retries=0,
        timeout=REQUEST_TIMEOUT_S,
        http_client=httpx.Client(limits=pool, timeout=REQUEST_TIMEOUT_S),
    )


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
