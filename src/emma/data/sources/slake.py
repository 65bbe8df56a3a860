"""SLAKE (Liu et al., ISBI 2021): a bilingual (English/Chinese) semantically-labelled medical VQA set.

Official release layout (``src`` is ``Slake1.0/`` or the folder holding it)::

    train.json  validate.json  test.json     lists of question records
    imgs/xmlab<N>/source.jpg                  the image (CT, MRI or X-ray)
    imgs/xmlab<N>/detection.json              (optional) organ boxes: [{"Liver": [x, y, w, h]}, ...]
    imgs/xmlab<N>/mask.png                    (optional) segmentation mask (not imported)
    imgs/xmlab<N>/question.json               (optional) per-image copy of the questions (not read)

Each record: ``img_id``, ``img_name`` (e.g. ``"xmlab0/source.jpg"``, relative to ``imgs/``),
``question``, ``answer``, ``q_lang`` (``"en"`` / ``"zh"``), ``location`` (e.g. ``"Abdomen"``,
``"Chest_lung"``), ``modality`` (``"CT"`` / ``"MRI"`` / ``"X-Ray"``), ``answer_type``
(``"CLOSED"`` / ``"OPEN"``), ``base_type`` (``"vqa"`` / ``"kvqa"``), ``content_type`` (e.g.
``"Organ"``, ``"Abnormality"``), ``triple`` (knowledge-graph triple for ``kvqa``) and ``qid``.

License: CC BY 4.0 (``"CC-BY-4.0"``).

Splits: ``train`` → ``"train"``, ``validate`` → ``"validation"``, ``test`` → ``"test"``.
Only English questions are imported by default (``languages=("en",)``); pass ``("en", "zh")`` to
include Chinese ones (the left-out records are counted in ``report.filtered``).

Mapping to :class:`~emma.data.schema.Sample`:

- ``id`` = ``str(qid)``; ``task`` from ``answer_type`` (CLOSED → ``closed_vqa``, OPEN → ``open_vqa``)
- user turn = ``question`` with the image; assistant turn and ``gold.answer`` = ``answer``
- ``gold.boxes`` = the image's organ boxes from ``detection.json`` (``[x, y, w, h]`` in pixels of the
  original image, converted to canonical ``(x1, y1, x2, y2)`` pixels, ``label`` = organ name); boxes
  outside the image (beyond one pixel of slack) are dropped and counted in the report notes
- ``meta.modality``: CT → ``ct``, MRI → ``mri``, X-Ray → ``xray``; ``meta.body_part`` from ``location``
  (Brain*/Head → head, Chest*/Lung → chest, Abdomen → abdomen, Neck → neck, Pelvic Cavity → pelvis)
- ``meta.question_type`` = ``content_type``, ``meta.answer_type`` = closed/open,
  ``meta.study_key`` = the image folder (``xmlab<N>``)
- ``meta.extra``: ``q_lang``, ``base_type``, ``location``, ``img_id``, ``triple`` (for ``kvqa``)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Unpack

from emma.data.schema import Box, Gold, Meta, Sample
from emma.data.sources._common import (
    INVALID_RECORD,
    answer_type,
    clean_text,
    closed_or_open,
    normalize_modality,
    qa_turns,
    read_json,
    read_json_list,
    require_keys,
    slug,
    source_folder,
    source_ref,
)
from emma.data.sources._importer import DatasetInfo, ImportKwargs, ImportReport, ImportRun, import_records
from emma.errors import DataFormatError

NAME = "slake"
LICENSE = "CC-BY-4.0"
INFO = DatasetInfo(NAME, LICENSE, "SLAKE (Liu et al., ISBI 2021)")
SPLIT_FILES = (("train.json", "train"), ("validate.json", "validation"), ("test.json", "test"))
REQUIRED_KEYS = ("img_name", "question", "answer", "answer_type", "q_lang")
_BOX_SLACK = 1.0  # pixels a box may overhang the image before it is dropped


def body_part_of(location: str) -> str | None:
    """SLAKE ``location`` → EMMA body part."""
    loc = location.strip().lower().replace("_", " ")
    if not loc:
        return None
    if loc.startswith(("brain", "head")):
        return "head"
    if loc.startswith(("chest", "lung", "heart")):
        return "chest"
    if loc.startswith("abdomen"):
        return "abdomen"
    if loc.startswith("neck"):
        return "neck"
    if loc.startswith("pelvi"):
        return "pelvis"
    return slug(loc)


def find_root(src: Path) -> Path:
    """The folder holding the split files: ``src`` itself or ``src/Slake1.0``."""
    for candidate in (source_folder(src, NAME), src / "Slake1.0"):
        if any((candidate / f).is_file() for f, _ in SPLIT_FILES):
            if not (candidate / "imgs").is_dir():
                raise DataFormatError(f"{NAME}: missing imgs/ folder in {candidate}")
            return candidate
    raise DataFormatError(
        f"{NAME}: none of train.json, validate.json, test.json in {src} or {src / 'Slake1.0'}"
    )


def parse_detection(data: Any, width: int, height: int) -> tuple[list[Box], int]:
    """``detection.json`` content → canonical pixel boxes, and the number of boxes dropped as invalid.

    Accepts a list of ``{label: [x, y, w, h]}`` objects (the release format) or one such object;
    a label may also map to a list of such boxes.
    """
    items: list[tuple[str, Any]] = []
    entries = data if isinstance(data, list) else [data]
    for entry in entries:
        if isinstance(entry, dict):
            items.extend((str(k), v) for k, v in entry.items())
    boxes: list[Box] = []
    dropped = 0
    for label, value in items:
        rects = value if value and isinstance(value, list) and isinstance(value[0], list) else [value]
        for rect in rects:
            box = _xywh_box(rect, label, width, height)
            if box is None:
                dropped += 1
            else:
                boxes.append(box)
    return boxes, dropped


def _xywh_box(rect: Any, label: str, width: int, height: int) -> Box | None:
    if not isinstance(rect, (list, tuple)) or len(rect) != 4:
        return None
    try:
        x, y, w, h = (float(v) for v in rect)
    except (TypeError, ValueError):
        return None
    if w <= 0 or h <= 0 or x < -_BOX_SLACK or y < -_BOX_SLACK:
        return None
    if x + w > width + _BOX_SLACK or y + h > height + _BOX_SLACK:
        return None
    x1, y1 = max(x, 0.0), max(y, 0.0)
    return Box(x1=x1, y1=y1, x2=min(x + w, float(width)), y2=min(y + h, float(height)), label=label.strip())


def import_slake(
    src: Path, out: Path, *, languages: Sequence[str] = ("en",), **options: Unpack[ImportKwargs]
) -> ImportReport:
    """Import SLAKE from its official release folder into the store at ``out``."""
    src, out = Path(src), Path(out)
    root = find_root(src)
    records: list[tuple[str, dict[str, Any]]] = []
    for filename, split in SPLIT_FILES:
        path = root / filename
        if not path.is_file():
            continue
        rows = read_json_list(path)
        require_keys(path, rows, REQUIRED_KEYS)
        records.extend((split, r) for r in rows)
    langs = {lang.strip().lower() for lang in languages}
    boxes_cache: dict[str, list[Box]] = {}
    dropped_boxes = 0
    imgs = root / "imgs"

    def add_record(run: ImportRun, record: tuple[str, dict[str, Any]]) -> None:
        nonlocal dropped_boxes
        split, rec = record
        lang = clean_text(rec.get("q_lang")).lower()
        if lang not in langs:
            run.filter(f"language:{lang or 'unknown'}")
            return
        img_name = clean_text(rec.get("img_name"))
        image = imgs / img_name
        if not img_name or Path(img_name).is_absolute() or ".." in Path(img_name).parts:
            run.skip(INVALID_RECORD)
            return
        folder = str(Path(img_name).parent)
        if folder not in boxes_cache:
            boxes, dropped = _load_boxes(run, image, imgs / folder / "detection.json")
            boxes_cache[folder] = boxes
            dropped_boxes += dropped
        sample = _record_to_sample(rec, split, img_name, boxes_cache[folder])
        if sample is None:
            run.skip(INVALID_RECORD)
            return
        run.add(sample, [image], image_keys=[img_name])

    report = import_records(INFO, src, out, options, records, add_record, total=len(records))
    if dropped_boxes:
        report.notes.append(f"{dropped_boxes} detection box(es) outside their image or malformed (dropped)")
    return report


def _load_boxes(run: ImportRun, image: Path, detection: Path) -> tuple[list[Box], int]:
    if not detection.is_file():
        return [], 0
    size = run.size_of(image, f"{NAME} image {image.parent.name}")
    if isinstance(size, str):  # the image is unusable; the sample will be skipped anyway
        return [], 0
    try:
        data = read_json(detection)
    except DataFormatError:
        return [], 1
    return parse_detection(data, *size)


def _record_to_sample(rec: dict[str, Any], split: str, img_name: str, boxes: list[Box]) -> Sample | None:
    qid = clean_text(rec.get("qid"))
    question = clean_text(rec.get("question"))
    answer = clean_text(rec.get("answer"))
    task = closed_or_open(rec.get("answer_type"))
    if not (qid and question and answer and task):
        return None
    location = clean_text(rec.get("location"))
    base_type = clean_text(rec.get("base_type")) or None
    extra: dict[str, Any] = {
        "q_lang": clean_text(rec.get("q_lang")).lower(),
        "base_type": base_type,
        "location": location or None,
        "img_id": rec.get("img_id"),
    }
    triple = rec.get("triple")
    if base_type == "kvqa" and isinstance(triple, list):
        extra["triple"] = [clean_text(t) for t in triple]
    return Sample(
        id=qid,
        task=task,
        images=[source_ref(NAME, f"imgs/{img_name}")],
        turns=qa_turns(question, answer),
        gold=Gold(answer=answer, boxes=list(boxes)),
        meta=Meta(
            modality=normalize_modality(rec.get("modality")),
            body_part=body_part_of(location),
            split=split,
            source=NAME,
            license=LICENSE,
            study_key=str(Path(img_name).parent),
            question_type=clean_text(rec.get("content_type")) or None,
            answer_type=answer_type(task),
            extra=extra,
        ),
    )
