"""Dataset commands: ``emma data import|stats|check|holdout|captions|facts``."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from emma.cli import app
from emma.cli.common import fail, handle_errors, stderr_progress

data_app = typer.Typer(help="Canonical datasets: import, statistics, leakage checks.", no_args_is_help=True)
app.add_typer(data_app, name="data")

EXIT_LEAK = 1  # `emma data check --fail-on-leak` found a leak


def _out() -> Console:
    return Console(highlight=False, soft_wrap=False)


def _project_root() -> Path:
    return Path(__file__).resolve().parents[3]  # src/emma/cli/data.py → project root (editable install)


def _default_src(default: str | None) -> Path | None:
    if default is None:
        return None
    for base in (Path.cwd(), _project_root()):
        candidate = (base / default).resolve()
        if candidate.is_dir():
            return candidate
    return None


def _importer_kwargs(fn: Any, name: str, options: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    """Importer-specific options that were given; an option the importer does not take is an error."""
    accepted = inspect.signature(fn).parameters
    kwargs: dict[str, Any] = {}
    for param, (flag, value) in options.items():
        if value is None:
            continue
        if param not in accepted:
            raise fail(f"{flag} does not apply to '{name}'")
        kwargs[param] = value
    return kwargs


@data_app.command("import")
@handle_errors
def import_command(
    name: str = typer.Argument(
        ...,
        help=(
            "Dataset: vqa-rad, slake, pathvqa, pmc-vqa, omnimedvqa, gmai-mmbench, mmmu-med, iu-xray, "
            "mimic-cxr, chexpert, padchest, chestxray14 or generic."
        ),
    ),
    src: Path | None = typer.Option(
        None, "--src", help="Release folder (vqa-rad defaults to ../shared/data/vqa-rad when it exists)."
    ),
    out: Path = typer.Option(
        ..., "--out", help="Output dataset folder (new, or an unfinished one with --resume)."
    ),
    limit: int | None = typer.Option(None, "--limit", min=0, help="Stop after this many samples."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted import into --out."),
    fmt: str = typer.Option("jsonl", "--format", help="Store format: jsonl or parquet."),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="pathvqa: read the official .pkl question files (pickles can run code)."
    ),
    lang: list[str] | None = typer.Option(
        None, "--lang", help="slake: question languages to keep (default en)."
    ),
    v2: bool = typer.Option(False, "--v2", help="pmc-vqa: read the revised train_2.csv / test_2.csv."),
    access: list[str] | None = typer.Option(None, "--access", help="omnimedvqa: open and/or restricted."),
    uncertainty: str | None = typer.Option(
        None, "--uncertainty", help="chexpert: uncertain (-1) labels: u-ignore (default), u-zeros or u-ones."
    ),
    dataset_name: str | None = typer.Option(None, "--name", help="generic: dataset name for the manifest."),
    license: str | None = typer.Option(None, "--license", help="generic: license of the data."),
    as_json: bool = typer.Option(False, "--json", help="Print the import report as JSON."),
) -> None:
    """Import a public dataset into a canonical dataset folder."""
    from emma.data.sources import get_importer

    spec = get_importer(name)
    if src is None:
        src = _default_src(spec.default_src)
        if src is None:
            raise fail(f"--src is required for '{spec.name}'")
    options: dict[str, tuple[str, Any]] = {
        "allow_pickle": ("--allow-pickle", True if allow_pickle else None),
        "languages": ("--lang", tuple(lang) if lang else None),
        "version": ("--v2", 2 if v2 else None),
        "access": ("--access", tuple(access) if access else None),
        "uncertainty": ("--uncertainty", uncertainty),
        "name": ("--name", dataset_name),
        "license": ("--license", license),
    }
    kwargs = _importer_kwargs(spec.fn, spec.name, options)
    if not resume and out.is_dir() and any(out.iterdir()):
        raise fail(f"{out} is not empty: choose a new --out folder, or pass --resume to continue an import")
    with stderr_progress() as update:
        label = f"importing {spec.name}"
        report = spec.fn(
            src,
            out,
            limit=limit,
            resume=resume,
            format=fmt,
            progress=lambda done, total: update(label, done, total),
            **kwargs,
        )
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
        return
    console = _out()
    table = Table(title=f"{report.dataset} → {report.out}", show_header=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    table.add_row("license", report.license or "-")
    table.add_row("records read", str(report.records))
    table.add_row("written", str(report.written))
    if resume:
        table.add_row("already there (resume)", str(report.resumed))
    table.add_row("by split", ", ".join(f"{k}: {v}" for k, v in report.by_split.items()) or "-")
    table.add_row("by task", ", ".join(f"{k}: {v}" for k, v in report.by_task.items()) or "-")
    table.add_row("distinct images", str(report.images))
    table.add_row("skipped", ", ".join(f"{k}: {v}" for k, v in report.skipped.items()) or "0")
    if report.filtered:
        table.add_row("left out (filters)", ", ".join(f"{k}: {v}" for k, v in report.filtered.items()))
    if report.limited:
        table.add_row("limit", f"stopped at --limit {limit}")
    console.print(table)
    for note in report.notes:
        console.print(f"note: {note}", markup=False)


@data_app.command("stats")
@handle_errors
def stats_command(
    root: Path = typer.Argument(..., help="Dataset folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the statistics as JSON."),
) -> None:
    """Sample counts by split, task, modality, body part and answer type."""
    from emma.data.stats import CATEGORIES, dataset_stats

    stats = dataset_stats(root)
    if as_json:
        typer.echo(stats.model_dump_json(indent=2))
        return
    console = _out()
    splits = list(stats.splits)
    overview = Table(title=f"{stats.dataset}: {stats.samples} samples, {stats.images} distinct images")
    overview.add_column("split")
    overview.add_column("samples", justify="right")
    overview.add_column("images", justify="right")
    for split, s in stats.splits.items():
        overview.add_row(split, str(s.samples), str(s.images))
    console.print(overview)
    for category in CATEGORIES:
        table = Table(title=category.replace("_", " "))
        table.add_column(category)
        for split in splits:
            table.add_column(split, justify="right")
        table.add_column("total", justify="right")
        for value, total in stats.counts[category].items():
            per = [str(stats.splits[s].counts[category].get(value, 0)) for s in splits]
            table.add_row(value, *per, str(total))
        console.print(table)


@data_app.command("check")
@handle_errors
def check_command(
    root: Path = typer.Argument(..., help="Dataset folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the leakage report as JSON."),
    phash_threshold: int = typer.Option(
        4,
        "--phash-threshold",
        min=0,
        max=32,
        help="Largest pHash Hamming distance counted as a near-duplicate.",
    ),
    fail_on_leak: bool = typer.Option(
        False, "--fail-on-leak", help=f"Exit {EXIT_LEAK} when any leak is found."
    ),
) -> None:
    """Leakage between splits: shared images (exact and near-duplicate), questions, patients, studies."""
    from emma.data.holdout import check_holdout, read_recipe
    from emma.data.split import check_leakage
    from emma.data.store import open_dataset

    report = check_leakage(root, phash_threshold=phash_threshold)
    dataset = open_dataset(root)
    holdout = check_holdout(dataset) if read_recipe(dataset) is not None else None
    if as_json:
        payload = report.model_dump(mode="json")
        if holdout is not None:
            payload["holdout"] = {**holdout.model_dump(), "leaked": holdout.leaked}
        typer.echo(json.dumps(payload, indent=2, ensure_ascii=False))
    else:
        _print_leakage(report)
        if holdout is not None:
            _print_holdout(holdout)
    if fail_on_leak and (report.has_leakage or (holdout is not None and holdout.leaked)):
        raise typer.Exit(EXIT_LEAK)


def _print_holdout(check: Any) -> None:
    console = _out()
    table = Table(
        title=f"held out {check.recipe}: training splits {', '.join(check.train_splits)}", show_header=False
    )
    table.add_column("check")
    table.add_column("count", justify="right")
    table.add_row("training samples of the held-out group", str(check.group_in_training))
    table.add_row("training samples naming it (text)", str(check.term_in_training))
    table.add_row("training samples labelled with it", str(check.label_in_training))
    table.add_row(
        "held-out images in training (exact)", _frac(check.exact_image_overlap, check.zero_shot_images)
    )
    table.add_row(
        "held-out images near-duplicate of training",
        _frac(check.near_duplicate_images, check.zero_shot_images),
    )
    table.add_row(
        "zero-shot samples outside the group", _frac(check.outside_group_in_test, check.zero_shot_samples)
    )
    console.print(table)
    for problem in check.problems():
        console.print(f"LEAK: {problem}", markup=False)
    verdict = (
        "held-out group leaks into training (see above)"
        if check.leaked
        else "held-out group absent from training"
    )
    console.print(f"holdout: {verdict}", markup=False)


@data_app.command("holdout")
@handle_errors
def holdout_command(
    source: Path = typer.Argument(..., help="Labelled canonical dataset folder (every split is read)."),
    by: str = typer.Option(
        ..., "--by", help="KEY=VALUE: finding=..., modality=..., body_part=... or question_type=..."
    ),
    out: Path = typer.Option(..., "--out", help="Output dataset folder (new or empty)."),
    term: list[str] | None = typer.Option(
        None, "--term", help="Another word that names the held-out group (repeatable); none may be in train."
    ),
    phash_threshold: int = typer.Option(
        4,
        "--phash-threshold",
        min=0,
        max=32,
        help="Training images this close to a held-out one are dropped.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the holdout report as JSON."),
) -> None:
    """Zero-shot split: test holds only the held-out group, train never sees it (checked; refused otherwise)."""
    from emma.data.holdout import build_holdout, parse_holdout

    key, value = parse_holdout(by)
    report = build_holdout(source, out, by=key, value=value, terms=term, phash_threshold=phash_threshold)
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
        return
    recipe = report.recipe
    console = _out()
    table = Table(title=f"{recipe.source}: {recipe.label} held out → {report.out}", show_header=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    table.add_row("splits", ", ".join(f"{k}: {v}" for k, v in report.splits.items()))
    table.add_row("zero-shot split", recipe.zero_shot_split)
    table.add_row("in-distribution split", recipe.in_distribution_split or "-")
    table.add_row("terms kept out of training", ", ".join(recipe.terms) or "-")
    table.add_row("build", ", ".join(f"{k}: {v}" for k, v in recipe.counts.items()))
    console.print(table)
    _print_holdout(report.check)


def _frac(n: int | None, of: int | None) -> str:
    return "-" if n is None or of is None else f"{n} / {of}"


def _print_leakage(report: Any) -> None:
    console = _out()
    splits = Table(title=f"{report.dataset}: splits")
    splits.add_column("split")
    splits.add_column("samples", justify="right")
    splits.add_column("images", justify="right")
    for name, s in report.splits.items():
        splits.add_row(name, str(s.samples), str(s.images))
    console.print(splits)
    if not report.pairs:
        console.print("only one split: nothing to compare")
        return
    for p in report.pairs:
        table = Table(title=f"{p.earlier} → {p.later}", show_header=False)
        table.add_column("check")
        table.add_column(f"{p.later} in {p.earlier}", justify="right")
        table.add_row("images, exact (sha256)", _frac(p.exact_image_overlap, p.later_images))
        table.add_row(
            f"images, near-duplicate (pHash ≤ {report.phash_threshold})",
            _frac(p.near_duplicate_images, p.later_images),
        )
        table.add_row("questions (normalised text)", _frac(p.question_overlap, p.later_samples))
        table.add_row("image + question pairs", _frac(p.image_question_overlap, p.later_samples))
        table.add_row("patients", _frac(p.patient_overlap, p.later_patients))
        table.add_row("studies", _frac(p.study_overlap, p.later_studies))
        console.print(table)
        for ex in p.near_duplicate_examples:
            console.print(
                f"  near-duplicate: {ex.later_image} ~ {ex.earlier_image} (distance {ex.distance})",
                markup=False,
            )
        if p.exact_image_overlap:
            console.print(
                f"LEAK: {p.exact_image_overlap} of {p.later_images} {p.later} images also occur in {p.earlier} (exact)",
                markup=False,
            )
        if p.near_duplicate_images:
            console.print(
                f"LEAK: {p.near_duplicate_images} of {p.later_images} {p.later} images are near-duplicates of "
                f"{p.earlier} images",
                markup=False,
            )
    verdict = "leakage found (see above)" if report.has_leakage else "no leakage found"
    console.print(f"result: {verdict}", markup=False)


@data_app.command("captions")
@handle_errors
def captions_command(
    source: Path = typer.Argument(..., help="Canonical VQA dataset folder (its train split is read)."),
    out: Path = typer.Option(..., "--out", help="Output caption dataset folder (new or empty)."),
    split: str = typer.Option("train", "--split", help="Split to build from (never test)."),
    package_dicom: bool = typer.Option(
        False, "--package-dicom", help="Also caption the DICOM files installed packages carry (header)."
    ),
    prompts: int = typer.Option(1, "--prompts", min=1, max=3, help="Caption samples per image."),
    seed: int = typer.Option(0, "--seed", help="Seed of the statement order."),
) -> None:
    """Image–caption pairs built by rules from a dataset's own labels and train QA pairs (alignment data)."""
    from emma.data.sources.rule_captions import build_rule_captions, package_dicom_files

    files = package_dicom_files() if package_dicom else []
    report = build_rule_captions(
        source, out, split=split, dicom_files=files, prompts_per_image=prompts, seed=seed
    )
    typer.echo(
        f"{report.images} images captioned from {report.statements} statements"
        f"{f', {report.dicom_images} DICOM header captions' if package_dicom else ''} → {report.out}"
    )


@data_app.command("facts")
@handle_errors
def facts_command(
    source: Path = typer.Argument(..., help="Canonical VQA dataset folder (its train split is read)."),
    out: Path = typer.Option(..., "--out", help="Output question dataset folder (new or empty)."),
    split: str = typer.Option("train", "--split", help="Split to build from (never test)."),
    package_dicom: bool = typer.Option(
        False, "--package-dicom", help="Also ask about the DICOM files installed packages carry (header)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the wordings and of the 'no' values."),
) -> None:
    """Balanced yes/no questions on each image's organ and modality labels (the text alone scores 50%)."""
    from emma.data.sources.fact_questions import build_fact_questions
    from emma.data.sources.rule_captions import package_dicom_files

    files = package_dicom_files() if package_dicom else []
    report = build_fact_questions(source, out, split=split, dicom_files=files, seed=seed)
    typer.echo(
        f"{report.questions} questions about {report.images} images"
        f"{f' and {report.dicom_images} DICOM images' if package_dicom else ''} → {report.out}"
    )
