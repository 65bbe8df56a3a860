"""``emma eval suite`` and ``emma eval --tasks``: many tasks with one model as one run, skipping what is
not downloaded (each skipped task with the ``emma data import`` command that provides it)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from emma.cli.common import fail, handle_errors, stderr_progress
from emma.cli.eval import eval_app

EXIT_TASK_FAILED = 1  # a task of the suite failed (the others ran; suite.json says which and why)


def _data_overrides(values: list[str] | None) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for value in values or []:
        task, sep, folder = value.partition("=")
        if not sep or not task.strip() or not folder.strip():
            raise fail(f"--data takes TASK=DIR, got {value!r}")
        out[task.strip()] = Path(folder.strip())
    return out


def run_tasks(
    spec: str,
    *,
    model: str,
    data_root: Path | None,
    data: list[str] | None,
    out: Path | None,
    limit: int | None,
    batch_size: int,
    concurrency: int | None,
    seed: int,
    n_resamples: int,
    as_json: bool,
) -> None:
    """Run the tasks of ``spec`` (tasks and suites, comma-separated), print the summary; exit 1 if a task
    failed. Shared by ``emma eval suite`` and ``emma eval --tasks``."""
    from emma.eval.suite import default_out, run_suite

    out = out if out is not None else default_out(spec, model)
    with stderr_progress() as update:
        suite = run_suite(
            spec,
            out=out,
            data_root=data_root,
            data=_data_overrides(data),
            model=model,
            limit=limit,
            batch_size=batch_size,
            concurrency=concurrency,
            n_resamples=n_resamples,
            seed=seed,
            progress=lambda task, done, total: update(f"evaluating {task}", done, total),
        )
    if as_json:
        typer.echo(json.dumps(suite.as_dict(), indent=2, ensure_ascii=False))
    else:
        table = Table(title=f"suite {suite.name}: {suite.model}")
        for col in ("task", "status", "n", "metric", "value", "95% CI", "run / reason"):
            table.add_column(col, overflow="fold")
        for t in suite.tasks:
            table.add_row(
                t.task,
                t.status,
                str(t.n) if t.n is not None else "-",
                t.headline or "-",
                f"{t.value:.4f}" if t.value is not None else "-",
                f"[{t.ci95[0]:.4f}, {t.ci95[1]:.4f}]" if t.ci95 else "-",
                t.out if t.status == "done" else (t.reason or ""),
            )
        console = Console(highlight=False, soft_wrap=True)
        console.print(table)
        commands = [t.import_command for t in suite.tasks if t.import_command]
        if commands:
            console.print("to import what was skipped (RELEASE_DIR: the downloaded release):", markup=False)
            for command in commands:
                console.print(f"  {command}", markup=False)
        console.print(f"summary: {out / 'suite.json'}  {out / 'suite.md'}", markup=False)
    if suite.failed:
        raise typer.Exit(EXIT_TASK_FAILED)


@eval_app.command("suite")
@handle_errors
def suite_command(
    name: str = typer.Argument(
        "emma-table",
        help="Suite (emma-table, radiology-vqa, chest-xray), task, or a comma list of both.",
    ),
    model: str = typer.Option(
        ..., "--model", help="Model spec: emma-tiny, a folder, a hub id, openai:URL#MODEL."
    ),
    data_root: Path | None = typer.Option(
        None, "--data-root", help="Folder holding one dataset folder per task (<task> or <importer> name)."
    ),
    data: list[str] | None = typer.Option(None, "--data", help="TASK=DIR for a task's folder (repeatable)."),
    out: Path | None = typer.Option(
        None, "--out", help="Suite folder: one run folder per task (default: runs/<suite>-<model>)."
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Evaluate the first N items of each task."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Requests per engine call."),
    concurrency: int | None = typer.Option(
        None, "--concurrency", min=1, help="openai: models: requests in flight at most (default 8)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap and sampling."),
    n_resamples: int = typer.Option(2000, "--bootstrap", min=100, help="Bootstrap resamples for CIs."),
    as_json: bool = typer.Option(False, "--json", help="Print suite.json instead of a table."),
) -> None:
    """Run every task of a suite with one model (loaded once); tasks without data are skipped, with the
    command that imports them. Writes <out>/<task>/ run folders and <out>/suite.json + suite.md +
    suite_headline.png; exit 1 if a task failed."""
    run_tasks(
        name,
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
