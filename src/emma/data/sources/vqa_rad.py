"""VQA-RAD (Lau et al., Scientific Data 2018): radiology visual question answering.

Official release layout (``src``)::

    VQA_RAD_Dataset_Public.json   list of question rows
    images/synpic*.jpg            315 radiology images (head CT/MRI, chest X-ray, abdominal CT)
    Readme.docx                   (optional) the authors' readme, stating the license

License: CC0 1.0 (``"CC0-1.0"``).

Official split (by ``phrase_type``): ``test_freeform`` / ``test_para`` → ``"test"`` (451 questions:
272 closed, 179 open); every other row → ``"train"`` (1797: 1027 closed, 770 open). 202 of the 203
test images also occur in train with other questions: report results on the official split and say so.

Mapping to :class:`~emma.data.schema.Sample`:

- ``id`` = ``str(qid)`` (the release mixes ``"0"`` and integers; duplicates would be skipped and counted)
- ``task``: ``answer_type`` stripped (two rows read ``"CLOSED "``): ``CLOSED`` → ``closed_vqa``,
  ``OPEN`` → ``open_vqa``; any other value → the row is skipped as invalid
- user turn = ``question`` (whitespace collapsed; one has a trailing space) with the image;
  assistant turn = ``answer`` and ``gold.answer`` (five answers are JSON numbers, e.g. ``4``: kept as
  the text ``"4"``; one has a leading space: stripped)
- ``meta.body_part`` from ``image_organ``: HEAD → head, CHEST → chest, ABD → abdomen
- ``meta.modality``: ``None`` (VQA-RAD has no modality field; guessing from the question is unreliable)
- ``meta.question_type`` = ``question_type`` (e.g. ``PRES``, ``"POS, PRES"``), ``meta.answer_type`` =
  ``closed`` / ``open``, ``meta.study_key`` = ``image_name`` (one image per study, for leakage checks)
- ``meta.extra``: ``phrase_type``, ``qid_linked_id`` (links a free-form question to its paraphrase),
  ``evaluation``, ``image_name``

One image in ``images/`` (``synpic35356.jpg`` in the public release) is referenced by no question;
it is not imported, and the report notes unreferenced images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Unpack

from emma.data.schema import Gold, Meta, Sample
from emma.data.sources._common import (
    INVALID_RECORD,
    answer_type,
    clean_text,
    closed_or_open,
    qa_turns,
    read_json_list,
    require_dir,
    require_keys,
    source_folder,
    source_ref,
)
from emma.data.sources._importer import DatasetInfo, ImportKwargs, ImportReport, ImportRun, import_records
from emma.errors import DataFormatError

NAME = "vqa-rad"
LICENSE = "CC0-1.0"
INFO = DatasetInfo(NAME, LICENSE, "VQA-RAD (Lau et al., Scientific Data 2018)")
ANNOTATIONS = "VQA_RAD_Dataset_Public.json"
TEST_PHRASE_TYPES = frozenset({"test_freeform", "test_para"})
BODY_PARTS = {"HEAD": "head", "CHEST": "chest", "ABD": "abdomen"}
REQUIRED_KEYS = ("qid", "image_name", "question", "answer", "answer_type", "phrase_type")


def split_of(phrase_type: Any) -> str:
    """The official split of a row from its ``phrase_type``."""
    return "test" if clean_text(phrase_type).lower() in TEST_PHRASE_TYPES else "train"


def load_rows(src: Path) -> list[dict[str, Any]]:
    """Read and check the annotation file (raises DataFormatError on a bad layout)."""
    path = source_folder(src, NAME) / ANNOTATIONS
    if not path.is_file():
        raise DataFormatError(f"{NAME}: missing {ANNOTATIONS} in {src}")
    require_dir(src / "images", NAME)
    rows = read_json_list(path)
    if not rows:
        raise DataFormatError(f"{path}: no question rows")
    require_keys(path, rows, REQUIRED_KEYS, "rows")
    return rows


def row_to_sample(row: dict[str, Any]) -> Sample | None:
    """One annotation row as a Sample (images filled in by the store), or ``None`` if unusable."""
    qid = clean_text(row.get("qid"))
    image_name = clean_text(row.get("image_name"))
    question = clean_text(row.get("question"))
    answer = clean_text(row.get("answer"))
    task = closed_or_open(row.get("answer_type"))
    if not (qid and image_name and question and answer and task):
        return None
    organ = clean_text(row.get("image_organ")).upper()
    extra = {
        "phrase_type": clean_text(row.get("phrase_type")),
        "qid_linked_id": clean_text(row.get("qid_linked_id")) or None,
        "evaluation": clean_text(row.get("evaluation")) or None,
        "image_name": image_name,
    }
    return Sample(
        id=qid,
        task=task,
        images=[source_ref(NAME, f"images/{image_name}")],
        turns=qa_turns(question, answer),
        gold=Gold(answer=answer),
        meta=Meta(
            modality=None,
            body_part=BODY_PARTS.get(organ),
            split=split_of(row.get("phrase_type")),
            source=NAME,
            license=LICENSE,
            study_key=image_name,
            question_type=clean_text(row.get("question_type")) or None,
            answer_type=answer_type(task),
            extra=extra,
        ),
    )


def import_vqa_rad(src: Path, out: Path, **options: Unpack[ImportKwargs]) -> ImportReport:
    """Import VQA-RAD from its official release folder ``src`` into the store at ``out``."""
    src, out = Path(src), Path(out)
    rows = load_rows(src)
    images_dir = src / "images"
    referenced: set[str] = set()

    def add_record(run: ImportRun, row: dict[str, Any]) -> None:
        sample = row_to_sample(row)
        if sample is None:
            run.skip(INVALID_RECORD)
            return
        name = sample.meta.extra["image_name"]
        referenced.add(name)
        run.add(sample, [images_dir / name], image_keys=[name])

    report = import_records(INFO, src, out, options, rows, add_record, total=len(rows))
    if not report.limited:
        on_disk = {p.name for p in images_dir.iterdir() if p.is_file() and not p.name.startswith(".")}
        unused = len(on_disk - referenced)
        if unused:
            report.notes.append(
                f"{unused} image file(s) in images/ are referenced by no question (not imported)"
            )
    n_type_fixed = sum(
        1
        for r in rows
        if isinstance(r.get("answer_type"), str) and r["answer_type"] != r["answer_type"].strip()
    )
    n_numeric = sum(
        1 for r in rows if isinstance(r.get("answer"), (int, float)) and not isinstance(r.get("answer"), bool)
    )
    if n_type_fixed:
        report.notes.append(f"{n_type_fixed} answer_type value(s) had stray spaces (stripped)")
    if n_numeric:
        report.notes.append(f"{n_numeric} answer(s) were JSON numbers (kept as text)")
    return report
