"""PMC-VQA (Zhang et al., 2023): multiple-choice VQA on figures from PubMed Central papers.

Official release layout (``src``)::

    train.csv  test.csv             question tables (at least one of them)
    images/<Figure_path>            the figures (``images.zip`` extracted)

(``version=2`` reads ``train_2.csv`` / ``test_2.csv``, the revised tables, instead.)

CSV columns: ``Figure_path`` (file name under ``images/``), ``Question``, ``Answer`` (the correct
option's text), ``Choice A`` .. ``Choice D`` (often written ``" A:text"``: a leading letter prefix
matching the column is removed), ``Answer_label`` (``A`` .. ``D``); other columns are ignored.

License: CC BY-SA 4.0 (``"CC-BY-SA-4.0"``).

Splits: ``train.csv`` → ``"train"``, ``test.csv`` → ``"test"``.

Mapping to :class:`~emma.data.schema.Sample`:

- ``id`` = ``"{split}-{n}"``, ``n`` the 0-based data row in the CSV
- ``task`` = ``multiple_choice``; ``gold.options`` = the non-empty choices in A..D order,
  ``gold.answer_index`` from ``Answer_label``, ``gold.answer`` = that option's text (rows whose
  label points at no option are skipped as invalid; rows whose ``Answer`` text disagrees with the
  labelled option are kept, trusting the label, and counted in the report notes)
- user turn = question followed by one ``A. option`` line per option, with the image;
  assistant turn = ``"B. option text"``
- ``meta.study_key`` = the source paper (``PMC<id>`` prefix of ``Figure_path``, else the figure name),
  so figures of one paper count as one study for leakage checks; ``meta.extra["figure"]`` = figure name
- ``meta.modality`` / ``meta.body_part``: ``None`` (no such fields)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Unpack

from emma.data.schema import Meta, Sample
from emma.data.sources._common import (
    INVALID_RECORD,
    OPTION_LETTERS,
    choice_sample,
    clean_text,
    normalize_question,
    read_csv,
    source_folder,
    source_ref,
)
from emma.data.sources._importer import DatasetInfo, ImportKwargs, ImportReport, ImportRun, import_records
from emma.errors import DataFormatError

NAME = "pmc-vqa"
LICENSE = "CC-BY-SA-4.0"
INFO = DatasetInfo(NAME, LICENSE, "PMC-VQA (Zhang et al., 2023)")
CHOICE_COLUMNS = ("Choice A", "Choice B", "Choice C", "Choice D")
REQUIRED_COLUMNS = ("Figure_path", "Question", "Answer", *CHOICE_COLUMNS, "Answer_label")
_PMCID = re.compile(r"^(PMC\d+)")


def clean_choice(text: Any, letter: str) -> str:
    """``" A:Hypodense lesion "`` → ``"Hypodense lesion"`` (only the prefix of its own letter)."""
    value = clean_text(text)
    match = re.match(rf"^{letter}\s*[:.)]\s*", value)
    return value[match.end() :].strip() if match else value


def row_to_sample(row: dict[str, Any], split: str, n: int) -> tuple[Sample | None, bool]:
    """A CSV row as a Sample, and whether its ``Answer`` text disagrees with the labelled option."""
    figure = clean_text(row.get("Figure_path"))
    question = clean_text(row.get("Question"))
    choices = [clean_choice(row.get(col), OPTION_LETTERS[i]) for i, col in enumerate(CHOICE_COLUMNS)]
    label = clean_text(row.get("Answer_label")).upper().rstrip(":.)")
    if not (figure and question) or len(label) != 1 or label not in OPTION_LETTERS[: len(choices)]:
        return None, False
    index = OPTION_LETTERS.index(label)
    if not choices[index]:
        return None, False
    # Keep A..D order; drop trailing empty choices only (an empty middle choice would shift letters).
    while choices and not choices[-1]:
        choices.pop()
    if any(not c for c in choices):
        return None, False
    answer = choices[index]
    given = clean_text(row.get("Answer"))
    mismatch = bool(given) and normalize_question(clean_choice(given, label)) != normalize_question(answer)
    match = _PMCID.match(figure)
    meta = Meta(
        split=split,
        source=NAME,
        license=LICENSE,
        study_key=match.group(1) if match else figure,
        extra={"figure": figure},
    )
    sample = choice_sample(
        f"{split}-{n}", [source_ref(NAME, f"images/{figure}")], question, choices, index, meta
    )
    return sample, mismatch


def import_pmc_vqa(
    src: Path, out: Path, *, version: int = 1, **options: Unpack[ImportKwargs]
) -> ImportReport:
    """Import PMC-VQA from its release folder (``train.csv`` / ``test.csv`` + ``images/``)."""
    src, out = Path(src), Path(out)
    source_folder(src, NAME)
    if version not in (1, 2):
        raise ValueError(f"{NAME}: version must be 1 or 2, got {version}")
    suffix = "" if version == 1 else "_2"
    tables: list[tuple[str, list[dict[str, str]]]] = []
    for split in ("train", "test"):
        path = src / f"{split}{suffix}.csv"
        if path.is_file():
            tables.append((split, read_csv(path, required=REQUIRED_COLUMNS)))
    if not tables:
        raise DataFormatError(f"{NAME}: missing train{suffix}.csv and test{suffix}.csv in {src}")
    images = src / "images"
    if not images.is_dir():
        raise DataFormatError(f"{NAME}: missing images/ folder in {src}")
    mismatches = 0

    def add_record(run: ImportRun, record: tuple[str, int, dict[str, str]]) -> None:
        nonlocal mismatches
        split, n, row = record
        sample, mismatch = row_to_sample(row, split, n)
        figure = clean_text(row.get("Figure_path"))
        if sample is None or Path(figure).is_absolute() or ".." in Path(figure).parts:
            run.skip(INVALID_RECORD)
            return
        mismatches += mismatch
        run.add(sample, [images / figure], image_keys=[figure])

    records = [(split, n, row) for split, rows in tables for n, row in enumerate(rows)]
    report = import_records(INFO, src, out, options, records, add_record, total=len(records))
    if mismatches:
        report.notes.append(
            f"{mismatches} row(s) whose Answer text differs from the Answer_label option (label kept)"
        )
    return report
