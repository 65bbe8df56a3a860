"""Shared importer helpers: bounded image checks, normalisers, sample parts and annotation file readers.

The write loop, the options every importer takes and the import report are in :mod:`._importer`.
"""

from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from emma.data.jsonl import INVALID, json_lines
from emma.data.schema import Gold, ImageRef, Meta, Sample, TaskType, Turn
from emma.errors import CorruptFileError, DataFormatError, ImageTooLargeError
from emma.io.limits import DEFAULT_LIMITS, Limits
from emma.io.provenance import Provenance

ImageInput = Path | bytes

# Reasons a record is skipped (keys of ImportReport.skipped).
MISSING_IMAGE = "missing_image"
IMAGE_TOO_LARGE = "image_too_large"
CORRUPT_IMAGE = "corrupt_image"
INVALID_RECORD = "invalid_record"
DUPLICATE_ID = "duplicate_id"


# --------------------------------------------------------------------------------------------------
# Image checks


def _check_opened(im: Image.Image, what: str, limits: Limits) -> tuple[int, int]:
    width, height = im.size
    frames = int(getattr(im, "n_frames", 1) or 1)
    limits.check_image(height, width, frames, what=what)
    return width, height


def probe_image(image: ImageInput, *, what: str, limits: Limits = DEFAULT_LIMITS) -> tuple[int, int]:
    """Check an image's header against ``limits`` without decoding its pixels; return ``(width, height)``.

    Raises :class:`ImageTooLargeError` over a bound, :class:`CorruptFileError` when PIL does not
    recognise the data, ``FileNotFoundError`` when the file is missing.
    """
    if isinstance(image, bytes):
        if len(image) > limits.max_file_bytes:
            raise ImageTooLargeError(f"{what}: {len(image)} bytes, over the limit of {limits.max_file_bytes}")
        source: Path | io.BytesIO = io.BytesIO(image)
    else:
        if not image.is_file():
            raise FileNotFoundError(f"{what}: no such file")
        limits.check_file(image)
        source = image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as im:  # lazy: reads the header only
                return _check_opened(im, what, limits)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{what}: {exc}") from None
    except (UnidentifiedImageError, SyntaxError, ValueError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise CorruptFileError(f"{what}: not a readable image ({type(exc).__name__})") from None


_FORMAT_BY_SUFFIX = {
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".png": "png",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".bmp": "bmp",
    ".webp": "webp",
    ".gif": "gif",
}


def image_format(name: str | None = None, data: bytes | None = None) -> str:
    """Provenance format of a source image, from its content (when given) or its file name."""
    if data is not None:
        if data[:3] == b"\xff\xd8\xff":
            return "jpeg"
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            return "png"
    if name is not None:
        return _FORMAT_BY_SUFFIX.get(Path(name).suffix.lower(), "raster")
    return "raster"


def source_ref(dataset: str, rel: str, *, sha256: str | None = None, data: bytes | None = None) -> ImageRef:
    """The placeholder ref of a source image (the store replaces it, keeping the provenance).

    ``rel`` is the image's path inside the release (or another non-PHI locator); it is recorded as
    the provenance source ``"<dataset>:<rel>"``.
    """
    provenance = Provenance(source=f"{dataset}:{rel}", format=image_format(rel, data))
    if sha256 is not None:
        return ImageRef(sha256=sha256, provenance=provenance)
    return ImageRef(path=rel, provenance=provenance)


# --------------------------------------------------------------------------------------------------
# Normalisers shared by importers

_MODALITY_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\bx[\s_-]?ray\b|radiograph|\bcxr\b|\bdr\b|\bcr\b", "xray"),
    (r"\bct\b|computed tomography", "ct"),
    (r"\bmri?\b|magnetic resonance|mag-netic", "mri"),
    (r"ultrasound|\bus\b|sonograph", "us"),
    (r"\boct\b|optical coherence", "oct"),
    (r"fundus", "fundus"),
    (r"dermoscop", "dermoscopy"),
    (r"endoscop", "endoscopy"),
    (r"microscop|patholog|histolog", "pathology"),
    (r"infrared", "infrared"),
    (r"\bpet\b", "pet"),
    (r"mammogra", "mammography"),
)


def normalize_modality(value: Any) -> str | None:
    """Map a dataset's modality label to EMMA's vocabulary ("xray", "ct", "mri", "us", ...).

    Unknown labels are kept as a lower-case slug; empty values give ``None``.
    """
    text = clean_text(value).lower()
    if not text:
        return None
    for pattern, name in _MODALITY_PATTERNS:
        if re.search(pattern, text):
            return name
    return slug(text)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def clean_text(value: Any) -> str:
    """A record field as text: ``None`` → "", numbers → their string, surrounding whitespace removed."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return " ".join(str(value).split())


def closed_or_open(answer_type: Any) -> TaskType | None:
    """``CLOSED`` / ``OPEN`` (any case, stray spaces) → the task; anything else → ``None``."""
    label = clean_text(answer_type).upper()
    if label == "CLOSED":
        return TaskType.CLOSED_VQA
    if label == "OPEN":
        return TaskType.OPEN_VQA
    return None


_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "validation",
    "valid": "validation",
    "validate": "validation",
    "validation": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}


def normalize_split(value: Any, default: str = "train") -> str:
    text = clean_text(value).lower()
    if not text:
        return default
    return _SPLIT_ALIASES.get(text, slug(text) or default)


OPTION_LETTERS = "ABCDEFGHIJ"


def format_choices(question: str, options: Sequence[str]) -> str:
    """The user turn of a multiple-choice sample: the question, then one ``A. option`` line each."""
    lines = [question] + [f"{OPTION_LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    return "\n".join(lines)


def choice_turns(question: str, options: list[str], index: int, n_images: int = 1) -> tuple[list[Turn], Gold]:
    """The turns and gold of a multiple-choice sample: the question with its options and all images,
    answered ``"B. option text"``; the gold is option ``index``."""
    turns = [
        Turn(role="user", content=format_choices(question, options), images=list(range(n_images))),
        Turn(role="assistant", content=f"{OPTION_LETTERS[index]}. {options[index]}"),
    ]
    return turns, Gold(answer=options[index], options=options, answer_index=index)


def choice_sample(
    sample_id: str, images: list[ImageRef], question: str, options: list[str], index: int, meta: Meta
) -> Sample:
    """A multiple-choice sample (:func:`choice_turns`): ``question`` about all of ``images``, answered by
    option ``index``."""
    turns, gold = choice_turns(question, options, index, len(images))
    return Sample(
        id=sample_id, task=TaskType.MULTIPLE_CHOICE, images=images, turns=turns, gold=gold, meta=meta
    )


def qa_turns(question: str, answer: str) -> list[Turn]:
    """The turns of a one-image VQA sample: the question with the image, then the answer."""
    return [Turn(role="user", content=question, images=[0]), Turn(role="assistant", content=answer)]


def answer_type(task: TaskType) -> str:
    """``meta.answer_type`` of a VQA task: ``closed`` for closed VQA, else ``open``."""
    return "closed" if task is TaskType.CLOSED_VQA else "open"


def normalize_question(text: str) -> str:
    """Question text for overlap checks: NFKC, lower case, punctuation dropped, spaces collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[^\w]+", " ", text)
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------------
# Annotation file readers (all raise DataFormatError with one line naming the file)


def read_json(path: Path) -> Any:
    try:
        with path.open("r", encoding="utf-8-sig") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise DataFormatError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{path}: not valid JSON ({type(exc).__name__} at {_where(exc)})") from None


def _where(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"line {exc.lineno}"
    return "byte offset " + str(getattr(exc, "start", "?"))


def read_json_list(path: Path) -> list[dict[str, Any]]:
    """A JSON file holding a list of objects."""
    data = read_json(path)
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataFormatError(f"{path}: expected a JSON list of objects")
    return data


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    try:
        with path.open("r", encoding="utf-8-sig") as fh:
            for lineno, rec in json_lines(fh):
                if rec is INVALID:
                    raise DataFormatError(f"{path}: line {lineno} is not valid JSON")
                if not isinstance(rec, dict):
                    raise DataFormatError(f"{path}: line {lineno} is not a JSON object")
                records.append(rec)
    except UnicodeDecodeError:
        raise DataFormatError(f"{path}: not UTF-8 text") from None
    return records


def read_csv(path: Path, required: Sequence[str] = ()) -> list[dict[str, str]]:
    """A CSV file with a header row; ``required`` columns must all be present."""
    try:
        with path.open("r", encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise DataFormatError(f"{path}: missing column(s) {', '.join(missing)}")
            rows = []
            for row in reader:
                rows.append({(k or "").strip(): v for k, v in row.items() if k is not None})
            return rows
    except UnicodeDecodeError:
        raise DataFormatError(f"{path}: not UTF-8 text") from None
    except csv.Error as exc:
        raise DataFormatError(f"{path}: not valid CSV ({exc})") from None


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataFormatError(f"{what}: missing folder {path}")
    return path


def source_folder(src: Path, dataset: str) -> Path:
    """``src`` when it is a folder; else DataFormatError ``"<dataset>: source folder ... does not exist"``."""
    if not src.is_dir():
        raise DataFormatError(f"{dataset}: source folder {src} does not exist")
    return src


def require_keys(
    path: Path, rows: Sequence[dict[str, Any]], keys: Sequence[str], what: str = "records"
) -> None:
    """DataFormatError naming ``path`` when the first of ``rows`` lacks any of ``keys``."""
    if rows:
        missing = [k for k in keys if k not in rows[0]]
        if missing:
            raise DataFormatError(f"{path}: {what} lack key(s) {', '.join(missing)}")
