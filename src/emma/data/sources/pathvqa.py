"""PathVQA (He et al., 2020): pathology visual question answering.

Two release layouts are read (``src`` is the ``pvqa/`` folder or the folder holding it):

1. The authors' layout, with the question files as JSON / JSONL / CSV::

       images/{train,val,test}/<image>.jpg
       qas/{train,val,test}/{split}_qa.json    JSON list of {"image", "question", "answer"}
       (or {split}_qa.jsonl: one such object a line; or {split}_qa.csv: columns image,question,answer)

   ``image`` is the file stem (``"train_0422"``) or file name; the file is looked up as
   ``images/{split}/<image>`` with ``.jpg``, ``.jpeg`` or ``.png``. The JSON form is exactly what
   ``json.dump(pickle.load(f))`` of the official ``{split}_qa.pkl`` gives.

   The official release ships those records as Python pickles (``qas/{split}/{split}_qa.pkl``).
   Loading a pickle can run arbitrary code, so pickles are refused unless ``allow_pickle=True``
   (``--allow-pickle``); even then they are read with an unpickler that allows no classes or
   functions at all (plain lists, dicts, strings and numbers only), so a malicious file fails
   with :class:`~emma.errors.DataFormatError` instead of running code.

2. The Hugging Face parquet export (``flaviagiammarino/path-vqa``)::

       data/{train,validation,test}-*.parquet   columns image (struct{bytes, path}), question, answer

License: MIT (``"MIT"``).

Splits: ``train`` → ``"train"``, ``val`` / ``validation`` → ``"validation"``, ``test`` → ``"test"``.

Mapping to :class:`~emma.data.schema.Sample`:

- ``id`` = ``"{split}-{n}"``, ``n`` the record's 0-based position in its split's question file(s)
- ``task``: ``closed_vqa`` when the answer is yes/no (PathVQA's "closed" questions), else ``open_vqa``
- user turn = ``question`` with the image; assistant turn and ``gold.answer`` = ``answer``
- ``meta.modality`` = ``"pathology"``; ``meta.answer_type`` = closed/open;
  ``meta.study_key`` = the image name (parquet: the image's content hash), for leakage checks
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Unpack

from emma.data.schema import Gold, ImageRef, Meta, Sample, TaskType
from emma.data.sources._common import (
    INVALID_RECORD,
    MISSING_IMAGE,
    answer_type,
    clean_text,
    qa_turns,
    read_csv,
    read_json_list,
    read_jsonl,
    require_keys,
    source_folder,
    source_ref,
)
from emma.data.sources._importer import DatasetInfo, ImportKwargs, ImportReport, ImportRun, import_records
from emma.errors import DataFormatError
from emma.text.normalize import is_yes_no

NAME = "pathvqa"
LICENSE = "MIT"
INFO = DatasetInfo(NAME, LICENSE, "PathVQA (He et al., 2020)")
SPLITS = (("train", "train"), ("val", "validation"), ("test", "test"))
PARQUET_SPLITS = (("train", "train"), ("validation", "validation"), ("val", "validation"), ("test", "test"))
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_RECORD_KEYS = ("image", "question", "answer")


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Unpickles plain containers and scalars only; any class or function reference is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise DataFormatError(
            f"{NAME}: pickle refers to {module}.{name}; only plain lists/dicts are accepted"
        )


def load_pickle(path: Path, *, allow_pickle: bool) -> list[dict[str, Any]]:
    """Read an official ``*_qa.pkl`` (only with ``allow_pickle``; never runs code from the file)."""
    if not allow_pickle:
        raise DataFormatError(
            f"{path}: pickle files can run code when loaded; convert it to JSON or pass --allow-pickle"
        )
    try:
        with path.open("rb") as fh:
            data = _NoGlobalsUnpickler(fh, encoding="utf-8").load()
    except DataFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - unpickling fails in many ways; all mean a bad file
        raise DataFormatError(f"{path}: unreadable pickle ({type(exc).__name__})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataFormatError(f"{path}: expected a list of records")
    return data


def find_root(src: Path) -> Path:
    for candidate in (source_folder(src, NAME), src / "pvqa"):
        if (candidate / "qas").is_dir() or (candidate / "data").is_dir():
            return candidate
    raise DataFormatError(f"{NAME}: missing qas/ (or data/*.parquet) in {src}")


def _qa_file(qas: Path, split: str) -> Path | None:
    folder = qas / split
    for suffix in (".json", ".jsonl", ".csv", ".pkl"):
        path = folder / f"{split}_qa{suffix}"
        if path.is_file():
            return path
    return None


def _read_records(path: Path, allow_pickle: bool) -> list[dict[str, Any]]:
    if path.suffix == ".json":
        rows: list[dict[str, Any]] = read_json_list(path)
    elif path.suffix == ".jsonl":
        rows = read_jsonl(path)
    elif path.suffix == ".csv":
        rows = list(read_csv(path, required=_RECORD_KEYS))
    else:
        rows = load_pickle(path, allow_pickle=allow_pickle)
    require_keys(path, rows, _RECORD_KEYS)
    return rows


def _make_sample(
    sample_id: str, split: str, question: str, answer: str, image_key: str, ref: ImageRef
) -> Sample:
    task = TaskType.CLOSED_VQA if is_yes_no(answer) else TaskType.OPEN_VQA
    return Sample(
        id=sample_id,
        task=task,
        images=[ref],
        turns=qa_turns(question, answer),
        gold=Gold(answer=answer),
        meta=Meta(
            modality="pathology",
            split=split,
            source=NAME,
            license=LICENSE,
            study_key=image_key,
            answer_type=answer_type(task),
        ),
    )


def _find_image(folder: Path, image: str) -> Path | None:
    name = Path(image).name
    if Path(name).suffix.lower() in _IMAGE_SUFFIXES:
        return folder / name
    for suffix in _IMAGE_SUFFIXES:
        path = folder / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def import_pathvqa(
    src: Path, out: Path, *, allow_pickle: bool = False, **options: Unpack[ImportKwargs]
) -> ImportReport:
    """Import PathVQA (authors' layout with JSON/JSONL/CSV or opted-in pickle, or HF parquet)."""
    src, out = Path(src), Path(out)
    root = find_root(src)
    if (root / "qas").is_dir():
        return _import_qas(root, src, out, allow_pickle, options)
    return _import_parquet(root, src, out, options)


def _import_qas(root: Path, src: Path, out: Path, allow_pickle: bool, options: ImportKwargs) -> ImportReport:
    per_split: list[tuple[str, str, list[dict[str, Any]]]] = []
    for folder, split in SPLITS:
        path = _qa_file(root / "qas", folder)
        if path is not None:
            per_split.append((folder, split, _read_records(path, allow_pickle)))
    if not per_split:
        raise DataFormatError(
            f"{NAME}: no qas/{{train,val,test}}/{{split}}_qa.json (or .jsonl/.csv/.pkl) in {root}"
        )
    images_root = root / "images"
    if not images_root.is_dir():
        raise DataFormatError(f"{NAME}: missing images/ folder in {root}")

    def add_record(run: ImportRun, record: tuple[str, str, int, dict[str, Any]]) -> None:
        folder, split, n, rec = record
        image = clean_text(rec.get("image"))
        question, answer = clean_text(rec.get("question")), clean_text(rec.get("answer"))
        if not (image and question and answer):
            run.skip(INVALID_RECORD)
            return
        path = _find_image(images_root / folder, image)
        if path is None:
            run.skip(MISSING_IMAGE)
            return
        key = f"images/{folder}/{path.name}"
        sample = _make_sample(f"{split}-{n}", split, question, answer, path.stem, source_ref(NAME, key))
        run.add(sample, [path], image_keys=[key])

    records = [(folder, split, n, rec) for folder, split, rows in per_split for n, rec in enumerate(rows)]
    return import_records(INFO, src, out, options, records, add_record, total=len(records))


def _parquet_files(root: Path) -> list[tuple[str, Path]]:
    data = root / "data"
    found: list[tuple[str, Path]] = []
    for prefix, split in PARQUET_SPLITS:
        for path in sorted(data.glob(f"{prefix}-*.parquet")) + sorted(data.glob(f"{prefix}.parquet")):
            found.append((split, path))
    return found


def _iter_parquet(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = set(pf.schema_arrow.names)
        missing = [k for k in _RECORD_KEYS if k not in names]
        if missing:
            raise DataFormatError(f"{path}: missing column(s) {', '.join(missing)}")
        for batch in pf.iter_batches(batch_size=256, columns=list(_RECORD_KEYS)):
            yield from batch.to_pylist()
    except DataFormatError:
        raise
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise DataFormatError(f"{path}: unreadable parquet ({type(exc).__name__})") from None


def _parquet_records(files: list[tuple[str, Path]]) -> Iterator[tuple[str, Path, int, dict[str, Any]]]:
    """``(split, file, n, record)`` of every file in order; ``n`` counts the split's records."""
    counters: dict[str, int] = {}
    for split, path in files:
        for rec in _iter_parquet(path):
            n = counters.get(split, 0)
            counters[split] = n + 1
            yield split, path, n, rec


def _add_parquet_record(run: ImportRun, record: tuple[str, Path, int, dict[str, Any]]) -> None:
    split, path, n, rec = record
    question, answer = clean_text(rec.get("question")), clean_text(rec.get("answer"))
    image = rec.get("image")
    data = image.get("bytes") if isinstance(image, dict) else image if isinstance(image, bytes) else None
    if not (question and answer):
        run.skip(INVALID_RECORD)
        return
    if not data:
        run.skip(MISSING_IMAGE)
        return
    digest = hashlib.sha256(data).hexdigest()
    ref = source_ref(NAME, f"data/{path.name}#{n}", sha256=digest, data=bytes(data[:16]))
    sample = _make_sample(f"{split}-{n}", split, question, answer, digest[:16], ref)
    run.add(sample, [bytes(data)], image_keys=[digest])


def _import_parquet(root: Path, src: Path, out: Path, options: ImportKwargs) -> ImportReport:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = _parquet_files(root)
    if not files:
        raise DataFormatError(f"{NAME}: no data/{{train,validation,test}}-*.parquet in {root}")
    try:
        total: int | None = sum(pq.read_metadata(p).num_rows for _, p in files)
    except (OSError, ValueError, pa.ArrowException):  # the file is read (and its error reported) below
        total = None
    return import_records(INFO, src, out, options, _parquet_records(files), _add_parquet_record, total=total)
