"""``emma export --model DIR --to merged|gguf [--out DIR]``: LoRA merged into full weights, or llama.cpp files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from emma.cli import app
from emma.cli.common import fail, handle_errors


@app.command("export")
@handle_errors
def export(
    model: Annotated[Path, typer.Option("--model", help="Model folder or LoRA adapter folder to export.")],
    to: Annotated[
        str, typer.Option("--to", help="merged (full safetensors weights) or gguf (llama.cpp).")
    ] = "merged",
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default: <model>-<to>).")] = None,
    dtype: Annotated[
        str, typer.Option("--dtype", help="Merged weights dtype: auto (the source's), fp32, bf16, fp16.")
    ] = "auto",
) -> None:
    """Merge LoRA adapters (vision-side ones included) into a folder AutoModelForImageTextToText and vLLM load."""
    from emma.train.export import export_model

    if to not in ("merged", "gguf"):
        raise fail(f"--to must be merged or gguf, got {to!r}")
    written = export_model(model, to, out, dtype=dtype)  # type: ignore[arg-type]
    typer.echo(str(written))
