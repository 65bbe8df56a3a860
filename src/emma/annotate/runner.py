"""The resumable annotation runner: steps over a dataset, a teacher, a durable store, an output dataset.

What a step is (``step(item, images, ask) -> list[Item]``) is in :mod:`emma.annotate.steps`.
``ask(messages, *, call="main", sampling=None) -> str`` is bound by the runner to the item and step:
the answer is looked up in the durable store under
``(item content hash, step name, teacher, step prompt hash, call, request digest)`` and only asked of
the teacher when missing; a new answer is written to the store before ``ask`` returns. The item content
hash is the SHA-256 of the item's sample JSON (id included) as it enters the step, and the request
digest covers the messages (roles, text, image pixels) and the sampling settings, so a key names
exactly one request. ``call`` tells apart several calls of one step on one item.

:func:`run_pipeline` streams the selected splits of the source dataset in order through the steps:

- **Bounded concurrency.** At most ``concurrency`` teacher calls are in flight (the teacher's own
  bound: a teacher built from a spec gets ``concurrency``; an in-process teacher batches that many).
  A few more worker threads than that (:func:`worker_threads`) each carry one input through all
  steps, so images are decoded and requests prepared while the teacher is busy and its slots never
  idle. Results are written strictly in input order through a window of ``window`` inputs, so memory
  is bounded by the window, never by the dataset.
- **Resumable, exactly once.** After every output of an input is written, a *done marker* (the output
  ids) goes to the store. A rerun into the same output folder (``DatasetWriter(resume=True)`` keeps
  what was written) skips inputs with a marker whose outputs are all present, without decoding their
  images; any other input is carried through the steps again with every answer it already had coming
  from the store (no teacher call), and only its outputs not yet written are added. With a
  deterministic teacher the result is the same as an uninterrupted run's, after ``kill -9`` at any
  point.
- **Never fatal for the batch.** Unreadable images (``unreadable_image``), teacher failures (the
  :class:`~emma.annotate.teacher.TeacherError` reason: ``timeout``, ``rate_limited``,
  ``server_error``, ``connection``, ``circuit_open``, ``input``, ``engine``) and steps that raise
  (``step_error``) reject the item; rejected items are written to the split ``rejected`` with
  ``meta.extra["rejected"] = {"reason", "step", "detail", "split"}`` and logged by sample id with the
  reason code only. Teacher failures are not stored, so a later run (a new output folder with the same
  ``store``) asks those calls again and reuses every answer already obtained.
- **Statistics.** A rich progress bar (items/s, ETA, accepted/rejected) while running; at the end a
  table of accepted / rejected by reason and teacher calls, and ``run_stats.json`` in the output folder.
- **Ray.** ``backend="ray"`` runs the same steps as Ray Data ``map_batches`` over actor workers (each
  with its own teacher, store segment and ``concurrency`` threads), reading the source files with Ray
  Data in order (``preserve_order``); this process writes the outputs in order as they stream back.

Why one file (~950 lines): the local and Ray backends share the outcome, the ordered writer and the
resume keys defined here; what a step needs is in steps.py, the durable store in store.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from emma.annotate.steps import BoundAsk, Item, Step, item_hash
from emma.annotate.store import ResultStore, result_key
from emma.annotate.teacher import Teacher, TeacherError, load_teacher, teacher_name
from emma.data.durable import LOCK_FILE, atomic_write, exclusive_folder
from emma.data.schema import Sample
from emma.data.store import Dataset, DatasetFormat, DatasetWriter, decode_image, encode_png, open_dataset
from emma.errors import EmmaError, InputError

log = logging.getLogger(__name__)

__all__ = [
    "REJECTED_SPLIT",
    "RunStats",
    "TeacherConfig",
    "check_out_folder",
    "run_pipeline",
]

REJECTED_SPLIT = "rejected"
RUN_FILE = "annotate_run.json"
STATS_FILE = "run_stats.json"
DEFAULT_STORE = "teacher_store"
_FREE_NAMES = frozenset({DEFAULT_STORE, LOCK_FILE})  # what a folder may hold before a run starts
Backend = Literal["local", "ray"]


# ------------------------------------------------------------------------------------------- outcomes


@dataclass
class _Outcome:
    """Everything one input produced, ready to write: items in order, image bytes of the input."""

    index: int
    input_id: str
    done_key: str
    items: list[Item] = field(default_factory=list)
    input_images: dict[str, bytes] = field(default_factory=dict)  # sha → encoded bytes (as stored)
    skip: list[str] | None = None  # done in a previous run: its output ids
    counters: Counter[str] = field(default_factory=Counter)


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


def _where(exc: BaseException) -> str:
    """``file.py:line`` of the innermost frame of an exception (no values, no message)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    last = frames[-1]
    return f"{Path(last.filename).name}:{last.lineno}"


@dataclass(frozen=True)
class _Context:
    steps: tuple[Step, ...]
    fingerprint: str


def _done_key(ctx: _Context, input_sha: str) -> str:
    return result_key("done", ctx.fingerprint, input_sha)


def _process(
    ctx: _Context,
    index: int,
    sample: Sample,
    input_sha: str,
    load_bytes: Callable[[Sample], list[bytes]],
    teacher: Teacher,
    store: ResultStore,
    flight: threading.Semaphore | None = None,
) -> _Outcome:
    """Carry one input through every step (in a worker thread or a Ray actor).

    ``flight``: the run's bound on teacher calls asked and not yet stored (see :func:`_run_local`).
    """
    outcome = _Outcome(index, sample.id, _done_key(ctx, input_sha))
    try:
        blobs = load_bytes(sample)
        decoded = [decode_image(b, what="image").convert("RGB") for b in blobs]
    except EmmaError as exc:
        log.warning("sample %s: unreadable image (%s)", sample.id, type(exc).__name__)
        outcome.items.append(Item(sample, "unreadable_image", _one_line(type(exc).__name__), step="load"))
        return outcome
    by_sha: dict[str, Image.Image] = {}
    for ref, blob, image in zip(sample.images, blobs, decoded, strict=True):
        sha = ref.sha256 or hashlib.sha256(blob).hexdigest()
        outcome.input_images[sha] = blob
        by_sha[sha] = image

    frontier = [Item(sample)]
    rejected: list[Item] = []
    for step in ctx.steps:
        nxt: list[Item] = []
        for item in frontier:
            for produced in _run_step(step, item, by_sha, teacher, store, outcome.counters, flight):
                if produced.rejected is not None:
                    produced.step = produced.step or step.name
                    rejected.append(produced)
                else:
                    nxt.append(produced)
        frontier = nxt
    outcome.items = frontier + rejected
    return outcome


def _item_images(item: Item, by_sha: dict[str, Image.Image]) -> list[Image.Image]:
    if item.images is not None:
        return item.images
    images = []
    for i, ref in enumerate(item.sample.images):
        image = by_sha.get(ref.sha256 or "")
        if image is None:
            raise InputError(
                f"image {i} of item {item.sample.id!r} is not an image of its input; set Item.images"
            )
        images.append(image)
    return images


def _run_step(
    step: Step,
    item: Item,
    by_sha: dict[str, Image.Image],
    teacher: Teacher,
    store: ResultStore,
    counters: Counter[str],
    flight: threading.Semaphore | None = None,
) -> list[Item]:
    sid = item.sample.id
    try:
        images = _item_images(item, by_sha)
        ask = BoundAsk(teacher, store, step, item_hash(item.sample), counters, flight)
        produced = step(item, images, ask)
        if not isinstance(produced, list) or not all(isinstance(p, Item) for p in produced):
            raise TypeError(f"step {step.name!r} returned {type(produced).__name__}, not a list of Item")
        if item.images is not None:  # the images of an item travel with what is made from it
            for p in produced:
                if p.images is None:
                    p.images = item.images
        return produced
    except TeacherError as exc:
        log.warning("sample %s: step %s: teacher failed (%s)", sid, step.name, exc.reason)
        return [Item(item.sample, exc.reason, _one_line(str(exc)), images=item.images, step=step.name)]
    except EmmaError as exc:
        log.warning("sample %s: step %s: %s", sid, step.name, type(exc).__name__)
        return [Item(item.sample, "step_error", _one_line(str(exc)), images=item.images, step=step.name)]
    except Exception as exc:  # noqa: BLE001 — a bug in a step must not end a multi-day batch
        where = _where(exc)
        log.error("sample %s: step %s raised %s at %s", sid, step.name, type(exc).__name__, where)
        detail = f"{type(exc).__name__} at {where}"
        return [Item(item.sample, "step_error", detail, images=item.images, step=step.name)]


def _as_rejected(item: Item) -> Sample:
    """The sample written to the ``rejected`` split (its reason in ``meta.extra["rejected"]``)."""
    s = item.sample
    extra = dict(s.meta.extra)
    extra["rejected"] = {
        "reason": item.rejected,
        "step": item.step,
        "detail": item.detail,
        "split": s.meta.split,
    }
    return s.model_copy(update={"meta": s.meta.model_copy(update={"split": REJECTED_SPLIT, "extra": extra})})


def _without_images(sample: Sample) -> Sample:
    """A rejected sample whose images cannot be stored: refs and boxes move to ``extra["rejected"]``."""
    extra = dict(sample.meta.extra)
    info = dict(extra.get("rejected") or {})
    info["images"] = [ref.model_dump(mode="json") for ref in sample.images]
    if sample.gold.boxes:
        info["boxes"] = [b.model_dump(mode="json") for b in sample.gold.boxes]
    extra["rejected"] = info
    return sample.model_copy(
        update={
            "images": [],
            "turns": [t.model_copy(update={"images": []}) for t in sample.turns],
            "gold": sample.gold.model_copy(update={"boxes": []}),
            "meta": sample.meta.model_copy(update={"extra": extra}),
        }
    )


# ----------------------------------------------------------------------------------------------- stats


@dataclass
class RunStats:
    """What a run did; written as ``run_stats.json`` in the output folder."""

    out: str
    backend: str
    teacher: str
    steps: list[dict[str, str]]
    concurrency: int
    inputs: int = 0  # inputs read from the source
    skipped: int = 0  # inputs done in a previous run (skipped without work)
    processed: int = 0  # inputs carried through the steps in this run
    accepted: int = 0  # accepted outputs written
    rejected: dict[str, int] = field(default_factory=dict)  # rejected outputs written, by reason
    rejected_by_step: dict[str, int] = field(default_factory=dict)
    already_written: int = 0  # outputs found written by a previous run (resume)
    duplicate_ids: int = 0  # outputs whose id another output already had (not written)
    teacher_calls: int = 0  # answers asked of the teacher in this run
    cached_answers: int = 0  # answers read from the store
    teacher_stats: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0
    items_per_s: float = 0.0  # inputs processed (not skipped) per second
    completed: bool = False

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def to_json(self) -> str:
        data = asdict(self)
        data["rejected_total"] = self.rejected_total
        return json.dumps(data, indent=2, sort_keys=False) + "\n"


# ---------------------------------------------------------------------------------------------- writer


class _OutputWriter:
    """Writes outcomes in order into the output dataset and the done markers into the store."""

    def __init__(self, writer: DatasetWriter, store: ResultStore, stats: RunStats, resumed: bool) -> None:
        self.writer = writer
        self.store = store
        self.stats = stats
        self.resumed = resumed

    def skip_ok(self, ids: list[str]) -> bool:
        return all(self.writer.has(i) for i in ids)

    def write(self, outcome: _Outcome, fetch: Callable[[str], bytes]) -> None:
        st = self.stats
        st.teacher_calls += outcome.counters["asked"]
        st.cached_answers += outcome.counters["cached"]
        if outcome.skip is not None:
            st.skipped += 1
            return
        st.processed += 1
        seen: set[str] = set()
        written: list[str] = []
        for item in outcome.items:
            sid = item.sample.id
            if sid in seen:
                st.duplicate_ids += 1
                log.error(
                    "sample %s: produced twice from input %s; later copy not written", sid, outcome.input_id
                )
                continue
            seen.add(sid)
            if self.writer.has(sid):
                if self.resumed:
                    st.already_written += 1
                    written.append(sid)
                    self._count(item)
                else:
                    st.duplicate_ids += 1
                    log.error("sample %s: id already written for an earlier input; not written again", sid)
                continue
            item = self._add(item, outcome, fetch)
            if item is not None:
                written.append(sid)
                self._count(item)
        self.store.put_done(outcome.done_key, written)

    def _count(self, item: Item) -> None:
        st = self.stats
        if item.rejected is None:
            st.accepted += 1
        else:
            log.info("sample %s: rejected at %s (%s)", item.sample.id, item.step, item.rejected)
            st.rejected[item.rejected] = st.rejected.get(item.rejected, 0) + 1
            st.rejected_by_step[item.step] = st.rejected_by_step.get(item.step, 0) + 1

    def _add(self, item: Item, outcome: _Outcome, fetch: Callable[[str], bytes]) -> Item | None:
        """Write one item (accepted, or to the rejected split); an unwritable one is written rejected."""
        sample = item.sample if item.rejected is None else _as_rejected(item)
        try:
            self._add_sample(sample, item.images, outcome, fetch)
            return item
        except EmmaError as exc:
            log.warning("sample %s: cannot be written (%s)", sample.id, type(exc).__name__)
            failed = Item(item.sample, "unwritable", _one_line(str(exc)), step="write")
            if item.rejected is not None:
                failed = Item(item.sample, item.rejected, item.detail, step=item.step)
        try:
            self.writer.add(_without_images(_as_rejected(failed)))
            return failed
        except EmmaError as exc:
            log.error("sample %s: not written at all (%s)", sample.id, type(exc).__name__)
            return None

    def _add_sample(
        self,
        sample: Sample,
        images: list[Image.Image] | None,
        outcome: _Outcome,
        fetch: Callable[[str], bytes],
    ) -> None:
        if images is not None:
            if len(sample.images) != len(images):  # refs of new images are made by the writer
                sample = sample.model_copy(update={"images": []})
            self.writer.add(sample, images)
            return
        if all(ref.sha256 and self.writer.has_image(ref.sha256) for ref in sample.images):
            self.writer.add(sample)
            return
        blobs: list[bytes] = []
        for ref in sample.images:
            sha = ref.sha256 or ""
            blob = outcome.input_images.get(sha)
            if blob is None:
                try:
                    blob = fetch(sha) if sha else None
                except EmmaError:
                    blob = None
            if blob is None:  # an unreadable input image (already a rejection): keep the refs in extra
                self.writer.add(_without_images(sample))
                return
            blobs.append(blob)
        self.writer.add(sample, blobs)


# ------------------------------------------------------------------------------------------- progress


class _Progress:
    def __init__(self, enabled: bool, total: int | None, stats: RunStats) -> None:
        self.stats = stats
        self._progress: Any = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]annotate"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]} items/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=Console(stderr=True),
            refresh_per_second=4,
        )
        self._task = self._progress.add_task("annotate", total=total, rate="-", status="")
        self._progress.start()
        self._last = 0.0

    def advance(self) -> None:
        if self._progress is None:
            return
        now = time.monotonic()
        speed = self._progress.tasks[0].speed
        if now - self._last >= 0.25:
            st = self.stats
            status = f"ok {st.accepted}  rejected {st.rejected_total}  skipped {st.skipped}"
            self._progress.update(self._task, advance=1, rate=f"{speed:.1f}" if speed else "-", status=status)
            self._last = now
        else:
            self._progress.update(self._task, advance=1)

    def close(self) -> None:
        if self._progress is not None:
            st = self.stats
            status = f"ok {st.accepted}  rejected {st.rejected_total}  skipped {st.skipped}"
            self._progress.update(self._task, status=status)
            self._progress.stop()


def print_stats(stats: RunStats) -> None:
    """A table of the run's statistics on stderr."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="annotation run", show_header=False)
    table.add_row("inputs", str(stats.inputs))
    table.add_row("processed / skipped (done before)", f"{stats.processed} / {stats.skipped}")
    table.add_row("accepted outputs", str(stats.accepted))
    table.add_row("rejected outputs", str(stats.rejected_total))
    for reason, n in sorted(stats.rejected.items(), key=lambda kv: (-kv[1], kv[0])):
        table.add_row(f"  {reason}", str(n))
    table.add_row("teacher calls / cached answers", f"{stats.teacher_calls} / {stats.cached_answers}")
    ts = stats.teacher_stats
    if ts:
        table.add_row(
            "teacher retries / circuit opened", f"{ts.get('retries', 0)} / {ts.get('circuit_opened', 0)}"
        )
    table.add_row("elapsed", f"{stats.elapsed_s:.1f} s ({stats.items_per_s:.1f} items/s)")
    Console(stderr=True).print(table)


# ------------------------------------------------------------------------------------------- pipeline


@dataclass(frozen=True)
class TeacherConfig:
    """How Ray workers build their own teacher: ``load_teacher(spec, **options)``."""

    spec: str
    options: dict[str, Any] = field(default_factory=dict)


def _fingerprint(
    steps: Sequence[Step], teacher_name: str, source: Dataset, splits: list[str]
) -> dict[str, Any]:
    return {
        "steps": [{"name": s.name, "prompt_hash": s.prompt_hash} for s in steps],
        "teacher": teacher_name,
        "source": source.name,
        "source_counts": {s: source.count(s) for s in splits},
        "splits": splits,
    }


def _prepare_out(out: Path, fingerprint: dict[str, Any]) -> bool:
    """Check or create the run file of ``out``; True when a previous run of the same job is resumed."""
    run_file = out / RUN_FILE
    if run_file.exists():
        try:
            previous = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{run_file}: unreadable ({type(exc).__name__})") from None
        if previous != fingerprint:
            raise InputError(
                f"{out} holds the output of a different annotation run (steps, teacher, source or splits "
                "differ); choose a new output folder (pass the same store to reuse its answers)"
            )
        return True
    check_out_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(run_file, json.dumps(fingerprint, indent=2) + "\n")
    return False


def check_out_folder(out: Path) -> None:
    """``out`` is new, empty (but for a store or a lock) or holds an annotation run."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is not a folder")
    if (out / RUN_FILE).exists() or not out.exists():
        return
    if any(p.name not in _FREE_NAMES and not _is_temporary(p.name) for p in out.iterdir()):
        raise InputError(f"{out} is not empty and holds no annotation run; choose a new output folder")


def _is_temporary(name: str) -> bool:
    return name.startswith(f".{RUN_FILE}.") and name.endswith(".tmp")  # a killed atomic write


def _write_json_atomic(path: Path, text: str) -> None:
    atomic_write(path, text)


def _image_loader(source: Dataset) -> Callable[[Sample], list[bytes]]:
    lock = threading.Lock() if source.format == "parquet" else None  # the parquet reader caches groups

    def load(sample: Sample) -> list[bytes]:
        if lock is None:
            return [source.image_bytes(ref) for ref in sample.images]
        with lock:
            return [source.image_bytes(ref) for ref in sample.images]

    return load


def _fetcher(source: Dataset, load: Callable[[Sample], list[bytes]]) -> Callable[[str], bytes]:
    from emma.data.schema import ImageRef

    def fetch(sha: str) -> bytes:
        ref = ImageRef(sha256=sha)
        if source.format == "jsonl":
            return source.image_bytes(ref)
        return load(Sample(id="_", task="caption", images=[ref], turns=[]))[0]

    return fetch


def run_pipeline(
    steps: Sequence[Step],
    source: Dataset | str | os.PathLike[str],
    out: str | os.PathLike[str],
    teacher: Teacher | TeacherConfig | str,
    *,
    splits: list[str] | None = None,
    concurrency: int = 8,
    backend: Backend = "local",
    store: str | os.PathLike[str] | None = None,
    progress: bool = True,
    window: int | None = None,
    limit: int | None = None,
    name: str | None = None,
    out_format: DatasetFormat | None = None,
    fsync: Literal["always", "batch", "never"] = "batch",
    ray_options: dict[str, Any] | None = None,
    print_summary: bool | None = None,
) -> RunStats:
    """Run ``steps`` over ``source`` into the dataset folder ``out``; resume it if it holds this job.

    ``teacher``: a :class:`Teacher` (local backend), or a spec / :class:`TeacherConfig` that each
    worker loads (required form for ``backend="ray"``, where every actor builds its own). ``store``:
    the durable result store folder (default ``out/teacher_store``; share one between runs to reuse
    answers). ``splits``: the source splits to read (default all), in order; ``limit``: at most this
    many inputs. ``window``: inputs in flight or waiting to be written (default twice the
    :func:`worker_threads` + 16).
    ``ray_options``: ``address``, ``actors`` (default 1), ``batch_size`` (default ``4 * concurrency``),
    ``num_cpus`` / ``num_gpus`` per actor. Returns the run statistics (also in ``out/run_stats.json``).
    """
    if not steps:
        raise InputError("no annotation steps given")
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise InputError(f"step names must be unique: {', '.join(names)}")
    if concurrency < 1:
        raise InputError(f"concurrency must be >= 1, got {concurrency}")
    if backend not in ("local", "ray"):
        raise InputError(f"unknown backend {backend!r} (local or ray)")
    if limit is not None and limit < 0:
        raise InputError(f"limit must be >= 0, got {limit}")
    src = source if isinstance(source, Dataset) else open_dataset(source)
    wanted = list(splits) if splits is not None else src.splits
    for split in wanted:
        src.count(split)  # DataFormatError for an unknown split
    out_path = Path(out)
    if out_path.resolve() == src.root.resolve():
        raise InputError("the output folder must differ from the source dataset")

    config: TeacherConfig | None = None
    teacher_obj: Teacher | None = None
    if isinstance(teacher, Teacher):
        if backend == "ray":
            raise InputError(
                "the ray backend needs a teacher spec (each worker loads its own), not a Teacher"
            )
        teacher_obj = teacher
        tname = teacher.name
    else:
        config = teacher if isinstance(teacher, TeacherConfig) else TeacherConfig(str(teacher))
        tname = str(config.options.get("name") or "") or teacher_name(config.spec)

    fingerprint = _fingerprint(steps, tname, src, wanted)
    check_out_folder(out_path)
    with exclusive_folder(out_path, "annotation run"):  # one writer: a concurrent run is refused
        return _run_locked(
            steps,
            src,
            out_path,
            fingerprint,
            config,
            teacher_obj,
            tname,
            names,
            wanted,
            concurrency=concurrency,
            backend=backend,
            store=store,
            progress=progress,
            window=window,
            limit=limit,
            name=name,
            out_format=out_format,
            fsync=fsync,
            ray_options=ray_options,
            print_summary=print_summary,
        )


def _run_locked(
    steps: Sequence[Step],
    src: Dataset,
    out_path: Path,
    fingerprint: dict[str, Any],
    config: TeacherConfig | None,
    teacher_obj: Teacher | None,
    tname: str,
    names: list[str],
    wanted: list[str],
    *,
    concurrency: int,
    backend: Backend,
    store: str | os.PathLike[str] | None,
    progress: bool,
    window: int | None,
    limit: int | None,
    name: str | None,
    out_format: DatasetFormat | None,
    fsync: Literal["always", "batch", "never"],
    ray_options: dict[str, Any] | None,
    print_summary: bool | None,
) -> RunStats:
    resumed = _prepare_out(out_path, fingerprint)
    ctx = _Context(tuple(steps), result_key("fingerprint", json.dumps(fingerprint, sort_keys=True)))
    store_path = Path(store) if store is not None else out_path / DEFAULT_STORE
    total = sum(src.count(s) for s in wanted)
    if limit is not None:
        total = min(total, limit)
    stats = RunStats(
        out=str(out_path),
        backend=backend,
        teacher=tname,
        steps=fingerprint["steps"],
        concurrency=concurrency,
    )
    own_teacher = teacher_obj is None and backend == "local"
    if own_teacher:
        assert config is not None
        teacher_obj = load_teacher(config.spec, **{"concurrency": concurrency, **config.options})
    try:
        result_store = ResultStore(store_path, fsync=fsync)
    except BaseException:
        if own_teacher and teacher_obj is not None:
            teacher_obj.close()
        raise
    start = time.monotonic()  # after loading the teacher: items/s measures the run, not a model load
    try:
        with DatasetWriter(
            out_path,
            name=name or f"{src.name}-{'-'.join(names)}",
            license=src.manifest.license,
            source=src.manifest.source,
            format=out_format or src.format,
            resume=True,
            description=f"{src.name} through {', '.join(names)} (teacher {tname})",
            extra={"annotation_run": fingerprint},
        ) as writer:
            output = _OutputWriter(writer, result_store, stats, resumed)
            bar = _Progress(progress, total, stats)
            try:
                if backend == "local":
                    assert teacher_obj is not None
                    _run_local(
                        ctx, src, wanted, limit, teacher_obj, result_store, output, concurrency, window, bar
                    )
                else:
                    assert config is not None
                    _run_ray(
                        ctx,
                        src,
                        wanted,
                        limit,
                        config,
                        store_path,
                        output,
                        concurrency,
                        fsync,
                        ray_options or {},
                        bar,
                    )
            finally:
                bar.close()
        stats.completed = True
    finally:
        result_store.close()
        if teacher_obj is not None:
            stats.teacher_stats = teacher_obj.stats()
            if own_teacher:
                teacher_obj.close()
        stats.elapsed_s = round(time.monotonic() - start, 3)
        stats.items_per_s = round(stats.processed / stats.elapsed_s, 3) if stats.elapsed_s > 0 else 0.0
        if out_path.is_dir():
            _write_json_atomic(out_path / STATS_FILE, stats.to_json())
    if print_summary if print_summary is not None else progress:
        print_stats(stats)
    return stats


def worker_threads(concurrency: int) -> int:
    """Worker threads for ``concurrency`` teacher calls in flight: a few more, so that while ``concurrency``
    items wait for the teacher others are decoded, prepared and handed over, and the teacher's slots
    never idle between two calls (the teacher itself keeps at most ``concurrency`` calls in flight)."""
    return concurrency + max(2, concurrency // 4)


def iter_inputs(src: Dataset, splits: Sequence[str], limit: int | None) -> Iterator[Sample]:
    """The samples of ``splits`` in order, the first ``limit`` of them when given: a run's inputs."""
    n = 0
    for split in splits:
        for sample in src.iter_samples(split):
            if limit is not None and n >= limit:
                return
            n += 1
            yield sample


def _run_local(
    ctx: _Context,
    src: Dataset,
    splits: list[str],
    limit: int | None,
    teacher: Teacher,
    store: ResultStore,
    output: _OutputWriter,
    concurrency: int,
    window: int | None,
    bar: _Progress,
) -> None:
    load = _image_loader(src)
    fetch = _fetcher(src, load)
    workers = worker_threads(concurrency)
    size = window or 2 * workers + 16
    pending: deque[Future[_Outcome] | _Outcome] = deque()
    # at most `concurrency` teacher calls asked and not yet stored: a kill loses at most that many answers
    flight = threading.BoundedSemaphore(concurrency)
    inputs = enumerate(iter_inputs(src, splits, limit))
    exhausted = False
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="emma-annotate")
    try:
        while True:
            while not exhausted and len(pending) < size:
                nxt = next(inputs, None)
                if nxt is None:
                    exhausted = True
                    break
                index, sample = nxt
                output.stats.inputs += 1
                sha = item_hash(sample)
                done = store.get(_done_key(ctx, sha))
                if done is not None and done.outputs is not None and output.skip_ok(done.outputs):
                    pending.append(_Outcome(index, sample.id, "", skip=done.outputs))
                    continue
                pending.append(pool.submit(_process, ctx, index, sample, sha, load, teacher, store, flight))
            if not pending:
                break
            head = pending.popleft()
            outcome = head.result() if isinstance(head, Future) else head
            output.write(outcome, fetch)
            bar.advance()
    except BaseException:
        # interrupted or failed: do not wait for calls in flight (up to the teacher's timeout); what they
        # still store is kept, what is not is asked again by the rerun
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


# ------------------------------------------------------------------------------------------------ ray


class _RayWorker:
    """A Ray Data actor: its own teacher, store segment and thread pool; one outcome row per input row."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.ctx: _Context = cfg["ctx"]
        self.src = open_dataset(cfg["source"])
        self.store = ResultStore(cfg["store"], fsync=cfg["fsync"])
        config: TeacherConfig = cfg["teacher"]
        self.concurrency: int = cfg["concurrency"]
        self.teacher = load_teacher(config.spec, **{"concurrency": self.concurrency, **config.options})
        self.load = _image_loader(self.src)
        self.pool = ThreadPoolExecutor(
            max_workers=worker_threads(self.concurrency), thread_name_prefix="emma-annotate-ray"
        )
        self.flight = threading.BoundedSemaphore(self.concurrency)

    def _one(self, text: str) -> bytes:
        sample = Sample.model_validate_json(text)
        sha = item_hash(sample)
        done = self.store.get(_done_key(self.ctx, sha))
        if done is not None and done.outputs is not None:
            outcome = _Outcome(0, sample.id, _done_key(self.ctx, sha), skip=done.outputs)
            outcome.items = [Item(sample)]  # kept so that the writer can redo it if the outputs are missing
        else:
            outcome = _process(self.ctx, 0, sample, sha, self.load, self.teacher, self.store, self.flight)
        for item in outcome.items:  # PIL images do not travel well: encoded PNG, decoded by the writer
            if item.images is not None:
                item.images = [_PngImage(encode_png(im)) for im in item.images]  # type: ignore[misc]
        return pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        column = "text" if "text" in batch else "sample_json"
        texts = [str(t) for t in batch[column]]
        return {"outcome": list(self.pool.map(self._one, texts))}  # read_text drops blank lines

    def __del__(self) -> None:  # pragma: no cover — actor teardown
        try:
            self.store.close()
            self.teacher.close()
        except Exception as exc:  # noqa: BLE001 — the process is going away anyway
            log.debug("ray worker teardown: %s", type(exc).__name__)


@dataclass
class _PngImage:
    data: bytes

    def open(self) -> Image.Image:
        from emma.data.store import decode_image

        return decode_image(self.data, what="image")


def _split_sources(src: Dataset, split: str) -> list[str]:
    if src.format == "jsonl":
        path = src.root / "samples" / f"{split}.jsonl"
        return [str(path)] if path.exists() else []
    return [str(p) for p in sorted((src.root / "shards").glob(f"{split}-*.parquet"))]


def _run_ray(
    ctx: _Context,
    src: Dataset,
    splits: list[str],
    limit: int | None,
    config: TeacherConfig,
    store_path: Path,
    output: _OutputWriter,
    concurrency: int,
    fsync: Literal["always", "batch", "never"],
    options: dict[str, Any],
    bar: _Progress,
) -> None:
    try:
        import ray
        import ray.data
    except ImportError:
        raise InputError("the ray backend needs Ray: pip install 'emma-med[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=options.get("address"), include_dashboard=False, log_to_driver=False)
    cfg = {
        "ctx": ctx,
        "source": str(src.root.resolve()),
        "store": str(store_path.resolve()),
        "fsync": fsync,
        "teacher": config,
        "concurrency": concurrency,
    }
    load = _image_loader(src)
    fetch = _fetcher(src, load)
    data_ctx = ray.data.DataContext.get_current()
    old_order = data_ctx.execution_options.preserve_order
    old_progress = data_ctx.enable_progress_bars
    data_ctx.execution_options.preserve_order = True
    data_ctx.enable_progress_bars = False
    remaining = limit
    teacher_fallback: Teacher | None = None
    try:
        for split in splits:
            files = _split_sources(src, split)
            if not files or remaining == 0:
                continue
            if src.format == "jsonl":
                ds = ray.data.read_text(files)
            else:
                ds = ray.data.read_parquet(files, columns=["sample_json"])
            if remaining is not None:
                ds = ds.limit(remaining)
            ds = ds.map_batches(
                _RayWorker,
                fn_constructor_kwargs={"cfg": cfg},
                batch_size=int(options.get("batch_size", 4 * concurrency)),
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=int(options.get("actors", 1))),
                num_cpus=float(options.get("num_cpus", 1)),
                num_gpus=float(options.get("num_gpus", 0)),
            )
            for row in ds.iter_rows():
                outcome: _Outcome = pickle.loads(row["outcome"])
                output.stats.inputs += 1
                if remaining is not None:
                    remaining -= 1
                for item in outcome.items:
                    if item.images is not None:
                        item.images = [p.open() if isinstance(p, _PngImage) else p for p in item.images]
                if outcome.skip is not None and not output.skip_ok(outcome.skip):
                    # marked done, but some outputs were lost with the writer (a killed Parquet shard):
                    # redo it here, every answer from the store
                    if teacher_fallback is None:
                        teacher_fallback = load_teacher(config.spec, **{"concurrency": 1, **config.options})
                    sample = outcome.items[0].sample
                    outcome = _process(
                        ctx, 0, sample, item_hash(sample), load, teacher_fallback, output.store
                    )
                output.write(outcome, fetch)
                bar.advance()
    finally:
        data_ctx.execution_options.preserve_order = old_order
        data_ctx.enable_progress_bars = old_progress
        if teacher_fallback is not None:
            teacher_fallback.close()
