"""``emma annotate``: weak-supervision annotation (coarse caption → ROI → fine caption) by a teacher model."""

from __future__ import annotations

from pathlib import Path

import typer

from emma.cli import app
from emma.cli.common import fail, handle_errors

_BACKENDS = ("local", "ray")
_FSYNC = ("always", "batch", "never")


def _stages(value: str) -> list[str]:
    from emma.annotate.pipeline import STAGES

    names = [s.strip().lower() for s in value.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise fail(f"--stages: expected a comma-separated subset of {','.join(STAGES)}, got {value!r}")
    return [s for s in STAGES if s in names]


@app.command("annotate")
@handle_errors
def annotate_command(
    teacher: str = typer.Option(
        ...,
        "--teacher",
        help="Teacher model spec: openai:URL#MODEL (vLLM, emma serve, any OpenAI-compatible server; API key "
        "from EMMA_OPENAI_API_KEY or OPENAI_API_KEY), emma-tiny, a model folder or a hub id (in-process).",
    ),
    source: Path = typer.Option(..., "--in", help="Input dataset folder (dataset.json)."),
    out: Path = typer.Option(
        ..., "--out", help="Output dataset folder (new, or the folder of an interrupted run to resume it)."
    ),
    stages: str = typer.Option(
        "coarse,roi,fine", "--stages", help="Stages to run: a subset of coarse,roi,fine."
    ),
    concurrency: int = typer.Option(
        8, "--concurrency", min=1, max=1024, help="Teacher calls in flight (in-process teachers: the batch)."
    ),
    backend: str = typer.Option("local", "--backend", help="local (threads) or ray (Ray Data map_batches)."),
    split: list[str] | None = typer.Option(
        None, "--split", help="Input split to annotate (repeat for several; default: all, in order)."
    ),
    store: Path | None = typer.Option(
        None,
        "--store",
        help="Durable teacher-answer store (default OUT/teacher_store); share one between runs to reuse answers.",
    ),
    limit: int | None = typer.Option(None, "--limit", min=0, help="Annotate the first N inputs only."),
    family: str | None = typer.Option(
        None,
        "--family",
        help="The teacher's model family, for its box syntax and coordinates (qwen2_5_vl, qwen3_vl, internvl, "
        "...); default: the teacher's own, EMMA's 0-1000 <box> form when unknown (remote servers).",
    ),
    timeout: float = typer.Option(120.0, "--timeout", min=1.0, help="Seconds per teacher request (servers)."),
    dedup: bool = typer.Option(
        True,
        "--dedup/--no-dedup",
        help="Reject later samples that repeat an earlier image (perceptual hash).",
    ),
    phash_threshold: int = typer.Option(
        4, "--phash-threshold", min=0, max=16, help="Duplicate images: max pHash Hamming distance (0: exact)."
    ),
    agreement_threshold: float = typer.Option(
        0.5,
        "--agreement-threshold",
        min=0.0,
        max=1.0,
        help="Reject a sample whose teacher findings agree with its report below this Dice score.",
    ),
    fsync: str = typer.Option("batch", "--fsync", help="Store durability: always, batch or never."),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="Ray cluster address (default: local)."
    ),
    ray_actors: int = typer.Option(1, "--ray-actors", min=1, help="Ray workers (each with its own teacher)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar or summary table."),
    as_json: bool = typer.Option(False, "--json", help="Print the run statistics as JSON on stdout."),
) -> None:
    """Annotate a dataset with a teacher model: coarse caption, ROI boxes, fine region-aware caption.

    Rejected samples are written to the split 'rejected' with their reason; statistics go to
    OUT/run_stats.json. Rerun the same command to resume after an interruption.
    """
    from emma.annotate.pipeline import annotate
    from emma.annotate.runner import TeacherConfig

    chosen = _stages(stages)
    if backend not in _BACKENDS:
        raise fail(f"--backend: expected local or ray, got {backend!r}")
    if fsync not in _FSYNC:
        raise fail(f"--fsync: expected always, batch or never, got {fsync!r}")
    options: dict[str, object] = {"timeout": timeout}
    if family is not None:
        options["family"] = family
    stats = annotate(
        source,
        out,
        TeacherConfig(teacher, options),
        stages=chosen,
        splits=list(split) if split else None,
        limit=limit,
        dedup=dedup,
        phash_threshold=phash_threshold,
        agreement_threshold=agreement_threshold,
        family=family,
        concurrency=concurrency,
        backend=backend,  # type: ignore[arg-type]
        store=store,
        progress=not quiet,
        fsync=fsync,  # type: ignore[arg-type]
        ray_options={"address": ray_address, "actors": ray_actors},
    )
    if as_json:
        typer.echo(stats.to_json(), nl=False)
    elif quiet:
        typer.echo(
            f"annotated {stats.inputs} inputs: {stats.accepted} accepted, {stats.rejected_total} rejected "
            f"→ {out}"
        )
