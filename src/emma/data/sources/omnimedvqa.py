"""OmniMedVQA (Hu et al., CVPR 2024): a multiple-choice medical VQA benchmark over 73 datasets.

Official release layout (``src`` is ``OmniMedVQA/`` or the folder holding it)::

    QA information/Open-access/<dataset>.json        lists of question records
    QA information/Restricted-access/<dataset>.json  (questions whose images need separate access)
    Images/<dataset>/...                             the images

Each record: ``question_id``, ``image_path`` (relative to ``src``, e.g.
``"Images/ACRIMA/Im553_g_ACRIMA.png"``), ``question``, ``gt_answer`` (the correct option's text),
``option_A`` .. ``option_D`` (two to four present), ``modality_type`` (one release file spells it
``modality``), ``question_type`` (e.g. ``"Disease Diagnosis"``) and ``dataset``.

License: the benchmark aggregates public datasets, each under its own terms (``"various"``); check
the terms of every source dataset before use. Restricted-access parts need each owner's permission.

Split: OmniMedVQA is an evaluation benchmark without a training split; every sample gets ``"test"``.
``access`` chooses the parts read (both by default, where present).

Mapping to :class:`~emma.data.schema.Sample`:

- ``id`` = ``question_id`` (else ``"{file stem}-{n}"``); duplicates are skipped and counted
- ``task`` = ``multiple_choice``; ``gold.options`` = present options in A..D order,
  ``gold.answer_index`` = the option equal to ``gt_answer`` (exact after whitespace clean-up, else
  case-insensitive); rows whose answer matches no option are skipped as invalid
- user turn = question followed by one ``A. option`` line per option, with the image;
  assistant turn = ``"B. option text"``; ``gold.answer`` = ``gt_answer``
- ``meta.modality`` from ``modality_type`` (``"CT(Computed Tomography)"`` → ``ct``,
  ``"Fundus Photography"`` → ``fundus``, ...), ``meta.question_type`` = ``question_type``,
  ``meta.study_key`` = ``image_path``; ``meta.extra``: ``dataset``, ``access``, ``modality_type``
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Unpack

from emma.data.schema import Meta, Sample
from emma.data.sources._common import (
    INVALID_RECORD,
    choice_sample,
    clean_text,
    normalize_modality,
    read_json_list,
    source_folder,
    source_ref,
)
from emma.data.sources._importer import DatasetInfo, ImportKwargs, ImportReport, ImportRun, import_records
from emma.errors import DataFormatError

NAME = "omnimedvqa"
LICENSE = "various"
INFO = DatasetInfo(NAME, LICENSE, "OmniMedVQA (Hu et al., CVPR 2024)")
QA_DIR = "QA information"
ACCESS_DIRS = {"open": "Open-access", "restricted": "Restricted-access"}
OPTION_KEYS = ("option_A", "option_B", "option_C", "option_D")


def find_root(src: Path) -> Path:
    for candidate in (source_folder(src, NAME), src / "OmniMedVQA"):
        if (candidate / QA_DIR).is_dir():
            return candidate
    raise DataFormatError(f"{NAME}: missing '{QA_DIR}/' folder in {src}")


def record_to_sample(rec: dict[str, Any], default_id: str, access: str) -> Sample | None:
    question = clean_text(rec.get("question"))
    answer = clean_text(rec.get("gt_answer"))
    options = [clean_text(rec.get(k)) for k in OPTION_KEYS if clean_text(rec.get(k))]
    if not (question and answer) or len(options) < 2:
        return None
    if answer in options:
        index = options.index(answer)
    else:
        lowered = [o.lower() for o in options]
        if answer.lower() not in lowered:
            return None
        index = lowered.index(answer.lower())
    modality_type = clean_text(rec.get("modality_type") or rec.get("modality"))
    image_path = clean_text(rec.get("image_path")).replace("\\", "/")
    if not image_path:
        return None
    meta = Meta(
        modality=normalize_modality(modality_type),
        split="test",
        source=NAME,
        license=LICENSE,
        study_key=image_path,
        question_type=clean_text(rec.get("question_type")) or None,
        extra={
            "dataset": clean_text(rec.get("dataset")) or None,
            "access": access,
            "modality_type": modality_type or None,
        },
    )
    sample_id = clean_text(rec.get("question_id")) or default_id
    return choice_sample(sample_id, [source_ref(NAME, image_path)], question, options, index, meta)


def _resolve_image(root: Path, image_path: str) -> Path | None:
    rel = Path(image_path.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts:
        return None
    direct = root / rel
    if direct.exists() or rel.parts[:1] == ("Images",):
        return direct
    return root / "Images" / rel


def import_omnimedvqa(
    src: Path, out: Path, *, access: Sequence[str] = ("open", "restricted"), **options: Unpack[ImportKwargs]
) -> ImportReport:
    """Import OmniMedVQA (all samples in split ``"test"``) from its release folder."""
    src, out = Path(src), Path(out)
    root = find_root(src)
    unknown = [a for a in access if a not in ACCESS_DIRS]
    if unknown:
        raise ValueError(f"{NAME}: unknown access part(s) {', '.join(unknown)} (use open, restricted)")
    files: list[tuple[str, Path]] = []
    for part in access:
        folder = root / QA_DIR / ACCESS_DIRS[part]
        if folder.is_dir():
            files.extend((part, p) for p in sorted(folder.glob("*.json")))
    if not files:
        wanted = " or ".join(f"'{QA_DIR}/{ACCESS_DIRS[a]}/*.json'" for a in access)
        raise DataFormatError(f"{NAME}: no {wanted} in {root}")
    if not (root / "Images").is_dir():
        raise DataFormatError(f"{NAME}: missing Images/ folder in {root}")
    tables = [(part, path, read_json_list(path)) for part, path in files]

    def add_record(run: ImportRun, record: tuple[str, str, dict[str, Any]]) -> None:
        part, default_id, rec = record
        sample = record_to_sample(rec, default_id, part)
        image = _resolve_image(root, clean_text(rec.get("image_path")))
        if sample is None or image is None or not sample.meta.study_key:
            run.skip(INVALID_RECORD)
            return
        run.add(sample, [image], image_keys=[sample.meta.study_key])

    records = [(part, f"{path.stem}-{n}", rec) for part, path, rows in tables for n, rec in enumerate(rows)]
    notes = ["OmniMedVQA has no training split: every sample is in 'test'"]
    return import_records(INFO, src, out, options, records, add_record, total=len(records), notes=notes)
