"""Serving memory and fairness under hostile and oversized requests (issue 14, section 2).

Claims measured, against the real ``emma serve`` (the CLI, in a subprocess on a free 127.0.0.1 port,
serving a tiny random-weight model folder of ``--family`` from :mod:`emma.model.tiny_families`, its API key
given the documented way, in ``EMMA_API_KEY``):

1. Bombs: each answered 4xx within 1 s, the server's RSS growing by less than 200 MB while it
   answers. The bombs (built by ``tests/bombs.py``, never holding what they decode to):
   - ``deflate_dicom``: a Deflate-transfer-syntax CT, 434 KB inflating to 400 MB (800 frames of
     512 x 512 announced in its header);
   - ``deflate_dicom_lying_header``: the same pixel data under a header announcing one 512 x 512 frame
     (only the bounded inflater stops it);
   - ``png_16x5700``: 16 PNGs of 5700 x 5700 in one request (~680 KB);
   - ``dicom_512_frames``: an uncompressed 512-frame 128 x 128 CT (16 MiB);
   - ``text_30mb``: 30 MB of text in one message.
   Per bomb and run: the latency of the answer, its status and code, and the RSS growth: the
   server's peak RSS during the request (``VmHWM``, reset before each request through
   ``/proc/PID/clear_refs``) minus its RSS just before.
2. Fairness: a small chat (4 tokens) sent while a 10 MB text request is being handled is delayed by
   less than 1 s: the median latency of the small chat sent 20 ms after the big one starts, minus its
   median latency alone. Also with a 250 000-character text (under the character bound: tokenized, on
   the preparation thread, then refused by the token bound).
3. Budget: with ``--memory-budget-mb`` (default 1024), 16 clients each sending a maximum-size request
   at once, retrying after ``Retry-After`` on 503 until answered 200 (or a deadline): the server's
   RSS growth over its idle RSS stays under the budget. Two maximum-size requests: ``max_pixels``
   (``--load-images`` PNGs of 5700 x 5700 each: 4, the most images the tiny LLaVA takes in one
   request) and ``max_body`` (one ~47 MB noise PNG: a body at the 64 MiB bound). Reported: answers by status, how
   many requests ended 200, the peak RSS growth, the RSS kept afterwards, the wall time.

Every number is a median over ``--runs`` runs (``--load-runs`` for the budget phase, which is long);
the maximum over runs is reported too. Everything runs on this machine's shared CPU cores; the
server runs torch with 1 intra-op thread.

Usage::

    python benchmarks/bench_serve_bombs.py [--runs 5] [--load-runs 1] [--memory-budget-mb 1024]
        [--family llava] [--out benchmarks/results/bench_serve_bombs.json]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import bombs  # noqa: E402  (tests/bombs.py: the hostile inputs the tests use too)

sys.path.insert(0, str(ROOT / "benchmarks"))
from serve_client import ServerProcess, proc_status_kib  # noqa: E402  (the serving benchmarks' launcher)

MIB = 1024**2
BOMB_LATENCY_TARGET_S = 1.0
BOMB_RSS_TARGET_MB = 200.0
FAIRNESS_TARGET_S = 1.0
SERVER_START_TIMEOUT_S = 180.0


# ------------------------------------------------------------------------------------------ server


class Server(ServerProcess):
    """``emma serve --model FOLDER --memory-budget-mb N`` through serve_client's launcher (the serve
    defaults for batch size, device and dtype; torch on 1 thread), its key in ``EMMA_API_KEY``."""

    def __init__(self, model: str, memory_budget_mb: int, log_dir: Path) -> None:
        self.key = secrets.token_urlsafe(24)
        self.memory_budget_mb = memory_budget_mb
        super().__init__(
            "server",
            model,
            max_batch_size=8,
            device="auto",
            dtype="auto",
            log_dir=log_dir,
            threads=1,
            extra_args=["--memory-budget-mb", str(memory_budget_mb)],
            env={"EMMA_API_KEY": self.key},
        )
        self.headers = {**self.headers, "Content-Type": "application/json"}

    def _mb(self, key: str) -> float:
        kib = proc_status_kib(self.proc.pid, key)
        if kib is None:
            raise RuntimeError(f"no {key} of the server (exited?): {self.log_tail()}")
        return kib / 1024.0

    def rss_mb(self) -> float:
        return self._mb("VmRSS")

    def reset_peak(self) -> None:
        with open(f"/proc/{self.proc.pid}/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS

    def peak_mb(self) -> float:
        return self._mb("VmHWM")

    def post(self, body: bytes, timeout: float = 300.0) -> tuple[int, str | None, float]:
        """``(status, error code, seconds)`` of one chat completion."""
        start = time.perf_counter()
        r = httpx.post(f"{self.url}/v1/chat/completions", content=body, headers=self.headers, timeout=timeout)
        elapsed = time.perf_counter() - start
        code = None
        if r.status_code != 200:
            try:
                code = r.json()["error"]["code"]
            except (ValueError, KeyError, TypeError):
                code = "?"
        return r.status_code, code, elapsed


# ---------------------------------------------------------------------------------------- requests


def _data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _image_body(urls: list[str], max_tokens: int = 4) -> bytes:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    parts.append({"type": "text", "text": "What is shown?"})
    return json.dumps({"messages": [{"role": "user", "content": parts}], "max_tokens": max_tokens}).encode()


def _text_body(text: str, max_tokens: int = 4) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}).encode()


def _noise_png(target_bytes: int) -> bytes:
    """An RGB noise PNG of about ``target_bytes`` (noise does not compress)."""
    side = int((target_bytes / 3) ** 0.5)
    rng = np.random.default_rng(0)
    import io

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(
        buf, format="PNG", compress_level=1
    )
    return buf.getvalue()


def build_bombs() -> dict[str, bytes]:
    png = _data_url(bombs.big_png(5700, 5700), "image/png")
    return {
        "deflate_dicom": _image_body([_data_url(bombs.deflate_bomb(400 * MIB), "application/dicom")]),
        "deflate_dicom_lying_header": _image_body(
            [_data_url(bombs.deflate_bomb(400 * MIB, frames=1), "application/dicom")]
        ),
        "png_16x5700": _image_body([png] * 16),
        "dicom_512_frames": _image_body([_data_url(bombs.multiframe_ct(512, 128, 128), "application/dicom")]),
        "text_30mb": _text_body("word " * (6 * MIB)),
    }


# ------------------------------------------------------------------------------------------ phases


@dataclass
class BombRun:
    status: int
    code: str | None
    latency_s: float
    rss_growth_mb: float


@dataclass
class BombResult:
    name: str
    request_mb: float
    runs: list[BombRun] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        lat = [r.latency_s for r in self.runs]
        growth = [r.rss_growth_mb for r in self.runs]
        return {
            "request_mb": round(self.request_mb, 2),
            "statuses": sorted({f"{r.status} {r.code}" for r in self.runs}),
            "latency_s_median": round(statistics.median(lat), 3),
            "latency_s_max": round(max(lat), 3),
            "rss_growth_mb_median": round(statistics.median(growth), 1),
            "rss_growth_mb_max": round(max(growth), 1),
            "meets_target": all(
                400 <= r.status < 500
                and r.latency_s < BOMB_LATENCY_TARGET_S
                and r.rss_growth_mb < BOMB_RSS_TARGET_MB
                for r in self.runs
            )
            and statistics.median(lat) < BOMB_LATENCY_TARGET_S,
        }


def bomb_phase(server: Server, bodies: dict[str, bytes], runs: int) -> dict[str, BombResult]:
    results = {name: BombResult(name, len(body) / 1e6) for name, body in bodies.items()}
    for _ in range(runs):
        for name, body in bodies.items():
            before = server.rss_mb()
            server.reset_peak()
            status, code, latency = server.post(body)
            results[name].runs.append(BombRun(status, code, latency, server.peak_mb() - before))
    return results


SMALL_CHAT = _text_body("Hi", max_tokens=4)


def fairness_phase(server: Server, big: bytes, runs: int, per_run: int = 5) -> dict[str, Any]:
    """Median latency of the small chat alone, and sent 20 ms after ``big`` starts, per run."""
    alone_medians, with_medians, big_answers = [], [], []
    for _ in range(runs):
        alone = [server.post(SMALL_CHAT)[2] for _ in range(per_run)]
        loaded = []
        for _ in range(per_run):
            answer: list[tuple[int, str | None, float]] = []
            thread = threading.Thread(target=lambda out=answer: out.append(server.post(big)))
            thread.start()
            time.sleep(0.02)
            status, code, latency = server.post(SMALL_CHAT)
            thread.join()
            assert status == 200, (status, code)
            loaded.append(latency)
            big_answers.append(f"{answer[0][0]} {answer[0][1]}")
        alone_medians.append(statistics.median(alone))
        with_medians.append(statistics.median(loaded))
    delays = [w - a for w, a in zip(with_medians, alone_medians, strict=True)]
    return {
        "big_request_mb": round(len(big) / 1e6, 2),
        "big_answers": sorted(set(big_answers)),
        "small_alone_s_median": round(statistics.median(alone_medians), 3),
        "small_with_big_s_median": round(statistics.median(with_medians), 3),
        "delay_s_median": round(statistics.median(delays), 3),
        "delay_s_max": round(max(delays), 3),
        "meets_target": statistics.median(delays) < FAIRNESS_TARGET_S,
    }


def load_phase(server: Server, body: bytes, clients: int, deadline_s: float) -> dict[str, Any]:
    """``clients`` threads at once, each retrying its request after Retry-After on 503 until a 200."""
    time.sleep(1.0)
    idle = server.rss_mb()
    server.reset_peak()
    answers: dict[str, int] = {}
    done = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + deadline_s

    def client() -> None:
        while time.monotonic() < stop_at:
            status, code, _ = server.post(body, timeout=deadline_s)
            with lock:
                key = f"{status} {code}" if code else str(status)
                answers[key] = answers.get(key, 0) + 1
            if status == 200:
                with lock:
                    done[0] += 1
                return
            if status != 503:
                return
            time.sleep(1.0)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    peak_during = idle
    while any(t.is_alive() for t in threads):
        peak_during = max(peak_during, server.rss_mb())
        time.sleep(0.05)
    wall = time.perf_counter() - start
    peak = max(server.peak_mb(), peak_during)
    time.sleep(1.0)
    return {
        "request_mb": round(len(body) / 1e6, 2),
        "clients": clients,
        "answers": answers,
        "completed_200": done[0],
        "wall_s": round(wall, 1),
        "idle_rss_mb": round(idle, 1),
        "peak_rss_mb": round(peak, 1),
        "peak_growth_mb": round(peak - idle, 1),
        "kept_after_mb": round(server.rss_mb() - idle, 1),
        "budget_mb": server.memory_budget_mb,
        "meets_target": peak - idle < server.memory_budget_mb,
    }


# -------------------------------------------------------------------------------------------- main


def _warm_up(server: Server) -> None:
    png = _data_url(bombs.big_png(256, 256), "image/png")
    for _ in range(3):
        status, code, _ = server.post(_image_body([png]))
        assert status == 200, (status, code)
        server.post(SMALL_CHAT)


def _check_key_from_env(server: Server) -> bool:
    """The key set in EMMA_API_KEY is required: no header → 401, the key → 200."""
    r = httpx.get(f"{server.url}/v1/models", timeout=10)
    ok = httpx.get(f"{server.url}/v1/models", headers=server.headers, timeout=10)
    return r.status_code == 401 and ok.status_code == 200


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def print_tables(result: dict[str, Any]) -> None:
    rows = [["bomb", "request MB", "answer", "latency s (med/max)", "RSS growth MB (med/max)", "target"]]
    for name, s in result.get("bombs", {}).items():
        rows.append(
            [
                name,
                f"{s['request_mb']}",
                ",".join(s["statuses"]),
                f"{s['latency_s_median']}/{s['latency_s_max']}",
                f"{s['rss_growth_mb_median']}/{s['rss_growth_mb_max']}",
                "ok" if s["meets_target"] else "MISSED",
            ]
        )
    if len(rows) > 1:
        print(_table(rows))
    rows = [
        [
            "concurrent with",
            "small alone s",
            "small with big s",
            "delay s (med/max)",
            "big answered",
            "target",
        ]
    ]
    for name, f in result.get("fairness", {}).items():
        rows.append(
            [
                name,
                f"{f['small_alone_s_median']}",
                f"{f['small_with_big_s_median']}",
                f"{f['delay_s_median']}/{f['delay_s_max']}",
                ",".join(f["big_answers"]),
                "ok" if f["meets_target"] else "MISSED",
            ]
        )
    if len(rows) > 1:
        print(_table(rows))
    rows = [
        [
            "16 at once",
            "request MB",
            "answers",
            "200s",
            "peak growth MB",
            "budget MB",
            "kept MB",
            "wall s",
            "target",
        ]
    ]
    for name, entry in result.get("load", {}).items():
        last = entry["runs"][-1]
        rows.append(
            [
                name,
                f"{last['request_mb']}",
                json.dumps(last["answers"]),
                f"{last['completed_200']}/{last['clients']}",
                f"{entry['peak_growth_mb_median']}",
                f"{last['budget_mb']}",
                f"{last['kept_after_mb']}",
                f"{last['wall_s']}",
                "ok" if entry["meets_target"] else "MISSED",
            ]
        )
    if len(rows) > 1:
        print(_table(rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="llava")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--load-runs", type=int, default=1)
    parser.add_argument(
        "--load-images",
        type=int,
        default=4,
        help="5700x5700 PNGs per max_pixels request (the tiny LLaVA takes 4)",
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--memory-budget-mb", type=int, default=1024)
    parser.add_argument("--load-deadline-s", type=float, default=600.0)
    parser.add_argument(
        "--phases", default="bombs,fairness,load", help="comma-separated subset of bombs,fairness,load"
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_serve_bombs.json"
    )
    args = parser.parse_args(argv)

    from emma.model.tiny_families import build_tiny

    model = str(build_tiny(args.family))
    phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    print("building requests ...", flush=True)
    bodies = build_bombs() if "bombs" in phases else {}
    fairness_bodies = {
        "text_10mb": _text_body("word " * (2 * MIB)),
        "text_250k_chars": _text_body("word " * 50_000),
    }
    load_bodies: dict[str, Callable[[], bytes]] = {
        "max_pixels": lambda: _image_body(
            [_data_url(bombs.big_png(5700, 5700), "image/png")] * args.load_images
        ),
        "max_body": lambda: _image_body([_data_url(_noise_png(47 * MIB), "image/png")]),
    }
    result: dict[str, Any] = {
        "benchmark": "bench_serve_bombs",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "family": args.family,
        "runs": args.runs,
        "targets": {
            "bomb_latency_s": BOMB_LATENCY_TARGET_S,
            "bomb_rss_growth_mb": BOMB_RSS_TARGET_MB,
            "fairness_delay_s": FAIRNESS_TARGET_S,
            "load_rss_growth": "under --memory-budget-mb",
        },
    }
    with tempfile.TemporaryDirectory(prefix="emma-bench-bombs-") as tmp:
        server = Server(model, args.memory_budget_mb, Path(tmp))
        try:
            server.wait_ready(SERVER_START_TIMEOUT_S)
            result["api_key_from_env_required"] = _check_key_from_env(server)
            _warm_up(server)
            result["idle_rss_mb"] = round(server.rss_mb(), 1)
            if "bombs" in phases:
                print("bombs ...", flush=True)
                bombs_out = bomb_phase(server, bodies, args.runs)
                result["bombs"] = {name: r.summary() for name, r in bombs_out.items()}
            if "fairness" in phases:
                print("fairness ...", flush=True)
                result["fairness"] = {
                    name: fairness_phase(server, body, args.runs) for name, body in fairness_bodies.items()
                }
            if "load" in phases:
                result["load"] = {}
                for name, make in load_bodies.items():
                    print(f"load {name} ...", flush=True)
                    body = make()
                    runs = [
                        load_phase(server, body, args.clients, args.load_deadline_s)
                        for _ in range(args.load_runs)
                    ]
                    growth = [r["peak_growth_mb"] for r in runs]
                    result["load"][name] = {
                        "runs": runs,
                        "peak_growth_mb_median": round(statistics.median(growth), 1),
                        "peak_growth_mb_max": round(max(growth), 1),
                        "meets_target": all(r["meets_target"] for r in runs),
                    }
        finally:
            server.stop()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_tables(result)
    print(f"API key from EMMA_API_KEY required: {result['api_key_from_env_required']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
