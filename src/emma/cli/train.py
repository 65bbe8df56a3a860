"""``emma train --recipe FILE [--set key=value ...] [--resume]``: run a training recipe (emma.train)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from emma.cli import app
from emma.cli.common import handle_errors


@app.command("train")
@handle_errors
def train_command(
    recipe: Path = typer.Option(..., "--recipe", "-r", help="Recipe YAML (see recipes/)."),
    overrides: list[str] = typer.Option(
        [],
        "--set",
        help="Override a recipe key: key=value, dotted for nesting (stages.0.learning_rate=1e-4).",
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue an interrupted stage from its last checkpoint (finished stages are skipped).",
    ),
    check: bool = typer.Option(False, "--check", help="Validate the recipe and datasets, then exit."),
) -> None:
    """Run a recipe's stages (alignment, instruction, VQA, GRPO) in order."""
    from emma.train.recipe import load_recipe
    from emma.train.run import run_recipe

    console = Console(stderr=True, highlight=False)
    loaded = load_recipe(recipe, overrides)
    if check:
        typer.echo(f"recipe ok: {len(loaded.stages)} stages → {loaded.output_dir}")
        return
    result = run_recipe(loaded, resume=resume, log=lambda msg: console.print(msg, markup=False))
    for stage in result.stages:
        state = (
            "skipped (done)"
            if stage.skipped
            else f"trained on {stage.samples} samples in {stage.seconds:.1f}s"
        )
        typer.echo(f"{stage.name}: {state} → {stage.final_dir}")
    typer.echo(f"final model: {result.final_dir}")
