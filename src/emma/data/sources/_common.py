"""Shared importer plumbing: the import report, bounded image checks, normalisers and the write loop.

Every importer parses and validates its annotation files first (a bad layout raises
:class:`~emma.errors.DataFormatError` before anything is written), then streams samples through
:class:`ImportRun`, which checks each image's header against :class:`~emma.io.limits.Limits` before
the store reads it, skips (and counts) samples whose images are missing or unusable, honours
``limit`` and ``resume``, and reports progress.
"""

from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field

from emma.data.schema import ImageRef, Sample, TaskType
from emma.data.store import DatasetFormat, DatasetWriter
from emma.errors import CorruptFileError, DataFormatError, ImageTooLargeError
from emma.io.limits import DEFAULT_LIMITS, Limits
from emma.io.provenance import Provenance

#: ``progress(done, total)``: records handled so far and the total (``None`` when unknown).
ProgressFn = Callable[[int, int | None], None]

ImageInput = Path | bytes

# Reasons a record is skipped (keys of ImportReport.skipped).
MISSING_IMAGE = "missing_image"
IMAGE_TOO_LARGE = "image_too_large"
CORRUPT_IMAGE = "corrupt_image"
INVALID_RECORD = "invalid_record"
DUPLICATE_ID = "duplicate_id"


class ImportReport(BaseModel):
    """What an importer did: counts per split, skipped records by reason, and notes on oddities."""

    dataset: str
    src: str
    out: str
    license: str | None = None
    records: int = 0  # annotation records considered (after filters such as language)
    written: int = 0  # samples added in this run
    resumed: int = 0  # samples already in the store (``resume``), left as they were
    skipped: dict[str, int] = Field(default_factory=dict)  # reason -> records skipped
    filtered: dict[str, int] = Field(default_factory=dict)  # reason -> records left out on purpose
    by_split: dict[str, int] = Field(default_factory=dict)  # samples in the output per split
    by_task: dict[str, int] = Field(default_factory=dict)
    images: int = 0  # distinct source images used by the samples in the output
    limited: bool = False  # stopped early because of ``limit``
    notes: list[str] = Field(default_factory=list)

    @property
    def total(self) -> int:
        """Samples in the output after this run (written + resumed)."""
        return self.written + self.resumed


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
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    raise DataFormatError(f"{path}: line {lineno} is not valid JSON") from None
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


# --------------------------------------------------------------------------------------------------
# The write loop


class ImportRun:
    """One import into a store: checks images, skips and counts bad records, honours limit/resume.

    Use as a context manager around the sample loop::

        with ImportRun(report, out, limit=limit, resume=resume, total=len(records)) as run:
            for rec in records:
                if run.full:
                    break  # the limit is reached
                run.add(make_sample(rec), [image_path])  # or run.skip(reason)
    """

    def __init__(
        self,
        report: ImportReport,
        out: Path,
        *,
        limit: int | None = None,
        resume: bool = False,
        total: int | None = None,
        progress: ProgressFn | None = None,
        limits: Limits = DEFAULT_LIMITS,
        format: DatasetFormat = "jsonl",
        shard_size: int = 10_000,
        source: str | None = None,
    ) -> None:
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self.report = report
        self.out = out
        self.limit = limit
        self.resume = resume
        self.total = total
        self.progress = progress
        self.limits = limits
        self.format = format
        self.source = source or report.src  # the manifest's "source": a citation, else the folder
        self.shard_size = shard_size
        self._done = 0
        self._ids: set[str] = set()
        self._image_ok: dict[Path, tuple[int, int] | str] = {}  # path → size, or skip reason
        self._images_used: set[str] = set()
        self._skipped: Counter[str] = Counter()
        self._split: Counter[str] = Counter()
        self._task: Counter[str] = Counter()
        self._writer: DatasetWriter | None = None

    def __enter__(self) -> Self:
        self._writer = DatasetWriter(
            self.out,
            name=self.report.dataset,
            license=self.report.license,
            source=self.source,
            format=self.format,
            shard_size=self.shard_size,
            resume=self.resume,
            limits=self.limits,
        )
        self._writer.__enter__()
        self._tick()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.writer.__exit__(exc_type, exc, tb)
        finally:
            if exc_type is None:
                self._finish()

    @property
    def writer(self) -> DatasetWriter:
        if self._writer is None:
            raise RuntimeError("ImportRun is used outside its 'with' block")
        return self._writer

    @property
    def full(self) -> bool:
        """True once ``limit`` samples are in the output; importers stop reading then."""
        if self.limit is not None and self.report.total >= self.limit:
            self.report.limited = True
            return True
        return False

    def skip(self, reason: str) -> None:
        """Count a record that cannot be used (missing image, invalid fields, ...)."""
        self.report.records += 1
        self._skipped[reason] += 1
        self._step()

    def filter(self, reason: str) -> None:
        """Count a record left out on purpose (e.g. another language); not a problem."""
        self.report.filtered[reason] = self.report.filtered.get(reason, 0) + 1
        self._step()

    def size_of(self, image: ImageInput, what: str) -> tuple[int, int] | str:
        """``(width, height)`` of a usable image, or the reason it cannot be used (cached per path)."""
        if isinstance(image, Path) and image in self._image_ok:
            return self._image_ok[image]
        try:
            result: tuple[int, int] | str = probe_image(image, what=what, limits=self.limits)
        except FileNotFoundError:
            result = MISSING_IMAGE
        except ImageTooLargeError:
            result = IMAGE_TOO_LARGE
        except CorruptFileError:
            result = CORRUPT_IMAGE
        if isinstance(image, Path):
            self._image_ok[image] = result
        return result

    def add(
        self, sample: Sample, images: Sequence[ImageInput] = (), *, image_keys: Sequence[str] = ()
    ) -> None:
        """Write ``sample`` with ``images``, or count why it is skipped.

        Images are checked (header only, against ``limits``) before the store reads them.
        ``image_keys`` name the source images for the distinct-image count (paths name themselves).
        Callers check :attr:`full` before building the next sample.
        """
        if sample.id in self._ids:
            self.skip(DUPLICATE_ID)
            return
        keys = list(image_keys) or [str(p) for p in images]
        if self.resume and self.writer.has(sample.id):
            self._ids.add(sample.id)
            self.report.records += 1
            self.report.resumed += 1
            self._count(sample, keys)
            self._step()
            return
        for i, image in enumerate(images):
            status = self.size_of(image, f"{self.report.dataset} sample {sample.id} image {i}")
            if isinstance(status, str):
                self.skip(status)
                return
        try:
            self.writer.add(sample, images)
        except (ImageTooLargeError, CorruptFileError) as exc:  # e.g. a truncated file with a sound header
            reason = IMAGE_TOO_LARGE if isinstance(exc, ImageTooLargeError) else CORRUPT_IMAGE
            for image in images:
                if isinstance(image, Path) and not isinstance(self._image_ok.get(image), str):
                    self._image_ok[image] = reason if len(images) == 1 else self._image_ok.get(image, (0, 0))
            self.skip(reason)
            return
        self._ids.add(sample.id)
        self.report.records += 1
        self.report.written += 1
        self._count(sample, keys)
        self._step()

    def _count(self, sample: Sample, keys: Sequence[str]) -> None:
        self._split[sample.meta.split or "unsplit"] += 1
        self._task[str(sample.task)] += 1
        self._images_used.update(keys)

    def _step(self, n: int = 1) -> None:
        self._done += n
        self._tick()

    def _tick(self) -> None:
        if self.progress is not None:
            self.progress(self._done, self.total)

    def _finish(self) -> None:
        self.report.skipped = dict(sorted((self.report.skipped | dict(self._skipped)).items()))
        self.report.by_split = dict(sorted(self._split.items()))
        self.report.by_task = dict(sorted(self._task.items()))
        self.report.images = len(self._images_used)
        missing = self._skipped.get(MISSING_IMAGE, 0)
        if missing:
            self.report.notes.append(f"{missing} record(s) skipped because their image file is missing")
