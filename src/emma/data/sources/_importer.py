"""The importers' one write loop: the options they share, the report, and :func:`import_records`.

An importer reads and checks its release first (a bad layout raises
:class:`~emma.errors.DataFormatError` before anything is written), then hands :func:`import_records`
its dataset's identity (:class:`DatasetInfo`), the records it found and a function that handles one
record: it turns the record into a sample with its source images and adds them to the run
(:meth:`ImportRun.add`), or says why the record is not imported (:meth:`ImportRun.skip`: unusable;
:meth:`ImportRun.filter`: left out on purpose). The loop, written once here, stops at ``limit``;
:class:`ImportRun` checks each image's header against :class:`~emma.io.limits.Limits` before the store
reads it, skips (and counts) samples whose images are missing or unusable, honours ``resume``, and
reports progress.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self, TypedDict, TypeVar

from pydantic import BaseModel, Field

from emma.data.schema import Sample
from emma.data.sources._common import (
    CORRUPT_IMAGE,
    DUPLICATE_ID,
    IMAGE_TOO_LARGE,
    MISSING_IMAGE,
    ImageInput,
    probe_image,
)
from emma.data.store import DatasetFormat, DatasetWriter
from emma.errors import CorruptFileError, ImageTooLargeError
from emma.io.limits import DEFAULT_LIMITS, Limits

#: ``progress(done, total)``: records handled so far and the total (``None`` when unknown).
ProgressFn = Callable[[int, int | None], None]

R = TypeVar("R")


@dataclass(frozen=True)
class ImportOptions:
    """What every importer takes besides its source and output folders."""

    limit: int | None = None  # stop once this many samples are in the output
    resume: bool = False  # continue an unfinished import into the same folder
    progress: ProgressFn | None = None
    limits: Limits = DEFAULT_LIMITS  # bounds on each source image
    format: DatasetFormat = "jsonl"  # store format of the output


class ImportKwargs(TypedDict, total=False):
    """:class:`ImportOptions` as keyword arguments: ``import_<name>(src, out, **options)``."""

    limit: int | None
    resume: bool
    progress: ProgressFn | None
    limits: Limits
    format: DatasetFormat


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset's identity, as recorded in the report and the output's manifest."""

    name: str
    license: str | None
    citation: str | None  # the manifest's "source"; ``None``: the source folder


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
    limited: bool = False  # stopped early because of ``limit`` (a record was left unread)
    notes: list[str] = Field(default_factory=list)

    @property
    def total(self) -> int:
        """Samples in the output after this run (written + resumed)."""
        return self.written + self.resumed


def import_records(
    info: DatasetInfo,
    src: Path,
    out: Path,
    options: ImportKwargs,
    records: Iterable[R],
    handle: Callable[[ImportRun, R], None],
    *,
    total: int | None = None,
    notes: Sequence[str] = (),
) -> ImportReport:
    """Import ``records`` into the store at ``out``, each through ``handle(run, record)``.

    ``handle`` adds the record's sample (:meth:`ImportRun.add`) or counts why not (:meth:`ImportRun.skip`,
    :meth:`ImportRun.filter`). ``options`` are the importer's keyword options (:class:`ImportOptions`).
    ``records`` is read lazily, and no further once ``limit`` samples are in the output (the report is
    then ``limited``: a record was left unread). ``total`` is the number of records, for progress;
    ``notes`` open the report's notes.
    """
    report = ImportReport(
        dataset=info.name, src=str(src), out=str(out), license=info.license, notes=list(notes)
    )
    with ImportRun(report, out, ImportOptions(**options), source=info.citation, total=total) as run:
        for record in records:
            if run.full:
                break
            handle(run, record)
    return report


class ImportRun:
    """One import into a store: checks images, skips and counts bad records, honours limit/resume.

    :func:`import_records` uses it as a context manager around the record loop and checks :attr:`full`
    before each record.
    """

    def __init__(
        self,
        report: ImportReport,
        out: Path,
        options: ImportOptions,
        *,
        source: str | None = None,
        total: int | None = None,
        shard_size: int = 10_000,
    ) -> None:
        if options.limit is not None and options.limit < 0:
            raise ValueError(f"limit must be >= 0, got {options.limit}")
        self.report = report
        self.out = out
        self.limit = options.limit
        self.resume = options.resume
        self.total = total
        self.progress = options.progress
        self.limits = options.limits
        self.format = options.format
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
