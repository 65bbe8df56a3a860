"""Evaluation commands: ``emma eval`` (generate and score one task, or score a predictions file; with
``--tasks``, many tasks as one run through :mod:`emma.cli.suite`), ``emma eval compare`` and
``emma eval tasks``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from emma.cli import app
from emma.cli.common import err_console, fail, handle_errors, stderr_progress

eval_app = typer.Typer(
    help=(
        "Evaluate a model on a benchmark task (generate through an engine and score), on many tasks "
        "(--tasks), or score a predictions file. Subcommands: compare (two runs, paired tests), tasks "
        "(the registry), suite (a named group of tasks)."
    ),
    invoke_without_command=True,
)
app.add_typer(eval_app, name="eval")


def _console() -> Console:
    return Console(highlight=False, soft_wrap=False)


def _table(title: str, columns: Sequence[str], left: Sequence[str] = ("metric",)) -> Table:
    """A table of numbers: the ``left`` columns left-aligned, the others right-aligned."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col in left else "right")
    return table


def _value_cells(value: float | None, ci: Sequence[float] | None) -> tuple[str, str]:
    """A metric's value and its 95% CI as shown ("null" and "-" when absent)."""
    return "null" if value is None else f"{value:.4f}", f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "-"


def _delta_cells(d: dict[str, Any]) -> tuple[str, str]:
    """A difference between two runs and its 95% CI, signed."""
    return f"{d['delta']:+.4f}", f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"


def _print_results(results: dict[str, Any], out: Path) -> None:
    console = _console()
    title = f"{results['task']} ({results['split']}), {results['model']}: n={results['n']}"
    table = _table(title, ("metric", "value", "95% CI"))
    for name, value in results["metrics"].items():
        table.add_row(name, *_value_cells(value, results["ci95"].get(name)))
    console.print(table)
    zero_shot = results.get("zero_shot")
    if zero_shot:
        _print_zero_shot(console, zero_shot)
    ablation = results.get("ablation")
    if ablation:
        t = _table(
            f"ablation {ablation['mode']}: delta = ablated - real image (paired)",
            ("metric", "real", "ablated", "delta", "95% CI", "p (perm.)"),
        )
        for name, d in ablation["delta"].items():
            t.add_row(name, f"{d['a']:.4f}", f"{d['b']:.4f}", *_delta_cells(d), f"{d['p_permutation']:.4f}")
        console.print(t)
    for note in results.get("notes", []):
        console.print(f"note: {note}", markup=False)
    console.print(f"results: {out / 'results.json'}  report: {out / 'report.html'}", markup=False)


def _print_zero_shot(console: Console, block: dict[str, Any]) -> None:
    t = _table(
        f"zero-shot protocol: {block['held_out']} held out; evaluated split is {block['role']}",
        ("group", "n", "metric", "value", "95% CI"),
        left=("group", "metric"),
    )
    for group in ("zero_shot", "in_distribution"):
        g = block.get(group)
        if not g:
            continue
        for name, value in g["metrics"].items():
            t.add_row(group, str(g["n"]), name, *_value_cells(value, g["ci95"].get(name)))
    console.print(t)


@eval_app.callback()
@handle_errors
def eval_command(
    ctx: typer.Context,
    task: str | None = typer.Option(None, "--task", help="Task name (see `emma eval tasks`)."),
    tasks: str | None = typer.Option(
        None,
        "--tasks",
        help=(
            "Many tasks as one run: task and suite names, comma-separated (vqa-rad,slake-en or "
            "radiology-vqa, emma-table, chest-xray); one combined report, missing data skipped."
        ),
    ),
    data: list[str] | None = typer.Option(
        None,
        "--data",
        help=(
            "Dataset folder (dataset.json) or the official release folder (imported once); with --tasks: "
            "TASK=DIR (repeatable)."
        ),
    ),
    data_root: Path | None = typer.Option(
        None,
        "--data-root",
        help="--tasks: folder holding one dataset folder per task (<task> or <importer>).",
    ),
    model: str | None = typer.Option(
        None, "--model", help="Model spec: emma-tiny, a model folder, a hub id, or openai:URL#MODEL."
    ),
    predictions: Path | None = typer.Option(
        None,
        "--predictions",
        help='Score this JSONL file ({"id", "prediction"} per line) instead of a model.',
    ),
    split: str | None = typer.Option(None, "--split", help="Split to evaluate (default: the task's)."),
    out: Path | None = typer.Option(None, "--out", help="Run folder (default: runs/<task>-<split>-<model>)."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Evaluate the first N samples only."),
    ablate: str | None = typer.Option(
        None, "--ablate", help="Also answer with a blank, noise or shuffle (mismatched) image; report deltas."
    ),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Requests per engine call."),
    concurrency: int | None = typer.Option(
        None,
        "--concurrency",
        min=1,
        help="openai: models: requests in flight at most (default 8; each call then sends at least N).",
    ),
    judge: str | None = typer.Option(
        None, "--judge", help="LLM judge for open questions (openai:URL#MODEL); needs emma.eval.judge."
    ),
    train_data: Path | None = typer.Option(
        None,
        "--train-data",
        help="Training dataset folder: report image and question overlap with the split.",
    ),
    compat: str | None = typer.Option(
        None,
        "--compat",
        help="Reproduce a published scorer for comparison (medevalkit); labelled everywhere.",
    ),
    family: str | None = typer.Option(
        None,
        "--family",
        help="Box convention of the predictions' model family (grounding; default: the engine's).",
    ),
    temperature: float | None = typer.Option(None, "--temperature", min=0.0, help="Override (default 0)."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", min=1, help="Override the task's."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap, ablations and sampling."),
    n_resamples: int = typer.Option(2000, "--bootstrap", min=100, help="Bootstrap resamples for CIs."),
    as_json: bool = typer.Option(False, "--json", help="Print results.json instead of tables."),
) -> None:
    """Generate with a model and score, or score a predictions file; write results.json, per_sample.jsonl
    and the reports to the run folder. A rerun into the same folder resumes from the cached predictions."""
    if ctx.invoked_subcommand is not None:
        return
    if tasks is not None:
        single_only = {
            "--task": task,
            "--predictions": predictions,
            "--split": split,
            "--ablate": ablate,
            "--judge": judge,
            "--train-data": train_data,
            "--compat": compat,
            "--family": family,
            "--temperature": temperature,
            "--max-new-tokens": max_new_tokens,
        }
        given = [flag for flag, value in single_only.items() if value is not None]
        if given:
            raise fail(f"{', '.join(given)} apply to one --task, not to --tasks")
        if model is None:
            raise fail("--tasks needs a --model")
        from emma.cli.suite import run_tasks

        run_tasks(
            tasks,
            model=model,
            data_root=data_root,
            data=data,
            out=out,
            limit=limit,
            batch_size=batch_size,
            concurrency=concurrency,
            seed=seed,
            n_resamples=n_resamples,
            as_json=as_json,
        )
        return
    if task is None or not data:
        typer.echo(ctx.get_help())
        raise fail("--task and --data are required, or --tasks (or use a subcommand: compare, tasks, suite)")
    if len(data) != 1:
        raise fail("--task takes one --data folder (TASK=DIR pairs are for --tasks)")
    if data_root is not None:
        raise fail("--data-root applies to --tasks; give one task's folder with --data")
    from emma.eval.runner import EvalOptions, run_eval

    engine = None
    if concurrency is not None and model is None:
        raise fail("--concurrency applies to a --model (requests in flight to an openai: server)")
    if concurrency is not None and model is not None:
        from emma.eval.suite import open_engine

        engine, batch_size, _ = open_engine(model, batch_size=batch_size, concurrency=concurrency)
    options = EvalOptions(
        task=task,
        data=Path(data[0]),
        model=model,
        predictions=predictions,
        split=split,
        out=out,
        limit=limit,
        ablate=ablate,
        batch_size=batch_size,
        judge=judge,
        train_data=train_data,
        compat=compat,
        family=family,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
        n_resamples=n_resamples,
    )
    try:
        with stderr_progress() as update:
            run = run_eval(
                options,
                engine=engine,
                progress=lambda done, total: update(f"evaluating {task}", done, total),
            )
    finally:
        if engine is not None:
            engine.close()
    if as_json:
        typer.echo(json.dumps(run.results, indent=2, ensure_ascii=False))
    else:
        _print_results(run.results, run.out)
    judge = run.results["config"].get("judge")
    counts = run.results["counts"]
    if judge is not None and counts.get("judge_errors"):
        first = judge["errors"][0]
        if run.judged_nothing:
            raise fail(
                f"the judge could not judge any of the {counts['judge_n']} open answers ({first}); "
                "judge_* metrics are null"
            )
        err_console.print(
            f"warning: the judge failed on {counts['judge_errors']} of {counts['judge_n']} open answers "
            f"({first}); judge_* metrics are null, a re-run asks again for those only",
            markup=False,
        )


@eval_app.command("compare")
@handle_errors
def compare_command(
    run_a: Path = typer.Argument(..., help="Run folder A (the reference)."),
    run_b: Path = typer.Argument(..., help="Run folder B."),
    n_resamples: int = typer.Option(2000, "--bootstrap", min=100, help="Bootstrap resamples."),
    seed: int = typer.Option(0, "--seed"),
    output: Path | None = typer.Option(None, "--output", help="Also write the comparison JSON here."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
) -> None:
    """Paired comparison of two runs on their shared samples: delta = B - A per metric, paired bootstrap CI,
    bootstrap and permutation p-values."""
    from emma.eval.runner import compare_runs
    from emma.io.atomic import atomic_path

    result = compare_runs(run_a, run_b, n_resamples=n_resamples, seed=seed)
    text = json.dumps(result, indent=2, ensure_ascii=False)
    if output is not None:
        with atomic_path(output) as tmp:
            tmp.write_text(text + "\n", encoding="utf-8")
    if as_json:
        typer.echo(text)
        return
    console = _console()
    table = _table(
        f"{result['task']}: B - A on {result['n_shared']} shared samples",
        ("metric", "A", "B", "delta", "95% CI", "p (boot.)", "p (perm.)"),
    )
    for name, d in result["metrics"].items():
        table.add_row(
            name,
            f"{d['a']:.4f}",
            f"{d['b']:.4f}",
            *_delta_cells(d),
            f"{d['p_bootstrap']:.4f}",
            f"{d['p_permutation']:.4f}",
        )
    console.print(f"A: {result['a']['model']} ({result['a']['run']})", markup=False)
    console.print(f"B: {result['b']['model']} ({result['b']['run']})", markup=False)
    if result["metrics"]:
        console.print(table)
    _print_zero_shot_compare(console, result.get("zero_shot"))
    if result["only_a"] or result["only_b"]:
        console.print(f"not shared: {result['only_a']} only in A, {result['only_b']} only in B", markup=False)
    for w in result["warnings"]:
        console.print(f"warning: {w}", markup=False)


def _print_zero_shot_compare(console: Console, zs: dict[str, Any] | None) -> None:
    if not zs:
        return
    console.print(
        f"zero-shot protocol ({zs['held_out']}): A is {zs['role_a']}, B is {zs['role_b']}"
        + ("; paired on shared samples" if zs["paired"] else ""),
        markup=False,
    )
    if not zs["gap"]:
        return
    table = _table(
        "B - A on different samples (unpaired two-sample bootstrap)",
        ("metric", "A", "B", "delta", "95% CI", "p (boot.)"),
    )
    for name, d in zs["gap"].items():
        table.add_row(
            name,
            f"{d['a']:.4f} (n={d['n_a']})",
            f"{d['b']:.4f} (n={d['n_b']})",
            *_delta_cells(d),
            f"{d['p_bootstrap']:.4f}",
        )
    console.print(table)


@eval_app.command("tasks")
@handle_errors
def tasks_command(as_json: bool = typer.Option(False, "--json", help="Print the registry as JSON.")) -> None:
    """The registered tasks: kind, importer, default split, prompts."""
    from emma.eval.tasks import TASKS

    if as_json:
        typer.echo(
            json.dumps(
                {
                    n: {**t.config(), "default_split": t.default_split, "description": t.description}
                    for n, t in TASKS.items()
                },
                indent=2,
                ensure_ascii=False,
            )
        )
        return
    table = Table(title="evaluation tasks")
    for col in ("task", "kind", "dataset", "split", "description"):
        table.add_column(col)
    for name, t in TASKS.items():
        table.add_row(name, t.kind, t.importer, t.default_split, t.description)
    _console().print(table)
