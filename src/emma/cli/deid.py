"""``emma deid IN OUT``: DICOM de-identification (PS3.15 Annex E basic profile, see :mod:`emma.io.deid`).

The key that makes date shifts, UIDs and pseudonyms reproducible comes from ``--key-file`` (created with a
random key, mode 0600, when it does not exist), else from ``EMMA_DEID_KEY``, else a one-off random key.
It is never printed, never written to OUT, and a key file inside OUT is refused.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import cast

import typer
from rich.console import Console
from rich.table import Table

from emma.cli import app
from emma.cli.common import err_console, fail, handle_errors
from emma.errors import InputError
from emma.io.deid import MIN_KEY_BYTES, DeidConfig, DeidReport, Layout, deidentify_path
from emma.io.paths import check_path

KEY_ENV = "EMMA_DEID_KEY"
EXIT_PARTIAL = 1  # the run finished but some files failed
_MAX_LISTED = 20


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def load_or_create_key(key_file: Path | None, out: Path) -> tuple[bytes, str]:
    """The key bytes and where they came from: ``"file"``, ``"new file"``, ``"env"`` or ``"ephemeral"``."""
    if key_file is not None:
        if _inside(key_file, out):
            raise InputError(f"{key_file}: the key file must not be inside the output folder")
        if key_file.exists():
            key = key_file.read_bytes().strip()
            if len(key) < MIN_KEY_BYTES:
                raise InputError(f"{key_file}: key too short, need at least {MIN_KEY_BYTES} bytes")
            return key, "file"
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_hex(32).encode()
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key + b"\n")
        return key, "new file"
    env = os.environ.get(KEY_ENV, "").strip()
    if env:
        if len(env.encode()) < MIN_KEY_BYTES:
            raise InputError(f"{KEY_ENV}: key too short, need at least {MIN_KEY_BYTES} bytes")
        return env.encode(), "env"
    return secrets.token_bytes(32), "ephemeral"


def _print_summary(report: DeidReport, console: Console) -> None:
    table = Table(title="emma deid", show_header=False, box=None)
    table.add_row("written", str(len(report.written)))
    table.add_row("failed", str(len(report.failed)))
    table.add_row("skipped (not DICOM)", str(report.skipped_non_dicom))
    if report.skipped_duplicates:
        table.add_row("skipped (duplicate SOP Instance UID)", str(report.skipped_duplicates))
    if report.skipped_dicomdir:
        table.add_row("skipped (DICOMDIR)", str(report.skipped_dicomdir))
    for name, count in sorted(report.actions.items()):
        table.add_row(f"  {name.replace('_', ' ')}", str(count))
    table.add_row("warnings", str(len(report.warnings)))
    console.print(table)
    for line in report.warnings[:_MAX_LISTED]:
        console.print(f"warning: {line}", markup=False)
    if len(report.warnings) > _MAX_LISTED:
        console.print(f"... and {len(report.warnings) - _MAX_LISTED} more warnings", markup=False)
    for failed in report.failed[:_MAX_LISTED]:
        console.print(f"failed: {failed.source}: {failed.error}", markup=False)
    if len(report.failed) > _MAX_LISTED:
        console.print(f"... and {len(report.failed) - _MAX_LISTED} more failures", markup=False)


@app.command("deid")
@handle_errors
def deid_command(
    src: Path = typer.Argument(..., metavar="IN", help="A DICOM file or a folder (searched recursively)."),
    out: Path = typer.Argument(..., metavar="OUT", help="Output folder (or a .dcm file when IN is a file)."),
    key_file: Path | None = typer.Option(
        None,
        "--key-file",
        help="Secret key file; created with a random key (mode 0600) if missing. Keep it away from OUT.",
    ),
    keep_descriptions: bool = typer.Option(
        False, "--keep-descriptions", help="Keep study/series/protocol descriptions (review them for PHI)."
    ),
    keep_patient_characteristics: bool = typer.Option(
        False, "--keep-patient-characteristics", help="Keep sex, age (capped at 90), size and weight."
    ),
    shift_times: bool = typer.Option(False, "--shift-times", help="Shift times of day too, not only dates."),
    retain_safe_private: bool = typer.Option(
        False,
        "--retain-safe-private",
        help="PS3.15 Retain Safe Private option: keep the Siemens CSA image header (mosaics need it).",
    ),
    layout: str = typer.Option(
        "uid", "--layout", help="uid: OUT/<study>/<series>/<sop>.dcm; mirror: input folders, files renamed."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """De-identify DICOM files (PS3.15 basic profile), keeping pixels and geometry.

    Names and IDs become keyed pseudonyms, dates move by one offset per patient, UIDs are remapped
    consistently, private tags (but, with --retain-safe-private, the Siemens CSA image header) and overlays
    are removed. Exit 1 when some files failed.
    """
    if layout not in ("uid", "mirror"):
        raise InputError(f"--layout must be 'uid' or 'mirror', not {layout!r}")
    check_path(src)
    key, origin = load_or_create_key(key_file, out)
    config = DeidConfig(
        key=key,
        keep_descriptions=keep_descriptions,
        shift_times=shift_times,
        keep_patient_characteristics=keep_patient_characteristics,
        retain_safe_private=retain_safe_private,
    )
    if origin == "ephemeral":
        err_console.print(
            f"note: no --key-file or {KEY_ENV}: using a one-off random key; date shifts, UIDs and pseudonyms "
            "will differ on the next run",
            markup=False,
        )
    elif origin == "new file":
        err_console.print(f"note: created key file {key_file} (keep it secret, away from OUT)", markup=False)
    report = deidentify_path(src, out, config, layout=cast(Layout, layout))
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print_summary(report, Console(highlight=False, soft_wrap=True))
    if not report.ok:
        raise fail(f"{len(report.failed)} file(s) could not be de-identified", code=EXIT_PARTIAL)
