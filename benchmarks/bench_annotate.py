"""Annotation runner: teacher throughput, resume overhead after ``kill -9``, memory while streaming.

Claims measured (issue 6):

1. **Throughput.** Against a scripted teacher that serves ``K`` concurrent requests with a fixed latency
   ``L`` (capacity ``K / L`` requests/s; requests beyond ``K`` wait), the pipeline reaches >= 90 % of
   that capacity. The teacher (:mod:`emma.annotate.scripted_teacher`) runs in its own process, as a real
   teacher would, so its CPU does not share the pipeline's interpreter. The pipeline runs one realistic
   step per input (image + prompt to the teacher, JSON answer parsed, provenance recorded, sample and
   image written) with ``concurrency = K`` (the strict setting: the client never has more requests out
   than the teacher has slots, so every client-side round trip leaves a slot idle for a moment) and
   with ``K + max(2, K // 4)`` (a few requests wait at the teacher, as a real deployment would run).
   Ratio = items/s / (K / L); several runs, median.
2. **Resume.** A run of ``N`` inputs is killed with SIGKILL once about half of its answers are
   stored, then rerun to completion. Overhead = rerun time − the time an uninterrupted run spends on
   the inputs the rerun had to process (clean run time × processed / N). Also the pure skip rate: a
   rerun of a finished run (every input skipped).
3. **Memory.** Peak RSS of a pipeline process streaming 100k samples (teacher without latency),
   sampled after 1k, 10k and 100k inputs.

Usage: ``python benchmarks/bench_annotate.py [--runs 5] [--quick] [--out benchmarks/results/bench_annotate.json]``
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Self

from PIL import Image
from rich.console import Console
from rich.table import Table

from emma.annotate.runner import run_pipeline
from emma.annotate.steps import Item, prompt_hash, provenance, record_provenance, reject
from emma.data.schema import ImageRef, Sample, Turn
from emma.data.store import DatasetWriter
from emma.infer.types import ImagePart, Message, TextPart

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_annotate.json"
TARGET_RATIO = 0.90
PROMPT = "Describe this image in one sentence (modality, body part, view). Context: {q}"


class CaptionStep:
    """One teacher call per input: the image and a prompt, a JSON answer, provenance recorded."""

    name = "caption"
    prompt_hash = prompt_hash("bench-caption", PROMPT)

    def __call__(self, item: Item, images: list[Image.Image], ask: Any) -> list[Item]:
        msg = Message(
            "user", [*(ImagePart(im) for im in images), TextPart(PROMPT.format(q=item.sample.question))]
        )
        try:
            echo = json.loads(ask([msg]))["echo"]
        except (ValueError, KeyError, TypeError):
            return [reject(item, "invalid_json", "caption answer")]
        sample = item.sample.model_copy(
            update={"meta": item.sample.meta.model_copy(update={"findings": [f"echo-{echo}"]})}
        )
        record = provenance(self.name, self.prompt_hash, ask, confidence=0.9)
        return [Item(record_provenance(sample, self.name, record))]


class Milestones:
    """Wraps a step: records the process RSS (current and peak) after given numbers of inputs."""

    def __init__(self, step: CaptionStep, at: list[int]) -> None:
        self.step = step
        self.name = step.name
        self.prompt_hash = step.prompt_hash
        self.at = set(at)
        self.count = 0
        self.lock = threading.Lock()
        self.samples: list[dict[str, Any]] = []

    def __call__(self, item: Item, images: list[Image.Image], ask: Any) -> list[Item]:
        out = self.step(item, images, ask)
        with self.lock:
            self.count += 1
            if self.count in self.at:
                self.samples.append({"inputs": self.count, **rss_mib()})
        return out


def rss_mib() -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident memory of this process, MiB (Linux)."""
    values: dict[str, float] = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, kb = line.split()[:2]
                values["rss_mib" if key == "VmRSS:" else "peak_rss_mib"] = round(int(kb) / 1024, 1)
    return values


# ------------------------------------------------------------------------------------------ fixtures


def build_source(root: Path, n: int, *, distinct: int = 256, size: int = 64) -> Path:
    """``n`` samples with one ``size`` x ``size`` image each (``distinct`` different images, as PNG)."""
    blobs = []
    for i in range(distinct):
        im = Image.new("RGB", (size, size), (i % 256, (i * 7) % 256, (i * 13) % 256))
        im.putpixel((i % size, 0), (255, 255, 255))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        blobs.append(buf.getvalue())
    import hashlib

    shas = [hashlib.sha256(b).hexdigest() for b in blobs]
    with DatasetWriter(root, name=f"bench-{n}") as w:
        for i in range(n):
            k = i % distinct
            sample = Sample(
                id=f"b{i:07d}",
                task="caption",
                images=[ImageRef(sha256=shas[k])],
                turns=[Turn(role="user", content=f"emergency department study {i}, chest pain", images=[0])],
            )
            if w.has_image(shas[k]):
                w.add(sample)
            else:
                w.add(sample, [blobs[k]])
    return root


class TeacherProcess:
    """The scripted teacher in its own process (``python -m emma.annotate.scripted_teacher``)."""

    def __init__(self, k: int | None, latency: float) -> None:
        cmd = [sys.executable, "-m", "emma.annotate.scripted_teacher", "--latency", str(latency)]
        if k is not None:
            cmd += ["--max-concurrent", str(k)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.spec = self.proc.stdout.readline().strip()
        if not self.spec.startswith("openai:"):
            raise RuntimeError("the scripted teacher did not start")

    def close(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        return json.loads(out.strip().splitlines()[-1]) if out.strip() else {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.close()


# ------------------------------------------------------------------------------------------ children

_CHILD = [sys.executable, str(Path(__file__).resolve()), "--child"]


def child_main(args: argparse.Namespace) -> int:
    """A pipeline run in its own process: prints its stats (and memory milestones) as JSON."""
    at = [int(x) for x in args.milestones.split(",")] if args.milestones else []
    step = Milestones(CaptionStep(), at)
    stats = run_pipeline(
        [step], args.src, args.dst, args.spec, concurrency=args.concurrency, progress=False, store=args.store
    )
    print(
        json.dumps({"stats": json.loads(stats.to_json()), "memory": step.samples, "end": rss_mib()}),
        flush=True,
    )
    return 0


def run_child(src: Path, dst: Path, spec: str, concurrency: int, milestones: str = "") -> dict[str, Any]:
    cmd = [*_CHILD, "--src", str(src), "--dst", str(dst), "--spec", spec, "--concurrency", str(concurrency)]
    if milestones:
        cmd += ["--milestones", milestones]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def store_records(store: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in (store / "segments").glob("*.jsonl"))


# ------------------------------------------------------------------------------------------ measures


def throughput(
    tmp: Path, k: int, latency: float, concurrency: int, runs: int, seconds: float
) -> dict[str, Any]:
    capacity = k / latency
    n = int(capacity * seconds)
    src = tmp / f"src-{k}-{n}"
    if not src.exists():
        build_source(src, n)
    ratios, rates = [], []
    with TeacherProcess(k, latency) as teacher:
        for r in range(runs):
            out = tmp / f"thr-{k}-{latency}-{concurrency}-{r}"
            stats = run_pipeline(
                [CaptionStep()], src, out, teacher.spec, concurrency=concurrency, progress=False
            )
            assert stats.accepted == n, stats
            rates.append(stats.items_per_s)
            ratios.append(stats.items_per_s / capacity)
            shutil.rmtree(out)
        server = teacher.close()
    return {
        "k": k,
        "latency_s": latency,
        "concurrency": concurrency,
        "capacity_items_per_s": capacity,
        "n": n,
        "runs": runs,
        "items_per_s": rates,
        "ratio": [round(x, 4) for x in ratios],
        "ratio_median": round(statistics.median(ratios), 4),
        "teacher_max_in_flight": server.get("max_in_flight"),
        "meets_target": statistics.median(ratios) >= TARGET_RATIO,
    }


def resume(tmp: Path, n: int, k: int, latency: float) -> dict[str, Any]:
    src = build_source(tmp / f"src-resume-{n}", n)
    with TeacherProcess(k, latency) as teacher:
        clean = run_child(src, tmp / "clean", teacher.spec, k)["stats"]
        # a finished run, run again: every input skipped
        rerun = run_child(src, tmp / "clean", teacher.spec, k)["stats"]
        # killed once about half of the answers are stored, then resumed
        killed = tmp / "killed"
        cmd = [
            *_CHILD,
            "--src",
            str(src),
            "--dst",
            str(killed),
            "--spec",
            teacher.spec,
            "--concurrency",
            str(k),
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        store = killed / "teacher_store"
        while proc.poll() is None:
            if (store / "segments").is_dir() and store_records(store) >= n:  # answers + done markers ~ 2n
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait()
        resumed = run_child(src, killed, teacher.spec, k)["stats"]
    same = (killed / "samples" / "train.jsonl").read_bytes().count(b"\n") == n
    remaining_clean_s = clean["elapsed_s"] * resumed["processed"] / n
    return {
        "n": n,
        "k": k,
        "latency_s": latency,
        "clean_s": clean["elapsed_s"],
        "rerun_all_skipped_s": rerun["elapsed_s"],
        "skip_rate_inputs_per_s": round(n / rerun["elapsed_s"], 1) if rerun["elapsed_s"] else None,
        "killed_after_inputs": resumed["skipped"],
        "resumed_processed": resumed["processed"],
        "resumed_cached_answers": resumed["cached_answers"],
        "resumed_s": resumed["elapsed_s"],
        "resume_overhead_s": round(resumed["elapsed_s"] - remaining_clean_s, 3),
        "every_input_once": same,
    }


def memory(tmp: Path, n: int, concurrency: int) -> dict[str, Any]:
    src = build_source(tmp / f"src-mem-{n}", n)
    marks = [m for m in (1_000, 10_000, 100_000) if m <= n]
    if n not in marks:
        marks.append(n)
    with TeacherProcess(None, 0.0) as teacher:
        t0 = time.monotonic()
        result = run_child(src, tmp / "mem", teacher.spec, concurrency, ",".join(map(str, marks)))
        wall = time.monotonic() - t0
    samples = result["memory"]
    peaks = [s["peak_rss_mib"] for s in samples]
    return {
        "n": n,
        "concurrency": concurrency,
        "milestones": samples,
        "end": result["end"],
        "items_per_s": result["stats"]["items_per_s"],
        "wall_s": round(wall, 1),
        "peak_growth_mib_first_to_last": round(peaks[-1] - peaks[0], 1) if peaks else None,
    }


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of one throughput run")
    parser.add_argument("--memory-n", type=int, default=100_000)
    parser.add_argument("--resume-n", type=int, default=3_000)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run, not the claim)")
    parser.add_argument("--only", choices=["throughput", "resume", "memory"], default=None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--dst", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--store", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--milestones", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args)
    if args.quick:
        args.runs, args.seconds, args.memory_n, args.resume_n = 2, 2.0, 2_000, 600
    configs = [(8, 0.05), (16, 0.1), (32, 0.2)]
    result: dict[str, Any] = {
        "benchmark": "bench_annotate",
        "host": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "target_ratio": TARGET_RATIO,
        "quick": args.quick,
    }
    console = Console()
    with tempfile.TemporaryDirectory(prefix="bench-annotate-") as d:
        tmp = Path(d)
        if args.only in (None, "throughput"):
            # concurrency = K (the strict setting), and K plus a quarter (a few requests queued at the
            # teacher, so that its slots never wait for the client's round trip)
            result["throughput"] = [
                throughput(tmp, k, lat, c, args.runs, args.seconds)
                for k, lat in configs
                for c in (k, k + max(2, k // 4))
            ]
        if args.only in (None, "resume"):
            result["resume"] = resume(tmp, args.resume_n, 16, 0.1)
        if args.only in (None, "memory"):
            result["memory"] = memory(tmp, args.memory_n, 8)
    if "throughput" in result:
        table = Table(title="throughput vs teacher capacity (K / L)")
        for col in ("K", "L (s)", "concurrency", "capacity/s", "items/s (median)", "ratio (median)", "runs"):
            table.add_column(col)
        for t in result["throughput"]:
            table.add_row(
                str(t["k"]),
                str(t["latency_s"]),
                str(t["concurrency"]),
                f"{t['capacity_items_per_s']:.0f}",
                f"{statistics.median(t['items_per_s']):.1f}",
                f"{t['ratio_median']:.3f}",
                str(t["runs"]),
            )
        console.print(table)
    if "resume" in result:
        console.print({k: v for k, v in result["resume"].items()})
    if "memory" in result:
        console.print(result["memory"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    console.print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
