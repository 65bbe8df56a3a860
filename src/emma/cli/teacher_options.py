"""Options shared by the teacher-driven batch commands (``emma annotate``, ``emma synth``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from emma.cli.common import fail

BACKENDS = ("local", "ray")
FSYNC_MODES = ("always", "batch", "never")

Teacher = Annotated[
    str,
    typer.Option(
        "--teacher",
        help="Teacher model spec: openai:URL#MODEL (vLLM, emma serve, any OpenAI-compatible server; API key "
        "from EMMA_OPENAI_API_KEY or OPENAI_API_KEY), emma-tiny, a model folder or a hub id (in-process).",
    ),
]
Source = Annotated[Path, typer.Option("--in", help="Input dataset folder (dataset.json).")]
Out = Annotated[
    Path,
    typer.Option(
        "--out", help="Output dataset folder (new, or the folder of an interrupted run to resume it)."
    ),
]
Concurrency = Annotated[
    int,
    typer.Option(
        "--concurrency", min=1, max=1024, help="Teacher calls in flight (in-process teachers: the batch)."
    ),
]
Backend = Annotated[str, typer.Option("--backend", help="local (threads) or ray (Ray Data map_batches).")]
Store = Annotated[
    Path | None,
    typer.Option(
        "--store",
        help="Durable teacher-answer store (default OUT/teacher_store); share one between runs to reuse answers.",
    ),
]
Limit = Annotated[int | None, typer.Option("--limit", min=0, help="Read the first N inputs only.")]
Family = Annotated[
    str | None,
    typer.Option(
        "--family",
        help="The teacher's model family, for its box syntax and coordinates (qwen2_5_vl, qwen3_vl, internvl, "
        "...); default: the teacher's own, EMMA's 0-1000 <box> form when unknown (remote servers).",
    ),
]
Timeout = Annotated[float, typer.Option("--timeout", min=1.0, help="Seconds per teacher request (servers).")]
Fsync = Annotated[str, typer.Option("--fsync", help="Store durability: always, batch or never.")]
RayAddress = Annotated[
    str | None, typer.Option("--ray-address", help="Ray cluster address (default: local).")
]
RayActors = Annotated[
    int, typer.Option("--ray-actors", min=1, help="Ray workers (each with its own teacher).")
]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bar or summary table.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the run statistics as JSON on stdout.")]


def teacher_config(teacher: str, *, timeout: float, family: str | None, backend: str, fsync: str) -> Any:
    """Check the run options and build the runner's :class:`~emma.annotate.runner.TeacherConfig`."""
    from emma.annotate.runner import TeacherConfig

    if backend not in BACKENDS:
        raise fail(f"--backend: expected local or ray, got {backend!r}")
    if fsync not in FSYNC_MODES:
        raise fail(f"--fsync: expected always, batch or never, got {fsync!r}")
    options: dict[str, object] = {"timeout": timeout}
    if family is not None:
        options["family"] = family
    return TeacherConfig(teacher, options)


def report(stats: Any, *, as_json: bool, quiet: bool, summary: str) -> None:
    """Print what a run did: its statistics as JSON, or (quiet) one line; otherwise the runner's table."""
    if as_json:
        typer.echo(stats.to_json(), nl=False)
    elif quiet:
        typer.echo(summary)
