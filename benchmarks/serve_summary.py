"""bench_serve's summary: medians over runs of each phase's statistics, the claims, the tables, the plot."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from serve_client import IN_PROCESS, SERVER, SERVER_NOBATCH, Phase

TARGET_OVERHEAD = 0.10  # server latency over in-process latency at concurrency 1, minus one


def _median(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


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
