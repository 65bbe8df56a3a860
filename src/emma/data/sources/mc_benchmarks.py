"""Importers for multiple-choice benchmarks (GMAI-MMBench, MMMU medical subjects).

Both write a canonical dataset (like the importers: resumable, images checked and stored by content
hash) so the harness evaluates them like any other dataset: ``import_gmai_mmbench(src, out, **options)``
and ``import_mmmu_med(src, out, **options)``, with the options of every importer
(:class:`._importer.ImportOptions`).

**GMAI-MMBench** (Ye et al., NeurIPS 2024 Datasets and Benchmarks), release layout read (the TSV files
of the official dataset repository, in VLMEvalKit's format)::

    GMAI-MMBench_VAL.tsv                      validation: has the answer column
    GMAI-MMBench_TEST.tsv | GMAI_mm_bench_TEST_part_<n>.tsv   test (answers withheld: rows skipped)
    images/...                                (only for rows that give image_path instead of image)

Tab-separated with a header row; columns ``index``, ``question``, ``A`` .. ``E`` (empty or missing
options are absent), ``answer`` (the option letter), ``image`` (base64-encoded image bytes; a short
numeric value refers to the image of the row with that ``index``) or ``image_path`` (relative to the
TSV's folder), and, when present, ``modality``, ``clinical vqa task``, ``department``,
``perceptual granularity``, ``category``, ``l2-category``. Split from the file name: ``VAL`` →
``validation``, ``TEST`` → ``test``. Sample ids are ``"<split>-<index>"``; ``meta.question_type`` is
the clinical VQA task (else ``category``). License: CC BY-NC 4.0 as stated on the dataset card
(recorded as ``"CC-BY-NC-4.0"``).

**MMMU, medical subjects** (Yue et al., CVPR 2024), release layout read (the parquet files of the
official dataset repository, one folder per subject)::

    <Subject>/dev-00000-of-00001.parquet
    <Subject>/validation-00000-of-00001.parquet
    <Subject>/test-0000n-of-0000m.parquet     (answers withheld: rows skipped)

or the same records as JSON / JSON Lines (``<Subject>/<split>.json`` or ``.jsonl``) with image paths
relative to the file's folder. Columns: ``id`` (``validation_Clinical_Medicine_1``), ``question``
(with ``<image n>`` placeholders, kept as written), ``options`` (a Python-literal list of strings, or
a JSON list), ``answer`` (the option letter), ``image_1`` .. ``image_7`` (parquet: struct of
``bytes`` and ``path``; JSON: a path), ``question_type`` (``multiple-choice`` / ``open``: open ones are
left out), ``subfield``, ``img_type``, ``topic_difficulty``. Only the Health & Medicine subjects are
read (:data:`MMMU_MEDICAL_SUBJECTS`). Images are given to the model in ``image_1`` .. ``image_7``
order. ``meta.question_type`` = the subject. License: Apache-2.0 (as stated on the dataset card).
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Unpack

import pyarrow as pa
import pyarrow.parquet as pq

from emma.data.schema import Meta, Sample
from emma.data.sources._common import (
    INVALID_RECORD,
    OPTION_LETTERS,
    choice_sample,
    clean_text,
    normalize_modality,
    read_json_list,
    read_jsonl,
    source_folder,
    source_ref,
)
from emma.data.sources._importer import DatasetInfo, ImportKwargs, ImportReport, ImportRun, import_records
from emma.errors import DataFormatError

GMAI_NAME = "gmai-mmbench"
GMAI_LICENSE = "CC-BY-NC-4.0"
GMAI_INFO = DatasetInfo(GMAI_NAME, GMAI_LICENSE, "GMAI-MMBench (Ye et al., NeurIPS 2024)")
GMAI_OPTION_COLUMNS = ("A", "B", "C", "D", "E")
GMAI_REQUIRED = ("index", "question", "A", "B")

MMMU_NAME = "mmmu-med"
MMMU_LICENSE = "Apache-2.0"
MMMU_INFO = DatasetInfo(MMMU_NAME, MMMU_LICENSE, "MMMU (Yue et al., CVPR 2024), Health & Medicine subjects")
MMMU_MEDICAL_SUBJECTS = (
    "Basic_Medical_Science",
    "Clinical_Medicine",
    "Diagnostics_and_Laboratory_Medicine",
    "Pharmacy",
    "Public_Health",
)
MMMU_SPLITS = {"dev": "dev", "validation": "validation", "test": "test"}
MMMU_MAX_IMAGES = 7
NO_ANSWER = "no_answer"
_TSV_FIELD_LIMIT = 1 << 30  # base64 images make very long fields


# ------------------------------------------------------------------------------------ GMAI-MMBench


def _gmai_split(path: Path) -> str:
    name = path.name.upper()
    if "VAL" in name:
        return "validation"
    return "test"


def _read_tsv(path: Path) -> list[dict[str, str]]:
    previous = csv.field_size_limit()
    csv.field_size_limit(_TSV_FIELD_LIMIT)
    try:
        with path.open("r", encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            header = [h.strip() for h in reader.fieldnames or []]
            missing = [c for c in GMAI_REQUIRED if c not in header]
            if missing:
                raise DataFormatError(f"{path}: missing column(s) {', '.join(missing)}")
            if "image" not in header and "image_path" not in header:
                raise DataFormatError(f"{path}: no image or image_path column")
            return [{(k or "").strip(): (v or "") for k, v in row.items() if k is not None} for row in reader]
    except UnicodeDecodeError:
        raise DataFormatError(f"{path}: not UTF-8 text") from None
    except csv.Error as exc:
        raise DataFormatError(f"{path}: not valid TSV ({exc})") from None
    finally:
        csv.field_size_limit(previous)


def _options(row: dict[str, str], columns: tuple[str, ...]) -> list[str] | None:
    """Present options in letter order; an empty option followed by a present one is invalid."""
    values = [clean_text(row.get(c)) for c in columns]
    values = ["" if v.lower() == "nan" else v for v in values]
    while values and not values[-1]:
        values.pop()
    if len(values) < 2 or any(not v for v in values):
        return None
    return values


def _gmai_sample(row: dict[str, str], split: str, options: list[str], answer: int) -> Sample:
    index = clean_text(row.get("index"))
    task = clean_text(row.get("clinical vqa task")) or clean_text(row.get("category")) or None
    extra = {
        k: clean_text(row.get(k))
        for k in ("department", "perceptual granularity", "category", "l2-category", "modality")
        if clean_text(row.get(k))
    }
    extra["index"] = index
    meta = Meta(
        modality=normalize_modality(row.get("modality")),
        split=split,
        source=GMAI_NAME,
        license=GMAI_LICENSE,
        question_type=task,
        extra=extra,
    )
    image = source_ref(GMAI_NAME, f"{split}/{index}")
    return choice_sample(f"{split}-{index}", [image], clean_text(row.get("question")), options, answer, meta)


def _gmai_image(
    row: dict[str, str], by_index: dict[str, dict[str, str]], folder: Path
) -> bytes | Path | None:
    value = (row.get("image") or "").strip()
    if value and len(value) <= 64 and value in by_index and by_index[value] is not row:
        value = (by_index[value].get("image") or "").strip()  # a reference to another row's image
    if value and len(value) > 64:
        try:
            return base64.b64decode(value, validate=False)
        except (binascii.Error, ValueError):
            return None
    rel = clean_text(row.get("image_path"))
    if rel.startswith("[") and rel.endswith("]"):  # VLMEvalKit writes lists of paths as a literal
        try:
            parsed = ast.literal_eval(rel)
            rel = str(parsed[0]) if isinstance(parsed, list) and parsed else ""
        except (ValueError, SyntaxError):
            return None
    if rel and not Path(rel).is_absolute() and ".." not in Path(rel).parts:
        for base in (folder, folder / "images"):
            if (base / rel).is_file():
                return base / rel
        return folder / rel
    return None


def _add_gmai_row(
    run: ImportRun, record: tuple[Path, str, dict[str, dict[str, str]], dict[str, str]]
) -> None:
    path, split, by_index, row = record
    letter = clean_text(row.get("answer")).upper().rstrip(".):")
    options = _options(row, GMAI_OPTION_COLUMNS)
    if not letter:
        run.filter(NO_ANSWER)
        return
    if options is None or len(letter) != 1 or letter not in OPTION_LETTERS[: len(options)]:
        run.skip(INVALID_RECORD)
        return
    if not clean_text(row.get("index")) or not clean_text(row.get("question")):
        run.skip(INVALID_RECORD)
        return
    image = _gmai_image(row, by_index, path.parent)
    if image is None:
        run.skip(INVALID_RECORD)
        return
    sample = _gmai_sample(row, split, options, OPTION_LETTERS.index(letter))
    run.add(sample, [image], image_keys=[f"{split}/{sample.meta.extra['index']}"])


def import_gmai_mmbench(src: Path, out: Path, **options: Unpack[ImportKwargs]) -> ImportReport:
    """Import GMAI-MMBench TSV files from ``src`` into a canonical dataset at ``out``."""
    src, out = Path(src), Path(out)
    files = sorted(
        p
        for p in source_folder(src, GMAI_NAME).iterdir()
        if p.suffix.lower() == ".tsv" and "gmai" in p.name.lower()
    )
    if not files:
        raise DataFormatError(f"{GMAI_NAME}: no GMAI-MMBench*.tsv file in {src}")
    records: list[tuple[Path, str, dict[str, dict[str, str]], dict[str, str]]] = []
    for path in files:
        rows = _read_tsv(path)
        by_index = {clean_text(r.get("index")): r for r in rows}
        records.extend((path, _gmai_split(path), by_index, row) for row in rows)
    return import_records(GMAI_INFO, src, out, options, records, _add_gmai_row, total=len(records))


# --------------------------------------------------------------------------------------------- MMMU


def _subject_of(record_id: str, folder: str) -> str:
    if folder in MMMU_MEDICAL_SUBJECTS:
        return folder
    match = re.match(r"^(?:dev|validation|test)_(.+)_\d+$", record_id)
    return match.group(1) if match else folder


def _parse_options(value: Any) -> list[str] | None:
    if isinstance(value, list):
        items = value
    else:
        text = str(value or "").strip()
        if not text:
            return None
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            try:
                items = ast.literal_eval(text)  # literals only: never runs code
            except (ValueError, SyntaxError):
                return None
    if not isinstance(items, list) or not items:
        return None
    options = [clean_text(o) for o in items]
    return options if all(options) else None


def _mmmu_files(src: Path) -> Iterator[tuple[str, str, Path]]:
    """(subject folder, split, file) for every medical-subject file under ``src``."""
    for subject in MMMU_MEDICAL_SUBJECTS:
        folder = src / subject
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            stem = path.name.split("-")[0] if path.suffix == ".parquet" else path.stem
            split = MMMU_SPLITS.get(stem.lower())
            if split and path.suffix.lower() in (".parquet", ".json", ".jsonl"):
                yield subject, split, path


def _mmmu_records(path: Path) -> list[dict[str, Any]]:
    if path.suffix.lower() == ".parquet":
        try:
            return pq.read_table(path).to_pylist()
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise DataFormatError(f"{path}: unreadable parquet file ({type(exc).__name__})") from None
    return read_jsonl(path) if path.suffix.lower() == ".jsonl" else read_json_list(path)


def _mmmu_images(record: dict[str, Any], folder: Path) -> list[bytes | Path] | None:
    images: list[bytes | Path] = []
    for k in range(1, MMMU_MAX_IMAGES + 1):
        value = record.get(f"image_{k}")
        if value is None or value == "":
            continue
        if isinstance(value, dict):
            data = value.get("bytes")
            if isinstance(data, (bytes, bytearray)) and data:
                images.append(bytes(data))
                continue
            value = value.get("path")
        if not isinstance(value, str) or not value:
            return None
        rel = Path(value)
        if rel.is_absolute() or ".." in rel.parts:
            return None
        images.append(folder / rel)
    return images or None


def _mmmu_sample(
    rec: dict[str, Any],
    rid: str,
    subject_folder: str,
    split: str,
    options: list[str],
    answer: int,
    n_images: int,
) -> Sample:
    img_type = clean_text(rec.get("img_type"))
    meta = Meta(
        modality=normalize_modality(img_type.strip("[]'\" ").split("'")[0]) if img_type else None,
        split=split,
        source=MMMU_NAME,
        license=MMMU_LICENSE,
        question_type=_subject_of(rid, subject_folder),
        extra={
            "subfield": clean_text(rec.get("subfield")) or None,
            "img_type": img_type or None,
            "topic_difficulty": clean_text(rec.get("topic_difficulty")) or None,
        },
    )
    images = [source_ref(MMMU_NAME, f"{rid}/image_{k}") for k in range(1, n_images + 1)]
    return choice_sample(rid, images, clean_text(rec.get("question")), options, answer, meta)


def _add_mmmu_record(run: ImportRun, record: tuple[str, str, Path, int, dict[str, Any]]) -> None:
    subject_folder, split, path, n, rec = record
    if clean_text(rec.get("question_type")).lower() not in ("", "multiple-choice"):
        run.filter("open_question")
        return
    rid = clean_text(rec.get("id")) or f"{split}_{subject_folder}_{n}"
    options = _parse_options(rec.get("options"))
    letter = clean_text(rec.get("answer")).upper()
    if options is not None and (len(letter) != 1 or letter not in OPTION_LETTERS[: len(options)]):
        if letter in ("", "?"):
            run.filter(NO_ANSWER)
            return
        options = None
    images = _mmmu_images(rec, path.parent)
    question = clean_text(rec.get("question"))
    if options is None or images is None or not question:
        run.skip(INVALID_RECORD)
        return
    answer = OPTION_LETTERS.index(letter)
    sample = _mmmu_sample(rec, rid, subject_folder, split, options, answer, len(images))
    run.add(sample, images, image_keys=[f"{rid}/image_{k}" for k in range(1, len(images) + 1)])


def import_mmmu_med(src: Path, out: Path, **options: Unpack[ImportKwargs]) -> ImportReport:
    """Import the Health & Medicine subjects of MMMU from ``src`` into a canonical dataset at ``out``."""
    src, out = Path(src), Path(out)
    files = list(_mmmu_files(source_folder(src, MMMU_NAME)))
    if not files:
        raise DataFormatError(
            f"{MMMU_NAME}: no <Subject>/<split>*.parquet|json|jsonl in {src} "
            f"(subjects: {', '.join(MMMU_MEDICAL_SUBJECTS)})"
        )
    records = [
        (subject, split, path, n, rec)
        for subject, split, path in files
        for n, rec in enumerate(_mmmu_records(path))
    ]
    return import_records(MMMU_INFO, src, out, options, records, _add_mmmu_record, total=len(records))
