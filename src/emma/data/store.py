"""Canonical dataset storage: a folder with a manifest, samples as JSONL or Parquet, images by content hash.

Layout of a dataset folder::

    dataset.json                        manifest (:class:`Manifest`); written last, so its presence means
                                        "complete"
    samples/<split>.jsonl               format "jsonl": one ``Sample.model_dump_json()`` per line
    images/<sha[:2]>/<sha256>.<ext>     format "jsonl": one file per distinct image, named by the SHA-256
                                        of its bytes
    shards/<split>-00000.parquet ...    format "parquet": sample shards of at most ``shard_size`` rows;
                                        columns id, task, split, modality, body_part, source,
                                        image_sha256 (list), sample_json (the full Sample as JSON)
    images/part-00000.parquet ...       format "parquet": image table parts with columns sha256, ext,
                                        width, height, bytes (small row groups, so one image is read
                                        without reading the part)

Images are stored exactly as given (bytes and files keep their encoding; PIL images are saved as PNG),
once per distinct content, whatever the number of samples that show them. In a JSONL dataset
``ImageRef.path`` is the relative file path above; in a Parquet dataset it is ``None`` and the image is
found by ``ImageRef.sha256`` (the reader builds a sha → row index from the ``sha256`` column on first
use). Both formats fill ``sha256``, ``width`` and ``height`` and keep the ref's provenance.

Crash safety. Every file is written under a temporary name and renamed when complete: an image file at
once; ``samples/<split>.jsonl.part`` (flushed line by line) when the writer closes; a Parquet shard or
image part when it reaches its size or the writer closes (an image part is always closed before a
sample shard, so a committed shard never refers to an uncommitted image). On an exception inside the
``with`` block the writer flushes what it can and leaves the temporary files; no manifest is written.
``DatasetWriter(..., resume=True)`` repairs them (drops a torn last JSONL line, keeps readable Parquet
parts, deletes unreadable ones) and loads the ids already stored, so an importer that skips
``writer.has(id)`` loses nothing and duplicates nothing. A Parquet shard is the unit of durability: after
a hard kill the rows of the open shard are gone and ``has`` says so.

The writer keeps the set of sample ids (and, for Parquet, of image hashes) in memory; the reader streams
(line by line, or Parquet batches of a few hundred rows).

Why one file (~1000 lines): the writer, the reader and the resume logic share one on-disk protocol
(manifest, shard names, staging and commit order); splitting them would split that protocol's one home.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tempfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Literal, Self

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pydantic import BaseModel, Field, ValidationError, field_validator

from emma.data.durable import atomic_write, cut_torn_tail, fsync_dir
from emma.data.schema import SCHEMA_VERSION, ImageRef, Sample
from emma.errors import CorruptFileError, DataFormatError, ImageTooLargeError
from emma.io.limits import DEFAULT_LIMITS, Limits

log = logging.getLogger(__name__)

DatasetFormat = Literal["jsonl", "parquet"]
ImageInput = Path | str | bytes | Image.Image

MANIFEST = "dataset.json"
DEFAULT_SPLIT = "train"
_RESUME_MANIFEST = ".dataset.json.resume"  # the previous manifest while a resumed writer is open
_PART = ".part"
_SPLIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SHARD_RE = re.compile(r"^(?P<split>.+)-(?P<index>\d{5,})\.parquet$")
_IMAGE_PART_RE = re.compile(r"^part-(?P<index>\d{5,})\.parquet$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_EXT_BY_PIL_FORMAT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "TIFF": "tiff", "BMP": "bmp", "GIF": "gif"}
_SPLIT_ORDER = ("train", "validation", "val", "dev", "test")

_READ_BATCH_ROWS = 256  # Parquet rows decoded at a time while iterating
_ROW_GROUP_ROWS = 1024  # sample rows per Parquet row group (at most)
_IMAGE_GROUP_ROWS = 32  # images per row group of an image part (at most) ...
_IMAGE_GROUP_BYTES = 8 * 1024**2  # ... or this many bytes
_IMAGE_PART_BYTES = 512 * 1024**2  # an image part is closed past this size
_IMAGE_GROUP_CACHE = 4  # image row groups a reader keeps decoded

_SAMPLE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("task", pa.string()),
        ("split", pa.string()),
        ("modality", pa.string()),
        ("body_part", pa.string()),
        ("source", pa.string()),
        ("image_sha256", pa.list_(pa.string())),
        ("sample_json", pa.string()),
    ]
)
_IMAGE_SCHEMA = pa.schema(
    [
        ("sha256", pa.string()),
        ("ext", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("bytes", pa.large_binary()),
    ]
)


class Manifest(BaseModel):
    """``dataset.json``: what the dataset is and how many samples each split holds."""

    name: str
    description: str = ""
    license: str | None = None
    source: str | None = None
    schema_version: int = SCHEMA_VERSION
    format: DatasetFormat
    created: datetime
    counts: dict[str, int] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("counts")
    @classmethod
    def _valid_splits(cls, v: dict[str, int]) -> dict[str, int]:
        for split, n in v.items():
            _check_split(split)
            if n < 0:
                raise ValueError(f"negative count for split {split!r}")
        return v


# ---------------------------------------------------------------------------------------------- helpers


def _check_split(split: str) -> str:
    if not _SPLIT_RE.match(split):
        raise DataFormatError(f"invalid split name {split!r} (letters, digits, '_', '.', '-'; at most 64)")
    return split


def _split_key(split: str) -> tuple[int, str]:
    return (_SPLIT_ORDER.index(split) if split in _SPLIT_ORDER else len(_SPLIT_ORDER), split)


def _describe(exc: ValidationError) -> str:
    """One line from a pydantic error: location and message of the first problem (never the input)."""
    errors = exc.errors(include_input=False, include_url=False)
    if not errors:
        return "invalid"
    first = errors[0]
    loc = ".".join(str(x) for x in first.get("loc", ()))
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{loc + ': ' if loc else ''}{msg}{more}".replace("\n", " ")


def encode_png(image: Image.Image) -> bytes:
    """Encode a PIL image as PNG bytes (the form in which PIL images are stored)."""
    buf = io.BytesIO()
    try:
        image.save(buf, format="PNG")
    except (OSError, ValueError, KeyError) as exc:
        raise DataFormatError(f"cannot store a PIL image of mode {image.mode} as PNG ({exc})") from None
    return buf.getvalue()


def decode_image(data: bytes, *, limits: Limits = DEFAULT_LIMITS, what: str = "image") -> Image.Image:
    """Decode encoded image bytes after checking them against ``limits``.

    Raises ImageTooLargeError over the limits, CorruptFileError for bytes that are not a readable image
    of a supported format (PNG, JPEG, WebP, TIFF, BMP, GIF).
    """
    if len(data) > limits.max_file_bytes:
        raise ImageTooLargeError(f"{what}: {len(data)} bytes, over the limit of {limits.max_file_bytes}")
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in _EXT_BY_PIL_FORMAT:
            raise CorruptFileError(f"{what}: unsupported image format {image.format}")
        limits.check_image(image.height, image.width, frames=getattr(image, "n_frames", 1), what=what)
        image.load()
    except Image.DecompressionBombError:
        raise ImageTooLargeError(f"{what}: too many pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise CorruptFileError(f"{what}: not a readable image ({type(exc).__name__})") from None
    return image


def sniff_image(data: bytes, *, limits: Limits = DEFAULT_LIMITS, what: str = "image") -> tuple[str, int, int]:
    """Check and decode encoded image bytes once: ``(ext, width, height)`` (errors as :func:`decode_image`)."""
    image = decode_image(data, limits=limits, what=what)
    return _EXT_BY_PIL_FORMAT[image.format or ""], image.width, image.height


def _read_limited(path: Path, limits: Limits, what: str) -> bytes:
    try:
        limits.check_file(path)
        return path.read_bytes()
    except OSError as exc:
        raise DataFormatError(f"{what}: cannot read {path} ({exc.strerror or type(exc).__name__})") from None


@dataclass(frozen=True)
class _StoredImage:
    ext: str
    width: int
    height: int


def _parse_sample(raw: str | bytes, where: str) -> Sample:
    try:
        return Sample.model_validate_json(raw)
    except ValidationError as exc:
        raise DataFormatError(f"{where}: invalid sample: {_describe(exc)}") from None


def _iter_jsonl(path: Path) -> Iterator[Sample]:
    """Samples of one JSONL file, line by line; a malformed line names the file and line number."""
    for _, sample in _iter_jsonl_numbered(path):
        yield sample


def _iter_jsonl_numbered(path: Path) -> Iterator[tuple[int, Sample]]:
    try:
        f = path.open("rb")
    except OSError as exc:
        raise DataFormatError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                yield lineno, _parse_sample(raw, f"{path}:{lineno}")


def _parquet_readable(path: Path) -> bool:
    try:
        pq.read_metadata(path)
    except (OSError, ValueError, pa.ArrowException):
        return False
    return True


def _read_columns(path: Path, columns: list[str]) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise DataFormatError(f"{path}: unreadable parquet file ({type(exc).__name__})") from None


def _shard_index(path: Path) -> tuple[str, int] | None:
    m = _SHARD_RE.match(path.name)
    return (m["split"], int(m["index"])) if m else None


def _split_shards(shards_dir: Path, split: str) -> list[Path]:
    found = [(i[1], p) for p in shards_dir.glob("*.parquet") if (i := _shard_index(p)) and i[0] == split]
    return [p for _, p in sorted(found)]


def _image_parts(images_dir: Path) -> list[Path]:
    return sorted(p for p in images_dir.glob("part-*.parquet") if _IMAGE_PART_RE.match(p.name))


# ------------------------------------------------------------------------------------------------- sinks


class _JsonlSink:
    """Writes ``samples/<split>.jsonl`` through ``.part`` files and one image file per content hash."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.samples_dir = root / "samples"
        self.images_dir = root / "images"
        self._files: dict[str, BinaryIO] = {}
        self._known: dict[str, _StoredImage] = {}

    def ref_path(self, sha: str, ext: str) -> str | None:
        return f"images/{sha[:2]}/{sha}.{ext}"

    def recover(self, seen: set[str]) -> Iterator[tuple[str, str]]:
        """Repair and commit the files of a killed writer; yield ``(split, id)`` of every stored sample.

        Tolerates every state a kill (or, before the folder lock, a second writer) can leave: a torn last
        line (cut), a ``.part`` file (committed), a ``.part`` next to a committed file (merged: committed
        lines first), an id stored twice (the first copy kept). ``seen``: ids stored so far (filled).
        """
        if not self.samples_dir.is_dir():
            return
        for path in self.samples_dir.glob(".*.jsonl.*.tmp"):  # a killed atomic rewrite
            path.unlink(missing_ok=True)
        splits: dict[str, list[Path]] = {}
        for path in sorted(self.samples_dir.iterdir()):
            if path.name.endswith(".jsonl" + _PART):
                split = _check_split(path.name[: -len(".jsonl" + _PART)])
            elif path.name.endswith(".jsonl"):
                split = _check_split(path.name[: -len(".jsonl")])
            else:
                continue
            splits.setdefault(split, []).append(path)
        for split in sorted(splits, key=_split_key):
            committed = self.samples_dir / f"{split}.jsonl"
            sources = [p for p in (committed, self.samples_dir / f"{split}.jsonl{_PART}") if p.exists()]
            for path in sources:
                cut_torn_tail(path)
            drop: set[tuple[int, int]] = set()  # (source, line number) of later copies of an id
            kept: list[str] = []
            for n, path in enumerate(sources):
                for lineno, sample in _iter_jsonl_numbered(path):
                    if sample.id in seen:
                        drop.add((n, lineno))
                        continue
                    seen.add(sample.id)
                    kept.append(sample.id)
            if drop or len(sources) > 1:
                log.warning(
                    "%s: repairing split %s (%d repeated sample(s) dropped, %d file(s) merged)",
                    self.root,
                    split,
                    len(drop),
                    len(sources),
                )
                self._rewrite(committed, sources, drop)
            elif sources[0] != committed:  # every line checked: commit it as it stands
                os.replace(sources[0], committed)
            for sid in kept:
                yield split, sid

    @staticmethod
    def _rewrite(committed: Path, sources: list[Path], drop: set[tuple[int, int]]) -> None:
        """Write the kept lines of ``sources`` as the committed file (atomically), then remove the rest."""
        fd, tmp = tempfile.mkstemp(prefix=f".{committed.name}.", suffix=".tmp", dir=committed.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                for n, path in enumerate(sources):
                    with path.open("rb") as f:
                        for lineno, raw in enumerate(f, 1):
                            if raw.strip() and (n, lineno) not in drop:
                                out.write(raw)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, committed)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        for path in sources:
            if path != committed:
                path.unlink(missing_ok=True)  # a kill before this: the next recovery drops its copies
        fsync_dir(committed.parent)

    def image_info(self, sha: str) -> _StoredImage | None:
        info = self._known.get(sha)
        if info is not None or not _SHA_RE.match(sha):
            return info
        for path in (self.images_dir / sha[:2]).glob(f"{sha}.*"):
            ext = path.suffix[1:]
            if ext in _EXT_BY_PIL_FORMAT.values():
                try:
                    with Image.open(path) as im:
                        info = _StoredImage(ext, *im.size)
                except (OSError, ValueError, SyntaxError):
                    log.warning("%s: unreadable stored image, storing it again", path)
                    return None
                self._known[sha] = info
                return info
        return None

    def put_image(self, sha: str, info: _StoredImage, data: bytes) -> None:
        atomic_write(self.images_dir / sha[:2] / f"{sha}.{info.ext}", data)
        self._known[sha] = info

    def append(self, split: str, sample: Sample) -> None:
        f = self._files.get(split)
        if f is None:
            self.samples_dir.mkdir(parents=True, exist_ok=True)
            part = self.samples_dir / f"{split}.jsonl{_PART}"
            committed = self.samples_dir / f"{split}.jsonl"
            if committed.exists():  # resumed: append to the committed lines under the temporary name
                os.replace(committed, part)
            f = self._files[split] = part.open("ab")
        f.write(sample.model_dump_json().encode("utf-8") + b"\n")
        f.flush()

    def close(self) -> None:
        for split, f in list(self._files.items()):
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(self.samples_dir / f"{split}.jsonl{_PART}", self.samples_dir / f"{split}.jsonl")
            del self._files[split]

    def abort(self) -> None:
        for f in self._files.values():
            try:
                f.close()
            except OSError:
                log.warning("could not close %s", f.name)
        self._files.clear()


@dataclass
class _OpenShard:
    index: int
    path: Path  # final name; the file is written at path + ".part"
    writer: pq.ParquetWriter
    rows: int = 0
    buffer: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _OpenImagePart:
    path: Path
    writer: pq.ParquetWriter
    nbytes: int = 0
    buffer: list[dict[str, Any]] = field(default_factory=list)
    buffer_bytes: int = 0


class _ParquetSink:
    """Writes sample shards and image table parts, each through a ``.part`` file."""

    def __init__(self, root: Path, shard_size: int) -> None:
        self.root = root
        self.shards_dir = root / "shards"
        self.images_dir = root / "images"
        self.shard_size = shard_size
        self.row_group = min(shard_size, _ROW_GROUP_ROWS)
        self._known: dict[str, _StoredImage] = {}
        self._shards: dict[str, _OpenShard] = {}
        self._next_shard: dict[str, int] = {}
        self._images: _OpenImagePart | None = None
        self._next_image_part = 0

    def ref_path(self, sha: str, ext: str) -> str | None:
        return None

    # -- resume

    def recover(self, seen: set[str]) -> Iterator[tuple[str, str]]:
        """Promote readable ``.part`` files, delete unreadable ones; yield ``(split, id)`` of stored samples.

        ``seen``: ids stored so far (filled); a shard holding an id already seen is rewritten without it.
        """
        if self.images_dir.is_dir():
            for part in sorted(self.images_dir.glob("part-*.parquet" + _PART)):
                self._promote(part, lambda p: True)
            for path in _image_parts(self.images_dir):
                table = _read_columns(path, ["sha256", "ext", "width", "height"])
                for sha, ext, w, h in zip(*(table.column(i).to_pylist() for i in range(4)), strict=True):
                    self._known[sha] = _StoredImage(ext, w, h)
                self._next_image_part = max(self._next_image_part, int(path.name[5:-8]) + 1)
        if not self.shards_dir.is_dir():
            return
        for part in sorted(self.shards_dir.glob("*.parquet" + _PART)):
            self._promote(part, self._images_known)
        for path in sorted(self.shards_dir.glob("*.parquet")):
            parsed = _shard_index(path)
            if parsed is None:
                continue
            split, index = _check_split(parsed[0]), parsed[1]
            self._next_shard[split] = max(self._next_shard.get(split, 0), index + 1)
            ids = _read_columns(path, ["id"]).column(0).to_pylist()
            keep = []
            for sid in ids:
                keep.append(sid not in seen)
                seen.add(sid)
            if not all(keep):
                log.warning("%s: dropping %d repeated sample(s)", path, keep.count(False))
                table = pq.read_table(path).filter(pa.array(keep))
                tmp = path.with_name(f".{path.name}.rewrite.tmp")
                pq.write_table(table, tmp, row_group_size=self.row_group)
                os.replace(tmp, path)
            for sid, ok in zip(ids, keep, strict=True):
                if ok:
                    yield split, sid

    def _images_known(self, part: Path) -> bool:
        shas = _read_columns(part, ["image_sha256"]).column(0).to_pylist()
        return all(s in self._known for row in shas for s in row or ())

    def _promote(self, part: Path, ok: Any) -> None:
        final = part.with_name(part.name[: -len(_PART)])
        if _parquet_readable(part) and not final.exists() and ok(part):
            os.replace(part, final)
        else:
            log.warning(
                "%s: incomplete file left by a crash, deleting it (its rows will be re-imported)", part
            )
            part.unlink()

    # -- images

    def image_info(self, sha: str) -> _StoredImage | None:
        return self._known.get(sha)

    def put_image(self, sha: str, info: _StoredImage, data: bytes) -> None:
        part = self._images
        if part is None:
            self.images_dir.mkdir(parents=True, exist_ok=True)
            path = self.images_dir / f"part-{self._next_image_part:05d}.parquet"
            self._next_image_part += 1
            writer = pq.ParquetWriter(str(path) + _PART, _IMAGE_SCHEMA, compression="none")
            part = self._images = _OpenImagePart(path, writer)
        row = {"sha256": sha, "ext": info.ext, "width": info.width, "height": info.height, "bytes": data}
        part.buffer.append(row)
        part.buffer_bytes += len(data)
        self._known[sha] = info
        if len(part.buffer) >= _IMAGE_GROUP_ROWS or part.buffer_bytes >= _IMAGE_GROUP_BYTES:
            self._flush_images(part)
        if part.nbytes >= _IMAGE_PART_BYTES:
            self._commit_images()

    def _flush_images(self, part: _OpenImagePart) -> None:
        if part.buffer:
            part.writer.write_table(pa.Table.from_pylist(part.buffer, schema=_IMAGE_SCHEMA))
            part.nbytes += part.buffer_bytes
            part.buffer, part.buffer_bytes = [], 0

    def _commit_images(self) -> None:
        part = self._images
        if part is not None:
            self._flush_images(part)
            part.writer.close()
            os.replace(str(part.path) + _PART, part.path)
            self._images = None

    # -- samples

    def append(self, split: str, sample: Sample) -> None:
        shard = self._shards.get(split)
        if shard is None:
            self.shards_dir.mkdir(parents=True, exist_ok=True)
            index = self._next_shard.get(split, 0)
            self._next_shard[split] = index + 1
            path = self.shards_dir / f"{split}-{index:05d}.parquet"
            writer = pq.ParquetWriter(str(path) + _PART, _SAMPLE_SCHEMA, compression="zstd")
            shard = self._shards[split] = _OpenShard(index, path, writer)
        shard.buffer.append(
            {
                "id": sample.id,
                "task": str(sample.task),
                "split": split,
                "modality": sample.meta.modality,
                "body_part": sample.meta.body_part,
                "source": sample.meta.source,
                "image_sha256": [ref.sha256 for ref in sample.images],
                "sample_json": sample.model_dump_json(),
            }
        )
        shard.rows += 1
        if len(shard.buffer) >= self.row_group:
            self._flush_shard(shard)
        if shard.rows >= self.shard_size:
            self._commit_shard(split)

    def _flush_shard(self, shard: _OpenShard) -> None:
        if shard.buffer:
            shard.writer.write_table(pa.Table.from_pylist(shard.buffer, schema=_SAMPLE_SCHEMA))
            shard.buffer = []

    def _commit_shard(self, split: str) -> None:
        shard = self._shards.pop(split)
        self._commit_images()  # images first: a committed shard never refers to an uncommitted image
        self._flush_shard(shard)
        shard.writer.close()
        os.replace(str(shard.path) + _PART, shard.path)

    def close(self) -> None:
        self._commit_images()
        for split in list(self._shards):
            self._commit_shard(split)

    def abort(self) -> None:
        """Flush and close what is open, leaving ``.part`` files for a resume to check."""
        parts: list[tuple[Any, Any]] = []
        if self._images is not None:
            parts.append((self._images, self._flush_images))
        parts.extend((s, self._flush_shard) for s in self._shards.values())
        for part, flush in parts:
            try:
                flush(part)
                part.writer.close()
            except (OSError, ValueError, pa.ArrowException):
                log.warning("could not finish %s%s; a resume will check it", part.path, _PART)
        self._images = None
        self._shards.clear()


# ------------------------------------------------------------------------------------------------ writer


def _read_manifest(path: Path) -> Manifest:
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise DataFormatError(
            f"{path.parent}: no {MANIFEST} (not a dataset folder, or its writer did not finish)"
        ) from None
    except OSError as exc:
        raise DataFormatError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    try:
        manifest = Manifest.model_validate_json(text)
    except ValidationError as exc:
        raise DataFormatError(f"{path}: invalid manifest: {_describe(exc)}") from None
    except DataFormatError as exc:
        raise DataFormatError(f"{path}: invalid manifest: {exc}") from None
    if manifest.schema_version > SCHEMA_VERSION:
        raise DataFormatError(
            f"{path}: schema version {manifest.schema_version} is newer than this EMMA reads ({SCHEMA_VERSION})"
        )
    return manifest


class DatasetWriter:
    """Write a dataset folder; use as a context manager (the manifest is written on a clean exit).

    ``add(sample, images)`` stores the images by content hash, points ``sample.images`` at them and
    appends the sample to the split ``sample.meta.split`` (default ``"train"``). With ``resume=True`` an
    existing or crashed dataset is reopened and ``has(id)`` tells which samples are already stored.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        name: str,
        license: str | None = None,
        source: str | None = None,
        format: DatasetFormat = "jsonl",
        shard_size: int = 10_000,
        resume: bool = False,
        description: str | None = None,
        extra: dict[str, Any] | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        if format not in ("jsonl", "parquet"):
            raise DataFormatError(f"unknown dataset format {format!r} (jsonl or parquet)")
        if shard_size < 1:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        self.root = Path(root)
        self.format: DatasetFormat = format
        self.limits = limits
        if self.root.exists() and not self.root.is_dir():
            raise DataFormatError(f"{self.root}: not a folder")
        self.root.mkdir(parents=True, exist_ok=True)

        previous = self._previous_manifest()
        on_disk = previous.format if previous is not None else self._layout_on_disk()
        if on_disk is not None and not resume:
            raise DataFormatError(
                f"{self.root} already holds a dataset; pass resume=True to continue it or choose an empty folder"
            )
        if on_disk not in (None, format):
            raise DataFormatError(f"{self.root} holds a {on_disk} dataset, not {format}")

        self.name = name
        self.license = license if license is not None else (previous.license if previous else None)
        self.source = source if source is not None else (previous.source if previous else None)
        self.description = (
            description if description is not None else (previous.description if previous else "")
        )
        self.extra: dict[str, Any] = dict(
            extra if extra is not None else (previous.extra if previous else {})
        )
        self._created = previous.created if previous is not None else datetime.now(UTC)

        self._sink: _JsonlSink | _ParquetSink = (
            _JsonlSink(self.root) if format == "jsonl" else _ParquetSink(self.root, shard_size)
        )
        self._ids: set[str] = set()
        self._counts: dict[str, int] = {}
        if resume:  # the sink drops later copies of an id (see its recover): never refused
            for split, _sid in self._sink.recover(self._ids):
                self._counts[split] = self._counts.get(split, 0) + 1
        self._started = False
        self._closed = False

    def _previous_manifest(self) -> Manifest | None:
        for name in (MANIFEST, _RESUME_MANIFEST):
            if (self.root / name).exists():
                return _read_manifest(self.root / name)
        return None

    def _layout_on_disk(self) -> DatasetFormat | None:
        """The format of data left without a manifest (a crashed writer), or None for an empty folder."""
        if (shards := self.root / "shards").is_dir() and any(shards.iterdir()):
            return "parquet"
        if (images := self.root / "images").is_dir() and any(images.glob("part-*.parquet*")):
            return "parquet"
        if (samples := self.root / "samples").is_dir() and any(samples.iterdir()):
            return "jsonl"
        if (images := self.root / "images").is_dir() and any(images.iterdir()):
            return "jsonl"
        return None

    # -- context manager

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- queries

    def has(self, sample_id: str) -> bool:
        """Whether a sample with this id is already stored (in this run or a resumed one)."""
        return sample_id in self._ids

    def has_image(self, sha256: str) -> bool:
        """Whether an image with this content hash is already stored."""
        return self._sink.image_info(sha256) is not None

    @property
    def counts(self) -> dict[str, int]:
        """Samples stored so far, by split."""
        return dict(self._counts)

    # -- writing

    def add(self, sample: Sample, images: Sequence[ImageInput] = ()) -> Sample:
        """Store ``images`` (paths, encoded bytes or PIL images) and append ``sample``; return it as stored.

        With ``images`` given, ``sample.images`` must be empty or of the same length (its provenance is
        kept). Without, every ref of ``sample.images`` must carry the sha256 of an image already stored.
        """
        if self._closed:
            raise DataFormatError(f"{self.root}: the writer is closed")
        if sample.id in self._ids:
            raise DataFormatError(f"{self.root}: duplicate sample id {sample.id!r}")
        split = _check_split(sample.meta.split or DEFAULT_SPLIT)
        refs, new_images = self._prepare_images(sample, images)
        data = sample.model_dump()
        data["images"] = [ref.model_dump() for ref in refs]
        data["meta"]["split"] = split
        try:
            stored = Sample.model_validate(data)
        except ValidationError as exc:
            raise DataFormatError(f"sample {sample.id!r}: {_describe(exc)}") from None
        self._start()
        for sha, info, blob in new_images:  # only once the sample is valid: no orphan images
            if self._sink.image_info(sha) is None:
                self._sink.put_image(sha, info, blob)
        self._sink.append(split, stored)
        self._ids.add(stored.id)
        self._counts[split] = self._counts.get(split, 0) + 1
        return stored

    def _start(self) -> None:
        """Before the first change: move a previous manifest aside (it no longer describes the data)."""
        if not self._started:
            if (self.root / MANIFEST).exists():
                os.replace(self.root / MANIFEST, self.root / _RESUME_MANIFEST)
            self._started = True

    def _prepare_images(
        self, sample: Sample, images: Sequence[ImageInput]
    ) -> tuple[list[ImageRef], list[tuple[str, _StoredImage, bytes]]]:
        """The sample's new refs, and the images among them not stored yet (hash, info, bytes)."""
        given = sample.images
        refs: list[ImageRef] = []
        if not images:
            for i, ref in enumerate(given):
                info = self._sink.image_info(ref.sha256) if ref.sha256 else None
                if info is None or ref.sha256 is None:
                    raise DataFormatError(
                        f"sample {sample.id!r}: image {i} is not stored in this dataset; pass it in images="
                    )
                refs.append(self._ref(ref.sha256, info, ref))
            return refs, []
        if given and len(given) != len(images):
            raise DataFormatError(
                f"sample {sample.id!r}: {len(images)} images given for {len(given)} image refs"
            )
        new: list[tuple[str, _StoredImage, bytes]] = []
        for i, item in enumerate(images):
            sha, info, blob = self._prepare(item, what=f"sample {sample.id!r} image {i}")
            refs.append(self._ref(sha, info, given[i] if given else None))
            if blob is not None:
                new.append((sha, info, blob))
        return refs, new

    def _ref(self, sha: str, info: _StoredImage, old: ImageRef | None) -> ImageRef:
        return ImageRef(
            path=self._sink.ref_path(sha, info.ext),
            sha256=sha,
            width=info.width,
            height=info.height,
            provenance=old.provenance if old is not None else None,
        )

    def _prepare(self, item: ImageInput, what: str) -> tuple[str, _StoredImage, bytes | None]:
        """Hash, check and measure one image; its bytes too when this dataset does not hold it yet."""
        if isinstance(item, Image.Image):
            self.limits.check_image(item.height, item.width, what=what)
            data = encode_png(item)
            sha = hashlib.sha256(data).hexdigest()
            known = self._sink.image_info(sha)
            info = known or _StoredImage("png", item.width, item.height)
        else:
            if isinstance(item, (bytes, bytearray, memoryview)):
                data = bytes(item)
            elif isinstance(item, (str, os.PathLike)):
                data = _read_limited(Path(item), self.limits, what)
            else:
                raise TypeError(f"{what}: expected a path, bytes or a PIL image, got {type(item).__name__}")
            sha = hashlib.sha256(data).hexdigest()
            known = self._sink.image_info(sha)
            info = known or _StoredImage(*sniff_image(data, limits=self.limits, what=what))
        return sha, info, (data if known is None else None)

    def close(self) -> None:
        """Commit every file, then write the manifest."""
        if self._closed:
            return
        self._sink.close()
        manifest = Manifest(
            name=self.name,
            description=self.description,
            license=self.license,
            source=self.source,
            format=self.format,
            created=self._created,
            counts={s: self._counts[s] for s in sorted(self._counts, key=_split_key)},
            extra=self.extra,
        )
        atomic_write(
            self.root / MANIFEST, manifest.model_dump_json(indent=2).encode("utf-8") + b"\n", fsync=True
        )
        (self.root / _RESUME_MANIFEST).unlink(missing_ok=True)
        self._closed = True

    def abort(self) -> None:
        """Stop without a manifest, leaving temporary files for ``resume=True`` to recover."""
        if not self._closed:
            self._closed = True
            self._sink.abort()


# ------------------------------------------------------------------------------------------------ reader


class Dataset:
    """A dataset folder opened for reading; samples are streamed, never loaded all at once."""

    def __init__(
        self, root: str | os.PathLike[str], manifest: Manifest, *, limits: Limits = DEFAULT_LIMITS
    ) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.limits = limits
        self._image_index: dict[str, tuple[int, int, int]] | None = None
        self._image_parts: list[tuple[Path, pq.FileMetaData]] = []
        self._group_cache: OrderedDict[tuple[int, int], pa.ChunkedArray] = OrderedDict()

    def __repr__(self) -> str:
        return f"Dataset({str(self.root)!r}, name={self.name!r}, format={self.format!r}, counts={self.manifest.counts})"

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def format(self) -> DatasetFormat:
        return self.manifest.format

    @property
    def splits(self) -> list[str]:
        return list(self.manifest.counts)

    def count(self, split: str | None = None) -> int:
        """Samples in ``split`` (all splits when None), from the manifest."""
        if split is None:
            return sum(self.manifest.counts.values())
        return self.manifest.counts[self._known_split(split)]

    def _known_split(self, split: str) -> str:
        if split not in self.manifest.counts:
            raise DataFormatError(
                f"{self.root}: no split {split!r} (splits: {', '.join(self.splits) or 'none'})"
            )
        return split

    def __iter__(self) -> Iterator[Sample]:
        return self.iter_samples()

    def iter_samples(self, split: str | None = None) -> Iterator[Sample]:
        """Stream the samples of ``split`` (all splits, in manifest order, when None)."""
        splits = self.splits if split is None else [self._known_split(split)]
        return self._iter(splits)

    def _iter(self, splits: list[str]) -> Iterator[Sample]:
        for split in splits:
            if self.format == "jsonl":
                path = self.root / "samples" / f"{split}.jsonl"
                if not path.exists() and self.manifest.counts[split] == 0:
                    continue
                yield from _iter_jsonl(path)
            else:
                yield from self._iter_parquet(split)

    def _iter_parquet(self, split: str) -> Iterator[Sample]:
        shards = _split_shards(self.root / "shards", split)
        if not shards and self.manifest.counts[split] > 0:
            raise DataFormatError(f"{self.root}: no shards for split {split!r}")
        for path in shards:
            try:
                pf = pq.ParquetFile(path)
            except (OSError, ValueError, pa.ArrowException) as exc:
                raise DataFormatError(f"{path}: unreadable shard ({type(exc).__name__})") from None
            with pf:
                row = 0
                for batch in pf.iter_batches(batch_size=_READ_BATCH_ROWS, columns=["sample_json"]):
                    for text in batch.column(0).to_pylist():
                        row += 1
                        yield _parse_sample(text or "", f"{path}: row {row}")

    # -- images

    def image_path(self, ref: ImageRef) -> Path:
        """The file of an image of a JSONL dataset (always inside the dataset folder)."""
        if self.format != "jsonl":
            raise DataFormatError(
                f"{self.root}: a parquet dataset keeps images in images/part-*.parquet; use image_bytes()"
            )
        if ref.path is not None:
            rel = Path(ref.path)
            root = self.root.resolve()
            if rel.is_absolute() or not (root / rel).resolve().is_relative_to(root):
                raise DataFormatError(f"{self.root}: image path {ref.path!r} points outside the dataset")
            return self.root / rel
        assert ref.sha256 is not None  # ImageRef guarantees a path or a sha256
        if _SHA_RE.match(ref.sha256):
            for path in (self.root / "images" / ref.sha256[:2]).glob(f"{ref.sha256}.*"):
                return path
        raise DataFormatError(f"{self.root}: no stored image with sha256 {ref.sha256[:16]}...")

    def image_bytes(self, ref: ImageRef) -> bytes:
        """The encoded bytes of an image, checked against its sha256."""
        if self.format == "jsonl":
            path = self.image_path(ref)
            data = _read_limited(path, self.limits, "image")
            where = str(path)
        else:
            if ref.sha256 is None:
                raise DataFormatError(f"{self.root}: image ref without sha256 in a parquet dataset")
            data = self._parquet_image(ref.sha256)
            where = f"{self.root}: image {ref.sha256[:16]}..."
        if ref.sha256 is not None and hashlib.sha256(data).hexdigest() != ref.sha256:
            raise CorruptFileError(f"{where}: content does not match its sha256")
        return data

    def open_image(self, ref: ImageRef) -> Image.Image:
        """The decoded image (bounded by the dataset's limits)."""
        return decode_image(self.image_bytes(ref), limits=self.limits, what="image")

    def _parquet_image(self, sha: str) -> bytes:
        index = self._index()
        loc = index.get(sha)
        if loc is None:
            raise DataFormatError(f"{self.root}: no stored image with sha256 {sha[:16]}...")
        part, group, row = loc
        column = self._group_cache.get((part, group))
        if column is None:
            path, meta = self._image_parts[part]
            with pq.ParquetFile(path, metadata=meta) as pf:
                column = pf.read_row_group(group, columns=["bytes"]).column(0)
            self._group_cache[(part, group)] = column
            while len(self._group_cache) > _IMAGE_GROUP_CACHE:
                self._group_cache.popitem(last=False)
        else:
            self._group_cache.move_to_end((part, group))
        value = column[row].as_py()
        assert isinstance(value, bytes)
        return value

    def _index(self) -> dict[str, tuple[int, int, int]]:
        if self._image_index is None:
            index: dict[str, tuple[int, int, int]] = {}
            parts: list[tuple[Path, pq.FileMetaData]] = []
            for path in _image_parts(self.root / "images"):
                try:
                    with pq.ParquetFile(path) as pf:
                        for group in range(pf.metadata.num_row_groups):
                            shas = pf.read_row_group(group, columns=["sha256"]).column(0).to_pylist()
                            for row, sha in enumerate(shas):
                                index.setdefault(sha, (len(parts), group, row))
                        parts.append((path, pf.metadata))
                except (OSError, ValueError, pa.ArrowException) as exc:
                    raise DataFormatError(f"{path}: unreadable image part ({type(exc).__name__})") from None
            self._image_parts, self._image_index = parts, index
        return self._image_index


def open_dataset(root: str | os.PathLike[str], *, limits: Limits = DEFAULT_LIMITS) -> Dataset:
    """Open a dataset folder (DataFormatError if its manifest is missing or invalid)."""
    root = Path(root)
    return Dataset(root, _read_manifest(root / MANIFEST), limits=limits)


def convert(
    src_root: str | os.PathLike[str],
    dst_root: str | os.PathLike[str],
    format: DatasetFormat,
    *,
    shard_size: int = 10_000,
    limits: Limits = DEFAULT_LIMITS,
) -> Dataset:
    """Copy a dataset into a new folder in ``format`` (JSONL ↔ Parquet), streaming; return the copy."""
    src = open_dataset(src_root, limits=limits)
    m = src.manifest
    with DatasetWriter(
        dst_root,
        name=m.name,
        license=m.license,
        source=m.source,
        format=format,
        shard_size=shard_size,
        description=m.description,
        extra=m.extra,
        limits=limits,
    ) as writer:
        for sample in src.iter_samples():
            if all(ref.sha256 and writer.has_image(ref.sha256) for ref in sample.images):
                writer.add(sample)
            else:
                writer.add(sample, [src.image_bytes(ref) for ref in sample.images])
    return open_dataset(dst_root, limits=limits)
