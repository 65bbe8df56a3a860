"""Generic importer: any VQA-style table in CSV, JSON or JSONL, with images beside it.

Layout (``src`` is a folder, or one annotation file)::

    <any>.csv | <any>.json | <any>.jsonl   annotation files at the top level of ``src``
    <image paths as given in the files>    relative to the annotation file's folder (or absolute)

JSON files hold a list of objects; JSONL files one object a line; CSV files a header row.
Keys / columns:

============  ========  ====================================================================
key           required  meaning
============  ========  ====================================================================
image         yes       image path; JSON/JSONL may give a list of paths (all shown with the question)
question      yes       the question (user turn)
answer        yes       the answer (assistant turn, ``gold.answer``); with ``options``, the
                        correct option's text or its letter (``A``, ``B``, ...)
options       no        multiple-choice options: a list (JSON), or in CSV a JSON list
                        (``["a", "b"]``) or ``|``-separated text (``a|b|c``)
split         no        ``train`` (default), ``validation`` (also ``val``/``valid``/``dev``), ``test``
modality      no        e.g. ``CT``, ``X-ray``, ``MRI`` (normalised to ``ct``, ``xray``, ``mri``)
body_part     no        e.g. ``chest`` (lower-cased)
id            no        sample id (default ``"{file stem}-{n}"``, ``n`` the 0-based record)
task          no        ``closed_vqa`` / ``open_vqa`` / ``multiple_choice`` / ``caption`` /
                        ``report``; default: ``multiple_choice`` with options, else
                        ``closed_vqa`` for yes/no answers (``emma.text.normalize.is_yes_no``),
                        else ``open_vqa``
============  ========  ====================================================================

License: whatever the data's owner states; pass ``license=`` (``--license``) to record it.

Mapping to :class:`~emma.data.schema.Sample`: user turn = question (multiple choice: followed by
``A. option`` lines) with all images; assistant turn = answer (multiple choice: ``"B. option"``);
``gold`` = answer (+ options, answer_index); ``meta``: split, modality, body_part,
``answer_type`` (closed/open for VQA tasks), ``study_key`` = the first image path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Unpack

from emma.data.schema import Gold, Meta, Sample, TaskType, Turn
from emma.data.sources._common import (
    INVALID_RECORD,
    OPTION_LETTERS,
    choice_turns,
    clean_text,
    normalize_modality,
    normalize_split,
    read_csv,
    read_json_list,
    read_jsonl,
    require_keys,
    source_ref,
)
from emma.data.sources._importer import DatasetInfo, ImportKwargs, ImportReport, ImportRun, import_records
from emma.errors import DataFormatError
from emma.text.normalize import is_yes_no

NAME = "generic"
SUFFIXES = (".csv", ".json", ".jsonl")
REQUIRED = ("image", "question", "answer")


def annotation_files(src: Path) -> list[Path]:
    if src.is_file():
        if src.suffix.lower() not in SUFFIXES:
            raise DataFormatError(f"{NAME}: {src} is not a .csv, .json or .jsonl file")
        return [src]
    if not src.is_dir():
        raise DataFormatError(f"{NAME}: source {src} does not exist")
    files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise DataFormatError(f"{NAME}: no .csv, .json or .jsonl annotation file in {src}")
    return files


def read_records(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows: list[dict[str, Any]] = list(read_csv(path, required=REQUIRED))
    elif suffix == ".jsonl":
        rows = read_jsonl(path)
    else:
        rows = read_json_list(path)
    if suffix != ".csv":
        require_keys(path, rows, REQUIRED)
    return rows


def parse_options(value: Any) -> list[str] | None:
    """``options`` as a list: a JSON list, a JSON-encoded list, or ``|``-separated text."""
    if value is None or value == "":
        return None
    if isinstance(value, list):
        items = value
    else:
        text = str(value).strip()
        if not text:
            return None
        if text.startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                raise ValueError("options: not a valid JSON list") from None
            if not isinstance(items, list):
                raise ValueError("options: not a list")
        else:
            items = text.split("|")
    options = [clean_text(o) for o in items]
    if len(options) < 2 or any(not o for o in options) or len(options) > len(OPTION_LETTERS):
        raise ValueError(f"options: need 2 to {len(OPTION_LETTERS)} non-empty options")
    return options


def _images_of(value: Any) -> list[str]:
    if isinstance(value, list):
        return [clean_text(v) for v in value if clean_text(v)]
    text = clean_text(value)
    return [text] if text else []


def record_to_sample(rec: dict[str, Any], default_id: str, *, name: str, license: str | None) -> Sample:
    """One record as a Sample; raises ValueError when a field is unusable."""
    images = _images_of(rec.get("image"))
    question, answer = clean_text(rec.get("question")), clean_text(rec.get("answer"))
    if not (images and question and answer):
        raise ValueError("image, question and answer are required")
    options = parse_options(rec.get("options"))
    task_value = clean_text(rec.get("task")).lower()
    gold = Gold(answer=answer)
    turns = [
        Turn(role="user", content=question, images=list(range(len(images)))),
        Turn(role="assistant", content=answer),
    ]
    if options is not None:
        if answer in options:
            index = options.index(answer)
        elif len(answer) == 1 and answer.upper() in OPTION_LETTERS[: len(options)]:
            index = OPTION_LETTERS.index(answer.upper())
        else:
            raise ValueError("answer is neither an option nor an option letter")
        turns, gold = choice_turns(question, options, index, len(images))
        task = TaskType.MULTIPLE_CHOICE
    elif task_value:
        task = TaskType(task_value)  # ValueError for an unknown task
        if task is TaskType.MULTIPLE_CHOICE:
            raise ValueError("multiple_choice needs options")
    else:
        task = TaskType.CLOSED_VQA if is_yes_no(answer) else TaskType.OPEN_VQA
    answer_type = {TaskType.CLOSED_VQA: "closed", TaskType.OPEN_VQA: "open"}.get(task)
    body_part = clean_text(rec.get("body_part")).lower() or None
    return Sample(
        id=clean_text(rec.get("id")) or default_id,
        task=task,
        images=[source_ref(name, image) for image in images],
        turns=turns,
        gold=gold,
        meta=Meta(
            modality=normalize_modality(rec.get("modality")),
            body_part=body_part,
            split=normalize_split(rec.get("split")),
            source=name,
            license=license,
            study_key=images[0],
            answer_type=answer_type,
        ),
    )


def import_generic(
    src: Path, out: Path, *, name: str = NAME, license: str | None = None, **options: Unpack[ImportKwargs]
) -> ImportReport:
    """Import CSV/JSON/JSONL VQA tables (see the module docstring for keys) into the store at ``out``."""
    src, out = Path(src), Path(out)
    tables = [(path, read_records(path)) for path in annotation_files(src)]

    def add_record(run: ImportRun, record: tuple[Path, int, dict[str, Any]]) -> None:
        path, n, rec = record
        try:
            sample = record_to_sample(rec, f"{path.stem}-{n}", name=name, license=license)
        except ValueError:
            run.skip(INVALID_RECORD)
            return
        refs = _images_of(rec.get("image"))
        run.add(sample, [path.parent / r for r in refs], image_keys=refs)

    records = [(path, n, rec) for path, rows in tables for n, rec in enumerate(rows)]
    info = DatasetInfo(name, license, None)
    return import_records(info, src, out, options, records, add_record, total=len(records))
