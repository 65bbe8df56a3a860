"""``emma annotate``: weak-supervision annotation (coarse caption → ROI → fine caption) by a teacher model."""

from __future__ import annotations

import typer

from emma.cli import app
from emma.cli import teacher_options as opts
from emma.cli.common import fail, handle_errors


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
    teacher: opts.Teacher,
    source: opts.Source,
    out: opts.Out,
    stages: str = typer.Option(
        "coarse,roi,fine", "--stages", help="Stages to run: a subset of coarse,roi,fine."
    ),
    concurrency: opts.Concurrency = 8,
    backend: opts.Backend = "local",
    split: list[str] | None = typer.Option(
        None, "--split", help="Input split to annotate (repeat for several; default: all, in order)."
    ),
    store: opts.Store = None,
    limit: opts.Limit = None,
    family: opts.Family = None,
    timeout: opts.Timeout = 120.0,
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
    fsync: opts.Fsync = "batch",
    ray_address: opts.RayAddress = None,
    ray_actors: opts.RayActors = 1,
    quiet: opts.Quiet = False,
    as_json: opts.AsJson = False,
) -> None:
    """Annotate a dataset with a teacher model: coarse caption, ROI boxes, fine region-aware caption.

    Rejected samples are written to the split 'rejected' with their reason; statistics go to
    OUT/run_stats.json. Rerun the same command to resume after an interruption.
    """
    from emma.annotate.pipeline import annotate

    chosen = _stages(stages)
    config = opts.teacher_config(teacher, timeout=timeout, family=family, backend=backend, fsync=fsync)
    stats = annotate(
        source,
        out,
        config,
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
    opts.report(
        stats,
        as_json=as_json,
        quiet=quiet,
        summary=f"annotated {stats.inputs} inputs: {stats.accepted} accepted, {stats.rejected_total} rejected "
        f"→ {out}",
    )
