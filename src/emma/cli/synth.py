"""``emma synth``: synthetic instruction data from images and their text, refined and verified by a teacher."""

from __future__ import annotations

import typer

from emma.cli import app
from emma.cli import teacher_options as opts
from emma.cli.common import fail, handle_errors


@app.command("synth")
@handle_errors
def synth_command(
    teacher: opts.Teacher,
    source: opts.Source,
    out: opts.Out,
    tasks: str = typer.Option(
        "all",
        "--tasks",
        help="Comma-separated: text_qa, bbox_vqa, single_subimage, multi_subimage, mc_subimage, "
        "compound_figure, dialogue; or all.",
    ),
    concurrency: opts.Concurrency = 8,
    backend: opts.Backend = "local",
    split: list[str] | None = typer.Option(
        None,
        "--split",
        help="Input split to read (repeat for several; default: every split but 'rejected', in order). "
        "Outputs keep their input's split: use --split train to make training data only.",
    ),
    store: opts.Store = None,
    limit: opts.Limit = None,
    family: opts.Family = None,
    timeout: opts.Timeout = 120.0,
    n_options: int = typer.Option(4, "--options", min=2, max=8, help="Options per multiple-choice question."),
    max_rewrites: int = typer.Option(
        1, "--max-rewrites", min=0, max=5, help="Teacher rewrites of a leaking item before it is rejected."
    ),
    open_f1: float = typer.Option(
        0.5, "--open-f1", min=0.01, max=1.0, help="Verification: token F1 an open answer needs."
    ),
    box_iou: float = typer.Option(
        0.5,
        "--box-iou",
        min=0.01,
        max=1.0,
        help="Verification and leak check: IoU that makes two boxes match.",
    ),
    max_images: int = typer.Option(
        8, "--max-images", min=1, max=64, help="Images of a sample used (the first N) per teacher request."
    ),
    panel_size: int = typer.Option(
        384, "--panel-size", min=64, max=2048, help="Compound figures: panel side."
    ),
    fsync: opts.Fsync = "batch",
    ray_address: opts.RayAddress = None,
    ray_actors: opts.RayActors = 1,
    quiet: opts.Quiet = False,
    as_json: opts.AsJson = False,
) -> None:
    """Generate synthetic instruction data (six task types and diagnostic dialogues) with a teacher.

    Every item is checked: its question and context must not give the answer away (rewritten by the
    teacher or rejected 'leak'), and a second teacher pass must find the answer (else 'unverified').
    Rejected items go to the split 'rejected' with their reason; statistics to OUT/run_stats.json.
    Rerun the same command to resume after an interruption.
    """
    from emma.annotate.runner import REJECTED_SPLIT, run_pipeline
    from emma.annotate.synth_steps import synth_steps
    from emma.data.store import open_dataset

    config = opts.teacher_config(teacher, timeout=timeout, family=family, backend=backend, fsync=fsync)
    try:
        steps = synth_steps(
            tasks,
            n_options=n_options,
            max_rewrites=max_rewrites,
            open_f1=open_f1,
            box_iou=box_iou,
            panel_size=panel_size,
            max_images=max_images,
        )
    except ValueError as exc:
        raise fail(f"--tasks: {exc}") from None
    dataset = open_dataset(source)
    splits = list(split) if split else [s for s in dataset.splits if s != REJECTED_SPLIT]
    if not splits:
        raise fail(f"{source}: no split to read (only '{REJECTED_SPLIT}')")
    stats = run_pipeline(
        steps,
        dataset,
        out,
        config,
        splits=splits,
        concurrency=concurrency,
        backend=backend,  # type: ignore[arg-type]
        store=store,
        progress=not quiet,
        limit=limit,
        fsync=fsync,  # type: ignore[arg-type]
        ray_options={"address": ray_address, "actors": ray_actors},
        print_summary=not quiet and not as_json,
    )
    opts.report(
        stats,
        as_json=as_json,
        quiet=quiet,
        summary=f"synthesized from {stats.inputs} inputs: {stats.accepted} accepted, {stats.rejected_total} "
        f"rejected → {out}",
    )
