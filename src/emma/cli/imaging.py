"""Image commands: ``emma info`` and ``emma convert``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from emma.cli import app
from emma.cli.common import handle_errors
from emma.errors import InputError
from emma.io.atomic import atomic_path
from emma.io.image import ModelImage
from emma.io.load import VolumeSampling, describe, load_images
from emma.io.windows import parse_window

console = Console(highlight=False)

SERIES_HELP = "DICOM folder of several series: the one to use, by the index `emma info FOLDER` lists."


def check_series_option(series: int | None, paths: list[Path]) -> None:
    """``--series`` needs a DICOM folder among ``paths``: refuse it on files alone, before any loading."""
    if series is not None and not any(p.is_dir() for p in paths):
        raise InputError("--series chooses a series of a DICOM folder; no folder was given")


def _flat_rows(info: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key, value in info.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(_flat_rows(value, f"{name}."))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for i, item in enumerate(value):
                rows.extend(_flat_rows(item, f"{name}[{i}]."))
        else:
            rows.append((name, json.dumps(value) if isinstance(value, list) else str(value)))
    return rows


@app.command()
@handle_errors
def info(
    path: Path = typer.Argument(..., help="DICOM file, DICOM series folder, NIfTI, PNG/JPEG/TIFF."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    series: int | None = typer.Option(None, "--series", min=1, help=SERIES_HELP),
) -> None:
    """Header summary: modality, size, frames, spacing, window, transfer syntax, series geometry.

    A folder lists its series by index and description (never by UID). PHI-bearing fields are listed by
    name only, never their values.
    """
    check_series_option(series, [path])
    summary = describe(path, series=series)
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    table = Table(title=str(path), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in _flat_rows(summary):
        table.add_row(key, value)
    console.print(table)


def _write_png(image: ModelImage, target: Path) -> None:
    with atomic_path(target) as tmp:
        image.to_pil().save(tmp, format="PNG")


@app.command()
@handle_errors
def convert(
    path: Path = typer.Argument(..., help="DICOM file, DICOM series folder, NIfTI, PNG/JPEG/TIFF."),
    out: Path = typer.Option(..., "-o", "--out", help="Output .png (single image) or folder."),
    window: str | None = typer.Option(None, "--window", help="Preset (lung, brain, ...) or CENTER,WIDTH."),
    plane: str = typer.Option("axial", "--plane", help="Volumes: axial, coronal or sagittal."),
    slices: int = typer.Option(8, "--slices", min=1, max=256, help="Volumes: number of images to sample."),
    mode: str = typer.Option("slice", "--mode", help="Volumes: slice, slab (mean) or mip."),
    slab_mm: float = typer.Option(10.0, "--slab-mm", min=0.1, help="Volumes: slab thickness for slab/mip."),
    series: int | None = typer.Option(None, "--series", min=1, help=SERIES_HELP),
) -> None:
    """Convert to model-ready PNG(s) plus a JSON sidecar with the provenance of every transform."""
    if plane not in ("axial", "coronal", "sagittal"):
        raise ValueError(f"--plane must be axial, coronal or sagittal, not {plane!r}")
    if mode not in ("slice", "slab", "mip"):
        raise ValueError(f"--mode must be slice, slab or mip, not {mode!r}")
    if window:
        parse_window(window)  # a bad window is reported before any decoding
    check_series_option(series, [path])
    sampling = VolumeSampling(plane=plane, n=slices, mode=mode, slab_mm=slab_mm, series=series)  # type: ignore[arg-type]
    images = load_images(path, window=window, sampling=sampling)
    # Everything is decoded before anything is written: a bad input leaves no partial output.
    if out.suffix.lower() == ".png":
        if len(images) != 1:
            raise ValueError(f"{path} gives {len(images)} images; give a folder as --out")
        targets = [out]
        sidecar = out.with_suffix(".json")
    else:
        stem = path.name.split(".")[0] or "image"
        targets = [out / f"{stem}_{i:03d}.png" for i in range(len(images))]
        sidecar = out / f"{stem}.json"
    for image, target in zip(images, targets, strict=True):
        _write_png(image, target)
    record = {
        "input": str(path),
        "images": [
            {"file": t.name, "width": im.width, "height": im.height, "provenance": im.provenance.model_dump()}
            for im, t in zip(images, targets, strict=True)
        ],
    }
    with atomic_path(sidecar) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    console.print(f"wrote {len(images)} image(s) and {sidecar}")
