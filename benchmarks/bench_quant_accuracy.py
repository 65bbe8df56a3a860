"""Accuracy after quantisation: the same `emma eval` on a model and on its GGUF-quantised language model, paired.

    python benchmarks/bench_quant_accuracy.py [--model emma-tiny] [--task vqa-rad]
        [--data ../shared/data/vqa-rad] [--quants q8_0,q4_0,bf16] [--limit N] [--runs runs/quant]
        [--out benchmarks/results/bench_quant_accuracy.json]

For each quantisation the model's language model is exported by ``emma export --to gguf --quant Q`` (llama.cpp's
converter; ``q4_0`` re-quantised from its f16 file, see ``emma.train.gguf_export``), read back by
transformers (dequantized) into the same VLM (:func:`emma.train.gguf_export.dequantized_copy`, float32,
vision side untouched) and saved as a model folder. Every folder, and the model itself ("full"), then runs
``emma eval --task TASK --data DATA --model FOLDER --out RUNS/<variant>``, in-process, greedy; each
variant is compared with ``emma eval compare RUNS/full RUNS/<variant>`` (paired bootstrap CI and
permutation p on the shared samples). The GGUF weights are what llama.cpp would run; the compute here
is the transformers engine's fp32, so the deltas isolate the weights' precision (llama.cpp's own kernels
quantise activations for Q8_0/Q4_0 matmuls as well). ``bf16`` is the language model's weights rounded to
bfloat16 (the converter's bf16 outtype): the in-process engine's bf16 weights.

Runs are resumable (``emma eval`` resumes its predictions; finished exports and folders are reused).
Results: ``--out`` JSON and a Markdown table beside it. A smoke run: ``--model tiny:fast_vlm --limit 8
--runs /tmp/quant --out /tmp/quant/bench.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from emma.model.registry import parse_spec, resolve_folder
from emma.text.normalize import normalize_answer
from emma.train.export import export_gguf
from emma.train.gguf_export import dequantized_copy


def _emma(*args: str) -> None:
    """Run the ``emma`` CLI of this interpreter (as a user would), failing loudly."""
    cmd = [sys.executable, "-c", "from emma.cli import app; app()", *args]
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): emma {' '.join(args)}")


def _variant_folder(folder: Path, work: Path, quant: str) -> tuple[Path, int]:
    """The model folder of one quantisation (exported and rebuilt once), and its GGUF's size in bytes."""
    gguf_file = work / "gguf" / f"model-{quant}.gguf"
    if not gguf_file.is_file():
        export_gguf(folder, work / "gguf", quant=quant)
    model = work / "models" / quant
    if not (model / "config.json").is_file():
        dequantized_copy(folder, gguf_file, model)
    return model, gguf_file.stat().st_size


def _eval(model: str, run: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = ["eval", "--task", args.task, "--data", str(args.data), "--model", model, "--out", str(run)]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    start = time.perf_counter()
    _emma(*cmd)
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    return {"run": str(run), "seconds": round(time.perf_counter() - start, 1), "n": results["n"], **results}


def _agreement(run_a: Path, run_b: Path) -> float:
    """Share of the shared samples whose answers are the same in both runs (after the scorers' answer
    normalisation: "No" and "no" are the same answer)."""

    def answers(run: Path) -> dict[str, str]:
        rows = (
            json.loads(line) for line in (run / "per_sample.jsonl").read_text(encoding="utf-8").splitlines()
        )
        return {row["id"]: normalize_answer(row["prediction"] or "") for row in rows}

    a, b = answers(run_a), answers(run_b)
    shared = a.keys() & b.keys()
    return sum(a[i] == b[i] for i in shared) / max(len(shared), 1)


def _delta(d: dict[str, Any], sep: str = " | ") -> str:
    """A compared metric's delta, CI and permutation p as table text (``sep`` joins them)."""
    if not d:
        return sep.join(["-"] * 3)
    ci = d.get("ci95", [float("nan"), float("nan")])
    p = d.get("p_permutation", float("nan"))
    return sep.join(
        [f"{d['delta']:+.4f}", f"[{ci[0]:+.4f}, {ci[1]:+.4f}]", f"({p:.3f})" if sep == " " else f"{p:.4f}"]
    )


def _markdown(result: dict[str, Any]) -> str:
    headline = result["headline"]
    lines = [
        f"# Accuracy after quantisation: {result['model']} on {result['task']} (n={result['n']})",
        "",
        f"Command: `{result['command']}`",
        "",
        f"| variant | GGUF MiB | {headline} | delta vs full | 95% CI | p (perm.) | same answer as full |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    full = result["variants"]["full"]
    lines.append(f"| full precision | - | {full['metrics'][headline]:.4f} | - | - | - | - |")
    others = {name: v for name, v in result["variants"].items() if name != "full"}
    for name, v in others.items():
        d = v["compare"]["metrics"].get(headline, {})
        lines.append(
            f"| {name} | {v['gguf_bytes'] / 2**20:.1f} | {v['metrics'][headline]:.4f} | {_delta(d)} | "
            f"{v['same_answer']:.1%} |"
        )
    lines += ["", "Every metric, delta vs full [95% CI] (permutation p):", ""]
    metrics = [m for m in full["metrics"] if m != headline]
    lines += ["| variant | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for name, v in others.items():
        cells = [_delta(v["compare"]["metrics"].get(m, {}), sep=" ") for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", result["note"], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="emma-tiny", help="Model spec (emma-tiny, tiny:FAMILY, a folder).")
    parser.add_argument("--task", default="vqa-rad")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/vqa-rad"))
    parser.add_argument("--quants", default="q8_0,q4_0,bf16")
    parser.add_argument(
        "--limit", type=int, default=None, help="Evaluate the first N samples only (smoke run)."
    )
    parser.add_argument("--runs", type=Path, default=Path("runs/quant"), help="Run folders, exports, models.")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_quant_accuracy.json"))
    args = parser.parse_args()

    folder = resolve_folder(parse_spec(args.model), allow_download=False)
    variants: dict[str, Any] = {"full": _eval(args.model, args.runs / "full", args)}
    for quant in [q.strip() for q in args.quants.split(",") if q.strip()]:
        model, size = _variant_folder(folder, args.runs, quant)
        run = args.runs / quant
        variants[quant] = {"gguf_bytes": size, **_eval(str(model), run, args)}
        _emma("eval", "compare", str(args.runs / "full"), str(run), "--output", str(run / "compare.json"))
        variants[quant]["compare"] = json.loads((run / "compare.json").read_text(encoding="utf-8"))
        variants[quant]["same_answer"] = _agreement(args.runs / "full", run)
    keep = ("run", "seconds", "n", "gguf_bytes", "metrics", "ci95", "counts", "same_answer", "compare")
    result = {
        "model": args.model,
        "task": args.task,
        "limit": args.limit,
        "n": variants["full"]["n"],
        "headline": variants["full"]["headline"],
        "command": "python " + " ".join(sys.argv),
        "note": (
            "Language model weights from the GGUF (dequantized by transformers), vision side and compute "
            "unchanged (fp32, transformers engine); delta = variant - full on the same samples, paired "
            "bootstrap CI and permutation p (emma eval compare)."
        ),
        "variants": {name: {k: v[k] for k in keep if k in v} for name, v in variants.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(_markdown(result), encoding="utf-8")
    print(_markdown(result))


if __name__ == "__main__":
    main()
